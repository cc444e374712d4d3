"""UniversalSeg: 3D Slicer module around the CLIP-Driven Universal Model (32 abdominal CT classes).

Pick classes or type a prompt, click **Segment**, then correct the result in the Segment Editor.

Layout of this file:

* :class:`UniversalSegLogic` (no Qt): runs the engine's command line (``python -m UniversalSegLib segment``) in a
  separate process, reads its JSON progress lines, and imports the per-class masks into a
  ``vtkMRMLSegmentationNode`` - one segment per class, named, coloured and tagged with the catalog's SNOMED CT
  terminology. Every segment it makes carries provenance tags and a fingerprint of the AI mask, so a re-run never
  replaces a segment the user edited (see :meth:`UniversalSegLogic.segmentState`). The correction loop builds on
  that: :meth:`UniversalSegLogic.segmentReview` says which segments a person reviewed or edited, and
  :meth:`UniversalSegLogic.exportForTraining` writes the CT and exactly those classes as a training dataset
  (:mod:`UniversalSegLib.training_export`) that ``universalseg-train fit`` fine-tunes on. It works with any MRML
  scene, so tests and scripts use it with the PyPI package ``slicer-core`` (see :func:`createHeadlessScene`).
* :class:`UniversalSegWidget`, :class:`UniversalSeg`, :class:`UniversalSegTest`: the GUI, module description and
  self-test; they need the Slicer application (``qt``, ``ctk``, ``slicer.app``), whose imports are guarded so that
  this file also imports where only ``slicer-core`` is installed.

Image arrays follow VTK/SimpleITK memory order: a volume of ``(I, J, K)`` voxels is a numpy array of shape
``(K, J, I)`` (slice, row, column); geometry is Slicer's IJK-to-RAS matrix.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import json
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import vtk
from vtk.util import numpy_support

import slicer

# ---------------------------------------------------------------------------------------------------- the engine
# Installed extension: UniversalSegLib/ is copied beside this file. Source checkout: it is one folder up.
_MODULE_DIR = Path(__file__).resolve().parent
if importlib.util.find_spec("UniversalSegLib") is None:
    for _candidate in (_MODULE_DIR, _MODULE_DIR.parent):
        if (_candidate / "UniversalSegLib" / "__init__.py").is_file():
            sys.path.insert(0, str(_candidate))
            break

import UniversalSegLib  # noqa: E402
from UniversalSegLib.catalog import ClassCatalog, ClassInfo  # noqa: E402
from UniversalSegLib.errors import InputError, UniversalSegError  # noqa: E402
from UniversalSegLib.registry import DEFAULT_MODEL, ModelEntry, ModelRegistry, accept_licence, licence_accepted  # noqa: E402

ENGINE_VERSION: str = UniversalSegLib.__version__

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

try:
    from typing import Annotated

    from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper

    HAVE_PARAMETER_NODE_WRAPPER = True
except ImportError:  # slicer-core only, or a Slicer older than 5.2
    HAVE_PARAMETER_NODE_WRAPPER = False

#: True inside the running Slicer application (``slicer.app`` exists), False with ``slicer-core`` only.
IN_SLICER_APP: bool = hasattr(slicer, "app")

logger = logging.getLogger("UniversalSeg")

# -------------------------------------------------------------------------------------------------- constants
#: Prefix of the segment tags this module writes (kept in .seg.nrrd files and scenes).
TAG_PREFIX = "UniversalSeg."
TAG_CLASS_INDEX = TAG_PREFIX + "ClassIndex"  # 1-based catalog index; marks a segment as made by this module
TAG_CLASS_NAME = TAG_PREFIX + "ClassName"  # catalog file stem, e.g. "right_kidney"
TAG_MODEL = TAG_PREFIX + "Model"  # model name (registry name or checkpoint file name)
TAG_MODEL_LICENCE = TAG_PREFIX + "ModelLicence"
TAG_ENGINE_VERSION = TAG_PREFIX + "EngineVersion"
TAG_CREATED = TAG_PREFIX + "Created"  # ISO 8601 UTC time the AI mask was imported
TAG_SETTINGS = TAG_PREFIX + "Settings"  # compact JSON: threshold, overlap, fast, post-processing, device
TAG_FINGERPRINT = TAG_PREFIX + "Fingerprint"  # segmentFingerprint() of the mask as imported
TAG_REVIEWED = TAG_PREFIX + "Reviewed"  # ISO time the user marked the AI mask as correct (issue: correction loop)

#: Segment states (:meth:`UniversalSegLogic.segmentState`).
STATE_AI = "ai"  # made by this module, unchanged since
STATE_EDITED = "edited"  # made by this module, mask changed since (by the Segment Editor, a script, ...)
STATE_REVIEWED = "reviewed"  # made by this module, unchanged, and marked correct by the user
STATE_MANUAL = "manual"  # not made by this module
SEGMENT_STATES = (STATE_AI, STATE_EDITED, STATE_REVIEWED, STATE_MANUAL)

BINARY_LABELMAP = "Binary labelmap"
DEVICES = ("auto", "cuda", "cpu")
#: Share of the progress bar the engine process takes; the rest is the import into the scene.
ENGINE_PROGRESS_SHARE = 0.95

#: Python packages the engine needs, by import name -> pip requirement. Mirrors ``[project.dependencies]`` of
#: pyproject.toml except torch and torchvision, which the PyTorch extension installs for the computer's GPU/CUDA
#: (``TORCH_REQUIREMENT``). Testing/test_slicer_ui.py checks that the two lists agree.
ENGINE_REQUIREMENTS: dict[str, str] = {
    "numpy": "numpy>=1.24",
    "monai": "monai==1.6.1",
    "einops": "einops>=0.6",
    "nibabel": "nibabel>=5",
    "SimpleITK": "SimpleITK>=2.3",
    "safetensors": "safetensors>=0.4",
    "cc3d": "connected-components-3d>=3.12",
    "scipy": "scipy>=1.10",
    "slicerio": "slicerio>=1.1",
    "highdicom": "highdicom>=0.22",
    "pydicom": "pydicom>=2.4",
    "rapidfuzz": "rapidfuzz>=3.0",
    "open_clip": "open-clip-torch>=2.24",
    "tqdm": "tqdm>=4.60",
    "PIL": "pillow>=9",
    "openvino": "openvino>=2024.6",
}
TORCH_REQUIREMENT = ">=2.1"
#: Packages Slicer already has loaded: pinned to the installed version while installing, so pip never replaces them
#: under the running application (Slicer's SimpleITK has Slicer-specific IO; numpy is used by everything).
_PROTECTED_DISTRIBUTIONS = ("numpy", "SimpleITK", "torch", "torchvision", "requests")


class EngineError(UniversalSegError):
    """The engine process failed, was cancelled, or produced output that cannot be imported."""


# ---------------------------------------------------------------------------------------------- headless scene
@dataclass
class HeadlessScene:
    """An MRML scene with the module logics Slicer registers at start-up, for scripts and tests without the GUI.

    The Python references to the logics are kept here: the application logic does not own them.
    """

    scene: Any
    applicationLogic: Any
    logics: dict[str, Any]


def createHeadlessScene() -> HeadlessScene:
    """A new ``vtkMRMLScene`` set up as Slicer does at start-up (needs only ``slicer-core``).

    Registers the Colors, Volumes, Segmentations, SubjectHierarchy and Data module logics on a
    ``vtkSlicerApplicationLogic``; segment representation conversions exist only once the Segmentations logic
    has a scene.
    """
    scene = slicer.vtkMRMLScene()
    applicationLogic = slicer.vtkSlicerApplicationLogic()
    applicationLogic.SetMRMLScene(scene)
    logics: dict[str, Any] = {}
    for name, cls in (
        ("Colors", slicer.vtkSlicerColorLogic),
        ("Volumes", slicer.vtkSlicerVolumesLogic),
        ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
        ("SubjectHierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
        ("Data", slicer.vtkSlicerDataModuleLogic),
    ):
        moduleLogic = cls()
        moduleLogic.SetMRMLApplicationLogic(applicationLogic)
        moduleLogic.SetMRMLScene(scene)
        applicationLogic.SetModuleLogic(name, moduleLogic)
        logics[name] = moduleLogic
    return HeadlessScene(scene, applicationLogic, logics)


# --------------------------------------------------------------------------------------------- parameters
@dataclass
class SegmentationParameters:
    """What to segment and how (the command line options of ``universalseg segment``).

    Attributes:
        classes: catalog classes by display name, file stem, synonym or 1-based index, or ``["all"]``.
        prompt: free text ("IVC and both kidneys"); combines with ``classes``.
        model: registry name or checkpoint file path.
        device: "auto" (CUDA when present), "cuda" or "cpu".
        fast: fewer windows (no overlap) - minutes instead of tens of minutes on a CPU.
        overlap: sliding-window overlap in [0, 1); None uses the engine's default (0.5, or 0.0 with ``fast``).
        threshold: probability threshold in (0, 1).
        postprocess: the published anatomical post-processing; the four flags below switch single steps off.
        acceptLicence: accept the model's licence (remembered) - only after the user has read it.
        overwrite: replace segments the user edited or marked reviewed (normally they are kept).
    """

    classes: list[str] = field(default_factory=list)
    prompt: str = ""
    model: str = DEFAULT_MODEL
    device: str = "auto"
    fast: bool = False
    overlap: float | None = None
    threshold: float = 0.5
    postprocess: bool = True
    largestComponent: bool = True
    lungSplit: bool = True
    portalVeinFilter: bool = True
    tumorFilter: bool = True
    acceptLicence: bool = False
    overwrite: bool = False

    def validate(self, catalog: ClassCatalog | None = None) -> None:
        """Raise :class:`InputError` / ``ClassNameError`` (one line, what to do) for unusable values."""
        catalog = catalog or ClassCatalog.default()
        if not [c for c in self.classes if str(c).strip()] and not self.prompt.strip():
            raise InputError("nothing to segment: tick classes in the class picker or type a prompt")
        if self.classes:
            catalog.select([c if isinstance(c, int) else str(c) for c in self.classes])  # unknown names raise
        if self.device not in DEVICES:
            raise InputError(f"unknown device {self.device!r}; use one of {', '.join(DEVICES)}")
        if not 0.0 < float(self.threshold) < 1.0:
            raise InputError(f"threshold must be between 0 and 1 (exclusive), got {self.threshold}")
        if self.overlap is not None and not 0.0 <= float(self.overlap) < 1.0:
            raise InputError(f"overlap must be at least 0 and below 1, got {self.overlap}")
        if not str(self.model).strip():
            raise InputError("no model chosen: pick a model or a checkpoint file")

    def commandArguments(self, catalog: ClassCatalog | None = None) -> list[str]:
        """Arguments of ``universalseg segment`` for these parameters (input and outputs excluded)."""
        catalog = catalog or ClassCatalog.default()
        args: list[str] = []
        wanted = [c if isinstance(c, int) else str(c).strip() for c in self.classes]
        wanted = [c for c in wanted if c != ""]
        if any(isinstance(c, str) and c.lower() == "all" for c in wanted):
            args += ["--classes", "all"]
        elif wanted:
            args += ["--classes", ",".join(info.file_stem for info in catalog.select(wanted))]
        if self.prompt.strip():
            args += ["--prompt", self.prompt.strip()]
        args += ["--model", str(self.model).strip(), "--device", self.device]
        if self.acceptLicence:
            args.append("--accept-licence")
        if self.fast:
            args.append("--fast")
        if self.overlap is not None:
            args += ["--overlap", repr(float(self.overlap))]
        args += ["--threshold", repr(float(self.threshold))]
        if not self.postprocess:
            args.append("--no-postprocess")
        else:
            for flag, on in (
                ("--no-largest-component", self.largestComponent),
                ("--no-lung-split", self.lungSplit),
                ("--no-portal-vein-filter", self.portalVeinFilter),
                ("--no-tumor-filter", self.tumorFilter),
            ):
                if not on:
                    args.append(flag)
        return args


@dataclass
class ImportReport:
    """What an import did to the output segmentation; lists hold display names, in catalog order.

    ``added``: new segments; ``updated``: unedited AI segments replaced by the new result; ``keptEdited`` /
    ``keptReviewed``: segments the user edited / marked reviewed, left as they are; ``keptManual``: segments the
    user made with a class's name, left as they are; ``replaced``: edited/reviewed/manual segments replaced because
    ``overwrite`` was set; ``empty``: classes the model found nothing for (their segments exist, empty).
    """

    segmentationNode: Any = None
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    keptEdited: list[str] = field(default_factory=list)
    keptReviewed: list[str] = field(default_factory=list)
    keptManual: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    empty: list[str] = field(default_factory=list)
    segmentIds: dict[int, str] = field(default_factory=dict)  # catalog index -> segment ID (every class of the run)
    model: str = ""

    @property
    def kept(self) -> list[str]:
        return self.keptEdited + self.keptReviewed + self.keptManual

    def toText(self) -> str:
        """A few lines for the status area and the log."""
        lines = []
        for label, names in (
            ("Added", self.added),
            ("Updated", self.updated),
            ("Replaced (overwrite)", self.replaced),
            ("Kept, edited by you", self.keptEdited),
            ("Kept, marked reviewed", self.keptReviewed),
            ("Kept, your own segment of the same name", self.keptManual),
            ("Nothing found (empty segment)", self.empty),
        ):
            if names:
                lines.append(f"{label}: {', '.join(names)}")
        if self.kept:
            lines.append("Kept segments were not replaced; tick 'Overwrite edited segments' to replace them.")
        return "\n".join(lines) if lines else "No segments were changed."


@dataclass
class SegmentReview:
    """One segment as the review table and the training export see it.

    ``state``: :meth:`UniversalSegLogic.segmentState`; ``reviewed``: marked reviewed (the module's tag or the
    Segment Editor's "Completed" status); ``flagged``: the Segment Editor's "Flagged" status; ``annotated``: exported
    as an annotated class by "Export for training" (``confirmation`` says how: reviewed / edited / manual), else
    ``reason`` says why not; ``duplicate``: another confirmed segment has the same class (the export refuses).
    """

    segmentId: str
    name: str
    classIndex: int | None
    className: str | None
    state: str
    reviewed: bool = False
    flagged: bool = False
    annotated: bool = False
    confirmation: str = ""
    reason: str = ""
    duplicate: bool = False

    @property
    def stateText(self) -> str:
        """What the review table shows: AI / Reviewed / Edited / Manual (reviewed) [flagged]."""
        text = {STATE_AI: "AI", STATE_REVIEWED: "Reviewed", STATE_EDITED: "Edited", STATE_MANUAL: "Manual"}[self.state]
        if self.state == STATE_MANUAL and self.reviewed:
            text += ", reviewed"
        if self.state == STATE_EDITED and self.reviewed:
            text += ", reviewed"
        return text + (", flagged" if self.flagged else "")

    @property
    def trainingText(self) -> str:
        """What the review table shows in its training column."""
        return f"annotated ({self.confirmation})" if self.annotated else f"not annotated: {self.reason}"


# ------------------------------------------------------------------------------------------- engine process
def _tagValue(text: Any) -> str:
    """A segment tag value that survives .seg.nrrd storage (tags are stored as ``key:value|key:value``)."""
    return str(text).replace("|", "/").replace("\r", " ").replace("\n", " ")


class EngineProcess:
    """One engine command in a child process, in its own process group, with stdout/stderr read by threads.

    ``poll()`` hands the lines read so far to the callbacks and is cheap to call from a GUI timer; ``cancel()``
    terminates the whole process tree (SIGTERM to the process group, SIGKILL after ``graceSeconds``; ``taskkill
    /T /F`` on Windows).
    """

    def __init__(
        self,
        command: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        cwd: str | os.PathLike | None = None,
        onStdoutLine: Callable[[str], None] | None = None,
        onStderrLine: Callable[[str], None] | None = None,
        graceSeconds: float = 5.0,
    ) -> None:
        self.command = [str(c) for c in command]
        self.onStdoutLine = onStdoutLine
        self.onStderrLine = onStderrLine
        self.graceSeconds = graceSeconds
        self.stderrLines: list[str] = []
        self._lines: queue.Queue[tuple[str, str]] = queue.Queue()
        self._killDeadline: float | None = None
        self.cancelled = False
        kwargs: dict[str, Any] = {}
        if os.name == "nt":
            kwargs["creationflags"] = subprocess.CREATE_NEW_PROCESS_GROUP | getattr(subprocess, "CREATE_NO_WINDOW", 0)
        else:
            kwargs["start_new_session"] = True  # own session and process group: killpg reaches every child
        try:
            self.process = subprocess.Popen(
                self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
                cwd=None if cwd is None else str(cwd), text=True, encoding="utf-8", errors="replace", bufsize=1,
                **kwargs,
            )
        except OSError as exc:
            raise EngineError(f"cannot start the engine ({exc.strerror or exc}): {self.command[0]}") from None
        self._readers = [
            threading.Thread(target=self._read, args=(self.process.stdout, "out"), daemon=True),
            threading.Thread(target=self._read, args=(self.process.stderr, "err"), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self, stream, name: str) -> None:
        for line in iter(stream.readline, ""):
            self._lines.put((name, line.rstrip("\r\n")))
        stream.close()

    def poll(self) -> int | None:
        """Dispatch the output read so far; return the exit code once the process ended and all output is read."""
        self._dispatch()
        if self._killDeadline is not None and time.monotonic() > self._killDeadline:
            self._killDeadline = None
            self._kill(force=True)
        if self.process.poll() is None or any(r.is_alive() for r in self._readers):
            return None
        self._dispatch()
        if self.cancelled and os.name != "nt":
            self._kill(force=True)  # children that outlived the leader
        return self.process.returncode

    def _dispatch(self) -> None:
        while True:
            try:
                stream, line = self._lines.get_nowait()
            except queue.Empty:
                return
            if stream == "out":
                if self.onStdoutLine:
                    self.onStdoutLine(line)
            else:
                self.stderrLines.append(line)
                if self.onStderrLine:
                    self.onStderrLine(line)

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> int:
        """Block until the process ended (dispatching output); TimeoutError after ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            code = self.poll()
            if code is not None:
                return code
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the engine did not finish within {timeout:.0f} s")
            time.sleep(interval)

    def cancel(self, wait: bool = False) -> None:
        """Terminate the process tree; with ``wait``, block until it is gone (SIGKILL after the grace period)."""
        if self.process.poll() is not None and os.name == "nt":
            return
        self.cancelled = True
        self._kill(force=os.name == "nt")
        self._killDeadline = time.monotonic() + self.graceSeconds
        if wait:
            self.wait()

    def _kill(self, force: bool) -> None:
        if os.name == "nt":
            subprocess.run(["taskkill", "/F", "/T", "/PID", str(self.process.pid)], capture_output=True, check=False)
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL if force else signal.SIGTERM)

    def errorMessage(self) -> str:
        """The engine's one-line error (``universalseg: error: ...``), else the last stderr lines."""
        for line in reversed(self.stderrLines):
            if line.startswith("universalseg: error:"):
                return line.removeprefix("universalseg: error:").strip()
        tail = [line for line in self.stderrLines if line.strip()][-5:]
        return "\n".join(tail) if tail else f"the engine exited with code {self.process.returncode}"


class SegmentationTask:
    """An engine run started by :meth:`UniversalSegLogic.startSegmentation`, and the import of its result.

    ``state`` goes ``running`` -> ``importing`` -> ``done``, or ends in ``failed`` / ``cancelled``. Call
    :meth:`poll` regularly (a GUI timer) or :meth:`wait` (scripts); the import runs in the thread that calls them,
    as MRML must only be changed from one thread.
    """

    RUNNING, IMPORTING, DONE, FAILED, CANCELLED = "running", "importing", "done", "failed", "cancelled"

    def __init__(self, logic: "UniversalSegLogic", inputVolume, outputSegmentation, parameters: SegmentationParameters,
                 workDir: Path, *, onProgress=None, onLog=None, onFinished=None, keepFiles: bool = False) -> None:
        self.logic = logic
        self.inputVolume = inputVolume
        self.outputSegmentation = outputSegmentation
        self.parameters = parameters
        self.workDir = workDir
        self.onProgress = onProgress
        self.onLog = onLog
        self.onFinished = onFinished
        self.keepFiles = keepFiles
        self.state = self.RUNNING
        self.progress = 0.0
        self.stage = "starting the engine"
        self.error: str | None = None
        self.report: ImportReport | None = None
        self.outputs: list[str] = []
        self.startTime = time.monotonic()
        self.process: EngineProcess | None = None

    # -- engine output --------------------------------------------------------------------------------------
    def _onStdout(self, line: str) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            self._log(line)
            return
        if not isinstance(message, dict):
            self._log(line)
        elif message.get("done"):
            self.outputs = [str(p) for p in message.get("outputs", [])]
        elif "progress" in message:
            self._setProgress(float(message["progress"]) * ENGINE_PROGRESS_SHARE, str(message.get("stage", "")))

    def _onStderr(self, line: str) -> None:
        if line.strip():
            self._log(line)

    def _log(self, text: str) -> None:
        logger.info(text)
        if self.onLog:
            self.onLog(text)

    def _setProgress(self, fraction: float, stage: str) -> None:
        self.progress = min(max(fraction, 0.0), 1.0)
        self.stage = stage
        if self.onProgress:
            self.onProgress(self.progress, stage)

    # -- control ---------------------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.state in (self.DONE, self.FAILED, self.CANCELLED)

    def poll(self) -> bool:
        """Handle new engine output; when the engine has ended, import its result. True once finished."""
        if self.finished:
            return True
        code = self.process.poll()
        if code is None:
            return False
        if self.process.cancelled:
            self._finish(self.CANCELLED, None)
        elif code != 0:
            self._finish(self.FAILED, f"segmentation failed: {self.process.errorMessage()}")
        else:
            self.state = self.IMPORTING
            self._setProgress(ENGINE_PROGRESS_SHARE, "importing the segments")
            try:
                if self.outputSegmentation is None:  # created only now: a failed or cancelled run leaves nothing
                    self.outputSegmentation = self.logic.newSegmentationNode(self.inputVolume)
                self.report = self.logic.importEngineOutput(
                    self.inputVolume, self.outputSegmentation, self.workDir / "summary.json", self.workDir / "masks",
                    overwrite=self.parameters.overwrite,
                )
            except Exception as exc:  # noqa: BLE001 - reported to the user as the task's error
                logger.exception("import of the engine result failed")
                self._finish(self.FAILED, f"importing the result failed: {exc}")
            else:
                self._setProgress(1.0, "done")
                self._finish(self.DONE, None)
        return True

    def _finish(self, state: str, error: str | None) -> None:
        self.state = state
        self.error = error
        if error:
            self._log(error)
        if not self.keepFiles:
            shutil.rmtree(self.workDir, ignore_errors=True)
        if self.onFinished:
            self.onFinished(self)

    def wait(self, timeout: float | None = None, interval: float = 0.05) -> ImportReport:
        """Block until finished; returns the import report, raises :class:`EngineError` when failed or cancelled.

        On ``timeout`` (seconds) the run is cancelled and ``TimeoutError`` raised.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.poll():
            if deadline is not None and time.monotonic() > deadline:
                self.cancel(wait=True)
                raise TimeoutError(f"segmentation did not finish within {timeout:.0f} s and was cancelled")
            time.sleep(interval)
        if self.state == self.CANCELLED:
            raise EngineError("segmentation was cancelled")
        if self.state == self.FAILED:
            raise EngineError(self.error or "segmentation failed")
        return self.report  # type: ignore[return-value]

    def cancel(self, wait: bool = False) -> None:
        """Stop the engine (its whole process tree); the segmentation is left unchanged."""
        if self.finished or self.state == self.IMPORTING:
            return
        self._log("cancelling...")
        self.process.cancel(wait=False)
        if wait:
            while not self.poll():
                time.sleep(0.05)

    def __del__(self):
        process = getattr(self, "process", None)
        if process is not None and process.process.poll() is None:
            with contextlib.suppress(Exception):
                process.cancel()


# ------------------------------------------------------------------------------------------------------ logic
class UniversalSegLogic(ScriptedLoadableModuleLogic):
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
            raise ValueError("UniversalSegLogic needs an MRML scene outside the Slicer application: "
                             "pass scene=createHeadlessScene().scene")
        self.scene = scene
        self.catalog = ClassCatalog.default()
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
        "spleen", "right_kidney", "left_kidney", "gall_bladder", "liver", "stomach", "pancreas",
        "right_adrenal_gland", "left_adrenal_gland", "duodenum", "colon", "intestine",
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
    def missingDependencies() -> list[str]:
        """pip requirements of the engine that are not installed (or installed in a version that does not fit),
        ``torch`` first when PyTorch itself is missing."""
        try:
            from packaging.requirements import Requirement
        except ImportError:  # packaging is part of Slicer's Python; without it only presence is checked
            Requirement = None  # noqa: N806
        from importlib.metadata import PackageNotFoundError, version

        missing = []
        if importlib.util.find_spec("torch") is None:
            missing.append("torch" + TORCH_REQUIREMENT)  # PyTorchUtils installs torch and torchvision together
        elif importlib.util.find_spec("torchvision") is None:
            missing.append("torchvision")  # pip keeps the installed torch (pinned while installing)
        for module, requirement in ENGINE_REQUIREMENTS.items():
            if importlib.util.find_spec(module) is None:
                missing.append(requirement)
                continue
            if Requirement is not None:
                req = Requirement(requirement)
                try:
                    if req.specifier and not req.specifier.contains(version(req.name), prereleases=True):
                        missing.append(requirement)
                except PackageNotFoundError:
                    pass  # importable but not pip-installed (e.g. bundled with Slicer): accept it
        return missing

    def installDependencies(self, requirements: Sequence[str] | None = None, log: Callable[[str], None] | None = None) -> bool:
        """Install the engine's missing packages into Slicer's Python (application only).

        PyTorch comes from the PyTorch extension's ``PyTorchUtils`` (it picks the build for the GPU and CUDA
        driver); the rest from ``slicer.util.pip_install``, with the packages Slicer has loaded pinned to their
        installed versions. Returns True when a restart of Slicer is needed to use updated packages.

        Raises:
            EngineError: with a message saying what failed and what to do.
        """
        if not IN_SLICER_APP:
            raise EngineError("installing dependencies needs the Slicer application; outside Slicer use "
                              "`pip install universalseg`")
        log = log or logger.info
        requirements = list(self.missingDependencies() if requirements is None else requirements)
        before = _loadedDistributionVersions()
        torchWanted = [r for r in requirements if re.match(r"torch(?![a-z])", r)]
        others = [r for r in requirements if r not in torchWanted]
        if torchWanted:
            try:
                import PyTorchUtils  # from the PyTorch extension (SlicerPyTorch)
            except ModuleNotFoundError:
                raise EngineError("UniversalSeg needs the PyTorch extension: install 'PyTorch' from the Extensions "
                                  "Manager, restart Slicer, and click Segment again") from None
            torchLogic = PyTorchUtils.PyTorchUtilsLogic()
            if not torchLogic.torchInstalled():
                log("Installing PyTorch (this can take several minutes)...")
                try:
                    torch = torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT)
                except Exception as exc:  # noqa: BLE001 - light-the-torch / pip errors of many kinds
                    raise EngineError(f"installing PyTorch failed ({exc}); install it from the 'PyTorch Utils' "
                                      "module, restart Slicer and try again") from None
                if torch is None:
                    raise EngineError("PyTorch was not installed; install it from the 'PyTorch Utils' module")
        if others:
            pins = []
            from importlib.metadata import PackageNotFoundError, version

            for name in _PROTECTED_DISTRIBUTIONS:
                with contextlib.suppress(PackageNotFoundError):
                    pins.append(f"{name}=={version(name)}")
            log(f"Installing {', '.join(others)} ...")
            try:
                slicer.util.pip_install(" ".join(others + pins))
            except Exception as exc:  # noqa: BLE001 - CalledProcessError and friends
                raise EngineError(f"installing Python packages failed ({exc}); check the network connection and "
                                  "Slicer's Python console for pip's message, then try again") from None
        importlib.invalidate_caches()
        after = _loadedDistributionVersions()
        restart = any(after.get(name) != ver for name, ver in before.items())
        still = self.missingDependencies()
        if still and not restart:
            raise EngineError(f"these packages are still missing after installation: {', '.join(still)}; "
                              "restart Slicer and try again")
        return restart

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
        env["PYTHONPATH"] = os.pathsep.join([engineRoot] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env["PYTHONUNBUFFERED"] = "1"
        env.update(self.engineEnvironment)
        return env

    def engineCommand(self, inputPath: Path, workDir: Path, parameters: SegmentationParameters) -> list[str]:
        """The full engine command line for one run (outputs in ``workDir``)."""
        return [
            self.enginePython(), "-m", "UniversalSegLib", "segment", str(inputPath),
            "-o", str(workDir / "labels.nrrd"),
            "--split-masks", str(workDir / "masks"),
            "--summary", str(workDir / "summary.json"),
            "--progress", "json",
            *parameters.commandArguments(self.catalog),
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
        if inputVolume is None or not inputVolume.IsA("vtkMRMLScalarVolumeNode") or inputVolume.IsA("vtkMRMLLabelMapVolumeNode"):
            raise InputError("choose a CT volume as input (a scalar volume, not a label map)")
        image = inputVolume.GetImageData()
        if image is None or image.GetNumberOfPoints() == 0:
            raise InputError(f"the volume '{inputVolume.GetName()}' has no voxels; load a CT first")
        if image.GetNumberOfScalarComponents() != 1:
            raise InputError(f"the volume '{inputVolume.GetName()}' has {image.GetNumberOfScalarComponents()} "
                             "components per voxel; choose a CT (one value per voxel)")

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
            raise InputError(f"the weights of model '{entry.name}' are licensed under {entry.licence} "
                             f"({entry.licence_url}); read and accept the licence first")
        tempRoot = Path(slicer.app.temporaryPath) if IN_SLICER_APP else None
        workDir = Path(tempfile.mkdtemp(prefix="UniversalSeg-", dir=tempRoot))
        task = SegmentationTask(self, inputVolume, outputSegmentation, parameters, workDir, onProgress=onProgress,
                                onLog=onLog, onFinished=onFinished, keepFiles=self.keepTemporaryFiles)
        try:
            inputPath = self.writeVolumeToFile(inputVolume, workDir / "input.nrrd")
            command = self.engineCommand(inputPath, workDir, parameters)
            logger.info("engine command: %s", subprocess.list2cmdline(command))
            task.process = EngineProcess(command, env=self.engineEnvironmentVariables(), cwd=workDir,
                                         onStdoutLine=task._onStdout, onStderrLine=task._onStderr)
        except BaseException:
            shutil.rmtree(workDir, ignore_errors=True)
            raise
        return task

    def newSegmentationNode(self, inputVolume):
        """A new segmentation node named after the volume ("CT segmentation")."""
        return self.scene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode", self.scene.GenerateUniqueName(f"{inputVolume.GetName()} segmentation"))

    def segment(self, inputVolume, outputSegmentation=None, parameters: SegmentationParameters | None = None, *,
                timeout: float | None = None, onProgress=None, onLog=None, **overrides) -> ImportReport:
        """Blocking variant of :meth:`startSegmentation` for scripts and tests: returns the import report.

        Raises:
            EngineError: the engine failed (its one-line message), or was cancelled.
            TimeoutError: not finished within ``timeout`` seconds (the run is cancelled).
        """
        task = self.startSegmentation(inputVolume, outputSegmentation, parameters, onProgress=onProgress,
                                      onLog=onLog, **overrides)
        return task.wait(timeout)

    # -- importing results -----------------------------------------------------------------------------------
    def importEngineOutput(self, inputVolume, outputSegmentation, summaryPath: str | os.PathLike,
                           masksDir: str | os.PathLike, *, overwrite: bool = False) -> ImportReport:
        """Import the engine's per-class masks (``<masksDir>/<file_stem>.nii.gz``, listed in the summary JSON)
        into ``outputSegmentation``, never replacing what the user edited unless ``overwrite``.

        For each class of the run: no segment of that class yet -> added; an unedited segment from an earlier
        run -> its mask and provenance are updated (name and colour the user may have changed are kept); a segment
        the user edited or marked reviewed, or their own segment with the class's name -> kept and reported.
        With ``overwrite`` all of these are replaced. Segments of other classes are never touched.
        Masks must lie on the input volume's voxel grid; they are stored with exactly its geometry.
        """
        import SimpleITK as sitk

        summaryPath, masksDir = Path(summaryPath), Path(masksDir)
        try:
            summary = json.loads(summaryPath.read_text(encoding="utf-8"))
            entries = summary["classes"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EngineError(f"the engine's summary {summaryPath} is missing or unreadable ({exc})") from None
        self._checkInputVolume(inputVolume)
        ijkToRas = vtk.vtkMatrix4x4()
        inputVolume.GetIJKToRASMatrix(ijkToRas)
        dims = inputVolume.GetImageData().GetDimensions()

        # Check every mask's header first (nothing is changed if one does not fit), then read them one at a time:
        # 32 full-size masks of a large CT would not fit in memory together.
        masks: dict[int, Callable[[], np.ndarray]] = {}
        for entry in sorted(entries, key=lambda e: int(e["index"])):
            index = int(entry["index"])
            if not 1 <= index <= len(self.catalog):
                logger.warning("skipping class %s (%s): not a catalog class", index, entry.get("name"))
                continue
            path = masksDir / f"{entry.get('file_stem') or self.catalog[index].file_stem}.nii.gz"
            if not path.is_file():
                raise EngineError(f"the engine did not write the mask of {self.catalog[index].name} ({path})")
            header = sitk.ImageFileReader()
            header.SetFileName(str(path))
            header.ReadImageInformation()
            _checkSameGrid(header, dims, ijkToRas, f"the mask of {self.catalog[index].name}")
            masks[index] = lambda path=path: _readMask(path)

        provenance = {
            TAG_MODEL: Path(str(summary.get("model") or "")).name or "unknown",
            TAG_MODEL_LICENCE: summary.get("model_licence") or "unspecified",
            TAG_ENGINE_VERSION: ENGINE_VERSION,
            TAG_CREATED: datetime.now(timezone.utc).isoformat(timespec="seconds"),
            TAG_SETTINGS: json.dumps(_settingsForTag(summary), separators=(",", ":"), sort_keys=True),
        }
        report = self.importMasks(inputVolume, outputSegmentation, masks, provenance, overwrite=overwrite)
        report.model = provenance[TAG_MODEL]
        return report

    def importMasks(self, inputVolume, outputSegmentation, masks: dict[int, np.ndarray | Callable[[], np.ndarray]],
                    provenance: dict[str, str], *, overwrite: bool = False) -> ImportReport:
        """Import boolean masks (catalog index -> ``(K, J, I)`` array on the input volume's grid, or a function
        that reads it - called only when the mask is stored); see :meth:`importEngineOutput` for the rules.
        ``provenance`` maps tag names to values for every stored mask."""
        self._prepareSegmentation(inputVolume, outputSegmentation)
        ijkToRas = vtk.vtkMatrix4x4()
        inputVolume.GetIJKToRASMatrix(ijkToRas)
        segmentation = outputSegmentation.GetSegmentation()
        report = ImportReport(segmentationNode=outputSegmentation)
        existing = self.moduleSegments(outputSegmentation)
        manualByName = {}
        for segmentId in _segmentIds(segmentation):
            segment = segmentation.GetSegment(segmentId)
            if not segment.HasTag(TAG_CLASS_INDEX):
                manualByName.setdefault(segment.GetName().strip().lower(), segmentId)

        wasModifying = outputSegmentation.StartModify()
        try:
            for index in sorted(masks):
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
                    state = self.segmentState(outputSegmentation, segmentId)
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
                    _describeSegment(segment, info, self.catalog)
                mask = masks[index]
                mask = np.asarray(mask() if callable(mask) else mask, dtype=bool)
                if mask.shape != tuple(inputVolume.GetImageData().GetDimensions()[::-1]):
                    raise EngineError(f"the mask of {info.name} has shape {mask.shape}, not the input volume's")
                labelmap = _orientedImageFromMask(mask, ijkToRas)
                if not slicer.vtkSlicerSegmentationsModuleLogic.SetBinaryLabelmapToSegment(
                        labelmap, outputSegmentation, segmentId,
                        slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE):
                    raise EngineError(f"Slicer could not store the mask of {info.name} in '{outputSegmentation.GetName()}'")
                segment = segmentation.GetSegment(segmentId)
                segment.SetTag(TAG_CLASS_INDEX, str(index))
                segment.SetTag(TAG_CLASS_NAME, info.file_stem)
                for tag, value in provenance.items():
                    segment.SetTag(tag, _tagValue(value))
                # A new AI mask is not reviewed, whatever the segment it replaces was.
                segment.RemoveTag(TAG_REVIEWED)
                if slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentStatus(segment) == \
                        slicer.vtkSlicerSegmentationsModuleLogic.Completed:
                    segment.RemoveTag(slicer.vtkSlicerSegmentationsModuleLogic.GetStatusTagName())
                segment.SetTag(TAG_FINGERPRINT, self.segmentFingerprint(outputSegmentation, segmentId))
                report.segmentIds[index] = segmentId
                if not mask.any():
                    report.empty.append(info.name)
            # Each new mask arrives in a layer of its own; share layers where segments do not overlap, as the
            # Segment Editor does (fewer, smaller layers in memory and in .seg.nrrd). Voxels do not change.
            segmentation.CollapseBinaryLabelmaps(False)
        finally:
            outputSegmentation.EndModify(wasModifying)
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
        getSource = getattr(segmentation, "GetSourceRepresentationName", None) or segmentation.GetMasterRepresentationName
        setSource = getattr(segmentation, "SetSourceRepresentationName", None) or segmentation.SetMasterRepresentationName
        if segmentation.GetNumberOfSegments() == 0:
            outputSegmentation.SetReferenceImageGeometryParameterFromVolumeNode(inputVolume)
            setSource(BINARY_LABELMAP)
            outputSegmentation.SetAndObserveTransformNodeID(inputVolume.GetTransformNodeID())
        elif getSource() != BINARY_LABELMAP:
            raise InputError(f"'{outputSegmentation.GetName()}' stores its segments as {getSource()}; choose "
                             "another output segmentation or make binary labelmap its source representation "
                             "(Segmentations module)")
        role = outputSegmentation.GetReferenceImageGeometryReferenceRole()
        if outputSegmentation.GetNodeReference(role) is None:
            outputSegmentation.SetNodeReferenceID(role, inputVolume.GetID())

    def _addSegment(self, outputSegmentation, info: ClassInfo) -> str:
        segmentation = outputSegmentation.GetSegmentation()
        segmentId = info.file_stem
        if segmentation.GetSegment(segmentId) is not None:
            segmentId = segmentation.GenerateUniqueSegmentID(info.file_stem)
        segment = slicer.vtkSegment()
        _describeSegment(segment, info, self.catalog)
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

    # -- provenance and edit tracking ------------------------------------------------------------------------
    def moduleSegments(self, segmentationNode) -> dict[int, str]:
        """Catalog index -> ID of the segment this module made for it (first one, in segment order)."""
        segmentation = segmentationNode.GetSegmentation()
        found: dict[int, str] = {}
        for segmentId in _segmentIds(segmentation):
            value = _getTag(segmentation.GetSegment(segmentId), TAG_CLASS_INDEX)
            if value and value.isdigit():
                found.setdefault(int(value), segmentId)
        return found

    def segmentFingerprint(self, segmentationNode, segmentId: str) -> str:
        """SHA-256 of a segment's mask: its voxels (cropped to the bounding box), their position in the
        labelmap's voxel grid and the grid's geometry. Independent of how Slicer stores the segment (shared
        labelmap layers, label values, padding of the extent); any voxel change, added or erased, changes it."""
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        if segment is None:
            raise KeyError(f"no segment '{segmentId}' in '{segmentationNode.GetName()}'")
        digest = hashlib.sha256()
        labelmap = segment.GetRepresentation(BINARY_LABELMAP)
        if labelmap is None:
            digest.update(b"no binary labelmap")
            return digest.hexdigest()
        mask, start = _segmentMask(labelmap, segment.GetLabelValue())
        if mask is None:
            digest.update(b"empty")
            return digest.hexdigest()
        matrix = vtk.vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(matrix)
        geometry = [round(matrix.GetElement(r, c), 4) + 0.0 for r in range(3) for c in range(4)]
        digest.update(json.dumps({"start": start, "shape": list(mask.shape), "ijkToWorld": geometry}).encode())
        digest.update(np.packbits(mask, axis=None).tobytes())
        return digest.hexdigest()

    def segmentProvenance(self, segmentationNode, segmentId: str) -> dict[str, str]:
        """The provenance tags of a segment (empty for segments this module did not make)."""
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        tags = (TAG_CLASS_INDEX, TAG_CLASS_NAME, TAG_MODEL, TAG_MODEL_LICENCE, TAG_ENGINE_VERSION, TAG_CREATED,
                TAG_SETTINGS, TAG_FINGERPRINT, TAG_REVIEWED)
        if segment is None or not segment.HasTag(TAG_CLASS_INDEX):
            return {}
        return {tag.removeprefix(TAG_PREFIX): value for tag in tags if (value := _getTag(segment, tag)) is not None}

    def segmentState(self, segmentationNode, segmentId: str) -> str:
        """``"manual"`` (not made by this module), ``"edited"`` (mask changed since it was imported),
        ``"reviewed"`` (unchanged and marked correct, by :meth:`markSegmentReviewed` or the Segment Editor's
        "Completed" status) or ``"ai"`` (unchanged)."""
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        if segment is None:
            raise KeyError(f"no segment '{segmentId}' in '{segmentationNode.GetName()}'")
        stored = _getTag(segment, TAG_FINGERPRINT)
        if not segment.HasTag(TAG_CLASS_INDEX):
            return STATE_MANUAL
        if stored != self.segmentFingerprint(segmentationNode, segmentId):
            return STATE_EDITED
        completed = (slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentStatus(segment)
                     == slicer.vtkSlicerSegmentationsModuleLogic.Completed)
        if segment.HasTag(TAG_REVIEWED) or completed:
            return STATE_REVIEWED
        return STATE_AI

    def segmentStates(self, segmentationNode) -> dict[str, str]:
        """Segment ID -> state, for every segment."""
        segmentation = segmentationNode.GetSegmentation()
        return {segmentId: self.segmentState(segmentationNode, segmentId) for segmentId in _segmentIds(segmentation)}

    def markSegmentReviewed(self, segmentationNode, segmentId: str, reviewed: bool = True) -> None:
        """Mark an AI segment as checked and correct (or undo that); also sets Slicer's segment status
        ("Completed"), shown in the Segment Editor. Edited segments count as reviewed already."""
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        if segment is None:
            raise KeyError(f"no segment '{segmentId}' in '{segmentationNode.GetName()}'")
        seglogic = slicer.vtkSlicerSegmentationsModuleLogic
        if reviewed:
            segment.SetTag(TAG_REVIEWED, datetime.now(timezone.utc).isoformat(timespec="seconds"))
            seglogic.SetSegmentStatus(segment, seglogic.Completed)
        else:
            segment.RemoveTag(TAG_REVIEWED)
            if seglogic.GetSegmentStatus(segment) == seglogic.Completed:
                segment.RemoveTag(seglogic.GetStatusTagName())

    # -- review and export for training ---------------------------------------------------------------------
    def segmentClass(self, segmentationNode, segmentId: str) -> ClassInfo | None:
        """The catalog class a segment stands for: its class tag (segments this module made or tracks), else its
        name ("Liver", "IVC", ...), else None."""
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        if segment is None:
            raise KeyError(f"no segment '{segmentId}' in '{segmentationNode.GetName()}'")
        value = _getTag(segment, TAG_CLASS_INDEX)
        if value and value.isdigit() and 1 <= int(value) <= len(self.catalog):
            return self.catalog[int(value)]
        return self.catalog.find(segment.GetName())

    def segmentReview(self, segmentationNode) -> list[SegmentReview]:
        """Every segment with its state and whether "Export for training" exports it as an annotated class.

        Exported (annotated): segments a person edited, AI segments marked reviewed, and the person's own segments
        that are named after a catalog class and marked reviewed. Not exported: AI output nobody reviewed, segments
        flagged in the Segment Editor, own segments with other names, and two confirmed segments of one class
        (the export refuses those until one is deleted or unmarked).
        """
        seglogic = slicer.vtkSlicerSegmentationsModuleLogic
        segmentation = segmentationNode.GetSegmentation()
        rows = []
        for segmentId in _segmentIds(segmentation):
            segment = segmentation.GetSegment(segmentId)
            info = self.segmentClass(segmentationNode, segmentId)
            status = seglogic.GetSegmentStatus(segment)
            row = SegmentReview(
                segmentId=segmentId, name=segment.GetName(), classIndex=info.index if info else None,
                className=info.name if info else None, state=self.segmentState(segmentationNode, segmentId),
                reviewed=segment.HasTag(TAG_REVIEWED) or status == seglogic.Completed,
                flagged=status == seglogic.Flagged,
            )
            if row.flagged:
                row.reason = "flagged in the Segment Editor"
            elif row.state == STATE_EDITED:
                row.annotated, row.confirmation = True, "edited"
            elif row.state == STATE_REVIEWED:
                row.annotated, row.confirmation = True, "reviewed"
            elif row.state == STATE_AI:
                row.reason = "AI output, not reviewed"
            elif info is None:
                row.reason = "its name is not a class of the catalog"
            elif row.reviewed:
                row.annotated, row.confirmation = True, "manual"
            else:
                row.reason = "your own segment: mark it reviewed to export it"
            rows.append(row)
        byClass: dict[int, list[SegmentReview]] = {}
        for row in rows:
            if row.annotated:
                byClass.setdefault(row.classIndex, []).append(row)
        for index, same in byClass.items():
            if len(same) > 1:
                names = ", ".join(f"'{r.name}'" for r in same)
                for row in same:
                    row.annotated, row.confirmation, row.duplicate = False, "", True
                    row.reason = f"{len(same)} confirmed segments are {self.catalog[index].name} ({names})"
        return rows

    def trackSegments(self, segmentationNode, model: str = "", licence: str = "") -> list[str]:
        """Treat segments loaded from a file as AI output of ``model`` from now on, so that edits are detected.

        For segmentations written by the engine's command line (``universalseg segment scans/ -o out/ --format
        seg.nrrd``) and loaded into Slicer: each segment without this module's tags whose name is a catalog class
        (and whose class has no tracked segment yet) gets the class and provenance tags and the fingerprint of its
        current mask. Its state becomes "ai" (or "reviewed" if its status is already "Completed"). Returns the
        segment IDs that are now tracked.
        """
        segmentation = segmentationNode.GetSegmentation()
        tracked = self.moduleSegments(segmentationNode)
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        adopted = []
        for segmentId in _segmentIds(segmentation):
            segment = segmentation.GetSegment(segmentId)
            if segment.HasTag(TAG_CLASS_INDEX):
                continue
            info = self.catalog.find(segment.GetName())
            if info is None or info.index in tracked:
                continue
            segment.SetTag(TAG_CLASS_INDEX, str(info.index))
            segment.SetTag(TAG_CLASS_NAME, info.file_stem)
            segment.SetTag(TAG_MODEL, _tagValue(Path(model).name if model else "unknown (loaded from a file)"))
            segment.SetTag(TAG_MODEL_LICENCE, _tagValue(licence or "unspecified"))
            segment.SetTag(TAG_ENGINE_VERSION, ENGINE_VERSION)
            segment.SetTag(TAG_CREATED, now)
            segment.SetTag(TAG_SETTINGS, json.dumps({"source": "loaded from a file"}, separators=(",", ":")))
            segment.SetTag(TAG_FINGERPRINT, self.segmentFingerprint(segmentationNode, segmentId))
            tracked[info.index] = segmentId
            adopted.append(segmentId)
        return adopted

    def _exportProvenance(self, segmentationNode, row: SegmentReview) -> dict[str, Any]:
        """What the dataset entry records about one exported segment (JSON values)."""
        tags = self.segmentProvenance(segmentationNode, row.segmentId)
        out: dict[str, Any] = {"segment": row.name, "state": row.state}
        for key, name in (("Model", "model"), ("ModelLicence", "model_licence"), ("EngineVersion", "engine_version"),
                          ("Created", "created"), ("Reviewed", "reviewed")):
            if key in tags:
                out[name] = tags[key]
        if "Settings" in tags:
            try:
                out["settings"] = json.loads(tags["Settings"])
            except ValueError:
                out["settings"] = tags["Settings"]
        return out

    def exportForTraining(self, volumeNode, segmentationNode, folder: str | os.PathLike, caseId: str | None = None,
                          allowPerClassMasks: bool = False, *, split: str = "train",
                          datasetName: str | None = None):
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
        from UniversalSegLib.training_export import ExportedClass, check_export_folder, dataset_file, export_case, image_from_array

        self._checkInputVolume(volumeNode)
        if segmentationNode is None or not segmentationNode.IsA("vtkMRMLSegmentationNode"):
            raise InputError("choose the segmentation to export")
        rows = self.segmentReview(segmentationNode)
        duplicates = [row.reason for row in rows if row.duplicate]
        if duplicates:
            raise InputError(f"cannot export: {duplicates[0]}; delete or unmark all but one")
        chosen = [row for row in rows if row.annotated]
        if not chosen:
            raise InputError(f"nothing to export: no segment of '{segmentationNode.GetName()}' was reviewed or edited; "
                             "select the correct segments and click 'Mark reviewed', or correct segments in the "
                             "Segment Editor, then export again")
        check_export_folder(dataset_file(folder).parent)  # before reading any voxels
        classes = [ExportedClass(row.classIndex, self.segmentArray(segmentationNode, row.segmentId, volumeNode),
                                 row.confirmation, self._exportProvenance(segmentationNode, row)) for row in chosen]
        image = image_from_array(_volumeArray(volumeNode), _matrixArray(_ijkToRas(volumeNode)))
        report = export_case(
            folder, image, classes, case_id=caseId, default_case_id=volumeNode.GetName(),
            per_class_masks=allowPerClassMasks, split=split, dataset_name=datasetName, catalog=self.catalog,
            provenance={"volume": volumeNode.GetName(), "segmentation": segmentationNode.GetName(),
                        "exported_by": f"UniversalSeg Slicer module {ENGINE_VERSION}"},
        )
        report.skipped = {row.name: row.reason for row in rows if not row.annotated}
        return report

    # -- arrays ----------------------------------------------------------------------------------------------
    def segmentArray(self, segmentationNode, segmentId: str, referenceVolume) -> np.ndarray:
        """A segment's mask as a bool ``(K, J, I)`` array on ``referenceVolume``'s grid (a copy)."""
        segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
        if segment is None:
            raise KeyError(f"no segment '{segmentId}' in '{segmentationNode.GetName()}'")
        dims = referenceVolume.GetImageData().GetDimensions()
        out = np.zeros(dims[::-1], dtype=bool)
        labelmap = segment.GetRepresentation(BINARY_LABELMAP)
        if labelmap is None:
            return out
        volumeMatrix, labelmapMatrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        referenceVolume.GetIJKToRASMatrix(volumeMatrix)
        labelmap.GetImageToWorldMatrix(labelmapMatrix)
        if not _sameMatrix(volumeMatrix, labelmapMatrix):
            raise InputError("the segmentation's voxel grid differs from the volume's; resample it first")
        mask, start = _segmentMask(labelmap, segment.GetLabelValue())
        if mask is None:
            return out
        k0, j0, i0 = start[2], start[1], start[0]
        # clip to the volume (a segment may extend beyond it)
        zs = slice(max(k0, 0), min(k0 + mask.shape[0], out.shape[0]))
        ys = slice(max(j0, 0), min(j0 + mask.shape[1], out.shape[1]))
        xs = slice(max(i0, 0), min(i0 + mask.shape[2], out.shape[2]))
        out[zs, ys, xs] = mask[zs.start - k0:zs.stop - k0, ys.start - j0:ys.stop - j0, xs.start - i0:xs.stop - i0]
        return out


# ------------------------------------------------------------------------------------------------ helpers
def _segmentIds(segmentation) -> list[str]:
    return [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]


def _getTag(segment, tag: str) -> str | None:
    value = vtk.reference("")
    return str(value) if segment.GetTag(tag, value) else None


def _describeSegment(segment, info: ClassInfo, catalog: ClassCatalog) -> None:
    """Name, colour and terminology of a class on a segment."""
    segment.SetName(info.name)
    segment.SetNameAutoGenerated(False)
    segment.SetColor(*(c / 255.0 for c in info.color))
    segment.SetColorAutoGenerated(False)
    segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), catalog.slicer_terminology(info))


def _settingsForTag(summary: dict[str, Any]) -> dict[str, Any]:
    settings = summary.get("settings") or {}
    keep = {k: settings[k] for k in ("overlap", "fast", "threshold", "class_thresholds", "postprocess") if k in settings}
    keep["device"] = summary.get("device")
    return keep


def _segmentMask(labelmap, labelValue: int) -> tuple[np.ndarray | None, list[int]]:
    """A segment's voxels in a (possibly shared) labelmap: bool ``(K, J, I)`` crop to the bounding box and the
    (i, j, k) index of its first voxel; (None, []) when empty."""
    extent = labelmap.GetExtent()
    dims = (extent[1] - extent[0] + 1, extent[3] - extent[2] + 1, extent[5] - extent[4] + 1)
    scalars = labelmap.GetPointData().GetScalars() if min(dims) > 0 else None
    if scalars is None:
        return None, []
    voxels = numpy_support.vtk_to_numpy(scalars).reshape(dims[::-1]) == labelValue
    nonzero = [np.flatnonzero(voxels.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    if any(len(n) == 0 for n in nonzero):
        return None, []
    lo = [int(n[0]) for n in nonzero]
    hi = [int(n[-1]) + 1 for n in nonzero]
    crop = np.ascontiguousarray(voxels[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]])
    return crop, [extent[0] + lo[2], extent[2] + lo[1], extent[4] + lo[0]]


def _orientedImageFromMask(mask: np.ndarray, ijkToRas) -> Any:
    """A binary labelmap (``vtkOrientedImageData``, uint8 0/1) of a ``(K, J, I)`` mask, cropped to its bounding
    box, with the volume's IJK-to-RAS geometry."""
    image = slicer.vtkOrientedImageData()
    image.SetImageToWorldMatrix(ijkToRas)
    nonzero = [np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))) for axis in range(3)]
    if any(len(n) == 0 for n in nonzero):
        image.SetExtent(0, 0, 0, 0, 0, 0)
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        image.GetPointData().GetScalars().Fill(0)
        return image
    (k0, j0, i0), (k1, j1, i1) = [int(n[0]) for n in nonzero], [int(n[-1]) for n in nonzero]
    image.SetExtent(i0, i1, j0, j1, k0, k1)
    image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
    voxels = numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(k1 - k0 + 1, j1 - j0 + 1, i1 - i0 + 1)
    voxels[:] = mask[k0:k1 + 1, j0:j1 + 1, i0:i1 + 1]
    image.Modified()
    return image


def _volumeArray(volumeNode) -> np.ndarray:
    """A volume's voxels as a ``(K, J, I)`` array (a copy, the volume's scalar type)."""
    image = volumeNode.GetImageData()
    dims = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1]).copy()


def _matrixArray(matrix) -> np.ndarray:
    """A ``vtkMatrix4x4`` as a 4x4 numpy array."""
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _sameMatrix(a, b, tolerance: float = 1e-4) -> bool:
    return all(abs(a.GetElement(r, c) - b.GetElement(r, c)) <= tolerance * max(1.0, abs(a.GetElement(r, c)))
               for r in range(4) for c in range(4))


def _readMask(path: Path) -> np.ndarray:
    """A mask file as a bool ``(K, J, I)`` array."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))  # kept referenced while the array view is read
    return sitk.GetArrayViewFromImage(image) > 0


def _checkSameGrid(image, dims: Sequence[int], ijkToRas, what: str) -> None:
    """Raise EngineError unless a SimpleITK image or image file reader (LPS geometry) lies on the volume's grid
    (size, spacing, axes, origin)."""
    if tuple(image.GetSize()) != tuple(dims):
        raise EngineError(f"{what} has {image.GetSize()} voxels but the input volume {tuple(dims)}; "
                          "the engine output does not belong to this volume")
    lpsToRas = np.diag([-1.0, -1.0, 1.0])
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    matrix = np.eye(4)
    matrix[:3, :3] = lpsToRas @ direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = lpsToRas @ np.asarray(image.GetOrigin(), dtype=float)
    volume = np.array([[ijkToRas.GetElement(r, c) for c in range(4)] for r in range(4)])
    scale = max(1.0, float(np.abs(volume[:3, :3]).max()))
    if np.abs(matrix[:3, :3] - volume[:3, :3]).max() > 1e-4 * scale or np.abs(matrix[:3, 3] - volume[:3, 3]).max() > 1e-3:
        raise EngineError(f"{what} is not on the input volume's voxel grid (spacing, axes or origin differ)")


def _loadedDistributionVersions() -> dict[str, str]:
    """Installed versions of the distributions whose modules this Python has imported (restart detection)."""
    from importlib.metadata import PackageNotFoundError, version

    modules = dict(ENGINE_REQUIREMENTS)
    modules.update({"torch": "torch", "torchvision": "torchvision", "numpy": "numpy", "requests": "requests"})
    out = {}
    for module, requirement in modules.items():
        if module not in sys.modules:
            continue
        name = requirement.split(">")[0].split("=")[0].split("<")[0].strip()
        with contextlib.suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


# ======================================================================================= Slicer application part
class UniversalSeg(ScriptedLoadableModule):
    """Module description shown in Slicer."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "UniversalSeg"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        self.parent.contributors = ["UniversalSeg contributors"]
        self.parent.helpText = (
            "Segments 25 abdominal organs and vessels and 6 tumor types (32 classes) in CT with the CLIP-Driven "
            "Universal Model. Tick classes or type what you need (e.g. 'IVC and both kidneys'), click Segment, then "
            "correct the segments in the Segment Editor: running again never replaces segments you edited. Mark the "
            "segments you checked as reviewed and use 'Export for training' to collect your corrections as a dataset "
            "for fine-tuning the model (universalseg-train).<br>"
            "See the <a href='https://github.com/ljwztc/CLIP-Driven-Universal-Model'>model's home page</a> and this "
            "extension's README for details."
        )
        self.parent.acknowledgementText = (
            "Uses the CLIP-Driven Universal Model: J. Liu et al., 'CLIP-Driven Universal Model for Organ Segmentation "
            "and Tumor Detection', ICCV 2023 (arXiv:2301.00785). The official weights, (c) Johns Hopkins University, "
            "are licensed under CC BY-NC-ND 4.0 and are downloaded only after you accept that licence."
        )


if HAVE_PARAMETER_NODE_WRAPPER:

    @parameterNodeWrapper
    class UniversalSegParameterNode:
        """GUI state, saved with the scene. ``classes``: comma-separated catalog file stems of the class picker;
        ``model``: registry name or checkpoint path; ``device``/``quality``: combo box choices; ``exportDatasetName``
        / ``exportSplit``: the "Export for training" section (its folder is an application setting: one dataset
        folder collects the exports of many scenes)."""

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
        self._observedSegmentation = None

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
        self.ui.promptTextEdit.textChanged.connect(self._previewTimer.start)
        self.ui.modelComboBox.currentIndexChanged.connect(self._onModelChanged)
        self.ui.customModelPathLineEdit.currentPathChanged.connect(self._onCustomModelPathChanged)
        self.ui.applyButton.clicked.connect(self.onApplyButton)
        self.ui.editSegmentsButton.clicked.connect(self.onEditSegments)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)",
                                                   self.ui.segmentationShow3DButton.setSegmentationNode)

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
        self.ui.exportFolderPathLineEdit.settingKey = "UniversalSeg/ExportFolder"  # remembered across sessions
        self.ui.exportFolderPathLineEdit.currentPathChanged.connect(lambda path: self._updateExportButton())
        self.ui.exportButton.clicked.connect(self.onExportButton)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self._task is not None and not self._task.finished:
            self._task.cancel()
        if self._reviewTimer is not None:
            self._reviewTimer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified)

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
            if node.inputVolume:
                self.ui.outputSegmentationSelector.baseName = f"{node.inputVolume.GetName()} segmentation"
            fast = node.quality == "fast"
            self.ui.overlapSliderWidget.enabled = not fast
            for checkBox in (self.ui.largestComponentCheckBox, self.ui.lungSplitCheckBox,
                             self.ui.portalVeinFilterCheckBox, self.ui.tumorFilterCheckBox):
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
                item.setToolTip(0, f"{info.name} - also: {', '.join(info.synonyms[:6])}" if info.synonyms else info.name)
                self._classItems[info.file_stem] = item
            group.setExpanded(True)

    def _checkedStems(self) -> list[str]:
        return [stem for stem, item in self._classItems.items() if item.checkState(0) == qt.Qt.Checked]

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
        self.ui.classCountLabel.text = (f"{len(names)} classes: {', '.join(names)}" if names
                                        else "No classes selected: tick classes or type a prompt.")

    # -- prompt preview --------------------------------------------------------------------------------------
    def _updatePromptPreview(self) -> None:
        text = self.ui.promptTextEdit.toPlainText()
        try:
            items = self.logic.describePrompt(text)
        except ImportError:
            self.ui.promptPreviewLabel.text = ("The prompt preview needs the engine's Python packages; they are "
                                               "installed when you first click Segment.")
            return
        rows = []
        for item in items:
            text_ = _html(item["text"])
            if item["accepted"]:
                rows.append(f"<span style='color:#1a7f37'>&#10003; '{text_}' &rarr; {_html(', '.join(item['classes']))}"
                            f" <i>({item['method']})</i></span>")
            else:
                hint = f" Did you mean: {_html(', '.join(item['suggestions']))}?" if item["suggestions"] else ""
                rows.append(f"<span style='color:#cf222e'>&#10007; '{text_}' is not a known class.{hint} "
                            "CLIP text matching will try it when you click Segment.</span>")
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
        rows = {row["name"]: row for row in self.logic.modelChoices()}
        row = rows.get(model)
        if row is None:
            self.ui.modelInfoLabel.text = f"Checkpoint file: {_html(model) or '(choose a file)'}"
            return
        size = f" ({row['size_text']})" if row["size"] else ""
        status = {"bundled": "bundled with the extension", "downloaded": "downloaded",
                  "not downloaded": f"downloaded on first use{size}"}[row["status"]]
        licence = (f"licence <a href='{row['licence_url']}'>{_html(row['licence'])}</a>"
                   + (" (accepted)" if row["licence_accepted"] else " - shown for acceptance before the download"))
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
        self.ui.applyButton.toolTip = ("Segment the chosen classes" if ready
                                       else "Choose an input volume, and tick classes or type a prompt")

    def _parameters(self) -> SegmentationParameters:
        node = self._parameterNode
        fast = node.quality == "fast"
        return SegmentationParameters(
            classes=[s for s in node.classes.split(",") if s],
            prompt=node.prompt,
            model=node.model,
            device={"auto": "auto", "gpu": "cuda", "cpu": "cpu"}[node.device],
            fast=fast,
            overlap=None if fast else node.overlap,
            threshold=node.threshold,
            postprocess=node.postprocess,
            largestComponent=node.largestComponent,
            lungSplit=node.lungSplit,
            portalVeinFilter=node.portalVeinFilter,
            tumorFilter=node.tumorFilter,
            overwrite=node.overwrite,
        )

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
                    self._parameterNode.inputVolume, self._parameterNode.outputSegmentation, parameters,
                    onProgress=self._onProgress, onLog=self._log, onFinished=self._onFinished)
        except Exception as exc:  # noqa: BLE001 - bad input or the engine would not start: tell the user
            logger.exception("segmentation could not start")
            self.ui.statusLabel.text = f"Could not start: {exc}"
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
        missing = self.logic.missingDependencies()
        if not missing:
            return True
        if not slicer.util.confirmOkCancelDisplay(
                "UniversalSeg needs these Python packages, which are not installed yet:\n\n" + "\n".join(missing)
                + "\n\nThey will be downloaded and installed into Slicer's Python (PyTorch through the PyTorch "
                "extension). This can take several minutes. Install now?", "Install Python packages"):
            self.ui.statusLabel.text = "Cancelled: the required Python packages are not installed."
            return False
        self.ui.statusLabel.text = "Installing Python packages..."
        try:
            with slicer.util.WaitCursor():
                restart = self.logic.installDependencies(missing, log=self._log)
        except EngineError as exc:
            slicer.util.errorDisplay(str(exc), windowTitle="Installation failed")
            self.ui.statusLabel.text = "Installing Python packages failed."
            return False
        if restart:
            self.ui.statusLabel.text = "Restart Slicer to finish the installation."
            if slicer.util.confirmOkCancelDisplay("Slicer must restart to use the updated Python packages. "
                                                  "Restart now?", "Restart needed"):
                slicer.util.restart()
            return False
        return True

    def _askLicence(self, model: str) -> bool:
        entry = self.logic.modelEntry(model)
        accepted = slicer.util.confirmOkCancelDisplay(
            f"The weights of '{entry.name}' are licensed under {entry.licence}:\n{entry.licence_url}\n\n"
            f"{entry.description}\n\nThe weights are downloaded once, on the first run. Press OK to accept the "
            "licence and continue.", "Model licence")
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
        self.ui.logTextEdit.appendPlainText(text)

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
            self.ui.statusLabel.text = f"Failed: {task.error}"
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
    @staticmethod
    def _segmentationEvents() -> list[int]:
        """Events of a segmentation node after which segment states may have changed."""
        cls = slicer.vtkSegmentation
        source = getattr(cls, "SourceRepresentationModified", None) or getattr(cls, "MasterRepresentationModified")
        return [cls.SegmentAdded, cls.SegmentRemoved, cls.SegmentModified, source]

    def _observeSegmentation(self, segmentationNode) -> None:
        """Follow the output segmentation's edits to keep the review table current."""
        if segmentationNode is self._observedSegmentation:
            return
        if self._observedSegmentation is not None:
            for event in self._segmentationEvents():
                self.removeObserver(self._observedSegmentation, event, self._onSegmentationChanged)
        self._observedSegmentation = segmentationNode
        if segmentationNode is not None:
            for event in self._segmentationEvents():
                self.addObserver(segmentationNode, event, self._onSegmentationChanged)
        if self._reviewTimer is not None:
            self._reviewTimer.start()

    def _onSegmentationChanged(self, caller=None, event=None) -> None:
        self._reviewTimer.start()

    def _selectedSegmentIds(self) -> list[str]:
        table = self.ui.segmentReviewTable
        rows = sorted({item.row() for item in table.selectedItems()})
        return [table.item(row, 0).data(qt.Qt.UserRole) for row in rows if table.item(row, 0) is not None]

    def _updateReviewTable(self) -> None:
        """Fill the review table: one row per segment with its state and whether it is exported."""
        table = self.ui.segmentReviewTable
        selected = set(self._selectedSegmentIds())
        table.setRowCount(0)
        node = self._observedSegmentation
        if node is None or node.GetScene() is None:
            self.ui.reviewSummaryLabel.text = "No segmentation yet: segment a CT or choose a segmentation."
            self.ui.trackSegmentsButton.enabled = False
            self._updateExportButton()
            return
        rows = self.logic.segmentReview(node)
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
            nameItem.setToolTip("\n".join(f"{k}: {v}" for k, v in provenance.items() if k != "Fingerprint")
                                or "Not made by UniversalSeg")
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
        self.ui.reviewSummaryLabel.text = (
            f"{len(exported)} of {len(rows)} segments are exported as training labels: {', '.join(exported)}."
            if exported else f"None of the {len(rows)} segments is reviewed or edited yet: nothing to export.")
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
                "corrected should be marked reviewed after this.", "Track loaded segments"):
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
            if ready else "Choose the input CT, its segmentation and an export folder")

    def onExportButton(self) -> None:
        from UniversalSegLib.training_export import OverlapError

        node = self._parameterNode
        if not node or not node.inputVolume or not node.outputSegmentation:
            return
        folder = self.ui.exportFolderPathLineEdit.currentPath
        kwargs = dict(caseId=self.ui.exportCaseIdLineEdit.text.strip() or None, split=node.exportSplit,
                      datasetName=node.exportDatasetName.strip() or None)
        try:
            try:
                with slicer.util.WaitCursor():
                    report = self.logic.exportForTraining(node.inputVolume, node.outputSegmentation, folder, **kwargs)
            except OverlapError as exc:
                if not slicer.util.confirmOkCancelDisplay(
                        f"{exc}.\n\nExport one mask per class instead? Training reads both forms.",
                        "Segments overlap"):
                    self.ui.exportStatusLabel.text = "Not exported: segments overlap."
                    return
                with slicer.util.WaitCursor():
                    report = self.logic.exportForTraining(node.inputVolume, node.outputSegmentation, folder,
                                                          allowPerClassMasks=True, **kwargs)
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
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


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
        self.setUp()
        self.test_SegmentSampleCT()

    def test_SegmentSampleCT(self):
        import SampleData

        self.delayDisplay("Loading CTACardio")
        volume = SampleData.downloadSample("CTACardio")
        logic = UniversalSegLogic()
        missing = logic.missingDependencies()
        if missing:
            self.delayDisplay(f"Installing {', '.join(missing)}")
            if logic.installDependencies(missing):
                self.skipTest("Python packages were updated; restart Slicer and run the test again")

        self.delayDisplay("Segmenting (CPU, fast mode)")
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "UniversalSeg test")
        parameters = SegmentationParameters(classes=list(self.CLASSES), model=DEFAULT_MODEL, device="cpu",
                                            fast=True, acceptLicence=True)
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
            self.assertEqual(_getTag(segment, slicer.vtkSegment.GetTerminologyEntryTagName()),
                             catalog.slicer_terminology(info))
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
            labelmap, segmentation, aortaId, slicer.vtkSlicerSegmentationsModuleLogic.MODE_REPLACE)
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


def _ijkToRas(volumeNode):
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return matrix
