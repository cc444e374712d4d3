"""Export corrected segmentations as training data: the Slicer-free part of "Export for training".

A radiologist accepts what the model got right (marks a segment reviewed), corrects what it got wrong (edits it), and
exports the scan. This module writes that scan into an export folder, next to earlier exports::

    <folder>/dataset.json                  the dataset file (``type: exported`` in a training config reads it)
    <folder>/images/<case>.nii.gz          the CT, voxels and geometry unchanged
    <folder>/labels/<case>.nii.gz          label map, value = catalog index (1 Spleen ... 32 Kidney Cyst), 0 elsewhere
    <folder>/masks/<case>/<stem>.nii.gz    one 0/1 mask per class instead of the label map, when annotated classes
                                           overlap (a tumour inside its organ) and per-class masks were allowed

Only the classes a person reviewed or edited are written and listed as ``annotated`` in the case's entry; every other
class counts as "not annotated", so partial-label training gives it no gradient (an AI mask nobody checked is not a
label). Re-exporting a scan replaces its entry and files, never duplicates them: a scan is recognised by its case ID
and by a fingerprint of its voxels and geometry. Format of ``dataset.json`` (read by :mod:`training.datasets`)::

    {"format": "universalseg-training-dataset", "format_version": 1, "label_values": "catalog",
     "name": "liver corrections", "labels": {"0": "background", "1": "Spleen", ...},
     "cases": [{"id": "scan1", "image": "images/scan1.nii.gz", "label": "labels/scan1.nii.gz",
                "annotated": ["Liver", "Spleen"], "split": "train", "provenance": {...}}, ...]}

Paths in the file are relative to its folder, so the folder can be moved or shared as a whole. The file's schema,
reader and writer live in :mod:`UniversalSegLib.dataset_json`. Arrays are in
SimpleITK order: a CT of ``(x, y, z)`` voxels is a ``(z, y, x)`` array (Slicer's ``(K, J, I)``).
"""

from __future__ import annotations

import hashlib
import json
import re
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import SimpleITK as sitk

from .catalog import ClassCatalog
from .dataset_json import (  # noqa: F401  (re-exported: the file's schema lives there)
    CASE_KEYS,
    EXPORTED_FILE,
    EXPORTED_FORMAT,
    FORMAT_VERSION,
    SPLITS,
    TrainingDataset,
    dataset_file,
    read_dataset_file,
    write_dataset_file,
)
from .errors import InputError
from .imageio import write_image
from .output_safety import OutputTransaction
from .result import ImageGeometry

_FOLDER_HINT = "choose an empty folder or an earlier export folder"
IMAGES_DIR, LABELS_DIR, MASKS_DIR = "images", "labels", "masks"
#: How a person confirmed an exported class (Slicer module segment states).
CONFIRMATIONS = ("reviewed", "edited", "manual")

_LPS_FROM_RAS = np.diag([-1.0, -1.0, 1.0])


class OverlapError(InputError):
    """Annotated classes share voxels, which one label map cannot hold; per-class masks can.

    ``overlaps``: ``(class name, class name, shared voxels)`` for every overlapping pair.
    """

    def __init__(self, message: str, overlaps: Sequence[tuple[str, str, int]]) -> None:
        super().__init__(message)
        self.overlaps = list(overlaps)


@dataclass
class ExportedClass:
    """One class of a scan that a person confirmed.

    Attributes:
        index: 1-based catalog index.
        mask: bool ``(z, y, x)`` array on the CT's voxel grid (may be empty: "checked, not there").
        confirmation: how it was confirmed, one of :data:`CONFIRMATIONS`.
        provenance: where the mask came from (model, engine version, dates, segment name ...), kept in the entry.
    """

    index: int
    mask: np.ndarray
    confirmation: str = "reviewed"
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass
class ExportReport:
    """What an export wrote.

    ``replaced``: ID of the entry this export replaced (the same scan exported before), else None.
    ``removed``: files of the replaced entry that the new one does not use (deleted).
    ``skipped``: segment name -> why it was not exported (filled by callers that choose the classes, e.g. the Slicer
    module: "AI output, not reviewed").
    """

    dataset_file: Path
    case_id: str
    image: Path
    label: Path | None
    masks: dict[str, Path]
    annotated: list[str]
    confirmations: dict[str, str]
    split: str
    replaced: str | None = None
    removed: list[Path] = field(default_factory=list)
    case_count: int = 0
    skipped: dict[str, str] = field(default_factory=dict)

    def to_text(self) -> str:
        """A few lines for a status area or a terminal."""
        what = f"{len(self.masks)} per-class masks" if self.masks else "label map"
        lines = [
            f"{'Replaced' if self.replaced else 'Added'} case '{self.case_id}' ({what}, split {self.split}) in "
            f"{self.dataset_file} - {self.case_count} case{'s' if self.case_count != 1 else ''} in the dataset.",
            "Annotated: " + ", ".join(f"{n} ({self.confirmations[n]})" for n in self.annotated) + ".",
            "All other classes count as not annotated.",
        ]
        if self.replaced and self.replaced != self.case_id:
            lines.append(f"This scan was exported before as '{self.replaced}'; that entry was replaced.")
        if self.skipped:
            lines.append("Not exported: " + "; ".join(f"{n} ({why})" for n, why in self.skipped.items()) + ".")
        return "\n".join(lines)


# ------------------------------------------------------------------------------------------------- geometry
def geometry_from_ijk_to_ras(ijk_to_ras: np.ndarray, array_shape: Sequence[int]) -> ImageGeometry:
    """SimpleITK geometry (LPS) of a voxel grid given by a 4x4 IJK-to-RAS matrix (Slicer's) and its ``(z, y, x)``
    array shape."""
    matrix = np.asarray(ijk_to_ras, dtype=float).reshape(4, 4)
    axes = matrix[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    if np.any(spacing <= 0):
        raise InputError("the volume's IJK-to-RAS matrix has a zero-length axis; fix the volume's spacing")
    direction = _LPS_FROM_RAS @ (axes / spacing)
    origin = _LPS_FROM_RAS @ matrix[:3, 3]
    z, y, x = (int(s) for s in array_shape)
    return ImageGeometry(
        (x, y, z),
        (float(spacing[0]), float(spacing[1]), float(spacing[2])),
        (float(origin[0]), float(origin[1]), float(origin[2])),
        tuple(float(d) for d in direction.ravel()),
    )


def image_from_array(array: np.ndarray, ijk_to_ras: np.ndarray) -> sitk.Image:
    """A ``(z, y, x)`` voxel array with Slicer's IJK-to-RAS geometry as a SimpleITK image (a copy; dtype kept)."""
    array = np.ascontiguousarray(array)
    if array.ndim != 3:
        raise InputError(f"a CT must be a 3-D array, got shape {array.shape}")
    return geometry_from_ijk_to_ras(ijk_to_ras, array.shape).to_image(array)


def image_fingerprint(image: sitk.Image) -> str:
    """SHA-256 of a scan's voxels (with their type) and geometry: the same scan exported again gets the same one."""
    digest = hashlib.sha256()
    geometry = {
        "size": list(image.GetSize()),
        "spacing": [round(float(s), 4) for s in image.GetSpacing()],
        "origin": [round(float(o), 3) for o in image.GetOrigin()],
        "direction": [round(float(d), 4) + 0.0 for d in image.GetDirection()],
        "type": image.GetPixelIDTypeAsString(),
    }
    digest.update(json.dumps(geometry, sort_keys=True).encode())
    digest.update(np.ascontiguousarray(sitk.GetArrayViewFromImage(image)).tobytes())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------- dataset file
def new_dataset(catalog: ClassCatalog | None = None) -> dict[str, Any]:
    """An empty dataset document."""
    return TrainingDataset.new(catalog).to_dict()


def read_dataset(folder: str | Path, catalog: ClassCatalog | None = None) -> dict[str, Any]:
    """The dataset document of an export folder (a new, empty one when it has no dataset file yet)."""
    return _read(folder, catalog).to_dict()


def _read(folder: str | Path, catalog: ClassCatalog | None = None) -> TrainingDataset:
    return read_dataset_file(folder, missing_ok=True, hint=_FOLDER_HINT, catalog=catalog)


def case_id_from_name(name: str) -> str:
    """A file-name-safe case ID from a volume name ("CT 3: abdomen" -> "CT_3_abdomen")."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "_", str(name).strip()).strip("._-")
    return text[:80] or "case"


def check_case_id(case_id: str) -> str:
    """Raise InputError unless ``case_id`` can name the case's files."""
    case_id = str(case_id).strip()
    if not case_id or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", case_id):
        raise InputError(
            f"case ID {case_id!r} cannot be used as a file name; use letters, digits, '.', '_' and '-' "
            f"(e.g. {case_id_from_name(case_id)!r})"
        )
    return case_id


def check_export_folder(folder: str | Path) -> Path:
    """Create the export folder if needed and check, with a real file, that it can be written. Returns it.

    Raises:
        InputError: no folder given, it is a file, or it (or its parent) is not writable.
    """
    if folder is None or not str(folder).strip():
        raise InputError("no export folder: choose a folder for the training dataset")
    path = Path(folder).expanduser()
    if path.exists() and not path.is_dir():
        raise InputError(f"cannot export to '{path}': it is a file; choose a folder")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise InputError(
            f"cannot export to '{path}': the folder is not writable ({exc.strerror or exc}); "
            "choose a folder you can write to"
        ) from None
    return path


# ------------------------------------------------------------------------------------------------- overlaps
def find_overlaps(classes: Sequence[ExportedClass], catalog: ClassCatalog | None = None) -> list[tuple[str, str, int]]:
    """Pairs of classes that share voxels: ``(name, name, shared voxels)``, in catalog order."""
    catalog = catalog or ClassCatalog.default()
    ordered = sorted(classes, key=lambda c: c.index)
    out = []
    for n, a in enumerate(ordered):
        if not a.mask.any():
            continue
        for b in ordered[n + 1 :]:
            shared = int(np.count_nonzero(a.mask & b.mask))
            if shared:
                out.append((catalog[a.index].name, catalog[b.index].name, shared))
    return out


def label_map_array(classes: Sequence[ExportedClass]) -> np.ndarray:
    """The label map of non-overlapping classes: ``(z, y, x)``, value = catalog index (uint8, uint16 above 255)."""
    shape = classes[0].mask.shape
    dtype = np.uint8 if max(c.index for c in classes) < 256 else np.uint16
    out = np.zeros(shape, dtype=dtype)
    for c in classes:
        out[c.mask] = c.index
    return out


# ------------------------------------------------------------------------------------------------- export
def _write_image(image: sitk.Image, path: Path, transaction: OutputTransaction | None = None) -> Path:
    return write_image(image, path, transaction)


def _entry_files(entry: Mapping[str, Any], base: Path) -> set[Path]:
    files = set()
    for key in ("image", "label"):
        if entry.get(key):
            files.add((base / str(entry[key])).resolve())
    for value in (entry.get("masks") or {}).values():
        files.add((base / str(value)).resolve())
    return files


def _remove_stale(old: Mapping[str, Any], new_files: set[Path], base: Path) -> list[Path]:
    """Delete the files of a replaced entry that the new entry does not use (only inside the export folder)."""
    removed = []
    root = base.resolve()
    for path in sorted(_entry_files(old, base) - new_files):
        try:
            path.relative_to(root)
        except ValueError:
            continue  # an entry pointing outside the folder (edited by hand): never delete such files
        if path.is_file():
            path.unlink()
            removed.append(path)
            parent = path.parent
            if parent != root and parent.parent.name == MASKS_DIR and not any(parent.iterdir()):
                parent.rmdir()
    return removed


def export_case(
    folder: str | Path,
    image: sitk.Image,
    classes: Sequence[ExportedClass],
    *,
    case_id: str | None = None,
    default_case_id: str = "case",
    per_class_masks: bool = False,
    split: str = "train",
    dataset_name: str | None = None,
    provenance: Mapping[str, Any] | None = None,
    catalog: ClassCatalog | None = None,
) -> ExportReport:
    """Write one scan and its confirmed classes into an export folder and add (or replace) its dataset entry.

    Args:
        folder: the export folder (created if missing); many scans accumulate there.
        image: the CT (SimpleITK image); written unchanged.
        classes: the classes a person reviewed or edited, masks on ``image``'s grid. Nothing else is annotated.
        case_id: the entry's ID (file names). None: ``default_case_id`` made file-safe; if another scan already has
            that ID, a short fingerprint of this scan is appended.
        per_class_masks: when confirmed classes overlap, write one mask per class instead of refusing (a label map
            holds one class per voxel). Without overlaps a label map is written either way.
        split: "train", "val" (held out: validation and ``universalseg-train evaluate --split val``) or "both".
        dataset_name: a name for the whole dataset, kept in the dataset file.
        provenance: extra information about the scan for the entry (source volume name, ...).

    Raises:
        InputError: nothing confirmed, masks not on the CT's grid, the same class twice, a case ID that belongs to
            another scan, an unusable or unwritable folder. :class:`OverlapError` (an InputError) when confirmed
            classes overlap and ``per_class_masks`` is False.
    """
    catalog = catalog or ClassCatalog.default()
    if not classes:
        raise InputError(
            "nothing to export: no segment was reviewed or edited; mark correct segments as reviewed, "
            "or correct segments in the Segment Editor, then export again"
        )
    if split not in SPLITS:
        raise InputError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    path = dataset_file(folder)
    base = check_export_folder(path.parent)
    doc = _read(path, catalog)
    shape = tuple(image.GetSize())[::-1]
    seen: dict[int, ExportedClass] = {}
    for c in classes:
        name = catalog[c.index].name  # raises for an index outside the catalog
        if c.index in seen:
            raise InputError(f"{name} is given twice; export one segment per class (merge or delete the other)")
        if tuple(c.mask.shape) != shape:
            raise InputError(
                f"the mask of {name} has shape {tuple(c.mask.shape)}, not the CT's {shape}; resample "
                "the segmentation onto the CT first"
            )
        if c.confirmation not in CONFIRMATIONS:
            raise InputError(f"{name}: confirmation must be one of {', '.join(CONFIRMATIONS)}, got {c.confirmation!r}")
        seen[c.index] = c
    ordered = [
        ExportedClass(c.index, np.asarray(c.mask, dtype=bool), c.confirmation, dict(c.provenance))
        for c in sorted(classes, key=lambda c: c.index)
    ]
    overlaps = find_overlaps(ordered, catalog)
    if overlaps and not per_class_masks:
        pairs = ", ".join(f"{a} and {b} ({n} voxels)" for a, b, n in overlaps)
        raise OverlapError(
            f"segments overlap: {pairs}; a label map holds one class per voxel, so export per-class "
            "masks instead (or remove the overlap in the Segment Editor)",
            overlaps,
        )

    fingerprint = image_fingerprint(image)
    same_scan = [c for c in doc.cases if (c.get("provenance") or {}).get("image_sha256") == fingerprint]
    by_id = {str(c.get("id")): c for c in doc.cases}
    if case_id is not None and str(case_id).strip():
        case_id = check_case_id(case_id)
        other = by_id.get(case_id)
        if other is not None and other not in same_scan:
            raise InputError(
                f"case ID '{case_id}' already holds another scan in {path}; choose another case ID "
                "(re-exporting the same scan replaces its entry)"
            )
    elif same_scan:
        case_id = str(same_scan[0]["id"])
    else:
        case_id = check_case_id(case_id_from_name(default_case_id))
        if case_id in by_id:
            case_id = f"{case_id}_{fingerprint[:8]}"

    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    case_provenance = {
        **dict(provenance or {}),
        "exported": now,
        "image_sha256": fingerprint,
        "voxels": {catalog[c.index].name: int(np.count_nonzero(c.mask)) for c in ordered},
        "classes": {catalog[c.index].name: {"confirmation": c.confirmation, **c.provenance} for c in ordered},
    }
    try:
        json.dumps(case_provenance)
    except (TypeError, ValueError) as exc:
        raise InputError(f"the provenance of case '{case_id}' cannot be stored as JSON ({exc})") from None

    # Files first, then the entry: the dataset file never lists a file that is not written yet; all are put in
    # place together (or none: a full disk keeps the previous export whole).
    with OutputTransaction() as txn:
        image_path = _write_image(image, base / IMAGES_DIR / f"{case_id}.nii.gz", txn)
        label_path: Path | None = None
        mask_paths: dict[str, Path] = {}
        geometry = ImageGeometry.of(image)
        if overlaps:
            for c in ordered:
                info = catalog[c.index]
                mask_paths[info.name] = _write_image(
                    geometry.to_image(c.mask.astype(np.uint8)),
                    base / MASKS_DIR / case_id / f"{info.file_stem}.nii.gz",
                    txn,
                )
        else:
            label_path = _write_image(
                geometry.to_image(label_map_array(ordered)), base / LABELS_DIR / f"{case_id}.nii.gz", txn
            )

        annotated = [catalog[c.index].name for c in ordered]
        entry: dict[str, Any] = {"id": case_id, "image": image_path.relative_to(base).as_posix()}
        if label_path is not None:
            entry["label"] = label_path.relative_to(base).as_posix()
        else:
            entry["masks"] = {name: p.relative_to(base).as_posix() for name, p in mask_paths.items()}
        entry["annotated"] = annotated
        entry["split"] = split
        entry["provenance"] = case_provenance

        replaced_entries = same_scan + (
            [by_id[case_id]] if case_id in by_id and by_id[case_id] not in same_scan else []
        )
        replaced_ids = {str(c.get("id")) for c in replaced_entries}
        doc.replace(replaced_ids, entry)
        if dataset_name:
            doc.name = str(dataset_name)
        doc.updated = now
        write_dataset_file(path, doc, txn)

    new_files = _entry_files(entry, base)
    removed: list[Path] = []
    for old in replaced_entries:
        removed += _remove_stale(old, new_files, base)
    replaced = None
    if replaced_entries:
        replaced = case_id if case_id in replaced_ids else str(replaced_entries[0].get("id"))
    return ExportReport(
        dataset_file=path,
        case_id=case_id,
        image=image_path,
        label=label_path,
        masks=mask_paths,
        annotated=annotated,
        confirmations={catalog[c.index].name: c.confirmation for c in ordered},
        split=split,
        replaced=replaced,
        removed=removed,
        case_count=len(doc.cases),
    )


def remove_case(folder: str | Path, case_id: str, *, delete_files: bool = True) -> bool:
    """Remove a case's entry (and, by default, its files inside the folder). True when there was one."""
    path = dataset_file(folder)
    doc = _read(path)
    if str(case_id) not in doc.case_ids():
        return False
    gone = doc.replace([str(case_id)])
    doc.updated = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_dataset_file(path, doc)
    if delete_files:
        for old in gone:
            _remove_stale(old, set(), path.parent)
    return True
