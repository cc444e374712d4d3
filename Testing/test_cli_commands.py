"""The ``universalseg`` commands and options that had no test: ``models``, ``download``, ``classes``,
``--class-threshold``, ``--redo`` and ``--experimental-prompts`` end to end.

Downloads go to the real HTTP server on 127.0.0.1 (``http_server`` in conftest.py); the registry the commands read is
a test file pointed to in place of the shipped one. Segmentation runs use the small random-weight model
(``tiny_model_path``) on a small crop of a real CT.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import shared_path
from UniversalSegLib import registry as registry_module
from UniversalSegLib.catalog import ClassCatalog
from UniversalSegLib.checkpoints import save_checkpoint
from UniversalSegLib.cli import main
from UniversalSegLib.networks import ModelConfig, UniversalModel
from UniversalSegLib.registry import ACCEPT_LICENCE_ENV

CATALOG = ClassCatalog.default()


@pytest.fixture(autouse=True)
def _no_blanket_acceptance(monkeypatch):
    for var in (ACCEPT_LICENCE_ENV, "UNIVERSALSEG_ACCEPT_LICENCE", "UNIVERSALSEG_ACCEPT_LICENSE"):
        monkeypatch.delenv(var, raising=False)


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def crop(tmp_path_factory) -> Path:
    """60x60x16 voxels (3 mm) of the upper-abdomen slab: a few windows, seconds per run."""
    image = sitk.ReadImage(str(shared_path("data", "ct", "totalseg_abdomen", "ct_upper_slab.nii.gz")))
    path = tmp_path_factory.mktemp("crop") / "crop.nii.gz"
    sitk.WriteImage(image[30:90, 20:80, 10:26], str(path))
    return path


def _mask(path: Path) -> np.ndarray:
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(bool)


# ------------------------------------------------------------------------------------ models / download (registry)
@pytest.fixture
def test_registry(http_server, tmp_path, monkeypatch):
    """A registry file with one licensed model served by the local server, read by the commands in place of the
    shipped one. Returns (server state, payload)."""
    payload = os.urandom(200_000)
    url = http_server.add("/weights/test_model.pth", payload)
    entry = {
        "name": "test-model",
        "kind": "segmentation",
        "architecture": "unet",
        "description": "a test model",
        "licence": "Test Licence 1.0",
        "licence_url": "https://example.org/test-licence",
        "url": url,
        "filename": "test_model.pth",
        "size": len(payload),
        "sha256": hashlib.sha256(payload).hexdigest(),
        "bundled_path": None,
        "requires_licence_acceptance": True,
    }
    path = tmp_path / "registry" / "models.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"schema_version": 1, "models": [entry]}))
    monkeypatch.setattr(registry_module, "_DEFAULT_JSON", path)
    return http_server, payload


def test_download_shows_the_licence_and_needs_it_accepted(test_registry, capsys):
    server, payload = test_registry
    code, out, err = _run(["download", "test-model"], capsys)
    assert code == 2 and out == ""
    assert "Test Licence 1.0" in err and "https://example.org/test-licence" in err and "--accept-licence" in err
    assert server.requests == []  # refused before any transfer

    code, out, err = _run(["download", "test-model", "--accept-licence"], capsys)
    assert code == 0, err
    assert "test-model: licence Test Licence 1.0 (https://example.org/test-licence)" in err
    path = Path(out.strip())
    assert path.read_bytes() == payload
    assert len(server.requests) == 1

    code, out, _ = _run(["download", "test-model"], capsys)  # accepted once: remembered; verified file kept
    assert code == 0 and Path(out.strip()) == path and len(server.requests) == 1


def test_download_unknown_name_suggests(test_registry, capsys):
    code, _, err = _run(["download", "test-modle"], capsys)
    assert code == 2 and "did you mean 'test-model'" in err


def test_models_lists_licence_and_cache_status(test_registry, capsys):
    code, out, _ = _run(["models", "--json"], capsys)
    assert code == 0
    (row,) = json.loads(out)
    assert row["name"] == "test-model" and row["status"] == "not downloaded" and not row["licence_accepted"]
    code, out, _ = _run(["models"], capsys)
    assert "licence: Test Licence 1.0 (https://example.org/test-licence)" in out and "accepted" not in out
    assert "status: not downloaded" in out

    assert _run(["download", "test-model", "--accept-licence"], capsys)[0] == 0
    code, out, _ = _run(["models", "--json"], capsys)
    (row,) = json.loads(out)
    assert row["status"] == "downloaded" and row["licence_accepted"] and Path(row["path"]).is_file()
    code, out, _ = _run(["models"], capsys)
    assert "(https://example.org/test-licence) — accepted" in out and "status: downloaded" in out


def test_shipped_official_models_need_their_licence_accepted(capsys, tmp_path):
    """The shipped registry's official checkpoints: ``models`` shows their licence, and ``download`` refuses until
    it is accepted (before any network access: this machine has none)."""
    code, out, _ = _run(["models", "--json"], capsys)
    rows = {r["name"]: r for r in json.loads(out)}
    for name in ("universal-unet", "universal-swinunetr"):
        assert rows[name]["licence"] == "CC BY-NC-ND 4.0" and rows[name]["status"] == "not downloaded"
        code, _, err = _run(["download", name], capsys)
        assert code == 2 and "CC BY-NC-ND 4.0" in err and "creativecommons.org/licenses/by-nc-nd/4.0" in err
        assert "--accept-licence" in err
    assert not (Path(os.environ["UNIVERSALSEG_HOME"]) / "models").exists()


# ------------------------------------------------------------------------------------------------------ classes
def test_classes_shows_what_a_model_provides(tmp_path, capsys):
    torch.manual_seed(0)
    model = UniversalModel(ModelConfig("unet", 4), num_classes=3)
    model.class_names = [CATALOG[1].name, CATALOG[3].name, CATALOG[6].name]  # spleen, left kidney, liver
    path = save_checkpoint(model, tmp_path / "three.safetensors", {"name": "three", "licence": "test weights"})
    code, out, _ = _run(["classes", "--json", "--model", str(path)], capsys)
    assert code == 0
    rows = json.loads(out)["classes"]
    assert len(rows) == len(CATALOG)
    assert [r["name"] for r in rows if r["in_model"]] == ["Spleen", "Left Kidney", "Liver"]
    tumor = next(r for r in rows if r["name"] == "Kidney Tumor")
    assert tumor["parents"] == ["Right Kidney", "Left Kidney"] and tumor["kind"] == "tumor"
    code, out, _ = _run(["classes", "--model", str(path)], capsys)
    assert code == 0 and "provides 3 of 32 classes" in out


# ------------------------------------------------------------------------------------------- segment options
def test_class_threshold_applies_to_that_class_only(tiny_model_path, crop, tmp_path, capsys):
    """``--class-threshold liver=T`` gives the liver of a run at ``--threshold T`` and leaves the spleen as at 0.5."""

    def run(name: str, *extra: str) -> dict[str, np.ndarray]:
        folder = tmp_path / name
        code, _, err = _run(
            [
                "segment",
                str(crop),
                "-o",
                str(folder / "seg.nii.gz"),
                "--model",
                str(tiny_model_path),
                "--classes",
                "liver,spleen",
                "--split-masks",
                str(folder),
                "--device",
                "cpu",
                "--progress",
                "none",
                *extra,
            ],
            capsys,
        )
        assert code == 0, err
        return {stem: _mask(folder / f"{stem}.nii.gz") for stem in ("liver", "spleen")}

    default = run("default")
    high = run("high", "--threshold", "0.62")
    per_class = run("per_class", "--class-threshold", "liver=0.62")
    assert default["liver"].any() and not np.array_equal(high["liver"], default["liver"])  # the threshold matters
    np.testing.assert_array_equal(per_class["liver"], high["liver"])
    np.testing.assert_array_equal(per_class["spleen"], default["spleen"])
    code, _, err = _run(["segment", str(crop), "-o", str(tmp_path / "x.nii.gz"), "--class-threshold", "liver"], capsys)
    assert code == 2 and "CLASS=T" in err


def test_redo_segments_existing_outputs_again(tiny_model_path, crop, tmp_path, capsys):
    folder = tmp_path / "scans"
    folder.mkdir()
    (folder / "a.nii.gz").write_bytes(crop.read_bytes())
    out = tmp_path / "out"
    args = [
        "segment",
        str(folder),
        "-o",
        str(out),
        "--model",
        str(tiny_model_path),
        "--classes",
        "spleen",
        "--device",
        "cpu",
        "--progress",
        "none",
    ]
    assert _run(args, capsys)[0] == 0
    written = out / "a.nii.gz"
    expected = _mask(written)
    written.write_bytes(b"stale output")  # what a redo must replace
    code, _, err = _run(args, capsys)
    assert code == 0 and "skip a.nii.gz" in err and written.read_bytes() == b"stale output"
    code, _, err = _run(args + ["--redo"], capsys)
    assert code == 0, err
    assert "skip a.nii.gz" not in err and "batch finished: 1 segmented, 0 failed, 0 skipped" in err
    assert written.read_bytes() != b"stale output"
    np.testing.assert_array_equal(_mask(written), expected)  # segmented again, the same result


def test_out_of_memory_is_one_line_per_scan_and_leaves_no_output(tiny_model_path, crop, tmp_path, capsys, monkeypatch):
    """Running out of memory outside the network too (here: while writing, as PyTorch's CPU allocator says it) is the
    engine's one line: the single-scan run exits 2, a batch goes on with the next scan; no partial output."""
    from UniversalSegLib import imageio

    real_write = imageio.write_outputs

    def write_or_fail(result, output, **kwargs):
        if Path(output).name.startswith("a."):
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")
        return real_write(result, output, **kwargs)

    monkeypatch.setattr(imageio, "write_outputs", write_or_fail)
    folder = tmp_path / "scans"
    folder.mkdir()
    for name in ("a.nii.gz", "b.nii.gz"):
        (folder / name).write_bytes(crop.read_bytes())
    common = ["--model", str(tiny_model_path), "--classes", "spleen", "--device", "cpu", "--progress", "none"]
    code, _, err = _run(["segment", str(folder / "a.nii.gz"), "-o", str(tmp_path / "a.nii.gz"), *common], capsys)
    lines = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(lines) == 1 and "not enough memory" in lines[0], err
    assert not (tmp_path / "a.nii.gz").exists()
    code, _, err = _run(["segment", str(folder), "-o", str(tmp_path / "out"), *common], capsys)
    assert code != 0 and "a.nii.gz: not enough memory" in err, err
    assert not (tmp_path / "out" / "a.nii.gz").exists() and (tmp_path / "out" / "b.nii.gz").is_file()


# -------------------------------------------------------------------------------------- experimental prompts
@pytest.fixture
def clip_weights(tmp_path, monkeypatch) -> Path:
    """Random-weight CLIP text tower (the real one cannot be downloaded here), given as UNIVERSALSEG_CLIP_WEIGHTS."""
    from safetensors.torch import save_file

    from UniversalSegLib.text_encoder import ClipTextEncoder

    encoder = ClipTextEncoder.random(seed=0, device="cpu")
    path = tmp_path / "clip_text.safetensors"
    save_file({k: v.contiguous() for k, v in encoder.text_tower_state_dict().items()}, str(path))
    monkeypatch.setenv("UNIVERSALSEG_CLIP_WEIGHTS", str(path))
    return path


def test_experimental_prompt_is_segmented_end_to_end(tiny_model_path, crop, tmp_path, clip_weights, capsys):
    base = [
        "segment",
        str(crop),
        "-o",
        str(tmp_path / "seg.nii.gz"),
        "--model",
        str(tiny_model_path),
        "--prompt",
        "liver, qwertyuiop",
        "--device",
        "cpu",
        "--progress",
        "none",
    ]
    code, _, err = _run(base, capsys)
    assert code == 2 and "qwertyuiop" in err and "--experimental-prompts" in err  # refused unless asked for
    assert not (tmp_path / "seg.nii.gz").exists()

    summary = tmp_path / "s.json"
    code, _, err = _run(
        base + ["--experimental-prompts", "--summary", str(summary), "--split-masks", str(tmp_path / "masks")], capsys
    )
    assert code == 0, err
    assert "EXPERIMENTAL" in err
    classes = {c["name"]: c for c in json.loads(summary.read_text())["classes"]}
    assert set(classes) == {"Liver", "qwertyuiop (experimental)"}
    experimental = classes["qwertyuiop (experimental)"]
    mask = _mask(tmp_path / "masks" / f"{experimental['file_stem']}.nii.gz")
    assert experimental["voxels"] == int(mask.sum()) > 0  # the raw CLIP embedding drove a real network head
    liver = _mask(tmp_path / "masks" / f"{classes['Liver']['file_stem']}.nii.gz")
    assert not np.array_equal(mask, liver)  # another embedding, another output
