"""The CLI pipeline reproduces the published pipeline's masks (../shared/reference/pipeline, salt-A U-Net).

This runs the full-size U-Net over 15 windows of a real CT: a few minutes of CPU. It is part of the default
test run (marked ``slow``; deselect with ``-m "not slow"``).
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import shared_path
from UniversalSegLib.checkpoints import load_official_checkpoint
from UniversalSegLib.pipeline import Engine, SegmentationOptions
from UniversalSegLib.postprocess import PostprocessOptions

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prediction_and_engine(tmp_path_factory):
    script = shared_path("reference", "equivalence", "make_checkpoint.py")
    spec = importlib.util.spec_from_file_location("make_checkpoint", script)
    make = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make)
    path = tmp_path_factory.mktemp("salt_a") / "unet_A.pth"
    torch.save(make.build("unet", "A"), path)
    engine = Engine(load_official_checkpoint(path), SegmentationOptions(device="cpu"))
    ct = shared_path("data", "ct", "totalseg_abdomen", "ct_upper_slab.nii.gz")
    # One network pass; both post-processing variants are finished from it.
    return engine.predict(ct, "all"), engine


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else 2.0 * np.logical_and(a, b).sum() / total


@pytest.mark.parametrize(
    "variant,options,min_dice",
    [
        ("raw", PostprocessOptions.none(), 0.999),
        ("post", PostprocessOptions(), 0.99),
    ],
)
def test_reproduces_published_masks(prediction_and_engine, variant, options, min_dice):
    prediction, engine = prediction_and_engine
    assert prediction.preprocessed.shape == (241, 191, 59)  # upstream's preprocessed shape (summary.json)
    result = engine.finish(prediction, postprocess_options=options)
    folder = shared_path("reference", "pipeline", variant)
    low = {}
    for info, _ in result:
        ref_image = sitk.ReadImage(str(folder / f"{info.prompt_name if info.index == 25 else info.name}.nii.gz"))
        ours = result.mask_array(info.index).astype(bool)
        ref = sitk.GetArrayFromImage(ref_image) > 0.5
        assert ours.shape == ref.shape
        if ref.any() or ours.any():
            d = _dice(ours, ref)
            if d < min_dice:
                low[info.name] = round(d, 5)
    assert not low, f"classes below Dice {min_dice}: {low}"
