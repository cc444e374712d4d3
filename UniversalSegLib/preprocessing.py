"""Preprocessing as the Universal Model was trained, and its inverse for masks (MONAI transforms).

Forward: orientation RAS -> resample to 1.5 mm (bilinear) -> HU window [-175, 250] scaled to [0, 1] (clipped)
-> crop to the foreground (voxels > 0 after scaling, i.e. above -175 HU: the body).
Inverse (for masks): undo the crop, resample back with nearest neighbour, undo the orientation.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch
from monai.data import MetaTensor
from monai.transforms import Compose, CropForeground, Orientation, ScaleIntensityRange, Spacing
from monai.transforms.utils import convert_applied_interp_mode

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


def build_preprocessing(spacing: Sequence[float] = TARGET_SPACING_MM, hu_window: Sequence[float] = HU_WINDOW) -> Compose:
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


def preprocess(image: sitk.Image, spacing: Sequence[float] = TARGET_SPACING_MM) -> Preprocessed:
    """Preprocess a CT (HU) for the model. See the module docstring for the steps."""
    transform = build_preprocessing(spacing)
    with torch.no_grad():
        out = transform(sitk_to_metatensor(image))
    return Preprocessed(out, transform)
