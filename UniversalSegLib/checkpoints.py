"""Loading and saving Universal Model checkpoints.

Two formats, both loaded without executing code from the file:

* the officially released ``.pth`` files (``{"net": state_dict}``, every key prefixed ``module.``), read with
  ``torch.load(weights_only=True)`` and matched strictly against the architecture;
* the project's own format: a ``.safetensors`` file whose header metadata (``"universalseg"``, JSON) names the
  architecture, width, classes, prompt template, licence and provenance, and whose tensors are the state dict.
"""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch

from .catalog import PROMPT_TEMPLATE, ClassCatalog
from .errors import CheckpointError
from .networks.universal_model import ModelConfig, UniversalModel
from .output_safety import safe_output

FORMAT_NAME = "universalseg-checkpoint"
FORMAT_VERSION = 1
METADATA_KEY = "universalseg"
OFFICIAL_LICENCE = "CC BY-NC-ND 4.0"
# Modules of the Universal Model that sit beside the backbone in the released files.
HEAD_MODULES = ("precls_conv", "GAP", "controller", "text_to_vision", "organ_embedding")


def _list_keys(keys: set[str], limit: int = 8) -> str:
    shown = sorted(keys)[:limit]
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(shown) + more


def _first_line(exc: BaseException, limit: int = 200) -> str:
    """The first non-empty line of an exception's message (some have none: EOFError, KeyError(101))."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[0] if lines else type(exc).__name__)[:limit]


def _load_pth(path: Path) -> Any:
    try:
        with warnings.catch_warnings():  # torch warns about unusual pickle protocols: the error below says it all
            warnings.simplefilter("ignore", UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        markers = ("unsupported global", "global ")  # the file asks to import and call something: code execution
        if any(m in text.lower() for m in markers):
            culprit = next((line.strip() for line in text.splitlines() if "global" in line.lower()), "")
            raise CheckpointError(
                f"refused to load {path}: it needs pickle code execution, which can run arbitrary code "
                f"({culprit[:160]}); use an official checkpoint or a .safetensors file"
            ) from None
        raise CheckpointError(
            f"cannot read checkpoint {path}: its pickle data is corrupt or not a PyTorch weights file; "
            "download or copy it again"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, AttributeError, TypeError) as exc:
        raise CheckpointError(
            f"cannot read checkpoint {path}: {_first_line(exc)} (corrupt or not a PyTorch file?)"
        ) from None


def detect_official_config(state_dict: Mapping[str, torch.Tensor]) -> ModelConfig:
    """Architecture and width of a released-layout state dict (keys with or without ``module.``)."""
    keys = {k.removeprefix("module.") for k in state_dict}
    if "backbone.down_tr64.ops.0.conv1.weight" in keys:
        weight = state_dict.get(
            "module.backbone.down_tr64.ops.0.conv1.weight", state_dict.get("backbone.down_tr64.ops.0.conv1.weight")
        )
        assert weight is not None  # the key is in the state dict (checked above)
        return ModelConfig("unet", int(weight.shape[0]))
    if "swinViT.patch_embed.proj.weight" in keys:
        weight = state_dict.get(
            "module.swinViT.patch_embed.proj.weight", state_dict.get("swinViT.patch_embed.proj.weight")
        )
        assert weight is not None  # the key is in the state dict (checked above)
        return ModelConfig("swinunetr", int(weight.shape[0]))
    raise CheckpointError(
        "checkpoint matches neither released layout: no 'module.backbone.down_tr64...' (unet) or "
        "'module.swinViT...' (swinunetr) keys"
    )


def official_to_model_keys(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename released keys to this implementation's: drop ``module.``; Swin UNETR's backbone moves under ``backbone.``."""
    renamed = {}
    for key, value in state_dict.items():
        name = key.removeprefix("module.")
        if not name.startswith("backbone.") and name.split(".")[0] not in HEAD_MODULES:
            name = "backbone." + name
        renamed[name] = value
    return renamed


def _load_state_strict(model: UniversalModel, state: Mapping[str, torch.Tensor], source: Path) -> None:
    expected = model.state_dict()
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_list_keys(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_list_keys(unexpected)}")
        raise CheckpointError(
            f"checkpoint {source} does not match the {model.config.architecture} model; " + "; ".join(parts)
        )
    wrong = {k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)}
    if wrong:
        k = sorted(wrong)[0]
        raise CheckpointError(
            f"checkpoint {source} has wrong shapes for {len(wrong)} keys, e.g. {k}: "
            f"{tuple(state[k].shape)} instead of {tuple(expected[k].shape)}"
        )
    model.load_state_dict(state, strict=True)


def load_official_checkpoint(path: str | Path) -> UniversalModel:
    """Load a released ``clip_driven_universal_{unet,swin_unetr}.pth`` (or a file in the same layout) strictly."""
    path = Path(path)
    obj = _load_pth(path)
    if not isinstance(obj, Mapping) or "net" not in obj or not isinstance(obj["net"], Mapping):
        raise CheckpointError(
            f"{path} is not in the released layout: expected a dict with key 'net' holding the state dict"
        )
    state = dict(obj["net"])
    not_prefixed = [k for k in state if not k.startswith("module.")]
    if not_prefixed:
        raise CheckpointError(
            f"{path}: released checkpoints prefix every key with 'module.'; unexpected keys: {_list_keys(set(not_prefixed))}"
        )
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(
            f"{path}: the state dict under 'net' holds values that are not tensors; it is not a model checkpoint"
        )
    config = detect_official_config(state)
    state = official_to_model_keys(state)
    embeddings = state.get("organ_embedding")
    num_classes = int(embeddings.shape[0]) if embeddings is not None and embeddings.dim() == 2 else 32
    model = _build_model(config, num_classes, path)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    _check_finite(state, path)
    _load_state_strict(model, state, path)
    catalog = ClassCatalog.default()
    model.class_names = (
        [catalog[i + 1].name for i in range(num_classes)] if num_classes <= len(catalog) else model.class_names
    )
    model.metadata = {
        "format": "official",
        "architecture": config.architecture,
        "width": config.width,
        "class_names": model.class_names,
        "prompt_template": PROMPT_TEMPLATE,
        "licence": OFFICIAL_LICENCE,
        "licence_url": "https://creativecommons.org/licenses/by-nc-nd/4.0/",
        "provenance": "CLIP-Driven Universal Model, (c) Johns Hopkins University (Liu et al., ICCV 2023)",
        "source": str(path),
    }
    return model


def save_checkpoint(model: UniversalModel, path: str | Path, metadata: Mapping[str, Any] | None = None) -> Path:
    """Write the project's format: safetensors tensors + JSON metadata. Written safely (temporary file, fsync, read
    back, atomic rename: :mod:`~UniversalSegLib.output_safety`); raises OutputError when that fails."""
    from safetensors.torch import save_file

    path = Path(path)
    meta = dict(model.metadata)
    meta.update(metadata or {})
    meta.update(
        {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "architecture": model.config.architecture,
            "width": model.config.width,
            "in_channels": model.config.in_channels,
            "class_names": list(model.class_names),
        }
    )
    meta.setdefault("prompt_template", PROMPT_TEMPLATE)
    meta.setdefault("licence", "unspecified")
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with safe_output(path, _verify_saved(set(tensors))) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta)})
    return path


def _verify_saved(keys: set[str]):
    """Read a written checkpoint back: its metadata parses and it holds every tensor (a short file fails here)."""

    def check(tmp: Path) -> None:
        from safetensors import safe_open

        try:
            read_checkpoint_metadata(tmp)
            with safe_open(str(tmp), framework="pt") as f:
                found = set(f.keys())
        except (CheckpointError, OSError, RuntimeError, ValueError):
            raise ValueError("the written checkpoint cannot be read back (it is incomplete)") from None
        if found != keys:
            raise ValueError("the written checkpoint does not hold every tensor")

    return check


def _build_model(config: ModelConfig, num_classes: int, path: Path) -> UniversalModel:
    try:
        return UniversalModel(config, num_classes=num_classes)
    except (ValueError, TypeError, RuntimeError, AssertionError) as exc:
        raise CheckpointError(
            f"{path} describes a model that cannot be built (architecture {config.architecture!r}, width "
            f"{config.width}): {_first_line(exc, 120)}; the file is corrupt or not a UniversalSeg checkpoint"
        ) from None


def _tensor_architecture(state: Mapping[str, torch.Tensor]) -> str | None:
    """The architecture the tensors' names belong to (this implementation's key layout), or None when unknown."""
    if any(k.startswith("backbone.down_tr64.") for k in state):
        return "unet"
    if any(k.startswith("backbone.swinViT.") for k in state):
        return "swinunetr"
    return None


def _check_finite(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Refuse weights with NaN or infinite values: a diverged training run or a corrupt file gives empty masks."""
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(
                f"{path}: tensor '{key}' holds NaN or infinite values (a diverged training run or a corrupt file); "
                "use another checkpoint"
            )


def read_checkpoint_metadata(path: str | Path) -> dict[str, Any]:
    """Metadata of a project checkpoint, without reading the tensors."""
    from safetensors import safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get(METADATA_KEY)
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise CheckpointError(f"cannot read {path} as safetensors: {str(exc).splitlines()[0][:200]}") from None
    if raw is None:
        raise CheckpointError(
            f"{path} is a safetensors file without UniversalSeg metadata ('{METADATA_KEY}' header entry)"
        )
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: the '{METADATA_KEY}' metadata is not valid JSON") from None
    if not isinstance(meta, dict):
        raise CheckpointError(
            f"{path}: the '{METADATA_KEY}' metadata is a JSON {type(meta).__name__}, not an object; the file is corrupt "
            "or was not written by UniversalSeg"
        )
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{path}: metadata format is {meta.get('format')!r}, expected {FORMAT_NAME!r}")
    version = meta.get("format_version", FORMAT_VERSION)
    if version != FORMAT_VERSION:
        newer = isinstance(version, int) and not isinstance(version, bool) and version > FORMAT_VERSION
        raise CheckpointError(
            f"{path} is checkpoint format version {version!r}; this UniversalSeg reads version {FORMAT_VERSION}"
            + ("; update UniversalSeg" if newer else "; the file is corrupt")
        )
    return meta


def load_project_checkpoint(path: str | Path) -> UniversalModel:
    """Load the project's safetensors format strictly."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_checkpoint_metadata(path)
    try:
        config = ModelConfig(meta["architecture"], int(meta["width"]), int(meta.get("in_channels", 1)))
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: metadata does not describe a model ({exc})") from None
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"cannot read tensors of {path}: {str(exc).splitlines()[0][:200]}") from None
    embeddings = state.get("organ_embedding")
    if embeddings is None or embeddings.dim() != 2:
        raise CheckpointError(f"{path} has no 'organ_embedding' tensor (classes x 512, the class embeddings)")
    found = _tensor_architecture(state)
    if found is not None and found != config.architecture:
        raise CheckpointError(
            f"{path}: its metadata says architecture {config.architecture!r} but its tensors are a {found!r} model; "
            "fix the metadata or re-export the checkpoint"
        )
    model = _build_model(config, int(embeddings.shape[0]), path)
    _check_finite(state, path)
    _load_state_strict(model, state, path)
    names = list(meta.get("class_names") or [])
    if len(names) != embeddings.shape[0]:
        raise CheckpointError(f"{path}: metadata lists {len(names)} class names for {embeddings.shape[0]} embeddings")
    model.class_names = names
    model.metadata = meta
    return model


def checkpoint_kind(path: Path) -> str:
    """What a file holds, from its first bytes: "safetensors", "torch-zip" (torch.save), "pickle" (legacy torch.save).

    Raises:
        CheckpointError: an empty or tiny file, a pickle named ``.safetensors``, or bytes that are neither format.
    """
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(16)
    if size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); the download or copy failed: fetch it again")
    if size < 16:
        raise CheckpointError(f"checkpoint {path} is only {size} bytes, too small to hold a model; fetch it again")
    # safetensors: a little-endian u64 header length, then the JSON header ('{'), within the file.
    if head[8:9] == b"{":
        header_end = 8 + int.from_bytes(head[:8], "little")
        if header_end <= size:
            return "safetensors"
        if header_end < 100 * 2**20 and path.name.lower().endswith(".safetensors"):  # a plausible header: cut short
            raise CheckpointError(
                f"checkpoint {path} is truncated (a safetensors header of {header_end - 8} bytes in a file of {size}); "
                "the download or copy was cut short: fetch it again"
            )
    kind = (
        "torch-zip"
        if head.startswith(b"PK\x03\x04")
        else "pickle"
        if head[:1] == b"\x80" and 2 <= head[1] <= 5
        else None
    )
    if path.name.lower().endswith(".safetensors"):
        what = "a PyTorch (pickle) file" if kind else "not a safetensors file"
        raise CheckpointError(
            f"{path} is named .safetensors but is {what}"
            + ("; rename it to .pth to load it as an official-layout checkpoint" if kind else "; fetch it again")
        )
    if kind is None:
        raise CheckpointError(
            f"{path} is not a checkpoint: neither a PyTorch file nor a safetensors file (it starts with bytes "
            f"{head[:8].hex(' ')}); check the path or fetch the file again"
        )
    return kind


def load_checkpoint(path: str | Path) -> UniversalModel:
    """Load either format, chosen by content (safetensors header, PyTorch zip or legacy pickle)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if checkpoint_kind(path) == "safetensors":
        return load_project_checkpoint(path)
    return load_official_checkpoint(path)


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU is an error that says what to do."""
    from .errors import InputError

    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("CUDA was requested but no CUDA GPU is available; use --device cpu (or auto)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}; use auto, cpu or cuda") from None


def load_model(
    path_or_name: str | Path | None = None,
    device: str | torch.device = "cpu",
    *,
    accept_licence: bool = False,
    download_progress=None,
) -> UniversalModel:
    """Load a Universal Model by registry name or file path, in eval mode on ``device``.

    The model carries ``class_names`` and ``class_embeddings`` (K x 512) from the checkpoint, and ``metadata``
    (architecture, licence, provenance). ``None`` loads the registry's default model. ``download_progress``
    ``(bytes_done, bytes_total)`` is called while weights are downloaded (first use of a registry model).
    """
    from .registry import DEFAULT_MODEL, ModelRegistry

    path = ModelRegistry.default().resolve(
        path_or_name or DEFAULT_MODEL, accept_licence=accept_licence, progress=download_progress
    )
    model = load_checkpoint(path)
    model.metadata.setdefault("name", str(path_or_name or DEFAULT_MODEL))
    return model.to(resolve_device(device)).eval()


def checkpoint_classes(name_or_path: str | Path | None = None) -> tuple[list[str], dict[str, float]] | None:
    """(class names, held-out Dice by class name) of a model, read from its file's metadata without loading the
    weights; ``None`` when that cannot be known without downloading or unpickling it (an official ``.pth`` or a
    registry model not downloaded yet: those provide all 32 catalog classes). Held-out Dice is the ``held_out``
    entry a shipped checkpoint records (``universalseg-train export --held-out``), empty when it has none."""
    from .registry import DEFAULT_MODEL, ModelRegistry

    registry = ModelRegistry.default()
    name = str(name_or_path or DEFAULT_MODEL)
    path = registry.cached_path(name) if name in registry else Path(name).expanduser()
    if path is None or not path.is_file() or path.suffix.lower() != ".safetensors":
        return None
    meta = read_checkpoint_metadata(path)
    dice = (meta.get("held_out") or {}).get("dice") or {}
    return [str(n) for n in meta.get("class_names", [])], {str(k): float(v) for k, v in dice.items()}
