"""The engine process runner: start ``python -m UniversalSegLib segment`` in a child process, hand its JSON
progress lines to callbacks, cancel its whole process tree, and drive the import of its result in small steps.

Nothing here blocks the GUI thread: :meth:`SegmentationTask.poll` is meant for a ``QTimer`` (every 200 ms) and
returns within about a tenth of a second, also while the result is being imported.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from UniversalSegLib.errors import UniversalSegError

logger = logging.getLogger("UniversalSeg")

#: Share of the progress bar the engine process takes; the rest is the import into the scene.
ENGINE_PROGRESS_SHARE = 0.95
#: GUI-thread time one :meth:`SegmentationTask.poll` may spend importing before it returns to the event loop.
IMPORT_SLICE_SECONDS = 0.05


class EngineError(UniversalSegError):
    """The engine process failed, was cancelled, or produced output that cannot be imported."""


def _windowsKillCommand(pid: int) -> tuple[list[str], dict[str, Any]]:
    """``taskkill`` for a process tree, with the flags that keep a console window from flashing up."""
    return (
        ["taskkill", "/F", "/T", "/PID", str(pid)],
        {"creationflags": getattr(subprocess, "CREATE_NO_WINDOW", 0), "capture_output": True, "check": False},
    )


class EngineProcess:
    """One engine command in a child process, in its own process group, with stdout/stderr read by threads.

    ``poll()`` hands the lines read so far to the callbacks and is cheap to call from a GUI timer; ``cancel()``
    terminates the whole process tree (SIGTERM to the process group, SIGKILL after ``graceSeconds``; ``taskkill
    /T /F`` on Windows, without a console window).
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
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd=None if cwd is None else str(cwd),
                text=True,
                encoding="utf-8",
                errors="replace",
                bufsize=1,
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
            command, kwargs = _windowsKillCommand(self.process.pid)
            subprocess.run(command, **kwargs)
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
    """An engine run started by ``UniversalSegLogic.startSegmentation``, and the import of its result.

    ``state`` goes ``running`` -> ``importing`` -> ``done``, or ends in ``failed`` / ``cancelled``. Call
    :meth:`poll` regularly (a GUI timer) or :meth:`wait` (scripts). The import is a generator of small steps
    (``UniversalSegLogic.importSteps``: the file is read in a worker thread, then one class per step), run in the
    thread that polls, as MRML must only be changed from one thread; each poll runs steps for at most
    :data:`IMPORT_SLICE_SECONDS`. ``importSeconds`` records the GUI-thread time of every step.
    """

    RUNNING, IMPORTING, DONE, FAILED, CANCELLED = "running", "importing", "done", "failed", "cancelled"

    def __init__(
        self,
        logic,
        inputVolume,
        outputSegmentation,
        parameters,
        workDir: Path,
        *,
        onProgress=None,
        onLog=None,
        onFinished=None,
        keepFiles: bool = False,
    ) -> None:
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
        self.report = None
        self.outputs: list[str] = []
        self.startTime = time.monotonic()
        self.process: EngineProcess | None = None
        self.importSeconds: list[float] = []
        self._steps: Iterator[float] | None = None

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
        """Handle new engine output; once the engine has ended, run import steps for a short while.
        True once finished."""
        if self.finished:
            return True
        if self.state == self.RUNNING:
            code = self.process.poll()
            if code is None:
                return False
            if self.process.cancelled:
                self._finish(self.CANCELLED, None)
                return True
            if code != 0:
                self._finish(self.FAILED, f"segmentation failed: {self.process.errorMessage()}")
                return True
            self.state = self.IMPORTING
            self._setProgress(ENGINE_PROGRESS_SHARE, "importing the segments")
            if self.outputSegmentation is None:  # created only now: a failed or cancelled run leaves nothing
                self.outputSegmentation = self.logic.newSegmentationNode(self.inputVolume)
            self._steps = self.logic.importSteps(
                self.inputVolume,
                self.outputSegmentation,
                self.workDir / "summary.json",
                self.workDir / "segmentation.seg.nrrd",
                overwrite=self.parameters.overwrite,
                task=self,
            )
        return self._importSome()

    def _importSome(self) -> bool:
        sliceEnd = time.perf_counter() + IMPORT_SLICE_SECONDS
        while time.perf_counter() < sliceEnd:
            started = time.perf_counter()
            try:
                fraction = next(self._steps)
            except StopIteration as stop:
                self.importSeconds.append(time.perf_counter() - started)
                self.report = stop.value
                self._setProgress(1.0, "done")
                self._finish(self.DONE, None)
                return True
            except Exception as exc:  # noqa: BLE001 - reported to the user as the task's error
                logger.exception("import of the engine result failed")
                self._finish(self.FAILED, f"importing the result failed: {exc}")
                return True
            self.importSeconds.append(time.perf_counter() - started)
            if fraction is None:  # waiting for the reader thread: give the event loop the rest of the slice
                return False
            self._setProgress(
                ENGINE_PROGRESS_SHARE + (1.0 - ENGINE_PROGRESS_SHARE) * fraction, "importing the segments"
            )
        return False

    def _finish(self, state: str, error: str | None) -> None:
        self.state = state
        self.error = error
        if error:
            self._log(error)
        if not self.keepFiles:
            shutil.rmtree(self.workDir, ignore_errors=True)
        if self.onFinished:
            self.onFinished(self)

    def wait(self, timeout: float | None = None, interval: float = 0.05):
        """Block until finished; returns the import report, raises :class:`EngineError` when failed or cancelled.

        On ``timeout`` (seconds) the run is cancelled and ``TimeoutError`` raised.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.poll():
            if deadline is not None and time.monotonic() > deadline:
                self.cancel(wait=True)
                raise TimeoutError(f"segmentation did not finish within {timeout:.0f} s and was cancelled")
            if self.state == self.RUNNING:
                time.sleep(interval)
            else:
                time.sleep(0.002)
        if self.state == self.CANCELLED:
            raise EngineError("segmentation was cancelled")
        if self.state == self.FAILED:
            raise EngineError(self.error or "segmentation failed")
        return self.report

    def cancel(self, wait: bool = False) -> None:
        """Stop the engine (its whole process tree); the segmentation is left unchanged. An import that has
        started is not interrupted (it takes well under a second and must not leave half a result)."""
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
