"""Reading the engine's result (one ``.seg.nrrd``) off the GUI thread.

Slicer's ``vtkMRMLSegmentationStorageNode`` reads such a file in one call that holds Python's GIL (about 0.9 s
for 32 classes on a 512x512x300 CT), so the GUI would freeze even if it ran in a thread. This reader parses the
NRRD header itself and inflates the voxels with ``zlib`` and numpy, which release the GIL: in a worker thread it
leaves the GUI responsive. It returns each class as a bounding-box crop with its fingerprint, so that the GUI-thread
import (``UniversalSegLogic.importSteps``) only copies crops into MRML. Tests check that it reads exactly what
Slicer's storage node reads.
"""

from __future__ import annotations

import re
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from UniversalSegLib.catalog import ClassCatalog

from .process import EngineError
from .segments import cropMask, maskFingerprint


@dataclass
class ClassMask:
    """One class of a result: ``crop`` is its bool ``(K, J, I)`` bounding box (None when empty), ``start`` the
    (i, j, k) of its first voxel on the volume's grid, ``fingerprint`` :func:`maskFingerprint` of it."""

    index: int
    crop: np.ndarray | None
    start: list[int]
    fingerprint: str

    @classmethod
    def fromMask(cls, index: int, mask: np.ndarray, ijkToRas: np.ndarray) -> "ClassMask":
        """From a full ``(K, J, I)`` mask on the grid with IJK-to-RAS ``ijkToRas`` (4x4 array)."""
        crop, start = cropMask(np.asarray(mask, dtype=bool))
        return cls(index, crop, start, maskFingerprint(crop, start, ijkToRas))

    @property
    def empty(self) -> bool:
        return self.crop is None


_DTYPES = {
    "uint8": "u1",
    "uchar": "u1",
    "unsigned char": "u1",
    "uint16": "u2",
    "ushort": "u2",
    "unsigned short": "u2",
    "int16": "i2",
    "short": "i2",
    "int32": "i4",
    "int": "i4",
}
_VECTOR = re.compile(r"\(([^)]*)\)")


def readNrrdHeader(path: Path) -> tuple[dict[str, str], dict[str, str], int]:
    """(fields, key-value pairs, byte offset of the data) of an attached-header NRRD file."""
    with open(path, "rb") as stream:
        head = stream.read(1 << 20)
    end = head.find(b"\n\n")
    if not head.startswith(b"NRRD") or end < 0:
        raise EngineError(f"{path.name} is not a NRRD file (or its header is incomplete)")
    fields: dict[str, str] = {}
    pairs: dict[str, str] = {}
    for line in head[:end].decode("utf-8", errors="replace").splitlines()[1:]:
        if line.startswith("#") or not line.strip():
            continue
        if ":=" in line:
            key, value = line.split(":=", 1)
            pairs[key] = value
        elif ": " in line:
            key, value = line.split(": ", 1)
            fields[key.strip().lower()] = value.strip()
    return fields, pairs, end + 2


def _readVoxels(path: Path, offset: int, encoding: str, nbytes: int) -> np.ndarray:
    """The data bytes of a NRRD (raw or gzip), inflated in chunks into one buffer (zlib releases the GIL)."""
    out = np.empty(nbytes, dtype=np.uint8)
    filled = 0
    with open(path, "rb") as stream:
        stream.seek(offset)
        if encoding == "raw":
            filled = stream.readinto(memoryview(out))
        elif encoding in ("gzip", "gz"):
            inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
            while filled < nbytes:
                chunk = stream.read(1 << 20)
                if not chunk:
                    break
                while chunk and filled < nbytes:
                    # Small pieces: allocating and copying a piece holds the GIL (64 MiB pieces: ~85 ms).
                    piece = inflater.decompress(chunk, min(1 << 22, nbytes - filled))
                    out[filled : filled + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
                    filled += len(piece)
                    chunk = inflater.unconsumed_tail
                    if inflater.eof:
                        break
        else:
            raise EngineError(f"{path.name} uses NRRD encoding '{encoding}'; the module reads raw or gzip")
    if filled != nbytes:
        raise EngineError(f"{path.name} is incomplete ({filled} of {nbytes} bytes of voxels)")
    return out


def _fileIjkToRas(fields: dict[str, str], layered: bool) -> np.ndarray:
    space = fields.get("space", "left-posterior-superior").lower()
    vectors = [[float(v) for v in m.split(",")] for m in _VECTOR.findall(fields.get("space directions", ""))]
    origin = [float(v) for v in _VECTOR.findall(fields.get("space origin", "(0,0,0)"))[0].split(",")]
    if len(vectors) != 3:
        raise EngineError("the engine's segmentation has no 3-D voxel geometry ('space directions')")
    matrix = np.eye(4)
    matrix[:3, :3] = np.array(vectors).T
    matrix[:3, 3] = origin
    if space in ("left-posterior-superior", "lps"):
        matrix[:2] *= -1.0  # LPS -> RAS
    elif space not in ("right-anterior-superior", "ras"):
        raise EngineError(f"the engine's segmentation uses the unsupported space '{space}'")
    return matrix


def readEngineSegmentation(
    path: str | Path,
    dims: tuple[int, int, int],
    ijkToRas: np.ndarray,
    catalog: ClassCatalog,
    wanted: set[int] | None = None,
) -> dict[int, ClassMask]:
    """The classes of the engine's ``.seg.nrrd`` as :class:`ClassMask` crops, by catalog index.

    Args:
        dims: the input volume's ``(I, J, K)``; ijkToRas: its 4x4 IJK-to-RAS array. The file must lie on that
            grid (size, spacing, axes, origin), else :class:`EngineError`.
        wanted: catalog indices to return (None: every catalog class in the file).

    Blocking, and it touches no MRML or VTK object: run it in a worker thread (:class:`BackgroundCall`).
    """
    path = Path(path)
    if not path.is_file():
        raise EngineError(f"the engine did not write its segmentation ({path})")
    fields, pairs, dataOffset = readNrrdHeader(path)
    sizes = [int(s) for s in fields.get("sizes", "").split()]
    layered = len(sizes) == 4
    # Slicer writes only the segments' extent, at this voxel offset on the reference grid (the engine: 0 0 0).
    try:
        offset = [int(v) for v in pairs.get("Segmentation_ReferenceImageExtentOffset", "0 0 0").split()][:3]
    except ValueError:
        offset = [-1]
    if (
        len(sizes) not in (3, 4)
        or len(offset) != 3
        or min(offset) < 0
        or any(o + n > d for o, n, d in zip(offset, sizes[-3:], dims))
    ):
        raise EngineError(
            f"the engine's segmentation has {tuple(sizes[-3:])} voxels but the input volume "
            f"{tuple(dims)}; the engine output does not belong to this volume"
        )
    matrix = _fileIjkToRas(fields, layered)
    expectedOrigin = ijkToRas @ np.array([*offset, 1.0])
    scale = max(1.0, float(np.abs(ijkToRas[:3, :3]).max()))
    if (
        np.abs(matrix[:3, :3] - ijkToRas[:3, :3]).max() > 1e-4 * scale
        or np.abs(matrix[:3, 3] - expectedOrigin[:3]).max() > 1e-3
    ):
        raise EngineError(
            "the engine's segmentation is not on the input volume's voxel grid (spacing, axes or origin differ)"
        )
    dtype = np.dtype(_DTYPES.get(fields.get("type", "uint8").lower(), "u1"))
    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder("<" if fields.get("endian", "little") == "little" else ">")
    count = int(np.prod(sizes))
    raw = _readVoxels(path, dataOffset, fields.get("encoding", "raw").lower(), count * dtype.itemsize)
    # NRRD's first axis is the fastest: (layers, I, J, K) in the file is a C-order (K, J, I, layers) array.
    voxels = raw.view(dtype).reshape(sizes[::-1])
    masks: dict[int, ClassMask] = {}
    n = 0
    while f"Segment{n}_ID" in pairs:
        segmentId = pairs[f"Segment{n}_ID"]
        info = catalog.find(segmentId) or catalog.find(pairs.get(f"Segment{n}_Name", ""))
        n += 1
        if info is None or (wanted is not None and info.index not in wanted):
            continue
        label = int(pairs.get(f"Segment{n - 1}_LabelValue", "1"))
        layer = int(pairs.get(f"Segment{n - 1}_Layer", "0"))
        voxelsOfLayer = voxels[..., layer] if layered else voxels
        crop, start = cropMask(voxelsOfLayer == label)
        start = [s + o for s, o in zip(start, offset)] if crop is not None else start
        masks[info.index] = ClassMask(info.index, crop, start, maskFingerprint(crop, start, ijkToRas))
    return masks


class BackgroundCall:
    """``function()`` in a daemon thread; :attr:`done` says whether it returned, :meth:`result` gives its value
    or raises its exception. For work that touches no MRML object (MRML belongs to the GUI thread)."""

    def __init__(self, function: Callable[[], Any]) -> None:
        self._function = function
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="UniversalSeg result reader")
        self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._function()
        except BaseException as exc:  # noqa: BLE001 - handed to the GUI thread by result()
            self._error = exc

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self, timeout: float | None = None) -> Any:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError("reading the engine's result did not finish in time")
        if self._error is not None:
            raise self._error
        return self._value
