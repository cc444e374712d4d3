"""Exported training datasets (corrections made in 3D Slicer): the ``dataset.json`` that ``type: exported`` reads.

Pure JSON, no PyTorch: the Slicer module can import it to add or replace a scan's entry. One folder accumulates many
exported scans; re-exporting a scan replaces its entry (same ``id``), never duplicates it. Format::

    {"format": "universalseg-training-dataset", "format_version": 1, "label_values": "catalog",
     "cases": [{"id": "scan1", "image": "images/scan1.nii.gz", "label": "labels/scan1.nii.gz",
                "annotated": ["Liver", "Spleen"], "provenance": {...}}, ...]}

``image``/``label``/``masks`` paths are relative to the dataset file's folder; label values are catalog indices (1
Spleen ... 32 Kidney Cyst); ``masks`` (``{class name: path}``) replaces ``label`` when segments overlap. ``annotated``
lists exactly the classes a person reviewed or edited; all other classes count as not annotated.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping

from UniversalSegLib.errors import InputError

EXPORTED_FORMAT = "universalseg-training-dataset"
EXPORTED_FILE = "dataset.json"
_CASE_KEYS = ("id", "image", "label", "masks", "annotated", "split", "provenance")


def dataset_file(folder_or_file: str | Path) -> Path:
    """The dataset file of an export folder (``<folder>/dataset.json``), or the given ``.json`` path."""
    p = Path(folder_or_file)
    return p if p.suffix.lower() == ".json" else p / EXPORTED_FILE


def read_dataset(folder_or_file: str | Path) -> dict[str, Any]:
    """The dataset document; a new, empty one when the file does not exist yet."""
    path = dataset_file(folder_or_file)
    if not path.exists():
        return {"format": EXPORTED_FORMAT, "format_version": 1, "label_values": "catalog", "cases": []}
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON ({exc}); fix or remove it before exporting") from None
    if not isinstance(doc, dict) or doc.get("format") != EXPORTED_FORMAT or not isinstance(doc.get("cases"), list):
        raise InputError(f"{path} is not an exported UniversalSeg dataset; choose an empty folder or an export folder")
    return doc


def _relative(path: str | Path, base: Path) -> str:
    p = Path(path)
    if p.is_absolute():
        try:
            return p.resolve().relative_to(base.resolve()).as_posix()
        except ValueError:
            return str(p)
    return p.as_posix()


def upsert_case(folder_or_file: str | Path, case: Mapping[str, Any]) -> Path:
    """Add ``case`` to the dataset file, replacing an entry with the same ``id``. Returns the dataset file.

    ``case``: ``id``, ``image``, ``label`` or ``masks``, ``annotated`` (non-empty list of class names), optional
    ``split`` and ``provenance``. Absolute paths inside the export folder are stored relative to it.
    """
    path = dataset_file(folder_or_file)
    base = path.parent
    unknown = set(case) - set(_CASE_KEYS)
    if unknown:
        raise InputError(f"exported case has unknown key(s) {sorted(unknown)}; allowed: {', '.join(_CASE_KEYS)}")
    if not case.get("id") or not case.get("image") or not (case.get("label") or case.get("masks")):
        raise InputError("an exported case needs 'id', 'image' and 'label' (or 'masks')")
    if not case.get("annotated"):
        raise InputError(f"case {case['id']}: nothing was reviewed or edited; review at least one segment before exporting")
    entry = {k: case[k] for k in _CASE_KEYS if k in case and case[k] is not None}
    entry["image"] = _relative(case["image"], base)
    if case.get("label"):
        entry["label"] = _relative(case["label"], base)
    if case.get("masks"):
        entry["masks"] = {str(k): _relative(v, base) for k, v in case["masks"].items()}
    entry["annotated"] = [str(a) for a in case["annotated"]]
    doc = read_dataset(path)
    doc["cases"] = [c for c in doc["cases"] if str(c.get("id")) != str(entry["id"])] + [entry]
    base.mkdir(parents=True, exist_ok=True)
    if not os.access(base, os.W_OK):
        raise InputError(f"cannot write to {base}; choose a writable export folder")
    fd, tmp = tempfile.mkstemp(prefix=".dataset-", suffix=".json", dir=str(base))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def remove_case(folder_or_file: str | Path, case_id: str) -> bool:
    """Remove a case entry (not its files). True when one was removed."""
    path = dataset_file(folder_or_file)
    doc = read_dataset(path)
    kept = [c for c in doc["cases"] if str(c.get("id")) != str(case_id)]
    if len(kept) == len(doc["cases"]):
        return False
    doc["cases"] = kept
    path.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    return True
