"""The region step: full-resolution windows only where the requested classes are (``--no-roi`` switches it off).

1. **Locate** (:func:`locate`): the same model over the whole scan on a grid twice as coarse (the preprocessed
   volume average-pooled by 2), windows without overlap, the backbone in bfloat16 where the CPU has it, a low
   threshold. On a 3 mm model and a chest CT that is 1 window instead of 18.
2. **Boxes**: each class found gets its bounding box on the model's grid, padded by ``margin_mm``; a class the
   localiser does not find gets the whole scan. An organ that keeps only its largest component in post-processing
   is boxed around the localiser's largest component when that one clearly dominates (``DOMINANT``). When the boxes reach most of the scan's windows anyway, the
   normal run goes ahead without them.
3. **Run** (:func:`predict_masks_in_boxes`): the segmenter runs only the windows whose core reaches a box
   (``SlidingWindowSegmenter.predict_masks(boxes=...)``; the core leaves out the outer quarter of a window at
   overlap 0.5, where its blending weight is below 0.14 of its centre's). The margin is at least that inset, so
   everything the localiser found gets the full run's mask bit for bit; only the margin is blended from fewer
   windows.
4. **Check**: a mask that touches a side of its box that is not the scan's edge may go on beyond it (the localiser
   saw it smaller, e.g. the liver dome on a coarse grid): that side moves out by twice the margin and the class
   runs again, until nothing touches or the box is the whole scan; a class found by the localiser but empty in its
   box runs again on the whole scan.

What can still differ from the full run: parts of a mask that are not connected to what the box holds (a stray
false positive far from the organ), which the published post-processing drops for those organs anyway.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .inferer import Box, SlidingWindowSegmenter, WindowLayout
from .networks.universal_model import UniversalModel

#: Probability above which the localiser counts a voxel (low: a box too large costs windows, one too small a rerun).
LOCATE_THRESHOLD = 0.2
#: Padding of each located box (mm on every side; at least the windows' core inset, see margin_voxels).
MARGIN_MM = 30.0
#: Below this share of the scan's windows the boxes are used; above it the normal run is as cheap.
WORTH_IT = 0.85
#: A class that keeps its largest component is boxed around the localiser's largest one when it is this many times
#: the next (else around all of them).
DOMINANT = 4.0
#: How many times a touching box may grow before its class runs on the whole scan.
MAX_GROWTH = 3


@dataclass
class RegionReport:
    """What the region step did, for the summary (``settings.region``). Boxes are on the preprocessed grid,
    ``[[x0, x1], [y0, y1], [z0, z1]]`` half-open, by class index (``None``: the whole scan)."""

    used: bool
    reason: str
    windows_full: int = 0
    windows_run: int = 0
    locate_windows: int = 0
    boxes: dict[int, Box | None] = field(default_factory=dict)
    regrown: list[int] = field(default_factory=list)
    seconds: float = 0.0  # in the localiser

    def to_json(self) -> dict[str, Any]:
        return {
            "used": self.used,
            "reason": self.reason,
            "windows_full": self.windows_full,
            "windows_run": self.windows_run,
            "locate_windows": self.locate_windows,
            "boxes": {str(k): None if b is None else [list(r) for r in b] for k, b in self.boxes.items()},
            "regrown": list(self.regrown),
        }


def _box_of(mask: np.ndarray) -> Box | None:
    """Bounding box of a bool (X, Y, Z) mask, or None when it is empty."""
    ranges = []
    for axis in range(3):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
        if len(hit) == 0:
            return None
        ranges.append((int(hit[0]), int(hit[-1]) + 1))
    return tuple(ranges)  # type: ignore[return-value]


def _pad(box: Box, margin: Sequence[int], shape: Sequence[int]) -> Box | None:
    """``box`` grown by ``margin`` voxels per axis, clipped to ``shape``; None when that is the whole volume."""
    out = tuple((max(a - m, 0), min(b + m, s)) for (a, b), m, s in zip(box, margin, shape))
    return None if all(a == 0 and b == s for (a, b), s in zip(out, shape)) else out  # type: ignore[return-value]


def _dominant_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of ``mask`` when it is at least ``DOMINANT`` times the next one, else
    ``mask``."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3), dtype=bool))
    if n < 2:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    first, second = np.sort(sizes)[::-1][:2]
    return labels == (int(np.argmax(sizes)) + 1) if first >= DOMINANT * second else mask


def locate(
    model: UniversalModel,
    image: torch.Tensor,
    class_embeddings: torch.Tensor,
    margin: Sequence[int],
    *,
    roi_size: Sequence[int],
    keeps_largest: Sequence[bool] = (),
    device: torch.device | str = "cpu",
    backend: str = "auto",
    cancel=None,
) -> tuple[list[Box | None], int]:
    """Where each class is: one box per class on ``image``'s grid (padded by ``margin`` voxels; None: not found, or
    the whole volume), and the number of windows the localiser ran.

    ``image`` (1, 1, X, Y, Z), the preprocessed volume; ``class_embeddings`` (K, 512). ``keeps_largest[k]``: class k
    keeps only its largest component in post-processing, so its box may hold only the localiser's clearly largest
    component (``DOMINANT`` times the next; a stray false positive elsewhere would only be dropped later)."""
    shape = tuple(int(s) for s in image.shape[2:])
    coarse = F.avg_pool3d(image.float(), kernel_size=2, stride=2, ceil_mode=True)
    segmenter = SlidingWindowSegmenter(
        model,
        roi_size=roi_size,
        overlap=0.0,
        device=device,
        cancel=cancel,
        backend=backend,
        precision="bfloat16",  # only where to look depends on it; the masks come from the normal run
    )
    found = segmenter.predict_masks(coarse, class_embeddings, LOCATE_THRESHOLD).numpy()
    boxes: list[Box | None] = []
    for k, mask in enumerate(found):
        box = _box_of(_dominant_component(mask) if k < len(keeps_largest) and keeps_largest[k] else mask)
        if box is None:
            boxes.append(None)
            continue
        fine = tuple((2 * a, min(2 * b, s)) for (a, b), s in zip(box, shape))
        boxes.append(_pad(fine, margin, shape))  # type: ignore[arg-type]
    return boxes, segmenter.windows_run


def _touches_inner_side(mask: np.ndarray, box: Box, shape: Sequence[int]) -> list[tuple[int, int]]:
    """The sides (axis, 0 = low / 1 = high) of ``box`` that ``mask`` reaches and that are not the volume's edge."""
    sides = []
    for axis, ((a, b), s) in enumerate(zip(box, shape)):
        inner = mask[tuple(slice(lo, hi) for lo, hi in box)]
        if a > 0 and inner.take(0, axis=axis).any():
            sides.append((axis, 0))
        if b < s and inner.take(inner.shape[axis] - 1, axis=axis).any():
            sides.append((axis, 1))
    return sides


def _grow(box: Box, sides: Sequence[tuple[int, int]], step: Sequence[int], shape: Sequence[int]) -> Box | None:
    grown = [list(r) for r in box]
    for axis, side in sides:
        if side == 0:
            grown[axis][0] = max(grown[axis][0] - step[axis], 0)
        else:
            grown[axis][1] = min(grown[axis][1] + step[axis], shape[axis])
    out = tuple((a, b) for a, b in grown)
    return None if all(a == 0 and b == s for (a, b), s in zip(out, shape)) else out  # type: ignore[return-value]


class RegionRun(NamedTuple):
    masks: torch.Tensor  # bool (K, X, Y, Z)
    boxes: list[Box | None]  # the final box of each class
    regrown: list[int]  # channels that ran again
    windows: int  # windows run in all
    network_seconds: float


def predict_masks_in_boxes(
    segmenter: SlidingWindowSegmenter,
    image: torch.Tensor,
    class_embeddings: torch.Tensor,
    thresholds: Sequence[float],
    boxes: list[Box | None],
    margin: Sequence[int],
    uncertain_band: tuple[float, float] | None = None,
) -> RegionRun:
    """The segmenter's masks (K, X, Y, Z) with each class computed inside its box, boxes regrown until no mask
    touches an inner side (see the module docstring). With ``uncertain_band``, ``segmenter.uncertain`` holds the
    uncertain voxels of the same runs (see ``predict_masks``)."""
    shape = tuple(int(s) for s in image.shape[2:])
    masks = segmenter.predict_masks(image, class_embeddings, thresholds, boxes=boxes, uncertain_band=uncertain_band)
    uncertain = segmenter.uncertain
    windows, network = segmenter.windows_run, segmenter.timings["network"]
    boxes = list(boxes)
    regrown: set[int] = set()
    for round_ in range(MAX_GROWTH + 1):
        redo: dict[int, Box | None] = {}
        for c, box in enumerate(boxes):
            if box is None:
                continue
            mask = masks[c].numpy()
            if not mask.any():
                redo[c] = None  # found by the localiser, not here: the whole scan decides
                continue
            sides = _touches_inner_side(mask, box, shape)
            if sides:  # still touching after MAX_GROWTH growths: the whole scan
                redo[c] = _grow(box, sides, [2 * m * 2**round_ for m in margin], shape) if round_ < MAX_GROWTH else None
        if not redo:
            break
        channels = sorted(redo)
        again = segmenter.predict_masks(
            image,
            class_embeddings[channels],
            [thresholds[c] for c in channels],
            boxes=[redo[c] for c in channels],
            uncertain_band=uncertain_band,
        )
        windows, network = windows + segmenter.windows_run, network + segmenter.timings["network"]
        for n, c in enumerate(channels):
            masks[c] = again[n]
            boxes[c] = redo[c]
            if uncertain is not None and segmenter.uncertain is not None:
                uncertain.packed[c] = segmenter.uncertain.packed[n]
        regrown.update(channels)
    segmenter.uncertain = uncertain
    return RegionRun(masks, boxes, sorted(regrown), windows, network)


def margin_voxels(layout: WindowLayout, spacing_mm: Sequence[float], margin_mm: float = MARGIN_MM) -> tuple[int, ...]:
    """Padding of a located box (voxels per axis): ``margin_mm``, and at least the layout's window core inset, so
    that everything the localiser found lies where the masks are the full run's (see ``predict_masks``)."""
    return tuple(max(int(np.ceil(margin_mm / s)), d) for s, d in zip(spacing_mm, layout.core_inset))


def worth_it(layout: WindowLayout, boxes: Sequence[Box | None]) -> bool:
    """True when the boxes save windows: they need under ``WORTH_IT`` of the scan's windows."""
    return bool(layout.touching(boxes, layout.core_inset).sum() < WORTH_IT * len(layout))


__all__ = ["RegionReport", "locate", "predict_masks_in_boxes", "worth_it", "margin_voxels"]
