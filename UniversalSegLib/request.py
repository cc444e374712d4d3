"""One definition of the segmentation settings: :class:`SegmentationRequest`.

Each field says, in its ``metadata``, everything the other views need: the command line flag (and the older flag
names kept as aliases), the help text, the allowed choices or range and the check's message. From it come

* the CLI flags of ``universalseg segment`` / ``demo`` (:meth:`SegmentationRequest.add_arguments`,
  :meth:`SegmentationRequest.from_args`) and their inverse, :meth:`SegmentationRequest.to_cli_args` (the Slicer
  module builds the engine command line with it);
* one validation (:meth:`SegmentationRequest.validate`; :class:`~UniversalSegLib.pipeline.SegmentationOptions`
  checks its values with the same :func:`check_setting`);
* the engine's options (:meth:`SegmentationRequest.to_options`), the summary JSON's ``settings.request``
  (:meth:`SegmentationRequest.to_json`) and a JSON schema for a request sent to a server (:meth:`json_schema`).

``fast`` is a preset, not a setting: it sets ``precision`` to ``bfloat16`` (the backbone in bfloat16 on CPUs that
have it natively, float32 elsewhere) unless given explicitly, and keeps the overlap: measured with trained weights
(benchmarks/bench_presets.py), any overlap below 0.5 moved the bundled model's liver to Dice 0.89-0.96 against the
published setting on some CTs, bfloat16 at overlap 0.5 kept >= 0.997 on all four.
"""

from __future__ import annotations

import argparse
import copy
import math
import re
from dataclasses import MISSING, Field, InitVar, dataclass, field, fields
from typing import Any, Mapping, Sequence

from .errors import InputError

BACKENDS: tuple[str, ...] = ("auto", "torch", "openvino")
#: ``auto``: float32 (CUDA runs automatic mixed precision whatever is asked); ``bfloat16`` falls back to float32 on
#: CPUs without native bfloat16.
PRECISIONS: tuple[str, ...] = ("auto", "float32", "bfloat16")
DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")
#: Presets: field -> value, applied to the fields left at their defaults.
PRESETS: dict[str, dict[str, Any]] = {"fast": {"precision": "bfloat16"}}

_GROUP_WHAT, _GROUP_MODEL, _GROUP_RUN = "what to segment", "model and device", "inference"
_GROUP_POST = "post-processing (published steps on by default)"


def _setting(
    default: Any = MISSING,
    *,
    flag: str,
    help: str,
    group: str,
    aliases: Sequence[str] = (),
    factory: Any = MISSING,
    **checks: Any,
) -> Any:
    """A request field. ``checks``: ``choices``, ``pattern``, ``low``/``high`` (+ ``low_open``/``high_open``),
    ``message`` (format with ``{value}``), ``metavar``, ``repeat`` (a repeatable flag), ``postprocess`` (the
    :class:`PostprocessOptions` field it sets), ``label`` (how messages name it)."""
    metadata = {"flag": flag, "aliases": tuple(aliases), "help": help, "group": group, **checks}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _step(default: bool, flag: str, help: str, postprocess: str, aliases: Sequence[str] = ()) -> Any:
    return _setting(default, flag=flag, help=help, group=_GROUP_POST, aliases=aliases, postprocess=postprocess)


@dataclass
class SegmentationRequest:
    """What to segment and how: the settings of one segmentation run, shared by the CLI, the Slicer module, the
    library and a server. ``fast=True`` applies the fast preset (bfloat16 where the CPU has it) to ``precision``
    where it is left at its default; it is not stored (``uses_fast_preset`` tells
    whether a request has the preset's values)."""

    classes: tuple[str, ...] | None = _setting(
        None,
        flag="--classes",
        group=_GROUP_WHAT,
        metavar="NAMES",
        help="comma-separated class names, or 'all' (every class the model knows; the default unless --prompt is given)",
    )
    prompt: tuple[str, ...] = _setting(
        flag="--prompt",
        group=_GROUP_WHAT,
        factory=tuple,
        metavar="TEXT",
        repeat=True,
        help="free text, e.g. 'IVC and both kidneys' (repeatable; combines with --classes)",
    )
    model: str | None = _setting(
        None,
        flag="--model",
        group=_GROUP_MODEL,
        help="registry name (see 'universalseg models') or checkpoint path (default: bundled model)",
    )
    device: str = _setting(
        "auto",
        flag="--device",
        group=_GROUP_MODEL,
        pattern=DEVICE_PATTERN,
        message="unknown device {value!r}; use auto, cpu or cuda (or cuda:N)",
        help="auto (CUDA when present), cpu, cuda or cuda:N (default: auto)",
    )
    backend: str = _setting(
        "auto",
        flag="--backend",
        group=_GROUP_RUN,
        choices=BACKENDS,
        help="what runs the network: auto (OpenVINO on the CPU when installed, else PyTorch), torch or openvino",
    )
    precision: str = _setting(
        "auto",
        flag="--precision",
        group=_GROUP_RUN,
        choices=PRECISIONS,
        help="backbone arithmetic: auto (float32; mixed precision on CUDA), float32, or bfloat16 (on CPUs with native "
        "bfloat16, float32 elsewhere) (default: auto; bfloat16 with --fast)",
    )
    overlap: float = _setting(
        0.5,
        flag="--overlap",
        group=_GROUP_RUN,
        low=0.0,
        high=1.0,
        high_open=True,
        message="overlap must be at least 0 and below 1, got {value}",
        help="window overlap in [0, 1) (default 0.5); below 0.5 is faster but moves the answer (see README)",
    )
    threshold: float = _setting(
        0.5,
        flag="--threshold",
        group=_GROUP_RUN,
        low=0.0,
        high=1.0,
        low_open=True,
        high_open=True,
        message="threshold must be between 0 and 1 (exclusive), got {value}",
        help="probability threshold (default 0.5, strictly greater)",
    )
    class_thresholds: dict[str, float] = _setting(
        flag="--class-threshold",
        group=_GROUP_RUN,
        factory=dict,
        metavar="CLASS=T",
        repeat=True,
        low=0.0,
        high=1.0,
        low_open=True,
        high_open=True,
        message="threshold must be between 0 and 1 (exclusive), got {value}",
        help="per-class threshold override, e.g. 'liver tumor=0.3' (repeatable)",
    )
    window_batch: int = _setting(
        1,
        flag="--window-batch",
        group=_GROUP_RUN,
        low=1,
        message="window batch size must be at least 1, got {value}",
        help="windows per network call (default 1)",
    )
    region: bool = _setting(
        True,
        flag="--no-roi",
        group=_GROUP_RUN,
        help="run the full-resolution windows over the whole scan, not only where a coarse pass of the model located "
        "the requested classes (the masks are the same; see README, Performance)",
    )
    postprocess: bool = _setting(
        True, flag="--no-postprocess", group=_GROUP_POST, postprocess="enabled", help="switch off all post-processing"
    )
    keep_largest_component: bool = _step(
        True,
        "--no-keep-largest-component",
        "organs keep all components, not just the largest",
        "largest_component",
        ("--no-largest-component",),
    )
    split_lungs: bool = _step(
        True, "--no-split-lungs", "do not merge and re-split the lungs by position", "lungs", ("--no-lung-split",)
    )
    clear_portal_vein_below_pancreas: bool = _step(
        True,
        "--no-clear-portal-vein-below-pancreas",
        "do not clear portal/splenic vein below the pancreas",
        "portal_vein",
        ("--no-portal-vein-filter",),
    )
    keep_tumors_inside_organs: bool = _step(
        True,
        "--no-keep-tumors-inside-organs",
        "keep kidney/liver tumors outside their organs too",
        "tumors_in_parents",
        ("--no-tumor-filter",),
    )
    filter_small_tumors: bool = _step(
        False,
        "--filter-small-tumors",
        "drop small tumor components and keep at most a few per tumor class "
        "(an earlier upstream revision's filter; off by default)",
        "tumor_filter",
    )
    separate_lungs: bool = _step(
        False,
        "--separate-lungs",
        "separate touching lungs when one is more than 4 times the other (with the lung "
        "split; an earlier upstream revision's check; off by default)",
        "lung_separation",
    )
    fill_holes: bool = _step(False, "--fill-holes", "fill enclosed holes of every mask (off by default)", "fill_holes")
    fast: InitVar[bool] = False

    def __post_init__(self, fast: bool) -> None:
        if isinstance(self.classes, str):
            self.classes = tuple(t.strip() for t in self.classes.split(",") if t.strip())
        elif self.classes is not None:
            self.classes = tuple(str(c).strip() for c in self.classes if str(c).strip())
        if isinstance(self.prompt, str):
            self.prompt = (self.prompt,) if self.prompt.strip() else ()
        else:
            self.prompt = tuple(self.prompt)
        self.class_thresholds = dict(self.class_thresholds)
        if fast:
            for name, value in PRESETS["fast"].items():
                if getattr(self, name) == _default(_field(name)):
                    setattr(self, name, value)

    # -- presets -------------------------------------------------------------------------------------------------
    @property
    def uses_fast_preset(self) -> bool:
        """True when overlap and precision have the fast preset's values."""
        return all(getattr(self, name) == value for name, value in PRESETS["fast"].items())

    # -- validation ----------------------------------------------------------------------------------------------
    def validate(self, catalog=None) -> None:
        """Raise :class:`InputError` (or ``ClassNameError`` for an unknown class) with one line naming the problem
        and what to do. The only place the settings are checked."""
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "class_thresholds":
                for name, t in value.items():
                    check_setting(f.name, t, f" for class {name}")
            elif "low" in f.metadata or "choices" in f.metadata or "pattern" in f.metadata:
                check_setting(f.name, value)
        if self.classes == () and not self.prompt:
            raise InputError(
                "--classes names no class (an empty variable?); name them, e.g. --classes liver,spleen, "
                "or pass --classes all"
            )
        if self.classes or self.class_thresholds:
            from .catalog import ClassCatalog

            catalog = catalog or ClassCatalog.default()
            for name in [c for c in self.classes or () if c.lower() != "all"] + list(self.class_thresholds):
                catalog.lookup(name)  # ClassNameError: unknown name, with suggestions

    # -- the engine ----------------------------------------------------------------------------------------------
    def postprocess_options(self):
        """The engine's :class:`PostprocessOptions` for these switches (every step off without ``postprocess``)."""
        from .postprocess import PostprocessOptions

        if not self.postprocess:
            return PostprocessOptions.none()
        return PostprocessOptions(
            **{f.metadata["postprocess"]: getattr(self, f.name) for f in fields(self) if "postprocess" in f.metadata}
        )

    def class_threshold_indices(self, catalog=None) -> dict[int, float]:
        """``class_thresholds`` by catalog index."""
        from .catalog import ClassCatalog

        catalog = catalog or ClassCatalog.default()
        return {catalog.lookup(name).index: float(t) for name, t in self.class_thresholds.items()}

    def to_options(self, **extra):
        """The engine's :class:`SegmentationOptions`; ``extra``: options that are not segmentation settings (``force``,
        ``frame``, ``spacing``)."""
        from .pipeline import SegmentationOptions

        return SegmentationOptions(
            overlap=self.overlap,
            sw_batch_size=self.window_batch,
            device=self.device,
            fast=self.uses_fast_preset,
            precision=self.precision,
            threshold=self.threshold,
            class_thresholds=self.class_threshold_indices(),
            postprocess=self.postprocess_options(),
            backend=self.backend,
            region=self.region,
            **extra,
        )

    # -- JSON ----------------------------------------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The request as JSON-ready values (what the summary records under ``settings.request``)."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else dict(value) if isinstance(value, dict) else value
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "SegmentationRequest":
        """A request from :meth:`to_json`'s form (``fast`` applies the preset); unknown keys are an error."""
        names = {f.name for f in fields(cls)} | {"fast"}
        unknown = sorted(set(data) - names)
        if unknown:
            raise InputError(f"unknown request field(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        return cls(**dict(data))

    @classmethod
    def json_schema(cls) -> dict[str, Any]:
        """A JSON schema (draft 2020-12) of a request, derived from the fields."""
        properties: dict[str, Any] = {}
        for f in fields(cls):
            meta = f.metadata
            schema: dict[str, Any] = copy.deepcopy(_SCHEMA_TYPES[str(f.type)])
            if "choices" in meta:
                schema["enum"] = list(meta["choices"])
            if "pattern" in meta:
                schema["pattern"] = f"^({meta['pattern'].pattern})$"
            bounds = schema["additionalProperties"] if f.name == "class_thresholds" else schema
            if "low" in meta:
                bounds["exclusiveMinimum" if meta.get("low_open") else "minimum"] = meta["low"]
            if "high" in meta:
                bounds["exclusiveMaximum" if meta.get("high_open") else "maximum"] = meta["high"]
            schema["description"] = meta["help"]
            default = _default(f)
            schema["default"] = list(default) if isinstance(default, tuple) else default
            properties[f.name] = schema
        properties["fast"] = {
            "type": "boolean",
            "default": False,
            "description": "preset: precision bfloat16 unless given",
        }
        return {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "title": cls.__name__,
            "type": "object",
            "properties": properties,
            "additionalProperties": False,
        }

    # -- the command line ----------------------------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser, exclude: Sequence[str] = ()) -> dict[str, Any]:
        """Add a flag per field (and the older names as aliases) and ``--fast``; returns the argument groups by
        title, for the caller's own options. Unset flags parse as None, so :meth:`from_args` knows what was given.
        ``exclude``: fields without a flag (they keep their defaults)."""
        groups: dict[str, Any] = {}

        def group(title: str):
            if title not in groups:
                groups[title] = parser.add_argument_group(title)
            return groups[title]

        for f in fields(cls):
            meta = f.metadata
            if f.name in exclude:
                continue
            g = group(meta["group"])
            if f.type == "bool":
                action = "store_false" if _default(f) else "store_true"
                g.add_argument(
                    meta["flag"], *meta["aliases"], dest=f.name, action=action, default=None, help=meta["help"]
                )
            else:
                kind = {"float": float, "int": int}.get(str(f.type), str)
                g.add_argument(
                    meta["flag"],
                    *meta["aliases"],
                    dest=f.name,
                    type=kind,
                    default=None,
                    choices=meta.get("choices"),
                    metavar=meta.get("metavar"),
                    action="append" if meta.get("repeat") else "store",
                    help=meta["help"],
                )
            if f.name == "window_batch":
                g.add_argument(
                    "--fast",
                    action="store_true",
                    default=False,
                    help="preset: the backbone in bfloat16 on CPUs that have it natively (--precision bfloat16; "
                    "2-2.5x faster, the same masks to Dice >= 0.997 with trained weights); an explicit --precision "
                    "wins (see README, Performance)",
                )
        return groups

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> "SegmentationRequest":
        """The request the parsed flags describe: given flags, then ``--fast``'s values, then the defaults. Raises
        :class:`InputError` for a malformed ``--class-threshold``; call :meth:`validate` for the values."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            value = getattr(args, f.name, None)
            if value is None:
                continue
            if f.name == "class_thresholds":
                value = _parse_class_thresholds(value)
            values[f.name] = value
        if getattr(args, "fast", False):
            for name, value in PRESETS["fast"].items():
                values.setdefault(name, value)
        return cls(**values)

    def to_cli_args(self) -> list[str]:
        """Flags of ``universalseg segment`` for this request (the settings that differ from the defaults; ``--fast``
        when overlap and precision are the preset's); ``from_args(parse(to_cli_args()))`` gives the request back."""
        preset = self.uses_fast_preset
        args: list[str] = ["--fast"] if preset else []
        for f in fields(self):
            value, flag = getattr(self, f.name), f.metadata["flag"]
            if value == _default(f) or (preset and f.name in PRESETS["fast"]):
                continue
            if f.type == "bool":
                args.append(flag)
            elif f.name == "classes":
                args += [flag, ",".join(value)]
            elif f.name == "prompt":
                for text in value:
                    args += [flag, text]
            elif f.name == "class_thresholds":
                for name, t in value.items():
                    args += [flag, f"{name}={float(t)!r}"]
            elif isinstance(value, float):
                args += [flag, repr(float(value))]
            else:
                args += [flag, str(value)]
        return args


_SCHEMA_TYPES: dict[str, dict[str, Any]] = {
    "tuple[str, ...] | None": {"type": ["array", "null"], "items": {"type": "string"}},
    "tuple[str, ...]": {"type": "array", "items": {"type": "string"}},
    "str | None": {"type": ["string", "null"]},
    "str": {"type": "string"},
    "float": {"type": "number"},
    "int": {"type": "integer"},
    "bool": {"type": "boolean"},
    "dict[str, float]": {"type": "object", "additionalProperties": {"type": "number"}},
}


def _field(name: str) -> Field:
    return SegmentationRequest.__dataclass_fields__[name]


def _default(f: Field) -> Any:
    if f.default is MISSING and f.default_factory is not MISSING:
        return f.default_factory()
    return f.default


def check_setting(name: str, value: Any, suffix: str = "") -> None:
    """Check one value against the field ``name``'s choices, pattern or range; raise :class:`InputError` with the
    field's message (``suffix`` is appended, e.g. " for class 6")."""
    meta = _field(name).metadata
    label = name.replace("_", " ")
    if "choices" in meta:
        if value not in meta["choices"]:
            raise InputError(f"unknown {label} {value!r}; choose one of {', '.join(meta['choices'])}{suffix}")
        return
    if "pattern" in meta:
        if not isinstance(value, str) or not meta["pattern"].fullmatch(value):
            raise InputError(meta["message"].format(value=value) + suffix)
        return
    message = meta["message"].format(value=value) + suffix
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise InputError(message)
    low, high = meta.get("low"), meta.get("high")
    if low is not None and (value <= low if meta.get("low_open") else value < low):
        raise InputError(message)
    if high is not None and (value >= high if meta.get("high_open") else value > high):
        raise InputError(message)
    if _field(name).type == "int" and value != int(value):
        raise InputError(message)


def _parse_class_thresholds(items: Sequence[str] | Mapping[str, float]) -> dict[str, float]:
    if isinstance(items, Mapping):
        return dict(items)
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.rpartition("=")
        if not sep:
            raise InputError(f"--class-threshold needs CLASS=T, got {item!r}")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise InputError(f"--class-threshold {item!r}: {value!r} is not a number") from None
    return out


__all__ = ["SegmentationRequest", "check_setting", "BACKENDS", "PRECISIONS", "PRESETS"]
