"""The 32-class catalog of the CLIP-Driven Universal Model.

Index ``i`` (1-based) is model output channel ``i - 1``. The catalog carries, per class, the display name, the
upstream CLIP prompt spelling (the shipped class embeddings were made from it, typos included), the names
radiologists type, a recommended colour and the DICOM / 3D Slicer terminology codes used when segments are written
to ``.seg.nrrd`` or DICOM SEG. The data lives in ``data/classes.json``; this module only loads and queries it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from UniversalSegLib.errors import ClassNameError

__all__ = [
    "PROMPT_TEMPLATE",
    "CodedConcept",
    "ClassInfo",
    "ClassCatalog",
    "normalize_name",
    "DEFAULT_CLASSES_JSON",
    "model_class_indices",
    "rows_for",
]

PROMPT_TEMPLATE = "A computerized tomography of a {}"
DEFAULT_CLASSES_JSON = Path(__file__).resolve().parent / "data" / "classes.json"
KINDS = ("organ", "vessel", "tumor", "cyst")
ANATOMIC_CONTEXT = "Anatomic codes - DICOM master list"


def normalize_name(text: str) -> str:
    """Lower-case, punctuation/underscores to spaces, whitespace collapsed: "Gall-Bladder " -> "gall bladder"."""
    return " ".join(re.sub(r"[^0-9a-z]+", " ", text.lower()).split())


@dataclass(frozen=True)
class CodedConcept:
    """One DICOM / Slicer code triplet, e.g. ``CodedConcept("SCT", "10200004", "Liver")``."""

    scheme: str
    code: str
    meaning: str

    @classmethod
    def from_dict(cls, d: dict | None) -> "CodedConcept | None":
        if d is None:
            return None
        return cls(str(d["scheme"]), str(d["code"]), str(d["meaning"]))

    def slicer(self) -> str:
        """``scheme^code^meaning`` as in a Slicer terminology entry."""
        return f"{self.scheme}^{self.code}^{self.meaning}"


@dataclass(frozen=True)
class ClassInfo:
    """One catalog class. ``index`` is 1-based (model channel + 1)."""

    index: int
    name: str
    prompt_name: str
    file_stem: str
    kind: str
    synonyms: tuple[str, ...]
    parents: tuple[int, ...]
    laterality: str | None
    color: tuple[int, int, int]
    category: CodedConcept
    type: CodedConcept
    type_modifier: CodedConcept | None
    anatomic_region: CodedConcept | None
    terminology_context: str = "Segmentation category and type - 3D Slicer General Anatomy list"
    note: str | None = None

    @property
    def prompt(self) -> str:
        """The CLIP prompt the class embedding was made from, e.g. "A computerized tomography of a Arota"."""
        return PROMPT_TEMPLATE.format(self.prompt_name)

    @property
    def channel(self) -> int:
        """0-based model output channel."""
        return self.index - 1

    @property
    def all_names(self) -> tuple[str, ...]:
        """Display name, prompt name, file stem and synonyms (as written in the catalog)."""
        return (self.name, self.prompt_name, self.file_stem, *self.synonyms)


class ClassCatalog:
    """Ordered, queryable collection of :class:`ClassInfo` (index 1..N)."""

    def __init__(self, classes: Iterable[ClassInfo]):
        self._classes: tuple[ClassInfo, ...] = tuple(sorted(classes, key=lambda c: c.index))
        if [c.index for c in self._classes] != list(range(1, len(self._classes) + 1)):
            raise ClassNameError("class catalog indices must be 1..N without gaps; fix the catalog JSON")
        self._by_key: dict[str, ClassInfo] = {}
        for info in self._classes:
            if info.kind not in KINDS:
                raise ClassNameError(
                    f"class '{info.name}' has unknown kind '{info.kind}'; use one of {', '.join(KINDS)}"
                )
            for alias in info.all_names:
                key = normalize_name(alias)
                other = self._by_key.get(key)
                if other is not None and other.index != info.index:
                    raise ClassNameError(
                        f"name '{alias}' is given to both '{other.name}' and '{info.name}'; fix the catalog JSON"
                    )
                self._by_key[key] = info
        for info in self._classes:
            for p in info.parents:
                if not 1 <= p <= len(self._classes):
                    raise ClassNameError(f"class '{info.name}' names unknown parent index {p}; fix the catalog JSON")

    # ------------------------------------------------------------------ construction
    @classmethod
    def default(cls) -> "ClassCatalog":
        """The packaged 32-class catalog (loaded once, then cached)."""
        return _default_catalog()

    @classmethod
    def from_json(cls, path: str | Path) -> "ClassCatalog":
        """Load a catalog from a JSON file shaped like ``data/classes.json``."""
        path = Path(path)
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ClassNameError(f"class catalog file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise ClassNameError(f"class catalog {path} is not valid JSON ({e})") from None
        try:
            items = doc["classes"]
            classes = [
                ClassInfo(
                    index=int(d["index"]),
                    name=str(d["name"]),
                    prompt_name=str(d.get("prompt_name") or d["name"]),
                    file_stem=str(d["file_stem"]),
                    kind=str(d["kind"]),
                    synonyms=tuple(str(s) for s in d.get("synonyms", ())),
                    parents=tuple(int(p) for p in d.get("parents", ())),
                    laterality=d.get("laterality"),
                    color=tuple(int(v) for v in d["color"]),  # type: ignore[arg-type]
                    category=CodedConcept.from_dict(d["category"]),  # type: ignore[arg-type]
                    type=CodedConcept.from_dict(d["type"]),  # type: ignore[arg-type]
                    type_modifier=CodedConcept.from_dict(d.get("type_modifier")),
                    anatomic_region=CodedConcept.from_dict(d.get("anatomic_region")),
                    terminology_context=str(
                        d.get("terminology_context")
                        or "Segmentation category and type - 3D Slicer General Anatomy list"
                    ),
                    note=d.get("note"),
                )
                for d in items
            ]
        except (KeyError, TypeError, ValueError) as e:
            raise ClassNameError(
                f"class catalog {path} is malformed ({e!r}); compare it with data/classes.json"
            ) from None
        return cls(classes)

    # ------------------------------------------------------------------ container protocol
    def __len__(self) -> int:
        return len(self._classes)

    def __iter__(self) -> Iterator[ClassInfo]:
        return iter(self._classes)

    def __getitem__(self, index: int) -> ClassInfo:
        """Class by 1-based catalog index."""
        if isinstance(index, bool) or not isinstance(index, int) or not 1 <= index <= len(self._classes):
            raise ClassNameError(f"class index {index!r} is out of range; use 1..{len(self._classes)}")
        return self._classes[index - 1]

    @property
    def names(self) -> list[str]:
        """Display names in index order."""
        return [c.name for c in self._classes]

    def aliases(self) -> dict[str, ClassInfo]:
        """Normalized name/synonym -> class (a copy; used by the prompt resolver)."""
        return dict(self._by_key)

    # ------------------------------------------------------------------ lookup
    def find(self, name: str) -> ClassInfo | None:
        """Exact (case/space/punctuation-insensitive) match of any name or synonym, else None."""
        return self._by_key.get(normalize_name(name))

    def lookup(self, name: str) -> ClassInfo:
        """Like :meth:`find` but raises ``ClassNameError`` with a "did you mean" suggestion."""
        info = self.find(name)
        if info is not None:
            return info
        suggestion = self.suggest(name, limit=1)
        hint = f"; did you mean '{suggestion[0]}'?" if suggestion else f"; known classes: {', '.join(self.names)}"
        raise ClassNameError(f"unknown class '{name}'{hint}")

    def suggest(self, text: str, limit: int = 3) -> list[str]:
        """Display names of the classes whose names/synonyms look most like ``text`` (best first, no duplicates)."""
        from rapidfuzz import fuzz, process, utils

        query = normalize_name(text)
        if not query:
            return []
        keys = list(self._by_key)
        out: list[str] = []
        for key, _score, _ in process.extract(
            query, keys, scorer=fuzz.WRatio, processor=utils.default_process, limit=limit * 8
        ):
            name = self._by_key[key].name
            if name not in out:
                out.append(name)
            if len(out) == limit:
                break
        return out

    def select(self, names: str | Iterable[str]) -> list[ClassInfo]:
        """Classes for ``"all"``, a comma-separated string or an iterable of names/indices.

        Returned sorted by index, without duplicates; unknown names raise ``ClassNameError``.
        """
        if isinstance(names, str):
            parts = [p.strip() for p in names.split(",")]
        else:
            parts = [p if isinstance(p, int) else str(p).strip() for p in names]
        chosen: dict[int, ClassInfo] = {}
        for p in parts:
            if isinstance(p, int):
                info = self[p]
                chosen[info.index] = info
                continue
            if not p:
                continue
            if normalize_name(p) == "all":
                return list(self._classes)
            info = self.lookup(p)
            chosen[info.index] = info
        if not chosen:
            raise ClassNameError("no class names given; name at least one class or use 'all'")
        return [chosen[i] for i in sorted(chosen)]

    # ------------------------------------------------------------------ terminology
    def slicer_terminology(self, info: ClassInfo) -> str:
        """3D Slicer ``TerminologyEntry`` segment tag for ``info``.

        Format (Slicer developer guide, "TerminologyEntry tag"; same as ``slicerio``):
        ``context~category~type~typeModifier~anatomicContext~anatomicRegion~anatomicRegionModifier``, each code as
        ``scheme^value^meaning`` and empty codes as ``^^``.
        """
        parts = [
            info.terminology_context,
            info.category.slicer(),
            info.type.slicer(),
            info.type_modifier.slicer() if info.type_modifier else "^^",
            ANATOMIC_CONTEXT,
            info.anatomic_region.slicer() if info.anatomic_region else "^^",
            "^^",
        ]
        return "~".join(parts)


@lru_cache(maxsize=1)
def _default_catalog() -> ClassCatalog:
    return ClassCatalog.from_json(DEFAULT_CLASSES_JSON)


# ---------------------------------------------------------------------------------------------------- model classes
def _row_names(model_or_names: Any) -> tuple[list[str], str]:
    """(names of the model's rows, a label for messages) of a model (``class_names``) or a list of names."""
    names = getattr(model_or_names, "class_names", model_or_names)
    if isinstance(names, str) or not isinstance(names, Sequence):
        raise TypeError(
            f"expected a model with class_names or a list of class names, got {type(model_or_names).__name__}"
        )
    label = ""
    meta = getattr(model_or_names, "metadata", None)
    if isinstance(meta, dict) and meta.get("name"):
        label = f" {meta['name']!r}"
    return [str(n) for n in names], label


def model_class_indices(
    model_or_names: Any, catalog: ClassCatalog | None = None, *, strict: bool = True
) -> list[int | None]:
    """The catalog index of each row of a model's class embeddings (``model.class_names``, or a list of names).

    This is the one mapping from a model's rows to catalog classes (engine, training, benchmarks). A row is matched by
    its catalog file stem first ("right_kidney"), then by display name, upstream prompt name or synonym (case, space
    and punctuation insensitive, :meth:`ClassCatalog.find`); its position in the model says nothing.

    Raises:
        ClassNameError: (``strict``) a row no catalog class answers to, or two rows naming one class; one line.
            Without ``strict`` such rows map to None (a duplicate keeps its first row).
    """
    catalog = catalog or ClassCatalog.default()
    names, label = _row_names(model_or_names)
    by_stem = {c.file_stem: c for c in catalog}
    out: list[int | None] = []
    seen: dict[int, int] = {}
    for row, name in enumerate(names):
        info = by_stem.get(name.strip()) or catalog.find(name)
        if info is not None and info.index in seen:
            if strict:
                raise ClassNameError(
                    f"model{label}: rows {seen[info.index]} and {row} both name class "
                    f"'{info.name}'; fix the checkpoint's class_names"
                )
            info = None
        if info is None:
            if strict:
                raise ClassNameError(
                    f"model{label}: row {row} is class '{name}', which the class catalog does not "
                    "know; give the catalog the model was trained with"
                )
            out.append(None)
            continue
        seen[info.index] = row
        out.append(info.index)
    return out


def rows_for(model_or_names: Any, indices: Iterable[int], catalog: ClassCatalog | None = None) -> list[int]:
    """The model rows (0-based, into ``organ_embedding``) of the given catalog indices, in their order: the inverse
    of :func:`model_class_indices`. Rows the catalog does not know are ignored here.

    Raises:
        ClassNameError: the model has no row for one of ``indices`` (it was not trained for that class).
    """
    catalog = catalog or ClassCatalog.default()
    names, label = _row_names(model_or_names)
    row_of = {
        index: row for row, index in enumerate(model_class_indices(names, catalog, strict=False)) if index is not None
    }
    out = []
    for index in indices:
        info = catalog[int(index)]
        if info.index not in row_of:
            raise ClassNameError(f"model{label} was not trained for {info.name!r}; it knows: " + ", ".join(names))
        out.append(row_of[info.index])
    return out
