"""Reading CT scans and writing segmentations (pipeline steps 1 and 7).

Reading goes through SimpleITK: NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) and DICOM series
(a folder, searched recursively, or one file of the series). The returned image keeps the file's geometry in
SimpleITK terms: size/spacing in (x, y, z) order, origin and direction in LPS physical space.

Writing: a multi-label map (NIfTI/NRRD), a 3D Slicer ``.seg.nrrd`` (via ``slicerio``), one binary NIfTI mask per class,
a DICOM SEG (via ``highdicom``) and a JSON summary. Every file goes through :mod:`~UniversalSegLib.output_safety`:
never over an input, written under a temporary name in its destination folder, fsynced, read back and compared with
what was meant, and only then renamed into place, so that a failure (a full disk, a signal) never leaves a partial
output behind and never loses the previous file.

Every problem with the user's input or output path raises :class:`~UniversalSegLib.errors.InputError` with one line
that says what is wrong and what to do.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import logging
import os
import re
import struct
import tempfile
import warnings
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk

from .errors import InputError, printable
from .formats import IMAGE_SUFFIXES, OUTPUT_FORMATS, image_stem, output_format, with_format_suffix
from .output_safety import OutputPlan, OutputTransaction, check_regular_input, safe_output, verify_image, verify_text

if TYPE_CHECKING:
    from .result import SegmentationResult

logger = logging.getLogger(__name__)

__all__ = [
    "OUTPUT_FORMATS",
    "IMAGE_SUFFIXES",
    "image_stem",
    "is_dicom_file",
    "read_image",
    "check_ct_intensities",
    "is_dicom_series",
    "dicom_series_files",
    "output_format",
    "with_format_suffix",
    "check_writable",
    "write_image",
    "write_label_map",
    "write_seg_nrrd",
    "write_split_masks",
    "write_dicom_seg",
    "write_summary",
    "write_statistics",
    "plan_outputs",
    "write_outputs",
    "split_mask_paths",
    "nifti_file_bytes",
    "read_seg_nrrd",
]

# DICOM objects that are not images (a SEG or RTSTRUCT next to the CT must not be read as the scan).
NON_IMAGE_MODALITIES = {"SEG", "RTSTRUCT", "SR", "PR", "KO", "RTPLAN", "RTRECORD", "REG", "DOC", "RWV"}

# DICOM tags kept on the returned image: Modality (checked by check_ct_intensities), SeriesInstanceUID.
_KEPT_TAGS = ("0008|0060", "0020|000e")

# CT intensity check: a CT in Hounsfield units has air (about -1000) or lung (about -850) below this value...
_CT_LOW_HU = -300.0
# ...in at least this fraction of its voxels (the tightest real crop in ../shared, a CT angiography, has 3 %)...
_CT_MIN_LOW_FRACTION = 1e-4
# ...and spans at least this many HU (normalised 0..1 or z-scored images do not).
_CT_MIN_RANGE = 200.0


# ----------------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------------


def read_image(
    path: str | Path,
    *,
    frame: int | None = None,
    skip_unreadable_slices: bool = False,
    allow_irregular_slices: bool = False,
    notes: list[str] | None = None,
) -> sitk.Image:
    """Read a CT volume as a 3-D SimpleITK image with its geometry.

    Args:
        path: a NIfTI/NRRD/MetaImage file, a folder holding a DICOM series (the series with most files is read when
            there are several; a warning names it), or one DICOM file (its whole series is read).
        frame: for a 4-D image (e.g. a time series), the 0-based index of the 3-D frame to segment.
        skip_unreadable_slices: segment a DICOM series without its unreadable (truncated, corrupt) files instead of
            refusing it; a warning is logged and added to ``notes``.
        allow_irregular_slices: read a DICOM series whose slices are unevenly spaced (a missing slice) instead of
            refusing it (ITK then assumes the first gap everywhere); a warning goes to ``notes``.
        notes: list that receives the warnings meant for the run's summary.

    Returns:
        a 3-D image, int16 when the voxel values are integers that fit, float32 otherwise; size (x, y, z), LPS geometry.
        A DICOM series carries the tags ``0008|0060`` (Modality) and ``0020|000e`` (SeriesInstanceUID) as metadata.

    Raises:
        InputError: missing path, not a regular file (a FIFO), unreadable/corrupt/truncated file, not an image, 2-D
            image, 4-D image without a frame, frame out of range, more than one value per voxel (RGB/vector),
            NaN/infinite values, a DICOM series with unreadable files or missing slices (unless allowed).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"input '{printable(path)}' does not exist; check the path")
    check_regular_input(path)
    if path.is_dir() or is_dicom_file(path):
        notes = notes if notes is not None else []
        image = _read_dicom(path, skip_unreadable_slices, allow_irregular_slices, notes)
    else:
        image = _read_file(path)
    tags = {key: image.GetMetaData(key) for key in _KEPT_TAGS if image.HasMetaDataKey(key)}
    image = _to_scan_pixel_type(_to_3d(image, path, frame), path)
    for key, value in tags.items():  # Extract and Cast drop metadata
        image.SetMetaData(key, value)
    return image


def is_dicom_series(path: str | Path) -> bool:
    """Whether ``path`` is a DICOM file or a folder that holds (in it or below it) at least one DICOM image series."""
    path = Path(path).expanduser()
    if path.is_file():
        return is_dicom_file(path)
    if path.is_dir():
        return bool(_dicom_series_in_folder(path))
    return False


def dicom_series_files(path: str | Path) -> list[Path]:
    """Files of the DICOM series that :func:`read_image` reads for ``path`` (a folder or one file of the series),
    in the slice order SimpleITK/GDCM uses."""
    path = Path(path).expanduser()
    if not path.exists():
        raise InputError(f"DICOM input '{path}' does not exist; check the path")
    if path.is_file():
        if not is_dicom_file(path):
            raise InputError(f"'{path}' is not a DICOM file; pass a DICOM series folder or one of its files")
        header = dicom_header(path)
        _refuse_non_image(header, path)
        uid = str(header.get("SeriesInstanceUID", ""))
        files = list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(path.parent), uid)) if uid else []
        return [Path(f) for f in files] or [path]
    series = _dicom_series_in_folder(path)
    if not series:
        raise InputError(
            f"folder '{path}' holds no DICOM image series; pass a NIfTI/NRRD/MHA file or a folder of DICOM slices"
        )
    uid, files = max(series.items(), key=lambda item: len(item[1]))
    if len(series) > 1:
        others = ", ".join(f"{u} ({len(f)} files)" for u, f in series.items() if u != uid)
        logger.warning(
            "'%s' holds %d DICOM series; reading series %s (%d files, the most); also found: %s. "
            "Pass the folder of one series to choose another.",
            path,
            len(series),
            uid,
            len(files),
            others,
        )
    return files


def check_ct_intensities(image: sitk.Image, *, force: bool = False, name: str = "the input") -> None:
    """Refuse images that do not look like a CT in Hounsfield units (an MR, a PET, a normalised image).

    A CT holds air or lung below -300 HU and spans over a thousand HU; an MR has no negative values (or, normalised,
    spans a few units). A DICOM series whose Modality tag is not CT is refused too. ``force`` skips the check.

    Raises:
        InputError: "... does not look like a CT in Hounsfield units (intensity range a..b: why); pass --force ...".
    """
    if force:
        return
    array = sitk.GetArrayViewFromImage(image)
    lo, hi = float(array.min()), float(array.max())
    modality = image.GetMetaData("0008|0060").strip() if image.HasMetaDataKey("0008|0060") else ""
    reason = None
    if modality and modality.upper() != "CT":
        reason = f"DICOM modality {modality}, not CT"
    elif hi - lo < _CT_MIN_RANGE:
        reason = f"spans only {hi - lo:g}, a CT spans over 1000 HU"
    elif np.count_nonzero(array < _CT_LOW_HU) < max(1, _CT_MIN_LOW_FRACTION * array.size):
        reason = f"no air or lung below {_CT_LOW_HU:g} HU"
    elif hi < _CT_LOW_HU:
        reason = "no soft tissue, only air"
    if reason:
        raise InputError(
            f"{name} does not look like a CT in Hounsfield units (intensity range {lo:g}..{hi:g}: {reason}); "
            "pass --force to segment anyway"
        )


def _read_file(path: Path) -> sitk.Image:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        if "Unable to determine ImageIO reader" in str(error):
            raise InputError(
                f"'{path}' is not an image file SimpleITK can read; use NIfTI (.nii.gz), NRRD, MHA/MHD or a DICOM "
                "series folder"
            ) from None
        reason: str | None = _itk_reason(error) or "the file is corrupt"
        raise InputError(f"cannot read '{path}': {reason}; re-export or re-copy the scan") from None
    _check_header(path, reader.GetDimension(), reader.GetSize(), reader.GetNumberOfComponents(), reader.GetPixelID())
    if path.name.lower().endswith((".nii", ".nii.gz")):
        # ITK fills a truncated NIfTI with zeros without an error: check the data is all there first...
        _check_nifti_complete(path)
        # ...and it reads NaN voxels of a float NIfTI as 0 without a warning: look at the file's own values.
        if _nifti_has_nonfinite(path):
            raise _nonfinite_error(path)
    try:
        return reader.Execute()
    except RuntimeError as error:
        reason = _itk_reason(error)
        raise InputError(
            f"cannot read '{path}': the file is truncated or corrupt{f' ({reason})' if reason else ''}; "
            "re-export or re-copy it"
        ) from None


def _read_dicom(path: Path, skip_unreadable: bool, allow_irregular: bool, notes: list[str]) -> sitk.Image:
    files = dicom_series_files(path)
    header = dicom_header(files[0])
    _refuse_non_image(header, files[0])
    _check_series_complete(path, files, str(header.get("SeriesInstanceUID", "")), skip_unreadable, notes)
    _check_slice_spacing(path, files, allow_irregular, notes)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames([str(f) for f in files])
    try:
        image = reader.Execute()
    except RuntimeError as error:
        reason = _itk_reason(error) or "a file is truncated or corrupt"
        raise InputError(f"cannot read the DICOM series in '{path}': {reason}; check the files") from None
    _check_header(
        path, image.GetDimension(), image.GetSize(), image.GetNumberOfComponentsPerPixel(), image.GetPixelID()
    )
    for tag, keyword in (("0008|0060", "Modality"), ("0020|000e", "SeriesInstanceUID")):
        value = header.get(keyword)
        if value:
            image.SetMetaData(tag, str(value))
    return image


def _unreadable_series_files(files: list[Path], uid: str) -> list[Path]:
    """DICOM files beside the series' files that GDCM left out of every series: they carry this series' UID, or no
    readable header at all (a truncated or corrupt slice). Other series, DICOMDIR and hidden files are not counted."""
    listed = {f.resolve() for f in files}
    folders = sorted({f.parent for f in files})
    others: set[Path] = set()
    for folder in folders:
        for other_uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)):
            if other_uid != uid:
                others.update(
                    Path(f).resolve() for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), other_uid)
                )
    bad = []
    for folder in folders:
        for entry in sorted(folder.iterdir()):
            if entry.name.startswith(".") or entry.name.upper() == "DICOMDIR" or not entry.is_file():
                continue
            real = entry.resolve()
            if real in listed or real in others or not is_dicom_file(entry):
                continue
            header = dicom_header(entry)
            entry_uid = str(header.get("SeriesInstanceUID", "")) if header is not None else ""
            if header is not None and str(header.get("MediaStorageSOPClassUID", "")) == "1.2.840.10008.1.3.10":
                continue  # a DICOMDIR under another name
            if entry_uid in ("", uid):
                bad.append(entry)
    return bad


def _check_series_complete(path: Path, files: list[Path], uid: str, skip: bool, notes: list[str]) -> None:
    bad = _unreadable_series_files(files, uid)
    if not bad:
        return
    names = ", ".join(printable(f.name) for f in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
    if not skip:
        raise InputError(
            f"the DICOM series in '{printable(path)}' has {len(bad)} unreadable file{'s' if len(bad) > 1 else ''} "
            f"({names}: truncated or corrupt); re-copy the series, or pass --skip-unreadable-slices to segment the "
            f"other {len(files)} slices"
        )
    message = f"skipped {len(bad)} unreadable DICOM file{'s' if len(bad) > 1 else ''} of the series: {names}"
    logger.warning("%s", message)
    notes.append(message)


def _check_slice_spacing(path: Path, files: list[Path], allow: bool, notes: list[str]) -> None:
    """Refuse a series whose slice positions are not evenly spaced (a missing slice, a duplicate, a gap): ITK would
    place every slice as if the first gap held throughout."""
    if len(files) < 3:
        return
    headers = [dicom_header(f) for f in files]
    try:
        orientation = np.asarray(headers[0].ImageOrientationPatient, dtype=float)
        normal = np.cross(orientation[:3], orientation[3:])
        positions = np.sort([float(np.dot(normal, np.asarray(h.ImagePositionPatient, dtype=float))) for h in headers])
    except (AttributeError, TypeError, ValueError):
        return  # no geometry in the headers: nothing to check against
    gaps = np.diff(positions)
    typical = float(np.median(gaps))
    uneven = typical <= 1e-3 or float(np.max(np.abs(gaps - typical))) > max(1e-3, 0.01 * typical)
    if not uneven:
        return
    message = (
        f"the DICOM series in '{printable(path)}' is unevenly spaced: slice gaps from {float(gaps.min()):.4g} to "
        f"{float(gaps.max()):.4g} mm (a missing or duplicate slice?)"
    )
    if not allow:
        raise InputError(
            message + "; re-export the whole series, or pass --allow-irregular-slices to segment it anyway"
        )
    logger.warning("%s; segmenting it as if evenly spaced", message)
    notes.append(message + "; segmented as if evenly spaced")


def _check_header(path: Path, dimension: int, size: tuple[int, ...], components: int, pixel_id: int) -> None:
    """Refuse what is not a scalar 3-D (or 4-D) volume, from the header alone (before reading the voxels)."""
    if components > 1 or pixel_id in (sitk.sitkComplexFloat32, sitk.sitkComplexFloat64):
        kind = "colour (RGB)" if components in (3, 4) else "vector or complex"
        raise InputError(
            f"'{path}' is a {kind} image with {max(components, 2)} values per voxel; a CT has one intensity per voxel "
            "(pass the original grey-scale scan)"
        )
    spatial = [int(s) for s in size[:3]]
    if dimension < 3 or min(spatial) <= 1:
        raise InputError(
            f"'{path}' is a 2-D image (size {'x'.join(map(str, size))}); UniversalSeg needs a 3-D CT volume "
            "(a NIfTI/NRRD/MHA volume or a folder with the whole DICOM series)"
        )
    if dimension > 4:
        raise InputError(f"'{path}' is a {dimension}-D image; UniversalSeg needs a 3-D CT volume")


def _to_3d(image: sitk.Image, path: Path, frame: int | None) -> sitk.Image:
    frames = image.GetSize()[3] if image.GetDimension() == 4 else 1
    if frame is None:
        if frames > 1:
            raise InputError(
                f"'{path}' is a 4-D image with {frames} frames; pass --frame N (0..{frames - 1}) to choose the 3-D "
                "frame to segment"
            )
        frame = 0
    if not 0 <= frame < frames:
        raise InputError(
            f"frame {frame} is out of range: '{path}' has {frames} frame{'s' if frames > 1 else ''}; "
            f"pass --frame between 0 and {frames - 1}"
        )
    if image.GetDimension() == 4:
        size = list(image.GetSize())
        image = sitk.Extract(image, size[:3] + [0], [0, 0, 0, frame])
    return image


def _to_scan_pixel_type(image: sitk.Image, path: Path) -> sitk.Image:
    """int16 for integer scans whose values fit (half the memory of float32), float32 otherwise."""
    pixel_id = image.GetPixelID()
    if pixel_id == sitk.sitkInt16:
        return image
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.integer):
        if array.size and array.min() >= -32768 and array.max() <= 32767:
            return sitk.Cast(image, sitk.sitkInt16)
        return sitk.Cast(image, sitk.sitkFloat32)
    if not np.isfinite(array).all():
        raise _nonfinite_error(path)
    return image if pixel_id == sitk.sitkFloat32 else sitk.Cast(image, sitk.sitkFloat32)


def _nonfinite_error(path: Path) -> InputError:
    return InputError(f"'{printable(path)}' contains NaN or infinite voxel values; fix or re-export the scan")


def _nifti_has_nonfinite(path: Path) -> bool:
    """Whether a float32/float64 NIfTI file holds NaN or infinite voxels, read from the file itself in chunks."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        head = f.read(544)
        dtype, offset = _nifti_float_layout(head)
        if dtype is None:
            return False
        f.seek(offset)
        rest = b""
        while True:
            chunk = f.read(1 << 22)
            if not chunk:
                return False
            data = rest + chunk
            usable = len(data) - len(data) % dtype.itemsize
            if not np.isfinite(np.frombuffer(data[:usable], dtype=dtype)).all():
                return True
            rest = data[usable:]


def _nifti_float_layout(head: bytes) -> tuple[np.dtype | None, int]:
    """(voxel dtype, data offset) of a NIfTI-1/2 header when its voxels are float32/float64, else (None, 0)."""
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:
            datatype = struct.unpack(endian + "h", head[70:72])[0]
            offset = int(struct.unpack(endian + "f", head[108:112])[0])
            break
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:
            datatype = struct.unpack(endian + "h", head[12:14])[0]
            offset = int(struct.unpack(endian + "q", head[168:176])[0])
            break
    else:
        return None, 0
    kind = {16: "f4", 64: "f8"}.get(datatype)  # NIFTI_TYPE_FLOAT32, NIFTI_TYPE_FLOAT64
    return (np.dtype(endian + kind), offset) if kind else (None, 0)


def _itk_reason(error: BaseException) -> str | None:
    """The informative part of an ITK exception message on one line, or None when it says nothing useful."""
    text = str(error)
    for marker in ("ITK ERROR:", "sitk::ERROR:", "Description:"):
        if marker in text:
            text = text.rsplit(marker, 1)[1]
    if "[nrrd]" in text:  # teem nests its messages: the last one is the specific cause
        text = text.rsplit("[nrrd]", 1)[1]
    text = re.sub(r"\w+ImageIO\(0x[0-9a-f]+\):\s*", "", text)
    text = re.sub(r"\s+", " ", text).strip().rstrip(".")
    # MetaImage reports a stale errno ("Reason: No such file or directory") for a short file.
    if not text or "No such file or directory" in text:
        return None
    return text[:160]


def _check_nifti_complete(path: Path) -> None:
    """Raise InputError when a NIfTI file holds fewer bytes than its header promises (truncated download/copy)."""
    gz = path.name.lower().endswith(".gz")
    try:
        with open(path, "rb") as f:
            if gz:
                head, total = _gunzip_head_and_length(f, 544, path)
            else:
                head = f.read(544)
                total = os.fstat(f.fileno()).st_size
    except OSError as error:
        raise InputError(f"cannot read '{path}': {error.strerror}; check the file's permissions") from None
    expected = _nifti_expected_bytes(head)
    if expected is None:
        raise InputError(f"cannot read '{path}': it has no valid NIfTI header; re-export or re-copy the scan")
    if total < expected:
        raise InputError(
            f"cannot read '{path}': the file is truncated ({total} of {expected} bytes of image data); "
            "re-export or re-copy the scan"
        )


def _gunzip_head_and_length(f, head_bytes: int, path: Path) -> tuple[bytes, int]:
    """Stream-decompress a (possibly multi-member) gzip file: its first bytes and its decompressed length.

    Raises InputError when the data is corrupt or the stream ends inside a member (a truncated file).
    """
    head, total = b"", 0
    decompressor, pending, trailing = zlib.decompressobj(16 + zlib.MAX_WBITS), False, False
    try:
        while not trailing:
            chunk = f.read(1 << 20)
            if not chunk:
                break
            while chunk:
                pending = True
                out = decompressor.decompress(chunk)
                total += len(out)
                if len(head) < head_bytes:
                    head += out[: head_bytes - len(head)]
                chunk = b""
                if decompressor.eof:
                    chunk = decompressor.unused_data
                    decompressor, pending = zlib.decompressobj(16 + zlib.MAX_WBITS), False
                    if chunk and not chunk.startswith(b"\x1f\x8b"):
                        trailing = True  # padding after the last member: ignored, as gzip does
                        chunk = b""
    except zlib.error as error:
        raise InputError(f"cannot read '{path}': the gzip data is corrupt ({error}); re-export or re-copy it") from None
    if pending:
        raise InputError(f"cannot read '{path}': the file is truncated (the gzip stream ends early); re-copy it")
    return head, total


def _nifti_expected_bytes(head: bytes) -> int | None:
    """vox_offset + voxel data size from a NIfTI-1 or NIfTI-2 header (either byte order); None if not NIfTI."""
    for endian in "<>":
        if len(head) >= 348 and struct.unpack(endian + "i", head[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", head[40:56])
            bitpix = struct.unpack(endian + "h", head[72:74])[0]
            vox_offset = int(struct.unpack(endian + "f", head[108:112])[0])
            break
        if len(head) >= 540 and struct.unpack(endian + "i", head[:4])[0] == 540:
            dims = struct.unpack(endian + "8q", head[16:80])
            bitpix = struct.unpack(endian + "h", head[14:16])[0]
            vox_offset = struct.unpack(endian + "q", head[168:176])[0]
            break
    else:
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0:
        return None
    voxels = int(np.prod([max(int(d), 1) for d in dims[1 : ndim + 1]], dtype=np.int64))
    return int(vox_offset) + voxels * bitpix // 8


def is_dicom_file(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            preamble = f.read(132)
    except OSError:
        return False
    if preamble[128:132] == b"DICM":
        return True
    # Old DICOM files without the preamble: let pydicom decide, but only for files named like DICOM.
    if path.suffix.lower() in (".dcm", ".dicom", ".ima"):
        return dicom_header(path) is not None
    return False


def dicom_header(path: Path):
    import pydicom

    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True, force=True)
    except Exception:  # noqa: BLE001 - pydicom raises many kinds of error for a bad file
        return None


def _refuse_non_image(header, path: Path) -> None:
    if header is None:
        raise InputError(f"cannot read '{path}' as DICOM; check that it is a DICOM image file")
    modality = str(header.get("Modality", "")).upper()
    if modality in NON_IMAGE_MODALITIES:
        raise InputError(
            f"'{path}' is a DICOM {modality} object, not an image series; pass the folder of the CT series"
        )


def _dicom_series_in_folder(folder: Path) -> dict[str, list[Path]]:
    """Image series found in ``folder`` and below: SeriesInstanceUID -> files in GDCM slice order."""
    uids: list[str] = []
    for root, _dirs, names in os.walk(folder):
        # Ask GDCM only about folders with a DICOM-looking file (it warns on stderr about every other folder).
        if not any(is_dicom_file(Path(root, name)) for name in names):
            continue
        for uid in sitk.ImageSeriesReader.GetGDCMSeriesIDs(root):
            if uid not in uids:
                uids.append(uid)
    series: dict[str, list[Path]] = {}
    for uid in uids:
        files = [Path(f) for f in sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), uid, False, True)]
        if not files:
            continue
        header = dicom_header(files[0])
        if header is None or str(header.get("Modality", "")).upper() in NON_IMAGE_MODALITIES:
            continue
        series[uid] = files
    return series


# ----------------------------------------------------------------------------------------------------------------------
# Output paths (formats and suffixes: formats.py)
# ----------------------------------------------------------------------------------------------------------------------


def check_writable(path: str | Path, *, is_folder: bool = False) -> None:
    """Raise InputError, before any computation, when the output ``path`` (a file, or a folder if ``is_folder``) cannot
    be written. Missing parent folders are fine when the nearest existing one is writable (they are created on write).

    Writability is probed with a real temporary file: permission bits do not tell (root, read-only mounts).
    """
    path = Path(path).expanduser()
    if path.exists() and path.is_dir() != is_folder:
        what = "a folder" if path.is_dir() else "a file"
        hint = f"give a file name such as '{path / 'segmentation.nii.gz'}'" if path.is_dir() else "choose a folder path"
        raise InputError(f"output '{path}' is {what}; {hint}")
    probe = path if is_folder else path.parent
    probe = probe if str(probe) else Path(".")
    while not probe.exists() and probe.parent != probe:
        probe = probe.parent
    if not probe.is_dir():
        raise InputError(f"cannot write output '{path}': '{probe}' is a file, not a folder; choose another output path")
    try:
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as error:
        raise InputError(
            f"cannot write output '{path}': folder '{probe}' is not writable ({error.strerror}); "
            "choose another output path"
        ) from None


# ----------------------------------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------------------------------


def _standalone_check(result: "SegmentationResult", paths: list[Path], transaction: OutputTransaction | None) -> None:
    """A writer called on its own (not from :func:`write_outputs`, which checks all outputs at once) refuses to write
    over the scan the result was made from."""
    if transaction is None:
        plan = OutputPlan().protect(result.input_path)
        for path in paths:
            plan.add(path)


def nifti_file_bytes(size: tuple[int, ...], bytes_per_voxel: int) -> int:
    """Size of an uncompressed NIfTI-1 file of an image of ``size`` voxels as SimpleITK writes it: a 352-byte header
    and the voxel data."""
    return 352 + int(np.prod(size, dtype=np.int64)) * bytes_per_voxel


def write_image(
    image: sitk.Image, path: Path, transaction: OutputTransaction | None = None, *, compress: bool = True
) -> Path:
    """Write ``image`` (any format SimpleITK writes, from the suffix) safely: temporary file, fsync, read back and
    compared voxel by voxel, atomic rename; staged in ``transaction`` when given.

    SimpleITK's NIfTI writer does not report a full disk: the read-back is what catches a short file."""
    needs = (
        nifti_file_bytes(image.GetSize(), image.GetSizeOfPixelComponent() * image.GetNumberOfComponentsPerPixel())
        if path.name.lower().endswith(".nii")
        else None
    )
    with safe_output(path, verify_image(image), transaction, needs_bytes=needs) as tmp:
        sitk.WriteImage(image, str(tmp), useCompression=compress)
    return path


def write_label_map(
    result: "SegmentationResult",
    path: str | Path,
    fmt: str | None = None,
    *,
    transaction: OutputTransaction | None = None,
) -> Path:
    """Write the multi-label map (0 background, value = catalog index, tumor over organ) on the input's grid.

    ``fmt`` is "nii" or "nrrd" (default: from the suffix). uint8 when all indices are < 256, uint16 otherwise.
    ``transaction``: stage the file in it (put in place at its commit) instead of writing it at once.
    """
    path = Path(path).expanduser()
    fmt = output_format(path, fmt)
    if fmt not in ("nii", "nrrd"):
        raise InputError(f"a label map is written as nii or nrrd, not {fmt}")
    path = with_format_suffix(path, fmt)
    _standalone_check(result, [path], transaction)
    return write_image(result.label_image(), path, transaction)


def _segment_layers(result: "SegmentationResult") -> tuple[np.ndarray, dict[int, int]]:
    """Pack the class masks into as few label layers as possible without overlaps (a class goes to the first layer
    where it overlaps nothing, as 3D Slicer does). Returns the (layers, z, y, x) array, value = catalog index, and
    the layer of each class."""
    dtype = np.uint8 if max(result.masks, default=0) < 256 else np.uint16
    layers: list[np.ndarray] = []
    layer_of: dict[int, int] = {}
    for index in sorted(result.masks):
        mask = result.masks[index]
        for number, layer in enumerate(layers):
            if not mask.array.size or not layer[mask.slices()][mask.array].any():
                break
        else:
            layers.append(np.zeros(result.geometry.array_shape, dtype=dtype))
            number, layer = len(layers) - 1, layers[-1]
        if mask.array.size:
            layer[mask.slices()][mask.array] = index
        layer_of[index] = number
    if not layers:
        layers.append(np.zeros(result.geometry.array_shape, dtype=dtype))
    return np.stack(layers), layer_of


def _ijk_to_lps(geometry) -> np.ndarray:
    """4x4 matrix from voxel index (i, j, k) = (x, y, z) to LPS millimetres."""
    matrix = np.eye(4)
    direction = np.asarray(geometry.direction, dtype=float).reshape(3, 3)
    matrix[:3, :3] = direction * np.asarray(geometry.spacing, dtype=float)[None, :]
    matrix[:3, 3] = geometry.origin
    return matrix


def write_seg_nrrd(
    result: "SegmentationResult", path: str | Path, *, transaction: OutputTransaction | None = None
) -> Path:
    """Write a 3D Slicer segmentation (``.seg.nrrd``) with ``slicerio``.

    One segment per class: ID = file stem, name = display name, colour = catalog colour (0..1 floats), terminology =
    :meth:`ClassCatalog.slicer_terminology`, label value = catalog index. Overlapping classes (a tumor in its organ)
    go to further layers (a 4-D ``list domain domain domain`` NRRD), so every class mask is stored exactly.
    Voxels are written in (i, j, k) = (x, y, z) order with the input's LPS geometry.
    """
    import slicerio
    from slicerio.segmentation import terminology_entry_from_string

    path = with_format_suffix(Path(path).expanduser(), "seg.nrrd")
    if output_format(path) != "seg.nrrd":
        raise InputError(f"a Slicer segmentation must be named *.seg.nrrd, not '{printable(path.name)}'")
    _standalone_check(result, [path], transaction)
    layers, layer_of = _segment_layers(result)
    size = result.geometry.size
    full_extent = [0, size[0] - 1, 0, size[1] - 1, 0, size[2] - 1]
    segments = []
    for info, _mask in result:
        segments.append(
            {
                "id": info.file_stem,
                "name": info.name,
                "nameAutoGenerated": False,
                "color": [c / 255.0 for c in info.color],
                "colorAutoGenerated": False,
                "labelValue": info.index,
                "layer": layer_of[info.index],
                # Full extent for every segment: older Slicer versions read a whole layer with its first segment's extent.
                "extent": full_extent,
                "terminology": terminology_entry_from_string(result.catalog.slicer_terminology(info)),
            }
        )
    # (layers, z, y, x) -> (layers, x, y, z): slicerio/pynrrd write axis 0 fastest ("F" index order).
    voxels = layers.transpose(0, 3, 2, 1) if layers.shape[0] > 1 else layers[0].transpose(2, 1, 0)
    segmentation = {
        "voxels": voxels,
        "ijkToLPS": _ijk_to_lps(result.geometry),
        "containedRepresentationNames": ["Binary labelmap"],
        "masterRepresentation": "Binary labelmap",
        "referenceImageExtentOffset": [0, 0, 0],
        "segments": segments,
    }
    with safe_output(path, _verify_seg_nrrd(voxels), transaction) as tmp:
        slicerio.write_segmentation(str(tmp), segmentation, compression_level=6)
    return path


def _verify_seg_nrrd(voxels: np.ndarray):
    """Read the NRRD back (pynrrd checks the gzip stream) and compare every voxel with what was written."""

    def check(tmp: Path) -> None:
        import nrrd

        try:
            data, _header = nrrd.read(str(tmp))
        except Exception:  # noqa: BLE001 - pynrrd/zlib raise several kinds for a short file
            raise ValueError("the written file cannot be read back (it is incomplete)") from None
        if data.shape != voxels.shape or not np.array_equal(data, voxels):
            raise ValueError("the voxels read back differ from those written")

    return check


def split_mask_paths(result: "SegmentationResult", folder: str | Path) -> list[Path]:
    """The files :func:`write_split_masks` writes: ``<folder>/<file_stem>.nii.gz`` per class of ``result``."""
    folder = Path(folder).expanduser()
    return [folder / f"{info.file_stem}.nii.gz" for info, _mask in result]


def write_split_masks(
    result: "SegmentationResult", folder: str | Path, *, transaction: OutputTransaction | None = None
) -> list[Path]:
    """Write one binary uint8 NIfTI mask per class, ``<folder>/<file_stem>.nii.gz`` (TotalSegmentator layout), on the
    input's grid. Overlaps are kept (a voxel can be in its organ's and its tumor's mask). All masks are put in place
    together, or none (the previous files are kept)."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise InputError(f"split-mask output '{printable(folder)}' is a file; give a folder path")
    paths = split_mask_paths(result, folder)
    _standalone_check(result, paths, transaction)
    with OutputTransaction() if transaction is None else contextlib.nullcontext(transaction) as txn:
        for (info, _mask), path in zip(result, paths):
            write_image(result.mask_image(info.index), path, txn)
    return paths


def write_summary(
    result: "SegmentationResult",
    path: str | Path,
    *,
    transaction: OutputTransaction | None = None,
    warnings: list[str] | None = None,
) -> Path:
    """Write ``result.summary()`` as indented JSON (with a ``"warnings"`` list when ``warnings`` are given)."""
    path = Path(path).expanduser()
    _standalone_check(result, [path], transaction)
    summary = result.summary()
    if warnings:
        summary["warnings"] = list(warnings)
    text = json.dumps(summary, indent=2, default=_json_default) + "\n"
    with safe_output(path, verify_text(text), transaction) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_statistics(
    result: "SegmentationResult",
    path: str | Path,
    image: sitk.Image,
    *,
    transaction: OutputTransaction | None = None,
) -> Path:
    """Write ``result.statistics(image)`` (per class volume, mean/median HU, uncertainty) as CSV or JSON, by the
    suffix of ``path`` (``.csv`` / ``.json``)."""
    import csv
    import io

    path = Path(path).expanduser()
    _standalone_check(result, [path], transaction)
    rows = result.statistics(image)
    if path.name.lower().endswith(".json"):
        text = json.dumps(rows, indent=2) + "\n"
    else:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else ["index", "name"], lineterminator="\n")
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
        text = buffer.getvalue()
    with safe_output(path, verify_text(text), transaction) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, tuple)):
        return list(value)
    return str(value)


def _software_version() -> str:
    from . import __version__

    return __version__


def write_dicom_seg(
    result: "SegmentationResult",
    path: str | Path,
    source_dicom_folder: str | Path | None,
    *,
    transaction: OutputTransaction | None = None,
) -> Path:
    """Write a DICOM Segmentation (BINARY) that references the source CT series, with ``highdicom``.

    One segment per class, labelled with its display name, with the catalog's SNOMED CT category/type (and laterality
    as a type modifier, anatomic region for lesions), its colour, and algorithm identification = model name and
    software version. ``source_dicom_folder`` is what the CT was read from (the series folder or one of its files); the
    same series as :func:`read_image` is used. Memory: frames x rows x columns x classes booleans.

    Raises:
        InputError: the input was not DICOM, or the series does not match the segmentation grid.
    """
    import highdicom as hd
    import pydicom
    from pydicom.sr.codedict import codes

    path = Path(path).expanduser()
    if source_dicom_folder is None or not is_dicom_series(source_dicom_folder):
        raise InputError(
            f"a DICOM SEG output needs a DICOM series input, and '{source_dicom_folder}' is not one; "
            "choose --format nii, nrrd or seg.nrrd"
        )
    if not result.masks:
        raise InputError("nothing to write: the segmentation has no classes; request at least one class")
    if transaction is None:
        OutputPlan().protect(result.input_path).protect(source_dicom_folder).add(path)
    files = dicom_series_files(source_dicom_folder)
    sources = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in files]
    slice_of = _source_slice_indices(sources, result.geometry, source_dicom_folder)

    def concept(code):
        return hd.sr.CodedConcept(value=code.code, scheme_designator=code.scheme, meaning=code.meaning)

    algorithm = hd.AlgorithmIdentificationSequence(
        name=(result.model_name or "UniversalSeg")[:64],
        family=codes.cid7162.ArtificialIntelligence,
        version=_software_version(),
        source="UniversalSeg",
    )
    descriptions = []
    infos = result.classes
    for number, info in enumerate(infos, start=1):
        description = hd.seg.SegmentDescription(
            segment_number=number,
            segment_label=info.name[:64],
            segmented_property_category=concept(info.category),
            segmented_property_type=concept(info.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_id=info.file_stem[:64],
            tracking_uid=hd.UID(),
            anatomic_regions=[concept(info.anatomic_region)] if info.anatomic_region else None,
            display_color=hd.color.CIELabColor.from_rgb(*info.color),
        )
        if info.type_modifier is not None:
            # highdicom has no argument for it; DICOM nests it in the type code item.
            description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                concept(info.type_modifier)
            ]
        descriptions.append(description)

    rows, cols = result.geometry.size[1], result.geometry.size[0]
    pixels = np.zeros((len(sources), rows, cols, max(len(infos), 1)), dtype=bool)
    for channel, info in enumerate(infos):
        mask = result.masks[info.index]
        if mask.array.size:
            pixels[:, :, :, channel] = result.mask_array(info.index).astype(bool)[slice_of]
    first = sources[0]
    extra: dict[str, Any] = {}
    if not first.get("SpecificCharacterSet"):
        extra["specific_character_set"] = None  # empty in some scanners' files: keep the default repertoire
    with warnings.catch_warnings():
        # highdicom warns about the source's patient name format, which is not ours to fix.
        warnings.filterwarnings("ignore", message=".*person name.*", category=UserWarning)
        seg = _build_segmentation(hd, sources, pixels, descriptions, result, first, extra)
    with safe_output(path, _verify_dicom(seg), transaction) as tmp:
        seg.save_as(str(tmp))
    return path


def _verify_dicom(seg) -> Any:
    """Read the DICOM file back and compare its instance UID and pixel data with what was written."""

    def check(tmp: Path) -> None:
        import pydicom

        try:
            back = pydicom.dcmread(str(tmp))
            same = back.SOPInstanceUID == seg.SOPInstanceUID and back.PixelData == seg.PixelData
        except Exception:  # noqa: BLE001 - pydicom raises many kinds for a short file
            raise ValueError("the written file cannot be read back (it is incomplete)") from None
        if not same:
            raise ValueError("the DICOM file read back differs from what was written")

    return check


def _build_segmentation(hd, sources, pixels, descriptions, result, first, extra):
    return hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=int(first.get("SeriesNumber", 0) or 0) + 1000,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="UniversalSeg",
        manufacturer_model_name=(result.model_name or "UniversalSeg")[:64],
        software_versions=_software_version(),
        device_serial_number="0",
        content_description="UniversalSeg automatic segmentation"[:64],
        content_label="UNIVERSALSEG",
        series_description=f"UniversalSeg {result.model_name}".strip()[:64],
        **extra,
    )


def _source_slice_indices(sources: list, geometry, source: Any) -> np.ndarray:
    """For each source DICOM slice, the z index of the segmentation grid it lies on (checked to match exactly)."""
    size = geometry.size
    matrix = _ijk_to_lps(geometry)
    inverse = np.linalg.inv(matrix)
    indices = []
    for ds in sources:
        if int(ds.Rows) != size[1] or int(ds.Columns) != size[0]:
            raise InputError(
                f"the DICOM series in '{source}' has {ds.Columns}x{ds.Rows} slices but the segmentation is "
                f"{size[0]}x{size[1]}; write the DICOM SEG from the same series that was segmented"
            )
        ijk = inverse @ np.r_[np.asarray(ds.ImagePositionPatient, dtype=float), 1.0]
        k = int(round(ijk[2]))
        if abs(ijk[0]) > 0.05 or abs(ijk[1]) > 0.05 or abs(ijk[2] - k) > 0.05 or not 0 <= k < size[2]:
            raise InputError(
                f"a slice of the DICOM series in '{source}' does not lie on the segmentation grid; write the DICOM SEG "
                "from the same series that was segmented"
            )
        indices.append(k)
    if len(indices) != size[2] or len(set(indices)) != size[2]:
        raise InputError(
            f"the DICOM series in '{source}' has {len(indices)} slices for a segmentation of {size[2]}; write the "
            "DICOM SEG from the same series that was segmented"
        )
    return np.asarray(indices)


def plan_outputs(
    plan: OutputPlan,
    output: str | Path,
    *,
    fmt: str | None = None,
    split_masks: str | Path | None = None,
    split_stems: list[str] | tuple[str, ...] = (),
    summary: str | Path | None = None,
    dicom_source: str | Path | None = None,
    of: str | None = None,
    stats: str | Path | None = None,
) -> tuple[Path, str]:
    """Check every output of one scan before any work starts, and reserve them in ``plan`` (whose ``protect`` ed inputs
    they must not be, and whose other outputs they must not collide with).

    Args:
        output: the main output file (its suffix, or ``fmt``, gives the format). split_masks: folder of per-class
            masks, one ``<stem>.nii.gz`` per entry of ``split_stems``. summary: JSON summary file.
        dicom_source: the DICOM series a DICOM SEG output refers to (required for ``dicom-seg``).
        of: the scan these outputs belong to, named in messages (batch runs plan many scans in one ``plan``).

    Returns:
        (the main output path, with the format's suffix added when it had none; the format).

    Raises:
        InputError / OutputError: unknown format, a DICOM SEG without a DICOM input, an unwritable folder, an output
            that is an input file, two outputs that are the same file.
    """
    output = Path(output).expanduser()
    fmt = output_format(output, fmt)
    output = with_format_suffix(output, fmt)
    if fmt == "dicom-seg" and (dicom_source is None or not is_dicom_series(dicom_source)):
        raise InputError(
            "a DICOM SEG output needs a DICOM series input; choose --format nii, nrrd or seg.nrrd for this input"
        )
    check_writable(output)
    if split_masks is not None:
        check_writable(Path(split_masks), is_folder=True)
    if summary is not None:
        check_writable(Path(summary))
    whose = f" of {printable(of)}" if of else ""
    if summary is not None:
        plan.add(summary, f"summary{whose}")
    if stats is not None:
        check_writable(Path(stats))
        plan.add(stats, f"statistics{whose}")
    if split_masks is not None:
        folder = plan.add_folder(split_masks, f"split-mask folder{whose}")
        for stem in split_stems:
            plan.add(folder / f"{stem}.nii.gz", f"split mask{whose}")
    plan.add(output, f"output{whose}")
    return output, fmt


def write_outputs(
    result: "SegmentationResult",
    output: str | Path,
    *,
    fmt: str | None = None,
    split_masks: str | Path | None = None,
    summary: str | Path | None = None,
    dicom_source: str | Path | None = None,
    warnings: list[str] | None = None,
    stats: str | Path | None = None,
    image: sitk.Image | None = None,
) -> list[Path]:
    """Write everything asked for: the main output (``fmt`` or from the suffix), optional split masks, summary
    (with ``warnings`` in it) and per-class statistics (``stats``, of ``image``: the CT).

    First every output is checked (:func:`plan_outputs`): none may be the scan ``result`` was made from or a file of
    ``dicom_source``, and no two may be the same file. Then all files are written to temporary names and verified,
    and only then put in place together (the main output last: batch runs treat it as "done"); if anything fails,
    nothing is replaced and the previous files are kept. Returns the written paths.
    """
    plan = OutputPlan().protect(result.input_path).protect(dicom_source)
    stems = [info.file_stem for info, _mask in result] if split_masks is not None else []
    output, fmt = plan_outputs(
        plan,
        output,
        fmt=fmt,
        split_masks=split_masks,
        split_stems=stems,
        summary=summary,
        dicom_source=dicom_source,
        stats=stats,
    )
    if stats is not None and image is None:
        raise InputError("statistics need the CT the result was made from (image=...)")
    with OutputTransaction() as txn:
        if summary is not None:
            write_summary(result, summary, transaction=txn, warnings=warnings)
        if stats is not None and image is not None:
            write_statistics(result, stats, image, transaction=txn)
        if split_masks is not None:
            write_split_masks(result, split_masks, transaction=txn)
        if fmt == "seg.nrrd":
            write_seg_nrrd(result, output, transaction=txn)
        elif fmt == "dicom-seg":
            write_dicom_seg(result, output, dicom_source, transaction=txn)
        else:
            write_label_map(result, output, fmt, transaction=txn)
    return txn.written


def read_seg_nrrd(path: str | Path) -> dict[str, Any]:
    """Read a ``.seg.nrrd`` back (used by tests and the Slicer module).

    Returns:
        ``{"geometry": ImageGeometry, "segments": [{"id", "name", "color" (r, g, b floats 0..1), "terminology" (Slicer
        terminology string or None), "label_value", "layer", "mask" (bool array, SimpleITK order z, y, x)}, ...]}``.
    """
    import slicerio
    from slicerio.segmentation import terminology_entry_to_string

    from .result import ImageGeometry

    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"segmentation '{path}' does not exist; check the path")
    try:
        segmentation = slicerio.read_segmentation(str(path))
    except Exception as error:  # noqa: BLE001 - pynrrd/slicerio raise several kinds
        raise InputError(f"cannot read '{path}' as a Slicer segmentation ({error}); check the file") from None
    matrix = np.asarray(segmentation["ijkToLPS"], dtype=float)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    direction = matrix[:3, :3] / spacing[None, :]
    voxels = segmentation["voxels"]
    size = tuple(int(s) for s in voxels.shape[-3:])
    geometry = ImageGeometry(
        size=size,  # type: ignore[arg-type]
        spacing=tuple(float(s) for s in spacing),  # type: ignore[arg-type]
        origin=tuple(float(o) for o in matrix[:3, 3]),  # type: ignore[arg-type]
        direction=tuple(float(d) for d in direction.ravel()),
    )
    segments = []
    for segment in segmentation.get("segments", []):
        terminology = segment.get("terminology")
        segments.append(
            {
                "id": segment.get("id"),
                "name": segment.get("name"),
                "color": tuple(segment["color"]) if "color" in segment else None,
                "terminology": terminology_entry_to_string(terminology) if terminology else None,
                "label_value": int(segment.get("labelValue", 1)),
                "layer": int(segment.get("layer", 0)),
                "mask": np.ascontiguousarray(slicerio.segment_mask(segmentation, segment).transpose(2, 1, 0)),
            }
        )
    return {"geometry": geometry, "segments": segments}
