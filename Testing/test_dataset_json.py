"""dataset.json: one schema, one reader (clear one-line errors), one atomic writer, used by export and training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from UniversalSegLib.dataset_json import (
    EXPORTED_FORMAT,
    TrainingDataset,
    dataset_file,
    read_dataset_file,
    write_dataset_file,
)
from UniversalSegLib.errors import InputError, UniversalSegError

CASE = {
    "id": "s1",
    "image": "images/s1.nii.gz",
    "label": "labels/s1.nii.gz",
    "annotated": ["Liver"],
    "split": "train",
    "provenance": {"volume": "CT"},
}


def test_round_trip_keeps_every_field_and_unknown_top_level_keys(tmp_path):
    doc = TrainingDataset.new()
    assert doc.labels["0"] == "background" and doc.labels["6"] == "Liver" and doc.cases == []
    doc.upsert(CASE)
    doc.upsert(
        {"id": "s2", "image": "images/s2.nii.gz", "masks": {"Liver": "masks/s2/liver.nii.gz"}, "annotated": ["Liver"]}
    )
    doc.name, doc.updated, doc.extra = "corrections", "2026-01-01T00:00:00+00:00", {"comment": "kept"}
    path = write_dataset_file(tmp_path, doc)
    assert path == tmp_path / "dataset.json" == dataset_file(tmp_path)
    raw = json.loads(path.read_text(encoding="utf-8"))
    assert raw["format"] == EXPORTED_FORMAT and raw["format_version"] == 1 and raw["comment"] == "kept"
    again = read_dataset_file(tmp_path)
    assert again == doc and again.to_dict() == raw
    # upsert replaces the entry with the same id, never duplicates it
    replaced = again.upsert({**CASE, "annotated": ["Liver", "Spleen"]})
    assert replaced == CASE and again.case_ids() == ["s2", "s1"] and again.cases[-1]["annotated"] == ["Liver", "Spleen"]


def test_missing_file(tmp_path):
    assert read_dataset_file(tmp_path, missing_ok=True).cases == []
    with pytest.raises(InputError, match="training dataset file not found"):
        read_dataset_file(tmp_path)


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "is not valid JSON"),
        (json.dumps({"name": "Task03", "training": []}), "is not a UniversalSeg training dataset"),
        (json.dumps([1, 2]), "is not a UniversalSeg training dataset"),
        (json.dumps({"format": EXPORTED_FORMAT}), "has no 'cases' list"),
        (json.dumps({"format": EXPORTED_FORMAT, "cases": {}}), "has no 'cases' list"),
        (json.dumps({"format": EXPORTED_FORMAT, "format_version": 9, "cases": []}), "newer UniversalSeg"),
        (
            json.dumps({"format": EXPORTED_FORMAT, "format_version": "one", "cases": []}),
            "'format_version' must be a whole",
        ),
        (json.dumps({"format": EXPORTED_FORMAT, "cases": ["s1"]}), "case 1 is a JSON str, not an object"),
        (
            json.dumps({"format": EXPORTED_FORMAT, "cases": [CASE, {"id": "s2", "image": "a.nii.gz"}]}),
            r"case 2: needs 'image' and 'label' \(or 'masks'\)",
        ),
        (
            json.dumps({"format": EXPORTED_FORMAT, "cases": [{**CASE, "annotated": "Liver"}]}),
            "'annotated' must be a list",
        ),
        (json.dumps({"format": EXPORTED_FORMAT, "cases": [{**CASE, "masks": ["x"]}]}), "'masks' must be an object"),
        (json.dumps({"format": EXPORTED_FORMAT, "cases": [{**CASE, "split": "test"}]}), "split must be one of"),
    ],
)
def test_malformed_files_are_one_clear_line_from_both_readers(tmp_path, text, message):
    from training.datasets import read_exported
    from UniversalSegLib.training_export import read_dataset

    path = tmp_path / "dataset.json"
    path.write_text(text, encoding="utf-8")
    for read in (read_dataset_file, read_dataset, read_exported):  # the engine's export and training read it alike
        with pytest.raises(InputError, match=message) as info:
            read(tmp_path)
        assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_writer_refuses_a_case_nobody_reviewed_or_with_unknown_keys():
    doc = TrainingDataset.new()
    with pytest.raises(InputError, match="nothing was reviewed or edited"):
        doc.upsert({**CASE, "annotated": []})
    with pytest.raises(InputError, match="unknown key"):
        doc.upsert({**CASE, "labels": "x"})
    assert doc.cases == []


def test_a_failed_write_leaves_the_old_file_whole(tmp_path, monkeypatch):
    doc = TrainingDataset.new()
    doc.upsert(CASE)
    path = write_dataset_file(tmp_path, doc)
    before = path.read_bytes()
    real = Path.write_text

    def half_then_fail(self, text, *args, **kwargs):  # a full disk: half the text, then an error
        real(self, text[: len(text) // 2], *args, **kwargs)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", half_then_fail)
    doc.upsert({**CASE, "id": "s2"})
    with pytest.raises(UniversalSegError, match="cannot write"):
        write_dataset_file(tmp_path, doc)
    monkeypatch.setattr(Path, "write_text", real)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["dataset.json"]
    # the engine's remove_case writes through the same writer
    from UniversalSegLib.training_export import remove_case

    monkeypatch.setattr(Path, "write_text", half_then_fail)
    with pytest.raises(UniversalSegError, match="cannot write"):
        remove_case(tmp_path, "s1", delete_files=False)
    monkeypatch.setattr(Path, "write_text", real)
    assert path.read_bytes() == before
