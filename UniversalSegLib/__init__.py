"""UniversalSeg engine: the CLIP-Driven Universal Model for CT segmentation, usable without 3D Slicer.

Main entry points::

    from UniversalSegLib import segment, load_model, ClassCatalog
    result = segment("ct.nii.gz", classes="liver,spleen")
"""

from __future__ import annotations

__version__ = "0.1.0"

from .catalog import ClassCatalog, ClassInfo  # noqa: E402
from .errors import CheckpointError, ClassNameError, DownloadError, InputError, UniversalSegError  # noqa: E402


def __getattr__(name: str):
    # Heavy modules (torch, MONAI) load on first use, so `universalseg classes` and the Slicer GUI start fast.
    if name in ("load_model", "load_checkpoint", "save_checkpoint", "segment", "Engine", "SegmentationOptions"):
        from .monai_import import import_monai

        import_monai()
    if name in ("load_model", "load_checkpoint", "save_checkpoint"):
        from . import checkpoints

        return getattr(checkpoints, name)
    if name in ("segment", "Engine", "SegmentationOptions", "resolve_prompts"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "resolve_prompt":
        from .prompts import resolve_prompt

        return resolve_prompt
    if name == "SegmentationResult":
        from .result import SegmentationResult

        return SegmentationResult
    raise AttributeError(f"module 'UniversalSegLib' has no attribute {name!r}")


__all__ = [
    "ClassCatalog",
    "ClassInfo",
    "CheckpointError",
    "ClassNameError",
    "DownloadError",
    "InputError",
    "UniversalSegError",
    "load_model",
    "load_checkpoint",
    "save_checkpoint",
    "segment",
    "Engine",
    "SegmentationOptions",
    "SegmentationResult",
    "resolve_prompt",
    "resolve_prompts",
]
