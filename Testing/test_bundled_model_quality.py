"""Regression guard for the bundled default model, exactly as users get it (registry default, default options), on a
real CT it was never trained on: the TotalSegmentator abdomen scan (also the demo's sample CT), which the shipped
model's training config leaves out (see UniversalSegLib/data/models/MODEL_CARD.md)."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import shared_path
from training.totalsegmentator import TOTALSEG_V2_TOTAL

pytestmark = pytest.mark.slow

# Floors a little under the held-out Dice in the model card (Liver 0.864): a guard against regressions. The model
# offers only the classes that passed the 0.6 floor on this patient; other organs are not offered (see the card).
DICE_FLOORS = {"Liver": 0.82}
# TotalSegmentator labels of each class in the reference map.
SOURCES = {"Liver": ["liver"]}


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * np.logical_and(a, b).sum() / (a.sum() + b.sum()))


@pytest.fixture(scope="module")
def default_run():
    from UniversalSegLib.checkpoints import load_model
    from UniversalSegLib.pipeline import Engine

    model = load_model(None)  # the registry's default model, as `universalseg segment` uses it
    engine = Engine(model)
    ct = shared_path("data", "ct", "totalseg_abdomen", "ct.nii.gz")
    result = engine.segment(str(ct), engine.available_classes())
    labels = sitk.GetArrayFromImage(
        sitk.ReadImage(str(shared_path("data", "ct", "totalseg_abdomen", "labels_totalseg_v2.nii.gz")))
    )
    return model, result, labels


def test_bundled_model_was_not_trained_on_the_scored_scan(default_run):
    model, _, _ = default_run
    datasets = model.metadata["provenance"]["config"]["datasets"]
    assert all(d["split"] == "val" for d in datasets if d["name"] == "totalseg_abdomen")


@pytest.mark.parametrize("name", sorted(DICE_FLOORS))
def test_large_organs_reach_their_floor_on_an_unseen_patient(default_run, name):
    _, result, labels = default_run
    value = {v: k for k, v in TOTALSEG_V2_TOTAL.items()}
    truth = np.isin(labels, [value[s] for s in SOURCES[name]])
    index = result.catalog.lookup(name).index
    assert index in result.masks, f"the bundled model does not offer {name}"
    dice = _dice(result.mask_array(index).astype(bool), truth)
    assert dice >= DICE_FLOORS[name], (
        f"{name}: Dice {dice:.3f} on the unseen patient is below the floor {DICE_FLOORS[name]}"
    )


def test_offered_classes_are_those_that_passed_the_held_out_floor(default_run):
    model, result, _ = default_run
    held_out = model.metadata["held_out"]
    assert sorted(model.class_names) == sorted(held_out["offered"])
    assert all(held_out["dice"][n] >= held_out["floor"] for n in model.class_names)
    assert not result.plausibility(), result.plausibility()  # no organ of implausible size on the demo scan
