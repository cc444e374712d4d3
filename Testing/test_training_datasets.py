"""Dataset assembly and ``check``: adapters, label mapping, left/right split, coverage and error reports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from training.check import check_config
from training.cli import main as train_main
from training.config import load_config, parse_config
from training.datasets import class_masks, collect_cases, read_case_labels, split_cases
from UniversalSegLib.dataset_json import read_dataset_file, write_dataset_file
from UniversalSegLib.errors import InputError


def _write(array: np.ndarray, path: Path, spacing=(2.0, 2.0, 2.0), origin=(0.0, 0.0, 0.0)) -> Path:
    """Write a (z, y, x) array with an identity direction."""
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path))
    return path


def _phantom(shape=(16, 24, 32)) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like body (40 HU) in air with two 'lungs' (value 1) on either side of x = 16 and a 'liver' (value 2)."""
    ct = np.full(shape, -1000, np.int16)
    ct[2:-2, 2:-2, 2:-2] = 40
    lab = np.zeros(shape, np.uint8)
    lab[4:12, 6:18, 4:10] = 1  # low x index = patient's right (LPS x grows to the patient's left)
    lab[4:12, 6:18, 22:28] = 1
    lab[4:8, 4:8, 12:20] = 2
    return ct, lab


def _config(tmp_path: Path, datasets: list, **extra) -> "TrainingConfig":  # noqa: F821
    raw = {"name": "t", "datasets": datasets, "output": str(tmp_path / "run"), **extra}
    return parse_config(raw, tmp_path)


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    ds = [{"name": "a", "type": "files", "cases": [], "labels": {"Liver": [1]}}]
    with pytest.raises(InputError, match="unknown key.*trainig"):
        _config(tmp_path, ds, trainig={})
    with pytest.raises(InputError, match="unknown key.*max_step"):
        _config(tmp_path, ds, training={"max_step": 3})
    with pytest.raises(InputError, match="unknown type"):
        _config(tmp_path, [{"name": "a", "type": "nifti"}])
    with pytest.raises(InputError, match="crop_size"):
        _config(tmp_path, ds, training={"crop_size": [96, 96]})
    with pytest.raises(InputError, match="unique"):
        _config(tmp_path, ds + ds)


def test_files_dataset_maps_values_splits_sides_and_checks(tmp_path):
    ct, lab = _phantom()
    _write(ct, tmp_path / "ct.nii.gz")
    _write(lab, tmp_path / "lab.nii.gz")
    config = _config(
        tmp_path,
        [
            {
                "name": "phantom",
                "type": "files",
                "cases": [{"id": "p1", "image": "ct.nii.gz", "label": "lab.nii.gz"}],
                "label_names": {1: "lung", 2: "liver"},
                "labels": {
                    "Right Lung": {"labels": ["lung"], "side": "right"},
                    "Left Lung": {"labels": [1], "side": "left"},
                    "Liver": ["liver"],
                },
                "annotated": ["Right Lung", "Left Lung", "Liver", "Spleen"],
            }
        ],
    )
    (case,) = collect_cases(config)
    assert case.annotated == (1, 6, 16, 17)  # Spleen is annotated as absent
    image = sitk.ReadImage(str(case.image))
    masks = class_masks(read_case_labels(case, image))
    assert set(masks) == {1, 6, 16, 17}
    assert not masks[1].any()  # Spleen: annotated, absent
    np.testing.assert_array_equal(masks[6], lab == 2)
    right, left = masks[16], masks[17]
    assert right.sum() == left.sum() == (lab == 1).sum() // 2
    np.testing.assert_array_equal(right[:, :, :16], lab[:, :, :16] == 1)
    assert not right[:, :, 16:].any()
    assert not left[:, :, :16].any()
    report = check_config(config)
    assert report.ok, report.errors
    assert report.coverage["phantom"] == {"Spleen": [1, 0], "Liver": [1, 1], "Right Lung": [1, 1], "Left Lung": [1, 1]}
    assert "only negatives" in " ".join(report.warnings)


def test_check_reports_missing_files_geometry_and_unknown_values(tmp_path, capsys):
    ct, lab = _phantom()
    _write(ct, tmp_path / "ct.nii.gz")
    _write(lab, tmp_path / "lab.nii.gz")
    _write(lab, tmp_path / "shifted.nii.gz", origin=(0.0, 0.0, 9.0))
    _write(lab[:, :, :20], tmp_path / "small.nii.gz")
    cfg = {
        "name": "bad",
        "output": str(tmp_path / "run"),
        "datasets": [
            {
                "name": "unknown_values",
                "type": "files",
                "labels": {"Liver": [2]},
                "cases": [{"id": "u", "image": "ct.nii.gz", "label": "lab.nii.gz"}],
            },
            {
                "name": "geometry",
                "type": "files",
                "labels": {"Liver": [2]},
                "ignore_labels": [1],
                "cases": [
                    {"id": "shifted", "image": "ct.nii.gz", "label": "shifted.nii.gz"},
                    {"id": "small", "image": "ct.nii.gz", "label": "small.nii.gz"},
                ],
            },
            {
                "name": "missing",
                "type": "files",
                "labels": {"Liver": [2]},
                "cases": [
                    {"id": "m", "image": "nothere.nii.gz", "label": "lab.nii.gz"},
                    {"id": "n", "image": "ct.nii.gz", "label": "gone.nii.gz"},
                ],
            },
            {
                "name": "ok",
                "type": "files",
                "labels": {"Liver": [2]},
                "ignore_labels": [1],
                "split": "val",
                "cases": [{"id": "fine", "image": "ct.nii.gz", "label": "lab.nii.gz"}],
            },
        ],
    }
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    report = check_config(load_config(path))
    text = "\n".join(report.errors)
    assert "unknown_values/u: label value(s) [1]" in text and "ignore_labels" in text
    assert "geometry/shifted: geometry mismatch: shifted.nii.gz: origin" in text
    assert "geometry/small: geometry mismatch: small.nii.gz: size (20, 24, 16)" in text
    assert "missing/m: image not found" in text
    assert "missing/n: label file not found" in text
    assert len(report.errors) == 5
    assert report.coverage["ok"] == {"Liver": [1, 1]}
    # The command prints the same report and fails.
    assert train_main(["check", str(path)]) == 1
    out = capsys.readouterr().out
    assert "errors (5)" in out and "Liver" in out


def test_msd_folder_and_exported_adapters(tmp_path):
    ct, lab = _phantom()
    root = tmp_path / "Task03_Liver"
    for name in ("a", "b", "c"):
        _write(ct, root / "imagesTr" / f"liver_{name}.nii.gz")
        _write(lab, root / "labelsTr" / f"liver_{name}.nii.gz")
    (root / "dataset.json").write_text(
        json.dumps(
            {
                "labels": {"0": "background", "1": "liver", "2": "cancer"},
                "training": [
                    {"image": f"./imagesTr/liver_{n}.nii.gz", "label": f"./labelsTr/liver_{n}.nii.gz"} for n in "abc"
                ],
            }
        )
    )
    for name in ("x", "y"):
        _write(ct, tmp_path / "nn" / "images" / f"case_{name}_0000.nii.gz")
        _write(lab, tmp_path / "nn" / "labels" / f"case_{name}.nii.gz")
    export = tmp_path / "export"
    _write(ct, export / "images" / "s1.nii.gz")
    _write(lab * 3, export / "labels" / "s1.nii.gz")  # catalog values: 3 = Left Kidney, 6 = Liver
    for annotated in (["Liver"], ["Liver", "Left Kidney"]):  # re-export replaces the entry
        doc = read_dataset_file(export, missing_ok=True)
        doc.upsert({"id": "s1", "image": "images/s1.nii.gz", "label": "labels/s1.nii.gz", "annotated": annotated})
        write_dataset_file(export, doc)
    cases = read_dataset_file(export).cases
    assert len(cases) == 1 and cases[0]["image"] == "images/s1.nii.gz" and cases[0]["annotated"] == annotated
    config = _config(
        tmp_path,
        [
            {
                "name": "msd",
                "type": "msd",
                "root": str(root),
                "labels": {"Liver": ["liver", "cancer"], "Liver Tumor": ["cancer"]},
                "val_fraction": 0.34,
            },
            {
                "name": "nn",
                "type": "folder",
                "root": "nn",
                "images": "images/*.nii.gz",
                "label_images": "labels/*.nii.gz",
                "image_suffix": "_0000",
                "label_names": {1: "lung", 2: "liver"},
                "ignore_labels": ["lung"],
                "labels": {"Liver": ["liver"]},
            },
            {"name": "corrections", "type": "exported", "path": str(export)},
        ],
    )
    cases = collect_cases(config)
    msd = [c for c in cases if c.dataset == "msd"]
    assert [c.case_id for c in msd] == ["liver_a", "liver_b", "liver_c"]
    assert sum(c.split == "val" for c in msd) == 1
    assert dict(msd[0].sources)[6][0].key == 1 and {r.key for r in dict(msd[0].sources)[6]} == {1, 2}
    assert [c.case_id for c in cases if c.dataset == "nn"] == ["case_x", "case_y"]
    (exp,) = [c for c in cases if c.dataset == "corrections"]
    assert exp.annotated == (3, 6)
    masks = class_masks(read_case_labels(exp, sitk.ReadImage(str(exp.image))))
    np.testing.assert_array_equal(masks[6], lab * 3 == 6)
    np.testing.assert_array_equal(masks[3], lab * 3 == 3)
    train, val = split_cases(cases)
    assert len(train) == 2 + 2 + 1 and len(val) == 1
    assert check_config(config).ok


def test_exported_case_needs_reviewed_classes(tmp_path):
    with pytest.raises(InputError, match="nothing was reviewed"):
        read_dataset_file(tmp_path, missing_ok=True).upsert(
            {"id": "s", "image": "a.nii.gz", "label": "b.nii.gz", "annotated": []}
        )


def test_real_data_coverage_and_structure_masks(shared):
    abdomen = shared("data", "ct", "totalseg_abdomen")
    cta = shared("data", "ct", "totalseg_cta_crop")
    config = parse_config(
        {
            "name": "real",
            "datasets": [
                {
                    "name": "slab",
                    "type": "totalsegmentator",
                    "root": str(abdomen),
                    "image": "ct_upper_slab.nii.gz",
                    "label_file": "ct_upper_slab_labels_totalseg_v2.nii.gz",
                },
                {
                    "name": "cta",
                    "type": "totalsegmentator",
                    "root": str(cta),
                    "masks": "mask_{name}.nii.gz",
                    "labels": {"Aorta": ["aorta"], "Celiac Trunk": ["celiac_trunk"]},
                    "split": "val",
                },
            ],
        },
        ".",
    )
    report = check_config(config)
    assert report.ok, report.errors
    slab = report.coverage["slab"]
    # Default TotalSegmentator mapping: lung lobes -> lungs, IVC -> Postcava; no femur, no rectum.
    assert slab["Right Lung"] == [1, 1] and slab["Postcava"] == [1, 1] and slab["Liver"] == [1, 1]
    assert slab["Bladder"] == [1, 0]
    assert "Left Head of Femur" not in slab and "Rectum" not in slab
    assert report.coverage["cta"] == {"Aorta": [1, 1], "Celiac Trunk": [1, 1]}
    (slab_case, cta_case) = collect_cases(config)
    labels = read_case_labels(slab_case, sitk.ReadImage(str(slab_case.image)))
    raw = sitk.GetArrayFromImage(sitk.ReadImage(str(slab_case.label)))
    masks = class_masks(labels)
    np.testing.assert_array_equal(masks[16], np.isin(raw, [12, 13, 14]))  # right lung = three right lobes
    np.testing.assert_array_equal(masks[9], raw == 63)
    cta_masks = class_masks(read_case_labels(cta_case, sitk.ReadImage(str(cta_case.image))))
    truth = sitk.GetArrayFromImage(sitk.ReadImage(str(cta / "mask_celiac_trunk.nii.gz"))) > 0
    np.testing.assert_array_equal(cta_masks[25], truth)


def test_training_preprocessing_matches_the_engine(shared):
    """Image and label go through the engine's preprocessing maths; labels stay on the image's grid (nearest)."""
    import torch

    from training.transforms import preprocessing_transforms
    from UniversalSegLib.preprocessing import preprocess

    abdomen = shared("data", "ct", "totalseg_abdomen")
    config = parse_config(
        {
            "name": "p",
            "datasets": [
                {
                    "name": "slab",
                    "type": "totalsegmentator",
                    "root": str(abdomen),
                    "image": "ct_upper_slab.nii.gz",
                    "label_file": "ct_upper_slab_labels_totalseg_v2.nii.gz",
                    "labels": {"Liver": ["liver"]},
                }
            ],
        },
        ".",
    )
    (case,) = collect_cases(config)
    item = preprocessing_transforms(indices=False)(case.to_data())
    engine = preprocess(sitk.ReadImage(str(case.image))).image
    assert item["image"].shape == engine.shape
    assert torch.equal(torch.as_tensor(item["image"]), engine.as_tensor())
    label = torch.as_tensor(item["label"])
    assert label.dtype == torch.uint8 and label.shape[1:] == engine.shape[1:]
    # Liver voxels are where the engine-preprocessed image shows soft tissue (window-scaled 0.3-0.8).
    liver = label[0] == dict(item["targets"])[6][0][1]
    values = engine[0][liver]
    assert liver.sum() > 1000 and 0.3 < float(values.median()) < 0.8
