"""The module's terminology file (issue 13, defect 7): every class's code triple resolves in it, read by Slicer's own
terminology logic (``vtkSlicerTerminologiesModuleLogic`` from slicer-core), and the segment tags name it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "UniversalSeg"))

from conftest import require_slicer_core  # noqa: E402
from UniversalSegLib.catalog import ClassCatalog  # noqa: E402
from UniversalSegSlicerLib import terminology  # noqa: E402

slicer = require_slicer_core()  # skips without slicer-core; fails in CI
CATALOG = ClassCatalog.default()


def _codes(obj) -> tuple[str, str]:
    return obj.GetCodingSchemeDesignator(), obj.GetCodeValue()


def _resolve(logic, context: str, category, type_, modifier) -> tuple[str, str, str] | None:
    """(category, type, modifier) meanings of the triple in ``context`` only (no fall-back to other lists)."""
    for ci in range(logic.GetNumberOfCategoriesInTerminology(context)):
        cat = slicer.vtkSlicerTerminologyCategory()
        logic.GetNthCategoryInTerminology(context, ci, cat)
        if _codes(cat) != (category.scheme, category.code):
            continue
        for ti in range(logic.GetNumberOfTypesInTerminologyCategory(context, cat)):
            typ = slicer.vtkSlicerTerminologyType()
            logic.GetNthTypeInTerminologyCategory(context, cat, ti, typ)
            if _codes(typ) != (type_.scheme, type_.code):
                continue
            if modifier is None:
                return cat.GetCodeMeaning(), typ.GetCodeMeaning(), ""
            for mi in range(logic.GetNumberOfTypeModifiersInTerminologyType(context, cat, typ)):
                mod = slicer.vtkSlicerTerminologyType()
                logic.GetNthTypeModifierInTerminologyType(context, cat, typ, mi, mod)
                if _codes(mod) == (modifier.scheme, modifier.code):
                    return cat.GetCodeMeaning(), typ.GetCodeMeaning(), mod.GetCodeMeaning()
    return None


@pytest.fixture(scope="module")
def logic():
    logic = slicer.vtkSlicerTerminologiesModuleLogic()
    assert terminology.load_terminology(logic) == terminology.TERMINOLOGY_CONTEXT
    return logic


def test_every_class_resolves_in_the_shipped_file(logic):
    assert len(CATALOG) == 32
    for info in CATALOG:
        assert info.terminology_context == terminology.TERMINOLOGY_CONTEXT, info.name
        found = _resolve(logic, info.terminology_context, info.category, info.type, info.type_modifier)
        assert found == (
            info.category.meaning,
            info.type.meaning,
            info.type_modifier.meaning if info.type_modifier else "",
        ), info.name
    # the tag the module writes parses back to the same codes with Slicer's own deserializer
    entry = slicer.vtkSlicerTerminologyEntry()
    femoral_head = CATALOG.lookup("left_head_of_femur")
    assert logic.DeserializeTerminologyEntry(CATALOG.slicer_terminology(femoral_head), entry)
    assert entry.GetTerminologyContextName() == terminology.TERMINOLOGY_CONTEXT
    assert _codes(entry.GetTypeObject()) == ("SCT", "2812003")
    assert CATALOG.lookup("intestine").type.meaning == "Small Intestine"  # Slicer's spelling


def test_resolution_check_can_fail(logic):
    """The check above would catch a class missing from the file (e.g. the femoral head in Slicer's lists)."""
    head = CATALOG.lookup("right_head_of_femur")
    assert _resolve(logic, terminology.TERMINOLOGY_CONTEXT, head.category, head.type, None) is not None
    missing = type(head.type)("SCT", "2812004", "not a class")
    assert _resolve(logic, terminology.TERMINOLOGY_CONTEXT, head.category, missing, None) is None


def test_shipped_file_is_generated_from_the_catalog():
    assert terminology.TERMINOLOGY_FILE.read_text(encoding="utf-8") == terminology.terminology_text(), (
        "run `python UniversalSeg/UniversalSegSlicerLib/terminology.py` after editing the class catalog"
    )
    doc = json.loads(terminology.TERMINOLOGY_FILE.read_text(encoding="utf-8"))
    assert doc["SegmentationCategoryTypeContextName"] == terminology.TERMINOLOGY_CONTEXT
    tumours = next(c for c in doc["SegmentationCodes"]["Category"] if c["CodeValue"] == "49755003")
    assert tumours["showAnatomy"] is True  # tumours carry their organ as anatomic region


def test_module_cmake_ships_the_file():
    cmake = (REPO / "UniversalSeg" / "CMakeLists.txt").read_text(encoding="utf-8")
    assert f"Resources/{terminology.TERMINOLOGY_FILE.name}" in cmake
