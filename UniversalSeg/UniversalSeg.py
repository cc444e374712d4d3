"""UniversalSeg: 3D Slicer module around the CLIP-Driven Universal Model (32 abdominal CT classes).

Pick classes or type a prompt, click **Segment**, then correct the result in the Segment Editor.

This file holds the module class, the Widget, the self-test and the Logic, a thin converter between MRML and the
engine; the parts that need no Qt are in the package ``UniversalSegSlicerLib`` beside it (engine process, result
reading, segment provenance / fingerprints / edit tracking, parameters). The Logic runs the engine's command line
(``python -m UniversalSegLib segment``) in a separate process, reads its JSON progress lines, and imports its
``.seg.nrrd`` into a ``vtkMRMLSegmentationNode`` in small steps - one segment per class, named, coloured and tagged
with the catalog's SNOMED CT terminology. Every segment it makes carries provenance tags and a fingerprint of the AI
mask, so a re-run never replaces a segment the user edited (see :meth:`UniversalSegLogic.segmentState`); the
correction loop builds on that (:meth:`UniversalSegLogic.segmentReview`, :meth:`UniversalSegLogic.exportForTraining`).
The Logic works with any MRML scene, so tests and scripts use it with the PyPI package ``slicer-core``
(:func:`createHeadlessScene`). The GUI classes need the Slicer application (``qt``, ``ctk``, ``slicer.app``), whose
imports are guarded so that this file also imports where only ``slicer-core`` is installed.

Image arrays follow VTK/SimpleITK memory order: a volume of ``(I, J, K)`` voxels is a numpy array of shape
``(K, J, I)`` (slice, row, column); geometry is Slicer's IJK-to-RAS matrix.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import unittest
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import slicer
import vtk

# ---------------------------------------------------------------------------------------------------- the engine
# Importing the package also puts the engine (UniversalSegLib) on sys.path: installed beside this file, or one
# folder up in a source checkout.
_MODULE_DIR = Path(__file__).resolve().parent
if str(_MODULE_DIR) not in sys.path:
    sys.path.insert(0, str(_MODULE_DIR))

# isort: off
import UniversalSegSlicerLib  # noqa: E402,F401  (first: makes UniversalSegLib importable from a source checkout)
import UniversalSegLib  # noqa: E402

# isort: on
from UniversalSegLib.catalog import ClassCatalog, ClassInfo  # noqa: E402
from UniversalSegLib.checkpoints import checkpoint_classes  # noqa: E402
from UniversalSegLib.errors import InputError, UniversalSegError, printable  # noqa: E402
from UniversalSegLib.registry import DEFAULT_MODEL, ModelEntry, ModelRegistry, accept_licence, licence_accepted  # noqa: E402
from UniversalSegSlicerLib import guisync  # noqa: E402
from UniversalSegSlicerLib.observers import SegmentationObserver  # noqa: E402
from UniversalSegSlicerLib.parameters import DEVICES, SegmentationParameters  # noqa: E402,F401
from UniversalSegSlicerLib.process import ENGINE_PROGRESS_SHARE, EngineError, EngineProcess, SegmentationTask  # noqa: E402,F401
from UniversalSegSlicerLib.results import BackgroundCall, ClassMask, readEngineSegmentation  # noqa: E402
from UniversalSegSlicerLib.scene import HeadlessScene, createHeadlessScene  # noqa: E402,F401
from UniversalSegSlicerLib.segments import (  # noqa: E402,F401
    BINARY_LABELMAP,
    ENGINE_VERSION,
    PROVENANCE_TAGS,
    SEGMENT_STATES,
    STATE_AI,
    STATE_EDITED,
    STATE_MANUAL,
    STATE_REVIEWED,
    TAG_CLASS_INDEX,
    TAG_CLASS_NAME,
    TAG_CREATED,
    TAG_ENGINE_VERSION,
    TAG_FINGERPRINT,
    TAG_MODEL,
    TAG_MODEL_LICENCE,
    TAG_PREFIX,
    TAG_REVIEWED,
    TAG_SETTINGS,
    EditTracker,
    ImportReport,
    SegmentRecords,
    SegmentReview,
    describeSegment,
    getTag,
    ijkToRas,
    matrixArray,
    orientedImageFromCrop,
    orientedImageFromMask,
    sameMatrix,
    segmentFingerprint,
    segmentIds,
    segmentMask,
    tagValue,
    volumeArray,
)

# Short names this file (and scripts written against earlier versions) use.
_getTag, _segmentIds, _ijkToRas, _orientedImageFromMask = getTag, segmentIds, ijkToRas, orientedImageFromMask


# ------------------------------------------------------------------------------- application-only imports, guarded
# In the Slicer application these all exist; with only `slicer-core` (pytest, scripts) they do not, and the
# fallbacks below let the Logic, the parameter dataclasses and this file's classes be defined anyway.
try:
    import ctk  # noqa: F401  (present only in the application)
    import qt
    from slicer.ScriptedLoadableModule import (
        ScriptedLoadableModule,
        ScriptedLoadableModuleLogic,
        ScriptedLoadableModuleTest,
        ScriptedLoadableModuleWidget,
    )
    from slicer.util import VTKObservationMixin

    HAVE_SLICER_GUI = True
except ImportError:  # slicer-core only: no Qt, no scripted-module base classes
    HAVE_SLICER_GUI = False
    qt = None  # type: ignore[assignment]

    class ScriptedLoadableModule:  # type: ignore[no-redef]
        """Stand-in for Slicer's base class (only the attributes this file uses)."""

        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleWidget:  # type: ignore[no-redef]
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleLogic:  # type: ignore[no-redef]
        def __init__(self, parent=None):
            self.parent = parent

    class ScriptedLoadableModuleTest(unittest.TestCase):  # type: ignore[no-redef]
        pass

    class VTKObservationMixin:  # type: ignore[no-redef]
        def __init__(self):
            pass

        def removeObservers(self, method=None):
            pass


try:
    from typing import Annotated

    from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper

    HAVE_PARAMETER_NODE_WRAPPER = True
except ImportError:  # slicer-core only, or a Slicer older than 5.2
    HAVE_PARAMETER_NODE_WRAPPER = False

#: True inside the running Slicer application (``slicer.app`` exists), False with ``slicer-core`` only.
IN_SLICER_APP: bool = hasattr(slicer, "app")

logger = logging.getLogger("UniversalSeg")

# What the module installs into Slicer's Python, the supported Slicer releases and their protected packages, and
# the module's terminology file: UniversalSegSlicerLib/dependencies.py and terminology.py.
from UniversalSegSlicerLib import dependencies, terminology  # noqa: E402

try:  # Slicer's translation functions (5.x); slicer-core has no slicer.i18n
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:

    def _(text: str) -> str:
        return text

    def translate(context: str, text: str) -> str:
        return text


# ------------------------------------------------------------------------------------------------------ logic
class UniversalSegLogic(ScriptedLoadableModuleLogic, SegmentRecords):
    """Runs the engine and imports its result; usable from scripts, tests and Slicer's Python console.

    Example (Slicer's Python console)::

        logic = slicer.util.getModuleLogic("UniversalSeg")  # or UniversalSegLogic()
        report = logic.segment(volumeNode, classes=["liver", "spleen"], device="cpu")
        print(report.toText())

    Args:
        scene: the MRML scene to work in; defaults to ``slicer.mrmlScene`` inside the application.
    """

    def __init__(self, scene=None) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        if scene is None:
            scene = getattr(slicer, "mrmlScene", None)
        if scene is None:
            raise ValueError(
                "UniversalSegLogic needs an MRML scene outside the Slicer application: "
                "pass scene=createHeadlessScene().scene"
            )
        self.scene = scene
        # Segment provenance, states, review, tracking (UniversalSegSlicerLib.segments): also self.editTracker.
        SegmentRecords.__init__(self, ClassCatalog.default())
        #: Python that runs the engine; None picks PythonSlicer in the application, else this interpreter.
        self.pythonExecutable: str | None = None
        #: Keep the temporary engine files (input, masks, summary) for debugging.
        self.keepTemporaryFiles = False
        #: Extra environment variables for the engine process (e.g. UNIVERSALSEG_HOME).
        self.engineEnvironment: dict[str, str] = {}

    # -- parameter node (GUI) --------------------------------------------------------------------------------
    if HAVE_PARAMETER_NODE_WRAPPER:

        def getParameterNode(self):
            return UniversalSegParameterNode(super().getParameterNode())

    # -- catalog helpers for the GUI -------------------------------------------------------------------------
    CLASS_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
        ("Organs", ("organ",)),
        ("Vessels", ("vessel",)),
        ("Tumors and cysts", ("tumor", "cyst")),
    )
    #: Abdominal solid and hollow organs (no lungs, pelvic organs, femoral heads or vessels).
    ABDOMINAL_ORGANS: tuple[str, ...] = (
        "spleen",
        "right_kidney",
        "left_kidney",
        "gall_bladder",
        "liver",
        "stomach",
        "pancreas",
        "right_adrenal_gland",
        "left_adrenal_gland",
        "duodenum",
        "colon",
        "intestine",
    )

    def classGroups(self) -> list[tuple[str, list[ClassInfo]]]:
        """Class picker tree: (group title, classes in catalog order) for Organs, Vessels, Tumors and cysts."""
        return [(title, [c for c in self.catalog if c.kind in kinds]) for title, kinds in self.CLASS_GROUPS]

    def classPresets(self) -> dict[str, list[str]]:
        """Preset title -> file stems. "All organs" is the paper's 25 organs (organs and vessels)."""
        return {
            "All organs": [c.file_stem for c in self.catalog if c.kind in ("organ", "vessel")],
            "Abdominal organs": [self.catalog.lookup(stem).file_stem for stem in self.ABDOMINAL_ORGANS],
            "All tumors": [c.file_stem for c in self.catalog if c.kind == "tumor"],
            "Clear": [],
        }

    def describePrompt(self, text: str) -> list[dict[str, Any]]:
        """Live preview of a prompt: one dict per item with ``text``, ``classes`` (display names), ``method``,
        ``accepted`` (bool), ``score`` and ``suggestions``.

        Only the catalog steps run here (instant, offline); an item they reject is tried again with CLIP text
        matching when segmenting. Raises ImportError when the engine's dependencies are not installed yet.
        """
        if not text.strip():
            return []
        from UniversalSegLib.prompts import resolve_prompt

        resolution = resolve_prompt(text, catalog=self.catalog)
        return [
            {
                "text": item.text,
                "classes": [self.catalog[i].name for i in item.classes],
                "method": item.method,
                "accepted": item.accepted,
                "score": item.score,
                "suggestions": list(item.suggestions),
            }
            for item in resolution.items
        ]

    def requestedClasses(self, classes: Iterable[str | int], prompt: str = "") -> list[ClassInfo]:
        """The classes a run will segment: the picker's classes plus what the prompt's items resolve to here."""
        classes = list(classes)
        chosen = {info.index: info for info in (self.catalog.select(classes) if classes else [])}
        if prompt.strip():
            from UniversalSegLib.prompts import resolve_prompt

            for index in resolve_prompt(prompt, catalog=self.catalog).classes:
                chosen[index] = self.catalog[index]
        return [chosen[i] for i in sorted(chosen)]

    # -- models and licences ---------------------------------------------------------------------------------
    def modelChoices(self) -> list[dict[str, Any]]:
        """Segmentation models of the registry (``ModelRegistry.describe()`` rows: name, description, licence,
        licence_accepted, status "bundled"/"downloaded"/"not downloaded", size_text, default)."""
        return [row for row in ModelRegistry.default().describe() if row["kind"] == "segmentation"]

    def providedClasses(self, model: str) -> dict[str, float | None] | None:
        """Catalog file stem -> held-out Dice (None when not measured) of each class ``model`` provides; None when
        it provides every catalog class (official models) or cannot be known before a download."""
        known = checkpoint_classes(model or DEFAULT_MODEL)
        if known is None:
            return None
        names, dice = known
        out: dict[str, float | None] = {}
        for name in names:
            info = self.catalog.find(name)
            if info is not None:
                out[info.file_stem] = dice.get(name)
        return out

    def modelEntry(self, model: str) -> ModelEntry | None:
        """The registry entry for a model name; None for a checkpoint file path."""
        registry = ModelRegistry.default()
        if model in registry and not Path(model).expanduser().is_file():
            return registry.get(model)
        return None

    def modelNeedsLicenceAcceptance(self, model: str) -> bool:
        """True when the model's weights need a licence the user has not accepted yet (ask before downloading)."""
        entry = self.modelEntry(model)
        return entry is not None and not licence_accepted(entry)

    def acceptModelLicence(self, model: str) -> None:
        """Remember that the user accepted the model's licence (after showing it to them)."""
        entry = self.modelEntry(model)
        if entry is not None:
            accept_licence(entry)

    # -- dependencies ----------------------------------------------------------------------------------------
    @staticmethod
    def dependencyPlan() -> dependencies.InstallPlan:
        """What must be installed, upgraded or refused before the engine can run in this Python
        (:func:`UniversalSegSlicerLib.dependencies.plan_installation` with the installed versions)."""
        version = (slicer.app.majorVersion, slicer.app.minorVersion) if IN_SLICER_APP else None
        return dependencies.plan_installation(dependencies.installed_versions(), version)

    @staticmethod
    def missingDependencies() -> list[str]:
        """One line per package to install or upgrade and per conflict with Slicer's own packages; empty when the
        engine can run."""
        plan = UniversalSegLogic.dependencyPlan()
        return plan.describe() + plan.conflicts

    def installDependencies(
        self, plan: dependencies.InstallPlan | None = None, log: Callable[[str], None] | None = None
    ) -> bool:
        """Carry out :meth:`dependencyPlan` in the application: PyTorch through the PyTorch extension's
        ``PyTorchUtils`` (installed or upgraded to ``torch>=2.8``), the rest with ``slicer.util.pip_install`` with
        Slicer's bundled packages pinned as constraints. Returns True when Slicer must restart.

        Raises:
            EngineError: with a message saying what failed or was refused and what to do.
        """
        if not IN_SLICER_APP:
            raise EngineError(
                "installing dependencies needs the Slicer application; outside Slicer use `pip install universalseg`"
            )
        plan = plan or self.dependencyPlan()
        try:
            import PyTorchUtils  # from the PyTorch extension (SlicerPyTorch)

            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        except ModuleNotFoundError:
            torchLogic = None  # install() says to install the extension when torch is needed
        try:
            return dependencies.install(plan, slicer.util.pip_install, torchLogic, log=log or logger.info)
        except dependencies.DependencyError as exc:
            raise EngineError(str(exc)) from None

    # -- running the engine ----------------------------------------------------------------------------------
    def enginePython(self) -> str:
        """The Python executable that runs the engine: ``PythonSlicer`` in the application, else this Python."""
        if self.pythonExecutable:
            return self.pythonExecutable
        if IN_SLICER_APP:
            found = shutil.which("PythonSlicer")
            if found:
                return found
            name = "PythonSlicer.exe" if os.name == "nt" else "PythonSlicer"
            candidate = Path(slicer.app.slicerHome) / "bin" / name
            if candidate.is_file():
                return str(candidate)
            raise EngineError("PythonSlicer was not found next to the Slicer executable; reinstall Slicer")
        return sys.executable

    def engineEnvironmentVariables(self) -> dict[str, str]:
        """Environment of the engine process: this one (Slicer's start-up environment in the application) plus
        the folder holding ``UniversalSegLib`` on PYTHONPATH, so both run the same engine code."""
        env = dict(slicer.util.startupEnvironment()) if IN_SLICER_APP else dict(os.environ)
        engineRoot = str(Path(UniversalSegLib.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(
            [engineRoot] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
        )
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.engineEnvironment)
        return env

    def engineCommand(self, inputPath: Path, workDir: Path, parameters: SegmentationParameters) -> list[str]:
        """The full engine command line for one run (outputs in ``workDir``)."""
        return [
            self.enginePython(),
            "-m",
            "UniversalSegLib",
            "segment",
            str(inputPath),
            "-o",
            str(workDir / "segmentation.seg.nrrd"),  # one file, read off the GUI thread
            "--summary",
            str(workDir / "summary.json"),
            "--progress",
            "json",
            *parameters.to_cli_args(self.catalog),
        ]

    def writeVolumeToFile(self, volumeNode, path: str | os.PathLike) -> Path:
        """Write a volume node as (uncompressed) NRRD with its IJK-to-RAS geometry, for the engine process."""
        path = Path(path)
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        storage.UseCompressionOff()
        if not storage.WriteData(volumeNode):
            raise EngineError(f"cannot write the volume '{volumeNode.GetName()}' to {path}; check free disk space")
        return path

    def _checkInputVolume(self, inputVolume) -> None:
        if (
            inputVolume is None
            or not inputVolume.IsA("vtkMRMLScalarVolumeNode")
            or inputVolume.IsA("vtkMRMLLabelMapVolumeNode")
        ):
            raise InputError("choose a CT volume as input (a scalar volume, not a label map)")
        image = inputVolume.GetImageData()
        if image is None or image.GetNumberOfPoints() == 0:
            raise InputError(f"the volume '{inputVolume.GetName()}' has no voxels; load a CT first")
        if image.GetNumberOfScalarComponents() != 1:
            raise InputError(
                f"the volume '{inputVolume.GetName()}' has {image.GetNumberOfScalarComponents()} "
                "components per voxel; choose a CT (one value per voxel)"
            )

    def startSegmentation(
        self,
        inputVolume,
        outputSegmentation=None,
        parameters: SegmentationParameters | None = None,
        *,
        onProgress: Callable[[float, str], None] | None = None,
        onLog: Callable[[str], None] | None = None,
        onFinished: Callable[[SegmentationTask], None] | None = None,
        **overrides,
    ) -> SegmentationTask:
        """Start the engine on ``inputVolume`` and return at once; poll the task (GUI) or ``wait()`` on it.

        Args:
            inputVolume: the CT (``vtkMRMLScalarVolumeNode``).
            outputSegmentation: ``vtkMRMLSegmentationNode`` to add/update segments in; None creates one when the
                result is imported (``task.outputSegmentation``).
            parameters: what to segment and how; ``overrides`` set single fields (e.g. ``classes=["liver"]``).
            onProgress: ``(fraction 0..1, stage text)``; onLog: one line of engine output; onFinished: the task.
        """
        parameters = replace(parameters or SegmentationParameters(), **overrides)
        parameters.validate(self.catalog)
        self._checkInputVolume(inputVolume)
        if self.modelNeedsLicenceAcceptance(parameters.model) and not parameters.acceptLicence:
            entry = self.modelEntry(parameters.model)
            raise InputError(
                f"the weights of model '{entry.name}' are licensed under {entry.licence} "
                f"({entry.licence_url}); read and accept the licence first"
            )
        tempRoot = Path(slicer.app.temporaryPath) if IN_SLICER_APP else None
        workDir = Path(tempfile.mkdtemp(prefix="UniversalSeg-", dir=tempRoot))
        task = SegmentationTask(
            self,
            inputVolume,
            outputSegmentation,
            parameters,
            workDir,
            onProgress=onProgress,
            onLog=onLog,
            onFinished=onFinished,
            keepFiles=self.keepTemporaryFiles,
        )
        try:
            inputPath = self.writeVolumeToFile(inputVolume, workDir / "input.nrrd")
            command = self.engineCommand(inputPath, workDir, parameters)
            logger.info("engine command: %s", subprocess.list2cmdline(command))
            task.process = EngineProcess(
                command,
                env=self.engineEnvironmentVariables(),
                cwd=workDir,
                onStdoutLine=task._onStdout,
                onStderrLine=task._onStderr,
            )
        except BaseException:
            shutil.rmtree(workDir, ignore_errors=True)
            raise
        return task

    def newSegmentationNode(self, inputVolume):
        """A new segmentation node named after the volume ("CT segmentation")."""
        return self.scene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode", self.scene.GenerateUniqueName(f"{inputVolume.GetName()} segmentation")
        )

    def segment(
        self,
        inputVolume,
        outputSegmentation=None,
        parameters: SegmentationParameters | None = None,
        *,
        timeout: float | None = None,
        onProgress=None,
        onLog=None,
        **overrides,
    ) -> ImportReport:
        """Blocking variant of :meth:`startSegmentation` for scripts and tests: returns the import report.

        Raises:
            EngineError: the engine failed (its one-line message), or was cancelled.
            TimeoutError: not finished within ``timeout`` seconds (the run is cancelled).
        """
        task = self.startSegmentation(
            inputVolume, outputSegmentation, parameters, onProgress=onProgress, onLog=onLog, **overrides
        )
        return task.wait(timeout)

    # -- importing results -----------------------------------------------------------------------------------
    def importEngineOutput(
        self,
        inputVolume,
        outputSegmentation,
        summaryPath: str | os.PathLike,
        segmentationPath: str | os.PathLike,
        *,
        overwrite: bool = False,
    ) -> ImportReport:
        """Import the engine's result (its summary JSON and its ``.seg.nrrd``) into ``outputSegmentation``, never
        replacing what the user edited unless ``overwrite``; runs :meth:`importSteps` to the end (scripts, tests).

        For each class of the run: no segment of that class yet -> added; an unedited segment from an earlier
        run -> its mask and provenance are updated (name and colour the user may have changed are kept); a segment
        the user edited or marked reviewed, or their own segment with the class's name -> kept and reported.
        With ``overwrite`` all of these are replaced. Segments of other classes are never touched.
        The result must lie on the input volume's voxel grid; it is stored with exactly its geometry.
        """
        return _runSteps(
            self.importSteps(inputVolume, outputSegmentation, summaryPath, segmentationPath, overwrite=overwrite)
        )

    def importSteps(
        self,
        inputVolume,
        outputSegmentation,
        summaryPath: str | os.PathLike,
        segmentationPath: str | os.PathLike,
        *,
        overwrite: bool = False,
        task=None,
    ):
        """:meth:`importEngineOutput` as a generator of short GUI-thread steps (for a ``QTimer``).

        The ``.seg.nrrd`` is read and split into per-class crops in a worker thread (no MRML there); meanwhile
        each step yields None at once. Then each step changes one segment and yields the fraction done (0..1).
        The generator returns the :class:`ImportReport`. Nothing is changed before the file has been read and
        checked against the volume's grid.
        """
        summaryPath = Path(summaryPath)
        try:
            summary = json.loads(summaryPath.read_text(encoding="utf-8"))
            entries = summary["classes"]
            wanted = {int(entry["index"]) for entry in entries}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EngineError(f"the engine's summary {summaryPath} is missing or unreadable ({exc})") from None
        self._checkInputVolume(inputVolume)
        matrix = matrixArray(ijkToRas(inputVolume))
        dims = tuple(inputVolume.GetImageData().GetDimensions())
        unknown = sorted(i for i in wanted if not 1 <= i <= len(self.catalog))
        for index in unknown:
            logger.warning("skipping class %s: not a catalog class", index)
        wanted -= set(unknown)
        reader = BackgroundCall(lambda: readEngineSegmentation(segmentationPath, dims, matrix, self.catalog, wanted))
        while not reader.done:
            yield None
        masks = reader.result()
        missing = sorted(wanted - set(masks))
        if missing:
            raise EngineError(f"the engine's segmentation has no segment for {self.catalog[missing[0]].name}")
        provenance = {
            TAG_MODEL: Path(str(summary.get("model") or "")).name or "unknown",
            TAG_MODEL_LICENCE: summary.get("model_licence") or "unspecified",
            TAG_ENGINE_VERSION: ENGINE_VERSION,
            TAG_CREATED: datetime.now(timezone.utc).isoformat(timespec="seconds"),
            TAG_SETTINGS: json.dumps(_settingsForTag(summary), separators=(",", ":"), sort_keys=True),
        }
        report = yield from self.importMaskSteps(
            inputVolume, outputSegmentation, masks, provenance, overwrite=overwrite
        )
        report.model = provenance[TAG_MODEL]
        return report

    def importMasks(
        self,
        inputVolume,
        outputSegmentation,
        masks: dict[int, np.ndarray],
        provenance: dict[str, str],
        *,
        overwrite: bool = False,
    ) -> ImportReport:
        """Import boolean masks (catalog index -> ``(K, J, I)`` array on the input volume's grid); see
        :meth:`importEngineOutput` for the rules. ``provenance`` maps tag names to values for every stored mask."""
        matrix = matrixArray(ijkToRas(inputVolume))
        shape = tuple(inputVolume.GetImageData().GetDimensions()[::-1])
        classMasks = {}
        for index, mask in masks.items():
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != shape:
                raise EngineError(
                    f"the mask of {self.catalog[index].name} has shape {mask.shape}, not the input volume's {shape}"
                )
            classMasks[index] = ClassMask.fromMask(index, mask, matrix)
        return _runSteps(
            self.importMaskSteps(inputVolume, outputSegmentation, classMasks, provenance, overwrite=overwrite)
        )

    def importMaskSteps(
        self,
        inputVolume,
        outputSegmentation,
        masks: dict[int, ClassMask],
        provenance: dict[str, str],
        *,
        overwrite: bool = False,
    ):
        """Generator: store each class's crop in its segment, one class per step (yields the fraction done),
        applying the keep/update/replace rules of :meth:`importEngineOutput`; returns the :class:`ImportReport`."""
        self._prepareSegmentation(inputVolume, outputSegmentation)
        matrix = ijkToRas(inputVolume)
        segmentation = outputSegmentation.GetSegmentation()
        report = ImportReport(segmentationNode=outputSegmentation)
        existing = self.moduleSegments(outputSegmentation)
        manualByName = {}
        for segmentId in segmentIds(segmentation):
            segment = segmentation.GetSegment(segmentId)
            if not segment.HasTag(TAG_CLASS_INDEX):
                manualByName.setdefault(segment.GetName().strip().lower(), segmentId)
        # States of the segments a run may replace: a fingerprint each, unless unchanged since the last one.
        states: dict[int, str] = {}
        for index in sorted(masks):
            if index in existing:
                states[index] = self.segmentState(outputSegmentation, existing[index])
                yield 0.0
        stored: list[tuple[str, str]] = []
        seglogic = slicer.vtkSlicerSegmentationsModuleLogic
        for number, index in enumerate(sorted(masks)):
            info = self.catalog[index]
            segmentId = existing.get(index)
            resetDisplay = False
            if segmentId is None and info.name.lower() in manualByName:
                segmentId = manualByName[info.name.lower()]
                if not overwrite:
                    report.keptManual.append(info.name)
                    report.segmentIds[index] = segmentId
                    continue
                report.replaced.append(info.name)
                resetDisplay = True
            elif segmentId is None:
                segmentId = self._addSegment(outputSegmentation, info)
                report.added.append(info.name)
            else:
                state = states[index]
                if state in (STATE_EDITED, STATE_REVIEWED) and not overwrite:
                    (report.keptEdited if state == STATE_EDITED else report.keptReviewed).append(info.name)
                    report.segmentIds[index] = segmentId
                    continue
                if state == STATE_AI:
                    report.updated.append(info.name)
                else:
                    report.replaced.append(info.name)
                    resetDisplay = True
            segment = segmentation.GetSegment(segmentId)
            if resetDisplay:
                describeSegment(segment, info, self.catalog)
            mask = masks[index]
            labelmap = orientedImageFromCrop(mask.crop, mask.start, matrix)
            if not seglogic.SetBinaryLabelmapToSegment(labelmap, outputSegmentation, segmentId, seglogic.MODE_REPLACE):
                raise EngineError(f"Slicer could not store the mask of {info.name} in '{outputSegmentation.GetName()}'")
            segment = segmentation.GetSegment(segmentId)
            segment.SetTag(TAG_CLASS_INDEX, str(index))
            segment.SetTag(TAG_CLASS_NAME, info.file_stem)
            for tag, value in provenance.items():
                segment.SetTag(tag, tagValue(value))
            # A new AI mask is not reviewed, whatever the segment it replaces was.
            segment.RemoveTag(TAG_REVIEWED)
            if seglogic.GetSegmentStatus(segment) == seglogic.Completed:
                segment.RemoveTag(seglogic.GetStatusTagName())
            # The fingerprint of the crop that was stored: no read-back of the (possibly shared) layer.
            segment.SetTag(TAG_FINGERPRINT, mask.fingerprint)
            stored.append((segmentId, mask.fingerprint))
            report.segmentIds[index] = segmentId
            if mask.empty:
                report.empty.append(info.name)
            yield (number + 1) / (len(masks) + 1)
        # Each stored crop is a layer of its own (only as large as the mask), so memory does not need the
        # Segment Editor's layer sharing here; CollapseBinaryLabelmaps would block the GUI for every segment at
        # once. The modification times recorded now let later edits be noticed without reading voxels.
        for segmentId, fingerprint in stored:
            self.editTracker.record(outputSegmentation, segmentId, fingerprint)
        self._placeInSubjectHierarchy(inputVolume, outputSegmentation)
        return report

    def _prepareSegmentation(self, inputVolume, outputSegmentation) -> None:
        """Display node, reference geometry and transform from the input volume (geometry only while empty)."""
        if outputSegmentation is None or not outputSegmentation.IsA("vtkMRMLSegmentationNode"):
            raise InputError("the output must be a segmentation node")
        if outputSegmentation.GetScene() is None:
            self.scene.AddNode(outputSegmentation)
        if outputSegmentation.GetDisplayNode() is None:
            outputSegmentation.CreateDefaultDisplayNodes()
        segmentation = outputSegmentation.GetSegmentation()
        # Slicer < 5.4 calls the source representation "master representation".
        getSource = (
            getattr(segmentation, "GetSourceRepresentationName", None) or segmentation.GetMasterRepresentationName
        )
        setSource = (
            getattr(segmentation, "SetSourceRepresentationName", None) or segmentation.SetMasterRepresentationName
        )
        if segmentation.GetNumberOfSegments() == 0:
            outputSegmentation.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
            setSource(BINARY_LABELMAP)
            outputSegmentation.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
        elif getSource() != BINARY_LABELMAP:
            raise InputError(
                f"'{outputSegmentation.GetName()}' stores its segments as {getSource()}; choose "
                "another output segmentation or make binary labelmap its source representation "
                "(Segmentations module)"
            )
        role = outputSegmentation.GetReferenceImageGeometryReferenceRole()
        if outputSegmentation.GetNodeReference(role) is None:
            outputSegmentation.SetNodeReferenceID(role, inputVolume.GetID())

    def _addSegment(self, outputSegmentation, info: ClassInfo) -> str:
        segmentation = outputSegmentation.GetSegmentation()
        segmentId = info.file_stem
        if segmentation.GetSegment(segmentId) is not None:
            segmentId = segmentation.GenerateUniqueSegmentID(info.file_stem)
        segment = slicer.vtkSegment()
        describeSegment(segment, info, self.catalog)
        segmentation.AddSegment(segment, segmentId)
        return segmentId

    def _placeInSubjectHierarchy(self, inputVolume, outputSegmentation) -> None:
        """Put the segmentation beside the input volume (under its study) in the subject hierarchy."""
        shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)
        if shNode is None:
            return
        volumeItem = shNode.GetItemByDataNode(inputVolume)
        if not volumeItem:  # outside the application nothing adds data nodes to the hierarchy automatically
            volumeItem = shNode.CreateItem(shNode.GetSceneItemID(), inputVolume)
        parent = shNode.GetItemParent(volumeItem)
        segmentationItem = shNode.GetItemByDataNode(outputSegmentation)
        if not segmentationItem:
            shNode.CreateItem(parent, outputSegmentation)
        elif shNode.GetItemParent(segmentationItem) == shNode.GetSceneItemID():
            shNode.SetItemParent(segmentationItem, parent)  # new nodes start at the top; a user's folder is kept

    def exportForTraining(
        self,
        volumeNode,
        segmentationNode,
        folder: str | os.PathLike,
        caseId: str | None = None,
        allowPerClassMasks: bool = False,
        *,
        split: str = "train",
        datasetName: str | None = None,
    ):
        """Write the CT, the confirmed segments and the dataset entry into a training export folder.

        The label map (catalog indices) holds exactly the classes of the segments :meth:`segmentReview` marks as
        annotated (edited or reviewed); the entry lists them as ``annotated`` - every other class counts as not
        annotated. Exports of many scans accumulate in ``folder`` (``dataset.json``, ``images/``, ``labels/``,
        ``masks/``); exporting a scan again replaces its entry and files. ``universalseg-train fit`` reads the folder
        as a dataset of ``type: exported``. See :mod:`UniversalSegLib.training_export` for the format.

        Args:
            volumeNode: the CT the segments belong to (their voxel grid must be the CT's).
            segmentationNode: the segmentation with the reviewed/edited segments.
            folder: the export folder (created if missing).
            caseId: the case's ID (file names); None uses the volume's name.
            allowPerClassMasks: when confirmed segments overlap (a tumour inside its organ), write one mask per class
                instead of refusing.
            split: "train", "val" (held out for validation and evaluation) or "both".
            datasetName: a name for the dataset, kept in ``dataset.json``.

        Returns:
            :class:`UniversalSegLib.training_export.ExportReport`: what was written (``to_text()`` for the status
            line); ``skipped`` lists the segments that were not exported and why.

        Raises:
            InputError: nothing reviewed or edited, two confirmed segments of one class, the folder is not writable,
                segments not on the CT's grid, a case ID of another scan. ``OverlapError`` (an InputError) when
                confirmed segments overlap and ``allowPerClassMasks`` is False.
        """
        from UniversalSegLib.training_export import (
            ExportedClass,
            check_export_folder,
            dataset_file,
            export_case,
            image_from_array,
        )

        self._checkInputVolume(volumeNode)
        if segmentationNode is None or not segmentationNode.IsA("vtkMRMLSegmentationNode"):
            raise InputError("choose the segmentation to export")
        rows = self.segmentReview(segmentationNode)
        duplicates = [row.reason for row in rows if row.duplicate]
        if duplicates:
            raise InputError(f"cannot export: {duplicates[0]}; delete or unmark all but one")
        chosen = [row for row in rows if row.annotated]
        if not chosen:
            raise InputError(
                f"nothing to export: no segment of '{segmentationNode.GetName()}' was reviewed or edited; "
                "select the correct segments and click 'Mark reviewed', or correct segments in the "
                "Segment Editor, then export again"
            )
        check_export_folder(dataset_file(folder).parent)  # before reading any voxels
        classes = [
            ExportedClass(
                row.classIndex,
                self.segmentArray(segmentationNode, row.segmentId, volumeNode),
                row.confirmation,
                self._exportProvenance(segmentationNode, row),
            )
            for row in chosen
        ]
        image = image_from_array(volumeArray(volumeNode), matrixArray(ijkToRas(volumeNode)))
        report = export_case(
            folder,
            image,
            classes,
            case_id=caseId,
            default_case_id=volumeNode.GetName(),
            per_class_masks=allowPerClassMasks,
            split=split,
            dataset_name=datasetName,
            catalog=self.catalog,
            provenance={
                "volume": volumeNode.GetName(),
                "segmentation": segmentationNode.GetName(),
                "exported_by": f"UniversalSeg Slicer module {ENGINE_VERSION}",
            },
        )
        report.skipped = {row.name: row.reason for row in rows if not row.annotated}
        return report


def _runSteps(steps):
    """Run an import generator to its end in this thread (scripts, tests); returns what it returns."""
    while True:
        try:
            fraction = next(steps)
        except StopIteration as stop:
            return stop.value
        if fraction is None:  # waiting for the reader thread
            time.sleep(0.002)


def _settingsForTag(summary: dict[str, Any]) -> dict[str, Any]:
    settings = summary.get("settings") or {}
    keep = {
        k: settings[k] for k in ("overlap", "fast", "threshold", "class_thresholds", "postprocess") if k in settings
    }
    keep["device"] = summary.get("device")
    return keep


# ======================================================================================= Slicer application part
class UniversalSeg(ScriptedLoadableModule):
    """Module description shown in Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("UniversalSeg")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["UniversalSeg contributors"]
        self.parent.helpText = _(
            "Segments 25 abdominal organs and vessels and 6 tumor types (32 classes) in CT with the CLIP-Driven "
            "Universal Model. Tick classes or type what you need (e.g. 'IVC and both kidneys'), click Segment, then "
            "correct the segments in the Segment Editor: running again never replaces segments you edited. Mark the "
            "segments you checked as reviewed and use 'Export for training' to collect your corrections as a dataset "
            "for fine-tuning the model (universalseg-train).<br>"
            "See the <a href='https://github.com/ljwztc/CLIP-Driven-Universal-Model'>model's home page</a> and this "
            "extension's README for details."
        )
        self.parent.acknowledgementText = _(
            "Uses the CLIP-Driven Universal Model: J. Liu et al., 'CLIP-Driven Universal Model for Organ Segmentation "
            "and Tumor Detection', ICCV 2023 (arXiv:2301.00785). The official weights, (c) Johns Hopkins University, "
            "are licensed under CC BY-NC-ND 4.0 and are downloaded only after you accept that licence."
        )
        self.unsupportedMessage = unsupportedSlicerMessage()
        if self.unsupportedMessage:  # the module still loads and says why it cannot run (no pip failure later)
            logger.error(self.unsupportedMessage)
            self.parent.helpText = f"<p><b>{_html(self.unsupportedMessage)}</b></p>" + self.parent.helpText
        if IN_SLICER_APP:  # the Terminologies module is loaded only once startup completes
            slicer.app.connect("startupCompleted()", self.loadTerminology)

    def loadTerminology(self) -> None:
        """Load Resources/SegmentationCategoryTypeModifier-UniversalSeg.term.json into Slicer's Terminologies."""
        try:
            terminology.load_terminology(slicer.modules.terminologies.logic())
        except (AttributeError, RuntimeError) as exc:  # no Terminologies module, or the file did not load
            logger.warning(f"UniversalSeg terminology not loaded ({exc}); segment types show as codes only")


def unsupportedSlicerMessage() -> str | None:
    """One line when this Slicer cannot run UniversalSeg (older than 5.10, or Python < 3.10), else None."""
    if not IN_SLICER_APP:
        return None
    return dependencies.unsupported_slicer_message((slicer.app.majorVersion, slicer.app.minorVersion))


if HAVE_PARAMETER_NODE_WRAPPER:

    @parameterNodeWrapper
    class UniversalSegParameterNode:
        """GUI state, saved with the scene. ``classes``: comma-separated catalog file stems of the class picker;
        ``model``: registry name or checkpoint path; ``device``/``quality``: combo box choices; ``exportDatasetName``
        / ``exportSplit``: the "Export for training" section (its folder is an application setting: one dataset
        folder collects the exports of many scenes). The segmentation settings are the engine request's
        (UniversalSegLib.request), under the names of ``PARAMETER_NODE_FIELDS`` (UniversalSegSlicerLib.parameters;
        the .ui binds them and saved scenes store them); Testing/test_request.py checks them one to one."""

        inputVolume: slicer.vtkMRMLScalarVolumeNode
        outputSegmentation: slicer.vtkMRMLSegmentationNode
        classes: str = ""
        prompt: str = ""
        model: str = DEFAULT_MODEL
        device: Annotated[str, Choice(["auto", "gpu", "cpu"])] = "auto"
        quality: Annotated[str, Choice(["normal", "fast"])] = "normal"
        overlap: Annotated[float, WithinRange(0.0, 0.9)] = 0.5
        threshold: Annotated[float, WithinRange(0.05, 0.95)] = 0.5
        postprocess: bool = True
        largestComponent: bool = True
        lungSplit: bool = True
        portalVeinFilter: bool = True
        tumorFilter: bool = True
        overwrite: bool = False
        exportDatasetName: str = ""
        exportSplit: Annotated[str, Choice(["train", "val", "both"])] = "train"


#: QComboBox entry of the model selector that reveals the checkpoint path field.
CUSTOM_MODEL_ITEM = "Checkpoint file..."


class UniversalSegWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The module panel: inputs, class picker, prompt with live preview, model, Segment/Cancel, progress, log."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: UniversalSegLogic | None = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._task: SegmentationTask | None = None
        self._pollTimer = None
        self._previewTimer = None
        self._syncing = False
        self._classItems: dict[str, Any] = {}
        self._reviewTimer = None
        self._segmentationObserver = SegmentationObserver(self._onSegmentationChanged)

    # -- set-up ----------------------------------------------------------------------------------------------
    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/UniversalSeg.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = UniversalSegLogic()

        self._populateClassTree()
        self._populateModels()
        self.ui.customModelPathLineEdit.nameFilters = ["Checkpoints (*.safetensors *.pth *.pt *.ckpt)"]
        self.ui.customModelPathLineEdit.visible = False

        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(200)
        self._pollTimer.timeout.connect(self._pollTask)
        self._previewTimer = qt.QTimer()
        self._previewTimer.setSingleShot(True)
        self._previewTimer.setInterval(300)
        self._previewTimer.timeout.connect(self._updatePromptPreview)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.classTreeWidget.itemChanged.connect(self._onClassItemChanged)
        self.ui.classSearchBox.textChanged.connect(self._filterClassTree)
        for button, preset in (
            (self.ui.presetAllOrgansButton, "All organs"),
            (self.ui.presetAbdominalOrgansButton, "Abdominal organs"),
            (self.ui.presetAllTumorsButton, "All tumors"),
            (self.ui.presetClearButton, "Clear"),
        ):
            button.clicked.connect(lambda checked=False, p=preset: self._applyPreset(p))
        # Synchronised by hand, not through SlicerParameterName: see UniversalSegSlicerLib.guisync.
        self.ui.promptTextEdit.textChanged.connect(self._onPromptEdited)
        self.ui.modelComboBox.currentIndexChanged.connect(self._onModelChanged)
        self.ui.customModelPathLineEdit.currentPathChanged.connect(self._onCustomModelPathChanged)
        self.ui.applyButton.clicked.connect(self.onApplyButton)
        self.ui.editSegmentsButton.clicked.connect(self.onEditSegments)
        self.ui.outputSegmentationSelector.connect(
            "currentNodeChanged(vtkMRMLNode*)", self.ui.segmentationShow3DButton.setSegmentationNode
        )

        # Review and export for training
        table = self.ui.segmentReviewTable
        table.setColumnCount(3)
        table.setHorizontalHeaderLabels(["Segment", "State", "Training"])
        table.horizontalHeader().setStretchLastSection(True)
        table.verticalHeader().setVisible(False)
        self._reviewTimer = qt.QTimer()
        self._reviewTimer.setSingleShot(True)
        self._reviewTimer.setInterval(500)  # edits arrive as bursts of events: recompute the states once
        self._reviewTimer.timeout.connect(self._updateReviewTable)
        self.ui.markReviewedButton.clicked.connect(lambda checked=False: self.onMarkReviewed(True))
        self.ui.unmarkReviewedButton.clicked.connect(lambda checked=False: self.onMarkReviewed(False))
        self.ui.trackSegmentsButton.clicked.connect(self.onTrackSegments)
        self.ui.refreshReviewButton.clicked.connect(self.onRefreshReview)
        self.ui.exportFolderPathLineEdit.settingKey = "UniversalSeg/ExportFolder"  # remembered across sessions
        self.ui.exportFolderPathLineEdit.currentPathChanged.connect(lambda path: self._updateExportButton())
        self.ui.exportButton.clicked.connect(self.onExportButton)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called before the widget is deleted (Reload, application exit): no timer may call into it afterwards."""
        for timer in (self._pollTimer, self._previewTimer, self._reviewTimer):
            if timer is not None:
                timer.stop()
        task, self._task = self._task, None
        if task is not None and not task.finished:
            task.onProgress = task.onLog = task.onFinished = None  # they call into this widget
            if task.state == SegmentationTask.IMPORTING:
                task.wait()  # well under a second; leaves no half-imported result
            else:
                task.cancel(wait=True)
        self._segmentationObserver.stop()
        self.removeObservers()

    def enter(self) -> None:
        # Connects the GUI and observes the output segmentation again (exit() stopped both).
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        # Edits made in other modules (the Segment Editor) must not cost anything here.
        self._observeSegmentation(None)
        if self._reviewTimer is not None:
            self._reviewTimer.stop()

    def onSceneStartClose(self, caller, event) -> None:
        if self._task is not None and not self._task.finished:
            self._task.cancel()
        self._observeSegmentation(None)
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -- parameter node --------------------------------------------------------------------------------------
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume:
                self._parameterNode.inputVolume = firstVolume

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a SlicerParameterName property in the .ui are bound both ways here.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        """Bring the widgets that are not bound automatically (class tree, model) in line, and the buttons."""
        node = self._parameterNode
        if node is None or self._syncing:
            return
        self._syncing = True
        try:
            wanted = {s for s in node.classes.split(",") if s}
            for stem, item in self._classItems.items():
                item.setCheckState(0, qt.Qt.Checked if stem in wanted else qt.Qt.Unchecked)
            self._selectModelInCombo(node.model)
            prompt = guisync.textToWrite(self.ui.promptTextEdit.toPlainText(), node.prompt)
            if prompt is not None:  # a scene was loaded or a script set it: not an echo of the user's typing
                self.ui.promptTextEdit.setPlainText(prompt)
            if node.inputVolume:
                self.ui.outputSegmentationSelector.baseName = f"{node.inputVolume.GetName()} segmentation"
            fast = node.quality == "fast"
            self.ui.overlapSliderWidget.enabled = not fast
            for checkBox in (
                self.ui.largestComponentCheckBox,
                self.ui.lungSplitCheckBox,
                self.ui.portalVeinFilterCheckBox,
                self.ui.tumorFilterCheckBox,
            ):
                checkBox.enabled = node.postprocess
        finally:
            self._syncing = False
        self._updateClassCount()
        self._updateModelInfo()
        self._updateApplyButton()
        self._observeSegmentation(node.outputSegmentation)
        self._updateExportButton()

    # -- class picker ----------------------------------------------------------------------------------------
    def _populateClassTree(self) -> None:
        tree = self.ui.classTreeWidget
        tree.clear()
        tree.setHeaderHidden(True)
        self._classItems = {}
        for title, classes in self.logic.classGroups():
            group = qt.QTreeWidgetItem(tree, [title])
            group.setFlags(group.flags() | qt.Qt.ItemIsUserCheckable | qt.Qt.ItemIsAutoTristate)
            group.setCheckState(0, qt.Qt.Unchecked)
            for info in classes:
                item = qt.QTreeWidgetItem(group, [info.name])
                item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
                item.setCheckState(0, qt.Qt.Unchecked)
                item.setData(0, qt.Qt.UserRole, info.file_stem)
                pixmap = qt.QPixmap(14, 14)
                pixmap.fill(qt.QColor(*info.color))
                item.setIcon(0, qt.QIcon(pixmap))
                item.setToolTip(
                    0, f"{info.name} - also: {', '.join(info.synonyms[:6])}" if info.synonyms else info.name
                )
                self._classItems[info.file_stem] = item
            group.setExpanded(True)

    def _checkedStems(self) -> list[str]:
        # A group's tristate check also checks its disabled children (classes the model lacks): leave those out.
        return [
            stem
            for stem, item in self._classItems.items()
            if item.checkState(0) == qt.Qt.Checked and not item.isDisabled()
        ]

    def _markProvidedClasses(self, model: str) -> None:
        """Grey out the classes ``model`` does not provide (asking for one would fail) and show held-out Dice."""
        provided = self.logic.providedClasses(model)
        for stem, item in self._classItems.items():
            name = item.text(0)
            lacks = provided is not None and stem not in provided
            item.setDisabled(lacks)
            tip = item.data(0, qt.Qt.UserRole + 1) or item.toolTip(0)
            item.setData(0, qt.Qt.UserRole + 1, tip)
            if lacks:
                item.setToolTip(
                    0, f"{name}: not provided by the model {model or DEFAULT_MODEL}; choose another model for it"
                )
            elif provided is not None and provided.get(stem) is not None:
                item.setToolTip(0, f"{tip} - Dice {provided[stem]:.2f} on a patient the model never saw")
            else:
                item.setToolTip(0, tip)

    def _onClassItemChanged(self, item, column) -> None:
        if self._syncing or self._parameterNode is None:
            return
        self._syncing = True
        try:
            self._parameterNode.classes = ",".join(self._checkedStems())
        finally:
            self._syncing = False
        self._updateClassCount()
        self._updateApplyButton()

    def _applyPreset(self, preset: str) -> None:
        stems = self.logic.classPresets()[preset]
        current = set() if preset == "Clear" else set(self._checkedStems())
        if self._parameterNode is not None:
            self._parameterNode.classes = ",".join(s for s in self._classItems if s in current | set(stems))

    def _filterClassTree(self, text: str) -> None:
        needle = text.strip().lower()
        for stem, item in self._classItems.items():
            info = self.logic.catalog.lookup(stem)
            haystack = " ".join((info.name, info.prompt_name, stem, *info.synonyms)).lower()
            item.setHidden(bool(needle) and needle not in haystack)
        tree = self.ui.classTreeWidget
        for i in range(tree.topLevelItemCount):
            group = tree.topLevelItem(i)
            group.setHidden(all(group.child(j).isHidden() for j in range(group.childCount())))

    def _requestedClasses(self) -> list[ClassInfo]:
        node = self._parameterNode
        stems = [s for s in node.classes.split(",") if s]
        try:
            return self.logic.requestedClasses(stems, node.prompt)
        except ImportError:  # engine dependencies not installed yet: the prompt cannot be resolved here
            return self.logic.requestedClasses(stems)

    def _updateClassCount(self) -> None:
        if self._parameterNode is None:
            return
        names = [c.name for c in self._requestedClasses()]
        self.ui.classCountLabel.text = (
            f"{len(names)} classes: {', '.join(names)}"
            if names
            else "No classes selected: tick classes or type a prompt."
        )

    # -- prompt preview --------------------------------------------------------------------------------------
    def _onPromptEdited(self) -> None:
        if not self._syncing and self._parameterNode is not None:
            value = guisync.parameterToWrite(self.ui.promptTextEdit.toPlainText(), self._parameterNode.prompt)
            if value is not None:
                self._parameterNode.prompt = value
        self._previewTimer.start()

    def _updatePromptPreview(self) -> None:
        text = self.ui.promptTextEdit.toPlainText()
        try:
            items = self.logic.describePrompt(text)
        except ImportError:
            self.ui.promptPreviewLabel.text = (
                "The prompt preview needs the engine's Python packages; they are "
                "installed when you first click Segment."
            )
            return
        rows = []
        for item in items:
            text_ = _html(item["text"])
            if item["accepted"]:
                rows.append(
                    f"<span style='color:#1a7f37'>&#10003; '{text_}' &rarr; {_html(', '.join(item['classes']))}"
                    f" <i>({item['method']})</i></span>"
                )
            else:
                hint = f" Did you mean: {_html(', '.join(item['suggestions']))}?" if item["suggestions"] else ""
                rows.append(
                    f"<span style='color:#cf222e'>&#10007; '{text_}' is not a known class.{hint} "
                    "CLIP text matching will try it when you click Segment.</span>"
                )
        self.ui.promptPreviewLabel.text = "<br>".join(rows)
        self._updateClassCount()
        self._updateApplyButton()

    # -- model -----------------------------------------------------------------------------------------------
    def _populateModels(self) -> None:
        combo = self.ui.modelComboBox
        combo.clear()
        for row in self.logic.modelChoices():
            combo.addItem(row["name"] + (" (default)" if row["default"] else ""), row["name"])
        combo.addItem(CUSTOM_MODEL_ITEM, "")

    def _selectModelInCombo(self, model: str) -> None:
        combo = self.ui.modelComboBox
        index = combo.findData(model)
        if index < 0:  # a checkpoint path
            index = combo.count - 1
            self.ui.customModelPathLineEdit.currentPath = model
        combo.currentIndex = index
        self.ui.customModelPathLineEdit.visible = index == combo.count - 1

    def _onModelChanged(self, index: int) -> None:
        if self._syncing or self._parameterNode is None:
            return
        combo = self.ui.modelComboBox
        custom = index == combo.count - 1
        self.ui.customModelPathLineEdit.visible = custom
        self._parameterNode.model = self.ui.customModelPathLineEdit.currentPath if custom else combo.itemData(index)

    def _onCustomModelPathChanged(self, path: str) -> None:
        if not self._syncing and self._parameterNode is not None and self.ui.customModelPathLineEdit.visible:
            self._parameterNode.model = path

    def _updateModelInfo(self) -> None:
        model = self._parameterNode.model if self._parameterNode else ""
        try:
            self._markProvidedClasses(model)
        except UniversalSegError as exc:  # an unreadable checkpoint file: the run reports it in full
            logging.warning("UniversalSeg: cannot read the classes of %s: %s", model, exc)
        rows = {row["name"]: row for row in self.logic.modelChoices()}
        row = rows.get(model)
        if row is None:
            self.ui.modelInfoLabel.text = f"Checkpoint file: {_html(model) or '(choose a file)'}"
            return
        size = f" ({row['size_text']})" if row["size"] else ""
        status = {
            "bundled": "bundled with the extension",
            "downloaded": "downloaded",
            "not downloaded": f"downloaded on first use{size}",
        }[row["status"]]
        licence = f"licence <a href='{row['licence_url']}'>{_html(row['licence'])}</a>" + (
            " (accepted)" if row["licence_accepted"] else " - shown for acceptance before the download"
        )
        self.ui.modelInfoLabel.text = f"{_html(row['description'])}<br>Weights: {status}; {licence}."

    # -- run -------------------------------------------------------------------------------------------------
    def _updateApplyButton(self) -> None:
        running = self._task is not None and not self._task.finished
        node = self._parameterNode
        if running:
            self.ui.applyButton.text = "Cancel"
            self.ui.applyButton.toolTip = "Stop the segmentation; the output segmentation is left unchanged."
            self.ui.applyButton.enabled = True
            return
        self.ui.applyButton.text = "Segment"
        ready = bool(node and node.inputVolume and (node.classes.strip() or node.prompt.strip()))
        self.ui.applyButton.enabled = ready
        self.ui.applyButton.toolTip = (
            "Segment the chosen classes" if ready else "Choose an input volume, and tick classes or type a prompt"
        )

    def _parameters(self) -> SegmentationParameters:
        # The node's setting fields map one to one onto the request's (PARAMETER_NODE_FIELDS, checked by
        # Testing/test_request.py); quality "fast" is the request's fast preset.
        return SegmentationParameters.fromParameterNode(self._parameterNode)

    def onApplyButton(self) -> None:
        if self._task is not None and not self._task.finished:
            self._task.cancel()
            self.ui.statusLabel.text = "Cancelling..."
            return
        parameters = self._parameters()
        self.ui.logTextEdit.clear()
        if not self._ensureDependencies():
            return
        if self.logic.modelNeedsLicenceAcceptance(parameters.model):
            if not self._askLicence(parameters.model):
                self.ui.statusLabel.text = "Cancelled: the model's licence was not accepted."
                return
            parameters.acceptLicence = True
        try:
            with slicer.util.WaitCursor():
                self._task = self.logic.startSegmentation(
                    self._parameterNode.inputVolume,
                    self._parameterNode.outputSegmentation,
                    parameters,
                    onProgress=self._onProgress,
                    onLog=self._log,
                    onFinished=self._onFinished,
                )
        except Exception as exc:  # noqa: BLE001 - bad input or the engine would not start: tell the user
            logger.exception("segmentation could not start")
            self.ui.statusLabel.text = f"Could not start: {printable(exc)}"
            slicer.util.errorDisplay(f"Segmentation could not start:\n{exc}", windowTitle="UniversalSeg")
            self._updateApplyButton()
            return
        self.ui.progressBar.value = 0
        self.ui.progressBar.setFormat("starting the engine  %p%")
        self.ui.statusLabel.text = "Segmenting... (the window stays usable; click Cancel to stop)"
        self._log("Started: " + ", ".join(c.name for c in self._requestedClasses()))
        row = {r["name"]: r for r in self.logic.modelChoices()}.get(parameters.model)
        if row is not None and row["status"] == "not downloaded":
            self._log("The model's weights are downloaded first (once); the progress bar moves when that is done.")
        self._pollTimer.start()
        self._updateApplyButton()

    def _ensureDependencies(self) -> bool:
        unsupported = unsupportedSlicerMessage()
        if unsupported:
            slicer.util.errorDisplay(unsupported, windowTitle="UniversalSeg")
            self.ui.statusLabel.text = unsupported
            return False
        plan = self.logic.dependencyPlan()
        if plan.ready:
            return True
        if plan.conflicts:  # Slicer's own packages are never replaced: refuse, with the reason
            slicer.util.errorDisplay("\n".join(plan.conflicts), windowTitle="UniversalSeg cannot install its packages")
            self.ui.statusLabel.text = "Python packages conflict with this Slicer's own packages."
            return False
        if not slicer.util.confirmOkCancelDisplay(
            "UniversalSeg needs these Python packages, which are not installed yet or are too old:\n\n"
            + "\n".join(plan.describe())
            + "\n\nThey will be downloaded and installed into Slicer's Python "
            "(PyTorch through the PyTorch extension, which asks once more); Slicer's own packages are kept as they "
            "are. This can take several minutes. Install now?",
            "Install Python packages",
        ):
            self.ui.statusLabel.text = "Cancelled: the required Python packages are not installed."
            return False
        self.ui.statusLabel.text = "Installing Python packages..."
        try:
            with slicer.util.WaitCursor():
                restart = self.logic.installDependencies(plan, log=self._log)
        except EngineError as exc:
            slicer.util.errorDisplay(str(exc), windowTitle="Installation failed")
            self.ui.statusLabel.text = "Installing Python packages failed."
            return False
        if restart:
            self.ui.statusLabel.text = "Restart Slicer to finish the installation."
            if slicer.util.confirmOkCancelDisplay(
                "Slicer must restart to use the updated Python packages. Restart now?", "Restart needed"
            ):
                slicer.util.restart()
            return False
        return True

    def _askLicence(self, model: str) -> bool:
        entry = self.logic.modelEntry(model)
        accepted = slicer.util.confirmOkCancelDisplay(
            f"The weights of '{entry.name}' are licensed under {entry.licence}:\n{entry.licence_url}\n\n"
            f"{entry.description}\n\nThe weights are downloaded once, on the first run. Press OK to accept the "
            "licence and continue.",
            "Model licence",
        )
        if accepted:
            self.logic.acceptModelLicence(model)
            self._updateModelInfo()
        return accepted

    def _pollTask(self) -> None:
        if self._task is None or self._task.poll():
            self._pollTimer.stop()

    def _onProgress(self, fraction: float, stage: str) -> None:
        self.ui.progressBar.value = int(round(fraction * 100))
        self.ui.progressBar.setFormat(f"{stage}  %p%")

    def _log(self, text: str) -> None:
        self.ui.logTextEdit.appendPlainText(printable(text))

    def _onFinished(self, task: SegmentationTask) -> None:
        seconds = time.monotonic() - task.startTime
        if task.state == SegmentationTask.DONE:
            if self._parameterNode is not None:
                self._parameterNode.outputSegmentation = task.outputSegmentation  # a new one, if none was chosen
            self.ui.progressBar.value = 100
            self.ui.statusLabel.text = f"Done in {seconds:.0f} s.\n{task.report.toText()}"
            self._log(task.report.toText())
            displayNode = task.outputSegmentation.GetDisplayNode()
            if displayNode:
                displayNode.SetVisibility(True)
            slicer.util.setSliceViewerLayers(background=task.inputVolume)
        elif task.state == SegmentationTask.CANCELLED:
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = "Cancelled. The output segmentation was not changed."
        else:
            self.ui.statusLabel.text = f"Failed: {printable(task.error)}"
            slicer.util.errorDisplay(task.error or "Segmentation failed.", windowTitle="UniversalSeg")
        self._updateApplyButton()
        self._updateModelInfo()

    def onEditSegments(self) -> None:
        """Open the Segment Editor on the output segmentation with the input volume as source."""
        node = self._parameterNode
        if not node or not node.outputSegmentation:
            return
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        editor.setSegmentationNode(node.outputSegmentation)
        if node.inputVolume:
            setSource = getattr(editor, "setSourceVolumeNode", None) or getattr(editor, "setMasterVolumeNode")
            setSource(node.inputVolume)

    # -- review and export for training ----------------------------------------------------------------------
    @property
    def _observedSegmentation(self):
        return self._segmentationObserver.node

    def _observeSegmentation(self, segmentationNode) -> None:
        """Follow the output segmentation's edits to keep the review table current."""
        if self._segmentationObserver.observe(segmentationNode) and self._reviewTimer is not None:
            self._reviewTimer.start()

    def _onSegmentationChanged(self) -> None:
        # Runs for every event of every Segment Editor stroke: only restart the timer.
        self._reviewTimer.start()

    def _selectedSegmentIds(self) -> list[str]:
        table = self.ui.segmentReviewTable
        rows = sorted({item.row() for item in table.selectedItems()})
        return [table.item(row, 0).data(qt.Qt.UserRole) for row in rows if table.item(row, 0) is not None]

    def onRefreshReview(self) -> None:
        """Compare the segments changed since their last check with their AI masks (reads voxels)."""
        with slicer.util.WaitCursor():
            self._updateReviewTable(verify=True)

    def _updateReviewTable(self, verify: bool = False) -> None:
        """Fill the review table: one row per segment with its state and whether it is exported. Without
        ``verify`` no voxels are read (after each edit); segments changed since their last check show so."""
        table = self.ui.segmentReviewTable
        selected = set(self._selectedSegmentIds())
        table.setRowCount(0)
        node = self._observedSegmentation
        if node is None or node.GetScene() is None:
            self.ui.reviewSummaryLabel.text = "No segmentation yet: segment a CT or choose a segmentation."
            self.ui.trackSegmentsButton.enabled = False
            self._updateExportButton()
            return
        rows = self.logic.segmentReview(node, verify=verify)
        colours = {STATE_AI: "#6e7781", STATE_EDITED: "#9a6700", STATE_REVIEWED: "#1a7f37", STATE_MANUAL: "#0969da"}
        segmentation = node.GetSegmentation()
        table.setRowCount(len(rows))
        for r, row in enumerate(rows):
            segment = segmentation.GetSegment(row.segmentId)
            nameItem = qt.QTableWidgetItem(row.name)
            nameItem.setData(qt.Qt.UserRole, row.segmentId)
            pixmap = qt.QPixmap(12, 12)
            pixmap.fill(qt.QColor.fromRgbF(*segment.GetColor()))
            nameItem.setIcon(qt.QIcon(pixmap))
            provenance = self.logic.segmentProvenance(node, row.segmentId)
            nameItem.setToolTip(
                "\n".join(f"{k}: {v}" for k, v in provenance.items() if k != "Fingerprint")
                or "Not made by UniversalSeg"
            )
            stateItem = qt.QTableWidgetItem(row.stateText)
            stateItem.setForeground(qt.QBrush(qt.QColor(colours[row.state])))
            trainingItem = qt.QTableWidgetItem(row.trainingText)
            trainingItem.setToolTip(row.trainingText)
            for column, item in enumerate((nameItem, stateItem, trainingItem)):
                table.setItem(r, column, item)
                item.setSelected(row.segmentId in selected)
        table.resizeColumnToContents(0)
        table.resizeColumnToContents(1)
        exported = [f"{row.className} ({row.confirmation})" for row in rows if row.annotated]
        summary = (
            f"{len(exported)} of {len(rows)} segments are exported as training labels: {', '.join(exported)}."
            if exported
            else f"None of the {len(rows)} segments is reviewed or edited yet: nothing to export."
        )
        stale = [row.name for row in rows if row.stale]
        if stale:
            summary += (
                f"\n{len(stale)} changed or loaded since the last check ({', '.join(stale[:5])}"
                f"{', ...' if len(stale) > 5 else ''}): click Refresh to compare them with the AI masks."
            )
        self.ui.reviewSummaryLabel.text = summary
        self.ui.trackSegmentsButton.enabled = any(row.state == STATE_MANUAL and row.classIndex for row in rows)
        self._updateExportButton()

    def onMarkReviewed(self, reviewed: bool) -> None:
        node = self._observedSegmentation
        segmentIds = self._selectedSegmentIds()
        if node is None or not segmentIds:
            self.ui.exportStatusLabel.text = "Select segments in the table first."
            return
        for segmentId in segmentIds:
            self.logic.markSegmentReviewed(node, segmentId, reviewed)
        self._updateReviewTable()

    def onTrackSegments(self) -> None:
        node = self._observedSegmentation
        if node is None:
            return
        model = self._parameterNode.model if self._parameterNode else ""
        if not slicer.util.confirmOkCancelDisplay(
            "Treat the segments named after catalog classes as unreviewed output of the model "
            f"'{model}' from now on? Changes you make afterwards show as 'Edited'. Segments you already "
            "corrected should be marked reviewed after this.",
            "Track loaded segments",
        ):
            return
        tracked = self.logic.trackSegments(node, model=model)
        self.ui.exportStatusLabel.text = f"Tracking {len(tracked)} segment{'s' if len(tracked) != 1 else ''}."
        self._updateReviewTable()

    def _updateExportButton(self) -> None:
        node = self._parameterNode
        folder = self.ui.exportFolderPathLineEdit.currentPath
        ready = bool(node and node.inputVolume and node.outputSegmentation and folder.strip())
        self.ui.exportButton.enabled = ready
        self.ui.exportButton.toolTip = (
            "Write the CT, a label map of the reviewed and edited segments and the dataset entry into the export folder"
            if ready
            else "Choose the input CT, its segmentation and an export folder"
        )

    def onExportButton(self) -> None:
        from UniversalSegLib.training_export import OverlapError

        node = self._parameterNode
        if not node or not node.inputVolume or not node.outputSegmentation:
            return
        folder = self.ui.exportFolderPathLineEdit.currentPath
        kwargs = dict(
            caseId=self.ui.exportCaseIdLineEdit.text.strip() or None,
            split=node.exportSplit,
            datasetName=node.exportDatasetName.strip() or None,
        )
        try:
            try:
                with slicer.util.WaitCursor():
                    report = self.logic.exportForTraining(node.inputVolume, node.outputSegmentation, folder, **kwargs)
            except OverlapError as exc:
                if not slicer.util.confirmOkCancelDisplay(
                    f"{exc}.\n\nExport one mask per class instead? Training reads both forms.", "Segments overlap"
                ):
                    self.ui.exportStatusLabel.text = "Not exported: segments overlap."
                    return
                with slicer.util.WaitCursor():
                    report = self.logic.exportForTraining(
                        node.inputVolume, node.outputSegmentation, folder, allowPerClassMasks=True, **kwargs
                    )
        except UniversalSegError as exc:
            self.ui.exportStatusLabel.text = f"Not exported: {exc}"
            slicer.util.errorDisplay(f"Export for training failed:\n{exc}", windowTitle="UniversalSeg")
            return
        except Exception as exc:  # noqa: BLE001 - disk full and the like: tell the user, keep the details in the log
            logger.exception("export for training failed")
            self.ui.exportStatusLabel.text = f"Not exported: {exc}"
            slicer.util.errorDisplay(f"Export for training failed:\n{exc}", windowTitle="UniversalSeg")
            return
        self.ui.exportFolderPathLineEdit.addCurrentPathToHistory()
        self.ui.exportStatusLabel.text = report.to_text()
        self._log(report.to_text())


def _html(text: str) -> str:
    # printable(): control characters from user input (prompts, file names) shown as escapes, never interpreted.
    return printable(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


# ------------------------------------------------------------------------------------------------ self-test
class UniversalSegTest(ScriptedLoadableModuleTest):
    """Self-test, run inside Slicer (Developer mode: "Reload and Test").

    Downloads the SampleData CT "CTACardio", runs the registry's default model on the CPU for three classes, and
    checks segment count, names, terminology, provenance and that no segment is empty; then edits one segment,
    checks that a second run keeps the edit and that "Export for training" writes only that segment. Installs missing Python packages first and accepts the model licence
    (run it only if you accept it). Takes several minutes on a CPU.
    """

    CLASSES = ("aorta", "right_lung", "left_lung")

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        # "Reload and Test" calls runTest() directly, not through a unittest runner, so a skipTest() would reach
        # the user as an error: report it as a skip instead (ScriptedLoadableModule.py, 5.10 and 5.12).
        self.setUp()
        try:
            self.test_SegmentSampleCT()
        except unittest.SkipTest as skip:
            logger.warning(f"UniversalSeg self-test skipped: {skip}")
            self.delayDisplay(f"Self-test skipped: {skip}")

    def test_SegmentSampleCT(self):
        import SampleData

        self.delayDisplay("Loading CTACardio")
        volume = SampleData.downloadSample("CTACardio")
        logic = UniversalSegLogic()
        unsupported = unsupportedSlicerMessage()
        if unsupported:
            self.skipTest(unsupported)
        plan = logic.dependencyPlan()
        if not plan.ready:
            self.delayDisplay("Installing " + ", ".join(plan.describe() + plan.conflicts))
            if logic.installDependencies(plan):
                self.skipTest("Python packages were updated; restart Slicer and run the test again")

        self.delayDisplay("Segmenting (CPU, fast mode)")
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "UniversalSeg test")
        parameters = SegmentationParameters(
            classes=list(self.CLASSES), model=DEFAULT_MODEL, device="cpu", fast=True, acceptLicence=True
        )
        report = logic.segment(volume, segmentation, parameters, onLog=logging.info)
        catalog = logic.catalog
        expected = [catalog.lookup(stem) for stem in self.CLASSES]
        segments = segmentation.GetSegmentation()
        self.assertEqual(segments.GetNumberOfSegments(), len(expected))
        self.assertEqual(sorted(report.added), sorted(info.name for info in expected))
        for info in expected:
            segmentId = report.segmentIds[info.index]
            segment = segments.GetSegment(segmentId)
            self.assertEqual(segment.GetName(), info.name)
            self.assertEqual(
                getTag(segment, slicer.vtkSegment.GetTerminologyEntryTagName()), catalog.slicer_terminology(info)
            )
            self.assertEqual(logic.segmentState(segmentation, segmentId), STATE_AI)
            self.assertEqual(logic.segmentProvenance(segmentation, segmentId)["ClassIndex"], str(info.index))
            voxels = int(logic.segmentArray(segmentation, segmentId, volume).sum())
            self.assertGreater(voxels, 1000, f"{info.name} is (nearly) empty")

        self.delayDisplay("Editing the aorta, running again")
        aortaId = report.segmentIds[catalog.lookup("aorta").index]
        edited = logic.segmentArray(segmentation, aortaId, volume)
        slices = np.flatnonzero(edited.any(axis=(1, 2)))
        edited[slices[: max(1, len(slices) // 2)]] = False  # erase its lower half, as a user would with the Scissors
        labelmap = _orientedImageFromMask(edited, _ijkToRas(volume))
        slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
            labelmap, segmentation, aortaId, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE
        )
        self.assertEqual(logic.segmentState(segmentation, aortaId), STATE_EDITED)
        again = logic.segment(volume, segmentation, replace(parameters, classes=["aorta"]))
        self.assertEqual(again.keptEdited, ["Aorta"])
        self.assertTrue(np.array_equal(logic.segmentArray(segmentation, aortaId, volume), edited))

        self.delayDisplay("Exporting the corrected aorta for training")
        exportFolder = Path(tempfile.mkdtemp(prefix="UniversalSeg-export-", dir=slicer.app.temporaryPath))
        try:
            export = logic.exportForTraining(volume, segmentation, exportFolder)
            self.assertEqual(export.annotated, ["Aorta"])  # the unreviewed AI lungs are not training labels
            import SimpleITK as sitk

            labels = sitk.GetArrayFromImage(sitk.ReadImage(str(export.label)))
            self.assertTrue(np.array_equal(labels, edited.astype(np.uint8) * catalog.lookup("aorta").index))
            self.assertEqual(len(json.loads((exportFolder / "dataset.json").read_text())["cases"]), 1)
        finally:
            shutil.rmtree(exportFolder, ignore_errors=True)
        self.delayDisplay("Test passed")
