"""Where the model is unsure (UniversalSegLib.uncertainty): the uncertain voxels come from the same blended
probabilities as the masks, and their summary is checked on a hand-made map and on a real CT."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import shared_path
from UniversalSegLib.checkpoints import load_model
from UniversalSegLib.inferer import SlidingWindowSegmenter
from UniversalSegLib.pipeline import Engine
from UniversalSegLib.uncertainty import UNCERTAIN_BAND, summarise_uncertainty


def test_uncertain_voxels_are_the_blended_probabilities_inside_the_band(tiny_model_path):
    model = load_model(tiny_model_path).eval()
    torch.manual_seed(3)
    image = torch.rand(1, 1, 70, 40, 36)
    embeddings = model.class_embeddings[[0, 5]]
    segmenter = SlidingWindowSegmenter(model, roi_size=(32, 32, 32), overlap=0.5)
    probabilities = torch.sigmoid(segmenter(image, embeddings))[0]
    # a band around each class's median, so that about half the voxels are inside it (random weights)
    bands = [(float(p.quantile(0.25)), float(p.quantile(0.75))) for p in probabilities]
    for c, band in enumerate(bands):
        segmenter.predict_masks(image, embeddings[c : c + 1], 0.5, stream_axis=0, uncertain_band=band)
        expected = ((probabilities[c] > band[0]) & (probabilities[c] < band[1])).numpy()
        assert 0.3 < expected.mean() < 0.7
        assert segmenter.uncertain is not None
        np.testing.assert_array_equal(segmenter.uncertain[0], expected)


def test_summary_of_a_hand_made_map():
    mask = np.zeros((30, 30, 30), dtype=bool)
    mask[10:20, 10:20, 10:20] = True
    uncertain = mask & ~np.pad(np.ones((8, 8, 8), dtype=bool), 11)[:30, :30, :30]  # the cube's outer layer
    uncertain[0:2, 0:2, 0:2] = True  # far from the mask (beyond 6 mm): not counted
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    affine[:3, 3] = [10.0, -20.0, 30.0]
    summary = summarise_uncertainty(mask, uncertain, (2.0, 2.0, 2.0), affine)
    shell = 10**3 - 8**3
    assert summary["uncertain_ml"] == pytest.approx(shell * 0.008)
    assert summary["uncertain_share"] == pytest.approx(shell / 1000)
    assert summary["surface_uncertain_share"] == 1.0
    assert len(summary["regions"]) == 1
    # centre index 14.5 -> RAS (39, 9, 59) -> LPS (-39, -9, 59)
    assert summary["regions"][0]["centre_lps_mm"] == [-39.0, -9.0, 59.0]
    assert summary["regions"][0]["ml"] == pytest.approx(shell * 0.008)

    missed = summarise_uncertainty(np.zeros_like(mask), uncertain, (2.0, 2.0, 2.0), affine)
    assert missed["uncertain_ml"] == pytest.approx((shell + 8) * 0.008)  # an empty mask counts all of them
    assert missed["surface_uncertain_share"] is None and len(missed["regions"]) == 2


@pytest.mark.slow
def test_summary_on_a_real_ct_points_at_the_liver():
    ct = shared_path("data", "ct", "totalseg_abdomen", "ct.nii.gz")
    image = sitk.ReadImage(str(ct))
    result = Engine(None).segment(image, "liver")
    entry = next(c for c in result.summary()["classes"] if c["name"] == "Liver")
    info = entry["uncertainty"]
    assert 0 < info["uncertain_ml"] < entry["volume_ml"]
    assert 0 < info["surface_uncertain_share"] <= 1
    assert UNCERTAIN_BAND == (0.2, 0.8)
    # the largest uncertain region lies at the liver: its centre, in patient (LPS) coordinates, falls inside the
    # liver mask's bounding box on the input grid, widened by 10 mm
    liver = result.masks[6]
    centre = image.TransformPhysicalPointToContinuousIndex(info["regions"][0]["centre_lps_mm"])  # (x, y, z)
    lo = np.array(liver.start[::-1], dtype=float)
    hi = lo + np.array(liver.array.shape[::-1])
    slack = 10.0 / np.array(image.GetSpacing())
    assert np.all(np.array(centre) >= lo - slack) and np.all(np.array(centre) <= hi + slack), (centre, lo, hi)


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["csv", "json"])
def test_stats_table_matches_the_written_masks_and_the_ct(tmp_path, fmt):
    """``segment --stats``: volume and HU per class computed straight from the written label map and the CT."""
    import csv
    import json

    from UniversalSegLib.cli import main

    ct = shared_path("data", "ct", "totalseg_abdomen", "ct_upper_slab.nii.gz")
    out = tmp_path / "seg.nii.gz"
    assert main(["segment", str(ct), "--classes", "liver", "-o", str(out), "--stats", fmt, "--progress", "none"]) == 0
    table = tmp_path / f"seg.stats.{fmt}"
    if fmt == "csv":
        with table.open() as f:
            rows = list(csv.DictReader(f))
    else:
        rows = json.loads(table.read_text())
    (row,) = rows
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    image = sitk.ReadImage(str(ct))
    hu = sitk.GetArrayFromImage(image)[labels == 6]
    assert hu.size > 1000
    voxel_ml = float(np.prod(image.GetSpacing())) / 1000
    assert row["name"] == "Liver"
    assert float(row["volume_ml"]) == pytest.approx(hu.size * voxel_ml, abs=1e-3)
    assert float(row["mean_hu"]) == pytest.approx(float(hu.mean()), abs=0.05)
    assert float(row["median_hu"]) == pytest.approx(float(np.median(hu)), abs=0.05)
    assert float(row["uncertain_ml"]) > 0


def test_stats_file_is_named_after_the_output_whatever_its_suffix():
    from UniversalSegLib.formats import output_stem

    assert output_stem("seg.nii", "nii") == "seg"
    assert output_stem("seg.nii.gz", "nii") == "seg"
    assert output_stem("case.seg.nrrd", "seg.nrrd") == "case"
