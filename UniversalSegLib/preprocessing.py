"""Preprocessing as the Universal Model was trained, and its inverse for masks (MONAI transforms).

Forward: orientation RAS -> resample to 1.5 mm (bilinear) -> HU window [-175, 250] scaled to [0, 1] (clipped)
-> crop to the foreground (voxels > 0 after scaling, i.e. above -175 HU: the body).
Inverse (for masks): undo the crop, resample back with nearest neighbour, undo the orientation.

Nearest-neighbour inversion only picks, for each input voxel, one voxel of the preprocessed grid, and for the
axis-aligned resampling of ``Spacing`` that choice is separable: one index map per axis. :class:`InverseIndex`
computes those maps with MONAI's own resampling code on one line per axis, so masks are inverted by indexing, without
MONAI's full-size float64 sampling grid (about 2 GB for a 512x512x300 CT) and identically to it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, CropForeground, Orientation, ScaleIntensityRange, Spacing, SpatialResample
from monai.transforms.utils import convert_applied_interp_mode
from monai.utils import TraceKeys, get_torch_dtype_from_string

TARGET_SPACING_MM: tuple[float, float, float] = (1.5, 1.5, 1.5)
HU_WINDOW: tuple[float, float] = (-175.0, 250.0)

# SimpleITK's physical space is LPS; MONAI's affines are RAS.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def sitk_to_metatensor(image: sitk.Image) -> MetaTensor:
    """A 3-D SimpleITK image as a channel-first MetaTensor (1, X, Y, Z) float32 with its RAS affine."""
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    affine = np.eye(4)
    affine[:3, :3] = _LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    affine[:3, 3] = _LPS_TO_RAS @ np.asarray(image.GetOrigin(), dtype=np.float64)
    array = sitk.GetArrayViewFromImage(image).transpose(2, 1, 0)  # (z, y, x) -> (x, y, z)
    data = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))[None]
    return MetaTensor(data, affine=torch.as_tensor(affine, dtype=torch.float64))


def build_preprocessing(
    spacing: Sequence[float] = TARGET_SPACING_MM, hu_window: Sequence[float] = HU_WINDOW
) -> Compose:
    """The training-time preprocessing, as invertible MONAI array transforms."""
    return Compose(
        [
            Orientation(axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
            Spacing(pixdim=tuple(spacing), mode="bilinear"),
            ScaleIntensityRange(a_min=hu_window[0], a_max=hu_window[1], b_min=0.0, b_max=1.0, clip=True),
            CropForeground(allow_smaller=True),
        ]
    )


class Preprocessed:
    """A preprocessed CT and what is needed to bring masks back to the input grid.

    ``image``: (1, X, Y, Z) float32 MetaTensor in [0, 1], RAS, at the target spacing, cropped to the body.
    """

    def __init__(self, image: MetaTensor, transform: Compose) -> None:
        self.image = image
        self.transform = transform
        self._inverse_index: InverseIndex | None | bool = False  # False: not computed yet; None: not separable

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.image.shape[1:])  # type: ignore[return-value]

    def invert_mask(self, mask: np.ndarray | torch.Tensor) -> np.ndarray:
        """A (X, Y, Z) mask on the preprocessed grid -> bool (z, y, x) array on the input grid (nearest neighbour)."""
        data = torch.as_tensor(np.asarray(mask), dtype=torch.float32)[None]
        meta = MetaTensor(data, meta={k: v for k, v in self.image.meta.items() if k != "affine"})
        meta.affine = self.image.affine.clone()
        ops = convert_applied_interp_mode(self.image.applied_operations, mode="nearest", align_corners=None)
        meta.applied_operations = ops
        with torch.no_grad():
            inverted = self.transform.inverse(meta)
        return np.ascontiguousarray(np.asarray(inverted[0]).transpose(2, 1, 0) > 0.5)

    @property
    def inverse_index(self) -> "InverseIndex | None":
        """Per-axis nearest-neighbour index maps back to the input grid, or None when the inversion is not
        separable (then :meth:`invert_mask_box` uses MONAI's inverse)."""
        if self._inverse_index is False:
            self._inverse_index = InverseIndex.of(self)
        return self._inverse_index  # type: ignore[return-value]

    def invert_mask_box(self, mask: np.ndarray | torch.Tensor) -> tuple[tuple[int, int, int], np.ndarray]:
        """Like :meth:`invert_mask`, but returns only the mask's bounding box on the input grid.

        ``mask``: bool (X, Y, Z) on the preprocessed grid. Returns ``(start, box)``: ``start`` the (z, y, x) index of
        the box's first voxel, ``box`` a bool (z, y, x) array (shape (0, 0, 0) for an empty mask). Equal to cropping
        :meth:`invert_mask`'s result to its bounding box, at a fraction of its time and memory.
        """
        mask = np.asarray(mask, dtype=bool)
        index = self.inverse_index
        if index is None:
            return bounding_box(self.invert_mask(mask))
        return index.invert_box(mask)


def bounding_box(array: np.ndarray, offset: Sequence[int] = (0, 0, 0)) -> tuple[tuple[int, int, int], np.ndarray]:
    """``(start + offset, array cropped to its non-zero bounding box)``; an empty array gives ((0, 0, 0), (0, 0, 0))."""
    nonzero = [
        np.flatnonzero(array.any(axis=tuple(a for a in range(array.ndim) if a != ax))) for ax in range(array.ndim)
    ]
    if any(len(n) == 0 for n in nonzero):
        return (0, 0, 0), np.zeros((0, 0, 0), dtype=bool)
    box = tuple(slice(int(n[0]), int(n[-1]) + 1) for n in nonzero)
    start = tuple(int(n[0]) + int(o) for n, o in zip(nonzero, offset))
    return start, np.ascontiguousarray(array[box])  # type: ignore[return-value]


@dataclass(frozen=True)
class InverseIndex:
    """Where nearest-neighbour inversion samples the preprocessed grid, per axis of the input array.

    For input array axis ``p`` ((z, y, x) order), ``axes[p]`` is the preprocessed axis it samples and ``index[p][i]``
    the preprocessed index that input plane ``i`` takes its value from, or -1 outside the crop (background). The
    maps come from running MONAI's inverse resampling (same affines, sizes, float64 grid, nearest, border padding) on
    one line along each axis; the crop and orientation inverses are exact integer shifts, flips and transposes.
    """

    axes: tuple[int, int, int]
    index: tuple[np.ndarray, np.ndarray, np.ndarray]

    @classmethod
    def of(cls, pre: "Preprocessed") -> "InverseIndex | None":
        ops = pre.image.applied_operations
        if [op[TraceKeys.CLASS_NAME] for op in ops] != ["Orientation", "SpatialResample", "CropForeground"]:
            return None
        orient, resample, crop = ops
        # The crop's inverse gives the affine of the uncropped resampled grid exactly as MONAI computes it.
        proxy = MetaTensor(torch.zeros((1, *pre.shape), dtype=torch.uint8), affine=pre.image.affine.clone())
        proxy.applied_operations = [copy.deepcopy(crop)]
        with torch.no_grad():
            padded = pre.transform.transforms[-1].inverse(proxy)
        resampled_size = tuple(int(s) for s in crop[TraceKeys.ORIG_SIZE])
        if tuple(padded.shape[1:]) != resampled_size:
            return None
        crop_before = [int(c) for c in crop[TraceKeys.EXTRA_INFO]["cropped"][0::2]]
        info = resample[TraceKeys.EXTRA_INFO]
        src_affine = torch.as_tensor(info["src_affine"], dtype=torch.float64)
        oriented_size = tuple(int(s) for s in resample[TraceKeys.ORIG_SIZE])
        xform = np.linalg.solve(np.asarray(padded.affine, dtype=np.float64), src_affine.numpy())
        if not np.allclose(xform[:3, :3], np.diag(np.diag(xform[:3, :3])), atol=1e-9):
            return None  # rotation between the grids: not separable
        align = info.get("align_corners")
        resampler = SpatialResample(
            mode="nearest",
            padding_mode=info["padding_mode"],
            align_corners=False if align in (None, TraceKeys.NONE) else align,
            dtype=get_torch_dtype_from_string(info["dtype"]),  # type: ignore[arg-type]  # MONAI takes torch dtypes too
        )
        per_axis = []  # oriented index -> preprocessed index (or out of the crop), per oriented axis
        for a in range(3):
            line = [1, 1, 1]
            line[a] = resampled_size[a]
            ramp = MetaTensor(
                torch.arange(resampled_size[a], dtype=torch.float32).reshape(1, *line), affine=padded.affine.clone()
            )
            size = [1, 1, 1]
            size[a] = oriented_size[a]
            with torch.no_grad():
                sampled = resampler(ramp, dst_affine=src_affine, spatial_size=size)
            values = np.asarray(sampled).reshape(-1)
            if values.shape[0] != oriented_size[a]:
                return None
            k = np.rint(values).astype(np.int64) - crop_before[a]
            per_axis.append(np.where((k >= 0) & (k < pre.shape[a]), k, -1))
        # Orientation: original index = m @ oriented index, m a signed permutation with an integer offset.
        original_affine = np.asarray(orient[TraceKeys.EXTRA_INFO]["original_affine"], dtype=np.float64)
        m = np.linalg.solve(original_affine, src_affine.numpy())
        perm, offset = np.rint(m[:3, :3]), np.rint(m[:3, 3])
        if not (np.allclose(m[:3, :3], perm, atol=1e-6) and np.allclose(m[:3, 3], offset, atol=1e-6)):
            return None
        original_size = tuple(int(s) for s in orient[TraceKeys.ORIG_SIZE])
        axes, index = [], []
        for p in range(3):  # input array axis p (z, y, x) is SimpleITK / original axis q = 2 - p
            q = 2 - p
            a = int(np.flatnonzero(perm[q])[0])
            sign = int(perm[q, a])
            oriented = (np.arange(original_size[q]) - int(offset[q])) * sign
            if oriented.min() < 0 or oriented.max() >= oriented_size[a]:
                return None
            k = per_axis[a][oriented]
            valid = np.flatnonzero(k >= 0)
            # nearest sampling of a monotonic map: valid planes form one run, and indices move one way
            if len(valid) and (valid[-1] - valid[0] + 1 != len(valid) or not _monotonic(k[valid])):
                return None
            axes.append(a)
            index.append(k)
        if sorted(axes) != [0, 1, 2]:
            return None
        return cls(tuple(axes), tuple(index))  # type: ignore[arg-type]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(len(i) for i in self.index)  # type: ignore[return-value]

    def invert_box(self, mask: np.ndarray) -> tuple[tuple[int, int, int], np.ndarray]:
        """Bool (X, Y, Z) preprocessed mask -> (start (z, y, x), bool box on the input grid), see invert_mask_box."""
        extent = [np.flatnonzero(mask.any(axis=tuple(b for b in range(3) if b != a))) for a in range(3)]
        if any(len(e) == 0 for e in extent):
            return (0, 0, 0), np.zeros((0, 0, 0), dtype=bool)
        rows = []
        for p in range(3):
            a = self.axes[p]
            k = self.index[p]
            rows.append(np.flatnonzero((k >= extent[a][0]) & (k <= extent[a][-1])))
        if any(len(r) == 0 for r in rows):
            return (0, 0, 0), np.zeros((0, 0, 0), dtype=bool)
        box = mask.transpose(self.axes)[np.ix_(*(self.index[p][rows[p]] for p in range(3)))]
        return bounding_box(box, offset=[int(r[0]) for r in rows])

    def invert(self, mask: np.ndarray) -> np.ndarray:
        """Bool (X, Y, Z) preprocessed mask -> bool (z, y, x) mask on the input grid (same as ``invert_mask``)."""
        out = np.zeros(self.input_shape, dtype=bool)
        start, box = self.invert_box(np.asarray(mask, dtype=bool))
        if box.size:
            out[tuple(slice(s, s + n) for s, n in zip(start, box.shape))] = box
        return out


def _monotonic(values: np.ndarray) -> bool:
    d = np.diff(values)
    return bool(np.all(d >= 0) or np.all(d <= 0))


def preprocess(
    image: sitk.Image, spacing: Sequence[float] = TARGET_SPACING_MM, hu_window: Sequence[float] = HU_WINDOW
) -> Preprocessed:
    """Preprocess a CT (HU) for the model. See the module docstring for the steps."""
    transform = build_preprocessing(spacing, hu_window)
    with torch.no_grad():
        out = transform(sitk_to_metatensor(image))
    return Preprocessed(out, transform)
