"""The module's terminology file: every catalog class as an entry of Slicer's Terminologies module.

Slicer's terminology selector only shows a segment's category/type/modifier when the code triple is found in the
terminology context named by its ``TerminologyEntry`` tag. Slicer's own lists (``Modules/Loadable/Terminologies/
Resources/*.json``, identical in 5.10 and 5.12) lack the femoral head (SCT 2812003), so UniversalSeg ships
``Resources/SegmentationCategoryTypeModifier-UniversalSeg.term.json`` in the same schema (dcmqi's
segment-context-schema, as SlicerTotalSegmentator does) with all 32 classes, and every segment it makes names
that context (``terminology_context`` in ``UniversalSegLib/data/classes.json``). Anatomic regions (for tumours
and hepatic vessels) stay in Slicer's "Anatomic codes - DICOM master list".

The file is generated from the catalog by :func:`build_terminology` (``python terminology.py`` rewrites it);
Testing/test_slicer_terminology.py checks that the shipped file is up to date and that Slicer's terminology logic
resolves every class in it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

TERMINOLOGY_CONTEXT = "Segmentation category and type - UniversalSeg"
TERMINOLOGY_FILE = (
    Path(__file__).resolve().parents[1] / "Resources" / "SegmentationCategoryTypeModifier-UniversalSeg.term.json"
)
_SCHEMA = "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/segment-context-schema.json#"


def _code(concept) -> dict[str, Any]:
    return {"CodingSchemeDesignator": concept.scheme, "CodeValue": concept.code, "CodeMeaning": concept.meaning}


def build_terminology(catalog=None) -> dict[str, Any]:
    """The terminology document for ``catalog`` (default: the packaged 32 classes). Classes sharing a category
    and type (right/left kidney; the tumours) share one type entry; laterality becomes its modifiers, each with
    that class's colour and name."""
    if catalog is None:
        from UniversalSegLib.catalog import ClassCatalog

        catalog = ClassCatalog.default()
    categories: dict[tuple[str, str], dict[str, Any]] = {}
    for info in catalog:
        category = categories.setdefault(
            (info.category.scheme, info.category.code), {**_code(info.category), "showAnatomy": False, "Type": []}
        )
        category["showAnatomy"] = category["showAnatomy"] or info.anatomic_region is not None
        entry = next(
            (
                t
                for t in category["Type"]
                if (t["CodingSchemeDesignator"], t["CodeValue"]) == (info.type.scheme, info.type.code)
            ),
            None,
        )
        if entry is None:
            entry = {**_code(info.type), "recommendedDisplayRGBValue": list(info.color), "3dSlicerLabel": info.name}
            category["Type"].append(entry)
        if info.type_modifier is not None:
            entry.setdefault("Modifier", []).append(
                {
                    **_code(info.type_modifier),
                    "recommendedDisplayRGBValue": list(info.color),
                    "3dSlicerLabel": info.name,
                }
            )
    return {
        "SegmentationCategoryTypeContextName": TERMINOLOGY_CONTEXT,
        "@schema": _SCHEMA,
        "SegmentationCodes": {"Category": list(categories.values())},
    }


def terminology_text(catalog=None) -> str:
    """:func:`build_terminology` as the file's text."""
    return json.dumps(build_terminology(catalog), indent=2) + "\n"


def load_terminology(terminologies_logic, path: str | Path = TERMINOLOGY_FILE) -> str:
    """Load the file into Slicer's Terminologies logic (``slicer.modules.terminologies.logic()``, a
    ``vtkSlicerTerminologiesModuleLogic``: ``LoadTerminologyFromFile`` in 5.10 and 5.12); returns the context name.

    Raises:
        RuntimeError: the logic did not accept the file (its name is then empty).
    """
    name = terminologies_logic.LoadTerminologyFromFile(str(path))
    if name != TERMINOLOGY_CONTEXT:
        raise RuntimeError(f"Slicer could not load the UniversalSeg terminology {path}; reinstall the extension")
    return name


if __name__ == "__main__":  # regenerate the shipped file after editing the catalog
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    TERMINOLOGY_FILE.write_text(terminology_text(), encoding="utf-8")
    print(f"wrote {TERMINOLOGY_FILE}")
