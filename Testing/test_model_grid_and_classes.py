"""A checkpoint's own grid (spacing, HU window, window size), the classes a shipped checkpoint offers, plausibility
notes and the demo picture."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import shared_path
from training.export import OfferedClasses, keep_classes
from UniversalSegLib.catalog import ClassCatalog
from UniversalSegLib.checkpoints import load_checkpoint, save_checkpoint
from UniversalSegLib.errors import InputError
from UniversalSegLib.networks import ModelConfig, UniversalModel
from UniversalSegLib.pipeline import Engine, SegmentationOptions, model_preprocessing
from UniversalSegLib.result import CroppedMask, ImageGeometry, SegmentationResult


def _model(preprocessing: dict | None) -> UniversalModel:
    torch.manual_seed(0)
    model = UniversalModel(ModelConfig("unet", 4), num_classes=3)
    model.class_names = ["Spleen", "Liver", "Aorta"]
    model.metadata = {"name": "grid-test"}
    if preprocessing is not None:
        model.metadata["preprocessing"] = preprocessing
    return model.eval()


def _slab() -> sitk.Image:
    return sitk.ReadImage(str(shared_path("data", "ct", "totalseg_abdomen", "ct_upper_slab.nii.gz")))


def test_engine_uses_the_checkpoints_grid(tmp_path):
    """A checkpoint that records 3 mm / 32^3 windows is run on that grid; one without the entry on the published one."""
    coarse = save_checkpoint(
        _model({"spacing_mm": [3, 3, 3], "hu_window": [-175, 250], "roi_size": [32, 32, 32]}),
        tmp_path / "c.safetensors",
    )
    model = load_checkpoint(coarse)
    grid = model_preprocessing(model)
    assert grid.spacing_mm == (3.0, 3.0, 3.0) and grid.roi_size == (32, 32, 32)
    engine = Engine(model, SegmentationOptions(device="cpu", backend="torch"))
    prediction = engine.predict(_slab(), ["Liver"])
    assert prediction.spacing == (3.0, 3.0, 3.0) and prediction.roi_size == (32, 32, 32)
    # The slab is 3 mm already: on a 3 mm grid the preprocessed x extent is at most the input's (122 voxels).
    assert prediction.preprocessed.shape[0] <= 122
    result = engine.finish(prediction)
    assert result.settings["spacing_mm"] == [3.0, 3.0, 3.0] and result.settings["window_size"] == [32, 32, 32]
    assert result.geometry.size == _slab().GetSize()  # masks come back on the input grid

    published = model_preprocessing(_model(None))
    assert published.spacing_mm == (1.5, 1.5, 1.5) and published.roi_size == (96, 96, 96)


@pytest.mark.parametrize(
    "bad", [{"spacing_mm": [0, 1, 1]}, {"spacing_mm": "x"}, {"hu_window": [250, -175]}, {"roi_size": [8, 8, 8]}]
)
def test_malformed_grid_metadata_is_one_clear_error(bad):
    with pytest.raises(InputError, match="preprocessing"):
        model_preprocessing(_model(bad))


def test_keep_classes_keeps_each_kept_class_output_unchanged():
    model = _model(None)
    kept = keep_classes(model, ["Aorta", "Spleen"])
    assert kept.class_names == ["Aorta", "Spleen"] and kept.organ_embedding.shape[0] == 2
    torch.manual_seed(1)
    model.organ_embedding.data.normal_()
    kept = keep_classes(model, ["Aorta", "Spleen"])
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        full, sub = model(x), kept(x)
    assert torch.allclose(sub[:, 0], full[:, 2], atol=1e-5) and torch.allclose(sub[:, 1], full[:, 0], atol=1e-5)
    with pytest.raises(InputError, match="no class Kidney"):
        keep_classes(model, ["Kidney"])


def test_offered_classes_follow_the_held_out_floor(tmp_path):
    report = {
        "models": ["m.safetensors"],
        "cases": ["abdomen"],
        "summary": {
            "m.safetensors": {
                "Liver": {"dice": 0.91},
                "Spleen": {"dice": 0.59},
                "Aorta": {"dice": 0.6},
                "Colon": {"dice": None},
            }
        },
    }
    path = tmp_path / "evaluation.json"
    path.write_text(json.dumps(report))
    offered = OfferedClasses.from_evaluation(path, 0.6)
    assert offered.classes == ["Liver", "Aorta"]
    # A right lung above the floor is not offered when the left lung (its post-processing partner) is not.
    report["summary"]["m.safetensors"].update({"Right Lung": {"dice": 0.9}, "Left Lung": {"dice": 0.1}})
    path.write_text(json.dumps(report))
    assert OfferedClasses.from_evaluation(path, 0.6).classes == ["Liver", "Aorta"]
    assert offered.metadata()["offered"] == ["Liver", "Aorta"] and offered.metadata()["cases"] == ["abdomen"]
    path.write_text("[]")
    with pytest.raises(InputError, match="not an evaluation.json"):
        OfferedClasses.from_evaluation(path, 0.6)


def _result(masks: dict[int, CroppedMask], shape=(20, 20, 20), spacing=(1.0, 1.0, 1.0)) -> SegmentationResult:
    image = sitk.Image(shape[::-1], sitk.sitkInt16)
    image.SetSpacing(spacing)
    return SegmentationResult(geometry=ImageGeometry.of(image), masks=masks, catalog=ClassCatalog.default())


def test_plausibility_flags_a_celiac_trunk_of_32_ml_and_spares_a_cut_organ():
    catalog = ClassCatalog.default()
    celiac, liver = catalog.lookup("celiac trunk").index, catalog.lookup("liver").index
    big = CroppedMask((2, 2, 2), np.ones((4, 4, 4), dtype=bool))  # 64 voxels of 0.5 mL = 32 mL
    result = _result({celiac: big}, spacing=(10.0, 10.0, 5.0))
    notes = result.plausibility()
    assert len(notes) == 1 and "Celiac Trunk" in notes[0] and "32.0 mL" in notes[0]
    assert result.summary()["plausibility"] == notes
    # A 32 mL liver is implausibly small when wholly inside the scan; touching the first slice, it may be cut.
    assert "Liver" in _result({liver: big}, spacing=(10.0, 10.0, 5.0)).plausibility()[0]
    cut = CroppedMask((0, 2, 2), np.ones((4, 4, 4), dtype=bool))
    assert _result({liver: cut}, spacing=(10.0, 10.0, 5.0)).plausibility() == []


def test_overlay_gives_adjacent_structures_distinct_colours_and_volumes(tmp_path):
    from PIL import Image

    from UniversalSegLib.overlay import PALETTE, render_overlay

    catalog = ClassCatalog.default()
    names = ["liver", "aorta", "celiac trunk"]  # nearly the same red in the terminology colours
    masks = {}
    for n, name in enumerate(names):
        box = np.zeros((6, 6, 6), dtype=bool)
        box[1:5, 1:5, 1:5] = True
        masks[catalog.lookup(name).index] = CroppedMask((7, 2, 2 + 6 * n), box)
    result = _result(masks)
    path = render_overlay(sitk.Image(20, 20, 20, sitk.sitkInt16), result, tmp_path / "overlay.png")
    pixels = np.asarray(Image.open(path).convert("RGB")).reshape(-1, 3)
    colours = {tuple(int(c) for c in p) for p in pixels}
    used = PALETTE[: len(names)]
    assert all(c in colours for c in used)  # each outline drawn in its own colour
    assert len(set(used)) == len(used)
    assert min(np.abs(np.subtract(a, b)).sum() for i, a in enumerate(used) for b in used[i + 1 :]) > 100


def test_classes_command_marks_the_classes_a_model_lacks(tmp_path, capsys):
    from UniversalSegLib.cli import main

    model = _model(None)
    model.metadata["held_out"] = {
        "floor": 0.6,
        "dice": {"Liver": 0.9, "Spleen": 0.8, "Aorta": 0.7},
        "offered": ["Spleen", "Liver", "Aorta"],
    }
    path = save_checkpoint(model, tmp_path / "three.safetensors")
    assert main(["classes", "--model", str(path), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in doc["classes"]}
    assert rows["Liver"]["in_model"] and rows["Liver"]["held_out_dice"] == 0.9
    assert not rows["Kidney Cyst"]["in_model"] and rows["Kidney Cyst"]["held_out_dice"] is None
    assert sum(r["in_model"] for r in rows.values()) == 3
    assert main(["classes", "--model", str(path)]) == 0
    text = capsys.readouterr().out
    assert "provides 3 of 32 classes" in text and " 0.90 " in text


def test_head_activity_tells_live_heads_from_dead_ones():
    from training.diagnose import head_activity
    from training.modeling import init_head_bias

    model = _model(None)
    init_head_bias(model, 0.02)  # the recipe's start: heads alive
    window = torch.rand(1, 1, 32, 32, 32)
    alive = head_activity(model, window)
    assert all(v["alive_units"] > 0 and v["logit_std"] > 0 for v in alive.values())
    with torch.no_grad():  # every hidden unit's bias far negative: the heads' ReLUs are dead
        model.controller.bias[64 + 64 + 8 : 64 + 64 + 16] = -1e4
        model.controller.bias[64 + 64 + 16 : 64 + 64 + 24] = -1e4
    dead = head_activity(model, window)
    assert all(v["alive_units"] == 0 and v["logit_std"] == 0 for v in dead.values())
