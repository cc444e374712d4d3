"""What to segment and how: the options of the engine's command line ``universalseg segment``."""

from __future__ import annotations

from dataclasses import dataclass, field

from UniversalSegLib.catalog import ClassCatalog
from UniversalSegLib.errors import InputError
from UniversalSegLib.registry import DEFAULT_MODEL

DEVICES = ("auto", "cuda", "cpu")


@dataclass
class SegmentationParameters:
    """What to segment and how (the command line options of ``universalseg segment``).

    Attributes:
        classes: catalog classes by display name, file stem, synonym or 1-based index, or ``["all"]``.
        prompt: free text ("IVC and both kidneys"); combines with ``classes``.
        model: registry name or checkpoint file path.
        device: "auto" (CUDA when present), "cuda" or "cpu".
        fast: fewer windows (no overlap) - minutes instead of tens of minutes on a CPU.
        overlap: sliding-window overlap in [0, 1); None uses the engine's default (0.5, or 0.0 with ``fast``).
        threshold: probability threshold in (0, 1).
        postprocess: the published anatomical post-processing; the four flags below switch single steps off.
        acceptLicence: accept the model's licence (remembered) - only after the user has read it.
        overwrite: replace segments the user edited or marked reviewed (normally they are kept).
    """

    classes: list[str] = field(default_factory=list)
    prompt: str = ""
    model: str = DEFAULT_MODEL
    device: str = "auto"
    fast: bool = False
    overlap: float | None = None
    threshold: float = 0.5
    postprocess: bool = True
    largestComponent: bool = True
    lungSplit: bool = True
    portalVeinFilter: bool = True
    tumorFilter: bool = True
    acceptLicence: bool = False
    overwrite: bool = False

    def validate(self, catalog: ClassCatalog | None = None) -> None:
        """Raise :class:`InputError` / ``ClassNameError`` (one line, what to do) for unusable values."""
        catalog = catalog or ClassCatalog.default()
        if not [c for c in self.classes if str(c).strip()] and not self.prompt.strip():
            raise InputError("nothing to segment: tick classes in the class picker or type a prompt")
        if self.classes:
            catalog.select([c if isinstance(c, int) else str(c) for c in self.classes])  # unknown names raise
        if self.device not in DEVICES:
            raise InputError(f"unknown device {self.device!r}; use one of {', '.join(DEVICES)}")
        if not 0.0 < float(self.threshold) < 1.0:
            raise InputError(f"threshold must be between 0 and 1 (exclusive), got {self.threshold}")
        if self.overlap is not None and not 0.0 <= float(self.overlap) < 1.0:
            raise InputError(f"overlap must be at least 0 and below 1, got {self.overlap}")
        if not str(self.model).strip():
            raise InputError("no model chosen: pick a model or a checkpoint file")

    def commandArguments(self, catalog: ClassCatalog | None = None) -> list[str]:
        """Arguments of ``universalseg segment`` for these parameters (input and outputs excluded)."""
        catalog = catalog or ClassCatalog.default()
        args: list[str] = []
        wanted = [c if isinstance(c, int) else str(c).strip() for c in self.classes]
        wanted = [c for c in wanted if c != ""]
        if any(isinstance(c, str) and c.lower() == "all" for c in wanted):
            args += ["--classes", "all"]
        elif wanted:
            args += ["--classes", ",".join(info.file_stem for info in catalog.select(wanted))]
        if self.prompt.strip():
            args += ["--prompt", self.prompt.strip()]
        args += ["--model", str(self.model).strip(), "--device", self.device]
        if self.acceptLicence:
            args.append("--accept-licence")
        if self.fast:
            args.append("--fast")
        if self.overlap is not None:
            args += ["--overlap", repr(float(self.overlap))]
        args += ["--threshold", repr(float(self.threshold))]
        if not self.postprocess:
            args.append("--no-postprocess")
        else:
            for flag, on in (
                ("--no-largest-component", self.largestComponent),
                ("--no-lung-split", self.lungSplit),
                ("--no-portal-vein-filter", self.portalVeinFilter),
                ("--no-tumor-filter", self.tumorFilter),
            ):
                if not on:
                    args.append(flag)
        return args

