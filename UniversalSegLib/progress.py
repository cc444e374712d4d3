"""Progress of one segmentation, as a typed message (no free text to parse).

The engine reports a :class:`Progress` at each stage and after each window; the CLI renders it as a bar or as JSON
lines for the Slicer module, benchmarks time the stages from ``stage``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

#: The stages of a run, in order, and the share of the overall progress each takes (windows dominate the time).
STAGES: dict[str, tuple[float, float]] = {
    "read": (0.0, 0.03),
    "preprocess": (0.03, 0.08),
    "windows": (0.08, 0.85),
    "postprocess": (0.85, 0.9),
    "resample": (0.9, 1.0),
}


@dataclass(frozen=True)
class Progress:
    """Where a run is: ``stage`` (a key of :data:`STAGES`), ``fraction`` of the whole run in [0, 1], and ``done`` of
    ``total`` steps of this stage (windows, or masks resampled) when it counts them."""

    stage: str
    fraction: float
    done: int | None = None
    total: int | None = None

    @classmethod
    def at(cls, stage: str, done: int | None = None, total: int | None = None) -> "Progress":
        """The message for ``done`` of ``total`` steps into ``stage`` (its start when not counted)."""
        lo, hi = STAGES[stage]
        part = 0.0 if not total else min(max((done or 0) / total, 0.0), 1.0)
        return cls(stage, lo + (hi - lo) * part, done, total)

    @property
    def text(self) -> str:
        """For people: "windows 3/27", "preprocess", "done" (the resample stage's last step)."""
        if self.stage == "resample" and self.fraction >= 1.0:
            return "done"
        return f"{self.stage} {self.done}/{self.total}" if self.total else self.stage


ProgressCallback = Callable[[Progress], None]
