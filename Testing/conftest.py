"""Shared fixtures: the reference data in ../shared (beside the checkout), and small models."""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

torch.set_num_threads(min(2, os.cpu_count() or 1))


def shared_path(*parts: str) -> Path:
    """Path under ../shared; skips the test when missing (fails in CI, where the data must be there)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        message = f"reference data {path} is missing (../shared beside the checkout holds it)"
        if IN_CI:
            pytest.fail(message + "; CI must have it")
        pytest.skip(message)
    return path


@pytest.fixture
def shared():
    return shared_path


def require_slicer_core():
    """The ``slicer`` module of the PyPI package ``slicer-core`` (the MRML library without the application).

    Skips the calling test module without it; fails in CI, where it must be installed (a skip there would hide that
    the Slicer-side tests never ran). Call at module level: ``slicer = require_slicer_core()``."""
    try:
        import slicer
    except ImportError as exc:
        message = f"slicer-core (PyPI) provides the MRML library: cannot import slicer ({exc})"
        if IN_CI:
            pytest.fail(message + "; CI must install it", pytrace=False)
        pytest.skip(message, allow_module_level=True)
    if not hasattr(slicer, "vtkMRMLSegmentationNode"):
        message = "the installed 'slicer' package is not slicer-core"
        if IN_CI:
            pytest.fail(message + "; CI must install slicer-core", pytrace=False)
        pytest.skip(message, allow_module_level=True)
    return slicer


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's real model cache from tests."""
    if "UNIVERSALSEG_HOME" not in os.environ or not os.environ["UNIVERSALSEG_HOME"].startswith(
        str(tmp_path_factory.getbasetemp())
    ):
        monkeypatch.setenv("UNIVERSALSEG_HOME", str(tmp_path_factory.mktemp("universalseg_home")))


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """A 1/8-width U-Net Universal Model with random weights and the real 32 class embeddings (fast on CPU)."""
    from UniversalSegLib.catalog import ClassCatalog
    from UniversalSegLib.checkpoints import save_checkpoint
    from UniversalSegLib.networks import ModelConfig, UniversalModel

    embeddings = torch.load(
        shared_path("reference", "clip_txt_encoding_32.pth"), map_location="cpu", weights_only=True
    ).float()
    torch.manual_seed(0)
    model = UniversalModel(ModelConfig("unet", 4))
    model.organ_embedding.copy_(embeddings)
    model.class_names = ClassCatalog.default().names
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    return save_checkpoint(model, path, {"name": "tiny-test", "licence": "test weights"})


# ------------------------------------------------------------------------------------- HTTP server on 127.0.0.1
class ServerState:
    """What the test server serves and what it saw. ``mode`` is one of: ok, cut, cut_once, wrong, 404, 503,
    ignore_range."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.etags: dict[str, str] = {}
        self.mode = "ok"
        self.requests: list[dict[str, str | None]] = []
        self.cut_done = False
        self.base_url = ""
        self.delay_s = 0.0  # wait this long before answering a file request (to overlap two clients)

    def add(self, path: str, body: bytes, etag: str = '"v1"') -> str:
        self.files[path] = body
        self.etags[path] = etag
        return self.base_url + path

    def file_requests(self) -> list[dict[str, str | None]]:
        """Requests for files (redirect hops left out)."""
        return [r for r in self.requests if not r["path"].startswith("/redirect/")]


class RangeHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # keep pytest output clean
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        state: ServerState = self.server.state  # type: ignore[attr-defined]
        state.requests.append(
            {"path": self.path, "range": self.headers.get("Range"), "if_range": self.headers.get("If-Range")}
        )
        if self.path.startswith("/redirect/"):
            self.send_response(302)
            self.send_header("Location", self.path[len("/redirect") :])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if state.delay_s:
            time.sleep(state.delay_s)
        body = state.files.get(self.path)
        if body is None or state.mode == "404":
            self.send_error(404, "Not Found")
            return
        if state.mode == "503":
            self.send_error(503, "Service Unavailable")
            return
        if state.mode == "wrong":
            body = bytes(reversed(body))  # same length, other bytes
        etag = state.etags[self.path]

        start = 0
        range_header = self.headers.get("Range")
        if_range = self.headers.get("If-Range")
        honour = range_header is not None and state.mode != "ignore_range" and if_range in (None, etag)
        if honour:
            match = re.fullmatch(r"bytes=(\d+)-", range_header)
            assert match, f"client sent an unexpected Range header {range_header!r}"
            start = int(match.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        payload = body[start:]
        self.send_response(206 if honour else 200)
        if honour:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", etag)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        cut = state.mode == "cut" or (state.mode == "cut_once" and not state.cut_done)
        if cut:
            state.cut_done = True
            payload = payload[: len(payload) // 2]
            self.close_connection = True  # the server closes the socket after half: the client sees a short body
        try:
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client hung up on purpose (e.g. size refused)
            self.close_connection = True


@pytest.fixture
def http_server(monkeypatch):
    """A ThreadingHTTPServer on 127.0.0.1 (free port); yields its :class:`ServerState`."""
    for var in ("no_proxy", "NO_PROXY"):  # never send 127.0.0.1 through a proxy configured in the environment
        monkeypatch.setenv(var, "127.0.0.1,localhost")
    server = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    server.daemon_threads = True
    server.state = ServerState()  # type: ignore[attr-defined]
    server.state.base_url = f"http://127.0.0.1:{server.server_address[1]}"  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server.state  # type: ignore[attr-defined]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 2 MiB file system (tmpfs) mounted for the test, to fill up: needs root on Linux (CI runs so);
    skipped elsewhere. Unmounted afterwards."""
    import subprocess

    mount = tmp_path / "small_fs"
    mount.mkdir()
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root on Linux")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        message = f"cannot mount a tmpfs here ({proc.stderr.strip()})"
        if IN_CI:
            pytest.fail(message + "; CI runs as root on Linux and must run this test")
        pytest.skip(message)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
