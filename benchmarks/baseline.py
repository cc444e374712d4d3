"""The straightforward pipeline the engine is measured against, built from the engine's own components.

What a first implementation of the published method does (and what upstream's inference script does):
all 32 classes, MONAI's ``sliding_window_inference`` over the plain PyTorch model (window batch 1, overlap 0.5,
MONAI 0.9.0 Gaussian blending) giving float32 logits of every class over the whole preprocessed volume, sigmoid
probability maps of every class, threshold > 0.5, the published post-processing, then every class's mask inverted
to the input grid with MONAI's inverse transform (nearest neighbour) as a float32 map at the input's full
resolution (all 32 kept, as upstream's ``Invertd`` does), thresholded into the result, written as a label map.

Same masks as the engine's normal mode by construction (same preprocessing, windows, blending, threshold,
post-processing and nearest-neighbour inversion); only time and memory differ.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import sliding_window_inference
from monai.transforms.utils import convert_applied_interp_mode

from UniversalSegLib.catalog import ClassCatalog
from UniversalSegLib.imageio import read_image, write_outputs
from UniversalSegLib.inferer import ROI_SIZE, count_windows, gaussian_weight_map_monai090
from UniversalSegLib.networks.universal_model import UniversalModel
from UniversalSegLib.postprocess import PostprocessOptions, postprocess
from UniversalSegLib.preprocessing import Preprocessed, preprocess
from UniversalSegLib.result import CroppedMask, ImageGeometry, SegmentationResult

StageCallback = Callable[[str], None]


def invert_float_map(pre: Preprocessed, data: torch.Tensor) -> np.ndarray:
    """A float32 (X, Y, Z) map on the preprocessed grid -> float32 (z, y, x) map on the input grid (MONAI inverse,
    nearest neighbour), as upstream's ``Invertd`` does."""
    meta = MetaTensor(data[None].float(), meta={k: v for k, v in pre.image.meta.items() if k != "affine"})
    meta.affine = pre.image.affine.clone()
    meta.applied_operations = convert_applied_interp_mode(
        pre.image.applied_operations, mode="nearest", align_corners=None
    )
    with torch.no_grad():
        inverted = pre.transform.inverse(meta)
    return np.ascontiguousarray(np.asarray(inverted[0], dtype=np.float32).transpose(2, 1, 0))


def run_baseline(
    path: str | Path,
    model: UniversalModel,
    output: str | Path,
    *,
    stage: StageCallback | None = None,
    overlap: float = 0.5,
    device: str = "cpu",
) -> SegmentationResult:
    """Segment all 32 classes of the CT at ``path`` the straightforward way and write the label map to ``output``.

    ``stage(name)`` is called when each stage starts: read, preprocess, windows, postprocess, resample, write.
    ``device``: where the windows run (``cuda``: float16 autocast, as the engine; the logits are kept on the CPU).
    """
    from UniversalSegLib.checkpoints import resolve_device
    from UniversalSegLib.inferer import select_autocast

    run_device = resolve_device(device)
    model = model.to(run_device)
    mark = stage or (lambda name: None)
    catalog = ClassCatalog.default()
    classes = [c.index for c in catalog]

    mark("read")
    image = read_image(path)

    mark("preprocess")
    pre = preprocess(image)

    mark("windows")
    embeddings = model.class_embeddings.float().to(run_device)
    weights = gaussian_weight_map_monai090(ROI_SIZE)
    network_s = 0.0

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        nonlocal network_s
        t = time.perf_counter()
        with select_autocast(run_device):
            out = model(windows.to(run_device), embeddings).float()
        if run_device.type == "cuda":
            torch.cuda.synchronize()
        network_s += time.perf_counter() - t
        return out

    with torch.inference_mode():
        logits = sliding_window_inference(
            pre.image[None].as_tensor(),
            ROI_SIZE,
            1,
            predictor,
            overlap=overlap,
            mode="gaussian",
            roi_weight_map=weights.to(run_device),
            padding_mode="constant",
            cval=0.0,
            sw_device=run_device,
            device="cpu",
        )
        probabilities = torch.sigmoid(logits[0])  # (32, X, Y, Z) float32
    del logits

    mark("postprocess")
    masks = {index: (probabilities[index - 1] > 0.5).numpy() for index in classes}
    del probabilities
    masks = postprocess(masks, PostprocessOptions())

    mark("resample")
    full_maps = [invert_float_map(pre, torch.from_numpy(masks[index])) for index in classes]  # 32 float32 maps
    cropped = {index: CroppedMask.from_full(full_maps[n] > 0.5) for n, index in enumerate(classes)}
    del full_maps

    mark("write")
    settings = {
        "overlap": overlap,
        "window_batch": 1,
        "preprocessed_shape": list(pre.shape),
        "windows": count_windows(pre.shape, overlap=overlap),
        "computed_classes": classes,
    }
    result = SegmentationResult(
        geometry=ImageGeometry.of(image),
        masks=cropped,
        catalog=catalog,
        model_name="baseline",
        settings=settings,
        timings={"windows_network": network_s},
    )
    write_outputs(result, output, fmt="nii")
    return result


__all__ = ["run_baseline", "invert_float_map"]


if __name__ == "__main__":  # pragma: no cover - manual use: python benchmarks/baseline.py CT CHECKPOINT OUT
    import sys

    from UniversalSegLib.checkpoints import load_checkpoint

    torch.set_num_threads(2)
    run_baseline(
        sys.argv[1], load_checkpoint(sys.argv[2]).eval(), sys.argv[3], stage=lambda s: print(s, file=sys.stderr)
    )
