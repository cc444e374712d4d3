"""The Slicer module's Logic against the real MRML library (PyPI package ``slicer-core``), without the application.

Scenes are set up as Slicer does at start-up (:func:`UniversalSeg.createHeadlessScene`); volumes are real CTs from
``../shared`` loaded through ``vtkSlicerVolumesLogic``. Engine results are either written with the engine's own
writers (fast, exact masks chosen by the test) or produced by the real command line with a tiny random-weight model.
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from datetime import datetime
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import vtk

from conftest import REPO, require_slicer_core, shared_path

slicer = require_slicer_core()  # skips without slicer-core; fails in CI

sys.path.insert(0, str(REPO / "UniversalSeg"))
import UniversalSeg as US  # noqa: E402  (the module script, importable without the Slicer application)
from UniversalSegLib.catalog import ClassCatalog  # noqa: E402
from UniversalSegLib.imageio import read_seg_nrrd, write_seg_nrrd, write_summary  # noqa: E402
from UniversalSegLib.result import CroppedMask, ImageGeometry, SegmentationResult  # noqa: E402

CATALOG = ClassCatalog.default()
LIVER, SPLEEN, STOMACH, AORTA, LIVER_TUMOR, KIDNEY_CYST = (
    CATALOG.lookup(n).index for n in ("liver", "spleen", "stomach", "aorta", "liver tumor", "kidney cyst")
)


# --------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture
def headless():
    return US.createHeadlessScene()


@pytest.fixture(scope="session")
def ct_crop(tmp_path_factory) -> Path:
    """A 48x40x30 crop (3 mm) of the real upper-abdomen CT slab: small enough for one network window."""
    image = sitk.ReadImage(str(shared_path("data", "ct", "totalseg_abdomen", "ct_upper_slab.nii.gz")))
    path = tmp_path_factory.mktemp("ct") / "ct_crop.nii.gz"
    sitk.WriteImage(image[30:78, 30:70, :], str(path))
    return path


@pytest.fixture(scope="session")
def ct_oblique(ct_crop, tmp_path_factory) -> Path:
    """The same crop with its axes rotated by 10 degrees about z: geometry must survive an oblique grid."""
    image = sitk.ReadImage(str(ct_crop))
    angle = math.radians(10.0)
    rotation = np.array([[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]])
    image.SetDirection((rotation @ np.asarray(image.GetDirection()).reshape(3, 3)).ravel().tolist())
    path = tmp_path_factory.mktemp("ct") / "ct_oblique.nii.gz"
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A width-4 U-Net Universal Model with random weights and the real class embeddings (project format)."""
    import torch

    from UniversalSegLib.checkpoints import save_checkpoint
    from UniversalSegLib.networks.universal_model import ModelConfig, UniversalModel

    torch.manual_seed(0)
    model = UniversalModel(ModelConfig("unet", 4))
    embeddings = torch.load(shared_path("reference", "clip_txt_encoding_32.pth"), map_location="cpu", weights_only=True)
    model.organ_embedding.copy_(embeddings.float())
    model.class_names = CATALOG.names
    model.metadata = {"name": "tiny-test"}
    return save_checkpoint(model, tmp_path_factory.mktemp("model") / "tiny.safetensors")


def load_volume(headless, path: Path, name: str = "CT"):
    volume = headless.logics["Volumes"].AddArchetypeVolume(str(path), name)
    assert volume is not None, f"Slicer could not load {path}"
    return volume


def box_mask(shape, z=slice(None), y=slice(None), x=slice(None)) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[z, y, x] = True
    return mask


def write_result(
    folder: Path, ct_path: Path, masks: dict[int, np.ndarray], model: str = "synthetic-model"
) -> tuple[Path, Path]:
    """Write masks as the engine does for the module (one .seg.nrrd + summary), on the CT file's grid."""
    geometry = ImageGeometry.of(sitk.ReadImage(str(ct_path)))
    result = SegmentationResult(
        geometry=geometry,
        masks={i: CroppedMask.from_full(m) for i, m in masks.items()},
        catalog=CATALOG,
        model_name=model,
        model_licence="test licence",
        device="cpu",
        settings={"threshold": 0.5, "overlap": 0.5, "fast": False},
    )
    segmentation = write_seg_nrrd(result, folder / "segmentation.seg.nrrd")
    summary = write_summary(result, folder / "summary.json")
    return summary, segmentation


def ijk_to_ras(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def labelmap_geometry(segmentation_node, segment_id) -> np.ndarray:
    labelmap = segmentation_node.GetSegmentation().GetSegment(segment_id).GetRepresentation(US.BINARY_LABELMAP)
    matrix = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def tag(segment, name):
    return US._getTag(segment, name)


def edit_segment(logic, segmentation_node, segment_id, volume, new_mask: np.ndarray) -> None:
    """Change a segment's voxels through the MRML API, as the Segment Editor's effects do."""
    labelmap = US._orientedImageFromMask(new_mask, US._ijkToRas(volume))
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        labelmap, segmentation_node, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE
    )


def new_segmentation(headless, name="Segmentation"):
    return headless.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)


# ------------------------------------------------------------------------------------------------ the module
def test_module_imports_without_the_application(headless):
    assert US.IN_SLICER_APP is False and US.HAVE_SLICER_GUI is False
    for name in ("UniversalSeg", "UniversalSegWidget", "UniversalSegLogic", "UniversalSegTest"):
        assert isinstance(getattr(US, name), type)
    with pytest.raises(ValueError, match="needs an MRML scene"):
        US.UniversalSegLogic()
    assert US.UniversalSegLogic(headless.scene).scene is headless.scene


def test_provided_classes_mark_what_the_model_lacks(headless, tiny_model, tmp_path):
    """The class picker greys out classes the chosen model does not provide and shows their held-out Dice."""
    import torch

    from UniversalSegLib.checkpoints import save_checkpoint
    from UniversalSegLib.networks.universal_model import ModelConfig, UniversalModel

    logic = US.UniversalSegLogic(headless.scene)
    assert set(logic.providedClasses(str(tiny_model))) == {c.file_stem for c in CATALOG}
    assert logic.providedClasses("universal-unet") is None  # official: all 32, known without downloading it
    torch.manual_seed(0)
    small = UniversalModel(ModelConfig("unet", 4), num_classes=2)
    small.class_names = ["Liver", "Right Kidney"]
    small.metadata = {"held_out": {"dice": {"Liver": 0.91, "Right Kidney": 0.84}, "floor": 0.6}}
    path = save_checkpoint(small, tmp_path / "two.safetensors")
    assert logic.providedClasses(str(path)) == {"liver": 0.91, "right_kidney": 0.84}
    bundled = logic.providedClasses("")  # the default model
    assert bundled and set(bundled) < {c.file_stem for c in CATALOG}


# ------------------------------------------------------------------------------------------------- importing
def test_import_names_colours_terminology_geometry(headless, ct_oblique, tmp_path):
    volume = load_volume(headless, ct_oblique)
    shape = volume.GetImageData().GetDimensions()[::-1]  # (K, J, I)
    masks = {
        LIVER: box_mask(shape, slice(2, 20), slice(5, 30), slice(3, 25)),
        SPLEEN: box_mask(shape, slice(8, 16), slice(10, 20), slice(30, 45)),
        LIVER_TUMOR: box_mask(shape, slice(6, 9), slice(10, 14), slice(8, 12)),  # inside the liver: overlap
        KIDNEY_CYST: np.zeros(shape, dtype=bool),
    }
    summary, masks_dir = write_result(tmp_path, ct_oblique, masks)
    # put the volume under a patient/study, as DICOM loading does
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(headless.scene)
    patient = sh.CreateSubjectItem(sh.GetSceneItemID(), "Patient")
    study = sh.CreateStudyItem(patient, "Study")
    sh.CreateItem(study, volume)

    logic = US.UniversalSegLogic(headless.scene)
    segmentation_node = new_segmentation(headless)
    report = logic.importEngineOutput(volume, segmentation_node, summary, masks_dir)

    expected = [CATALOG[i] for i in sorted(masks)]
    assert report.added == [info.name for info in expected]
    assert report.empty == ["Kidney Cyst"] and not report.kept and not report.updated
    segmentation = segmentation_node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 4
    assert [segmentation.GetNthSegment(i).GetName() for i in range(4)] == [info.name for info in expected]
    volume_matrix = ijk_to_ras(volume)
    assert abs(volume_matrix[0, 1]) > 0.1, "the test volume should be oblique"
    for info in expected:
        segment_id = report.segmentIds[info.index]
        segment = segmentation.GetSegment(segment_id)
        assert segment_id == info.file_stem
        assert segment.GetColor() == pytest.approx(tuple(c / 255 for c in info.color))
        assert tag(segment, slicer.vtkSegment.GetTerminologyEntryTagName()) == CATALOG.slicer_terminology(info)
        assert tag(segment, US.TAG_CLASS_INDEX) == str(info.index)
        assert tag(segment, US.TAG_CLASS_NAME) == info.file_stem
        assert tag(segment, US.TAG_MODEL) == "synthetic-model"
        assert tag(segment, US.TAG_MODEL_LICENCE) == "test licence"
        assert tag(segment, US.TAG_ENGINE_VERSION) == US.ENGINE_VERSION
        assert datetime.fromisoformat(tag(segment, US.TAG_CREATED)).tzinfo is not None
        assert json.loads(tag(segment, US.TAG_SETTINGS))["threshold"] == 0.5
        assert logic.segmentState(segmentation_node, segment_id) == US.STATE_AI
        # exactly the volume's grid, and exactly the engine's voxels (overlap of tumour and liver kept)
        assert np.array_equal(labelmap_geometry(segmentation_node, segment_id), volume_matrix)
        assert np.array_equal(logic.segmentArray(segmentation_node, segment_id, volume), masks[info.index])
    assert segmentation_node.GetNodeReference(segmentation_node.GetReferenceImageGeometryReferenceRole()) is volume
    assert sh.GetItemParent(sh.GetItemByDataNode(segmentation_node)) == study
    assert segmentation_node.GetDisplayNode() is not None


def test_import_rejects_masks_on_another_grid(headless, ct_crop, ct_oblique, tmp_path):
    volume = load_volume(headless, ct_crop)
    shape = volume.GetImageData().GetDimensions()[::-1]
    summary, masks_dir = write_result(tmp_path, ct_oblique, {LIVER: box_mask(shape, slice(0, 5))})
    segmentation_node = new_segmentation(headless)
    with pytest.raises(US.EngineError, match="not on the input volume's voxel grid"):
        US.UniversalSegLogic(headless.scene).importEngineOutput(volume, segmentation_node, summary, masks_dir)
    assert segmentation_node.GetSegmentation().GetNumberOfSegments() == 0


def test_fingerprint_ignores_storage_but_sees_every_voxel(headless, ct_crop, tmp_path):
    volume = load_volume(headless, ct_crop)
    shape = volume.GetImageData().GetDimensions()[::-1]
    liver = box_mask(shape, slice(2, 20), slice(5, 30), slice(3, 25))
    spleen = box_mask(shape, slice(8, 16), slice(10, 20), slice(30, 45))
    summary, masks_dir = write_result(tmp_path, ct_crop, {LIVER: liver, SPLEEN: spleen})
    logic = US.UniversalSegLogic(headless.scene)
    node = new_segmentation(headless)
    report = logic.importEngineOutput(volume, node, summary, masks_dir)
    liver_id, spleen_id = report.segmentIds[LIVER], report.segmentIds[SPLEEN]
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfLayers() == 2  # the import stores each class's crop as a layer of its own
    before = logic.segmentFingerprint(node, liver_id)

    segmentation.CollapseBinaryLabelmaps(False)  # storage changes, voxels do not
    assert segmentation.GetNumberOfLayers() == 1  # both share one labelmap layer (no overlap)
    assert logic.segmentFingerprint(node, liver_id) == before
    assert logic.segmentState(node, liver_id) == US.STATE_AI
    segmentation.SeparateSegmentLabelmap(liver_id)
    assert segmentation.GetNumberOfLayers() == 2
    assert logic.segmentFingerprint(node, liver_id) == before
    segmentation.CollapseBinaryLabelmaps(False)

    one_voxel_less = liver.copy()
    one_voxel_less[10, 10, 10] = False
    edit_segment(logic, node, liver_id, volume, one_voxel_less)
    assert logic.segmentState(node, liver_id) == US.STATE_EDITED
    edit_segment(logic, node, liver_id, volume, liver)  # undo: the AI mask again
    assert logic.segmentState(node, liver_id) == US.STATE_AI
    assert logic.segmentState(node, spleen_id) == US.STATE_AI

    node.GetSegmentation().AddEmptySegment("notes", "My notes", [0.1, 0.2, 0.3])
    assert logic.segmentState(node, "notes") == US.STATE_MANUAL
    assert logic.segmentProvenance(node, "notes") == {}
    logic.markSegmentReviewed(node, spleen_id)
    assert logic.segmentState(node, spleen_id) == US.STATE_REVIEWED
    spleen_segment = segmentation.GetSegment(spleen_id)
    assert (
        slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentStatus(spleen_segment)
        == slicer.vtkSlicerSegmentationsModuleLogic.Completed
    )
    logic.markSegmentReviewed(node, spleen_id, reviewed=False)
    assert logic.segmentState(node, spleen_id) == US.STATE_AI
    # the Segment Editor's "Completed" status alone also counts as reviewed
    slicer.vtkSlicerSegmentationsModuleLogic.SetSegmentStatus(
        spleen_segment, slicer.vtkSlicerSegmentationsModuleLogic.Completed
    )
    assert logic.segmentState(node, spleen_id) == US.STATE_REVIEWED
    assert logic.segmentStates(node) == {liver_id: "ai", spleen_id: "reviewed", "notes": "manual"}


def _first_run(headless, ct_crop, tmp_path):
    """Import run A (liver, spleen, liver tumour, stomach-free), then a user's corrections."""
    volume = load_volume(headless, ct_crop)
    shape = volume.GetImageData().GetDimensions()[::-1]
    run_a = {
        LIVER: box_mask(shape, slice(2, 20), slice(5, 30), slice(3, 25)),
        SPLEEN: box_mask(shape, slice(8, 16), slice(10, 20), slice(30, 45)),
        LIVER_TUMOR: box_mask(shape, slice(6, 9), slice(10, 14), slice(8, 12)),
    }
    logic = US.UniversalSegLogic(headless.scene)
    node = new_segmentation(headless)
    report = logic.importEngineOutput(volume, node, *write_result(tmp_path / "a", ct_crop, run_a))
    # the user's corrections: erase part of the liver, accept the spleen as is, paint their own "Stomach"
    edited_liver = run_a[LIVER].copy()
    edited_liver[:, :12] = False
    edit_segment(logic, node, report.segmentIds[LIVER], volume, edited_liver)
    logic.markSegmentReviewed(node, report.segmentIds[SPLEEN])
    node.GetSegmentation().AddEmptySegment("my_stomach", "Stomach", [0.5, 0.5, 0.5])
    own_stomach = box_mask(shape, slice(20, 25), slice(30, 35), slice(30, 35))
    edit_segment(logic, node, "my_stomach", volume, own_stomach)
    # run B: every mask differs from run A; the tumour now overlaps the edited liver region; aorta is new
    run_b = {
        LIVER: box_mask(shape, slice(1, 22), slice(4, 32), slice(2, 27)),
        SPLEEN: box_mask(shape, slice(7, 17), slice(9, 22), slice(28, 46)),
        LIVER_TUMOR: box_mask(shape, slice(5, 12), slice(8, 16), slice(6, 14)),
        STOMACH: box_mask(shape, slice(10, 20), slice(25, 35), slice(20, 30)),
        AORTA: box_mask(shape, slice(0, 30), slice(30, 34), slice(22, 26)),
    }
    return volume, logic, node, report, edited_liver, own_stomach, run_b


def test_rerun_keeps_user_edits_and_updates_the_rest(headless, ct_crop, tmp_path):
    volume, logic, node, first, edited_liver, own_stomach, run_b = _first_run(headless, ct_crop, tmp_path)
    liver_fingerprint = logic.segmentFingerprint(node, first.segmentIds[LIVER])
    spleen_before = logic.segmentArray(node, first.segmentIds[SPLEEN], volume)
    assert logic.segmentState(node, first.segmentIds[LIVER]) == US.STATE_EDITED
    # the user renamed the tumour segment; that is not a mask edit
    node.GetSegmentation().GetSegment(first.segmentIds[LIVER_TUMOR]).SetName("Lesion 1")

    report = logic.importEngineOutput(volume, node, *write_result(tmp_path / "b", ct_crop, run_b, model="model-b"))

    assert report.keptEdited == ["Liver"]
    assert report.keptReviewed == ["Spleen"]
    assert report.keptManual == ["Stomach"]
    assert report.updated == ["Liver Tumor"]
    assert report.added == ["Aorta"]
    assert report.replaced == []
    assert "Kept, edited by you: Liver" in report.toText()
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 5  # liver, spleen, tumour, own stomach, aorta: nothing duplicated
    # kept segments: voxels, provenance and state untouched
    liver_id = first.segmentIds[LIVER]
    assert np.array_equal(logic.segmentArray(node, liver_id, volume), edited_liver)
    assert logic.segmentFingerprint(node, liver_id) == liver_fingerprint
    assert tag(segmentation.GetSegment(liver_id), US.TAG_MODEL) == "synthetic-model"
    assert logic.segmentState(node, liver_id) == US.STATE_EDITED
    assert np.array_equal(logic.segmentArray(node, first.segmentIds[SPLEEN], volume), spleen_before)
    assert logic.segmentState(node, first.segmentIds[SPLEEN]) == US.STATE_REVIEWED
    assert np.array_equal(logic.segmentArray(node, "my_stomach", volume), own_stomach)
    assert logic.segmentState(node, "my_stomach") == US.STATE_MANUAL
    # updated and added segments carry run B
    tumour_id = first.segmentIds[LIVER_TUMOR]
    assert report.segmentIds[LIVER_TUMOR] == tumour_id
    assert np.array_equal(logic.segmentArray(node, tumour_id, volume), run_b[LIVER_TUMOR])
    assert segmentation.GetSegment(tumour_id).GetName() == "Lesion 1"  # the user's name is kept
    assert tag(segmentation.GetSegment(tumour_id), US.TAG_MODEL) == "model-b"
    assert logic.segmentState(node, tumour_id) == US.STATE_AI
    aorta_id = report.segmentIds[AORTA]
    assert np.array_equal(logic.segmentArray(node, aorta_id, volume), run_b[AORTA])
    assert segmentation.GetSegment(aorta_id).GetName() == "Aorta"


def test_overwrite_replaces_edited_reviewed_and_manual(headless, ct_crop, tmp_path):
    volume, logic, node, first, _edited, _own, run_b = _first_run(headless, ct_crop, tmp_path)
    node.GetSegmentation().GetSegment(first.segmentIds[LIVER]).SetName("my liver")

    report = logic.importEngineOutput(
        volume, node, *write_result(tmp_path / "b", ct_crop, run_b, model="model-b"), overwrite=True
    )

    assert sorted(report.replaced) == ["Liver", "Spleen", "Stomach"]
    assert report.updated == ["Liver Tumor"] and report.added == ["Aorta"] and not report.kept
    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 5
    for index, segment_id in report.segmentIds.items():
        info = CATALOG[index]
        segment = segmentation.GetSegment(segment_id)
        assert np.array_equal(logic.segmentArray(node, segment_id, volume), run_b[index]), info.name
        assert logic.segmentState(node, segment_id) == US.STATE_AI, info.name
        assert tag(segment, US.TAG_MODEL) == "model-b"
        assert tag(segment, US.TAG_REVIEWED) is None
        assert tag(segment, slicer.vtkSegment.GetTerminologyEntryTagName()) == CATALOG.slicer_terminology(info)
    assert report.segmentIds[STOMACH] == "my_stomach"  # the user's segment became the class's segment
    assert segmentation.GetSegment(report.segmentIds[LIVER]).GetName() == "Liver"  # replaced: catalog name again
    spleen = segmentation.GetSegment(report.segmentIds[SPLEEN])
    assert (
        slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentStatus(spleen)
        != slicer.vtkSlicerSegmentationsModuleLogic.Completed
    )


def test_seg_nrrd_save_and_reload(headless, ct_crop, tmp_path):
    volume, logic, node, first, edited_liver, _own, _b = _first_run(headless, ct_crop, tmp_path)
    path = tmp_path / "saved.seg.nrrd"
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    assert storage.WriteData(node)

    other = US.createHeadlessScene()  # a fresh scene, as after restarting Slicer
    other_volume = load_volume(other, ct_crop)
    reloaded = other.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reloaded")
    reader = other.scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    reader.SetFileName(str(path))
    reloaded.SetAndObserveStorageNodeID(reader.GetID())
    assert reader.ReadData(reloaded)
    other_logic = US.UniversalSegLogic(other.scene)
    segmentation = reloaded.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == node.GetSegmentation().GetNumberOfSegments() == 4
    expected_states = {
        first.segmentIds[LIVER]: "edited",
        first.segmentIds[SPLEEN]: "reviewed",
        first.segmentIds[LIVER_TUMOR]: "ai",
        "my_stomach": "manual",
    }
    assert other_logic.segmentStates(reloaded) == expected_states
    assert other_logic.moduleSegments(reloaded) == {i: first.segmentIds[i] for i in (LIVER, SPLEEN, LIVER_TUMOR)}
    for segment_id in expected_states:
        original = node.GetSegmentation().GetSegment(segment_id)
        segment = segmentation.GetSegment(segment_id)
        assert segment.GetName() == original.GetName()
        assert segment.GetColor() == pytest.approx(original.GetColor(), abs=1e-6)
        assert logic.segmentProvenance(node, segment_id) == other_logic.segmentProvenance(reloaded, segment_id)
        assert np.array_equal(
            other_logic.segmentArray(reloaded, segment_id, other_volume), logic.segmentArray(node, segment_id, volume)
        )
    assert np.array_equal(other_logic.segmentArray(reloaded, first.segmentIds[LIVER], other_volume), edited_liver)
    # the same file as the engine's reader (slicerio) sees it: names and terminology per segment
    read_back = {s["id"]: s for s in read_seg_nrrd(path)["segments"]}
    for index in (LIVER, SPLEEN, LIVER_TUMOR):
        entry = read_back[first.segmentIds[index]]
        assert entry["name"] == CATALOG[index].name
        assert entry["terminology"] == CATALOG.slicer_terminology(CATALOG[index])


# ------------------------------------------------------------------------------------------------ parameters
def test_parameters_validate_and_build_the_command():
    params = US.SegmentationParameters(
        classes=["Liver", "IVC", "left kidney"],
        prompt="both lungs",
        device="cpu",
        fast=True,
        threshold=0.4,
        split_lungs=False,
        keep_tumors_inside_organs=False,
    )
    params.validate()
    args = params.to_cli_args()
    assert args[args.index("--classes") + 1] == "left_kidney,liver,postcava"
    assert args[args.index("--prompt") + 1] == "both lungs"
    assert args[args.index("--threshold") + 1] == "0.4"
    assert "--fast" in args and "--no-split-lungs" in args and "--no-keep-tumors-inside-organs" in args
    assert "--no-keep-largest-component" not in args and "--no-postprocess" not in args and "--overlap" not in args
    assert "--accept-licence" not in args
    off = US.SegmentationParameters(classes=["all"], postprocess=False, overlap=0.25).to_cli_args()
    assert off[off.index("--classes") + 1] == "all" and "--no-postprocess" in off and "--no-split-lungs" not in off
    assert off[off.index("--overlap") + 1] == "0.25"
    for bad, message in (
        (dict(), "nothing to segment"),
        (dict(classes=["liver"], threshold=1.0), "threshold"),
        (dict(classes=["liver"], overlap=1.0), "overlap"),
        (dict(classes=["liver"], device="tpu"), "unknown device"),
        (dict(classes=["livr tumour x"]), "unknown class"),
    ):
        with pytest.raises(US.UniversalSegError, match=message):
            US.SegmentationParameters(**bad).validate()


def test_gui_helpers_presets_prompt_preview_and_models(headless):
    logic = US.UniversalSegLogic(headless.scene)
    groups = dict(logic.classGroups())
    assert sum(len(v) for v in groups.values()) == len(CATALOG) == 32
    assert [c.name for c in groups["Vessels"]][:2] == ["Aorta", "Postcava"]
    assert "Kidney Cyst" in [c.name for c in groups["Tumors and cysts"]]
    presets = logic.classPresets()
    assert len(presets["All organs"]) == 25 and len(presets["All tumors"]) == 6 and presets["Clear"] == []
    assert "liver" in presets["Abdominal organs"] and "right_lung" not in presets["Abdominal organs"]
    items = logic.describePrompt("IVC and lft kidny, pancraes; banana")
    assert [(i["text"], i["classes"], i["accepted"]) for i in items] == [
        ("IVC", ["Postcava"], True),
        ("lft kidny", ["Left Kidney"], True),
        ("pancraes", ["Pancreas"], True),
        ("banana", [], False),
    ]
    assert items[0]["method"] == "synonym" and items[1]["method"] == "fuzzy"
    assert [c.name for c in logic.requestedClasses(["spleen"], "IVC and both kidneys")] == [
        "Spleen",
        "Right Kidney",
        "Left Kidney",
        "Postcava",
    ]
    rows = logic.modelChoices()
    assert [r["name"] for r in rows if r["default"]] == [US.DEFAULT_MODEL]
    assert all(r["kind"] == "segmentation" for r in rows)


def test_licence_must_be_accepted_before_the_first_download(headless, ct_crop, tmp_path):
    volume = load_volume(headless, ct_crop)
    logic = US.UniversalSegLogic(headless.scene)
    assert logic.modelNeedsLicenceAcceptance("universal-unet")  # isolated, empty cache (conftest)
    with pytest.raises(US.InputError, match="CC BY-NC-ND 4.0"):
        logic.startSegmentation(volume, None, classes=["liver"], model="universal-unet")
    assert headless.scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0
    logic.acceptModelLicence("universal-unet")
    assert not logic.modelNeedsLicenceAcceptance("universal-unet")
    assert not logic.modelNeedsLicenceAcceptance(str(tmp_path / "my.safetensors"))  # a file: no registry licence


# --------------------------------------------------------------------------------------------- the process
def _alive(pid: int) -> bool:
    """Whether a process runs; a zombie (killed, not yet reaped by its new parent) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return not Path("/proc").is_dir()  # no procfs: trust os.kill


@pytest.mark.skipif(os.name == "nt", reason="POSIX process groups")
def test_cancel_kills_the_whole_process_tree():
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    lines: list[str] = []
    process = US.EngineProcess([sys.executable, "-c", script], onStdoutLine=lines.append, graceSeconds=2.0)
    deadline = time.monotonic() + 20
    while not lines and time.monotonic() < deadline:
        process.poll()
        time.sleep(0.05)
    assert lines, "the test process did not start its child"
    grandchild = int(lines[0])
    assert _alive(process.pid) and _alive(grandchild)
    process.cancel(wait=True)
    assert process.process.returncode == -signal.SIGTERM
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild), "the grandchild survived the cancel"


def test_engine_error_is_reported_in_one_line(headless, ct_crop, tmp_path):
    volume = load_volume(headless, ct_crop)
    logic = US.UniversalSegLogic(headless.scene)
    missing = tmp_path / "no_such_model.safetensors"
    with pytest.raises(US.EngineError, match=r"segmentation failed: .*not found"):
        logic.segment(volume, None, classes=["liver"], model=str(missing), device="cpu", timeout=120)
    # the output segmentation is created only for a result: a failed run leaves the scene as it was
    assert headless.scene.GetNodesByClass("vtkMRMLSegmentationNode").GetNumberOfItems() == 0


@pytest.mark.slow
def test_end_to_end_with_the_real_command_line(headless, ct_crop, tiny_model):
    """The real engine CLI in a child process (tiny random model, one window): progress, import, exact masks.

    About 10-20 s; then a second run that is cancelled as soon as it reports progress.
    """
    volume = load_volume(headless, ct_crop)
    logic = US.UniversalSegLogic(headless.scene)
    logic.keepTemporaryFiles = True
    progress: list[tuple[float, str]] = []
    log: list[str] = []
    task = logic.startSegmentation(
        volume,
        None,
        classes=["liver", "aorta"],
        prompt="IVC",
        model=str(tiny_model),
        device="cpu",
        fast=True,
        onProgress=lambda f, s: progress.append((f, s)),
        onLog=log.append,
    )
    try:
        report = task.wait(timeout=240)
        node = task.outputSegmentation
        assert node is report.segmentationNode and node.GetScene() is headless.scene
        assert report.added == ["Liver", "Aorta", "Postcava"]
        fractions = [f for f, _ in progress]
        assert fractions == sorted(fractions) and fractions[-1] == 1.0
        assert any(stage.startswith("windows ") for _, stage in progress)
        assert any("'IVC' -> Postcava" in line for line in log)  # the engine's prompt report reaches the log
        segmentation = node.GetSegmentation()
        engine = {s["id"]: s for s in read_seg_nrrd(task.workDir / "segmentation.seg.nrrd")["segments"]}
        assert max(task.importSeconds) < 0.1  # no GUI-thread step of the import blocks for long
        for index in (LIVER, AORTA, CATALOG.lookup("IVC").index):
            info = CATALOG[index]
            segment_id = report.segmentIds[index]
            segment = segmentation.GetSegment(segment_id)
            assert segment.GetName() == info.name
            assert tag(segment, slicer.vtkSegment.GetTerminologyEntryTagName()) == CATALOG.slicer_terminology(info)
            assert tag(segment, US.TAG_MODEL) == "tiny-test"
            assert np.array_equal(labelmap_geometry(node, segment_id), ijk_to_ras(volume))
            assert np.array_equal(logic.segmentArray(node, segment_id, volume), engine[info.file_stem]["mask"]), (
                info.name
            )
    finally:
        import shutil

        shutil.rmtree(task.workDir, ignore_errors=True)

    # cancel a second run: the engine stops, the segmentation stays as it was, the temporary folder goes
    logic.keepTemporaryFiles = False
    before = {sid: logic.segmentFingerprint(node, sid) for sid in US._segmentIds(node.GetSegmentation())}
    started: list[float] = []
    task = logic.startSegmentation(
        volume,
        node,
        classes=["spleen"],
        model=str(tiny_model),
        device="cpu",
        fast=True,
        onProgress=lambda f, s: started.append(f),
    )
    deadline = time.monotonic() + 120
    while not started and not task.poll() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert started and not task.finished, "the engine should still be running when it first reports progress"
    task.cancel(wait=True)
    assert task.state == US.SegmentationTask.CANCELLED
    with pytest.raises(US.EngineError, match="cancelled"):
        task.wait()
    # The engine process is gone: killed, or (on a fast machine, one tiny window) it had just finished; either way
    # the cancelled run imports nothing and leaves no files.
    assert task.process.process.returncode is not None
    assert not task.workDir.exists()
    assert {sid: logic.segmentFingerprint(node, sid) for sid in US._segmentIds(node.GetSegmentation())} == before
