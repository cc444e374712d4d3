"""Dataset assembly: config entries -> cases with their label-to-class mapping and annotated classes.

Each dataset entry (``datasets:`` in the config) has a ``type``:

``files``
    ``cases: [{id, image, label | masks: {structure: path}, annotated?, split?}]``; paths relative to ``root`` (or the
    config's folder).
``folder``
    ``images: "imagesTr/*.nii.gz"`` and ``label_images: "labelsTr/*.nii.gz"`` (globs relative to ``root``), paired by case id
    = file name without extension and without ``image_suffix`` / ``label_suffix`` (e.g. nnU-Net's ``_0000``).
``msd``
    a Medical Segmentation Decathlon task folder: ``root/dataset.json`` lists ``training`` cases and the label names
    (``{"0": "background", "1": "liver", "2": "cancer"}``, or nnU-Net v2's ``{"liver": 1}``).
``totalsegmentator``
    ``root`` is one case folder (holding ``image``, default ``ct.nii.gz``) or a folder of them. Labels are a multi-label
    map (``label_file``, values of the v2 ``total`` task, :data:`training.totalsegmentator.TOTALSEG_V2_TOTAL`) or
    per-structure masks (``masks: "segmentations/{name}.nii.gz"``). Without ``labels`` the default mapping
    :data:`training.totalsegmentator.TOTALSEG_V2_TO_CATALOG` is used.
``exported``
    a dataset file written by the Slicer module's "Export for training" (``path``: the file or its folder, default
    name ``dataset.json``); label values are catalog indices and each case lists the classes a person reviewed or
    edited (``annotated``); everything else is "not annotated". Format::

        {"format": "universalseg-training-dataset", "format_version": 1, "label_values": "catalog",
         "cases": [{"id": "scan1", "image": "images/scan1.nii.gz", "label": "labels/scan1.nii.gz",
                    "annotated": ["Liver", "Spleen"]},
                   {"id": "scan2", "image": "images/scan2.nii.gz",
                    "masks": {"Liver": "masks/scan2/liver.nii.gz", "Liver Tumor": "masks/scan2/liver_tumor.nii.gz"},
                    "annotated": ["Liver", "Liver Tumor"]}]}

    (:mod:`UniversalSegLib.dataset_json` owns the format: its reader and its writer.)

Mapping (``labels:``): catalog class -> source labels, given as label values or names (or, for ``masks``, structure
names). Several sources may form one class (lung lobes -> Right Lung) and one source may count for several classes
(kidney cyst -> Right Kidney and Kidney Cyst). A source can be split by body side: ``Right Lung: {labels: [lung],
side: right}`` keeps the connected parts of ``lung`` whose centre lies on the patient's right of the body's midline.
``annotated`` (default: the mapped classes) lists the classes the dataset annotates; a listed class without sources is
annotated as absent. ``ignore_labels`` lists label values/names that are known but not used.
"""

from __future__ import annotations

import glob as globlib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from UniversalSegLib.catalog import ClassCatalog
from UniversalSegLib.dataset_json import dataset_file, read_dataset_file
from UniversalSegLib.errors import ClassNameError, InputError
from UniversalSegLib.formats import image_stem

from .config import DatasetSection, TrainingConfig
from .totalsegmentator import TOTALSEG_V2_TO_CATALOG, TOTALSEG_V2_TOTAL

SIDES = ("right", "left")


@dataclass(frozen=True)
class SourceRef:
    """One source of a class: a label value (label maps) or a structure name (per-structure masks), optionally only
    the part on one body side."""

    key: int | str
    side: str | None = None


@dataclass(frozen=True)
class CaseSpec:
    """One training/validation case.

    ``sources``: catalog index -> the label sources forming that class; ``annotated``: catalog indices this case
    annotates (a superset of ``sources``' keys may hold classes annotated as absent). ``label_names`` (value -> name)
    is the table of known label values of ``label``; ``None`` means only the mapped and ignored values are known.
    """

    dataset: str
    case_id: str
    image: Path
    label: Path | None = None
    masks: tuple[tuple[str, Path], ...] = ()
    sources: tuple[tuple[int, tuple[SourceRef, ...]], ...] = ()
    annotated: tuple[int, ...] = ()
    label_names: Mapping[int, str] | None = None
    ignore_values: frozenset = frozenset()
    split: str = "train"
    weight: float = 1.0

    @property
    def name(self) -> str:
        return f"{self.dataset}/{self.case_id}"

    def files(self) -> list[Path]:
        return [self.image] + ([self.label] if self.label else []) + [p for _, p in self.masks]

    def to_data(self) -> dict[str, Any]:
        """The dict MONAI datasets carry (plain, picklable); ``stamp`` makes disk caches see file changes."""
        stamp = []
        for p in self.files():
            try:
                st = p.stat()
                stamp.append(f"{p}:{st.st_size}:{st.st_mtime_ns}")
            except OSError:
                stamp.append(str(p))
        return {
            "case": self.name,
            "image": str(self.image),
            "label": str(self.label) if self.label else "",
            "masks": [[n, str(p)] for n, p in self.masks],
            "sources": [[c, [[r.key, r.side] for r in refs]] for c, refs in self.sources],
            "annotated": list(self.annotated),
            "known_values": sorted(self.known_values()) if self.label else [],
            "stamp": hashlib.sha256("|".join(stamp).encode()).hexdigest()[:16],
        }

    def known_values(self) -> set[int]:
        """Label values of ``label`` that are allowed to occur."""
        known = {0} | {int(v) for v in self.ignore_values}
        if self.label_names is not None:
            known |= set(int(v) for v in self.label_names)
        for _, refs in self.sources:
            known |= {int(r.key) for r in refs if isinstance(r.key, (int, np.integer))}
        return known


def load_catalog(config: TrainingConfig) -> ClassCatalog:
    """The config's catalog (``catalog:`` path, for classes beyond the packaged 32) or the packaged one."""
    return ClassCatalog.from_json(config.catalog) if config.catalog else ClassCatalog.default()


# ------------------------------------------------------------------------------------------------ mapping


def _parse_refs(dataset: str, class_name: str, spec: Any) -> list[SourceRef]:
    side = None
    if isinstance(spec, Mapping):
        unknown = set(spec) - {"labels", "side"}
        if unknown:
            raise InputError(
                f"dataset '{dataset}': class '{class_name}' mapping has unknown key(s) {sorted(unknown)}; use labels and side"
            )
        side = spec.get("side")
        if side is not None and side not in SIDES:
            raise InputError(f"dataset '{dataset}': class '{class_name}' side must be right or left, got {side!r}")
        spec = spec.get("labels", [])
    if isinstance(spec, (str, int)):
        spec = [spec]
    if not isinstance(spec, (list, tuple)):
        raise InputError(
            f"dataset '{dataset}': class '{class_name}' must map to a label, a list of labels or {{labels, side}}"
        )
    refs = []
    for item in spec:
        if isinstance(item, bool) or not isinstance(item, (str, int)):
            raise InputError(f"dataset '{dataset}': class '{class_name}' source {item!r} must be a label value or name")
        refs.append(SourceRef(item, side))
    return refs


def _resolve_value(dataset: str, key: int | str, names: Mapping[int, str] | None) -> int:
    """A label given as value or name -> its integer value."""
    if isinstance(key, int):
        return key
    text = str(key).strip()
    if text.lstrip("-").isdigit():
        return int(text)
    if names:
        lowered = {n.lower(): v for v, n in names.items()}
        if text.lower() in lowered:
            return lowered[text.lower()]
        import difflib

        close = difflib.get_close_matches(text.lower(), list(lowered), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise InputError(f"dataset '{dataset}': label name '{text}' is not in the dataset's label names{hint}")
    raise InputError(
        f"dataset '{dataset}': label '{text}' is a name, but the dataset has no label names; give label values or 'label_names'"
    )


def resolve_mapping(
    ds: DatasetSection,
    catalog: ClassCatalog,
    names: Mapping[int, str] | None,
    *,
    masks_mode: bool,
    default: Mapping[str, Any] | None = None,
) -> tuple[dict[int, list[SourceRef]], list[int], set[int]]:
    """``labels`` / ``annotated`` / ``ignore_labels`` of a dataset entry -> (catalog index -> sources, annotated
    indices, ignored values). Label names become values (label maps) or stay structure names (masks)."""
    mapping = ds.labels if ds.labels is not None else default
    if mapping is None:
        raise InputError(f"dataset '{ds.name}' has no 'labels' mapping (catalog class -> source labels); add one")
    sources: dict[int, list[SourceRef]] = {}
    for class_name, spec in mapping.items():
        try:
            info = catalog.lookup(str(class_name))
        except ClassNameError as exc:
            raise InputError(f"dataset '{ds.name}': {exc}") from None
        refs = _parse_refs(ds.name, info.name, spec)
        if not masks_mode:
            refs = [SourceRef(_resolve_value(ds.name, r.key, names), r.side) for r in refs]
        else:
            refs = [SourceRef(str(r.key), r.side) for r in refs]
        sources.setdefault(info.index, []).extend(refs)
    if ds.annotated is not None:
        annotated = []
        for class_name in ds.annotated:
            try:
                annotated.append(catalog.lookup(str(class_name)).index)
            except ClassNameError as exc:
                raise InputError(f"dataset '{ds.name}' annotated: {exc}") from None
    else:
        annotated = list(sources)
    ignored = set()
    if not masks_mode:
        ignored = {_resolve_value(ds.name, v, names) for v in ds.ignore_labels}
    return sources, sorted(set(annotated)), ignored


# ------------------------------------------------------------------------------------------------ adapters


def _strip_image_suffix(name: str) -> str:
    return image_stem(name) or Path(name).stem


def _case_split(ds: DatasetSection, case_id: str, explicit: str | None, n_val: set[str]) -> str:
    if explicit is not None:
        if explicit not in ("train", "val", "both"):
            raise InputError(
                f"dataset '{ds.name}' case '{case_id}': split must be train, val or both, got {explicit!r}"
            )
        return explicit
    if case_id in ds.val_cases or case_id in n_val:
        return "val"
    return ds.split


def _fraction_val(ds: DatasetSection, ids: Sequence[str]) -> set[str]:
    """Deterministic held-out cases for ``val_fraction``: the ids with the smallest hashes (stable across runs)."""
    if not ds.val_fraction or not ids:
        return set()
    n = max(1, int(round(ds.val_fraction * len(ids))))
    ranked = sorted(ids, key=lambda i: hashlib.sha256(f"{ds.name}/{i}".encode()).hexdigest())
    return set(ranked[:n])


def _base(ds: DatasetSection, config: TrainingConfig) -> Path:
    return ds.root if ds.root is not None else config.base_dir


def _rel(base: Path, p: str | Path) -> Path:
    p = Path(str(p)).expanduser()
    return p if p.is_absolute() else base / p


def _build(
    ds: DatasetSection,
    raw_cases: list[dict],
    catalog: ClassCatalog,
    names: Mapping[int, str] | None,
    masks_mode: bool,
    default_mapping: Mapping[str, Any] | None = None,
    per_case_annotated: bool = False,
) -> list[CaseSpec]:
    """Common part of the adapters: raw cases {id, image, label | masks, annotated?, split?} -> CaseSpecs."""
    ids = [c["id"] for c in raw_cases]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise InputError(f"dataset '{ds.name}': case ids must be unique; repeated: {', '.join(dupes[:5])}")
    val_ids = _fraction_val(ds, ids)
    if ds.label_values == "catalog" or per_case_annotated:
        catalog_names = {c.index: c.name for c in catalog}
        default_mapping = {c.name: [c.index] for c in catalog} if not masks_mode else None
        names = catalog_names
    out = []
    for raw in raw_cases:
        case_masks_mode = masks_mode or bool(raw.get("masks"))
        if per_case_annotated and case_masks_mode:
            # Exported per-class masks are named by catalog class: each class is its own mask.
            mapping = {str(k): [str(k)] for k in (raw.get("masks") or {})}
            entry = DatasetSection(name=ds.name, type=ds.type, labels=mapping, annotated=None)
            sources, annotated, ignored = resolve_mapping(entry, catalog, None, masks_mode=True)
            masks = tuple((str(k), Path(v)) for k, v in raw["masks"].items())
        else:
            sources, annotated, ignored = resolve_mapping(
                ds, catalog, names, masks_mode=case_masks_mode, default=default_mapping
            )
            masks = tuple((str(k), Path(v)) for k, v in (raw.get("masks") or {}).items())
        if raw.get("annotated") is not None:
            try:
                annotated = sorted(
                    {
                        catalog.lookup(str(a)).index if not isinstance(a, int) else catalog[a].index
                        for a in raw["annotated"]
                    }
                )
            except ClassNameError as exc:
                raise InputError(f"dataset '{ds.name}' case '{raw['id']}' annotated: {exc}") from None
            sources = {k: v for k, v in sources.items() if k in annotated}
        elif per_case_annotated:
            raise InputError(
                f"dataset '{ds.name}' case '{raw['id']}' lists no 'annotated' classes (exported datasets must)"
            )
        if not annotated:
            raise InputError(
                f"dataset '{ds.name}' case '{raw['id']}' annotates no class; map at least one catalog class"
            )
        if case_masks_mode:
            # Only the structures some annotated class uses are loaded.
            used = {str(r.key) for refs in sources.values() for r in refs}
            missing = sorted(used - {n for n, _ in masks})
            if missing:
                raise InputError(
                    f"dataset '{ds.name}' case '{raw['id']}': no mask file for structure(s) {', '.join(missing)}"
                )
            masks = tuple((n, p) for n, p in masks if n in used)
        out.append(
            CaseSpec(
                dataset=ds.name,
                case_id=str(raw["id"]),
                image=Path(raw["image"]),
                label=Path(raw["label"]) if raw.get("label") and not case_masks_mode else None,
                masks=masks if case_masks_mode else (),
                sources=tuple((k, tuple(v)) for k, v in sorted(sources.items()) if k in annotated),
                annotated=tuple(annotated),
                label_names=dict(names) if names is not None else None,
                ignore_values=frozenset(ignored),
                split=_case_split(ds, str(raw["id"]), raw.get("split"), val_ids),
                weight=ds.weight,
            )
        )
    return out


def _files_cases(ds: DatasetSection, config: TrainingConfig, catalog: ClassCatalog) -> list[CaseSpec]:
    base = _base(ds, config)
    if not ds.cases:
        raise InputError(f"dataset '{ds.name}' (type files) lists no 'cases'")
    raw = []
    for n, c in enumerate(ds.cases):
        if not isinstance(c, Mapping) or "image" not in c or not (c.get("label") or c.get("masks")):
            raise InputError(f"dataset '{ds.name}' case {n + 1}: needs 'image' and 'label' (or 'masks')")
        raw.append(
            {
                "id": str(c.get("id") or _strip_image_suffix(Path(c["image"]).name)),
                "image": _rel(base, c["image"]),
                "label": _rel(base, c["label"]) if c.get("label") else None,
                "masks": {k: _rel(base, v) for k, v in (c.get("masks") or {}).items()},
                "annotated": c.get("annotated"),
                "split": c.get("split"),
            }
        )
    return _build(ds, raw, catalog, ds.label_names, masks_mode=False)


def _folder_cases(ds: DatasetSection, config: TrainingConfig, catalog: ClassCatalog) -> list[CaseSpec]:
    base = _base(ds, config)
    if not ds.images or not ds.label_images:
        raise InputError(
            f"dataset '{ds.name}' (type folder) needs 'images' and 'label_images' globs, e.g. imagesTr/*.nii.gz and labelsTr/*.nii.gz"
        )

    def by_id(pattern: str, suffix: str) -> dict[str, Path]:
        found = {}
        for p in sorted(globlib.glob(str(_rel(base, pattern)))):
            stem = _strip_image_suffix(Path(p).name)
            if suffix and stem.endswith(suffix):
                stem = stem[: -len(suffix)]
            found[stem] = Path(p)
        return found

    images = by_id(ds.images, ds.image_suffix)
    labels = by_id(ds.label_images, ds.label_suffix)
    if not images:
        raise InputError(f"dataset '{ds.name}': no image matches {_rel(base, ds.images)}")
    unpaired = sorted(set(images) - set(labels))
    if unpaired:
        raise InputError(
            f"dataset '{ds.name}': no label file for case(s) {', '.join(unpaired[:5])}"
            + (f" (and {len(unpaired) - 5} more)" if len(unpaired) > 5 else "")
            + "; check the 'label_images' glob and image_suffix/label_suffix"
        )
    raw = [{"id": i, "image": images[i], "label": labels[i]} for i in sorted(images)]
    return _build(ds, raw, catalog, ds.label_names, masks_mode=False)


def _msd_label_names(doc: Mapping[str, Any], path: Path) -> dict[int, str]:
    labels = doc.get("labels")
    if not isinstance(labels, Mapping) or not labels:
        raise InputError(f"{path} has no 'labels' table")
    out = {}
    for k, v in labels.items():
        if str(k).lstrip("-").isdigit():  # MSD: {"1": "liver"}
            out[int(k)] = str(v)
        elif isinstance(v, int):  # nnU-Net v2: {"liver": 1}
            out[v] = str(k)
        else:
            raise InputError(
                f"{path}: label entry {k!r}: {v!r} is neither MSD ('1': 'liver') nor nnU-Net v2 ('liver': 1) style"
            )
    return out


def _msd_cases(ds: DatasetSection, config: TrainingConfig, catalog: ClassCatalog) -> list[CaseSpec]:
    base = _base(ds, config)
    path = base / "dataset.json" if base.is_dir() or not base.suffix else base
    if not path.is_file():
        raise InputError(f"dataset '{ds.name}': MSD dataset.json not found at {path}")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"dataset '{ds.name}': {path} is not valid JSON ({exc})") from None
    names = ds.label_names or _msd_label_names(doc, path)
    entries = doc.get(ds.section)
    if not isinstance(entries, list) or not entries:
        raise InputError(f"dataset '{ds.name}': {path} has no '{ds.section}' case list")
    raw = []
    for n, e in enumerate(entries):
        if not isinstance(e, Mapping) or "image" not in e or "label" not in e:
            raise InputError(f"dataset '{ds.name}': {path} {ds.section}[{n}] needs 'image' and 'label'")
        image = e["image"][0] if isinstance(e["image"], list) else e["image"]
        raw.append(
            {
                "id": _strip_image_suffix(Path(image).name),
                "image": _rel(path.parent, image),
                "label": _rel(path.parent, e["label"]),
            }
        )
    return _build(ds, raw, catalog, names, masks_mode=False)


def _totalseg_cases(ds: DatasetSection, config: TrainingConfig, catalog: ClassCatalog) -> list[CaseSpec]:
    base = _base(ds, config)
    if not base.is_dir():
        raise InputError(f"dataset '{ds.name}': TotalSegmentator folder not found: {base}")
    folders = [base] if (base / ds.image).exists() else sorted(p for p in base.iterdir() if (p / ds.image).exists())
    if not folders:
        raise InputError(f"dataset '{ds.name}': no case folder with '{ds.image}' in {base}")
    masks_pattern = ds.masks
    if masks_pattern is None and ds.label_file is None:
        if (folders[0] / "segmentations").is_dir():
            masks_pattern = "segmentations/{name}.nii.gz"
        else:
            raise InputError(
                f"dataset '{ds.name}': give 'label_file' (multi-label map) or 'masks' (e.g. segmentations/{{name}}.nii.gz)"
            )
    if masks_pattern is not None and "{name}" not in masks_pattern:
        raise InputError(f"dataset '{ds.name}': 'masks' must contain {{name}}, e.g. segmentations/{{name}}.nii.gz")
    names = ds.label_names or dict(TOTALSEG_V2_TOTAL)
    raw = []
    mapping = ds.labels if ds.labels is not None else TOTALSEG_V2_TO_CATALOG
    for folder in folders:
        case_id = folder.name if folder != base else base.name
        entry: dict[str, Any] = {"id": case_id, "image": folder / ds.image}
        if masks_pattern is not None:
            structures = sorted(
                {
                    str(s)
                    for spec in mapping.values()
                    for s in (
                        spec.get("labels", [])
                        if isinstance(spec, Mapping)
                        else (spec if isinstance(spec, list) else [spec])
                    )
                }
            )
            entry["masks"] = {s: folder / masks_pattern.format(name=s) for s in structures}
            if ds.labels is None:
                # Default mapping: a class counts as annotated in this case only when all its structure files exist.
                annotated = []
                for cls, spec in mapping.items():
                    if all((folder / masks_pattern.format(name=s)).exists() for s in spec):
                        annotated.append(cls)
                entry["annotated"] = annotated
                entry["masks"] = {s: p for s, p in entry["masks"].items() if p.exists()}
        else:
            assert ds.label_file is not None  # checked above: label_file or masks
            entry["label"] = folder / ds.label_file
        raw.append(entry)
    return _build(
        ds,
        raw,
        catalog,
        names if masks_pattern is None else None,
        masks_mode=masks_pattern is not None,
        default_mapping=TOTALSEG_V2_TO_CATALOG,
    )


def read_exported(path: str | Path) -> tuple[Path, dict]:
    """Read an exported dataset file (or the ``dataset.json`` in a folder): (file path, document), validated by
    :func:`UniversalSegLib.dataset_json.read_dataset_file`."""
    path = Path(path).expanduser()
    path = path if path.is_file() else dataset_file(path)  # a file of any name, or the dataset.json of a folder
    return path, read_dataset_file(path).to_dict()


def _exported_cases(ds: DatasetSection, config: TrainingConfig, catalog: ClassCatalog) -> list[CaseSpec]:
    target = ds.path or ds.root or _base(ds, config)
    path, doc = read_exported(target)
    if not doc["cases"]:
        raise InputError(f"exported dataset {path} has no cases yet; export at least one reviewed scan")
    raw = []
    for c in doc["cases"]:  # each has 'image' and 'label' or 'masks' (checked by the reader)
        raw.append(
            {
                "id": str(c.get("id") or _strip_image_suffix(Path(c["image"]).name)),
                "image": _rel(path.parent, c["image"]),
                "label": _rel(path.parent, c["label"]) if c.get("label") else None,
                "masks": {k: _rel(path.parent, v) for k, v in (c.get("masks") or {}).items()},
                "annotated": c.get("annotated"),
                "split": c.get("split"),
            }
        )
    return _build(ds, raw, catalog, None, masks_mode=False, per_case_annotated=True)


_ADAPTERS = {
    "files": _files_cases,
    "folder": _folder_cases,
    "msd": _msd_cases,
    "totalsegmentator": _totalseg_cases,
    "exported": _exported_cases,
}


def dataset_cases(ds: DatasetSection, config: TrainingConfig, catalog: ClassCatalog | None = None) -> list[CaseSpec]:
    """The cases of one dataset entry (files are not opened; :func:`training.check.check_config` does that)."""
    return _ADAPTERS[ds.type](ds, config, catalog or load_catalog(config))


def collect_cases(config: TrainingConfig, catalog: ClassCatalog | None = None) -> list[CaseSpec]:
    """All cases of all datasets, in config order."""
    catalog = catalog or load_catalog(config)
    cases: list[CaseSpec] = []
    for ds in config.datasets:
        cases.extend(dataset_cases(ds, config, catalog))
    return cases


def split_cases(cases: Iterable[CaseSpec]) -> tuple[list[CaseSpec], list[CaseSpec]]:
    """(training cases, validation cases); ``both`` cases are in both."""
    cases = list(cases)
    return [c for c in cases if c.split in ("train", "both")], [c for c in cases if c.split in ("val", "both")]


# ------------------------------------------------------------------------------------------------ reading labels


@dataclass
class CaseLabels:
    """A case's labels, read and encoded for training.

    ``array``: (S, z, y, x) uint8, one channel for a label map or one per structure mask; small integer codes.
    ``classes``: catalog index -> [(channel, code)] whose union is that class (empty: annotated as absent).
    ``values``: label values found in the label map (for checks); ``unknown``: values not in the known table.
    """

    array: np.ndarray
    classes: dict[int, list[tuple[int, int]]]
    values: set[int] = field(default_factory=set)
    unknown: set[int] = field(default_factory=set)


def geometry_mismatch(image, other) -> str | None:
    """Why two SimpleITK images (or ImageFileReaders after ReadImageInformation) are not on the same grid, or None."""
    if tuple(image.GetSize()) != tuple(other.GetSize()):
        return f"size {tuple(other.GetSize())} differs from the image's {tuple(image.GetSize())}"
    sp_a, sp_b = np.asarray(image.GetSpacing()), np.asarray(other.GetSpacing())
    if not np.allclose(sp_a, sp_b, rtol=1e-3, atol=1e-4):
        return f"spacing {tuple(np.round(sp_b, 4))} differs from the image's {tuple(np.round(sp_a, 4))}"
    if not np.allclose(image.GetOrigin(), other.GetOrigin(), atol=max(1e-2, 0.05 * float(sp_a.min()))):
        return f"origin {tuple(np.round(other.GetOrigin(), 2))} differs from the image's {tuple(np.round(image.GetOrigin(), 2))}"
    if not np.allclose(image.GetDirection(), other.GetDirection(), atol=1e-4):
        return "orientation (direction cosines) differs from the image's"
    return None


def _side_of_components(mask: np.ndarray, x_lps: np.ndarray, midline: float) -> tuple[np.ndarray, np.ndarray]:
    """Split a (z, y, x) mask into the patient's right and left parts: each 26-connected component goes to the side of
    its centre relative to the body midline (LPS x: the patient's right has the smaller x)."""
    import cc3d

    labels = cc3d.connected_components(mask.astype(np.uint8), connectivity=26)
    right = np.zeros_like(mask, dtype=bool)
    n = int(labels.max())
    if n == 0:
        return right, right.copy()
    xs = np.broadcast_to(x_lps, mask.shape)[labels > 0]
    ids = labels[labels > 0]
    centre = np.bincount(ids, weights=xs, minlength=n + 1)[1:] / np.maximum(np.bincount(ids, minlength=n + 1)[1:], 1)
    right_ids = np.flatnonzero(centre < midline) + 1
    right = np.isin(labels, right_ids)
    return right, mask & ~right


def _body_midline(image_array: np.ndarray, x_lps: np.ndarray) -> float:
    """LPS x of the body's centre: mean x of voxels above -300 HU (the whole scan if none are)."""
    body = image_array > -300
    xs = np.broadcast_to(x_lps, image_array.shape)
    return float(xs[body].mean()) if body.any() else float(xs.mean())


def _x_lps(image) -> np.ndarray:
    """LPS x coordinate of each voxel of a SimpleITK image, broadcastable to its (z, y, x) array."""
    size = image.GetSize()
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing())
    row = direction[0] * spacing  # x_lps = origin_x + sum_j D[0, j] * spacing[j] * index[j]
    i = np.arange(size[0])[None, None, :] * row[0]
    j = np.arange(size[1])[None, :, None] * row[1]
    k = np.arange(size[2])[:, None, None] * row[2]
    return image.GetOrigin()[0] + i + j + k


def read_case_labels(case: CaseSpec | Mapping[Any, Any], image=None) -> CaseLabels:
    """Read and encode a case's labels (see :class:`CaseLabels`). ``image`` (SimpleITK) is needed only when a source
    is split by side, and for the geometry check (skipped when None).

    Raises InputError for a missing/unreadable file, a label grid differing from the image's, or (label maps) values
    that are neither mapped, named nor ignored.
    """
    import SimpleITK as sitk

    data = case.to_data() if isinstance(case, CaseSpec) else dict(case)
    name = data["case"]
    sources: list[tuple[int, list[tuple[Any, str | None]]]] = [
        (int(c), [(k, s) for k, s in refs]) for c, refs in data["sources"]
    ]

    def read(path: str) -> "sitk.Image":
        if not Path(path).is_file():
            raise InputError(f"case {name}: label file not found: {path}")
        try:
            img = sitk.ReadImage(str(path))
        except RuntimeError as exc:
            raise InputError(
                f"case {name}: cannot read label {path} ({str(exc).strip().splitlines()[-1][:120]})"
            ) from None
        if img.GetDimension() != 3 or img.GetNumberOfComponentsPerPixel() != 1:
            raise InputError(f"case {name}: label {path} must be a 3-D single-component image")
        if image is not None:
            why = geometry_mismatch(image, img)
            if why:
                raise InputError(f"case {name}: label {Path(path).name} is not on the image grid: {why}")
        return img

    needs_side = any(s for _, refs in sources for _, s in refs)
    x_lps: np.ndarray | None = None
    midline = 0.0
    if needs_side:
        if image is None:
            raise InputError(f"case {name}: a left/right split needs the image")
        x_lps = _x_lps(image)
        midline = _body_midline(sitk.GetArrayViewFromImage(image), x_lps)

    def sides(sel: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        assert x_lps is not None  # only called for the sides that needs_side found
        return _side_of_components(sel, x_lps, midline)

    classes: dict[int, list[tuple[int, int]]] = {c: [] for c in data["annotated"]}
    values: set[int] = set()
    unknown: set[int] = set()
    if data["label"]:
        arr = sitk.GetArrayFromImage(read(data["label"]))
        if not np.issubdtype(arr.dtype, np.integer):
            if not np.all(np.mod(arr, 1) == 0):
                raise InputError(
                    f"case {name}: label {data['label']} has non-integer values; labels must be integer maps"
                )
            arr = arr.astype(np.int64)
        values = {int(v) for v in np.unique(arr)}
        unknown = values - set(data["known_values"])
        if unknown:
            raise InputError(
                f"case {name}: label value(s) {sorted(unknown)[:8]} in {Path(data['label']).name} are not in the dataset's "
                "label names or mapping; add them to 'label_names' or 'ignore_labels'"
            )
        # Compact codes: one per (value, side) in use; an unsplit source of a split value takes both halves.
        split_values = {int(k) for _, refs in sources for k, s in refs if s}
        codes: dict[tuple[int, str | None], int] = {}
        for _, refs in sources:
            for k, s in refs:
                k = int(k)
                keys = [(k, "right"), (k, "left")] if k in split_values else [(k, None)]
                for key in keys:
                    codes.setdefault(key, len(codes) + 1)
        if len(codes) > 255:
            raise InputError(f"case {name}: more than 255 source labels are mapped; merge some classes")
        out = np.zeros(arr.shape, dtype=np.uint8)
        for (k, s), code in codes.items():
            sel = arr == k
            if s is not None:
                right, left = sides(sel)
                sel = right if s == "right" else left
            out[sel] = code
        for c, refs in sources:
            for k, s in refs:
                k = int(k)
                if s is None and k in split_values:
                    classes[c] += [(0, codes[(k, "right")]), (0, codes[(k, "left")])]
                else:
                    classes[c].append((0, codes[(k, s)]))
        array = out[None]
    else:
        channels = []
        for channel, (structure, path) in enumerate(data["masks"]):
            arr = sitk.GetArrayFromImage(read(path))
            vals = set(np.unique(arr).tolist())
            if not vals <= {0, 1} and not vals <= {0, 255}:
                raise InputError(
                    f"case {name}: mask {Path(path).name} is not binary (values {sorted(vals)[:6]}); masks must hold 0 and 1"
                )
            sel = arr > 0
            split = any(s for _, refs in sources for k, s in refs if str(k) == structure)
            if split:
                right, left = sides(sel)
                channels.append(right.astype(np.uint8) + 2 * left.astype(np.uint8))
            else:
                channels.append(sel.astype(np.uint8))
            for c, refs in sources:
                for k, s in refs:
                    if str(k) != structure:
                        continue
                    if split:
                        classes[c] += (
                            [(channel, 1)]
                            if s == "right"
                            else [(channel, 2)]
                            if s == "left"
                            else [(channel, 1), (channel, 2)]
                        )
                    else:
                        classes[c].append((channel, 1))
        if not channels:
            # Annotated-as-absent only: one empty channel keeps the shape.
            ref = image if image is not None else None
            shape = sitk.GetArrayViewFromImage(ref).shape if ref is not None else (1, 1, 1)
            channels.append(np.zeros(shape, dtype=np.uint8))
        array = np.stack(channels)
    return CaseLabels(array=array, classes=classes, values=values, unknown=unknown)


def class_masks(labels: CaseLabels, classes: Sequence[int] | None = None) -> dict[int, np.ndarray]:
    """Binary (z, y, x) mask per annotated catalog class, from encoded labels."""
    out = {}
    for c, pairs in labels.classes.items():
        if classes is not None and c not in classes:
            continue
        m = np.zeros(labels.array.shape[1:], dtype=bool)
        for ch, code in pairs:
            m |= labels.array[ch] == code
        out[c] = m
    return out
