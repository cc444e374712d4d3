"""The region step (UniversalSegLib.region): windows only where the requested classes are, with the same masks.

The window selection is checked bit for bit on a small random model; the whole step (localiser, boxes, growth)
against the full run with the bundled model on a real whole-body CT."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import shared_path
from UniversalSegLib.checkpoints import load_model
from UniversalSegLib.inferer import SlidingWindowSegmenter, WindowLayout
from UniversalSegLib.pipeline import Engine, SegmentationOptions
from UniversalSegLib.region import predict_masks_in_boxes
from UniversalSegLib.request import SegmentationRequest

ROI = (32, 32, 32)


@pytest.fixture(scope="module")
def small_run(tiny_model_path):
    """A random 1/8-width model over a long volume (stream axis x), full run and run in two boxes at its ends."""
    model = load_model(tiny_model_path).eval()
    torch.manual_seed(1)
    image = torch.rand(1, 1, 150, 60, 50)
    embeddings = model.class_embeddings[:2]
    segmenter = SlidingWindowSegmenter(model, roi_size=ROI, overlap=0.5)
    # thresholds at each class's median probability, so that the masks are half full (random weights)
    probabilities = torch.sigmoid(segmenter(image, embeddings))[0]
    thresholds = [float(p.median()) for p in probabilities]
    full = segmenter.predict_masks(image, embeddings, thresholds).numpy()
    boxes = [((0, 40), (10, 50), (5, 45)), ((110, 150), (0, 30), (20, 50))]
    boxed = segmenter.predict_masks(image, embeddings, thresholds, boxes=boxes).numpy()
    return full, boxed, boxes, segmenter


def _inner(box, inset):
    return tuple(slice(a + d if a > 0 else 0, b - d if b < s else s) for (a, b), d, s in zip(box, inset, (150, 60, 50)))


def test_masks_deep_inside_a_box_are_the_full_runs_bit_for_bit(small_run):
    full, boxed, boxes, _ = small_run
    inset = WindowLayout.of(full.shape[1:], ROI, 0.5).core_inset
    assert inset == (8, 8, 8)
    for c, box in enumerate(boxes):
        inner = _inner(box, inset)
        assert full[c][inner].any() and not full[c][inner].all()  # a mask worth comparing
        np.testing.assert_array_equal(boxed[c][inner], full[c][inner])


def test_nothing_outside_a_box_and_the_windows_between_the_boxes_do_not_run(small_run):
    full, boxed, boxes, segmenter = small_run
    for c, box in enumerate(boxes):
        outside = np.ones(full.shape[1:], dtype=bool)
        outside[tuple(slice(a, b) for a, b in box)] = False
        assert not boxed[c][outside].any()
    # 150 voxels along x: windows at x = 0, 16, ..., 118; those whose core reaches neither end box do not run
    assert segmenter.windows_total == len(WindowLayout.of(full.shape[1:], ROI, 0.5))
    assert segmenter.windows_run < segmenter.windows_total


def test_the_region_flag_reaches_the_engine():
    assert SegmentationRequest().to_options().region is True
    request = SegmentationRequest(region=False)
    assert request.to_cli_args() == ["--no-roi"]
    assert request.to_options().region is False


# --------------------------------------------------------------------------------------- a real CT, bundled model
@pytest.fixture(scope="module")
def wholebody():
    """The bundled model's liver on the whole-body CT, with and without the region step (bfloat16 both: the step
    must keep the masks whatever the arithmetic)."""
    ct = shared_path("data", "ct", "ccth_wholebody", "ct.nii.gz")
    runs = {}
    for region in (True, False):
        engine = Engine(None, SegmentationOptions(region=region, precision="bfloat16"))
        runs[region] = (engine, engine.predict(ct, "liver"))
    return runs


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(int(a.sum()) + int(b.sum()), 1))


@pytest.mark.slow
def test_region_step_keeps_the_liver_on_a_real_ct_with_fewer_windows(wholebody):
    _, with_region = wholebody[True]
    _, without = wholebody[False]
    report = with_region.region
    assert report.used, report.reason
    assert report.windows_run + report.locate_windows < 0.75 * report.windows_full
    assert without.region.windows_run == report.windows_full
    liver_with, liver_without = with_region.masks[6], without.masks[6]
    assert liver_without.sum() > 20000  # the liver is there (3 mm voxels)
    assert _dice(liver_with, liver_without) >= 0.999
    # what the user gets, after the published post-processing: the same voxels
    engine = wholebody[True][0]
    final_with = engine.finish(with_region).masks[6]
    final_without = engine.finish(without).masks[6]
    assert final_with.start == final_without.start
    np.testing.assert_array_equal(final_with.array, final_without.array)


@pytest.mark.slow
def test_a_box_too_small_grows_until_the_liver_is_whole(wholebody):
    engine, with_region = wholebody[True]
    _, without = wholebody[False]
    (x0, x1), (y0, y1), (z0, z1) = with_region.region.boxes[6]
    cut = ((x0, x1), (y0, y1), (z0, (z0 + z1) // 2))  # the localiser saw only the liver's lower half
    segmenter = SlidingWindowSegmenter(engine.model, roi_size=(64, 64, 64), overlap=0.5, precision="bfloat16")
    volume = with_region.preprocessed.image[None]
    embeddings = engine.model.class_embeddings[[engine.model.class_names.index("Liver")]]
    run = predict_masks_in_boxes(segmenter, volume, embeddings, [0.5], [cut], margin=(16, 16, 16))
    assert run.regrown == [0]
    assert run.boxes[0] is None or run.boxes[0][2][1] > cut[2][1]
    assert _dice(run.masks[0].numpy(), without.masks[6]) >= 0.999
