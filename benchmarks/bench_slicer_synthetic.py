"""Synthetic full-size inputs for the Slicer-module benchmarks (no network, no real CT needed).

A 512x512x300 CT grid (0.8 x 0.8 x 1.5 mm) with 32 classes shaped like an abdominal result: large organs
(liver, stomach, colon, intestine, lungs), mid-size organs, long thin vessels, and small tumours inside their organs
(overlaps, so the ``.seg.nrrd`` has several layers, as the engine writes for real results).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "UniversalSeg"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from UniversalSegLib.catalog import ClassCatalog  # noqa: E402
from UniversalSegLib.result import CroppedMask, ImageGeometry, SegmentationResult  # noqa: E402

SIZE = (512, 512, 300)  # (I, J, K)
SPACING = (0.8, 0.8, 1.5)


def _ellipsoid(centre, radii) -> CroppedMask:
    """A (z, y, x) ellipsoid as a cropped mask on the (300, 512, 512) grid."""
    shape = SIZE[::-1]
    lo = [max(0, int(c - r)) for c, r in zip(centre, radii)]
    hi = [min(n, int(c + r) + 1) for c, r, n in zip(centre, radii, shape)]
    zz, yy, xx = np.ogrid[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    inside = ((zz - centre[0]) / radii[0]) ** 2 + ((yy - centre[1]) / radii[1]) ** 2 + (
        (xx - centre[2]) / radii[2]
    ) ** 2 <= 1
    return CroppedMask(tuple(lo), np.ascontiguousarray(inside))


def syntheticResult(seed: int = 0) -> SegmentationResult:
    """32 classes: kind-dependent sizes (voxels of a 0.8 mm grid), tumours inside organs."""
    catalog = ClassCatalog.default()
    rng = np.random.default_rng(seed)
    masks = {}
    for info in catalog:
        if info.kind == "vessel":
            radii = (rng.integers(80, 130), rng.integers(8, 14), rng.integers(8, 14))
        elif info.kind in ("tumor", "cyst"):
            radii = tuple(rng.integers(6, 20, size=3))
        elif info.file_stem in ("liver", "stomach", "colon", "intestine", "right_lung", "left_lung"):
            radii = (rng.integers(60, 90), rng.integers(70, 110), rng.integers(70, 110))
        else:
            radii = (rng.integers(20, 45), rng.integers(25, 50), rng.integers(25, 50))
        centre = tuple(int(rng.integers(r + 1, n - r - 1)) for r, n in zip(radii, SIZE[::-1]))
        masks[info.index] = _ellipsoid(centre, radii)
    geometry = ImageGeometry(SIZE, SPACING, (0.0, 0.0, 0.0), (1.0, 0, 0, 0, 1.0, 0, 0, 0, 1.0))
    return SegmentationResult(
        geometry=geometry,
        masks=masks,
        catalog=catalog,
        model_name="synthetic",
        model_licence="none",
        device="cpu",
        settings={"threshold": 0.5},
    )


def addVolume(scene, name: str = "CT"):
    """A 512x512x300 int16 scalar volume node on the synthetic grid (LPS geometry as ``syntheticResult``)."""
    import vtk

    image = vtk.vtkImageData()
    image.SetDimensions(*SIZE)
    image.AllocateScalars(vtk.VTK_SHORT, 1)
    image.GetPointData().GetScalars().Fill(0)
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    volume.SetAndObserveImageData(image)
    volume.SetSpacing(*SPACING)
    volume.SetOrigin(0.0, 0.0, 0.0)
    volume.SetIJKToRASDirections(-1, 0, 0, 0, -1, 0, 0, 0, 1)  # LPS identity direction, as the engine writes it
    return volume


def printReport(report: dict, path: str | None) -> None:
    """Print the benchmark's JSON report and, when ``path`` is given, also write it there."""
    import json

    text = json.dumps(report, indent=2)
    print(text)
    if path:
        Path(path).write_text(text + "\n", encoding="utf-8")
