"""The training dataset file, ``dataset.json``: its schema, its reader and its (atomic) writer, in one place.

Written by the engine's "Export for training" (:mod:`UniversalSegLib.training_export`, used by the Slicer module) and
read by the training package (``type: exported`` datasets, :mod:`training.datasets`). Pure JSON, no PyTorch. Format::

    {"format": "universalseg-training-dataset", "format_version": 1, "label_values": "catalog",
     "name": "liver corrections", "labels": {"0": "background", "1": "Spleen", ...}, "updated": "2026-...",
     "cases": [{"id": "scan1", "image": "images/scan1.nii.gz", "label": "labels/scan1.nii.gz",
                "annotated": ["Liver", "Spleen"], "split": "train", "provenance": {...}},
               {"id": "scan2", "image": "images/scan2.nii.gz",
                "masks": {"Liver": "masks/scan2/liver.nii.gz", "Liver Tumor": "masks/scan2/liver_tumor.nii.gz"},
                "annotated": ["Liver", "Liver Tumor"]}]}

``image``/``label``/``masks`` paths are relative to the file's folder; label values are catalog indices (1 Spleen ...
32 Kidney Cyst); ``masks`` (``{class name: path}``) replaces ``label`` when segments overlap. ``annotated`` lists
exactly the classes a person reviewed or edited; all other classes count as not annotated. Top-level keys this
version does not know are kept when the file is rewritten.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from .errors import InputError
from .output_safety import OutputTransaction, safe_output, verify_text

if TYPE_CHECKING:
    from .catalog import ClassCatalog

__all__ = [
    "EXPORTED_FORMAT",
    "EXPORTED_FILE",
    "FORMAT_VERSION",
    "CASE_KEYS",
    "SPLITS",
    "TrainingDataset",
    "dataset_file",
    "read_dataset_file",
    "write_dataset_file",
    "check_case",
]

EXPORTED_FORMAT = "universalseg-training-dataset"
EXPORTED_FILE = "dataset.json"
FORMAT_VERSION = 1
#: Keys of a case entry.
CASE_KEYS = ("id", "image", "label", "masks", "annotated", "split", "provenance")
#: ``split`` of a case: used for training, held out for validation/evaluation, or both.
SPLITS = ("train", "val", "both")
_KNOWN_KEYS = ("format", "format_version", "label_values", "name", "labels", "updated", "cases")


def dataset_file(folder_or_file: str | Path) -> Path:
    """The dataset file of an export folder (``<folder>/dataset.json``); a ``.json`` path is returned as is."""
    if folder_or_file is None or not str(folder_or_file).strip():
        raise InputError("no export folder: choose a folder for the training dataset")
    path = Path(folder_or_file).expanduser()
    return path if path.suffix.lower() == ".json" else path / EXPORTED_FILE


def check_case(case: Any, where: str = "a case", *, known_keys_only: bool = True) -> dict[str, Any]:
    """Raise InputError unless ``case`` is a usable entry (``where`` names it in the message); returns it as a dict.
    ``known_keys_only``: refuse keys outside :data:`CASE_KEYS` (the writer does; the reader keeps them)."""
    if not isinstance(case, Mapping):
        raise InputError(f"{where} is a JSON {type(case).__name__}, not an object with 'id', 'image' and 'label'")
    unknown = sorted(set(map(str, case)) - set(CASE_KEYS))
    if unknown and known_keys_only:
        raise InputError(f"{where} has unknown key(s) {', '.join(unknown)}; allowed: {', '.join(CASE_KEYS)}")
    if not case.get("image") or not (case.get("label") or case.get("masks")):
        raise InputError(f"{where}: needs 'image' and 'label' (or 'masks')")
    if case.get("masks") is not None and not isinstance(case["masks"], Mapping):
        raise InputError(f"{where}: 'masks' must be an object {{class name: path}}")
    annotated = case.get("annotated")
    if annotated is not None and (isinstance(annotated, (str, bytes)) or not isinstance(annotated, (list, tuple))):
        raise InputError(f"{where}: 'annotated' must be a list of class names")
    if case.get("split") is not None and case["split"] not in SPLITS:
        raise InputError(f"{where}: split must be one of {', '.join(SPLITS)}, got {case['split']!r}")
    return dict(case)


@dataclass
class TrainingDataset:
    """A ``dataset.json`` document. ``cases`` are plain dicts (keys :data:`CASE_KEYS`); ``extra`` holds top-level keys
    this version does not know (kept on rewrite)."""

    cases: list[dict[str, Any]] = field(default_factory=list)
    name: str | None = None
    labels: dict[str, str] | None = None
    updated: str | None = None
    label_values: str = "catalog"
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def new(cls, catalog: "ClassCatalog | None" = None) -> "TrainingDataset":
        """An empty dataset whose ``labels`` name the catalog's label values."""
        from .catalog import ClassCatalog

        catalog = catalog or ClassCatalog.default()
        return cls(labels={"0": "background", **{str(c.index): c.name for c in catalog}})

    @classmethod
    def from_dict(cls, doc: Any, source: str | Path = "the dataset file", hint: str = "") -> "TrainingDataset":
        """Validate a parsed document. Raises InputError naming ``source`` (and ending with ``hint``, if given)."""
        tail = f"; {hint}" if hint else ""
        if not isinstance(doc, Mapping) or doc.get("format") != EXPORTED_FORMAT:
            raise InputError(
                f"{source} is not a UniversalSeg training dataset (its 'format' must be {EXPORTED_FORMAT!r}){tail}"
            )
        version = doc.get("format_version", 1)
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise InputError(f"{source}: 'format_version' must be a whole number, got {version!r}{tail}")
        if version > FORMAT_VERSION:
            raise InputError(
                f"{source} was written by a newer UniversalSeg (format_version {version}); this version "
                f"reads version {FORMAT_VERSION}: update UniversalSeg{tail}"
            )
        cases = doc.get("cases")
        if not isinstance(cases, list):
            raise InputError(f"{source} has no 'cases' list{tail}")
        checked = [check_case(c, f"{source} case {n + 1}", known_keys_only=False) for n, c in enumerate(cases)]
        labels = doc.get("labels")
        if labels is not None and not isinstance(labels, Mapping):
            raise InputError(f"{source}: 'labels' must be an object {{value: class name}}{tail}")
        return cls(
            cases=checked,
            name=None if doc.get("name") is None else str(doc["name"]),
            labels=None if labels is None else {str(k): str(v) for k, v in labels.items()},
            updated=None if doc.get("updated") is None else str(doc["updated"]),
            label_values=str(doc.get("label_values", "catalog")),
            format_version=version,
            extra={k: v for k, v in doc.items() if k not in _KNOWN_KEYS},
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (optional keys only when set)."""
        out: dict[str, Any] = {
            "format": EXPORTED_FORMAT,
            "format_version": self.format_version,
            "label_values": self.label_values,
        }
        if self.name is not None:
            out["name"] = self.name
        if self.labels is not None:
            out["labels"] = dict(self.labels)
        out.update(self.extra)
        out["cases"] = [dict(c) for c in self.cases]
        if self.updated is not None:
            out["updated"] = self.updated
        return out

    def case_ids(self) -> list[str]:
        return [str(c.get("id")) for c in self.cases]

    def replace(self, ids: Iterable[str], entry: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """Drop the cases with the given IDs and append ``entry`` (checked, needs an ``id`` and a non-empty
        ``annotated``). Returns the dropped cases."""
        gone_ids = {str(i) for i in ids}
        if entry is not None:
            entry = check_case(entry, f"case {entry.get('id')!r}" if isinstance(entry, Mapping) else "the case")
            if not entry.get("id"):
                raise InputError("a case needs an 'id'")
            if not entry.get("annotated"):
                raise InputError(
                    f"case {entry['id']}: nothing was reviewed or edited; review at least one segment before exporting"
                )
            gone_ids.add(str(entry["id"]))
        gone = [c for c in self.cases if str(c.get("id")) in gone_ids]
        self.cases = [c for c in self.cases if str(c.get("id")) not in gone_ids] + (
            [entry] if entry is not None else []
        )
        return gone

    def upsert(self, entry: Mapping[str, Any]) -> dict[str, Any] | None:
        """Add ``entry``, replacing the case with the same ``id``; returns the replaced case, if any."""
        gone = self.replace((), entry)
        return gone[0] if gone else None


def read_dataset_file(
    folder_or_file: str | Path, *, missing_ok: bool = False, hint: str = "", catalog: "ClassCatalog | None" = None
) -> TrainingDataset:
    """Read and validate a dataset file (an existing file of any name, or the ``dataset.json`` of a folder).

    ``missing_ok``: a file that does not exist yet gives an empty dataset (:meth:`TrainingDataset.new` with
    ``catalog``) instead of an InputError. ``hint`` ends each error message (what the user can do).
    """
    given = Path(folder_or_file).expanduser() if folder_or_file is not None and str(folder_or_file).strip() else None
    path = given if given is not None and given.is_file() else dataset_file(folder_or_file)  # a file of any name
    tail = f"; {hint}" if hint else ""
    if not path.exists():
        if missing_ok:
            return TrainingDataset.new(catalog)
        raise InputError(f"training dataset file not found: {path}{tail}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read {path} ({exc}){tail or '; fix its permissions'}") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{path} is not valid JSON ({exc}){tail or '; fix or remove it'}") from None
    return TrainingDataset.from_dict(doc, path, hint)


def write_dataset_file(
    folder_or_file: str | Path,
    dataset: TrainingDataset | Mapping[str, Any],
    transaction: OutputTransaction | None = None,
) -> Path:
    """Replace the dataset file atomically, verified (temporary file, read back, rename: a crash or a full disk never
    leaves half a file). With ``transaction`` the file is staged there and put in place when it commits."""
    path = dataset_file(folder_or_file)
    if not isinstance(dataset, TrainingDataset):
        dataset = TrainingDataset.from_dict(dataset, "the dataset to write")
    text = json.dumps(dataset.to_dict(), indent=2) + "\n"
    with safe_output(path, verify_text(text), transaction) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path
