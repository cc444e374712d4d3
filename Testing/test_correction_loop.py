"""The pseudo-label correction loop: segments with provenance -> review/edit in Slicer -> export for training ->
fine-tune -> the model moves toward the corrections.

Logic tests run against the real MRML library (PyPI ``slicer-core``) with scenes set up as Slicer does
(:func:`UniversalSeg.createHeadlessScene`) and real CT crops from ``../shared``; edits are made through the MRML API,
as the Segment Editor's effects make them. The exported folder is read back with the training package's own reader.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO, require_slicer_core, shared_path

slicer = require_slicer_core()  # skips without slicer-core; fails in CI

sys.path.insert(0, str(REPO / "UniversalSeg"))
import UniversalSeg as US  # noqa: E402
from UniversalSegLib.catalog import ClassCatalog  # noqa: E402
from UniversalSegLib.imageio import write_seg_nrrd, write_summary  # noqa: E402
from UniversalSegLib.result import CroppedMask, ImageGeometry, SegmentationResult  # noqa: E402
from UniversalSegLib.training_export import OverlapError, read_dataset  # noqa: E402

CATALOG = ClassCatalog.default()
SPLEEN, LIVER, STOMACH, AORTA, LIVER_TUMOR = (
    CATALOG.lookup(n).index for n in ("spleen", "liver", "stomach", "aorta", "liver tumor")
)


# --------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture
def headless():
    return US.createHeadlessScene()


def _crop(tmp_path_factory, name: str, x: slice, y: slice) -> Path:
    image = sitk.ReadImage(str(shared_path("data", "ct", "totalseg_abdomen", "ct_upper_slab.nii.gz")))
    path = tmp_path_factory.mktemp("ct") / f"{name}.nii.gz"
    sitk.WriteImage(image[x, y, :], str(path))
    return path


@pytest.fixture(scope="module")
def ct_a(tmp_path_factory) -> Path:
    """A 48x40x30 crop (3 mm) of the real upper-abdomen CT slab."""
    return _crop(tmp_path_factory, "scan_a", slice(30, 78), slice(30, 70))


@pytest.fixture(scope="module")
def ct_b(tmp_path_factory) -> Path:
    """Another crop of the same slab: a second scan for the dataset."""
    return _crop(tmp_path_factory, "scan_b", slice(50, 98), slice(20, 60))


def load_volume(headless, path: Path, name: str = "CT"):
    volume = headless.logics["Volumes"].AddArchetypeVolume(str(path), name)
    assert volume is not None, f"Slicer could not load {path}"
    return volume


def box(shape, z=slice(None), y=slice(None), x=slice(None)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[z, y, x] = True
    return mask


def engine_result(ct_path: Path, masks: dict[int, np.ndarray], model: str = "tiny-model") -> SegmentationResult:
    geometry = ImageGeometry.of(sitk.ReadImage(str(ct_path)))
    return SegmentationResult(
        geometry=geometry,
        masks={i: CroppedMask.from_full(m) for i, m in masks.items()},
        catalog=CATALOG,
        model_name=model,
        model_licence="Apache-2.0",
        device="cpu",
        settings={"threshold": 0.5, "overlap": 0.0, "fast": True},
    )


def import_result(logic, volume, node, folder: Path, ct_path: Path, masks: dict[int, np.ndarray], model="tiny-model"):
    """Import masks exactly as the module imports the engine's output (one .seg.nrrd + summary)."""
    result = engine_result(ct_path, masks, model)
    segmentation = write_seg_nrrd(result, folder / "segmentation.seg.nrrd")
    summary = write_summary(result, folder / "summary.json")
    return logic.importEngineOutput(volume, node, summary, segmentation)


def edit_segment(segmentation_node, segment_id, volume, new_mask: np.ndarray) -> None:
    """Replace a segment's voxels through the MRML API, as the Segment Editor's effects do."""
    labelmap = US._orientedImageFromMask(new_mask, US._ijkToRas(volume))
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        labelmap, segmentation_node, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE
    )


def tag(segment, name):
    return US._getTag(segment, name)


def scene_with_corrections(headless, ct_path: Path, tmp_path: Path):
    """An AI segmentation of liver, spleen, liver tumour (inside the liver) and aorta; the user then erases part of
    the liver (edited), accepts the spleen (reviewed) and leaves tumour and aorta unchecked."""
    volume = load_volume(headless, ct_path)
    shape = volume.GetImageData().GetDimensions()[::-1]
    ai = {
        LIVER: box(shape, slice(2, 20), slice(5, 30), slice(3, 25)),
        SPLEEN: box(shape, slice(8, 16), slice(10, 20), slice(30, 45)),
        LIVER_TUMOR: box(shape, slice(6, 9), slice(10, 14), slice(8, 12)),
        AORTA: box(shape, slice(0, 30), slice(32, 36), slice(26, 30)),
    }
    logic = US.UniversalSegLogic(headless.scene)
    node = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "AI segmentation")
    report = import_result(logic, volume, node, tmp_path / "engine", ct_path, ai)
    edited_liver = ai[LIVER].copy()
    edited_liver[:, :, 15:] = False
    edit_segment(node, report.segmentIds[LIVER], volume, edited_liver)
    logic.markSegmentReviewed(node, report.segmentIds[SPLEEN])
    return volume, logic, node, report, ai, edited_liver


def expected_label_map(shape, masks: dict[int, np.ndarray]) -> np.ndarray:
    out = np.zeros(shape, dtype=np.uint8)
    for index, mask in masks.items():
        out[mask] = index
    return out


# ------------------------------------------------------------------------------------------- provenance, state
def test_segments_carry_provenance_and_an_mrml_edit_flips_the_state(headless, ct_a, tmp_path):
    volume = load_volume(headless, ct_a)
    shape = volume.GetImageData().GetDimensions()[::-1]
    masks = {
        LIVER: box(shape, slice(2, 20), slice(5, 30), slice(3, 25)),
        SPLEEN: box(shape, slice(8, 16), slice(10, 20), slice(30, 45)),
    }
    logic = US.UniversalSegLogic(headless.scene)
    node = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    report = import_result(logic, volume, node, tmp_path, ct_a, masks, model="my-model")
    liver_id, spleen_id = report.segmentIds[LIVER], report.segmentIds[SPLEEN]
    for index, segment_id in report.segmentIds.items():
        provenance = logic.segmentProvenance(node, segment_id)
        assert provenance["ClassIndex"] == str(index) and provenance["ClassName"] == CATALOG[index].file_stem
        assert provenance["Model"] == "my-model" and provenance["ModelLicence"] == "Apache-2.0"
        assert provenance["EngineVersion"] == US.ENGINE_VERSION and provenance["Created"]
        assert json.loads(provenance["Settings"])["threshold"] == 0.5
        assert provenance["Fingerprint"] == logic.segmentFingerprint(node, segment_id)
        assert logic.segmentState(node, segment_id) == US.STATE_AI
    rows = {r.segmentId: r for r in logic.segmentReview(node)}
    assert not any(r.annotated for r in rows.values())
    assert rows[liver_id].reason == "AI output, not reviewed" and rows[liver_id].stateText == "AI"

    # a paint stroke through the MRML API (one voxel added) flips the liver to "edited"; the spleen stays "ai"
    painted = masks[LIVER].copy()
    painted[25, 35, 40] = True
    edit_segment(node, liver_id, volume, painted)
    assert logic.segmentState(node, liver_id) == US.STATE_EDITED
    assert logic.segmentState(node, spleen_id) == US.STATE_AI
    assert logic.segmentProvenance(node, liver_id)["Model"] == "my-model"  # provenance stays with the edited mask

    # reviewing, the person's own segments, and the Segment Editor's "Flagged" status
    logic.markSegmentReviewed(node, spleen_id)
    segmentation = node.GetSegmentation()
    segmentation.AddEmptySegment("own_stomach", "Stomach", [0.5, 0.5, 0.5])
    segmentation.AddEmptySegment("notes", "My notes", [0.1, 0.2, 0.3])
    rows = {r.segmentId: r for r in logic.segmentReview(node)}
    assert (rows[liver_id].annotated, rows[liver_id].confirmation, rows[liver_id].stateText) == (
        True,
        "edited",
        "Edited",
    )
    assert (rows[spleen_id].annotated, rows[spleen_id].confirmation, rows[spleen_id].stateText) == (
        True,
        "reviewed",
        "Reviewed",
    )
    assert not rows["own_stomach"].annotated and "mark it reviewed" in rows["own_stomach"].reason
    assert rows["own_stomach"].className == "Stomach" and rows["own_stomach"].state == US.STATE_MANUAL
    assert not rows["notes"].annotated and rows["notes"].classIndex is None and "not a class" in rows["notes"].reason
    logic.markSegmentReviewed(node, "own_stomach")
    row = {r.segmentId: r for r in logic.segmentReview(node)}["own_stomach"]
    assert (row.annotated, row.confirmation, row.stateText) == (True, "manual", "Manual, reviewed")
    seglogic = slicer.vtkSlicerSegmentationsModuleLogic
    seglogic.SetSegmentStatus(segmentation.GetSegment(liver_id), seglogic.Flagged)
    row = {r.segmentId: r for r in logic.segmentReview(node)}[liver_id]
    assert not row.annotated and row.reason == "flagged in the Segment Editor" and row.stateText == "Edited, flagged"


# ------------------------------------------------------------------------------------------------------ export
def test_export_writes_ct_label_map_of_confirmed_classes_and_the_entry(headless, ct_a, tmp_path):
    volume, logic, node, report, ai, edited_liver = scene_with_corrections(headless, ct_a, tmp_path)
    export = tmp_path / "export"
    result = logic.exportForTraining(volume, node, export, datasetName="test corrections")

    # the CT: same voxels, same grid as the file Slicer loaded
    original = sitk.ReadImage(str(ct_a))
    written = sitk.ReadImage(str(result.image))
    assert result.image == export / "images" / "CT.nii.gz" and result.case_id == "CT"
    assert written.GetPixelID() == original.GetPixelID()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(original))
    np.testing.assert_allclose(written.GetSpacing(), original.GetSpacing(), atol=1e-5)
    np.testing.assert_allclose(written.GetOrigin(), original.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(written.GetDirection(), original.GetDirection(), atol=1e-6)

    # the label map: catalog values, only the edited liver and the reviewed spleen (not tumour, not aorta)
    labels = sitk.ReadImage(str(result.label))
    assert result.label == export / "labels" / "CT.nii.gz" and not result.masks
    assert labels.GetPixelID() == sitk.sitkUInt8
    expected = expected_label_map(edited_liver.shape, {LIVER: edited_liver, SPLEEN: ai[SPLEEN]})
    np.testing.assert_array_equal(sitk.GetArrayFromImage(labels), expected)
    assert set(np.unique(sitk.GetArrayFromImage(labels))) == {0, SPLEEN, LIVER}
    assert (labels.GetOrigin(), labels.GetSpacing(), labels.GetDirection()) == (
        written.GetOrigin(),
        written.GetSpacing(),
        written.GetDirection(),
    )

    # the dataset entry
    doc = json.loads((export / "dataset.json").read_text())
    assert doc["format"] == "universalseg-training-dataset" and doc["format_version"] == 1
    assert doc["label_values"] == "catalog" and doc["name"] == "test corrections"
    assert doc["labels"][str(LIVER)] == "Liver" and doc["labels"]["0"] == "background"
    (entry,) = doc["cases"]
    assert entry["id"] == "CT" and entry["image"] == "images/CT.nii.gz" and entry["label"] == "labels/CT.nii.gz"
    assert entry["annotated"] == ["Spleen", "Liver"] and entry["split"] == "train" and "masks" not in entry
    classes = entry["provenance"]["classes"]
    assert classes["Liver"]["confirmation"] == "edited" and classes["Spleen"]["confirmation"] == "reviewed"
    assert classes["Liver"]["model"] == "tiny-model" and classes["Spleen"]["reviewed"]
    assert entry["provenance"]["voxels"] == {"Spleen": int(ai[SPLEEN].sum()), "Liver": int(edited_liver.sum())}
    assert entry["provenance"]["volume"] == "CT" and len(entry["provenance"]["image_sha256"]) == 64
    assert result.annotated == ["Spleen", "Liver"]
    assert result.skipped == {"Liver Tumor": "AI output, not reviewed", "Aorta": "AI output, not reviewed"}
    assert "Annotated: Spleen (reviewed), Liver (edited)" in result.to_text()

    # the training package reads it: exactly these classes annotated, the same masks, everything else not annotated
    from training.config import parse_config
    from training.datasets import class_masks, collect_cases, read_case_labels, read_exported

    assert read_exported(export)[1]["cases"] == doc["cases"]
    config = parse_config(
        {"name": "t", "datasets": [{"name": "corrections", "type": "exported", "path": str(export)}]}, tmp_path
    )
    (case,) = collect_cases(config)
    assert case.annotated == (SPLEEN, LIVER) and case.split == "train"
    masks = class_masks(read_case_labels(case, sitk.ReadImage(str(case.image))))
    assert sorted(masks) == [SPLEEN, LIVER]
    np.testing.assert_array_equal(masks[LIVER], edited_liver)
    np.testing.assert_array_equal(masks[SPLEEN], ai[SPLEEN])


def test_export_keeps_an_oblique_grid(headless, ct_a, tmp_path):
    """Slicer's IJK-to-RAS geometry of an oblique CT becomes the same LPS grid in the exported files."""
    image = sitk.ReadImage(str(ct_a))
    angle = np.radians(12.0)
    rotation = np.array([[np.cos(angle), 0, -np.sin(angle)], [0, 1, 0], [np.sin(angle), 0, np.cos(angle)]])
    image.SetDirection((rotation @ np.asarray(image.GetDirection()).reshape(3, 3)).ravel().tolist())
    image.SetSpacing((3.0, 2.5, 2.0))
    oblique = tmp_path / "oblique.nii.gz"
    sitk.WriteImage(image, str(oblique))
    volume = load_volume(headless, oblique, "oblique scan")
    shape = volume.GetImageData().GetDimensions()[::-1]
    logic = US.UniversalSegLogic(headless.scene)
    node = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    liver = box(shape, slice(3, 12), slice(4, 30), slice(5, 20))
    report = import_result(logic, volume, node, tmp_path / "engine", oblique, {LIVER: liver})
    logic.markSegmentReviewed(node, report.segmentIds[LIVER])
    result = logic.exportForTraining(volume, node, tmp_path / "export")
    assert result.case_id == "oblique_scan"
    from training.datasets import geometry_mismatch

    original = sitk.ReadImage(str(oblique))
    for path in (result.image, result.label):
        written = sitk.ReadImage(str(path))
        assert geometry_mismatch(original, written) is None, path
        np.testing.assert_allclose(written.GetDirection(), original.GetDirection(), atol=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(result.label))), liver * LIVER)


def test_reexport_replaces_the_entry_and_scans_accumulate(headless, ct_a, ct_b, tmp_path):
    volume, logic, node, report, ai, edited_liver = scene_with_corrections(headless, ct_a, tmp_path / "a")
    export = tmp_path / "export"
    first = logic.exportForTraining(volume, node, export)
    assert first.replaced is None and first.case_count == 1

    # a second scan, also named "CT" in its scene: it gets its own entry, never replacing the first scan's
    other = US.createHeadlessScene()
    volume_b, logic_b, node_b, report_b, ai_b, _ = scene_with_corrections(other, ct_b, tmp_path / "b")
    second = logic_b.exportForTraining(volume_b, node_b, export, split="val")
    assert second.case_id.startswith("CT_") and second.case_id != "CT" and second.case_count == 2
    # a case ID that holds another scan is refused
    with pytest.raises(US.InputError, match="already holds another scan"):
        logic_b.exportForTraining(volume_b, node_b, export, caseId="CT")

    # the first scan again, after reviewing the tumour (inside the liver: per-class masks) -> entry replaced
    logic.markSegmentReviewed(node, report.segmentIds[LIVER_TUMOR])
    with pytest.raises(OverlapError, match="Liver and Liver Tumor"):
        logic.exportForTraining(volume, node, export)
    again = logic.exportForTraining(volume, node, export, allowPerClassMasks=True)
    assert again.case_id == "CT" and again.replaced == "CT" and again.case_count == 2
    doc = read_dataset(export)
    assert [c["id"] for c in doc["cases"]] == [second.case_id, "CT"]
    entry = doc["cases"][1]
    assert entry["annotated"] == ["Spleen", "Liver", "Liver Tumor"] and "label" not in entry
    assert entry["masks"] == {
        "Spleen": "masks/CT/spleen.nii.gz",
        "Liver": "masks/CT/liver.nii.gz",
        "Liver Tumor": "masks/CT/liver_tumor.nii.gz",
    }
    assert not (export / "labels" / "CT.nii.gz").exists()  # the replaced entry's label map is gone
    assert (export / "labels" / f"{second.case_id}.nii.gz").exists()  # the other scan's files are untouched
    for name, mask in (("liver", edited_liver), ("liver_tumor", ai[LIVER_TUMOR]), ("spleen", ai[SPLEEN])):
        written = sitk.GetArrayFromImage(sitk.ReadImage(str(export / "masks" / "CT" / f"{name}.nii.gz")))
        assert written.dtype == np.uint8
        np.testing.assert_array_equal(written, mask.astype(np.uint8))

    # the same scan under a new case ID replaces its old entry too (a scan is never in the dataset twice)
    renamed = logic.exportForTraining(volume, node, export, caseId="patient_017", allowPerClassMasks=True)
    assert renamed.replaced == "CT" and renamed.case_count == 2
    assert [c["id"] for c in read_dataset(export)["cases"]] == [second.case_id, "patient_017"]
    assert not (export / "masks" / "CT").exists() and not (export / "images" / "CT.nii.gz").exists()

    # training sees both scans, the overlapping classes through their masks, the held-out one as validation
    from training.config import parse_config
    from training.datasets import class_masks, collect_cases, read_case_labels, split_cases

    config = parse_config(
        {"name": "t", "datasets": [{"name": "corrections", "type": "exported", "path": str(export)}]}, tmp_path
    )
    train, val = split_cases(collect_cases(config))
    assert [c.case_id for c in train] == ["patient_017"] and [c.case_id for c in val] == [second.case_id]
    masks = class_masks(read_case_labels(train[0], sitk.ReadImage(str(train[0].image))))
    np.testing.assert_array_equal(masks[LIVER], edited_liver)
    np.testing.assert_array_equal(masks[LIVER_TUMOR], ai[LIVER_TUMOR])

    # taking a scan out of the dataset removes its entry and its files
    from UniversalSegLib.training_export import remove_case

    assert remove_case(export, second.case_id) and not remove_case(export, second.case_id)
    assert [c["id"] for c in read_dataset(export)["cases"]] == ["patient_017"]
    assert sorted(p.name for p in (export / "images").iterdir()) == ["patient_017.nii.gz"]
    assert not any((export / "labels").iterdir())


def test_export_refusals(headless, ct_a, tmp_path):
    volume = load_volume(headless, ct_a)
    shape = volume.GetImageData().GetDimensions()[::-1]
    logic = US.UniversalSegLogic(headless.scene)
    node = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    report = import_result(
        logic,
        volume,
        node,
        tmp_path / "engine",
        ct_a,
        {
            LIVER: box(shape, slice(2, 20), slice(5, 30), slice(3, 25)),
            LIVER_TUMOR: box(shape, slice(6, 9), slice(10, 14), slice(8, 12)),
        },
    )
    export = tmp_path / "export"

    # nothing reviewed or edited
    with pytest.raises(US.InputError, match="nothing to export: no segment of 'seg' was reviewed or edited"):
        logic.exportForTraining(volume, node, export)
    assert not export.exists()

    # confirmed segments overlap: refused, per-class masks offered
    for index in (LIVER, LIVER_TUMOR):
        logic.markSegmentReviewed(node, report.segmentIds[index])
    with pytest.raises(OverlapError, match=r"Liver and Liver Tumor \(48 voxels\).*per-class masks") as caught:
        logic.exportForTraining(volume, node, export)
    assert caught.value.overlaps == [("Liver", "Liver Tumor", 48)]
    assert not (export / "dataset.json").exists()

    # the folder cannot be written: a path below a file (as root permission bits do not stop writes), read-only
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(US.InputError, match="not writable"):
        logic.exportForTraining(volume, node, blocker / "export", allowPerClassMasks=True)
    with pytest.raises(US.InputError, match="is a file"):
        logic.exportForTraining(volume, node, blocker, allowPerClassMasks=True)
    if os.name == "posix" and os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        try:
            with pytest.raises(US.InputError, match="not writable"):
                logic.exportForTraining(volume, node, locked, allowPerClassMasks=True)
        finally:
            locked.chmod(0o700)
    with pytest.raises(US.InputError, match="no export folder"):
        logic.exportForTraining(volume, node, "", allowPerClassMasks=True)

    # a folder holding some other JSON dataset, a bad case ID, two confirmed segments of one class
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "dataset.json").write_text(json.dumps({"name": "Task03", "training": []}))
    with pytest.raises(US.InputError, match="not a UniversalSeg training dataset"):
        logic.exportForTraining(volume, node, foreign, allowPerClassMasks=True)
    with pytest.raises(US.InputError, match="cannot be used as a file name"):
        logic.exportForTraining(volume, node, export, caseId="../up", allowPerClassMasks=True)
    node.GetSegmentation().AddEmptySegment("liver_2", "Liver", [0.5, 0.5, 0.5])
    logic.markSegmentReviewed(node, "liver_2")
    with pytest.raises(US.InputError, match=r"2 confirmed segments are Liver \('Liver', 'Liver'\); delete or unmark"):
        logic.exportForTraining(volume, node, export, allowPerClassMasks=True)
    assert not (export / "dataset.json").exists()


def test_segments_loaded_from_an_engine_file_can_be_tracked(headless, ct_a, tmp_path):
    """The batch path: `universalseg segment` writes .seg.nrrd files, Slicer loads one, the module tracks it."""
    volume = load_volume(headless, ct_a)
    shape = volume.GetImageData().GetDimensions()[::-1]
    liver = box(shape, slice(2, 20), slice(5, 30), slice(3, 25))
    spleen = box(shape, slice(8, 16), slice(10, 20), slice(30, 45))
    path = write_seg_nrrd(engine_result(ct_a, {LIVER: liver, SPLEEN: spleen}), tmp_path / "scan.seg.nrrd")
    node = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "loaded")
    storage = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    node.SetAndObserveStorageNodeID(storage.GetID())
    assert storage.ReadData(node)
    logic = US.UniversalSegLogic(headless.scene)
    assert set(logic.segmentStates(node).values()) == {US.STATE_MANUAL}

    tracked = logic.trackSegments(node, model="/models/universalseg-tiny.safetensors")
    assert sorted(tracked) == ["liver", "spleen"]
    assert logic.trackSegments(node) == []  # already tracked
    assert logic.moduleSegments(node) == {SPLEEN: "spleen", LIVER: "liver"}
    assert logic.segmentProvenance(node, "liver")["Model"] == "universalseg-tiny.safetensors"
    assert logic.segmentStates(node) == {"spleen": US.STATE_AI, "liver": US.STATE_AI}
    corrected = liver.copy()
    corrected[:, :10] = False
    edit_segment(node, "liver", volume, corrected)
    assert logic.segmentState(node, "liver") == US.STATE_EDITED
    result = logic.exportForTraining(volume, node, tmp_path / "export")
    assert result.annotated == ["Liver"]
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(result.label))), corrected * LIVER)


def test_fine_tune_config_combines_export_and_original_data(headless, ct_a, tmp_path, shared):
    """`fit` fine-tunes from a checkpoint on an export plus the original data: the config parses, both datasets'
    cases are collected with their own annotated classes, and `check` accepts them."""
    volume, logic, node, _report, _ai, _edited = scene_with_corrections(headless, ct_a, tmp_path)
    export = tmp_path / "export"
    logic.exportForTraining(volume, node, export)
    abdomen = shared("data", "ct", "totalseg_abdomen")
    from training.check import check_config
    from training.config import parse_config
    from training.datasets import collect_cases

    config = parse_config(
        {
            "name": "finetune",
            "model": {"init": str(tmp_path / "start.safetensors")},
            "datasets": [
                {"name": "corrections", "type": "exported", "path": str(export), "weight": 2},
                {
                    "name": "original",
                    "type": "totalsegmentator",
                    "root": str(abdomen),
                    "image": "ct_upper_slab.nii.gz",
                    "label_file": "ct_upper_slab_labels_totalseg_v2.nii.gz",
                    "labels": {"Liver": ["liver"], "Aorta": ["aorta"]},
                },
            ],
        },
        tmp_path,
    )
    assert config.model.init == str(tmp_path / "start.safetensors")
    corrections, original = collect_cases(config)
    assert corrections.annotated == (SPLEEN, LIVER) and corrections.weight == 2
    assert original.annotated == (LIVER, AORTA)
    report = check_config(config)
    assert report.ok, report.errors


# ------------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
def test_correction_loop_end_to_end(headless, tmp_path, capsys):
    """Segment a real CT crop with a tiny model, replace its liver by a reference liver mask (the correction), export,
    fine-tune the model from its checkpoint with `universalseg-train fit`, and check that the model's liver output
    moved toward the correction; then `universalseg-train evaluate` compares both models on the export.

    The fine-tuning runs at 3 mm with one crop covering the whole scan, and the Dice is taken on that grid by the
    training's validation (before: step 0, after: the last step), so the crop statistics during training and
    scoring match and a few steps are enough. The engine's evaluation (1.5 mm, 96^3 windows) is run and checked for
    scoring the exported correction, but its "after" Dice is not asserted: fifteen steps on one scan at another
    spacing and window size do not generalise reliably. About 40 s on two idle CPU cores.
    """
    import torch

    from training.cli import main as train_main
    from UniversalSegLib.checkpoints import load_checkpoint, read_checkpoint_metadata, save_checkpoint
    from UniversalSegLib.networks.universal_model import ModelConfig, UniversalModel
    from UniversalSegLib.pipeline import Engine, SegmentationOptions

    slab = shared_path("data", "ct", "totalseg_abdomen")
    names = json.loads(shared_path("data", "ct", "totalsegmentator_v2_total_classes.json").read_text())
    liver_value = int(next(v for v, n in names.items() if n == "liver"))
    crop = (slice(40, 88), slice(30, 70), slice(None))  # 48x40x30 voxels at 3 mm, about a quarter of it liver
    ct_path = tmp_path / "ct_crop.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(slab / "ct_upper_slab.nii.gz"))[crop], str(ct_path))
    reference = sitk.ReadImage(str(slab / "ct_upper_slab_labels_totalseg_v2.nii.gz"))[crop]
    correction = sitk.GetArrayFromImage(reference) == liver_value
    assert 0.1 < correction.mean() < 0.4

    # the tiny model, as a checkpoint: this is "the model before"
    torch.manual_seed(0)
    model = UniversalModel(ModelConfig("unet", 4))
    embeddings = torch.load(shared_path("reference", "clip_txt_encoding_32.pth"), map_location="cpu", weights_only=True)
    model.organ_embedding.copy_(embeddings.float())
    model.class_names = CATALOG.names
    model.metadata = {"name": "tiny-before", "licence": "Apache-2.0"}
    before = save_checkpoint(model, tmp_path / "before.safetensors")

    # 1. segment (the engine, in this process) and import into Slicer as the module does
    volume = load_volume(headless, ct_path)
    logic = US.UniversalSegLogic(headless.scene)
    node = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "AI")
    result = Engine(model, SegmentationOptions(device="cpu", fast=True)).segment(str(ct_path), ["liver", "spleen"])
    segmentation = write_seg_nrrd(result, tmp_path / "engine" / "segmentation.seg.nrrd")
    summary = write_summary(result, tmp_path / "engine" / "summary.json")
    imported = logic.importEngineOutput(volume, node, summary, segmentation)
    liver_id = imported.segmentIds[LIVER]
    assert logic.segmentProvenance(node, liver_id)["Model"] == "tiny-before"
    assert logic.segmentState(node, liver_id) == US.STATE_AI

    # 2. correct the liver (the reference mask replaces the AI mask), leave the spleen unreviewed; 3. export
    ai_liver = logic.segmentArray(node, liver_id, volume)
    edit_segment(node, liver_id, volume, correction)
    assert logic.segmentState(node, liver_id) == US.STATE_EDITED
    export = tmp_path / "export"
    exported = logic.exportForTraining(volume, node, export, caseId="slab", split="both")
    assert exported.annotated == ["Liver"] and exported.skipped == {"Spleen": "AI output, not reviewed"}
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(exported.label))), correction * LIVER)

    # 4. fine-tune from the checkpoint on the export with the training command line
    config = tmp_path / "finetune.json"
    config.write_text(
        json.dumps(
            {
                "name": "corrections",
                "output": str(tmp_path / "run"),
                "spacing": [3.0, 3.0, 3.0],
                "augmentation": {
                    "num_samples": 1,
                    "pos": 1,
                    "neg": 0,
                    "flip_prob": 0,
                    "rotate_prob": 0,
                    "intensity_shift_prob": 0,
                    "intensity_scale_prob": 0,
                },
                "training": {
                    "max_steps": 15,
                    "crop_size": [48, 48, 32],
                    "lr": 0.003,
                    "warmup_steps": 1,
                    "log_every": 5,
                    "checkpoint_every": 100,
                    "checkpoint_minutes": None,
                },
                "validation": {"every": 0, "roi_size": [48, 48, 32], "overlap": 0.0},
                "datasets": [{"name": "corrections", "type": "exported", "path": str(export)}],
            }
        )
    )
    assert train_main(["fit", str(config), "--init", str(before), "--threads", "2", "--no-progress"]) == 0
    fit_summary = json.loads((tmp_path / "run" / "fit_summary.json").read_text())
    first, last = fit_summary["validation_first"], fit_summary["validation_last"]
    assert (first["step"], last["step"]) == (0, 15)
    dice_before, dice_after = first["dice"]["Liver"], last["dice"]["Liver"]
    print(f"validation Dice of the liver to the correction: {dice_before:.3f} -> {dice_after:.3f}")
    assert dice_after > dice_before + 0.2 and dice_after > 0.7, (dice_before, dice_after)

    after = tmp_path / "run" / "model.safetensors"
    tuned = load_checkpoint(after)
    assert tuned.class_names == CATALOG.names  # all classes kept; only the liver was trained
    meta = read_checkpoint_metadata(after)
    assert meta["provenance"]["init"] == str(before.resolve())
    assert [(d["dataset"], d["type"], d["annotated_classes"]) for d in meta["training_data"]] == [
        ("corrections", "exported", ["Liver"])
    ]

    # 5. compare both models on the exported scan with the engine (as users run them)
    report_dir = tmp_path / "evaluation"
    assert (
        train_main(
            [
                "evaluate",
                str(config),
                "--split",
                "val",
                "--model",
                str(before),
                "--model",
                str(after),
                "--classes",
                "liver",
                "--fast",
                "--device",
                "cpu",
                "--output",
                str(report_dir),
            ]
        )
        == 0
    )
    evaluation = json.loads((report_dir / "evaluation.json").read_text())
    assert evaluation["models"] == [str(before), str(after)] and evaluation["cases"] == ["corrections/slab"]
    for model_ref in evaluation["models"]:
        scores = evaluation["per_case"][model_ref]["corrections/slab"]
        assert list(scores) == ["Liver"] and scores["Liver"]["reference_voxels"] == int(correction.sum())
        # Dice = 2|P&R| / (|P| + |R|): the overlap it implies is a whole number of voxels, at most the smaller mask
        p, r = scores["Liver"]["predicted_voxels"], scores["Liver"]["reference_voxels"]
        overlap = scores["Liver"]["dice"] * (p + r) / 2
        assert overlap == pytest.approx(round(overlap), abs=1e-2) and 0 <= round(overlap) <= min(p, r), (p, r, overlap)
    predicted = [
        evaluation["per_case"][m]["corrections/slab"]["Liver"]["predicted_voxels"] for m in evaluation["models"]
    ]
    assert predicted[0] == int(np.count_nonzero(ai_liver)) and predicted[1] != predicted[0]  # each model scored
    # the "before" score is exactly that of the AI liver the user corrected (same engine, model and settings)
    ai_dice = 2 * np.count_nonzero(ai_liver & correction) / (np.count_nonzero(ai_liver) + np.count_nonzero(correction))
    assert evaluation["per_case"][str(before)]["corrections/slab"]["Liver"]["dice"] == pytest.approx(ai_dice, abs=1e-5)
    assert "Dice change" in (report_dir / "evaluation.md").read_text()
