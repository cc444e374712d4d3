"""A short CPU fit on a real CT: the loss falls, the checkpoint loads in the engine, resume is exact, export and
evaluate work, and a class can be added to a trained model without changing the old classes' outputs."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch

from training.cli import main as train_main
from training.config import parse_config
from training.distributed import weights_digest
from training.export import read_state
from training.loop import fit
from training.losses import PartialLabelLoss
from training.modeling import UPSTREAM_EMBEDDINGS
from UniversalSegLib.checkpoints import load_checkpoint, read_checkpoint_metadata, save_checkpoint
from UniversalSegLib.errors import InputError
from UniversalSegLib.networks import ModelConfig, UniversalModel

STEPS = 20


def _config(abdomen: Path, output: Path, **training) -> dict:
    """Upper-abdomen slab of a real CT (TotalSegmentator labels) at 3 mm; width-4 U-Net, 32^3 crops."""
    return {
        "name": "test-fit",
        "output": str(output),
        "spacing": [3.0, 3.0, 3.0],
        "model": {"architecture": "unet", "width": 4},
        "augmentation": {"num_samples": 1, "pos": 1, "neg": 0, "rotate_prob": 0.2, "flip_prob": 0.2},
        "training": {
            "max_steps": STEPS,
            "crop_size": 32,
            "lr": 0.003,
            "warmup_steps": 2,
            "checkpoint_every": 4,
            "keep_checkpoints": 10,
            "checkpoint_minutes": None,
            "log_every": 1,
            "threads": 1,
            **training,
        },
        "validation": {"every": 8, "roi_size": 32, "overlap": 0.0},
        "datasets": [
            {
                "name": "slab",
                "type": "totalsegmentator",
                "root": str(abdomen),
                "image": "ct_upper_slab.nii.gz",
                "label_file": "ct_upper_slab_labels_totalseg_v2.nii.gz",
                "split": "both",
                "labels": {"Liver": ["liver"], "Spleen": ["spleen"], "Right Kidney": ["kidney_right"]},
                "licence": "Apache-2.0",
            }
        ],
    }


def _log(run: Path) -> list[dict]:
    with open(run / "log.csv") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from conftest import shared_path

    abdomen = shared_path("data", "ct", "totalseg_abdomen")
    folder = tmp_path_factory.mktemp("fit")
    run = folder / "run"
    # Start from a known random model (saved as a checkpoint) so the loss before training can be measured.
    torch.manual_seed(0)
    initial = UniversalModel(ModelConfig("unet", 4), num_classes=3)
    table = torch.load(UPSTREAM_EMBEDDINGS, map_location="cpu", weights_only=True).float()
    initial.organ_embedding.copy_(table[[0, 1, 5]])
    initial.class_names = ["Spleen", "Right Kidney", "Liver"]
    save_checkpoint(initial, folder / "initial.safetensors", {"licence": "test"})
    raw = _config(abdomen, run)
    raw["model"] = {"init": str(folder / "initial.safetensors")}
    result = fit(parse_config(raw, "."), progress=False, command="test")
    return {"abdomen": abdomen, "run": run, "raw": raw, "result": result, "initial": initial}


def _fixed_batch(raw: dict, n: int = 6) -> dict:
    """``n`` training crops drawn with a fixed seed from the same pipeline as the fit."""
    from monai.data import list_data_collate

    from training.datasets import collect_cases, load_catalog
    from training.transforms import augmentation_transforms, preprocessing_transforms

    config = parse_config(raw, ".")
    catalog = load_catalog(config)
    (case,) = collect_cases(config, catalog)
    item = preprocessing_transforms(config.spacing, min_size=config.training.crop_size)(case.to_data())
    augment = augmentation_transforms(config, [1, 2, 6], catalog)
    samples = []
    for seed in range(n):
        augment.set_random_state(seed=seed)
        samples += augment(dict(item))
    return list_data_collate(samples)


def test_fit_lowers_loss_and_writes_engine_checkpoint(trained):
    run, result = trained["run"], trained["result"]
    rows = _log(run)
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    # The loss on the same crops, before and after training.
    batch = _fixed_batch(trained["raw"])
    loss_fn = PartialLabelLoss()
    with torch.no_grad():
        before = loss_fn(trained["initial"](batch["image"]), batch["label"], batch["annotated"]).item()
        after = loss_fn(result.model(batch["image"]), batch["label"], batch["annotated"]).item()
    assert batch["annotated"].all() and batch["label"].sum() > 0
    assert after < 0.8 * before, (before, after)
    model = load_checkpoint(run / "model.safetensors")
    assert model.class_names == ["Spleen", "Right Kidney", "Liver"]
    assert model.config.width == 4
    assert weights_digest(model) == weights_digest(result.model)
    meta = read_checkpoint_metadata(run / "model.safetensors")
    assert meta["provenance"]["steps"] == STEPS and meta["provenance"]["command"] == "test"
    assert meta["training_data"][0]["licence"] == "Apache-2.0"
    assert meta["class_embeddings"]["sources"]["Liver"] == "starting checkpoint"
    assert meta["class_embeddings"]["licence"] == "test (from the starting checkpoint)"
    assert set(meta["validation_dice"]) == {"Spleen", "Right Kidney", "Liver"}
    summary = json.loads((run / "fit_summary.json").read_text())
    assert summary["steps"] == STEPS and summary["validation_last"]["step"] == STEPS
    assert summary["validation_first"]["step"] == 0  # starting from a checkpoint validates before training
    with open(run / "validation.csv") as f:
        assert {int(r["step"]) for r in csv.DictReader(f)} == {0, 8, 16, STEPS}
    assert any((run / "tensorboard").iterdir())


def test_resume_continues_from_the_same_step_with_identical_state(trained, tmp_path):
    run = trained["run"]
    resumed = tmp_path / "resumed"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "checkpoints" / "step_0000008.pt", resumed / "checkpoints" / "step_0000008.pt")
    state8 = read_state(resumed / "checkpoints" / "step_0000008.pt")
    assert state8["step"] == 8
    raw = dict(trained["raw"], output=str(resumed))
    # Starting fresh in a folder with states is refused; --resume continues.
    with pytest.raises(InputError, match="--resume"):
        fit(parse_config(raw, "."), progress=False)
    fit(parse_config(raw, "."), resume=True, progress=False)
    assert [int(r["step"]) for r in _log(resumed)] == list(range(9, STEPS + 1))
    a = read_state(run / "checkpoints" / f"step_{STEPS:07d}.pt")
    b = read_state(resumed / "checkpoints" / f"step_{STEPS:07d}.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        for key in pa:
            assert torch.equal(torch.as_tensor(pa[key]), torch.as_tensor(pb[key])), key
    assert a["scheduler"] == b["scheduler"]
    la = [r["loss"] for r in _log(run)][8:]
    lb = [r["loss"] for r in _log(resumed)]
    assert la == lb


def test_export_cli_and_evaluate_cli(trained, tmp_path, shared, capsys):
    run = trained["run"]
    out = tmp_path / "exported.safetensors"
    assert train_main(["export", str(run), "-o", str(out), "--name", "tiny-test", "--licence", "Apache-2.0"]) == 0
    model = load_checkpoint(out)
    assert weights_digest(model) == weights_digest(trained["result"].model)
    assert read_checkpoint_metadata(out)["name"] == "tiny-test"
    assert train_main(["export", str(run), "-o", str(tmp_path / "best.safetensors"), "--which", "best"]) == 0
    load_checkpoint(tmp_path / "best.safetensors")

    ct3 = shared("data", "ct", "dcmqi_ct3slice")
    cfg = tmp_path / "eval.json"
    cfg.write_text(
        json.dumps(
            {
                "name": "eval",
                "output": str(tmp_path / "unused"),
                "datasets": [
                    {
                        "name": "dcmqi",
                        "type": "files",
                        "root": str(ct3),
                        "split": "val",
                        "labels": {"Liver": [1]},
                        "cases": [{"id": "ct3", "image": "dicom", "label": "liver_seg.nrrd"}],
                    }
                ],
            }
        )
    )
    report_dir = tmp_path / "report"
    code = train_main(
        [
            "evaluate",
            str(cfg),
            "--model",
            str(out),
            "--model",
            str(run / "model_best.safetensors"),
            "--fast",
            "--device",
            "cpu",
            "--output",
            str(report_dir),
        ]
    )
    assert code == 0
    report = json.loads((report_dir / "evaluation.json").read_text())
    for model_ref in report["models"]:
        scores = report["per_case"][model_ref]["dcmqi/ct3"]["Liver"]
        assert scores["reference_voxels"] > 1000
        assert 0.0 <= scores["dice"] <= 1.0 and 0.0 <= scores["nsd"] <= 1.0
    table = (report_dir / "evaluation.md").read_text()
    assert "| Liver |" in table and "Dice change" in table
    assert "Liver" in capsys.readouterr().out


def test_add_class_keeps_old_classes(trained, tmp_path):
    start = trained["run"] / "model.safetensors"
    old = load_checkpoint(start)
    raw = _config(trained["abdomen"], tmp_path / "added", max_steps=3, retain_weight=1.0)
    raw["model"] = {"init": str(start), "classes": ["Liver", "Spleen", "Right Kidney", "Left Kidney"]}
    # Train on a dataset that annotates only the new class; validate all four classes on a held-out entry.
    val = dict(
        raw["datasets"][0],
        name="slab_val",
        split="val",
        labels={
            "Liver": ["liver"],
            "Spleen": ["spleen"],
            "Right Kidney": ["kidney_right"],
            "Left Kidney": ["kidney_left"],
        },
    )
    raw["datasets"][0].update(split="train", labels={"Left Kidney": ["kidney_left"]})
    raw["datasets"].append(val)
    raw["validation"] = {"every": 0, "roi_size": 32, "overlap": 0.0}
    from training.datasets import collect_cases, load_catalog
    from training.modeling import build_model

    config = parse_config(raw, ".")
    catalog = load_catalog(config)
    built = build_model(config, catalog, collect_cases(config, catalog))
    assert built.model.class_names == ["Spleen", "Right Kidney", "Left Kidney", "Liver"]
    assert built.embedding_sources["Left Kidney"].startswith("upstream")
    assert built.embedding_sources["Liver"] == "starting checkpoint"
    # Before training, the old classes' outputs are exactly the starting model's (heads are per class).
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        before = old(x)
        after = built.model(x, built.model.organ_embedding[[0, 1, 3]])
    assert torch.allclose(before, after, atol=1e-6)
    result = fit(config, progress=False)
    summary = result.summary
    # Dice before (step 0) and after on the old classes, plus the new one.
    assert summary["validation_first"]["step"] == 0 and summary["validation_last"]["step"] == 3
    assert (
        set(summary["validation_first"]["dice"])
        == set(summary["validation_last"]["dice"])
        == set(built.model.class_names)
    )
    assert summary["classes"] == ["Spleen", "Right Kidney", "Left Kidney", "Liver"]
    rows = _log(tmp_path / "added")
    assert all(float(r["retain"]) > 0 for r in rows)
