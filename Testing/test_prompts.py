"""Tests of the free-text prompt layer (UniversalSegLib.prompts) and the CLIP text encoder (text_encoder)."""

from __future__ import annotations

import functools
import http.server
import json
import threading

import pytest
import torch

from conftest import IN_CI, SHARED
from UniversalSegLib.catalog import ClassCatalog
from UniversalSegLib.errors import CheckpointError, DownloadError, InputError
from UniversalSegLib.prompts import (
    METHODS,
    class_embeddings_from_encoder,
    resolve_prompt,
    split_prompt,
)

REJECT = "REJECT"
K = ["Right Kidney", "Left Kidney"]

# (prompt, expected display names in catalog order, or REJECT); resolved without CLIP.
TABLE = [
    # names and abbreviations
    ("liver", ["Liver"]),
    ("Spleen", ["Spleen"]),
    ("IVC", ["Postcava"]),
    ("inferior vena cava", ["Postcava"]),
    ("GB", ["Gall Bladder"]),
    ("gallbladder", ["Gall Bladder"]),
    ("Gall-Bladder", ["Gall Bladder"]),
    ("aorta", ["Aorta"]),
    ("Arota", ["Aorta"]),
    ("celiac truck", ["Celiac Trunk"]),
    ("coeliac trunk", ["Celiac Trunk"]),
    ("celiac axis", ["Celiac Trunk"]),
    ("portal vein", ["Portal Vein and Splenic Vein"]),
    ("splenic vein", ["Portal Vein and Splenic Vein"]),
    ("portal vein and splenic vein", ["Portal Vein and Splenic Vein"]),
    ("small bowel", ["Intestine"]),
    ("small intestine", ["Intestine"]),
    ("large bowel", ["Colon"]),
    ("urinary bladder", ["Bladder"]),
    ("prostate gland", ["Prostate"]),
    ("hepatic vessels", ["Hepatic Vessel"]),
    # British / other spellings
    ("oesophagus", ["Esophagus"]),
    ("Oesophageal", ["Esophagus"]),
    ("liver tumour", ["Liver Tumor"]),
    ("renal tumour", ["Kidney Tumor"]),
    ("coeliac artery", ["Celiac Trunk"]),
    # lesions
    ("liver lesion", ["Liver Tumor"]),
    ("hepatic lesion", ["Liver Tumor"]),
    ("HCC", ["Liver Tumor"]),
    ("liver mets", ["Liver Tumor"]),
    ("pancreatic mass", ["Pancreas Tumor"]),
    ("PDAC", ["Pancreas Tumor"]),
    ("RCC", ["Kidney Tumor"]),
    ("renal cell carcinoma", ["Kidney Tumor"]),
    ("colon cancer", ["Colon Tumor"]),
    ("pulmonary nodule", ["Lung Tumor"]),
    ("renal cyst", ["Kidney Cyst"]),
    ("renal lesions", ["Kidney Tumor", "Kidney Cyst"]),
    # laterality
    ("left kidney", ["Left Kidney"]),
    ("L kidney", ["Left Kidney"]),
    ("lt kidney", ["Left Kidney"]),
    ("Rt. Kidney", ["Right Kidney"]),
    ("kidney, right", ["Right Kidney"]),
    ("right adrenal", ["Right Adrenal Gland"]),
    ("L adrenal gland", ["Left Adrenal Gland"]),
    ("left lung", ["Left Lung"]),
    ("R lung", ["Right Lung"]),
    ("right femoral head", ["Right Head of Femur"]),
    ("lt femoral head", ["Left Head of Femur"]),
    ("left kidney tumour", ["Kidney Tumor"]),  # the tumour class covers both kidneys
    # coordinated laterality (how reports and requests word both sides)
    ("right and left kidney", K),
    ("left and right kidneys", K),
    ("right & left adrenal glands", ["Right Adrenal Gland", "Left Adrenal Gland"]),
    ("left + right lung", ["Right Lung", "Left Lung"]),
    ("kidney, left and right", K),
    ("adrenal glands, bilateral", ["Right Adrenal Gland", "Left Adrenal Gland"]),
    ("kidneys bilaterally", K),
    ("right and left femoral heads", ["Left Head of Femur", "Right Head of Femur"]),
    ("liver, right & left kidney", ["Right Kidney", "Left Kidney", "Liver"]),
    ("liver and right kidney", ["Right Kidney", "Liver"]),  # "and" between two structures still separates them
    ("right kidney and left adrenal gland", ["Right Kidney", "Left Adrenal Gland"]),
    ("right and left", REJECT),  # sides with no structure
    # plurals and groups
    ("kidneys", K),
    ("both kidneys", K),
    ("bilateral kidneys", K),
    ("lungs", ["Right Lung", "Left Lung"]),
    ("both lungs", ["Right Lung", "Left Lung"]),
    ("adrenals", ["Right Adrenal Gland", "Left Adrenal Gland"]),
    ("b/l adrenal glands", ["Right Adrenal Gland", "Left Adrenal Gland"]),
    ("femoral heads", ["Left Head of Femur", "Right Head of Femur"]),
    ("all vessels", ["Aorta", "Postcava", "Portal Vein and Splenic Vein", "Hepatic Vessel", "Celiac Trunk"]),
    (
        "all tumors",
        ["Kidney Tumor", "Liver Tumor", "Pancreas Tumor", "Hepatic Vessel Tumor", "Lung Tumor", "Colon Tumor"],
    ),
    (
        "all lesions",
        [
            "Kidney Tumor",
            "Liver Tumor",
            "Pancreas Tumor",
            "Hepatic Vessel Tumor",
            "Lung Tumor",
            "Colon Tumor",
            "Kidney Cyst",
        ],
    ),
    ("renal cysts", ["Kidney Cyst"]),
    ("Livers", ["Liver"]),
    # mixed case
    ("LIVER", ["Liver"]),
    ("pAnCrEaS", ["Pancreas"]),
    ("Please segment the spleen", ["Spleen"]),
    # typos
    ("livr", ["Liver"]),
    ("pancraes", ["Pancreas"]),
    ("duodenom", ["Duodenum"]),
    ("spleeen", ["Spleen"]),
    ("esophagous", ["Esophagus"]),
    ("oesophagous", ["Esophagus"]),
    ("gallbladdr", ["Gall Bladder"]),
    ("haepatic vessel", ["Hepatic Vessel"]),
    ("prostrate", ["Prostate"]),
    ("rigth kidney", ["Right Kidney"]),
    ("left kidny", ["Left Kidney"]),
    ("tumour of the pancreas", ["Pancreas Tumor"]),
    # multi-item
    ("IVC and both kidneys", ["Right Kidney", "Left Kidney", "Postcava"]),
    ("gallbladder, spleen", ["Spleen", "Gall Bladder"]),
    ("liver; spleen\npancreas", ["Spleen", "Liver", "Pancreas"]),
    ("stomach & duodenum + colon", ["Stomach", "Duodenum", "Colon"]),
    ("aorta and IVC", ["Aorta", "Postcava"]),
    # nonsense and structures the model does not have
    ("banana", REJECT),
    ("asdfgh", REJECT),
    ("xyz", REJECT),
    ("heart", REJECT),
    ("brain", REJECT),
    ("thyroid", REJECT),
    ("liver cyst", REJECT),
    ("kidney stone", REJECT),
    ("renal artery", REJECT),
    ("superior vena cava", REJECT),
    ("SMV", REJECT),
    ("SMA", REJECT),
    ("pancreatic duct", REJECT),
    ("bile duct", REJECT),
    ("adrenal mass", REJECT),
    ("femur", REJECT),
    ("left ear", REJECT),
    ("liver transplant", REJECT),
    ("river", REJECT),
    ("lever", REJECT),
]


@pytest.fixture(scope="module")
def cat() -> ClassCatalog:
    return ClassCatalog.default()


def test_table_has_enough_prompts():
    assert len(TABLE) >= 60
    assert sum(1 for _, e in TABLE if e == REJECT) >= 15


@pytest.mark.parametrize("prompt,expected", TABLE, ids=[t for t, _ in TABLE])
def test_prompt_table(prompt, expected, cat):
    res = resolve_prompt(prompt)
    if expected == REJECT:
        assert res.classes == [], res.describe()
        assert all(it.method == "rejected" for it in res.items)
        assert res.rejected
    else:
        want = sorted(cat.lookup(n).index for n in expected)
        assert res.classes == want, res.describe()
        assert not res.rejected
        for it in res.items:
            assert it.method in ("exact", "synonym", "group", "fuzzy")
            if it.method == "fuzzy":
                assert it.score is not None and it.score >= 0.85  # the fuzzy cut-off: 85 of 100


def test_methods_are_reported(cat):
    res = resolve_prompt("Liver, IVC, both kidneys, livr, banana")
    assert [it.method for it in res.items] == ["exact", "synonym", "group", "fuzzy", "rejected"]
    assert res.items[3].score == pytest.approx(0.889, abs=1e-3)
    assert res.items[0].score is None
    assert res.items[4].suggestions == []  # nothing looks like "banana"
    livre = resolve_prompt("livre").items[0]  # two letters swapped: below the cut-off, but suggested
    assert livre.method == "rejected" and livre.suggestions[0] == "Liver" and livre.score == pytest.approx(0.8)
    assert all(it.method in METHODS for it in res.items)


def test_splitting(cat):
    assert split_prompt("IVC and both kidneys") == ["IVC", "both kidneys"]
    assert split_prompt("portal vein and splenic vein") == ["portal vein and splenic vein"]
    assert split_prompt(" liver ;; spleen,\n\n pancreas & GB + aorta ") == [
        "liver",
        "spleen",
        "pancreas",
        "GB",
        "aorta",
    ]
    assert split_prompt(["liver, spleen", "IVC"]) == ["liver", "spleen", "IVC"]
    assert resolve_prompt("").items == []
    assert resolve_prompt(" , ;").classes == []
    with pytest.raises(InputError):
        split_prompt([1, 2])  # type: ignore[list-item]


def test_rejection_suggests_similar_classes():
    res = resolve_prompt("pancreatic duct")
    item = res.items[0]
    assert item.method == "rejected" and item.classes == []
    assert "Pancreas" in item.suggestions
    assert "did you mean 'Pancreas'" in res.describe()


def test_fuzzy_needs_margin_and_length():
    # "kidney" alone is a group; a two-letter typo of an abbreviation is never fuzzy-matched
    assert resolve_prompt("IVD").classes == []
    assert resolve_prompt("GV").classes == []


def test_json_shape(cat):
    res = resolve_prompt("IVC and both kidneys, livr, banana")
    doc = res.to_json()
    json.dumps(doc)  # serialisable
    assert set(doc) == {"items"}
    for item in doc["items"]:
        assert set(item) == {"text", "classes", "method", "score", "suggestions"}
    assert doc["items"][0] == {
        "text": "IVC",
        "classes": ["Postcava"],
        "method": "synonym",
        "score": None,
        "suggestions": [],
    }
    assert doc["items"][1]["classes"] == ["Right Kidney", "Left Kidney"]
    assert doc["items"][2]["method"] == "fuzzy" and 0.85 <= doc["items"][2]["score"] <= 1
    assert doc["items"][3]["classes"] == [] and doc["items"][3]["method"] == "rejected"
    assert res.class_names() == ["Right Kidney", "Left Kidney", "Liver", "Postcava"]
    text = res.describe().splitlines()
    assert text[0] == "'IVC' -> Postcava (synonym)"
    assert text[1] == "'both kidneys' -> Right Kidney, Left Kidney (group)"


# --------------------------------------------------------------------------------------------- CLIP (random weights)
@pytest.fixture(scope="module")
def enc():
    from UniversalSegLib.text_encoder import ClipTextEncoder

    return ClipTextEncoder.random(seed=0, device="cpu")


@pytest.fixture(scope="module")
def class_emb(enc):
    return class_embeddings_from_encoder(enc)


def test_encoder_output(enc, class_emb, cat):
    assert class_emb.shape == (32, 512) and class_emb.dtype == torch.float32
    # template applied, raw (not normalised) features, like upstream's txt_encoding.pth
    assert torch.equal(enc.encode(["Arota"])[0], enc.encode_prompts(["A computerized tomography of a Arota"])[0])
    assert not torch.allclose(class_emb.norm(dim=1), torch.ones(32))
    # the shortened-context encoding equals open_clip's own encode_text on the full 77 tokens
    tokens = enc.tokenizer([c.prompt for c in list(cat)[:4]])
    with torch.inference_mode():
        full = enc.model.encode_text(tokens)
    assert torch.allclose(full, class_emb[:4], atol=1e-4)


def _at_similarities(enc, text, rows: dict[int, float], others: float = 0.3) -> torch.Tensor:
    """32 class embeddings whose cosine similarity to the encoding of ``text`` is set by construction: ``rows``
    (1-based) -> cosine, every other class ``others``. Each row also has its own direction orthogonal to the query,
    so the rows differ, and the norms vary (the resolver must compare directions, not raw dot products)."""
    q = torch.nn.functional.normalize(enc.encode([text])[0].double(), dim=0)
    generator = torch.Generator().manual_seed(1)
    rows_out = []
    for r in range(1, 33):
        cos = rows.get(r, others)
        u = torch.randn(q.shape, generator=generator, dtype=torch.float64)
        u = torch.nn.functional.normalize(u - (u @ q) * q, dim=0)
        rows_out.append((cos * q + (1 - cos**2) ** 0.5 * u) * (1 + r / 8))
    return torch.stack(rows_out).float()


# The documented rule (README): a CLIP match is accepted at cosine similarity >= 0.95 when it
# beats the runner-up by 0.01 (the left/right twin of a paired organ excepted).
def test_clip_accepts_a_class_above_the_documented_threshold(enc):
    emb = _at_similarities(enc, "zzqx structure", {5: 0.96})
    res = resolve_prompt("zzqx structure", encoder=enc, class_embeddings=emb)
    item = res.items[0]
    assert item.method == "clip" and item.classes == [5] and item.score == pytest.approx(0.96, abs=1e-4)
    assert "(clip, score 0.96)" in res.describe()


def test_clip_below_the_documented_threshold_is_rejected(enc):
    emb = _at_similarities(enc, "zzqx structure", {5: 0.94})
    res = resolve_prompt("zzqx structure", encoder=enc, class_embeddings=emb)
    item = res.items[0]
    assert item.method == "rejected" and item.classes == []
    assert item.score == pytest.approx(0.94, abs=1e-4)
    assert item.suggestions[0] == "Esophagus"  # "did you mean" the nearest class
    # a caller's own threshold applies instead of the default
    lowered = resolve_prompt("zzqx structure", encoder=enc, class_embeddings=emb, clip_threshold=0.9)
    assert lowered.classes == [5] and lowered.items[0].method == "clip"


def test_clip_needs_the_documented_margin(enc):
    close = _at_similarities(enc, "zzqx structure", {5: 0.975, 7: 0.97})  # 0.005 apart: Esophagus or Stomach?
    res = resolve_prompt("zzqx structure", encoder=enc, class_embeddings=close)
    assert res.items[0].method == "rejected" and res.classes == []
    assert res.items[0].suggestions[:2] == ["Esophagus", "Stomach"]
    apart = _at_similarities(enc, "zzqx structure", {5: 0.985, 7: 0.97})  # 0.015 apart
    assert resolve_prompt("zzqx structure", encoder=enc, class_embeddings=apart).classes == [5]


def test_clip_left_right_twins(enc):
    emb = _at_similarities(enc, "zzqx", {2: 0.97, 3: 0.968})  # right and left kidney: a pair, no margin needed
    assert resolve_prompt("zzqx", encoder=enc, class_embeddings=emb).classes == [2, 3]
    res = resolve_prompt("left zzqx", encoder=enc, class_embeddings=emb)
    assert res.classes == [3] and res.items[0].method == "clip"


def test_unknown_text_is_rejected(enc, class_emb):
    """Anatomy the catalog lacks and nonsense are rejected, with the random encoder's own class embeddings (all
    near each other: no margin) and with the real CLIP class embeddings (far from these queries)."""
    nonsense = ["banana", "qwertyuiop", "heart", "brain", "thyroid", "kidney stone", "renal artery", "SMV", "femur"]
    for emb in (class_emb, _real_class_embeddings_or_none()):
        if emb is None:
            continue
        res = resolve_prompt(nonsense, encoder=enc, class_embeddings=emb)
        assert [(it.text, it.method, it.classes) for it in res.items] == [(t, "rejected", []) for t in nonsense]
        assert res.classes == [] and len(res.rejected) == len(nonsense)


def _real_class_embeddings_or_none():
    p = SHARED / "reference" / "clip_txt_encoding_32.pth"
    if not p.exists():
        if IN_CI:
            pytest.fail(f"reference data missing: {p}")
        return None
    return torch.load(p, map_location="cpu", weights_only=True).float()


def test_experimental_passes_raw_embedding(enc, class_emb):
    res = resolve_prompt(
        "liver, qwertyuiop", encoder=enc, class_embeddings=class_emb, clip_threshold=1.01, allow_experimental=True
    )
    liver, exp = res.items
    assert liver.method == "exact" and exp.method == "experimental"
    assert not exp.accepted and exp.classes == [] and res.classes == [6]
    assert res.experimental == [exp] and res.rejected == []
    assert exp.embedding is not None and len(exp.embedding) == 512
    assert torch.allclose(torch.tensor(exp.embedding), enc.encode(["qwertyuiop"])[0])
    assert "EXPERIMENTAL" in res.describe()
    assert res.to_json()["items"][1]["method"] == "experimental"


def test_without_encoder_clip_items_are_rejected():
    res = resolve_prompt("qwertyuiop")
    assert res.items[0].method == "rejected"


def test_bad_class_embeddings_shape(enc):
    with pytest.raises(InputError, match="shape"):
        resolve_prompt("qwertyuiop", encoder=enc, class_embeddings=torch.zeros(31, 512))


def test_disk_cache_hit(tmp_path, enc):
    from UniversalSegLib.text_encoder import ClipTextEncoder

    a = ClipTextEncoder(enc.model, enc.identity, device="cpu", disk_cache=tmp_path)
    first = a.encode(["abdominal wall", "liver"])
    assert a.model_calls == 2
    a.encode(["liver"])
    assert a.model_calls == 2  # memory hit
    b = ClipTextEncoder(enc.model, enc.identity, device="cpu", disk_cache=tmp_path)  # a new process, same model
    again = b.encode(["abdominal wall", "liver"])
    assert b.model_calls == 0 and torch.equal(first, again)
    other = ClipTextEncoder(enc.model, enc.identity + "-other", device="cpu", disk_cache=tmp_path)
    other.encode(["liver"])
    assert other.model_calls == 1  # keyed by model identity
    # a corrupt entry is a miss, not an error
    for f in b.disk_cache.glob("*.safetensors"):
        f.write_bytes(b"garbage")
    c = ClipTextEncoder(enc.model, enc.identity, device="cpu", disk_cache=tmp_path)
    assert torch.allclose(c.encode(["liver"]), first[1:], atol=1e-4)
    assert c.model_calls == 1


# ----------------------------------------------------------------------------------- weights download (local server)
class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep test output clean
        pass


@pytest.fixture()
def http_dir(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture()
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIVERSALSEG_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("UNIVERSALSEG_CLIP_WEIGHTS", raising=False)
    return tmp_path / "home"


def test_weights_download_and_load(http_dir, home, enc, class_emb):
    from safetensors.torch import save_file

    from UniversalSegLib.download import sha256_file
    from UniversalSegLib.text_encoder import ClipTextEncoder

    root, base = http_dir
    weights = root / "clip_text_fp16.safetensors"
    save_file({k: v.half().contiguous() for k, v in enc.text_tower_state_dict().items()}, str(weights))
    sha = sha256_file(weights)
    loaded = ClipTextEncoder.pretrained(
        weights_url=f"{base}/{weights.name}", sha256=sha, expected_size=weights.stat().st_size, device="cpu"
    )
    cached = list((home / "clip").glob("*.safetensors"))
    assert len(cached) == 1 and sha256_file(cached[0]) == sha
    assert loaded.identity.endswith(sha)
    out = loaded.encode(["Liver", "Arota"])
    cos = torch.nn.functional.cosine_similarity(out, class_emb[[5, 7]], dim=1)
    assert bool((cos > 0.999).all())  # same network, fp16-rounded weights
    # second call: the cached file is used (server gone is fine) and the prompt cache hits on disk
    weights.unlink()
    again = ClipTextEncoder.pretrained(
        weights_url=f"{base}/{weights.name}", sha256=sha, expected_size=cached[0].stat().st_size, device="cpu"
    )
    assert torch.equal(again.encode(["Liver", "Arota"]), out) and again.model_calls == 0


def test_weights_with_wrong_content(http_dir, home):
    from safetensors.torch import save_file

    from UniversalSegLib.download import sha256_file
    from UniversalSegLib.text_encoder import ClipTextEncoder

    root, base = http_dir
    bad = root / "not_clip.safetensors"
    save_file({"conv.weight": torch.zeros(3, 3)}, str(bad))
    with pytest.raises(CheckpointError, match="not an open_clip ViT-B-32 CLIP checkpoint"):
        ClipTextEncoder.pretrained(weights_url=f"{base}/{bad.name}", sha256=sha256_file(bad), expected_size=None)
    junk = root / "junk.bin"
    junk.write_bytes(b"this is not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match="cannot read CLIP weights"):
        ClipTextEncoder.pretrained(weights_url=f"{base}/{junk.name}", sha256=None, expected_size=None)


def test_weights_checksum_mismatch(http_dir, home):
    from UniversalSegLib.text_encoder import ClipTextEncoder

    root, base = http_dir
    (root / "w.safetensors").write_bytes(b"x" * 100)
    with pytest.raises(DownloadError, match="CLIP ViT-B/32 text-encoder weights"):
        ClipTextEncoder.pretrained(weights_url=f"{base}/w.safetensors", sha256="0" * 64, expected_size=None)
    assert not list((home / "clip").glob("*.safetensors"))  # nothing unverified left behind


def test_weights_offline_message(home):
    import socket

    from UniversalSegLib.text_encoder import ClipTextEncoder

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError) as exc:
        ClipTextEncoder.pretrained(
            weights_url=f"http://127.0.0.1:{port}/w.safetensors", sha256=None, expected_size=None
        )
    msg = str(exc.value)
    assert "UNIVERSALSEG_CLIP_WEIGHTS" in msg and "\n" not in msg
    with pytest.raises(DownloadError, match="not in the cache"):
        ClipTextEncoder.pretrained(download=False)


def test_weights_env_override(home, monkeypatch, tmp_path):
    from UniversalSegLib.text_encoder import clip_weights_path

    monkeypatch.setenv("UNIVERSALSEG_CLIP_WEIGHTS", str(tmp_path / "missing.safetensors"))
    with pytest.raises(InputError, match="UNIVERSALSEG_CLIP_WEIGHTS"):
        clip_weights_path()
    f = tmp_path / "local.safetensors"
    f.write_bytes(b"x")
    monkeypatch.setenv("UNIVERSALSEG_CLIP_WEIGHTS", str(f))
    assert clip_weights_path() == f


def test_real_weights_reproduce_upstream_class_embeddings():
    """With the real OpenAI weights ($UNIVERSALSEG_CLIP_WEIGHTS; tests use an isolated cache) the encoder reproduces
    upstream's txt_encoding.pth."""
    from UniversalSegLib.text_encoder import ClipTextEncoder, clip_weights_path

    try:
        path = clip_weights_path(download=False)
    except (DownloadError, InputError) as exc:
        pytest.skip(f"CLIP ViT-B/32 weights not available offline: {exc}")
    ref = _real_class_embeddings_or_none()
    if ref is None:
        pytest.skip("reference embeddings missing")
    enc = ClipTextEncoder.from_file(path, disk_cache=False)
    ours = class_embeddings_from_encoder(enc)
    cos = torch.nn.functional.cosine_similarity(ours, ref, dim=1)
    assert bool((cos > 0.999).all()), cos  # upstream ran fp16 on a GPU, we run fp32
    assert torch.allclose(ours.norm(dim=1), ref.norm(dim=1), rtol=1e-2)  # unnormalised, like upstream
