"""Output safety: never write over an input, and every output is either complete or absent.

Every writer of the engine (the CLI, :func:`~UniversalSegLib.imageio.write_outputs`, the training export,
:func:`~UniversalSegLib.checkpoints.save_checkpoint`) goes through this module:

1. :class:`OutputPlan` collects the files one run will write and checks them together *before any work starts*:
   an output that is, or resolves to (symlinks, ``./``, ``..``, hard links, a case-insensitive file system), a file of
   an input (every file of an input DICOM series) is refused, and so are two outputs that are the same file.
2. :class:`OutputTransaction` writes each file to a temporary name in its destination folder, fsyncs it, verifies it
   (size, and a read-back of header and data by a format-specific check), and only then renames it into place
   (``os.replace``). With several files, all are written and verified first; then they replace their destinations
   together, and a failure while renaming puts the previous files back. Any failure, exception or signal
   (SIGINT/SIGTERM unwind as exceptions) removes the temporary files and the folders the transaction created, so
   pre-existing files stay byte-identical.

A problem raises :class:`~UniversalSegLib.errors.OutputError` with one line naming the file and what to do.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import secrets
import shutil
import signal
import stat
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from .errors import OutputError, printable

__all__ = [
    "Verifier",
    "OutputPlan",
    "OutputTransaction",
    "safe_output",
    "protected_files",
    "same_file_key",
    "check_free_space",
    "check_regular_input",
    "temporary_name",
    "verify_image",
    "verify_text",
]

# A verifier reads the temporary file back and raises ValueError (saying what is wrong) when it is not what was meant.
Verifier = Callable[[Path], None]

# Suffixes kept at the end of temporary names, so that writers that pick the format from the name pick the same one.
_SUFFIXES = (".seg.nrrd", ".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd", ".json", ".dcm", ".safetensors")
_TEMP_MARK = ".part"


def temporary_name(dest: Path) -> Path:
    """A hidden, unique name next to ``dest`` with the same format suffix: ``dir/.name.1a2b3c4d.part.nii.gz``."""
    suffix = next((s for s in _SUFFIXES if dest.name.lower().endswith(s)), "")
    stem = dest.name[: len(dest.name) - len(suffix)]
    return dest.with_name(f".{stem}.{secrets.token_hex(4)}{_TEMP_MARK}{suffix}")


# ------------------------------------------------------------------------------------------------ identities
def _nearest_existing(path: Path) -> Path:
    probe = path
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    return probe


@functools.lru_cache(maxsize=256)
def _case_insensitive(folder: str) -> bool:
    """Whether the file system holding ``folder`` (an existing folder) ignores the case of file names.

    Probed with a real temporary file (mount options do not tell: APFS, NTFS, ext4 casefold folders)."""
    name = f".usg-case-{secrets.token_hex(4)}"
    probe = os.path.join(folder, name)
    try:
        fd = os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except OSError:
        # Not writable: compare the folder with its own name in another case (works when its name has letters).
        head, tail = os.path.split(folder)
        other = os.path.join(head, tail.swapcase())
        return tail != tail.swapcase() and os.path.exists(other) and os.path.samefile(folder, other)
    try:
        os.close(fd)
        return os.path.exists(os.path.join(folder, name.upper()))
    finally:
        with contextlib.suppress(OSError):
            os.unlink(probe)


def _real(path: str | Path) -> str:
    """The real path: ``~``, symlinks, ``.`` and ``..`` resolved."""
    return os.path.normcase(os.path.realpath(os.path.expanduser(str(path))))


def same_file_key(path: str | Path) -> str:
    """A string that is equal for two paths exactly when they name the same file, existing or not: the real path
    (symlinks, ``.`` and ``..`` resolved), case-folded where the file system ignores case (probed in the nearest
    existing folder, where the file will be written)."""
    real = _real(path)
    folder = str(_nearest_existing(Path(real).parent))
    if os.path.isdir(folder) and _case_insensitive(folder):
        return os.path.normcase(real).casefold()
    return os.path.normcase(real)


def _inode(path: str | Path) -> tuple[int, int] | None:
    try:
        st = os.stat(path)  # follows symlinks: a link to an input is the input
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def protected_files(source: str | Path) -> list[Path]:
    """Every file an input consists of: the file itself, every file of its DICOM series when it is one DICOM file,
    or every file under it when it is a folder (a DICOM series folder, or a batch folder's scan)."""
    source = Path(source).expanduser()
    if source.is_dir():
        files: list[Path] = []
        for root, _dirs, names in os.walk(source):
            files.extend(Path(root, name) for name in names)
        return files
    files = [source]
    from .imageio import dicom_series_files, is_dicom_file

    if source.is_file() and is_dicom_file(source):
        with contextlib.suppress(Exception):  # an unreadable series fails later, when it is read
            files.extend(p for p in dicom_series_files(source) if p != source)
    return files


# ------------------------------------------------------------------------------------------------ checks
def check_regular_input(path: str | Path) -> None:
    """Refuse an input that is not a regular file or folder (a FIFO, a device, a socket): reading one blocks forever
    or reads a stream, and would not stop on Ctrl-C. Raises InputError."""
    from .errors import InputError

    try:
        mode = os.stat(path).st_mode
    except OSError:
        return  # a missing path gets its own message from the reader
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return
    kind = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
    raise InputError(f"input '{printable(path)}' is {kind}, not a file; save the scan to a file and pass that")


def check_free_space(folder: str | Path, needed_bytes: int, what: str = "the output") -> None:
    """Raise OutputError when the file system of ``folder`` (or its nearest existing parent) has less than
    ``needed_bytes`` free for this user."""
    probe = _nearest_existing(Path(folder).expanduser())
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return  # cannot tell: the written file is still verified
    if free < needed_bytes:
        raise OutputError(
            f"not enough free space for {what} in '{printable(probe)}': {_size(needed_bytes)} needed, {_size(free)} "
            "free; free some space or choose another output folder"
        )


def _size(n: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@dataclass
class OutputPlan:
    """The files one run will write, checked against the inputs and against each other before any work starts.

    ``protect`` the inputs, ``add`` each output (``role`` names it in messages: "output", "summary", ...).
    """

    _inputs_by_key: dict[str, tuple[Path, Path]] = field(default_factory=dict)
    _inputs_by_inode: dict[tuple[int, int], tuple[Path, Path]] = field(default_factory=dict)
    _outputs_by_key: dict[str, tuple[Path, str]] = field(default_factory=dict)
    _outputs_by_inode: dict[tuple[int, int], tuple[Path, str]] = field(default_factory=dict)

    def protect(self, source: str | Path | None) -> "OutputPlan":
        """Never write over ``source`` (an input file or folder) or any file of it."""
        if source is None or not str(source):
            return self
        source = Path(source).expanduser()
        for file in protected_files(source):
            # Inputs exist: any other spelling of one (another case, a hard link) has its inode, so the plain real
            # path is key enough, and nothing is probed in the input's folder.
            self._inputs_by_key.setdefault(_real(file), (file, source))
            inode = _inode(file)
            if inode is not None:
                self._inputs_by_inode.setdefault(inode, (file, source))
        return self

    def _input_hit(self, path: Path) -> tuple[Path, Path] | None:
        hit = self._inputs_by_key.get(_real(path))
        if hit is None and os.path.exists(path):
            hit = self._inputs_by_inode.get(_inode(path))  # type: ignore[arg-type]
        if hit is not None and hit[0] != hit[1] and _is_derived_object(hit[0]):
            return None  # a DICOM SEG (an earlier output) in the series folder is not part of the scan
        return hit

    def add(self, path: str | Path, role: str = "output") -> Path:
        """Reserve ``path`` for ``role``. Raises OutputError when it is an input or another output's file."""
        path = Path(path).expanduser()
        hit = self._input_hit(path)
        if hit is not None:
            file, source = hit
            where = "" if file == source else f" (a file of the input '{printable(source)}')"
            same = "is" if os.path.abspath(file) == os.path.abspath(path) else "is the same file as"
            raise OutputError(
                f"{role} '{printable(path)}' {same} the input '{printable(file)}'{where}; writing it would destroy the "
                "input: choose another output path"
            )
        key = same_file_key(path)
        other = self._outputs_by_key.get(key)
        inode = _inode(path)
        if other is None and inode is not None:
            other = self._outputs_by_inode.get(inode)
        if other is not None:
            raise OutputError(
                f"{role} '{printable(path)}' and {other[1]} '{printable(other[0])}' are the same file; one would "
                "replace the other: give them different names"
            )
        self._outputs_by_key[key] = (path, role)
        if inode is not None:
            self._outputs_by_inode[inode] = (path, role)
        return path

    def add_folder(self, folder: str | Path, role: str) -> Path:
        """Check a folder output (e.g. ``--split-masks``): it must not be an input file or a planned output file."""
        folder = Path(folder).expanduser()
        hit = self._input_hit(folder)
        if hit is not None and not folder.is_dir():
            raise OutputError(f"{role} '{printable(folder)}' is the input '{printable(hit[0])}'; choose another folder")
        other = self._outputs_by_key.get(same_file_key(folder))
        if other is not None:
            raise OutputError(
                f"{role} '{printable(folder)}' is also the {other[1]} file '{printable(other[0])}'; "
                "give them different names"
            )
        return folder


def _is_derived_object(path: Path) -> bool:
    """Whether ``path`` is a DICOM object that is not an image (SEG, RTSTRUCT, SR...): never read as the scan."""
    from .imageio import NON_IMAGE_MODALITIES, dicom_header, is_dicom_file

    if not path.is_file() or not is_dicom_file(path):
        return False
    header = dicom_header(path)
    return header is not None and str(header.get("Modality", "")).upper() in NON_IMAGE_MODALITIES


# ------------------------------------------------------------------------------------------------ writing
def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as error:
        if error.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):  # file systems without fsync
            raise
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError, AttributeError):  # not possible on every platform; the data is already synced
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# Below this much free space after a failed write, the failure is blamed on the full disk.
_NEARLY_FULL_BYTES = 1 << 20


def _reason(error: BaseException, folder: Path) -> str:
    if isinstance(error, OSError):
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            return f"the disk is full ({error.strerror}); free some space or choose another output folder"
        return f"{error.strerror or error}; choose another output path"
    if isinstance(error, ValueError):  # a short or empty file that the writer did not report
        try:
            free = shutil.disk_usage(_nearest_existing(folder)).free
        except OSError:
            free = None
        if free is not None and free < _NEARLY_FULL_BYTES:
            return f"{error}: the disk is full ({_size(free)} free); free some space or choose another output folder"
        return f"{error}; is the disk full? Free some space or choose another output folder"
    from .imageio import _itk_reason

    return f"{_itk_reason(error) or 'the writer failed'}; choose another output path"


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM while files are renamed into place; they take effect right after, when all or none is done.

    Done with Python handlers rather than a signal mask: a process-directed signal goes to any thread that does not
    mask it (PyTorch's worker threads), and Python runs its handler in the main thread at once. Handlers can only be
    set from the main thread; elsewhere (a worker thread of an application) nothing is deferred."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    held = {sig: old for sig, old in previous.items() if old not in (signal.SIG_IGN, None)}
    for sig in held:
        signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, old in held.items():
            signal.signal(sig, old)
        if caught:
            old = held[signal.Signals(caught[0])]
            if callable(old):
                old(caught[0], None)  # e.g. raises KeyboardInterrupt / the CLI's Terminated now
            else:
                signal.raise_signal(caught[0])  # SIG_DFL: what it would have done


class OutputTransaction:
    """Write several files so that either all of them replace their destinations, complete and verified, or none.

    Usage::

        with OutputTransaction() as txn:
            with txn.stage(dest, verify) as tmp:
                write(tmp)            # any writer, to the temporary path
        # here every staged file is in place; after an exception none is, and the previous files are untouched
    """

    def __init__(self) -> None:
        self._staged: list[tuple[Path, Path]] = []
        self._created_dirs: list[Path] = []
        self.written: list[Path] = []

    def __enter__(self) -> "OutputTransaction":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def _make_parents(self, folder: Path) -> None:
        missing = []
        probe = folder
        while not probe.exists() and probe.parent != probe:
            missing.append(probe)
            probe = probe.parent
        for path in reversed(missing):
            path.mkdir()
            self._created_dirs.append(path)

    @contextlib.contextmanager
    def stage(
        self, dest: str | Path, verify: Verifier | None = None, *, needs_bytes: int | None = None
    ) -> Iterator[Path]:
        """Yield a temporary path next to ``dest`` to write to; when the block ends, fsync and verify the file (it must
        be non-empty and pass ``verify``). It replaces ``dest`` at commit. ``needs_bytes``: the file's size when it is
        known before writing (checked against the free space first).

        Raises:
            OutputError: the write failed, the disk is full, or the file read back is not what was written.
        """
        dest = Path(dest).expanduser()
        tmp = temporary_name(dest)
        try:
            self._make_parents(dest.parent)
            if needs_bytes is not None:
                check_free_space(dest.parent, needs_bytes, f"'{printable(dest.name)}'")
            yield tmp
            size = os.stat(tmp).st_size  # a writer that silently wrote nothing leaves no file
            if size == 0:
                raise ValueError("the written file is empty")
            _fsync_file(tmp)  # delayed write errors (ENOSPC, EIO, quota) show up here
            if verify is not None:
                verify(tmp)
        except OutputError:
            _remove_quietly(tmp)
            raise
        except (OSError, ValueError, RuntimeError) as error:
            _remove_quietly(tmp)
            if isinstance(error, FileNotFoundError) and not os.path.exists(tmp) and error.filename in (str(tmp), tmp):
                error = ValueError("the writer wrote no file")
            raise OutputError(f"cannot write '{printable(dest)}': {_reason(error, dest.parent)}") from None
        except BaseException:
            _remove_quietly(tmp)
            raise
        self._staged.append((tmp, dest))

    def commit(self) -> list[Path]:
        """Rename every staged file into place (all or none). Returns the destinations."""
        done: list[tuple[Path, Path | None]] = []
        current = Path()
        pending: tuple[Path, bool] | None = None  # the current destination's backup, and whether it was moved away
        with _signals_deferred():
            try:
                for tmp, current in self._staged:
                    backup = None
                    if len(self._staged) > 1 and os.path.lexists(current):
                        backup = temporary_name(current)  # keeps the previous file until all are in place
                        try:
                            os.link(current, backup, follow_symlinks=False)
                            pending = (backup, False)
                        except OSError:  # no hard links here (FAT, some network shares): move it aside
                            os.rename(current, backup)
                            pending = (backup, True)
                    os.replace(tmp, current)
                    pending = None
                    done.append((current, backup))
            except BaseException as error:
                if pending is not None:
                    backup, moved = pending
                    with contextlib.suppress(OSError):
                        os.replace(backup, current) if moved else os.unlink(backup)
                for dest, backup in reversed(done):
                    if backup is not None:
                        with contextlib.suppress(OSError):
                            os.replace(backup, dest)
                    else:
                        _remove_quietly(dest)
                self._staged = [(t, d) for t, d in self._staged if os.path.lexists(t)]
                self.abort()
                if isinstance(error, OSError):
                    raise OutputError(
                        f"cannot write '{printable(current)}': {_reason(error, current.parent)}"
                    ) from None
                raise
            for dest, backup in done:
                if backup is not None:
                    _remove_quietly(backup)
            for folder in {dest.parent for dest, _backup in done}:
                _fsync_dir(folder)
        self.written = [dest for dest, _backup in done]
        self._staged, self._created_dirs = [], []
        return self.written

    def abort(self) -> None:
        """Remove the temporary files and the folders this transaction created (when empty)."""
        for tmp, _dest in self._staged:
            _remove_quietly(tmp)
        self._staged = []
        for folder in reversed(self._created_dirs):
            with contextlib.suppress(OSError):
                folder.rmdir()
        self._created_dirs = []


@contextlib.contextmanager
def safe_output(
    dest: str | Path,
    verify: Verifier | None = None,
    transaction: OutputTransaction | None = None,
    *,
    needs_bytes: int | None = None,
) -> Iterator[Path]:
    """Write one file safely: stage it in ``transaction`` (committed by its owner), or, without one, in a transaction
    of its own that puts the file in place when the block ends."""
    if transaction is not None:
        with transaction.stage(dest, verify, needs_bytes=needs_bytes) as tmp:
            yield tmp
        return
    with OutputTransaction() as own:
        with own.stage(dest, verify, needs_bytes=needs_bytes) as tmp:
            yield tmp


def _remove_quietly(path: Path) -> None:
    with contextlib.suppress(OSError):
        Path(path).unlink(missing_ok=True)


# ------------------------------------------------------------------------------------------------ verifiers
def verify_text(text: str) -> Verifier:
    """A verifier that reads a UTF-8 text file back and compares it with ``text``."""

    def check(tmp: Path) -> None:
        if tmp.read_text(encoding="utf-8") != text:
            raise ValueError("the written file differs from what was written (truncated)")

    return check


def verify_image(expected) -> Verifier:
    """A verifier that reads an image (NIfTI, NRRD, MHA) back with SimpleITK and compares size, geometry and every voxel
    with ``expected`` (a SimpleITK image). A NIfTI is first checked to hold all the bytes its header promises (ITK
    reads a truncated file, or a truncated gzip stream, without an error)."""
    import numpy as np
    import SimpleITK as sitk

    def check(tmp: Path) -> None:
        from .errors import InputError
        from .imageio import _check_nifti_complete

        if tmp.name.lower().endswith((".nii", ".nii.gz")):
            try:
                _check_nifti_complete(tmp)
            except InputError:
                raise ValueError("the written file is incomplete (it holds less data than its header says)") from None
        try:
            back = sitk.ReadImage(str(tmp))
        except RuntimeError:
            raise ValueError("the written file cannot be read back") from None
        if back.GetSize() != expected.GetSize() or not np.allclose(back.GetSpacing(), expected.GetSpacing(), rtol=1e-5):
            raise ValueError("the written file does not read back with the image's size and spacing")
        if not np.array_equal(sitk.GetArrayViewFromImage(back), sitk.GetArrayViewFromImage(expected)):
            raise ValueError("the voxels read back differ from those written")

    return check
