"""Download machinery against a real HTTP server on 127.0.0.1 (no mocking of the HTTP layer).

The server (``http_server`` fixture in ``conftest.py``, shared with ``test_registry.py`` and ``test_cli.py``)
serves byte strings with HTTP/1.1 Range and If-Range support, and can be told to cut the connection mid-transfer,
serve wrong bytes, answer 404/503, ignore Range requests, answer slowly, or redirect (as Hugging Face ``resolve``
URLs do).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from UniversalSegLib import download as dl
from UniversalSegLib.download import cache_dir, download_file, format_size, sha256_file, tqdm_progress
from UniversalSegLib.errors import DownloadError, InputError

PAYLOAD_SIZE = (5 << 19) + 123  # ~2.5 MiB: several 1 MiB reads, an odd length


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Point the cache at a temporary folder and make retries fast; tests never touch the real cache."""
    monkeypatch.setenv("UNIVERSALSEG_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(dl, "_BACKOFF_S", 0.01)
    return tmp_path / "cache"


@pytest.fixture
def payload() -> bytes:
    return os.urandom(PAYLOAD_SIZE)


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _leftovers(dest: Path) -> list[str]:
    return sorted(p.name for p in dest.parent.glob(dest.name + ".part*"))


def test_success_writes_verified_file_and_reports_progress(http_server, payload, tmp_path):
    url = http_server.add("/model.pth", payload)
    dest = tmp_path / "out" / "model.pth"
    calls: list[tuple[int, int | None]] = []
    result = download_file(
        url, dest, sha256=_sha(payload), expected_size=len(payload), progress=lambda d, t: calls.append((d, t))
    )
    assert result == dest
    assert dest.read_bytes() == payload
    assert sha256_file(dest) == _sha(payload)
    assert _leftovers(dest) == []
    assert http_server.requests == [{"path": "/model.pth", "range": None, "if_range": None}]
    done = [d for d, _ in calls]
    assert done == sorted(done) and calls[-1] == (len(payload), len(payload))
    assert all(t == len(payload) for _, t in calls)
    assert len(calls) >= 3  # several chunks were reported, not just the end


def test_interrupted_transfer_keeps_part_then_next_call_resumes_with_range(http_server, payload, tmp_path):
    url = http_server.add("/model.pth", payload, etag='"abc"')
    dest = tmp_path / "model.pth"
    http_server.mode = "cut"
    expected = r"failed after 1 attempt.*connection closed after \d+ of \d+ bytes.*resumes"
    with pytest.raises(DownloadError, match=expected):
        download_file(url, dest, sha256=_sha(payload), retries=0)
    assert not dest.exists()
    part = dest.with_name("model.pth.part")
    received = part.read_bytes()
    assert len(received) == len(payload) // 2 and payload.startswith(received)

    http_server.mode = "ok"
    calls: list[tuple[int, int | None]] = []
    download_file(url, dest, sha256=_sha(payload), retries=0, progress=lambda d, t: calls.append((d, t)))
    assert dest.read_bytes() == payload
    last = http_server.requests[-1]
    assert last["range"] == f"bytes={len(received)}-"
    assert last["if_range"] == '"abc"'  # resume is guarded by the validator of the first response
    assert calls[0] == (len(received), len(payload))  # progress starts where the .part ended
    assert _leftovers(dest) == []


def test_retries_resume_within_one_call(http_server, payload, tmp_path):
    url = http_server.add("/model.pth", payload)
    http_server.mode = "cut_once"
    dest = download_file(url, tmp_path / "model.pth", sha256=_sha(payload), retries=2)
    assert dest.read_bytes() == payload
    assert [r["range"] for r in http_server.requests] == [None, f"bytes={len(payload) // 2}-"]


def test_resume_through_redirect_keeps_range_header(http_server, payload, tmp_path):
    http_server.add("/files/model.pth", payload)
    url = http_server.base_url + "/redirect/files/model.pth"
    dest = tmp_path / "model.pth"
    http_server.mode = "cut"
    with pytest.raises(DownloadError):
        download_file(url, dest, retries=0)
    http_server.mode = "ok"
    download_file(url, dest, sha256=_sha(payload), retries=0)
    assert dest.read_bytes() == payload
    assert http_server.file_requests()[-1]["range"] == f"bytes={len(payload) // 2}-"


def test_checksum_mismatch_leaves_nothing(http_server, payload, tmp_path):
    url = http_server.add("/model.pth", payload)
    http_server.mode = "wrong"
    dest = tmp_path / "model.pth"
    wrong = _sha(bytes(reversed(payload)))
    with pytest.raises(DownloadError, match="checksum mismatch") as info:
        download_file(url, dest, sha256=_sha(payload), expected_size=len(payload))
    message = str(info.value)
    assert _sha(payload) in message and wrong in message and url in message
    assert "\n" not in message
    assert not dest.exists()
    assert _leftovers(dest) == []
    assert len(http_server.requests) == 1  # a checksum failure is not retried


def test_http_404_names_url_and_status(http_server, tmp_path):
    url = http_server.base_url + "/missing.pth"
    dest = tmp_path / "missing.pth"
    with pytest.raises(DownloadError) as info:
        download_file(url, dest)
    message = str(info.value)
    assert url in message and "HTTP 404" in message and "download the file manually" in message
    assert not dest.exists() and _leftovers(dest) == []
    assert len(http_server.requests) == 1  # 404 is not retried


def test_server_errors_are_retried_then_reported(http_server, payload, tmp_path):
    url = http_server.add("/model.pth", payload)
    http_server.mode = "503"
    with pytest.raises(DownloadError, match=r"failed after 3 attempt.*HTTP 503"):
        download_file(url, tmp_path / "model.pth", retries=2)
    assert len(http_server.requests) == 3


def test_unreachable_server_gives_network_hint(tmp_path, monkeypatch):
    monkeypatch.setenv("no_proxy", "127.0.0.1")
    with socket.socket() as sock:  # a port that nothing listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/model.pth"
    with pytest.raises(DownloadError, match="cannot reach the server.*check the network connection") as info:
        download_file(url, tmp_path / "model.pth", retries=0, timeout=5)
    assert url in str(info.value)
    assert not (tmp_path / "model.pth").exists()


def test_server_ignoring_range_restarts_from_zero(http_server, payload, tmp_path):
    url = http_server.add("/model.pth", payload)
    dest = tmp_path / "model.pth"
    dest.with_name("model.pth.part").write_bytes(payload[:1000])
    http_server.mode = "ignore_range"
    download_file(url, dest, sha256=_sha(payload))
    assert dest.read_bytes() == payload  # not the 1000 old bytes followed by the whole file
    assert http_server.requests[-1]["range"] == "bytes=1000-"


def test_file_changed_upstream_restarts_instead_of_splicing(http_server, payload, tmp_path):
    url = http_server.add("/model.pth", payload, etag='"old"')
    dest = tmp_path / "model.pth"
    http_server.mode = "cut"
    with pytest.raises(DownloadError):
        download_file(url, dest, retries=0)
    new_payload = os.urandom(PAYLOAD_SIZE)
    http_server.add("/model.pth", new_payload, etag='"new"')
    http_server.mode = "ok"
    download_file(url, dest, sha256=_sha(new_payload), retries=0)
    assert dest.read_bytes() == new_payload
    assert http_server.requests[-1]["if_range"] == '"old"'


def test_complete_part_is_finished_without_transfer(http_server, payload, tmp_path):
    url = http_server.add("/model.pth", payload)
    dest = tmp_path / "model.pth"
    dest.with_name("model.pth.part").write_bytes(payload)
    download_file(url, dest, sha256=_sha(payload))  # server answers 416 "bytes */N": nothing left to fetch
    assert dest.read_bytes() == payload
    assert http_server.requests[-1]["range"] == f"bytes={len(payload)}-"


def test_part_longer_than_expected_size_is_discarded(http_server, payload, tmp_path):
    url = http_server.add("/model.pth", payload)
    dest = tmp_path / "model.pth"
    dest.with_name("model.pth.part").write_bytes(b"x" * (len(payload) + 10))
    download_file(url, dest, expected_size=len(payload))
    assert dest.read_bytes() == payload
    assert http_server.requests[-1]["range"] is None


def test_size_differing_from_registry_is_refused(http_server, payload, tmp_path):
    url = http_server.add("/model.pth", payload)
    dest = tmp_path / "model.pth"
    with pytest.raises(DownloadError, match=rf"sends {len(payload)} bytes .* but {len(payload) + 1} are expected"):
        download_file(url, dest, expected_size=len(payload) + 1)
    assert not dest.exists() and _leftovers(dest) == []


def test_existing_verified_file_is_not_downloaded_again(http_server, payload, tmp_path):
    url = http_server.add("/model.pth", payload)
    dest = tmp_path / "model.pth"
    download_file(url, dest, sha256=_sha(payload))
    download_file(url, dest, sha256=_sha(payload))
    assert len(http_server.requests) == 1


@pytest.mark.skipif(os.name == "nt", reason="the download lock uses POSIX flock")
def test_concurrent_downloads_of_one_file_are_serialised(http_server, payload, tmp_path):
    """Two downloads of the same file at once (two Slicer windows, two batch jobs): the second waits for the lock,
    then finds the verified file and sends no request; neither sees the other's half-written ``.part``."""
    url = http_server.add("/model.pth", payload)
    http_server.delay_s = 0.5  # the first transfer is still running when the second call starts
    dest = tmp_path / "model.pth"
    results: list[object] = []

    def fetch() -> None:
        try:
            results.append(download_file(url, dest, sha256=_sha(payload), retries=0))
        except Exception as exc:  # noqa: BLE001 (reported below)
            results.append(exc)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for thread in threads:
        thread.start()
        time.sleep(0.1)
    for thread in threads:
        thread.join(timeout=60)
    assert results == [dest, dest]
    assert dest.read_bytes() == payload
    assert len(http_server.requests) == 1  # the file was transferred once
    assert _leftovers(dest) == []


def test_existing_corrupt_file_is_replaced(http_server, payload, tmp_path):
    url = http_server.add("/model.pth", payload)
    dest = tmp_path / "model.pth"
    dest.write_bytes(b"corrupt")
    download_file(url, dest, sha256=_sha(payload))
    assert dest.read_bytes() == payload


def test_without_sha256_only_completeness_is_checked_and_said(http_server, payload, tmp_path, caplog):
    url = http_server.add("/model.pth", payload)
    with caplog.at_level(logging.WARNING, logger="UniversalSegLib.download"):
        dest = download_file(url, tmp_path / "model.pth")
    assert dest.read_bytes() == payload
    assert "no sha256 is known" in caplog.text and _sha(payload) in caplog.text


def test_bad_arguments_are_refused_before_any_request(http_server, tmp_path):
    with pytest.raises(DownloadError, match="only http:// and https://"):
        download_file("ftp://example.org/x.pth", tmp_path / "x.pth")
    with pytest.raises(InputError, match="sha256 must be 64 hexadecimal"):
        download_file(http_server.base_url + "/x", tmp_path / "x.pth", sha256="abc")
    assert http_server.requests == []


def test_tqdm_progress_renders_a_bar(http_server, payload, tmp_path):
    url = http_server.add("/model.pth", payload)
    stream = io.StringIO()
    with tqdm_progress("model.pth", file=stream, mininterval=0) as bar:
        download_file(url, tmp_path / "model.pth", progress=bar)
    text = stream.getvalue()
    assert "model.pth" in text and "100%" in text and "2.50M" in text


def test_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIVERSALSEG_HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" and (tmp_path / "home").is_dir()
    monkeypatch.delenv("UNIVERSALSEG_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir(create=False) == tmp_path / "xdg" / "universalseg"
    assert not (tmp_path / "xdg").exists()  # create=False creates nothing
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    if os.name != "nt":
        assert cache_dir(create=False) == tmp_path / "user" / ".cache" / "universalseg"


def test_cache_dir_not_creatable_says_what_to_do(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("UNIVERSALSEG_HOME", str(blocker / "cache"))
    with pytest.raises(InputError, match="UNIVERSALSEG_HOME"):
        cache_dir()


def test_sha256_file_and_format_size(tmp_path):
    data = os.urandom(3 * (1 << 20) + 7)
    (tmp_path / "f").write_bytes(data)
    assert sha256_file(tmp_path / "f") == _sha(data)
    assert format_size(None) == "unknown"
    assert format_size(512) == "512 B"
    assert format_size(3 * (1 << 20)) == "3.0 MiB"
