"""Sliding-window inference with the published pipeline's Gaussian blending (MONAI's inferer does the tiling)."""
from __future__ import annotations

from contextlib import nullcontext
from functools import lru_cache
from typing import Callable, Sequence

import torch
from monai.data.utils import dense_patch_slices, get_valid_patch_size
from monai.inferers import sliding_window_inference
from monai.networks.layers import GaussianFilter

from .networks.universal_model import UniversalModel

ROI_SIZE: tuple[int, int, int] = (96, 96, 96)

ProgressCallback = Callable[[float, str], None]


class Cancelled(Exception):
    """Raised when the caller's cancel check returns True between windows."""


@lru_cache(maxsize=4)
def gaussian_weight_map_monai090(roi_size: tuple[int, ...], sigma_scale: float = 0.125) -> torch.Tensor:
    """The window weight map of MONAI 0.9.0's Gaussian blending, with which the published results were made.

    A unit impulse at index ``size // 2`` blurred with a Gaussian of sigma ``sigma_scale * size`` (erf kernel,
    truncated at 4 sigma), divided by its maximum, clamped below at max(smallest non-zero value, 1e-3).
    Current MONAI computes its Gaussian map differently, so the map is passed to the inferer explicitly.
    Returns a float32 tensor of shape ``roi_size``.
    """
    impulse = torch.zeros(roi_size, dtype=torch.float32)
    impulse[tuple(s // 2 for s in roi_size)] = 1.0
    blur = GaussianFilter(len(roi_size), [s * sigma_scale for s in roi_size], truncated=4.0, approx="erf")
    with torch.no_grad():
        weights = blur(impulse[None, None])[0, 0]
    weights = weights / weights.max()
    min_non_zero = weights[weights != 0].min().item()
    return torch.clamp(weights, min=max(min_non_zero, 1e-3))


def count_windows(spatial_shape: Sequence[int], roi_size: Sequence[int] = ROI_SIZE, overlap: float = 0.5) -> int:
    """Number of windows MONAI's inferer visits for an image of ``spatial_shape`` (after padding to the ROI)."""
    padded = [max(s, r) for s, r in zip(spatial_shape, roi_size)]
    roi = get_valid_patch_size(padded, roi_size)
    interval = [max(int(r * (1 - overlap)), 1) if r < s else 1 for r, s in zip(roi, padded)]
    return len(dense_patch_slices(padded, roi, interval))


def select_autocast(device: torch.device):
    """Mixed precision on CUDA; full precision on CPU (CPU half-precision convolutions are slower and less exact)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    return nullcontext()


class SlidingWindowSegmenter:
    """Run a Universal Model over a whole preprocessed volume in 96^3 windows and blend the logits.

    ``__call__(image, class_embeddings)``: image (1, 1, X, Y, Z) in [0, 1], class_embeddings (K, 512)
    -> blended logits (1, K, X, Y, Z) float32 on ``output_device``. Thresholding logits at 0 equals thresholding the
    sigmoid at 0.5 (the published pipeline blends logits, then applies the sigmoid).
    """

    def __init__(
        self,
        model: UniversalModel,
        *,
        roi_size: Sequence[int] = ROI_SIZE,
        overlap: float = 0.5,
        sw_batch_size: int = 1,
        device: torch.device | str = "cpu",
        output_device: torch.device | str = "cpu",
        progress: ProgressCallback | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> None:
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")
        if sw_batch_size < 1:
            raise ValueError(f"window batch size must be >= 1, got {sw_batch_size}")
        self.model = model
        self.roi_size = tuple(int(r) for r in roi_size)
        self.overlap = overlap
        self.sw_batch_size = sw_batch_size
        self.device = torch.device(device)
        self.output_device = torch.device(output_device)
        self.progress = progress
        self.cancel = cancel
        self.windows_done = 0

    def __call__(self, image: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
        total = count_windows(image.shape[2:], self.roi_size, self.overlap)
        self.windows_done = 0
        embeddings = class_embeddings.to(self.device, torch.float32)

        def predictor(windows: torch.Tensor) -> torch.Tensor:
            if self.cancel is not None and self.cancel():
                raise Cancelled("segmentation cancelled")
            with select_autocast(self.device):
                logits = self.model(windows.to(self.device), embeddings)
            self.windows_done += windows.shape[0]
            if self.progress is not None:
                self.progress(self.windows_done / total, f"window {self.windows_done}/{total}")
            return logits.float()

        weights = gaussian_weight_map_monai090(self.roi_size).to(self.device)
        with torch.inference_mode():
            return sliding_window_inference(
                image.as_tensor() if hasattr(image, "as_tensor") else image,
                self.roi_size,
                self.sw_batch_size,
                predictor,
                overlap=self.overlap,
                mode="gaussian",
                roi_weight_map=weights,
                padding_mode="constant",
                cval=0.0,
                sw_device=self.device,
                device=self.output_device,
            )
