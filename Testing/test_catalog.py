"""Tests of the 32-class catalog (UniversalSegLib.catalog, data/classes.json)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import shared_path
from UniversalSegLib.catalog import PROMPT_TEMPLATE, ClassCatalog, normalize_name
from UniversalSegLib.errors import ClassNameError, UniversalSegError

# Official order (upstream ORGAN_NAME of pretrained_weights/clip_embedding.py, display spellings).
OFFICIAL = [
    "Spleen",
    "Right Kidney",
    "Left Kidney",
    "Gall Bladder",
    "Esophagus",
    "Liver",
    "Stomach",
    "Aorta",
    "Postcava",
    "Portal Vein and Splenic Vein",
    "Pancreas",
    "Right Adrenal Gland",
    "Left Adrenal Gland",
    "Duodenum",
    "Hepatic Vessel",
    "Right Lung",
    "Left Lung",
    "Colon",
    "Intestine",
    "Rectum",
    "Bladder",
    "Prostate",
    "Left Head of Femur",
    "Right Head of Femur",
    "Celiac Trunk",
    "Kidney Tumor",
    "Liver Tumor",
    "Pancreas Tumor",
    "Hepatic Vessel Tumor",
    "Lung Tumor",
    "Colon Tumor",
    "Kidney Cyst",
]
VESSELS = {"Aorta", "Postcava", "Portal Vein and Splenic Vein", "Hepatic Vessel", "Celiac Trunk"}


@pytest.fixture(scope="module")
def cat() -> ClassCatalog:
    return ClassCatalog.default()


def test_32_classes_in_official_order(cat):
    assert len(cat) == 32
    assert cat.names == OFFICIAL
    assert [c.index for c in cat] == list(range(1, 33))
    assert [c.channel for c in cat] == list(range(32))
    assert cat[1].name == "Spleen" and cat[32].name == "Kidney Cyst"


def test_prompt_names_keep_upstream_spelling(cat):
    assert cat[8].prompt_name == "Arota"
    assert cat[25].prompt_name == "Celiac Truck"
    assert cat[8].prompt == "A computerized tomography of a Arota"
    others = [c for c in cat if c.index not in (8, 25)]
    assert all(c.prompt_name == c.name for c in others)
    assert all(c.prompt == PROMPT_TEMPLATE.format(c.prompt_name) for c in cat)


def test_every_class_is_complete(cat):
    for c in cat:
        assert c.name and c.prompt_name and c.file_stem
        assert c.kind in ("organ", "vessel", "tumor", "cyst")
        assert len(c.color) == 3 and all(0 <= v <= 255 for v in c.color)
        for code in (c.category, c.type):
            assert code.scheme == "SCT"
            assert re.fullmatch(r"\d{6,18}", code.code), (c.name, code)
            assert code.meaning
        assert c.category.code in ("123037004", "49755003", "85756007")


def test_kind_drives_the_slicer_category_and_lookup(cat):
    """A class's kind decides its terminology category in Slicer (lesions are morphologically altered structures,
    the rest anatomical structures) and is what the public lookup reports for what users type."""
    from slicerio.segmentation import terminology_entry_from_string

    for c in cat:
        category = terminology_entry_from_string(cat.slicer_terminology(c))["category"]
        assert (category[1] == "49755003") == (c.kind in ("tumor", "cyst")), c.name
    kinds = {
        "HCC": "tumor",
        "renal cell carcinoma": "tumor",
        "IVC": "vessel",
        "celiac axis": "vessel",
        "renal cyst": "cyst",
        "GB": "organ",
        "small bowel": "organ",
    }
    assert {text: cat.lookup(text).kind for text in kinds} == kinds
    assert {c.name for c in cat if c.kind == "vessel"} == VESSELS


def test_lesions_name_organ_parents(cat):
    expected = {
        "Kidney Tumor": {"Right Kidney", "Left Kidney"},
        "Kidney Cyst": {"Right Kidney", "Left Kidney"},
        "Liver Tumor": {"Liver"},
        "Pancreas Tumor": {"Pancreas"},
        "Hepatic Vessel Tumor": {"Liver"},
        "Lung Tumor": {"Right Lung", "Left Lung"},
        "Colon Tumor": {"Colon"},
    }
    for c in cat:
        if c.kind in ("tumor", "cyst"):
            parents = [cat[p] for p in c.parents]
            assert {p.name for p in parents} == expected[c.name]
            assert all(p.kind == "organ" for p in parents)
            # the anatomic region code is the parents' organ code
            assert c.anatomic_region is not None
            assert {p.type.code for p in parents} == {c.anatomic_region.code}
            assert c.category.code == "49755003"
        else:
            assert c.parents == ()


def test_laterality_matches_modifier(cat):
    for c in cat:
        if c.laterality == "right":
            assert c.type_modifier.code == "24028007" and c.name.startswith("Right")
        elif c.laterality == "left":
            assert c.type_modifier.code == "7771000" and c.name.startswith("Left")
        else:
            assert c.laterality is None and c.type_modifier is None
    # paired organs share the organ code
    assert cat[2].type == cat[3].type and cat[16].type == cat[17].type and cat[23].type == cat[24].type


def test_codes_agree_with_dicom_dictionary(cat):
    """Code meanings are DICOM's (pydicom ships the PS3.16 code dictionary)."""
    from pydicom.sr.codedict import codes

    checks = {
        "Liver": "Liver",
        "Spleen": "Spleen",
        "Right Kidney": "Kidney",
        "Stomach": "Stomach",
        "Aorta": "Aorta",
        "Postcava": "InferiorVenaCava",
        "Portal Vein and Splenic Vein": "PortalVein",
        "Pancreas": "Pancreas",
        "Right Adrenal Gland": "AdrenalGland",
        "Duodenum": "Duodenum",
        "Right Lung": "Lung",
        "Colon": "Colon",
        "Intestine": "SmallIntestine",
        "Rectum": "Rectum",
        "Bladder": "Bladder",
        "Prostate": "Prostate",
        "Right Head of Femur": "FemoralHead",
        "Gall Bladder": "Gallbladder",
        "Esophagus": "Esophagus",
        "Kidney Cyst": "Cyst",
        "Liver Tumor": "Neoplasm",
        "Left Head of Femur": "FemoralHead",
    }
    by = {c.name: c for c in cat}
    for name, attr in checks.items():
        code = getattr(codes.SCT, attr)
        assert by[name].type.code == code.value, name
        assert by[name].type.meaning.lower() == code.meaning.lower(), name
    assert codes.SCT.Right.value == "24028007" and codes.SCT.Left.value == "7771000"
    assert by["Hepatic Vessel"].note  # a generic code where DICOM has none for the class: the choice is explained


def test_synonyms_cover_common_abbreviations(cat):
    expect = {
        "IVC": "Postcava",
        "inferior vena cava": "Postcava",
        "GB": "Gall Bladder",
        "gallbladder": "Gall Bladder",
        "oesophagus": "Esophagus",
        "L kidney": "Left Kidney",
        "lt kidney": "Left Kidney",
        "R kidney": "Right Kidney",
        "rt kidney": "Right Kidney",
        "small bowel": "Intestine",
        "small intestine": "Intestine",
        "urinary bladder": "Bladder",
        "left femoral head": "Left Head of Femur",
        "right adrenal": "Right Adrenal Gland",
        "RCC": "Kidney Tumor",
        "renal cell carcinoma": "Kidney Tumor",
        "HCC": "Liver Tumor",
        "hepatic lesion": "Liver Tumor",
        "colon cancer": "Colon Tumor",
        "portal vein": "Portal Vein and Splenic Vein",
        "splenic vein": "Portal Vein and Splenic Vein",
        "coeliac trunk": "Celiac Trunk",
        "celiac artery": "Celiac Trunk",
        "large bowel": "Colon",
        "renal cyst": "Kidney Cyst",
        "pulmonary nodule": "Lung Tumor",
        "pancreatic mass": "Pancreas Tumor",
        "PDAC": "Pancreas Tumor",
    }
    for text, name in expect.items():
        assert cat.lookup(text).name == name, text


def test_no_synonym_maps_to_the_wrong_structure(cat):
    # abbreviations that would be medically wrong for this catalog
    for text in ("SMV", "SMA", "SVC", "bowel", "kidney", "lung", "adrenal gland", "femoral head", "CA"):
        assert cat.find(text) is None, text


def test_lookup_is_case_space_and_punctuation_insensitive(cat):
    assert cat.lookup("  lIvEr ").name == "Liver"
    assert cat.lookup("gall-bladder").name == "Gall Bladder"
    assert cat.lookup("PORTAL_VEIN_AND_SPLENIC_VEIN").index == 10
    assert cat.lookup("celiac truck").name == "Celiac Trunk"
    assert cat.lookup("Arota").name == "Aorta"
    assert cat.lookup("right_kidney").index == 2
    assert normalize_name(" Left--Head  of_Femur ") == "left head of femur"


def test_unknown_name_raises_with_suggestion(cat):
    with pytest.raises(ClassNameError, match=r"unknown class 'livr'; did you mean 'Liver'\?"):
        cat.lookup("livr")
    with pytest.raises(ClassNameError, match="did you mean 'Pancreas'"):
        cat.lookup("pancraes")
    assert issubclass(ClassNameError, UniversalSegError)


def test_select(cat):
    assert [c.index for c in cat.select("all")] == list(range(1, 33))
    assert [c.name for c in cat.select("spleen, liver,IVC, Liver")] == ["Spleen", "Liver", "Postcava"]
    assert [c.index for c in cat.select(["GB", 1])] == [1, 4]
    with pytest.raises(ClassNameError):
        cat.select("liver, heart")
    with pytest.raises(ClassNameError):
        cat.select("")
    with pytest.raises(ClassNameError):
        cat[33]
    with pytest.raises(ClassNameError):
        cat[0]


def test_file_stems_unique_snake_case(cat):
    stems = [c.file_stem for c in cat]
    assert len(set(stems)) == 32
    assert all(re.fullmatch(r"[a-z]+(_[a-z]+)*", s) for s in stems)
    assert cat[10].file_stem == "portal_vein_and_splenic_vein"


def test_slicer_terminology_strings(cat):
    from slicerio.segmentation import terminology_entry_from_string, terminology_entry_to_string

    liver = cat.lookup("liver")
    assert cat.slicer_terminology(liver) == (
        "Segmentation category and type - UniversalSeg~SCT^123037004^Anatomical Structure"
        "~SCT^10200004^Liver~^^~Anatomic codes - DICOM master list~^^~^^"
    )
    for c in cat:
        s = cat.slicer_terminology(c)
        parsed = terminology_entry_from_string(s)
        assert parsed["type"] == [c.type.scheme, c.type.code, c.type.meaning]
        assert parsed["category"][1] == c.category.code
        assert ("typeModifier" in parsed) == (c.type_modifier is not None)
        assert ("anatomicRegion" in parsed) == (c.anatomic_region is not None)
        assert terminology_entry_to_string(parsed) == s  # round-trips through Slicer's own format
    kt = terminology_entry_from_string(cat.slicer_terminology(cat[26]))
    assert kt["anatomicRegion"] == ["SCT", "64033007", "Kidney"]
    rk = terminology_entry_from_string(cat.slicer_terminology(cat[2]))
    assert rk["typeModifier"] == ["SCT", "24028007", "Right"]


def test_from_json_validates(tmp_path, cat):
    doc = json.loads((Path(__file__).resolve().parents[1] / "UniversalSegLib" / "data" / "classes.json").read_text())
    doc["classes"][1]["synonyms"].append("liver")  # same name for two classes
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(doc))
    with pytest.raises(ClassNameError, match="(?i)'liver' is given to both"):
        ClassCatalog.from_json(p)
    with pytest.raises(ClassNameError, match="not found"):
        ClassCatalog.from_json(tmp_path / "missing.json")
    assert ClassCatalog.default() is ClassCatalog.default()


def test_clip_embedding_fixture_matches_catalog():
    import torch

    emb = torch.load(shared_path("reference", "clip_txt_encoding_32.pth"), map_location="cpu", weights_only=True)
    assert tuple(emb.shape) == (32, 512)
    # the two Kidney rows are near-identical prompts ("Right Kidney"/"Left Kidney") -> most similar pair of row 2
    e = torch.nn.functional.normalize(emb.float(), dim=1)
    sim = e @ e.T
    sim.fill_diagonal_(-1)
    assert int(sim[1].argmax()) == 2 and int(sim[2].argmax()) == 1
    assert int(sim[15].argmax()) == 16  # Right Lung <-> Left Lung
