"""Issue 13 (part 2): the Slicer module stays responsive and its prompt box is usable (slicer-core, no Qt).

* the prompt's widget <-> parameter synchronisation does not put the cursor back on every key (defect 4);
* a segment-modified event reads no voxels, edits are still detected on demand, and leaving the module removes
  the observers (defect 5);
* the engine's ``.seg.nrrd`` is imported in short GUI-thread steps with exactly the voxels Slicer's own storage
  node reads, and edited segments are kept (defect 6);
* ``cleanup()`` stops the poll timer and cancels a running engine (9a); Windows cancel opens no console (9b).
"""

from __future__ import annotations

import subprocess
import sys
import time

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
from UniversalSegSlicerLib import guisync, process, segments  # noqa: E402
from UniversalSegSlicerLib.observers import SegmentationObserver, segmentationEvents  # noqa: E402
from UniversalSegSlicerLib.results import readEngineSegmentation  # noqa: E402

CATALOG = ClassCatalog.default()
LIVER, SPLEEN, LIVER_TUMOR, AORTA = (CATALOG.lookup(n).index for n in ("liver", "spleen", "liver tumor", "aorta"))


@pytest.fixture(scope="module")
def ct_crop(tmp_path_factory):
    image = sitk.ReadImage(str(shared_path("data", "ct", "totalseg_abdomen", "ct_upper_slab.nii.gz")))
    path = tmp_path_factory.mktemp("ct") / "ct_crop.nii.gz"
    sitk.WriteImage(image[30:78, 30:70, :], str(path))
    return path


def box(shape, z, y, x):
    mask = np.zeros(shape, dtype=bool)
    mask[z, y, x] = True
    return mask


def engine_files(folder, ct_path, masks, model="synthetic-model"):
    geometry = ImageGeometry.of(sitk.ReadImage(str(ct_path)))
    result = SegmentationResult(
        geometry=geometry,
        masks={i: CroppedMask.from_full(m) for i, m in masks.items()},
        catalog=CATALOG,
        model_name=model,
        model_licence="test",
        device="cpu",
        settings={"threshold": 0.5},
    )
    return write_summary(result, folder / "summary.json"), write_seg_nrrd(result, folder / "segmentation.seg.nrrd")


@pytest.fixture
def imported(ct_crop, tmp_path):
    headless = US.createHeadlessScene()
    volume = headless.logics["Volumes"].AddArchetypeVolume(str(ct_crop), "CT")
    shape = volume.GetImageData().GetDimensions()[::-1]
    masks = {
        LIVER: box(shape, slice(2, 20), slice(5, 30), slice(3, 25)),
        SPLEEN: box(shape, slice(8, 16), slice(10, 20), slice(30, 45)),
        LIVER_TUMOR: box(shape, slice(6, 9), slice(10, 14), slice(8, 12)),
    }
    logic = US.UniversalSegLogic(headless.scene)
    node = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "AI")
    files = engine_files(tmp_path, ct_crop, masks)
    report = logic.importEngineOutput(volume, node, *files)
    return headless, volume, logic, node, report, masks, files


def set_mask(node, segment_id, volume, mask):
    labelmap = US.orientedImageFromMask(mask, US.ijkToRas(volume))
    assert slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
        labelmap, node, segment_id, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE
    )


# ------------------------------------------------------------------------------------------ defect 4: prompt
class FakeTextEdit:
    """A QTextEdit as far as the sync loop sees it: typing inserts at the cursor, setPlainText moves the cursor
    to the start (as Qt does), every change emits textChanged."""

    def __init__(self):
        self.text, self.cursor, self.textChanged = "", 0, None

    def setPlainText(self, text):
        self.text, self.cursor = text, 0
        self.textChanged()

    def type(self, key):
        self.text = self.text[: self.cursor] + key + self.text[self.cursor :]
        self.cursor += 1
        self.textChanged()


def type_into_bound_prompt(keys: str, writeBack) -> str:
    """Type into a text edit synchronised with a parameter; ``writeBack(widgetText, parameterText)`` decides what
    the parameter-node observer writes into the widget (None: nothing)."""
    edit, parameter = FakeTextEdit(), {"prompt": ""}

    def parameterModified():
        text = writeBack(edit.text, parameter["prompt"])
        if text is not None:
            edit.setPlainText(text)

    def widgetChanged():
        value = guisync.parameterToWrite(edit.text, parameter["prompt"])
        if value is not None:
            parameter["prompt"] = value
            parameterModified()  # a parameter node invokes Modified on every change

    edit.textChanged = widgetChanged
    for key in keys:
        edit.type(key)
    assert parameter["prompt"] == edit.text
    return edit.text


def test_prompt_sync_keeps_the_typed_order():
    # Slicer's QTextEdit connector writes unconditionally (guiConnectors.py, v5.10.0 .. v5.12.3): text reversed.
    assert type_into_bound_prompt("liver", lambda widget, value: value) == "revil"
    assert type_into_bound_prompt("IVC and both kidneys", guisync.textToWrite) == "IVC and both kidneys"
    assert guisync.textToWrite("liver", "liver") is None
    assert guisync.textToWrite("", "spleen") == "spleen"  # a loaded scene's prompt still reaches the widget
    assert guisync.parameterToWrite("spleen", "spleen") is None


# ------------------------------------------------------------------------------------------ defect 5: edits
def test_edit_events_read_no_voxels_and_edits_are_found_on_demand(imported, monkeypatch):
    headless, volume, logic, node, report, masks, _files = imported
    liver_id, spleen_id = report.segmentIds[LIVER], report.segmentIds[SPLEEN]
    calls = []

    def on_change():  # what the Widget's review timer runs: a review that must not fingerprint
        calls.append([(row.name, row.state, row.stale) for row in logic.segmentReview(node, verify=False)])

    observer = SegmentationObserver(on_change)
    observer.observe(node)
    real = segments.segmentFingerprint

    def forbidden(segment):
        raise AssertionError("a segment was fingerprinted while handling an edit event")

    monkeypatch.setattr(segments, "segmentFingerprint", forbidden)
    assert {row.segmentId: row.state for row in logic.segmentReview(node, verify=False)} == {
        liver_id: "ai",
        spleen_id: "ai",
        report.segmentIds[LIVER_TUMOR]: "ai",
    }  # known since the import
    assert not any(logic.segmentChanged(node, sid) for sid in US.segmentIds(node.GetSegmentation()))

    edited = masks[LIVER].copy()
    edited[10] = False
    set_mask(node, liver_id, volume, edited)
    assert calls, "the edit was not observed"
    rows = {name: (state, stale) for name, state, stale in calls[-1]}
    assert rows["Liver"] == ("ai", True)  # modified since its fingerprint: the last known state, marked changed
    assert rows["Spleen"] == ("ai", False)
    assert logic.segmentChanged(node, liver_id) and not logic.segmentChanged(node, spleen_id)

    monkeypatch.setattr(segments, "segmentFingerprint", real)  # on demand (Refresh, Segment, Export): compared
    assert logic.segmentState(node, liver_id) == US.STATE_EDITED
    assert logic.segmentState(node, liver_id, verify=False) == US.STATE_EDITED  # now known, and not stale
    assert not {row.segmentId: row.stale for row in logic.segmentReview(node, verify=False)}[liver_id]
    set_mask(node, liver_id, volume, masks[LIVER])  # the user undoes the edit: the AI mask again
    assert {row.segmentId: row.stale for row in logic.segmentReview(node, verify=False)}[liver_id]
    assert logic.segmentState(node, liver_id) == US.STATE_AI
    assert not logic.segmentChanged(node, liver_id)

    # leaving the module: no observer is left on the node, edits cost nothing here
    observer.observe(None)
    for event in segmentationEvents():
        assert not node.HasObserver(event)
    before = len(calls)
    set_mask(node, liver_id, volume, edited)
    assert len(calls) == before


def test_widget_exit_stops_observing(imported):
    _headless, volume, _logic, node, report, masks, _files = imported
    widget = US.UniversalSegWidget()

    class Timer:
        def __init__(self):
            self.starts, self.active = 0, False

        def start(self):
            self.starts, self.active = self.starts + 1, True

        def stop(self):
            self.active = False

    widget._reviewTimer = Timer()
    widget._observeSegmentation(node)
    starts = widget._reviewTimer.starts
    set_mask(node, report.segmentIds[SPLEEN], volume, masks[SPLEEN] & False)
    assert widget._reviewTimer.starts > starts
    widget.exit()
    assert widget._observedSegmentation is None and not widget._reviewTimer.active
    for event in segmentationEvents():
        assert not node.HasObserver(event)


# ------------------------------------------------------------------------------------------ defect 6: import
def test_import_runs_in_steps_of_one_segment(ct_crop, tmp_path):
    headless = US.createHeadlessScene()
    volume = headless.logics["Volumes"].AddArchetypeVolume(str(ct_crop), "CT")
    shape = volume.GetImageData().GetDimensions()[::-1]
    masks = {
        LIVER: box(shape, slice(2, 20), slice(5, 30), slice(3, 25)),
        LIVER_TUMOR: box(shape, slice(6, 9), slice(10, 14), slice(8, 12)),  # overlap: a second file layer
        SPLEEN: box(shape, slice(8, 16), slice(10, 20), slice(30, 45)),
        AORTA: np.zeros(shape, dtype=bool),
    }
    summary, seg_path = engine_files(tmp_path, ct_crop, masks)
    logic = US.UniversalSegLogic(headless.scene)
    node = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "AI")
    steps = logic.importSteps(volume, node, summary, seg_path)
    tagged, fractions = [], []
    while True:
        try:
            fraction = next(steps)
        except StopIteration as stop:
            report = stop.value
            break
        if fraction is None:
            assert node.GetSegmentation().GetNumberOfSegments() == 0  # nothing changes while the file is read
            time.sleep(0.001)
            continue
        fractions.append(fraction)
        segmentation = node.GetSegmentation()
        tagged.append(sum(segmentation.GetSegment(s).HasTag(US.TAG_FINGERPRINT) for s in US.segmentIds(segmentation)))
    assert tagged == [1, 2, 3, 4] and fractions == sorted(fractions) and fractions[-1] < 1.0
    assert report.added == ["Spleen", "Liver", "Aorta", "Liver Tumor"] and report.empty == ["Aorta"]

    # the voxels are those of the file as Slicer's own storage node reads it
    reference = slicer.vtkMRMLSegmentationNode()
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(seg_path))
    assert storage.ReadData(reference)
    other = US.UniversalSegLogic(headless.scene)  # a fresh logic: fingerprints computed from voxels, not remembered
    for index, mask in masks.items():
        segment_id = report.segmentIds[index]
        assert np.array_equal(logic.segmentArray(node, segment_id, volume), mask)
        assert np.array_equal(logic.segmentArray(reference, CATALOG[index].file_stem, volume), mask)
        assert other.segmentState(node, segment_id) == US.STATE_AI
        assert other.segmentFingerprint(node, segment_id) == US.getTag(
            node.GetSegmentation().GetSegment(segment_id), US.TAG_FINGERPRINT
        )

    # an uncompressed file written by Slicer's storage node reads the same
    raw = tmp_path / "slicer.seg.nrrd"
    writer = slicer.vtkMRMLSegmentationStorageNode()
    writer.SetFileName(str(raw))
    writer.UseCompressionOff()
    reference.GetSegmentation().CollapseBinaryLabelmaps(False)
    assert writer.WriteData(reference)
    matrix = US.matrixArray(US.ijkToRas(volume))
    read = readEngineSegmentation(raw, volume.GetImageData().GetDimensions(), matrix, CATALOG)
    for index, mask in masks.items():
        full = np.zeros(shape, dtype=bool)
        if read[index].crop is not None:
            i, j, k = read[index].start
            c = read[index].crop
            full[k : k + c.shape[0], j : j + c.shape[1], i : i + c.shape[2]] = c
        assert np.array_equal(full, mask), CATALOG[index].name


def test_stepwise_rerun_keeps_the_edited_segment(imported, ct_crop, tmp_path):
    _headless, volume, logic, node, report, masks, _files = imported
    liver_id = report.segmentIds[LIVER]
    edited = masks[LIVER].copy()
    edited[:, :12] = False
    set_mask(node, liver_id, volume, edited)
    shape = edited.shape
    again = {
        LIVER: box(shape, slice(1, 22), slice(4, 32), slice(2, 27)),
        SPLEEN: box(shape, slice(7, 17), slice(9, 22), slice(28, 46)),
    }
    (tmp_path / "b").mkdir()
    rerun = US._runSteps(logic.importSteps(volume, node, *engine_files(tmp_path / "b", ct_crop, again, "model-b")))
    assert rerun.keptEdited == ["Liver"] and rerun.updated == ["Spleen"]
    assert np.array_equal(logic.segmentArray(node, liver_id, volume), edited)
    assert np.array_equal(logic.segmentArray(node, report.segmentIds[SPLEEN], volume), again[SPLEEN])
    assert logic.segmentState(node, liver_id) == US.STATE_EDITED


# ------------------------------------------------------------------------------------------ 9a, 9b
def test_cleanup_stops_the_poll_timer_and_cancels_the_engine(tmp_path):
    class Timer:
        active = True

        def stop(self):
            self.active = False

    headless = US.createHeadlessScene()
    logic = US.UniversalSegLogic(headless.scene)
    work = tmp_path / "work"
    work.mkdir()
    task = US.SegmentationTask(logic, None, None, US.SegmentationParameters(classes=["liver"]), work)
    task.process = US.EngineProcess([sys.executable, "-c", "import time; time.sleep(120)"], graceSeconds=2.0)
    widget = US.UniversalSegWidget()
    widget._pollTimer, widget._previewTimer, widget._reviewTimer = Timer(), Timer(), Timer()
    widget._task = task
    widget.cleanup()
    assert not widget._pollTimer.active and not widget._previewTimer.active and not widget._reviewTimer.active
    assert task.state == US.SegmentationTask.CANCELLED and task.process.process.poll() is not None
    assert not work.exists()


def test_windows_cancel_opens_no_console():
    command, kwargs = process._windowsKillCommand(1234)
    assert command == ["taskkill", "/F", "/T", "/PID", "1234"]
    assert kwargs["creationflags"] == getattr(subprocess, "CREATE_NO_WINDOW", 0)
    assert kwargs["capture_output"] is True and kwargs["check"] is False
