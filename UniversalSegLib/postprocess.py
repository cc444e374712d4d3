"""Anatomical post-processing of thresholded masks: the published steps of the Universal Model, reproduced.

What upstream does (github ljwztc/CLIP-Driven-Universal-Model, ``utils/utils.py`` as used by the current
``pred_pseudo.py``: ``organ_post_process`` and its helpers, run on the thresholded masks of all 32 classes in the
preprocessed space) and what :func:`postprocess` does by default, step by step (1-based catalog indices):

* **Largest component** (``largest_component``): classes 1-9, 11 (pancreas), 12-14 and 18-25 keep their largest
  26-connected component (``cc3d``; ties go to the component whose first voxel comes first in C order, which is
  upstream's stable sort over cc3d's label order).
* **Portal/splenic vein** (``portal_vein``, needs 11): class 10 is cleared in every axial slice below the lowest
  slice of the pancreas' largest component: ``mask[:, :, :z_min] = 0`` along the third (RAS z, inferior -> superior)
  array axis.
* **Lungs** (``lungs``, needs both 16 and 17): the two channels are merged, the two largest 26-connected components of
  the union are kept, and the one with the smaller mean index along the first (RAS x) axis becomes the left lung (17),
  the other the right lung (16): in RAS array order the x index grows towards the patient's right (equal means: the
  larger component is the right lung). No volume check: a tiny second component still becomes a lung.
* **Tumours in their organs** (``tumors_in_parents``, needs the parents): kidney tumour (26) is kept only inside the
  two largest components of right + left kidney (2, 3), liver tumour (27) inside the largest component of the liver
  (6); the organ mask is first closed and then dilated with a 5x5x5 cube (``scipy.ndimage.binary_closing`` /
  ``binary_dilation``, ``border_value=0``, one iteration each). Parents are taken as thresholded, not
  post-processed, as upstream does; an empty parent removes the tumour.
* Unchanged: hepatic vessel (15), tumours 28-31 and kidney cyst (32).

This reproduces the masks of ``../shared/reference/pipeline/post`` (all 32 classes, preprocessed-space voxel counts of
its summary.json). Where upstream fails or destroys the result, this module does the sensible thing instead:

* no pancreas voxel: upstream crashes (``np.min`` of an empty array); here the portal vein is kept as thresholded.
* the lung union has one component (touching lungs, or one lung in the field of view): upstream clears both lungs;
  here both lung channels are kept as thresholded (the model's own labels, all inside that component). No lung
  voxel: both stay empty, as upstream.

Options beyond the published steps, off by default:

* ``lung_separation``: the lung volume check of an earlier upstream revision (commented out in the current one):
  when one lung is more than 4 times the other, the bigger one is tested with the halves of the x axis
  (``mid = X // 2``): more than 4:1 ((n + 1) ratio) in the right half means "only a right lung" (left cleared), in
  the left half "only a left lung"; otherwise z slices of the bigger mask whose area exceeds both a centred 20-slice
  moving mean + 2 std and the 7-slice moving mean + 200 voxels are removed from the lung channels and the split is
  redone, and without such slices the bigger mask is eroded (3x3x3 cube) until it falls apart into two components
  within 4:1, which grow back into the eroded rim by Euclidean distance and get their holes filled; repeated while
  the lungs stay more than 4:1 apart. It separates touching lungs that the plain split gives as one huge "left" lung
  and a speck. If the erosion empties the mask the plain split is used, as in that revision; where that revision
  crashes (fewer than two components after slice removal) or loops forever (``MAX_LUNG_ROUNDS``), the plain split
  is kept.
* ``tumor_filter``: the tumour filter of an earlier upstream revision: at most ``TUMOR_MAX_COMPONENTS`` components,
  each of more than ``TUMOR_MIN_VOXELS`` voxels of the 1.5 mm grid (after the parent-organ step).
* ``fill_holes``: 3-D hole filling of every output mask (e.g. a liver mask then includes an enclosed tumour).

Arrays are boolean, shape (X, Y, Z) in MONAI's RAS array order of the preprocessed 1.5 mm image (the grid the published
steps ran on; the voxel counts above assume it). Work is done on bounding-box crops, and masks a step does not change
are returned as the same array objects (not copied).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import Any, Iterable, Mapping

import cc3d
import numpy as np
from scipy import ndimage

from UniversalSegLib.catalog import ClassCatalog
from UniversalSegLib.errors import InputError

__all__ = [
    "PostprocessOptions",
    "dependencies",
    "postprocess",
    "largest_components",
    "LARGEST_COMPONENT_CLASSES",
    "TUMOR_PARENTS",
    "TUMOR_MAX_COMPONENTS",
    "TUMOR_MIN_VOXELS",
    "MAX_LUNG_ROUNDS",
]

NUM_CLASSES = 32
PORTAL_VEIN, PANCREAS, RIGHT_LUNG, LEFT_LUNG = 10, 11, 16, 17
#: Classes that keep their largest 26-connected component (upstream's "rest organ index" list, plus pancreas).
LARGEST_COMPONENT_CLASSES: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 18, 19, 20, 21, 22, 23, 24, 25)
#: The tumours upstream keeps inside their parent organs (its TUMOR_ORGAN step runs for these two only; the catalog
#: names parents for more lesion classes, which the published steps leave unchanged).
PARENT_FILTERED_TUMORS: tuple[int, ...] = (26, 27)


def tumor_parents(catalog: ClassCatalog, tumors: Iterable[int] = PARENT_FILTERED_TUMORS) -> dict[int, tuple[int, ...]]:
    """Tumour -> the parent organs the catalog names for it (``parents`` in ``classes.json``), for ``tumors``."""
    return {t: tuple(catalog[t].parents) for t in tumors}


#: Tumour -> parent organs it is kept inside, from the catalog's ``parents``: {26: (2, 3), 27: (6,)}.
TUMOR_PARENTS: dict[int, tuple[int, ...]] = tumor_parents(ClassCatalog.default())
#: Optional ``tumor_filter`` (upstream TUMOR_NUM / TUMOR_SIZE): max components, min voxels (exclusive) per tumour class.
TUMOR_MAX_COMPONENTS: dict[int, int] = {26: 5, 27: 20, 28: 1, 29: 10, 30: 10, 31: 3, 32: 20}
TUMOR_MIN_VOXELS: dict[int, int] = {26: 80, 27: 20, 28: 100, 29: 80, 30: 30, 31: 100, 32: 20}
#: Bound on the ``lung_separation`` loop "lungs still more than 4:1 apart", which upstream left unbounded.
MAX_LUNG_ROUNDS = 8

_CUBE5 = 5  # closing / dilation cube of the tumour step
_LUNG_RATIO = 4.0


@dataclass(frozen=True)
class PostprocessOptions:
    """Which post-processing steps run. The defaults are exactly the published steps (see the module docstring).

    ``enabled=False`` switches everything off (``--no-postprocess``); each step can also be switched off alone.
    ``lung_separation`` (acts only with ``lungs``), ``tumor_filter`` and ``fill_holes`` go beyond the published
    steps and are off by default.

    The request (:class:`UniversalSegLib.request.SegmentationRequest`, the CLI flags and the Slicer module) names
    the switches after what they do: ``keep_largest_component`` (``largest_component``), ``split_lungs``
    (``lungs``), ``separate_lungs`` (``lung_separation``), ``clear_portal_vein_below_pancreas`` (``portal_vein``),
    ``keep_tumors_inside_organs`` (``tumors_in_parents``), ``filter_small_tumors`` (``tumor_filter``),
    ``fill_holes``; ``postprocess`` is ``enabled``.
    """

    enabled: bool = True
    largest_component: bool = True
    lungs: bool = True
    lung_separation: bool = False
    portal_vein: bool = True
    tumors_in_parents: bool = True
    tumor_filter: bool = False
    fill_holes: bool = False

    @classmethod
    def none(cls) -> "PostprocessOptions":
        """Every step off: masks come back as thresholded."""
        return cls(**{f.name: False for f in fields(cls)})


# ---------------------------------------------------------------------------------------------------------- API
def dependencies(classes: Iterable[int], options: PostprocessOptions = PostprocessOptions()) -> set[int]:
    """Catalog indices, beyond ``classes``, whose masks the enabled steps need to post-process ``classes``.

    Kidney tumour (26) needs both kidneys (2, 3), liver tumour (27) the liver (6), portal vein (10) the pancreas (11)
    and each lung (16, 17) the other one. Returns an empty set when nothing else is needed.
    """
    wanted = {_check_index(c) for c in classes}
    if not options.enabled:
        return set()
    need: set[int] = set()
    if options.tumors_in_parents:
        for tumor, parents in TUMOR_PARENTS.items():
            if tumor in wanted:
                need.update(parents)
    if options.portal_vein and PORTAL_VEIN in wanted:
        need.add(PANCREAS)
    if options.lungs and wanted & {RIGHT_LUNG, LEFT_LUNG}:
        need.update((RIGHT_LUNG, LEFT_LUNG))
    return need - wanted


def steps_for_model(
    model_classes: Iterable[int], options: PostprocessOptions = PostprocessOptions()
) -> PostprocessOptions:
    """``options`` without the steps that need a class the model does not provide (e.g. a model offering the right
    lung but not the left cannot run the lung split; its right lung is kept as thresholded)."""
    have = {int(c) for c in model_classes}
    if not options.enabled:
        return options
    opts = options
    if any(tumor in have and not set(parents) <= have for tumor, parents in TUMOR_PARENTS.items()):
        opts = replace(opts, tumors_in_parents=False)
    if PORTAL_VEIN in have and PANCREAS not in have:
        opts = replace(opts, portal_vein=False)
    if (RIGHT_LUNG in have) != (LEFT_LUNG in have):
        opts = replace(opts, lungs=False)
    return opts


def postprocess(
    masks: Mapping[int, np.ndarray], options: PostprocessOptions = PostprocessOptions()
) -> dict[int, np.ndarray]:
    """Apply the enabled post-processing steps to thresholded masks.

    Args:
        masks: catalog index (1..32) -> boolean array (X, Y, Z), MONAI RAS array order of the preprocessed 1.5 mm
            image; all arrays the same shape. It must hold what :func:`dependencies` names for its keys.
        options: which steps run (default: the published steps).

    Returns:
        A new dict with the same keys. Masks a step changed are new arrays; the others are the input arrays
        themselves (boolean input is not copied). The input masks are never modified.
    """
    out = _validated(masks)
    if not options.enabled or not out:
        return out
    missing = dependencies(out.keys(), options)
    if missing:
        raise InputError(
            f"post-processing needs class(es) {sorted(missing)} in the masks for class(es) {sorted(out)}; "
            "compute them too (see postprocess.dependencies) or switch that step off"
        )
    raw = dict(out)  # upstream reads the thresholded masks for every step (parents, lungs), never the processed ones

    if options.largest_component:
        for c in LARGEST_COMPONENT_CLASSES:
            if c in out:
                out[c] = largest_components(raw[c], 1)

    if options.portal_vein and PORTAL_VEIN in out:
        pancreas = out[PANCREAS] if options.largest_component else largest_components(raw[PANCREAS], 1)
        out[PORTAL_VEIN] = _clear_below(raw[PORTAL_VEIN], pancreas)

    if options.lungs and RIGHT_LUNG in out:
        out[RIGHT_LUNG], out[LEFT_LUNG] = _lungs(raw[RIGHT_LUNG], raw[LEFT_LUNG], options.lung_separation)

    if options.tumors_in_parents:
        for tumor, parents in TUMOR_PARENTS.items():
            if tumor in out:
                organ = _merged_top_components([raw[p] for p in parents])
                out[tumor] = _inside_organ(raw[tumor], organ)

    if options.tumor_filter:
        for tumor, k in TUMOR_MAX_COMPONENTS.items():
            if tumor in out:
                out[tumor] = largest_components(out[tumor], k, min_voxels=TUMOR_MIN_VOXELS[tumor])

    if options.fill_holes:
        for c in out:
            out[c] = _fill_holes(out[c])
    return out


def largest_components(mask: np.ndarray, k: int, min_voxels: int = 0) -> np.ndarray:
    """The ``k`` largest 26-connected components of ``mask`` that have more than ``min_voxels`` voxels.

    Upstream's ``extract_topk_largest_candidates``: components sorted by size, ties by cc3d label (first voxel in C
    order). Returns ``mask`` itself when every component is kept.
    """
    box = _bbox(mask)
    if box is None:
        return mask
    labels, n = _label(mask[box])
    counts = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    order = np.argsort(-counts, kind="stable")[:k]
    keep = order[counts[order] > min_voxels] + 1
    if len(keep) == n:
        return mask
    out = np.zeros(mask.shape, dtype=bool)
    if len(keep):
        out[box] = labels == keep[0] if len(keep) == 1 else np.isin(labels, keep)
    return out


# ---------------------------------------------------------------------------------------------------------- steps
def _clear_below(vein: np.ndarray, pancreas: np.ndarray) -> np.ndarray:
    """Upstream ``PSVein_post_process``: clear ``vein`` below (smaller z than) the lowest slice of ``pancreas``."""
    z = np.flatnonzero(pancreas.any(axis=(0, 1)))
    if z.size == 0:
        return vein  # no pancreas: upstream crashes; keep the vein as thresholded (documented deviation)
    if z[0] == 0 or not vein[:, :, : z[0]].any():
        return vein  # nothing below the pancreas
    out = vein.copy()
    out[:, :, : z[0]] = False
    return out


def _merged_top_components(parents: list[np.ndarray]) -> np.ndarray:
    """Upstream ``merge_and_top_organ``: union of the parent masks, its ``len(parents)`` largest components."""
    union = parents[0] if len(parents) == 1 else np.logical_or.reduce(parents)
    return largest_components(union, len(parents))


def _inside_organ(tumor: np.ndarray, organ: np.ndarray) -> np.ndarray:
    """Upstream ``organ_region_filter_out``: keep ``tumor`` inside the 5x5x5 closing, then 5x5x5 dilation, of ``organ``."""
    # Closing + dilation reach at most 4 voxels beyond the organ; a margin of 5 keeps the crop exact (borders count as 0).
    box = _bbox(organ, margin=_CUBE5)
    if box is None:
        return np.zeros(tumor.shape, dtype=bool) if tumor.any() else tumor
    region = _dilate(_erode(_dilate(organ[box], _CUBE5), _CUBE5), _CUBE5)
    inside = tumor[box] & region
    if np.count_nonzero(inside) == np.count_nonzero(tumor):
        return tumor
    out = np.zeros(tumor.shape, dtype=bool)
    out[box] = inside
    return out


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes`` (6-connected background), on the mask's bounding box."""
    box = _bbox(mask, margin=1)  # a 1-voxel background rim keeps the crop's outside connected to the border
    if box is None:
        return mask
    filled = ndimage.binary_fill_holes(mask[box])
    if np.count_nonzero(filled) == np.count_nonzero(mask[box]):
        return mask
    out = mask.copy()
    out[box] = filled
    return out


# ---------------------------------------------------------------------------------------------------------- lungs
class _NoSplit(Exception):
    """Fewer than two lung components where upstream indexes the second one (its IndexError)."""


def _lungs(right: np.ndarray, left: np.ndarray, separation: bool) -> tuple[np.ndarray, np.ndarray]:
    """Upstream's lung step; with ``separation`` the earlier revision's volume check. Returns (right, left)."""
    union = right | left
    try:
        new_left, new_right = _split_two_largest(union)
    except _NoSplit:
        # No lung: both stay empty, as upstream. One component: upstream clears both lungs; keeping the model's own
        # right/left channels (all inside that one component) is the sensible outcome.
        return right, left
    if not separation:
        return new_right, new_left

    rs, ls = int(np.count_nonzero(new_right)), int(np.count_nonzero(new_left))
    big = new_right if rs > ls else new_left
    if _ratio(max(rs, ls), min(rs, ls)) <= _LUNG_RATIO:
        return new_right, new_left
    mid = big.shape[0] // 2
    low_x, high_x = np.count_nonzero(big[:mid]), np.count_nonzero(big[mid:])
    empty = np.zeros(big.shape, dtype=bool)
    if (high_x + 1) / (low_x + 1) > _LUNG_RATIO:  # bigger mask lies in the patient's right half: only a right lung
        return big, empty
    if (low_x + 1) / (high_x + 1) > _LUNG_RATIO:  # ... in the left half: only a left lung
        return empty, big

    # The revision's "anomaly detection". It zeroed slices of the lung channels in place; work on copies, lazily.
    work: dict[str, Any] = {"right": right, "left": left, "copied": False}
    try:
        res_left, res_right = _lung_anomaly(work, big)
        for _ in range(MAX_LUNG_ROUNDS):
            rs, ls = int(np.count_nonzero(res_right)), int(np.count_nonzero(res_left))
            if not (_ratio(rs, ls) > _LUNG_RATIO or _ratio(ls, rs) > _LUNG_RATIO):
                return res_right, res_left
            res_left, res_right = _lung_anomaly(work, res_right if rs > ls else res_left)
        return new_right, new_left  # did not settle (that revision would loop on): keep the plain split
    except _NoSplit:
        try:  # the revision's fallback: the plain split, on the lung channels as the anomaly step left them
            fb_left, fb_right = _split_two_largest(work["right"] | work["left"])
        except _NoSplit:  # the revision crashes here; keep the split from before the anomaly detection
            return new_right, new_left
        return fb_right, fb_left


def _ratio(a: float, b: float) -> float:
    """a / b with numpy's semantics for a zero divisor (inf, or nan for 0 / 0), as upstream's float sums give."""
    if b == 0:
        return math.inf if a > 0 else math.nan
    return a / b


def _split_two_largest(union: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Upstream ``lung_post_process``: two largest components of ``union`` as (left, right) by mean x index."""
    box = _bbox(union)
    if box is None:
        raise _NoSplit
    left_c, right_c = _two_largest_by_x(union[box], x_offset=box[0].start)
    left, right = np.zeros(union.shape, dtype=bool), np.zeros(union.shape, dtype=bool)
    left[box], right[box] = left_c, right_c
    return left, right


def _two_largest_by_x(mask: np.ndarray, x_offset: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(left, right) = the two largest components of ``mask``; left has the smaller mean x (ties: the second)."""
    labels, n = _label(mask)
    if n < 2:
        raise _NoSplit
    counts = np.bincount(labels.ravel(), minlength=n + 1)[1:]
    one, two = np.argsort(-counts, kind="stable")[:2] + 1
    a, b = labels == one, labels == two
    if _mean_x(a, x_offset) < _mean_x(b, x_offset):
        return a, b
    return b, a


def _mean_x(mask: np.ndarray, x_offset: int) -> float:
    per_x = np.count_nonzero(mask, axis=(1, 2)).astype(np.int64)
    xs = np.arange(mask.shape[0], dtype=np.int64) + x_offset
    return float(int((per_x * xs).sum()) / int(per_x.sum()))  # exact integer sums, one rounding, like np.mean


def _lung_anomaly(work: dict, target: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Upstream ``anomly_detection`` on the bigger lung mask ``target``; returns (left, right)."""
    area = np.count_nonzero(target, axis=(0, 1)).astype(np.float64)  # voxels per z slice
    slices = np.flatnonzero(area)
    values = area[slices]
    sma20, std20 = _rolling_centered(values, 20)
    sma7, _ = _rolling_centered(values, 7)
    with np.errstate(invalid="ignore"):
        flagged = values > sma20 + 2 * std20  # NaN std (single slice) compares False, as in pandas
    if flagged.any():
        real = slices[flagged & (values > sma7 + 200)]
        if real.size:
            if not work["copied"]:
                work.update(right=work["right"].copy(), left=work["left"].copy(), copied=True)
            work["right"][:, :, real] = False
            work["left"][:, :, real] = False
            return _split_two_largest(work["right"] | work["left"])
    return _erosion_split(target)


def _rolling_centered(values: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """pandas ``Series.rolling(window, min_periods=1, center=True)`` mean and std (ddof=1; NaN for one value)."""
    n = len(values)
    offset = (window - 1) // 2
    mean, std = np.empty(n), np.full(n, np.nan)
    for i in range(n):
        w = values[max(i + 1 + offset - window, 0) : min(i + 1 + offset, n)]
        mean[i] = w.mean()
        if len(w) > 1:
            std[i] = w.std(ddof=1)
    return mean, std


def _erosion_split(lung: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Upstream ``find_best_iter_and_masks``: erode until two components within 4:1, grow them back; (left, right)."""
    box = _bbox(lung, margin=1)
    if box is None:
        raise _NoSplit
    crop = lung[box]
    x0 = box[0].start
    eroded = crop
    # erosion with iterations=k equals k single erosions, so erode step by step instead of from scratch
    while True:
        eroded = _erode(eroded, 3)
        try:
            left, right = _two_largest_by_x(eroded, x0)
        except _NoSplit:
            if eroded.any():
                continue  # one component: erode further
            raise  # eroded away without splitting: upstream's IndexError
        ls, rs = np.count_nonzero(left), np.count_nonzero(right)
        if not (ls / rs > _LUNG_RATIO or rs / ls > _LUNG_RATIO):
            break
    rim = crop & ~left & ~right
    if rim.any():
        d_left = ndimage.distance_transform_edt(~left)
        d_right = ndimage.distance_transform_edt(~right)
        left = left | (rim & (d_left < d_right))
        right = right | (rim & (d_right < d_left))
        del d_left, d_right
    out_left, out_right = np.zeros(lung.shape, dtype=bool), np.zeros(lung.shape, dtype=bool)
    out_left[box] = ndimage.binary_fill_holes(left)
    out_right[box] = ndimage.binary_fill_holes(right)
    return out_left, out_right


# ---------------------------------------------------------------------------------------------------------- helpers
def _label(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """26-connected cc3d labels. C order, as upstream's arrays: cc3d numbers components in scan order of the memory
    layout, and that order breaks ties between equal-sized components."""
    return cc3d.connected_components(np.ascontiguousarray(mask), connectivity=26, return_N=True)


def _dilate(mask: np.ndarray, size: int) -> np.ndarray:
    """Binary dilation by a size^3 cube, outside = 0 (= scipy ``binary_dilation`` with a cube; separable, fast)."""
    return ndimage.maximum_filter(mask.view(np.uint8), size=size, mode="constant", cval=0).view(bool)


def _erode(mask: np.ndarray, size: int) -> np.ndarray:
    """Binary erosion by a size^3 cube, outside = 0 (= scipy ``binary_erosion`` with a cube, ``border_value=0``)."""
    return ndimage.minimum_filter(mask.view(np.uint8), size=size, mode="constant", cval=0).view(bool)


def _bbox(mask: np.ndarray, margin: int = 0) -> tuple[slice, slice, slice] | None:
    """Bounding box of ``mask`` grown by ``margin`` (clipped to the array), or None when empty."""
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        hit = np.flatnonzero(np.any(mask, axis=other))
        if hit.size == 0:
            return None
        box.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin, mask.shape[axis])))
    return tuple(box)  # type: ignore[return-value]


def _check_index(c: object) -> int:
    if isinstance(c, bool) or not isinstance(c, (int, np.integer)) or not 1 <= int(c) <= NUM_CLASSES:
        raise InputError(f"post-processing got class index {c!r}; use catalog indices 1..{NUM_CLASSES}")
    return int(c)


def _validated(masks: Mapping[int, np.ndarray]) -> dict[int, np.ndarray]:
    out: dict[int, np.ndarray] = {}
    shape = None
    for key, m in masks.items():
        c = _check_index(key)
        if not isinstance(m, np.ndarray) or m.ndim != 3:
            raise InputError(
                f"post-processing needs one 3-D (X, Y, Z) numpy array per class; class {c} has "
                f"{type(m).__name__} {getattr(m, 'shape', '')}"
            )
        if shape is None:
            shape = m.shape
        elif m.shape != shape:
            raise InputError(f"post-processing masks must share one shape; class {c} is {m.shape}, not {shape}")
        out[c] = m if m.dtype == bool else m != 0
    return out
