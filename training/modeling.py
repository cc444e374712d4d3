"""Building the model to train: starting point (scratch, official or project checkpoint), class list and embeddings.

A model's classes are rows of its ``organ_embedding`` buffer (K, 512) plus ``class_names`` (catalog display names),
mapped to catalog classes by :func:`UniversalSegLib.catalog.model_class_indices`.
Adding a class is adding a row: its CLIP embedding (from the config's ``embeddings`` file, or the CLIP text encoder for
the catalog entry's prompt) next to the starting checkpoint's rows, which are kept unchanged.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from UniversalSegLib.catalog import ClassCatalog, model_class_indices
from UniversalSegLib.checkpoints import load_checkpoint
from UniversalSegLib.errors import CheckpointError, ClassNameError, InputError
from UniversalSegLib.networks.universal_model import HEAD_PARAM_SPLITS, TEXT_DIM, ModelConfig, UniversalModel

from .config import TrainingConfig
from .datasets import CaseSpec

logger = logging.getLogger(__name__)

#: The 32 class embeddings the official checkpoints were trained with (CLIP ViT-B/32 text features of the upstream
#: prompts), (c) Johns Hopkins University, CC BY-NC-ND 4.0; see the NOTICE beside the file.
UPSTREAM_EMBEDDINGS = (
    Path(__import__("UniversalSegLib").__file__).resolve().parent  # type: ignore[arg-type]  # a package: __file__ is set
    / "data"
    / "models"
    / "clip_txt_encoding_32.pth"
)
UPSTREAM_EMBEDDINGS_LICENCE = "CC BY-NC-ND 4.0"
UPSTREAM_EMBEDDINGS_COPYRIGHT = (
    "Johns Hopkins University (CLIP-Driven Universal Model, github ljwztc/CLIP-Driven-Universal-Model)"
)
FREEZABLE = ("backbone", "precls_conv", "GAP", "controller", "text_to_vision")


@dataclass
class StartingPoint:
    """The model to train and where it came from. ``teacher``: the unchanged starting model (for retention)."""

    model: UniversalModel
    classes: list[int]
    init: str
    start_classes: list[int] = field(default_factory=list)
    start_metadata: dict = field(default_factory=dict)
    embedding_sources: dict[str, str] = field(default_factory=dict)
    teacher: UniversalModel | None = None


def _upstream_table(catalog: ClassCatalog) -> dict[int, torch.Tensor]:
    """Catalog index -> upstream embedding, for catalog classes whose prompt name is the upstream class of that row."""
    if not UPSTREAM_EMBEDDINGS.is_file():
        return {}
    table = torch.load(UPSTREAM_EMBEDDINGS, map_location="cpu", weights_only=True).float()
    reference = ClassCatalog.default()
    out = {}
    for info in catalog:
        if info.index <= min(len(reference), table.shape[0]) and reference[info.index].prompt_name == info.prompt_name:
            out[info.index] = table[info.index - 1]
    return out


def load_embedding_file(path: str | Path, catalog: ClassCatalog) -> dict[int, torch.Tensor]:
    """A (N, 512) tensor in catalog order, or a dict {class name: (512,)}, from ``.pth``/``.pt``/``.safetensors``."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"class embeddings file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj = load_file(str(path))
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise InputError(f"cannot read class embeddings {path}: {str(exc).splitlines()[0][:160]}") from None
    out: dict[int, torch.Tensor] = {}
    if isinstance(obj, torch.Tensor):
        if obj.dim() != 2 or obj.shape[1] != TEXT_DIM:
            raise InputError(f"class embeddings {path} must be (N, {TEXT_DIM}), got {tuple(obj.shape)}")
        for i in range(min(obj.shape[0], len(catalog))):
            out[i + 1] = obj[i].float()
    elif isinstance(obj, dict):
        for name, vec in obj.items():
            try:
                index = catalog.lookup(str(name)).index
            except ClassNameError as exc:
                raise InputError(f"class embeddings {path}: {exc}") from None
            vec = torch.as_tensor(vec).float().reshape(-1)
            if vec.numel() != TEXT_DIM:
                raise InputError(f"class embeddings {path}: '{name}' has {vec.numel()} values, expected {TEXT_DIM}")
            out[index] = vec
    else:
        raise InputError(f"class embeddings {path} must hold a tensor or a dict of tensors")
    return out


def _encode_with_clip(infos, catalog: ClassCatalog) -> dict[int, torch.Tensor]:
    from UniversalSegLib.errors import DownloadError
    from UniversalSegLib.text_encoder import ClipTextEncoder

    try:
        encoder = ClipTextEncoder.pretrained()
    except (DownloadError, CheckpointError) as exc:
        names = ", ".join(i.name for i in infos)
        raise InputError(
            f"no embedding for {names}: the CLIP text encoder is unavailable ({exc}); give model.embeddings "
            "(a file with these classes' CLIP embeddings) or set UNIVERSALSEG_CLIP_WEIGHTS"
        ) from None
    vectors = encoder.encode_prompts([i.prompt for i in infos])
    return {i.index: v for i, v in zip(infos, vectors)}


def resolve_embeddings(
    classes: Sequence[int], catalog: ClassCatalog, *, start: UniversalModel | None = None, file: str | None = None
) -> tuple[torch.Tensor, dict[str, str]]:
    """(K, 512) embeddings for ``classes`` and, per class name, where each came from: the config's file first, then
    the starting checkpoint, the upstream table (catalog classes 1-32), the CLIP text encoder."""
    table_file = load_embedding_file(file, catalog) if file else {}
    start_rows = {}
    if start is not None:
        for row, index in enumerate(model_class_indices(start, catalog, strict=False)):
            if index is not None:
                start_rows[index] = start.organ_embedding[row].detach().float().cpu()
    upstream = _upstream_table(catalog)
    vectors: dict[int, torch.Tensor] = {}
    sources: dict[str, str] = {}
    missing = []
    for c in classes:
        name = catalog[c].name
        if c in table_file:
            vectors[c], sources[name] = table_file[c], f"file {Path(str(file)).name}"
        elif c in start_rows:
            vectors[c], sources[name] = start_rows[c], "starting checkpoint"
        elif c in upstream:
            vectors[c], sources[name] = upstream[c], "upstream CLIP embeddings (clip_txt_encoding_32.pth)"
        else:
            missing.append(catalog[c])
    if missing:
        for c, v in _encode_with_clip(missing, catalog).items():
            vectors[c], sources[catalog[c].name] = v, "CLIP ViT-B/32 text encoder"
    return torch.stack([vectors[c] for c in classes]), sources


def init_head_bias(model: UniversalModel, prior: float, hidden: float = 0.1) -> None:
    """Set the controller's bias so that, at initialisation, each dynamic head's hidden biases (b1, b2) are ``hidden``
    (ReLUs alive) and its output bias b3 is logit(``prior``): predictions start near the background rate instead of 0.5,
    so the first steps do not push the heads into dead ReLUs."""
    if not 0.0 < prior < 1.0:
        raise InputError(f"model.head_prior must be between 0 and 1, got {prior}")
    w1, w2, w3, b1, b2, b3 = HEAD_PARAM_SPLITS
    start_b1 = w1 + w2 + w3
    with torch.no_grad():
        bias = model.controller.bias
        assert bias is not None  # the controller is a Conv3d with bias
        bias[start_b1 : start_b1 + b1].fill_(hidden)
        bias[start_b1 + b1 : start_b1 + b1 + b2].fill_(hidden)
        bias[start_b1 + b1 + b2] = math.log(prior / (1.0 - prior))


def model_classes(
    config: TrainingConfig, catalog: ClassCatalog, train_cases: Sequence[CaseSpec], start_classes: Sequence[int] = ()
) -> list[int]:
    """The model's classes (catalog indices, sorted): ``model.classes`` if given, else the starting checkpoint's classes
    plus every class a training case annotates."""
    if config.model.classes:
        try:
            return [c.index for c in catalog.select(config.model.classes)]
        except ClassNameError as exc:
            raise InputError(f"config model.classes: {exc}") from None
    found = set(start_classes)
    for case in train_cases:
        found.update(case.annotated)
    if not found:
        raise InputError("no classes to train: no training case annotates a class")
    return sorted(found)


def _checkpoint_classes(model: UniversalModel, catalog: ClassCatalog) -> list[int]:
    try:
        # strict: every row maps to a class (or it raises), so no None is left to drop
        return [i for i in model_class_indices(model, catalog) if i is not None]
    except ClassNameError as exc:
        raise InputError(f"the starting checkpoint: {exc} ('catalog:' in the config)") from None


def load_start(init: str, accept_licence: bool = False) -> UniversalModel:
    """A starting checkpoint by path or registry name (official ``.pth`` or project ``.safetensors``)."""
    if Path(init).expanduser().is_file():
        return load_checkpoint(Path(init).expanduser())
    from UniversalSegLib.checkpoints import load_model

    return load_model(init, device="cpu", accept_licence=accept_licence)


def build_model(config: TrainingConfig, catalog: ClassCatalog, train_cases: Sequence[CaseSpec]) -> StartingPoint:
    """Create the model to train from the config's ``model`` section (see :class:`training.config.ModelSection`)."""
    section = config.model
    init = str(section.init or "scratch")
    start = None
    start_classes: list[int] = []
    if init != "scratch":
        start = load_start(init, section.accept_licence)
        start_classes = _checkpoint_classes(start, catalog)
        arch, width = start.config.architecture, start.config.width
        if section.architecture not in (None, arch) or section.width not in (None, width):
            raise InputError(
                f"model.init {init} is a {arch} of width {width}, but the config asks for "
                f"{section.architecture or arch} of width {section.width or width}; drop model.architecture/width or match them"
            )
        mconfig = start.config
    else:
        mconfig = ModelConfig(section.architecture or "unet", section.width)
    classes = model_classes(config, catalog, train_cases, start_classes)
    embeddings, sources = resolve_embeddings(classes, catalog, start=start, file=section.embeddings)
    model = UniversalModel(mconfig, num_classes=len(classes))
    if start is None and section.head_prior is not None:
        init_head_bias(model, float(section.head_prior))
    if start is not None:
        state = {k: v for k, v in start.state_dict().items() if k != "organ_embedding"}
        missing, unexpected = model.load_state_dict(state, strict=False)
        if set(missing) - {"organ_embedding"} or unexpected:
            raise CheckpointError(
                f"cannot start from {init}: state dict does not match ({sorted(missing)[:3]} {sorted(unexpected)[:3]})"
            )
    with torch.no_grad():
        model.organ_embedding.copy_(embeddings)
    model.class_names = [catalog[c].name for c in classes]
    unknown = [m for m in section.freeze if m not in FREEZABLE]
    if unknown:
        raise InputError(
            f"config model.freeze: unknown module(s) {', '.join(unknown)}; choose from {', '.join(FREEZABLE)}"
        )
    for name, param in model.named_parameters():
        if name.split(".")[0] in section.freeze:
            param.requires_grad_(False)
    teacher = None
    if start is not None and config.training.retain_weight > 0:
        teacher = start.eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    return StartingPoint(
        model=model,
        classes=classes,
        init=init,
        start_classes=start_classes,
        start_metadata=dict(start.metadata) if start is not None else {},
        embedding_sources=sources,
        teacher=teacher,
    )
