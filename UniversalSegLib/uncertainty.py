"""Where the model is unsure about a class: a summary from the probabilities the engine already computes.

The segmenter marks, per class, the voxels whose blended probability lies strictly inside :data:`UNCERTAIN_BAND`
(from the same values it thresholds; no extra network pass). :func:`summarise_uncertainty` condenses them, on the
model's grid, into what a reviewer needs: how much is uncertain near the final mask, which share of the mask's
surface is uncertain, and the largest uncertain regions with their centre (LPS mm, the patient coordinates Slicer
and DICOM use) so that a viewer can jump there.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
from scipy import ndimage

#: Probabilities strictly inside this band count as uncertain (the threshold is 0.5 by default).
UNCERTAIN_BAND: tuple[float, float] = (0.2, 0.8)
#: Uncertain voxels count for a class when they are within this distance of its final mask (mm); an empty mask
#: counts all of its uncertain voxels (a missed structure).
NEAR_MM = 6.0
#: How many of the largest uncertain regions are listed.
TOP_REGIONS = 5

_CONNECTIVITY = np.ones((3, 3, 3), dtype=bool)
_RAS_TO_LPS = np.array([-1.0, -1.0, 1.0])


def _near_box(mask: np.ndarray, radius: Sequence[int]) -> tuple[slice, ...]:
    """The bounding box of ``mask`` grown by ``radius`` voxels per axis (clipped to the volume)."""
    hit = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    return tuple(slice(max(int(h[0]) - r, 0), min(int(h[-1]) + 1 + r, s)) for h, r, s in zip(hit, radius, mask.shape))


def summarise_uncertainty(
    mask: np.ndarray, uncertain: np.ndarray, spacing_mm: Sequence[float], affine_ras: np.ndarray
) -> dict[str, Any]:
    """Summary of one class. ``mask``: its final mask, ``uncertain``: its uncertain voxels, both bool (X, Y, Z) on
    the model's grid (RAS, ``spacing_mm``), whose voxel-to-RAS matrix is ``affine_ras`` (4 x 4).

    Returns ``uncertain_ml`` (uncertain volume at or near the mask), ``uncertain_share`` (of the mask's volume),
    ``surface_uncertain_share`` (share of the mask's surface voxels that are uncertain; None for an empty mask) and
    ``regions``: the largest 26-connected uncertain regions, each ``{"centre_lps_mm": [x, y, z], "ml": v}``."""
    voxel_ml = float(np.prod(spacing_mm)) / 1000.0
    mask = np.asarray(mask, dtype=bool)
    uncertain = np.asarray(uncertain, dtype=bool)
    offset = np.zeros(3)
    if mask.any():  # work in the mask's neighbourhood only
        radius = [max(int(round(NEAR_MM / s)), 1) for s in spacing_mm]
        box = _near_box(mask, radius)
        offset = np.array([b.start for b in box], dtype=float)
        mask = mask[box]
        near = ndimage.maximum_filter(mask, size=tuple(2 * r + 1 for r in radius), mode="constant")
        uncertain = uncertain[box] & near
        surface = mask & ~ndimage.binary_erosion(mask, structure=_CONNECTIVITY, border_value=0)
        surface_share: float | None = round(float((surface & uncertain).sum() / surface.sum()), 4)
    else:
        surface_share = None
    labels, count = ndimage.label(uncertain, structure=_CONNECTIVITY)
    regions = []
    if count:
        sizes = np.bincount(labels.ravel())[1:]
        top = np.argsort(-sizes, kind="stable")[:TOP_REGIONS] + 1
        centres = ndimage.center_of_mass(uncertain, labels, top)
        for label, centre in zip(top, centres):
            ras = np.asarray(affine_ras, dtype=float) @ np.array([*(np.asarray(centre) + offset), 1.0])
            regions.append(
                {
                    "centre_lps_mm": [round(float(v), 1) for v in ras[:3] * _RAS_TO_LPS],
                    "ml": round(float(sizes[label - 1]) * voxel_ml, 3),
                }
            )
    voxels = int(uncertain.sum())
    return {
        "uncertain_ml": round(voxels * voxel_ml, 3),
        "uncertain_share": round(voxels / int(mask.sum()), 4) if mask.any() else None,
        "surface_uncertain_share": surface_share,
        "regions": regions,
    }


__all__ = ["UNCERTAIN_BAND", "summarise_uncertainty"]
