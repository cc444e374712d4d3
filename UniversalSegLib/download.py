"""Resumable, verified file downloads into the per-user cache (standard library ``urllib`` only).

What :func:`download_file` guarantees:

* bytes stream into ``<dest>.part``; an existing ``.part`` is resumed with an HTTP ``Range`` request (guarded by
  ``If-Range`` with the server's ETag / Last-Modified, so a file that changed upstream restarts instead of being
  spliced); a server that ignores ``Range`` simply makes it start over;
* transient failures (connection cut, timeout, HTTP 5xx/429) are retried ``retries`` times, each retry resuming;
* size and sha256 are checked where known, then the ``.part`` is renamed onto ``dest`` with :func:`os.replace`
  (atomic on one filesystem): a file at ``dest`` is always complete and verified. A checksum mismatch deletes the
  ``.part``; an interrupted transfer keeps it so that the next call resumes;
* concurrent downloads of the same ``dest`` (two Slicer clicks, a Slurm array sharing a home folder) are serialised
  with an advisory file lock where the platform has ``fcntl``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import http.client
import json
import logging
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional

from .errors import DownloadError, InputError

__all__ = [
    "DownloadProgress",
    "TqdmProgress",
    "cache_dir",
    "download_file",
    "format_size",
    "sha256_file",
    "tqdm_progress",
]

logger = logging.getLogger(__name__)

#: ``progress(bytes_done, total_bytes_or_None)``; ``bytes_done`` counts the whole file, resumed bytes included.
DownloadProgress = Callable[[int, Optional[int]], None]

_CHUNK = 1 << 20  # 1 MiB reads: few Python-level iterations for GB files, fine-grained enough for a progress bar
_BACKOFF_S = 0.5  # first retry delay; doubles per retry, capped at _BACKOFF_MAX_S
_BACKOFF_MAX_S = 8.0
_USER_AGENT = "universalseg-downloader/1 (+python-urllib)"
_RETRYABLE_HTTP = {408, 425, 429, 500, 502, 503, 504}
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_HINT = "check the network connection (or proxy settings), or download the file manually and pass its path"


class _Retryable(Exception):
    """A transient failure: the next attempt may succeed (and resumes the .part)."""


def cache_dir(create: bool = True) -> Path:
    """The per-user cache folder of UniversalSeg.

    ``$UNIVERSALSEG_HOME`` when set; otherwise ``$XDG_CACHE_HOME/universalseg``, ``%LOCALAPPDATA%\\universalseg`` on
    Windows, or ``~/.cache/universalseg``. Created on demand unless ``create`` is False.
    """
    home = os.environ.get("UNIVERSALSEG_HOME", "").strip()
    if home:
        root = Path(home).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
        local_app_data = os.environ.get("LOCALAPPDATA", "").strip()
        if xdg:
            root = Path(xdg).expanduser() / "universalseg"
        elif sys.platform == "win32" and local_app_data:
            root = Path(local_app_data) / "universalseg"
        else:
            root = Path.home() / ".cache" / "universalseg"
    if create:
        try:
            root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise InputError(
                f"cannot create the cache folder {root} ({exc.strerror or exc}); "
                "set UNIVERSALSEG_HOME to a writable folder"
            ) from exc
    return root


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks (constant memory for multi-GB checkpoints)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def format_size(num_bytes: int | None) -> str:
    """Human-readable size, e.g. ``'246.9 MiB'``; ``'unknown'`` for None."""
    if num_bytes is None:
        return "unknown"
    size = float(num_bytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def download_file(
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    expected_size: int | None = None,
    progress: DownloadProgress | None = None,
    timeout: float = 60.0,
    retries: int = 3,
) -> Path:
    """Download ``url`` to ``dest`` (resumable, verified, atomic); returns ``dest``.

    Args:
        url: ``http(s)://`` URL; redirects are followed (Hugging Face ``resolve`` URLs redirect to a CDN).
        dest: final file path; its folder is created. If ``dest`` already exists and verifies against ``sha256`` /
            ``expected_size`` it is returned without network access; if it does not verify it is deleted and
            downloaded again.
        sha256: expected hex digest, or None when unknown (then only completeness and size are checked, and a
            warning with the file's actual sha256 is logged so it can be pinned).
        expected_size: expected size in bytes, or None.
        progress: called as ``progress(bytes_done, total_or_None)`` while streaming.
        timeout: socket timeout in seconds for connecting and for each read.
        retries: how many times a transient failure is retried (each retry resumes); 0 = a single attempt.

    Raises:
        DownloadError: HTTP error status, network unreachable, transfer still incomplete after the retries (the
            ``.part`` is kept for the next call), size or checksum mismatch (the ``.part`` is deleted), disk full.
    """
    dest = Path(dest)
    if not re.match(r"^https?://", url, flags=re.IGNORECASE):
        raise DownloadError(f"cannot download {url!r}: only http:// and https:// URLs are supported")
    expected_sha = _normalise_sha256(sha256)
    if expected_size is not None and (not isinstance(expected_size, int) or expected_size < 0):
        raise InputError(f"expected_size must be a non-negative integer number of bytes, got {expected_size!r}")
    if retries < 0:
        raise InputError(f"retries must be >= 0, got {retries}")
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DownloadError(
            f"cannot create the folder {dest.parent} ({exc.strerror or exc}); "
            "set UNIVERSALSEG_HOME to a writable folder"
        ) from exc
    part = dest.with_name(dest.name + ".part")
    meta = dest.with_name(dest.name + ".part.meta")

    with _download_lock(dest):
        # Another process may have finished the same download while we waited for the lock.
        if dest.is_file():
            if _file_verifies(dest, expected_sha, expected_size):
                return dest
            logger.warning("%s exists but does not match the expected size/checksum: downloading it again", dest)
            dest.unlink()

        opener = urllib.request.build_opener()  # built per call so that current proxy settings apply
        attempt = 0
        while True:
            try:
                _fetch_into_part(opener, url, part, meta, expected_size, progress, timeout)
                break
            except _Retryable as exc:
                if attempt >= retries:
                    kept = part.is_file() and part.stat().st_size > 0
                    raise DownloadError(
                        f"download of {url} failed after {attempt + 1} attempt(s): {exc}; "
                        + (f"the partial file {part} is kept and the next download resumes it; " if kept else "")
                        + _HINT
                    ) from exc
                delay = min(_BACKOFF_S * (2**attempt), _BACKOFF_MAX_S)
                logger.info("download of %s interrupted (%s); retrying in %.1f s", url, exc, delay)
                attempt += 1
                time.sleep(delay)

        _verify_part(part, meta, url, expected_sha, expected_size)
        os.replace(part, dest)
        _unlink_quietly(meta)
    return dest


# ----------------------------------------------------------------------------------------------------- internals


def _normalise_sha256(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    value = str(sha256).strip().lower()
    if not _SHA256_RE.match(value):
        raise InputError(f"sha256 must be 64 hexadecimal characters, got {sha256!r}")
    return value


def _file_verifies(path: Path, sha256: str | None, size: int | None) -> bool:
    if size is not None and path.stat().st_size != size:
        return False
    return sha256 is None or sha256_file(path) == sha256


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _discard(part: Path, meta: Path) -> None:
    _unlink_quietly(part)
    _unlink_quietly(meta)


@contextlib.contextmanager
def _download_lock(dest: Path) -> Iterator[None]:
    """Exclusive advisory lock on ``<dest>.lock`` (POSIX ``flock``; a no-op where ``fcntl`` is missing)."""
    try:
        import fcntl
    except ImportError:  # Windows: concurrent downloads of one file are not serialised
        yield
        return
    lock_path = dest.with_name(dest.name + ".lock")
    with open(lock_path, "a+b") as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("waiting for another process that is downloading %s", dest)
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _read_validator(meta: Path) -> str | None:
    """The ETag / Last-Modified of the response the .part came from (for ``If-Range``)."""
    try:
        value = json.loads(meta.read_text(encoding="utf-8")).get("validator")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value else None


def _write_validator(meta: Path, url: str, headers: Mapping[str, str]) -> None:
    etag = headers.get("ETag")
    # If-Range needs a strong validator: weak ETags (W/"...") never match a range request.
    validator = etag if etag and not etag.startswith("W/") else headers.get("Last-Modified")
    if validator:
        meta.write_text(json.dumps({"url": url, "validator": validator}), encoding="utf-8")
    else:
        _unlink_quietly(meta)


def _parse_content_range(value: str | None) -> tuple[int, int | None] | None:
    """``'bytes 100-199/1000'`` -> (100, 1000); ``'bytes 100-199/*'`` -> (100, None); anything else -> None."""
    match = re.match(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", value or "")
    if not match:
        return None
    return int(match.group(1)), None if match.group(3) == "*" else int(match.group(3))


def _unsatisfied_total(value: str | None) -> int | None:
    """Total size from a 416 response's ``Content-Range: bytes */1000``."""
    match = re.match(r"^\s*bytes\s+\*/(\d+)\s*$", value or "")
    return int(match.group(1)) if match else None


def _fetch_into_part(
    opener: urllib.request.OpenerDirector,
    url: str,
    part: Path,
    meta: Path,
    expected_size: int | None,
    progress: DownloadProgress | None,
    timeout: float,
) -> None:
    """One attempt: bring ``part`` to the complete file as served. Raises _Retryable or DownloadError."""
    have = part.stat().st_size if part.is_file() else 0
    if expected_size is not None and have > expected_size:
        _discard(part, meta)  # longer than the file can be: not a prefix of it
        have = 0
    if have and expected_size is not None and have == expected_size:
        if progress is not None:
            progress(have, expected_size)
        return  # a previous attempt got every byte; only verification is left

    headers = {"User-Agent": _USER_AGENT, "Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
        validator = _read_validator(meta)
        if validator:
            headers["If-Range"] = validator
    request = urllib.request.Request(url, headers=headers)
    try:
        response = opener.open(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        with contextlib.closing(exc):
            if exc.code == 416 and have:
                if _unsatisfied_total(exc.headers.get("Content-Range")) == have:
                    return  # the .part already holds the whole file
                _discard(part, meta)
                raise _Retryable("the server cannot resume the partial file (HTTP 416); starting over") from exc
            if exc.code in _RETRYABLE_HTTP:
                raise _Retryable(f"HTTP {exc.code} {exc.reason}") from exc
            raise DownloadError(f"download of {url} failed: HTTP {exc.code} {exc.reason}; {_HINT}") from exc
    except urllib.error.URLError as exc:
        raise _Retryable(f"cannot reach the server ({exc.reason})") from exc
    except (OSError, http.client.HTTPException) as exc:
        raise _Retryable(f"cannot reach the server ({exc!r})") from exc

    with response:
        if have and response.status == 206:
            content_range = _parse_content_range(response.headers.get("Content-Range"))
            if content_range is None or content_range[0] != have:
                _discard(part, meta)
                raise _Retryable(f"the server resumed at the wrong offset ({response.headers.get('Content-Range')})")
            total = content_range[1]
            mode = "ab"
        elif response.status == 200:
            # No Range sent, Range ignored, or If-Range said the file changed: the body is the whole file.
            have, mode = 0, "wb"
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
        else:
            raise DownloadError(f"download of {url} failed: unexpected HTTP status {response.status}; {_HINT}")

        if expected_size is not None and total is not None and total != expected_size:
            _discard(part, meta)
            raise DownloadError(
                f"the server sends {total} bytes for {url} but {expected_size} are expected: the file may have "
                "changed upstream; download it manually and pass its path, or update the model registry"
            )
        if total is None:
            total = expected_size
        _write_validator(meta, url, response.headers)

        done = have
        try:
            with open(part, mode) as out:
                if progress is not None:
                    progress(done, total)
                while True:
                    try:
                        block = response.read(_CHUNK)
                    except (OSError, http.client.HTTPException) as exc:
                        raise _Retryable(f"connection lost after {done} bytes ({exc!r})") from exc
                    if not block:
                        break
                    out.write(block)
                    done += len(block)
                    if progress is not None:
                        progress(done, total)
        except OSError as exc:  # writing the .part failed (network errors were turned into _Retryable above)
            if exc.errno == errno.ENOSPC:
                raise DownloadError(
                    f"not enough disk space for {part.name} in {part.parent}; free some space or set "
                    "UNIVERSALSEG_HOME to a folder on a larger disk (the partial file is kept and resumes)"
                ) from exc
            raise DownloadError(f"cannot write {part} ({exc.strerror or exc}); check the folder's permissions") from exc

    if total is not None and done < total:
        raise _Retryable(f"connection closed after {done} of {total} bytes")


def _verify_part(part: Path, meta: Path, url: str, sha256: str | None, expected_size: int | None) -> None:
    """Size and checksum of the finished .part; a .part that fails is deleted (it cannot become valid by resuming)."""
    size = part.stat().st_size
    if expected_size is not None and size != expected_size:
        _discard(part, meta)
        raise DownloadError(
            f"the download of {url} has {size} bytes but {expected_size} are expected; it was deleted: retry, "
            "or download the file manually and pass its path"
        )
    actual = sha256_file(part)
    if sha256 is None:
        logger.warning(
            "no sha256 is known for %s: only its completeness%s was checked, not its content (its sha256 is %s)",
            url,
            " and size" if expected_size is not None else "",
            actual,
        )
    elif actual != sha256:
        _discard(part, meta)
        raise DownloadError(
            f"checksum mismatch for {url}: expected sha256 {sha256}, got {actual}; the corrupt download was deleted: "
            "retry, or download the file manually and pass its path"
        )


class TqdmProgress:
    """A :data:`DownloadProgress` that draws a tqdm bar in bytes; handles resumed and restarted transfers.

    Use as a context manager (or call :meth:`close`) so that the bar is closed if the download fails.
    """

    def __init__(self, desc: str, **tqdm_kwargs) -> None:
        self.desc = desc
        self.tqdm_kwargs = tqdm_kwargs
        self._bar: Any = None  # a tqdm bar; tqdm is imported lazily in __call__

    def __call__(self, done: int, total: int | None) -> None:
        if self._bar is None:
            from tqdm.auto import tqdm  # imported lazily: the library itself does not need tqdm

            options: dict[str, Any] = {"unit": "B", "unit_scale": True, "unit_divisor": 1024, "dynamic_ncols": True}
            options.update(self.tqdm_kwargs)
            self._bar = tqdm(total=total, initial=done, desc=self.desc, **options)
        elif total != self._bar.total or done < self._bar.n:  # a retry restarted from scratch or the size changed
            self._bar.reset(total=total)
            self._bar.update(done)
        else:
            self._bar.update(done - self._bar.n)
        if total is not None and done >= total:
            self.close()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> "TqdmProgress":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def tqdm_progress(desc: str, **tqdm_kwargs) -> TqdmProgress:
    """A progress callback for :func:`download_file` that renders a tqdm bar labelled ``desc``."""
    return TqdmProgress(desc, **tqdm_kwargs)
