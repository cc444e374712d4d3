"""Class identity: one mapping from a model's rows to catalog classes (by file stem, then name), used everywhere."""

from __future__ import annotations

import json
import types

import pytest
import torch

from UniversalSegLib.catalog import DEFAULT_CLASSES_JSON, ClassCatalog, model_class_indices, rows_for
from UniversalSegLib.errors import ClassNameError, InputError

CATALOG = ClassCatalog.default()
SPLEEN, RIGHT_KIDNEY, LEFT_KIDNEY, LIVER, AORTA, POSTCAVA = 1, 2, 3, 6, 8, 9


def _model(names: list[str], seed: int = 0):
    """A tiny UniversalModel whose rows are ``names``, with distinct random embeddings."""
    from UniversalSegLib.networks import ModelConfig, UniversalModel

    torch.manual_seed(seed)
    model = UniversalModel(ModelConfig("unet", 4), num_classes=len(names))
    model.organ_embedding.copy_(torch.randn(len(names), 512))
    model.class_names = list(names)
    model.metadata = {"name": "subset-model"}
    return model


def test_rows_map_by_file_stem_and_by_any_catalog_name():
    assert model_class_indices(["right_kidney", "liver", "portal_vein_and_splenic_vein"]) == [RIGHT_KIDNEY, LIVER, 10]
    # display name (any case), the upstream prompt spelling ("Arota") and a synonym ("IVC")
    assert model_class_indices(["SPLEEN", "Arota", "IVC", "Left Kidney"]) == [SPLEEN, AORTA, POSTCAVA, LEFT_KIDNEY]
    assert model_class_indices(_model(["Liver", "Spleen"])) == [LIVER, SPLEEN]


def test_a_row_the_catalog_does_not_know_is_one_clear_line():
    with pytest.raises(ClassNameError) as info:
        model_class_indices(_model(["Liver", "Brain Stem"]))
    message = str(info.value)
    assert "\n" not in message and "row 1" in message and "'Brain Stem'" in message and "subset-model" in message
    assert model_class_indices(["Liver", "Brain Stem"], strict=False) == [LIVER, None]
    with pytest.raises(ClassNameError, match="rows 0 and 1 both name class 'Liver'"):
        model_class_indices(["Liver", "liver"])


def test_rows_for_is_the_inverse_on_a_subset_model():
    model = _model(["Liver", "Spleen"])
    assert rows_for(model, [SPLEEN, LIVER]) == [1, 0]
    with pytest.raises(ClassNameError, match="was not trained for 'Aorta'; it knows: Liver, Spleen"):
        rows_for(model, [AORTA])


def test_subset_model_embeddings_and_engine_channels_use_its_real_rows():
    from UniversalSegLib.pipeline import Engine, SegmentationOptions, _model_channels

    model = _model(["Liver", "Spleen"])
    emb = model.organ_embedding
    # the old "row = index - 1" gave row 0 (Liver) for Spleen and an IndexError for Liver
    assert torch.equal(model.embeddings_for([SPLEEN, LIVER]), emb[[1, 0]])
    assert torch.equal(model.embeddings_for([LIVER]), emb[[0]])
    with pytest.raises(ClassNameError, match="not trained for 'Aorta'"):
        model.embeddings_for([AORTA])
    assert _model_channels(model, [SPLEEN, LIVER], CATALOG) == {SPLEEN: 1, LIVER: 0}
    engine = Engine(model, SegmentationOptions(device="cpu"))
    assert engine.available_classes() == [SPLEEN, LIVER]
    stems = _model(["left_kidney", "right_kidney"])  # rows named by catalog file stem
    assert _model_channels(stems, [RIGHT_KIDNEY, LEFT_KIDNEY], CATALOG) == {RIGHT_KIDNEY: 1, LEFT_KIDNEY: 0}
    assert Engine(stems, SegmentationOptions(device="cpu")).available_classes() == [RIGHT_KIDNEY, LEFT_KIDNEY]


@pytest.mark.parametrize("case", ["reversed", "33 rows", "subset"])
def test_resolve_prompts_gives_clip_the_model_embeddings_in_catalog_order(case, monkeypatch):
    import UniversalSegLib.prompts as prompts_module
    import UniversalSegLib.text_encoder as text_encoder
    from UniversalSegLib.pipeline import resolve_prompts

    names = {"reversed": CATALOG.names[::-1], "33 rows": CATALOG.names + ["class 33"], "subset": ["Liver", "Spleen"]}[
        case
    ]
    model = _model(names)
    seen = {}

    def fake_resolve(texts, *, encoder=None, class_embeddings=None, allow_experimental=False, **_):
        seen["embeddings"] = class_embeddings
        return types.SimpleNamespace(rejected=encoder is None)

    monkeypatch.setattr(prompts_module, "resolve_prompt", fake_resolve)
    monkeypatch.setattr(text_encoder.ClipTextEncoder, "pretrained", classmethod(lambda cls, *a, **k: object()))
    resolve_prompts("zzqx", model)
    emb = seen["embeddings"]
    if case == "subset":
        assert emb is None  # not every catalog class: CLIP compares with the catalog's own embeddings
        return
    assert emb is not None and emb.shape == (len(CATALOG), 512)
    for index in (1, 6, 32):  # row k of what CLIP gets is catalog class k + 1, wherever the model holds it
        assert torch.equal(emb[index - 1], model.organ_embedding[names.index(CATALOG[index].name)])


def test_tumour_parents_come_from_the_catalog(tmp_path):
    from UniversalSegLib.postprocess import PARENT_FILTERED_TUMORS, TUMOR_PARENTS, tumor_parents

    assert TUMOR_PARENTS == {26: (2, 3), 27: (6,)}  # the published behaviour, unchanged
    assert PARENT_FILTERED_TUMORS == (26, 27)  # the catalog names parents for more lesions; upstream filters these two
    # derived, not hard-coded: a catalog with other parents gives other parents
    doc = json.loads(DEFAULT_CLASSES_JSON.read_text(encoding="utf-8"))
    for entry in doc["classes"]:
        if entry["index"] == 27:
            entry["parents"] = [4]
    (tmp_path / "classes.json").write_text(json.dumps(doc), encoding="utf-8")
    assert tumor_parents(ClassCatalog.from_json(tmp_path / "classes.json")) == {26: (2, 3), 27: (4,)}


def test_training_start_classes_use_the_same_mapping():
    from training.modeling import _checkpoint_classes

    assert _checkpoint_classes(_model(["liver", "Spleen"]), CATALOG) == [LIVER, SPLEEN]
    with pytest.raises(InputError, match="'Brain Stem', which the class catalog does not know"):
        _checkpoint_classes(_model(["Liver", "Brain Stem"]), CATALOG)
