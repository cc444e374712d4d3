"""CLIP ViT-B/32 text encoder for free-text prompts (open_clip, OpenAI weights).

The class embeddings of the CLIP-Driven Universal Model were made upstream (``pretrained_weights/clip_embedding.py``)
with OpenAI's ``clip`` package: ``model.encode_text(clip.tokenize("A computerized tomography of a {name}"))`` on the
ViT-B/32 model, **without** L2 normalisation (the shipped ``txt_encoding.pth`` rows have norms of about 8-10).
:meth:`ClipTextEncoder.encode` reproduces that: same architecture (open_clip ``ViT-B-32`` with QuickGELU, which is
what OpenAI's weights were trained with), same BPE tokenizer, same template, raw ``encode_text`` output. Upstream ran
in fp16 on a GPU; this runs in fp32, which changes the vectors only at the 1e-3 level.

Weights: OpenAI's CLIP ViT-B/32 as open_clip itself resolves ``pretrained="openai"`` (the Hugging Face repository
``timm/vit_base_patch32_clip_224.openai``, ``open_clip_model.safetensors``, pinned to a commit and sha256). They are
downloaded once with :func:`UniversalSegLib.download.download_file` into ``cache_dir()/clip/``; only the text tower
is kept in memory. Set ``UNIVERSALSEG_CLIP_WEIGHTS`` to a local copy of the file to work offline.

Encoded prompts are cached in memory and on disk (``cache_dir()/clip/text_embeddings/``), keyed by the model
identity (the weights' sha256) and the exact prompt text, so a repeated prompt never runs the network again.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from UniversalSegLib.catalog import PROMPT_TEMPLATE
from UniversalSegLib.download import cache_dir, download_file, sha256_file
from UniversalSegLib.errors import CheckpointError, DownloadError, InputError

__all__ = [
    "CLIP_ARCHITECTURE",
    "CLIP_EMBED_DIM",
    "ClipWeightsSource",
    "OPENAI_VIT_B_32",
    "ClipTextEncoder",
    "clip_weights_path",
]

logger = logging.getLogger(__name__)

CLIP_ARCHITECTURE = "ViT-B-32"  # open_clip model config name; built with force_quick_gelu=True (OpenAI weights)
CLIP_EMBED_DIM = 512
WEIGHTS_ENV = "UNIVERSALSEG_CLIP_WEIGHTS"


@dataclass(frozen=True)
class ClipWeightsSource:
    """Where the CLIP weights come from and how to verify them."""

    url: str
    sha256: str | None
    size: int | None
    filename: str
    description: str = ""


#: OpenAI CLIP ViT-B/32 (MIT licence) as open_clip's ``pretrained.py`` lists it for ``ViT-B-32`` / ``openai``
#: (hf_hub ``timm/vit_base_patch32_clip_224.openai``), safetensors in open_clip's key layout, pinned to a commit.
OPENAI_VIT_B_32 = ClipWeightsSource(
    url=(
        "https://huggingface.co/timm/vit_base_patch32_clip_224.openai/resolve/"
        "a6f597a30f7b82c51704746581f9a4e41421e878/open_clip_model.safetensors"
    ),
    sha256="e6d1bd7789aa45192b3bf90570a789b478bae1b74ebcce7eddd908e83a2b7c31",
    size=605_143_284,
    filename="open_clip_vit_b_32_openai.safetensors",
    description="OpenAI CLIP ViT-B/32 (open_clip 'ViT-B-32' pretrained='openai'), MIT licence",
)

# Text-tower parameters not needed to encode text (present in full CLIP checkpoints).
_OPTIONAL_KEYS = {"logit_scale", "logit_bias"}


def clip_weights_path(
    source: ClipWeightsSource = OPENAI_VIT_B_32,
    *,
    download: bool = True,
    progress: Callable[[int, int | None], None] | None = None,
) -> Path:
    """Local path of the CLIP weights: ``$UNIVERSALSEG_CLIP_WEIGHTS``, else ``cache_dir()/clip/<file>`` (downloaded
    on first use when ``download`` is true).

    Raises:
        DownloadError: the file is not cached and cannot be downloaded (offline, HTTP error, checksum mismatch).
        InputError: ``$UNIVERSALSEG_CLIP_WEIGHTS`` names a missing file.
    """
    env = os.environ.get(WEIGHTS_ENV, "").strip()
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise InputError(f"{WEIGHTS_ENV}={env} is not a file; point it at the CLIP ViT-B/32 weights or unset it")
        return p
    dest = cache_dir() / "clip" / source.filename
    if dest.is_file():
        return dest
    if not download:
        raise DownloadError(
            f"the CLIP ViT-B/32 text-encoder weights are not in the cache ({dest}); allow the download or set "
            f"{WEIGHTS_ENV} to a local copy of {source.url}"
        )
    try:
        return download_file(source.url, dest, sha256=source.sha256, expected_size=source.size, progress=progress)
    except DownloadError as exc:
        raise DownloadError(
            f"could not get the CLIP ViT-B/32 text-encoder weights, needed once for free-text prompts that are not "
            f"class names ({exc}); or download {source.url} yourself and set {WEIGHTS_ENV} to the file"
        ) from exc


@contextlib.contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """Hide open_clip's root-logger warning "No pretrained weights loaded" (we load them ourselves)."""

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            return "No pretrained weights loaded" not in record.getMessage()

    flt = _Filter()
    root = logging.getLogger()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def _build_clip_model() -> torch.nn.Module:
    import open_clip

    with _quiet_open_clip():
        model = open_clip.create_model(CLIP_ARCHITECTURE, pretrained=None, force_quick_gelu=True)
    return model


def _read_text_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Text-tower tensors of a CLIP checkpoint (``.safetensors``, or a torch pickle read with ``weights_only``)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            out: dict[str, torch.Tensor] = {}
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    if not key.startswith("visual."):  # skip the 88M image-tower parameters
                        out[key] = f.get_tensor(key)
            return out
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # corrupt/truncated/wrong format: one clear line
        raise CheckpointError(
            f"cannot read CLIP weights {path} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            f"expected open_clip ViT-B-32 weights as .safetensors or a torch state dict; delete the file to download "
            f"it again"
        ) from exc
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"CLIP weights {path} do not hold a state dict of tensors; expected open_clip ViT-B-32 weights"
        )
    return {k[7:] if k.startswith("module.") else k: v for k, v in obj.items() if not k.startswith("visual.")}


@lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


class ClipTextEncoder:
    """Encodes prompts with the CLIP ViT-B/32 text tower. Output: float32 CPU tensor of shape (N, 512), unnormalised.

    Build with :meth:`pretrained` (OpenAI weights, downloaded once), :meth:`from_file`, or :meth:`random` (random
    weights for tests). ``model_calls`` counts prompts that actually ran through the network (cache misses).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        identity: str,
        *,
        device: str | torch.device | None = None,
        disk_cache: Path | None = None,
    ) -> None:
        import open_clip

        self.identity = identity
        self.device = (
            torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        )
        # Only the text tower is used; drop the image tower to save ~350 MB.
        if hasattr(model, "visual"):
            model.visual = torch.nn.Identity()
        self.model = model.to(self.device).eval()
        self.tokenizer = open_clip.get_tokenizer(CLIP_ARCHITECTURE)
        self.disk_cache = Path(disk_cache) / hashlib.sha256(identity.encode()).hexdigest()[:16] if disk_cache else None
        self._memory: dict[str, torch.Tensor] = {}
        self._lock = threading.Lock()
        self.model_calls = 0

    # ------------------------------------------------------------------ construction
    @classmethod
    def pretrained(
        cls,
        *,
        weights_url: str = OPENAI_VIT_B_32.url,
        sha256: str | None = OPENAI_VIT_B_32.sha256,
        expected_size: int | None = OPENAI_VIT_B_32.size,
        filename: str | None = None,
        download: bool = True,
        progress: Callable[[int, int | None], None] | None = None,
        device: str | torch.device | None = None,
        disk_cache: Path | bool = True,
    ) -> "ClipTextEncoder":
        """OpenAI CLIP ViT-B/32 (or the weights at ``weights_url``), fetched into ``cache_dir()/clip/`` on first use.

        Raises:
            DownloadError: weights missing and not downloadable (offline: the message says how to provide the file).
            CheckpointError: the file is not a ViT-B-32 CLIP checkpoint.
        """
        if weights_url == OPENAI_VIT_B_32.url:
            source = (
                OPENAI_VIT_B_32
                if (sha256, expected_size) == (OPENAI_VIT_B_32.sha256, OPENAI_VIT_B_32.size)
                else ClipWeightsSource(weights_url, sha256, expected_size, filename or OPENAI_VIT_B_32.filename)
            )
        else:
            name = filename or (
                "clip_"
                + hashlib.sha256(weights_url.encode()).hexdigest()[:12]
                + "_"
                + Path(weights_url.split("?")[0]).name
            )
            source = ClipWeightsSource(weights_url, sha256, expected_size, name)
        path = clip_weights_path(source, download=download, progress=progress)
        known_sha = sha256 if path.name == source.filename and sha256 else None
        return cls.from_file(path, sha256=known_sha, device=device, disk_cache=disk_cache)

    @classmethod
    def from_file(
        cls,
        path: str | Path,
        *,
        sha256: str | None = None,
        device: str | torch.device | None = None,
        disk_cache: Path | bool = True,
    ) -> "ClipTextEncoder":
        """Load CLIP ViT-B-32 weights from a local file (full CLIP or text tower only).

        ``sha256``: the file's known digest (used as model identity); computed when None.
        """
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"CLIP weights file not found: {path}")
        state = _read_text_state_dict(path)
        model = _build_clip_model()
        cls._load_text_tower(model, state, path)
        if sha256 is None:
            st = path.stat()
            sha256 = _file_sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)
        identity = f"open_clip:{CLIP_ARCHITECTURE}-quickgelu:sha256={sha256.lower()}"
        cache = (cache_dir() / "clip" / "text_embeddings") if disk_cache is True else (disk_cache or None)
        return cls(model, identity, device=device, disk_cache=cache)

    @classmethod
    def random(
        cls,
        seed: int = 0,
        *,
        device: str | torch.device | None = None,
        disk_cache: Path | None = None,
    ) -> "ClipTextEncoder":
        """ViT-B-32 with random weights, deterministic per ``seed`` (for tests); no disk cache unless given."""
        with torch.random.fork_rng(devices=[]):  # leave the caller's global RNG untouched
            torch.manual_seed(seed)
            model = _build_clip_model()
        return cls(
            model, f"open_clip:{CLIP_ARCHITECTURE}-quickgelu:random-seed={seed}", device=device, disk_cache=disk_cache
        )

    @staticmethod
    def _load_text_tower(model: torch.nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
        expected = {k: v for k, v in model.state_dict().items() if not k.startswith("visual.")}
        missing = sorted(k for k in expected if k not in state and k not in _OPTIONAL_KEYS)
        unexpected = sorted(k for k in state if k not in expected)
        if missing or unexpected:
            detail = (
                (f"missing {len(missing)} keys, e.g. {missing[:3]}" if missing else "")
                + ("; " if missing and unexpected else "")
                + (f"unexpected keys, e.g. {unexpected[:3]}" if unexpected else "")
            )
            raise CheckpointError(
                f"{path} is not an open_clip {CLIP_ARCHITECTURE} CLIP checkpoint ({detail}); "
                f"delete it and let UniversalSeg download the OpenAI weights"
            )
        for k, v in state.items():
            if tuple(v.shape) != tuple(expected[k].shape):
                raise CheckpointError(
                    f"{path}: tensor '{k}' has shape {tuple(v.shape)}, {CLIP_ARCHITECTURE} needs "
                    f"{tuple(expected[k].shape)}; this is not ViT-B/32 CLIP"
                )
        model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)

    # ------------------------------------------------------------------ encoding
    def text_tower_state_dict(self) -> dict[str, torch.Tensor]:
        """The text-tower parameters (what :meth:`from_file` needs), on CPU."""
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items() if not k.startswith("visual.")}

    def encode(self, texts: str | Sequence[str]) -> torch.Tensor:
        """CLIP features of ``"A computerized tomography of a {text}"`` for each text: (N, 512) float32, CPU."""
        if isinstance(texts, str):
            texts = [texts]
        return self.encode_prompts([PROMPT_TEMPLATE.format(t) for t in texts])

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP features of complete prompts (no template added): (N, 512) float32, CPU, unnormalised."""
        prompts = list(prompts)
        if not prompts:
            return torch.zeros((0, CLIP_EMBED_DIM), dtype=torch.float32)
        with self._lock:
            todo = [p for p in dict.fromkeys(prompts) if p not in self._memory and not self._load_cached(p)]
            if todo:
                tokens = self.tokenizer(todo).to(self.device)
                with torch.inference_mode():
                    feats = self._encode_tokens(tokens).float().cpu()
                self.model_calls += len(todo)
                for p, f in zip(todo, feats):
                    self._memory[p] = f.clone()
                    self._store_cached(p, self._memory[p])
            return torch.stack([self._memory[p] for p in prompts])

    def _encode_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """``model.encode_text`` on the shortest prefix holding every end-of-text token.

        CLIP's text transformer is causal and pools the end-of-text position, so the padding after it cannot change
        the result; cutting the 77-token context to the prompt length (about 12 tokens) makes encoding ~4x cheaper
        on CPU.
        """
        m: Any = self.model  # open_clip's CLIP (untyped): its submodules are not known to nn.Module's typing
        if getattr(m, "text_pool_type", "argmax") != "argmax" or getattr(m, "attn_mask", None) is None:
            return m.encode_text(tokens)
        eot = tokens.argmax(dim=-1)  # the end-of-text token has the largest id
        n = int(eot.max()) + 1
        tokens = tokens[:, :n]
        cast_dtype = m.transformer.get_cast_dtype()
        x = m.token_embedding(tokens).to(cast_dtype) + m.positional_embedding[:n].to(cast_dtype)
        x = m.transformer(x, attn_mask=m.attn_mask[:n, :n])
        x = m.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), eot]
        if isinstance(m.text_projection, torch.nn.Linear):
            return m.text_projection(x)
        return x @ m.text_projection

    # ------------------------------------------------------------------ disk cache
    def _cache_file(self, prompt: str) -> Path | None:
        if self.disk_cache is None:
            return None
        return self.disk_cache / (hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:40] + ".safetensors")

    def _load_cached(self, prompt: str) -> bool:
        f = self._cache_file(prompt)
        if f is None or not f.is_file():
            return False
        try:
            from safetensors import safe_open

            with safe_open(str(f), framework="pt", device="cpu") as fh:
                meta = fh.metadata() or {}
                if meta.get("prompt") != prompt or meta.get("identity") != self.identity:
                    return False
                emb = fh.get_tensor("embedding")
        except Exception:  # a corrupt cache entry is just a miss; it is rewritten below
            return False
        if tuple(emb.shape) != (CLIP_EMBED_DIM,):
            return False
        self._memory[prompt] = emb.float()
        return True

    def _store_cached(self, prompt: str, emb: torch.Tensor) -> None:
        f = self._cache_file(prompt)
        if f is None:
            return
        from safetensors.torch import save_file

        try:
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_name(f"{f.name}.{os.getpid()}.{threading.get_ident()}.tmp")
            save_file({"embedding": emb.contiguous()}, str(tmp), metadata={"prompt": prompt, "identity": self.identity})
            os.replace(tmp, f)  # atomic: readers never see a half-written entry
        except OSError as exc:  # a read-only cache only costs speed
            logger.warning("cannot write the prompt cache %s (%s)", f, exc)
