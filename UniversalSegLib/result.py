"""What a segmentation run returns: per-class masks on the input's grid, and the views built from them.

Masks are kept cropped to their bounding box so that 32 classes of a 512x512x300 CT do not need 32 full-size
arrays; full-size arrays are made one at a time when written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import SimpleITK as sitk

from .catalog import ClassCatalog, ClassInfo
from .errors import InputError

# Overlaps in the multi-label map are resolved by painting in this order: later kinds win
# (a tumor inside its organ shows as tumor). Within a kind, higher catalog index wins.
LABEL_PAINT_ORDER: tuple[str, ...] = ("organ", "vessel", "cyst", "tumor")


@dataclass(frozen=True)
class ImageGeometry:
    """Geometry of an image grid in SimpleITK terms (size and spacing in x, y, z order; LPS physical space)."""

    size: tuple[int, int, int]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of(cls, image: sitk.Image) -> "ImageGeometry":
        return cls(
            tuple(image.GetSize()), tuple(image.GetSpacing()), tuple(image.GetOrigin()), tuple(image.GetDirection())
        )

    @property
    def array_shape(self) -> tuple[int, int, int]:
        """Shape of ``sitk.GetArrayFromImage`` for this grid: (z, y, x)."""
        return (self.size[2], self.size[1], self.size[0])

    @property
    def voxel_volume_ml(self) -> float:
        return float(np.prod(self.spacing)) / 1000.0

    def to_image(self, array: np.ndarray) -> sitk.Image:
        """Wrap a (z, y, x) array as an image on this grid."""
        if tuple(array.shape) != self.array_shape:
            raise ValueError(f"array shape {array.shape} does not match grid {self.array_shape}")
        image = sitk.GetImageFromArray(array)
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image


@dataclass
class CroppedMask:
    """A binary mask on a grid, stored as its bounding box.

    ``array`` is a bool array in SimpleITK array order (z, y, x); ``start`` is the (z, y, x) index of its first voxel.
    An empty mask has an array of shape (0, 0, 0).
    """

    start: tuple[int, int, int]
    array: np.ndarray

    @classmethod
    def from_full(cls, full: np.ndarray) -> "CroppedMask":
        """Crop a full-grid (z, y, x) mask to its bounding box."""
        full = np.asarray(full, dtype=bool)
        nonzero = [np.flatnonzero(full.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
        if any(len(n) == 0 for n in nonzero):
            return cls((0, 0, 0), np.zeros((0, 0, 0), dtype=bool))
        lo = (int(nonzero[0][0]), int(nonzero[1][0]), int(nonzero[2][0]))
        hi = tuple(int(n[-1]) + 1 for n in nonzero)
        return cls(lo, np.ascontiguousarray(full[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]))

    @property
    def voxel_count(self) -> int:
        return int(np.count_nonzero(self.array))

    def slices(self) -> tuple[slice, slice, slice]:
        return tuple(slice(s, s + n) for s, n in zip(self.start, self.array.shape))  # type: ignore[return-value]

    def to_full(self, shape: tuple[int, int, int]) -> np.ndarray:
        """The mask as a full (z, y, x) uint8 array of ``shape``."""
        full = np.zeros(shape, dtype=np.uint8)
        if self.array.size:
            full[self.slices()] = self.array
        return full


@lru_cache(maxsize=1)
def volume_ranges() -> dict[str, tuple[float, float]]:
    """Catalog file stem -> (low, high) plausible volume in mL (see ``data/volume_ranges.json``)."""
    doc = json.loads((Path(__file__).parent / "data" / "volume_ranges.json").read_text(encoding="utf-8"))
    return {stem: (float(lo), float(hi)) for stem, (lo, hi) in doc["ranges_ml"].items()}


@dataclass
class SegmentationResult:
    """Per-class masks of one CT on its own (input) grid, plus what produced them.

    ``masks`` maps catalog index -> mask for every class that was asked for (dependencies computed only for
    post-processing are not included).
    """

    geometry: ImageGeometry
    masks: dict[int, CroppedMask]
    catalog: ClassCatalog
    model_name: str = ""
    model_licence: str = ""
    device: str = "cpu"
    timings: dict[str, float] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    prompt_report: list[dict[str, Any]] = field(default_factory=list)
    experimental: dict[int, str] = field(default_factory=dict)  # index -> free text, for experimental classes
    # Classes outside the catalog (experimental free-text prompts), indexed above the catalog's range.
    extra_classes: dict[int, ClassInfo] = field(default_factory=dict)
    input_path: str | None = None
    # Per class index: where the model was unsure (UniversalSegLib.uncertainty.summarise_uncertainty).
    uncertainty: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def classes(self) -> list[ClassInfo]:
        return [self.class_info(i) for i in sorted(self.masks)]

    def class_info(self, index: int) -> ClassInfo:
        if index in self.extra_classes:
            return self.extra_classes[index]
        return self.catalog[index]

    def __iter__(self) -> Iterator[tuple[ClassInfo, CroppedMask]]:
        for index in sorted(self.masks):
            yield self.class_info(index), self.masks[index]

    def mask_array(self, index: int) -> np.ndarray:
        """Full-grid (z, y, x) uint8 mask of one class."""
        return self.masks[index].to_full(self.geometry.array_shape)

    def mask_image(self, index: int) -> sitk.Image:
        return self.geometry.to_image(self.mask_array(index))

    def label_array(self) -> np.ndarray:
        """Multi-label (z, y, x) map: 0 background, value = catalog index; overlaps by ``LABEL_PAINT_ORDER``."""
        dtype = np.uint8 if max(self.masks, default=0) < 256 else np.uint16
        labels = np.zeros(self.geometry.array_shape, dtype=dtype)
        kind_rank = {k: r for r, k in enumerate(LABEL_PAINT_ORDER)}
        order = sorted(self.masks, key=lambda i: (kind_rank.get(self.class_info(i).kind, 0), i))
        for index in order:
            mask = self.masks[index]
            if mask.array.size:
                labels[mask.slices()][mask.array] = index
        return labels

    def label_image(self) -> sitk.Image:
        return self.geometry.to_image(self.label_array())

    def plausibility(self) -> list[str]:
        """One line per class whose volume lies outside its plausible adult range (``data/volume_ranges.json``).

        Too large is always reported; too small only when the mask does not touch the scan's first or last slice
        (an organ cut by the scan's edge is legitimately small)."""
        ranges = volume_ranges()
        notes = []
        voxel_ml = self.geometry.voxel_volume_ml
        depth = self.geometry.array_shape[0]
        for info, mask in self:
            bounds = ranges.get(info.file_stem)
            if bounds is None or not mask.voxel_count:
                continue
            volume = mask.voxel_count * voxel_ml
            lo, hi = bounds
            whole = mask.start[0] > 0 and mask.start[0] + mask.array.shape[0] < depth
            if volume > hi:
                notes.append(
                    f"{info.name}: {volume:.1f} mL is more than the {hi:g} mL plausible for it; check the segment"
                )
            elif whole and volume < lo:
                notes.append(
                    f"{info.name}: {volume:.1f} mL is less than the {lo:g} mL plausible for it; check the segment"
                )
        return notes

    def statistics(self, image: sitk.Image) -> list[dict[str, Any]]:
        """Per class: volume (mL), mean and median HU of ``image`` (the CT the result was made from) inside the mask,
        and the uncertain volume and surface share (see :mod:`~UniversalSegLib.uncertainty`); HU are None for an
        empty mask."""
        if tuple(image.GetSize()) != tuple(self.geometry.size):
            raise InputError(
                f"statistics need the segmented CT: its size {image.GetSize()} is not the result's {self.geometry.size}"
            )
        array = sitk.GetArrayViewFromImage(image)
        rows = []
        for info, mask in self:
            values = array[mask.slices()][mask.array] if mask.voxel_count else np.zeros(0)
            unsure = self.uncertainty.get(info.index, {})
            rows.append(
                {
                    "index": info.index,
                    "name": info.name,
                    "volume_ml": round(mask.voxel_count * self.geometry.voxel_volume_ml, 3),
                    "mean_hu": round(float(values.mean()), 1) if values.size else None,
                    "median_hu": round(float(np.median(values)), 1) if values.size else None,
                    "uncertain_ml": unsure.get("uncertain_ml"),
                    "surface_uncertain_share": unsure.get("surface_uncertain_share"),
                }
            )
        return rows

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary: per-class voxel count and volume (mL), plausibility notes, model, device, settings,
        timings."""
        voxel_ml = self.geometry.voxel_volume_ml
        classes = []
        for info, mask in self:
            count = mask.voxel_count
            entry = {
                "index": info.index,
                "name": info.name,
                "file_stem": info.file_stem,
                "voxels": count,
                "volume_ml": round(count * voxel_ml, 3),
            }
            if info.index in self.uncertainty:
                entry["uncertainty"] = self.uncertainty[info.index]
            if info.index in self.experimental:
                entry["experimental"] = True
                entry["prompt"] = self.experimental[info.index]
            classes.append(entry)
        return {
            "input": self.input_path,
            "model": self.model_name,
            "model_licence": self.model_licence,
            "device": self.device,
            "geometry": {
                "size": list(self.geometry.size),
                "spacing": list(self.geometry.spacing),
                "origin": list(self.geometry.origin),
                "direction": list(self.geometry.direction),
            },
            "settings": self.settings,
            "prompts": self.prompt_report,
            "classes": classes,
            "plausibility": self.plausibility(),
            "timings_s": {k: round(v, 3) for k, v in self.timings.items()},
        }
