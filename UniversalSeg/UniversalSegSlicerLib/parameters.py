"""What to segment and how: the engine's :class:`~UniversalSegLib.request.SegmentationRequest`, plus what only the
Slicer module needs (licence acceptance, overwriting edited segments)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from UniversalSegLib.catalog import ClassCatalog
from UniversalSegLib.errors import InputError
from UniversalSegLib.registry import DEFAULT_MODEL
from UniversalSegLib.request import SegmentationRequest

DEVICES = ("auto", "cuda", "cpu")

#: Setting fields of ``UniversalSegParameterNode`` (UniversalSeg.py) -> the request field each one sets. The node's
#: ``quality`` combo is the fast preset. Testing/test_request.py checks this against the node and the request.
PARAMETER_NODE_FIELDS: dict[str, str] = {
    "classes": "classes",
    "prompt": "prompt",
    "model": "model",
    "device": "device",
    "overlap": "overlap",
    "threshold": "threshold",
    "postprocess": "postprocess",
    "largestComponent": "keep_largest_component",
    "lungSplit": "split_lungs",
    "portalVeinFilter": "clear_portal_vein_below_pancreas",
    "tumorFilter": "keep_tumors_inside_organs",
}
#: The parameter node's device choices -> the request's.
NODE_DEVICES: dict[str, str] = {"auto": "auto", "gpu": "cuda", "cpu": "cpu"}
#: Request fields the module's panel does not show (they keep their defaults; precision follows ``quality``).
NOT_IN_GUI: frozenset[str] = frozenset(
    {
        "backend",
        "precision",
        "class_thresholds",
        "window_batch",
        "region",
        "filter_small_tumors",
        "separate_lungs",
        "fill_holes",
    }
)


@dataclass
class SegmentationParameters(SegmentationRequest):
    """A :class:`SegmentationRequest` (every engine setting, ``fast=True`` preset included) plus:

    Attributes:
        acceptLicence: accept the model's licence (remembered) - only after the user has read it.
        overwrite: replace segments the user edited or marked reviewed (normally they are kept).

    ``classes``: catalog classes by display name, file stem, synonym or 1-based index, or ``["all"]``; none ticked
    means none (a prompt then says what to segment). ``model`` defaults to the registry's default model.
    """

    model: str = field(default=DEFAULT_MODEL, metadata=SegmentationRequest.__dataclass_fields__["model"].metadata)
    acceptLicence: bool = field(default=False, metadata={"slicer": True})
    overwrite: bool = field(default=False, metadata={"slicer": True})

    def __post_init__(self, fast: bool) -> None:
        super().__post_init__(fast)
        if not self.classes:
            self.classes = None  # nothing ticked: the prompt alone (validate refuses neither)

    @classmethod
    def fromParameterNode(cls, node: Any) -> "SegmentationParameters":
        """The parameters of the module's parameter node (or anything with its attributes)."""
        values = {request: getattr(node, name) for name, request in PARAMETER_NODE_FIELDS.items()}
        values["classes"] = [s for s in node.classes.split(",") if s]
        values["device"] = NODE_DEVICES[node.device]
        fast = node.quality == "fast"
        if fast:
            del values["overlap"]  # the default 0.5 (the slider is disabled in fast mode)
        return cls(**values, fast=fast, overwrite=node.overwrite)

    def validate(self, catalog: ClassCatalog | None = None) -> None:
        """Raise :class:`InputError` / ``ClassNameError`` (one line, what to do) for unusable values."""
        if not self.classes and not "".join(self.prompt).strip():
            raise InputError("nothing to segment: tick classes in the class picker or type a prompt")
        if not str(self.model or "").strip():
            raise InputError("no model chosen: pick a model or a checkpoint file")
        super().validate(catalog)

    def to_cli_args(self, catalog: ClassCatalog | None = None) -> list[str]:
        """Arguments of ``universalseg segment`` for these parameters (input and outputs excluded): the request's
        flags, with the classes as catalog file stems, and ``--accept-licence``."""
        catalog = catalog or ClassCatalog.default()
        classes = self.classes
        if classes and not any(c.lower() == "all" for c in classes):
            classes = tuple(info.file_stem for info in catalog.select(list(classes)))
        elif classes:
            classes = ("all",)
        prompt = tuple(p.strip() for p in self.prompt if p.strip())
        request = SegmentationRequest(**{**self.to_json(), "classes": classes, "prompt": prompt})
        return request.to_cli_args() + (["--accept-licence"] if self.acceptLicence else [])

    def to_json(self) -> dict[str, Any]:
        """The request's fields only (no Slicer-side ones)."""
        data = super().to_json()
        return {k: v for k, v in data.items() if k not in ("acceptLicence", "overwrite")}
