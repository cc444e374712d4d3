"""Training configuration: one YAML or JSON file describes the model, the datasets and the run.

Relative paths in the file are resolved against the file's folder. Every section has defaults, so a minimal config is
just ``datasets``. Example (see ``training/configs/tiny_holdout_abdomen.yaml`` for a complete one)::

    name: my-run
    model: {architecture: unet, width: 8, init: scratch}
    datasets:
      - {name: abdomen, type: totalsegmentator, root: data/abdomen, label_file: labels.nii.gz}
      - {name: liver, type: msd, root: data/Task03_Liver, labels: {Liver: [liver, cancer], Liver Tumor: [cancer]}}
    training: {max_steps: 2000, crop_size: [96, 96, 96]}

Unknown keys are errors (a typo must not silently fall back to a default). ``--set section.key=value`` on the command
line overrides single values (:func:`apply_overrides`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import types
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

from UniversalSegLib.errors import InputError
from UniversalSegLib.networks.universal_model import ARCHITECTURES
from UniversalSegLib.preprocessing import HU_WINDOW, TARGET_SPACING_MM

DATASET_TYPES = ("files", "folder", "msd", "totalsegmentator", "exported")
SPLITS = ("train", "val", "both")


def _reject_unknown(section: str, given: Mapping[str, Any], allowed: Sequence[str]) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise InputError(
            f"config: unknown key(s) {', '.join(unknown)} in '{section}'; allowed: {', '.join(sorted(allowed))}"
        )


def _triple(value: Any, name: str, kind: type = float) -> tuple:
    if isinstance(value, (int, float)):
        value = [value] * 3
    try:
        out = tuple(kind(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"config: {name} must be a number or a list of 3 numbers, got {value!r}") from None
    if len(out) != 3 or any(v <= 0 for v in out):
        raise InputError(f"config: {name} must be 3 positive numbers, got {value!r}")
    return out


def _pair(value: Any, name: str, valid: Any, rule: str) -> tuple[float, float]:
    """``value`` as [low, high] floats for which ``valid(low, high)`` holds (``rule`` says it in words), else one
    clear InputError."""
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise InputError(f"config: {name} must be [low, high], got {value!r}") from None
    if not valid(low, high):
        raise InputError(f"config: {name} = [{low:g}, {high:g}] breaks {rule}")
    return low, high


@dataclass
class ModelSection:
    """Which network and where it starts.

    ``init``: ``scratch``, a registry name (e.g. ``universal-unet``, the official checkpoint) or a checkpoint path
    (official ``.pth`` or project ``.safetensors``). ``classes``: the model's output classes (catalog names); empty
    means every class some training dataset annotates (or the starting checkpoint's classes, plus those).
    ``embeddings``: optional file with class embeddings (``.pth``/``.pt``/``.safetensors``: a (N, 512) tensor in
    catalog order or a dict name -> (512,) tensor); classes not found there come from the starting checkpoint, the
    bundled upstream embeddings (catalog classes 1-32) or the CLIP text encoder.
    ``freeze``: module names whose parameters stay fixed (``backbone``, ``precls_conv``, ``GAP``, ``controller``,
    ``text_to_vision``). ``head_prior`` (from scratch only): start every class's logit at this foreground probability
    and the heads' hidden biases slightly positive (the focal-loss prior trick); without it the dominant background
    quickly drives the dynamic heads' ReLUs dead, and the model learns only a constant per class. ``null`` keeps
    PyTorch's default initialisation.
    """

    architecture: str | None = None
    width: int | None = None
    init: str = "scratch"
    classes: list[str] = field(default_factory=list)
    embeddings: str | None = None
    freeze: list[str] = field(default_factory=list)
    head_prior: float | None = 0.02
    accept_licence: bool = False


@dataclass
class AugmentationSection:
    """Training-time randomness, applied to each cached, preprocessed case.

    Crops: ``num_samples`` crops of ``crop_size`` voxels per case, centred on labelled foreground with probability
    ``pos / (pos + neg)`` (MONAI ``RandCropByPosNegLabeld``). Flips along the listed array axes (0 = patient
    left-right, 1 = anterior-posterior, 2 = superior-inferior); a left-right flip swaps the labels of lateral class pairs
    (Right/Left Kidney ...), so laterality stays correct. Rotations up to ``rotate_degrees`` about each axis;
    intensity shift/scale on the [0, 1] window-scaled image. Contrast phase per organ (``organ_phase_*``): with
    probability ``organ_phase_prob`` each organ of ``organ_phase_classes`` (catalog names; organs that enhance) gets
    its median moved to a HU value uniform in ``organ_phase_hu`` (low < high) and its texture scaled by a factor uniform
    in ``organ_phase_spread`` (0 <= low <= high).
    """

    num_samples: int = 2
    pos: float = 2.0
    neg: float = 1.0
    flip_prob: float = 0.1
    flip_axes: list[int] = field(default_factory=lambda: [0, 1, 2])
    rotate_prob: float = 0.2
    rotate_degrees: float = 15.0
    scale_prob: float = 0.0
    scale_range: float = 0.15
    contrast_prob: float = 0.0
    contrast_gamma: tuple[float, float] = (0.5, 2.0)
    crop_centres: str = "foreground"
    organ_intensity_prob: float = 0.0
    organ_intensity_offset: float = 0.2
    organ_phase_prob: float = 0.0
    organ_phase_classes: list[str] = field(default_factory=list)
    organ_phase_hu: tuple[float, float] = (0.0, 250.0)
    organ_phase_spread: tuple[float, float] = (0.3, 1.0)
    intensity_shift: float = 0.1
    intensity_shift_prob: float = 0.5
    intensity_scale: float = 0.1
    intensity_scale_prob: float = 0.3


@dataclass
class TrainingSection:
    """The optimisation loop. ``batch_size``: cases per micro-batch per process (each gives ``num_samples`` crops);
    ``grad_accumulation`` micro-batches make one optimiser step. Learning rate: linear warm-up over ``warmup_steps``,
    then cosine decay to ``lr * min_lr_ratio`` at ``max_steps``; the modules that make the dynamic heads (``controller``,
    ``text_to_vision``, ``GAP``) use ``lr * head_lr_scale`` (below 1 keeps the heads' ReLUs from dying when training from
    scratch at a high rate). ``amp``: ``auto`` (float16 autocast + gradient scaling
    on CUDA, off on CPU), ``fp16``, ``bf16`` or ``off``. Checkpoints (for exact resume) every ``checkpoint_every`` steps
    and at least every ``checkpoint_minutes``; ``max_minutes`` stops the run cleanly (checkpoint + export) after that
    wall-clock time. ``retain_weight`` > 0 keeps the starting model's behaviour on its classes a sample does not annotate
    (distillation: BCE to the starting model's probabilities) -- use it when adding classes to a trained model."""

    max_steps: int = 1000
    batch_size: int = 1
    grad_accumulation: int = 1
    crop_size: tuple[int, int, int] = (96, 96, 96)
    lr: float = 1e-4
    head_lr_scale: float = 1.0
    weight_decay: float = 1e-5
    warmup_steps: int = 50
    min_lr_ratio: float = 0.01
    bce_weight: float = 1.0
    dice_weight: float = 1.0
    retain_weight: float = 0.0
    grad_clip: float | None = 12.0
    amp: str = "auto"
    checkpoint_every: int = 100
    checkpoint_minutes: float | None = 10.0
    keep_checkpoints: int = 3
    max_minutes: float | None = None
    log_every: int = 10
    num_workers: int = 0
    cache: str = "memory"
    threads: int | None = None
    device: str = "auto"
    seed: int = 0


@dataclass
class ValidationSection:
    """Validation Dice per class on the held-out cases (``split: val`` datasets/cases), on the preprocessed grid with
    sliding windows of ``roi_size``; ``every`` steps (0: only at the end), and at step 0 when ``at_start`` (default: when
    starting from a checkpoint, which gives Dice before/after fine-tuning)."""

    every: int = 200
    roi_size: tuple[int, int, int] = (96, 96, 96)
    overlap: float = 0.25
    at_start: bool | None = None


@dataclass
class DatasetSection:
    """One dataset entry. See :mod:`training.datasets` for the layouts of each ``type``."""

    name: str
    type: str
    root: Path | None = None
    path: Path | None = None
    cases: list[dict] = field(default_factory=list)
    images: str | None = None
    label_images: str | None = None
    image_suffix: str = ""
    label_suffix: str = ""
    image: str = "ct.nii.gz"
    label_file: str | None = None
    masks: str | None = None
    section: str = "training"
    labels: dict[str, Any] | None = None
    label_names: dict[int, str] | None = None
    label_values: str = "names"
    annotated: list[str] | None = None
    ignore_labels: list[Any] = field(default_factory=list)
    split: str = "train"
    val_cases: list[str] = field(default_factory=list)
    val_fraction: float = 0.0
    weight: float = 1.0
    licence: str | None = None
    source: str | None = None


@dataclass
class TrainingConfig:
    """A whole training configuration (see the module docstring)."""

    name: str
    datasets: list[DatasetSection]
    model: ModelSection = field(default_factory=ModelSection)
    augmentation: AugmentationSection = field(default_factory=AugmentationSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    spacing: tuple[float, float, float] = TARGET_SPACING_MM
    hu_window: tuple[float, float] = HU_WINDOW
    output: Path = Path("runs/run")
    catalog: Path | None = None
    licence: str = "Apache-2.0"
    description: str = ""
    source_path: Path | None = None
    base_dir: Path = Path(".")
    raw: dict = field(default_factory=dict, repr=False)

    def to_dict(self) -> dict:
        """The config as given (after overrides), JSON-serialisable: recorded in checkpoints as provenance."""
        return copy.deepcopy(self.raw)

    def digest(self) -> str:
        """Short hash of the config, recorded in training states (resume warns when it changed)."""
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True, default=str).encode()).hexdigest()[:16]


_KIND_WORDS = {float: "a number", int: "a whole number", bool: "true or false", str: "a string"}


def _typed(value: Any, hint: Any, name: str) -> Any:
    """``value`` checked against the field's scalar type ``hint`` (ints become floats where a float is meant); one
    clear InputError otherwise."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _typed(value, option, name)
            except InputError as exc:
                errors.append(exc)
        raise errors[0]
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # PyYAML reads 1e-4 (no dot) as a string; YAML 1.2 and every user mean the number
            return float(value)
        except ValueError:
            pass
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (bool, str) and isinstance(value, hint):
        return value
    if hint is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # a name or id YAML read as a number (name: 2024)
    if hint in _KIND_WORDS:
        raise InputError(f"config: {name} must be {_KIND_WORDS[hint]}, got {value!r}")
    return value  # lists (a size may be one number for all axes), Any, paths: checked where they are used


def _section(cls, section: str, raw: Mapping[str, Any] | None):
    raw = dict(raw or {})
    names = [f.name for f in fields(cls)]
    _reject_unknown(section, raw, names)
    hints = typing.get_type_hints(cls)
    raw = {k: _typed(v, hints[k], f"{section}.{k}") for k, v in raw.items()}
    try:
        return cls(**raw)
    except TypeError as exc:
        raise InputError(f"config: bad '{section}' section ({exc})") from None


def _parse_dataset(raw: Any, index: int, base: Path) -> DatasetSection:
    if not isinstance(raw, Mapping):
        raise InputError(f"config: datasets[{index}] must be a mapping with at least 'name' and 'type'")
    raw = dict(raw)
    raw.setdefault("name", f"dataset{index + 1}")
    if "type" not in raw:
        raise InputError(f"config: dataset '{raw['name']}' has no 'type'; use one of {', '.join(DATASET_TYPES)}")
    if raw["type"] not in DATASET_TYPES:
        raise InputError(
            f"config: dataset '{raw['name']}' has unknown type {raw['type']!r}; use one of {', '.join(DATASET_TYPES)}"
        )
    # A folder entry's label files are 'label_images' (a glob); a string 'labels' is accepted as that glob too.
    if raw["type"] == "folder" and isinstance(raw.get("labels"), str) and "label_images" not in raw:
        raw["label_images"] = raw.pop("labels")
    ds = _section(DatasetSection, f"datasets[{index}] ({raw['name']})", raw)
    for attr in ("root", "path"):
        value = getattr(ds, attr)
        if value is not None:
            p = Path(str(value)).expanduser()
            setattr(ds, attr, p if p.is_absolute() else (base / p))
    if ds.split not in SPLITS:
        raise InputError(f"config: dataset '{ds.name}' split must be one of {', '.join(SPLITS)}, got {ds.split!r}")
    if not 0.0 <= ds.val_fraction < 1.0:
        raise InputError(f"config: dataset '{ds.name}' val_fraction must be in [0, 1), got {ds.val_fraction}")
    if ds.weight <= 0:
        raise InputError(f"config: dataset '{ds.name}' weight must be positive, got {ds.weight}")
    if ds.label_values not in ("names", "catalog"):
        raise InputError(
            f"config: dataset '{ds.name}' label_values must be 'names' or 'catalog', got {ds.label_values!r}"
        )
    if ds.label_names is not None:
        try:
            ds.label_names = {int(k): str(v) for k, v in ds.label_names.items()}
        except (TypeError, ValueError):
            raise InputError(
                f"config: dataset '{ds.name}' label_names must map integer label values to names"
            ) from None
    if ds.labels is not None and not isinstance(ds.labels, Mapping):
        raise InputError(f"config: dataset '{ds.name}' labels must map catalog class names to source labels")
    return ds


def parse_config(raw: Mapping[str, Any], base_dir: str | Path = ".", source_path: Path | None = None) -> TrainingConfig:
    """Validate a config mapping (already loaded from YAML/JSON). Paths are resolved against ``base_dir``."""
    if not isinstance(raw, Mapping):
        raise InputError("config: the file must hold a mapping (name, model, datasets, training ...)")
    base = Path(base_dir).resolve()
    top = (
        "name",
        "description",
        "model",
        "augmentation",
        "training",
        "validation",
        "datasets",
        "spacing",
        "hu_window",
        "output",
        "catalog",
        "licence",
    )
    _reject_unknown("top level", raw, top)
    datasets_raw = raw.get("datasets")
    if not datasets_raw or not isinstance(datasets_raw, list):
        raise InputError("config: 'datasets' must be a non-empty list of dataset entries")
    datasets = [_parse_dataset(d, i, base) for i, d in enumerate(datasets_raw)]
    names = [d.name for d in datasets]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise InputError(f"config: dataset names must be unique; repeated: {', '.join(dupes)}")
    model = _section(ModelSection, "model", raw.get("model"))
    if model.architecture is not None and model.architecture not in ARCHITECTURES:
        raise InputError(
            f"config: model.architecture must be one of {', '.join(ARCHITECTURES)}, got {model.architecture!r}"
        )
    if model.width is not None and int(model.width) < 1:
        raise InputError(f"config: model.width must be a positive integer, got {model.width}")
    if isinstance(model.classes, str):
        model.classes = [c.strip() for c in model.classes.split(",") if c.strip()]
    init = str(model.init)
    if init != "scratch" and ("/" in init or init.endswith((".pth", ".pt", ".safetensors"))):
        p = Path(init).expanduser()
        model.init = str(p if p.is_absolute() else base / p)
    if model.embeddings:
        p = Path(model.embeddings).expanduser()
        model.embeddings = str(p if p.is_absolute() else base / p)
    aug = _section(AugmentationSection, "augmentation", raw.get("augmentation"))
    if any(a not in (0, 1, 2) for a in aug.flip_axes):
        raise InputError(f"config: augmentation.flip_axes must list axes 0, 1, 2; got {aug.flip_axes}")
    if aug.crop_centres not in ("foreground", "classes"):
        raise InputError(
            f"config: augmentation.crop_centres must be 'foreground' or 'classes', got {aug.crop_centres!r}"
        )
    if not 0 <= aug.organ_intensity_prob <= 1 or aug.organ_intensity_offset < 0:
        raise InputError("config: augmentation.organ_intensity_prob must be in [0, 1] and organ_intensity_offset >= 0")
    if not 0 <= aug.organ_phase_prob <= 1:
        raise InputError(f"config: augmentation.organ_phase_prob must be in [0, 1], got {aug.organ_phase_prob}")
    aug.organ_phase_hu = _pair(aug.organ_phase_hu, "augmentation.organ_phase_hu", lambda a, b: a < b, "low < high")
    aug.organ_phase_spread = _pair(
        aug.organ_phase_spread, "augmentation.organ_phase_spread", lambda a, b: 0 <= a <= b, "0 <= low <= high"
    )
    if len(aug.contrast_gamma) != 2 or not 0 < float(aug.contrast_gamma[0]) <= float(aug.contrast_gamma[1]):
        raise InputError(
            f"config: augmentation.contrast_gamma must be [low, high] with 0 < low <= high, got {aug.contrast_gamma}"
        )
    if not 0 <= aug.scale_range < 1:
        raise InputError(f"config: augmentation.scale_range must be in [0, 1), got {aug.scale_range}")
    if aug.num_samples < 1 or aug.pos < 0 or aug.neg < 0 or aug.pos + aug.neg <= 0:
        raise InputError("config: augmentation needs num_samples >= 1 and pos, neg >= 0 with pos + neg > 0")
    tr = _section(TrainingSection, "training", raw.get("training"))
    tr.crop_size = _triple(tr.crop_size, "training.crop_size", int)
    if tr.max_steps < 1 or tr.batch_size < 1 or tr.grad_accumulation < 1:
        raise InputError("config: training.max_steps, batch_size and grad_accumulation must be at least 1")
    if tr.amp not in ("auto", "fp16", "bf16", "off"):
        raise InputError(f"config: training.amp must be auto, fp16, bf16 or off; got {tr.amp!r}")
    if tr.cache not in ("memory", "disk", "none"):
        raise InputError(f"config: training.cache must be memory, disk or none; got {tr.cache!r}")
    if tr.lr <= 0 or tr.head_lr_scale <= 0 or not 0 <= tr.min_lr_ratio <= 1 or tr.warmup_steps < 0:
        raise InputError(
            "config: training.lr and head_lr_scale must be positive, min_lr_ratio in [0, 1], warmup_steps >= 0"
        )
    if tr.checkpoint_every < 1:
        raise InputError("config: training.checkpoint_every must be at least 1")
    val = _section(ValidationSection, "validation", raw.get("validation"))
    val.roi_size = _triple(val.roi_size, "validation.roi_size", int)
    if not 0 <= val.overlap < 1:
        raise InputError(f"config: validation.overlap must be in [0, 1), got {val.overlap}")
    out = Path(str(raw.get("output", "runs/" + str(raw.get("name", "run"))))).expanduser()
    catalog = raw.get("catalog")
    hu = raw.get("hu_window", HU_WINDOW)
    if not (isinstance(hu, (list, tuple)) and len(hu) == 2 and float(hu[0]) < float(hu[1])):
        raise InputError(f"config: hu_window must be [low, high] with low < high, got {hu!r}")
    return TrainingConfig(
        name=str(raw.get("name") or "run"),
        description=str(raw.get("description") or ""),
        datasets=datasets,
        model=model,
        augmentation=aug,
        training=tr,
        validation=val,
        spacing=_triple(raw.get("spacing", TARGET_SPACING_MM), "spacing"),
        hu_window=(float(hu[0]), float(hu[1])),
        output=out if out.is_absolute() else base / out,
        catalog=(Path(catalog) if Path(catalog).is_absolute() else base / catalog) if catalog else None,
        licence=str(raw.get("licence", "Apache-2.0")),
        source_path=source_path,
        base_dir=base,
        raw=json.loads(json.dumps(dict(raw), default=str)),
    )


def _coerce(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """``["training.max_steps=10", "model.width=4"]`` -> a copy of ``raw`` with those values set (YAML-parsed)."""
    out = copy.deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise InputError(f"--set expects section.key=value, got {item!r}")
        key, value = item.split("=", 1)
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise InputError(f"--set expects section.key=value, got {item!r}")
        node = out
        for p in parts[:-1]:
            if p.isdigit() and isinstance(node, list):
                node = node[int(p)]
                continue
            node = node.setdefault(p, {})
            if not isinstance(node, (dict, list)):
                raise InputError(f"--set {key}: '{p}' is not a section")
        last = parts[-1]
        if isinstance(node, list) and last.isdigit():
            node[int(last)] = _coerce(value)
        else:
            node[last] = _coerce(value)
    return out


def read_config_file(path: str | Path) -> dict:
    """Load a YAML (``.yaml``/``.yml``) or JSON file as a mapping, with a one-line error for bad files."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"config file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml.YAMLError / json.JSONDecodeError: report the first line only
        raise InputError(f"cannot parse config {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise InputError(f"config {path} must hold a mapping at the top level")
    return data


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> TrainingConfig:
    """Read, override and validate a config file."""
    path = Path(path).expanduser().resolve()
    raw = apply_overrides(read_config_file(path), overrides)
    return parse_config(raw, path.parent, source_path=path)


def config_summary(config: TrainingConfig) -> dict:
    """The resolved sections (for logs): model, augmentation, training, validation."""
    return {k: asdict(getattr(config, k)) for k in ("model", "augmentation", "training", "validation")}
