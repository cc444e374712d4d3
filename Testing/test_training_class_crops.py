"""Class-balanced crop centres, per-organ intensity offsets and contrast phases (training/transforms.py), on synthetic
volumes.

The volume has one large class (the "liver", 1 in the encoded label) and one small class (the "adrenal", 2) far
apart; voxel-based foreground sampling almost never centres a crop on the small class, class-balanced sampling does
about half the time among foreground crops.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("monai")

from conftest import shared_path  # noqa: E402
from training.config import load_config  # noqa: E402
from training.transforms import (  # noqa: E402
    ClassIndicesd,
    ClassTargetsd,
    RandCropByClassd,
    RandOrganIntensityd,
    RandOrganPhased,
    augmentation_transforms,
    class_targets,
)
from UniversalSegLib.errors import InputError  # noqa: E402

LIVER, ADRENAL = 6, 14
SHAPE = (80, 80, 80)
CROP = (16, 16, 16)


def _case() -> dict:
    label = torch.zeros((1, *SHAPE), dtype=torch.uint8)
    label[0, 5:60, 5:60, 5:60] = 1  # large class, 166k voxels
    label[0, 70:74, 70:74, 70:74] = 2  # small class, 64 voxels
    image = torch.full((1, *SHAPE), 0.5)
    body = np.arange(int(np.prod(SHAPE)))
    d = {
        "image": image,
        "label": label,
        "targets": [[LIVER, [[0, 1]]], [ADRENAL, [[0, 2]]]],
        "label_bg_indices": body[label.numpy().ravel() == 0],
        "label_fg_indices": body[label.numpy().ravel() > 0],
        "case": "synthetic",
    }
    return ClassIndicesd()(d)


def _share_with_small_class(crop, n: int = 100) -> float:
    d = _case()
    crop.set_random_state(seed=0)
    hits = 0
    for _ in range(n):
        for sample in crop(d):
            hits += bool((torch.as_tensor(sample["label"]) == 2).any())
    return hits / (n * 2)


def test_class_indices_are_cached_per_class():
    d = _case()
    assert sorted(d["class_indices"]) == [LIVER, ADRENAL]
    assert len(d["class_indices"][ADRENAL]) == 64
    assert len(d["class_indices"][LIVER]) == 55**3


def test_class_balanced_centres_reach_the_small_class():
    balanced = RandCropByClassd(CROP, pos=1, neg=0, num_samples=2, model_classes=[LIVER, ADRENAL])
    share = _share_with_small_class(balanced)
    assert 0.35 < share < 0.65, share  # about half: two classes drawn uniformly
    # Foreground-voxel sampling (what the default recipe does) lands on the small class ~0.04 % of the time.
    from monai.transforms import RandCropByPosNegLabeld

    voxels = RandCropByPosNegLabeld(
        keys=["image", "label"],
        label_key="label",
        spatial_size=CROP,
        pos=1,
        neg=0,
        num_samples=2,
        fg_indices_key="label_fg_indices",
        bg_indices_key="label_bg_indices",
    )
    assert _share_with_small_class(voxels, n=50) < 0.05


def test_crops_have_the_crop_size_and_stay_inside():
    crop = RandCropByClassd(CROP, pos=1, neg=1, num_samples=3, model_classes=[LIVER, ADRENAL])
    crop.set_random_state(seed=1)
    d = _case()
    for _ in range(30):
        samples = crop(d)
        assert len(samples) == 3
        for s in samples:
            assert tuple(s["image"].shape) == (1, *CROP) and tuple(s["label"].shape) == (1, *CROP)
            assert "class_indices" not in s and s["case"] == "synthetic" and s["targets"] == d["targets"]


def test_classes_the_model_lacks_are_never_drawn():
    crop = RandCropByClassd(CROP, pos=1, neg=0, num_samples=2, model_classes=[LIVER])
    assert _share_with_small_class(crop) == 0.0


def test_negative_crops_centre_on_unlabelled_body():
    crop = RandCropByClassd((1, 1, 1), pos=0, neg=1, num_samples=2, model_classes=[LIVER, ADRENAL])
    crop.set_random_state(seed=2)
    d = _case()
    for _ in range(50):
        for s in crop(d):
            assert int(torch.as_tensor(s["label"]).max()) == 0


def test_organ_intensity_moves_each_class_by_one_offset_and_nothing_else():
    d = _case()
    sample = ClassTargetsd([LIVER, ADRENAL])(d)
    shift = RandOrganIntensityd(prob=1.0, offset=0.2)
    shift.set_random_state(seed=3)
    out = shift(sample)["image"][0]
    label = sample["label"]
    liver, adrenal, rest = out[label[0] > 0], out[label[1] > 0], out[(label.sum(0) == 0)]
    assert torch.all(rest == 0.5)
    for region in (liver, adrenal):
        assert torch.all(region == region[0])  # one offset per class
        assert 0 < abs(float(region[0]) - 0.5) <= 0.2
    assert float(liver[0]) != float(adrenal[0])
    assert torch.all(sample["image"] == 0.5)  # the cached input is not modified in place


def test_organ_intensity_probability_zero_changes_nothing():
    sample = ClassTargetsd([LIVER, ADRENAL])(_case())
    out = RandOrganIntensityd(prob=0.0, offset=0.2)(sample)["image"]
    assert torch.equal(out, sample["image"])


def _textured_case() -> dict:
    """_case() with a bright, textured "liver" (an arterial-phase organ: 0.8 +- 0.1) on a 0.5 background."""
    sample = ClassTargetsd([LIVER, ADRENAL])(_case())
    texture = torch.linspace(-0.1, 0.1, SHAPE[0]).view(-1, 1, 1).expand(SHAPE)
    sample["image"] = torch.where(sample["label"][0:1] > 0, 0.8 + texture, sample["image"])
    return sample


def test_organ_phase_moves_the_median_into_range_and_shrinks_the_texture():
    sample = _textured_case()
    phase = RandOrganPhased(prob=1.0, channels=[0], target_range=(0.4, 0.45), spread_range=(0.3, 0.5))
    before = sample["image"][0][sample["label"][0] > 0]
    for seed in range(5):
        phase.set_random_state(seed=seed)
        out = phase(sample)["image"][0]
        liver = out[sample["label"][0] > 0]
        assert 0.4 <= float(liver.median()) <= 0.45 + 1e-6
        ratio = float(liver.std() / before.std())
        assert 0.3 - 1e-4 <= ratio <= 0.5 + 1e-4
        assert torch.all(out[sample["label"][0] == 0] == 0.5)  # everything else, the adrenal included, unchanged
    assert torch.equal(sample["image"][0][sample["label"][0] > 0], before)  # the input is not modified in place


def test_organ_phase_leaves_unlisted_organs_and_clips_to_the_window():
    sample = _textured_case()
    out = RandOrganPhased(prob=1.0, channels=[1], target_range=(0.99, 1.0), spread_range=(1.0, 1.0))(sample)
    assert torch.equal(out["image"][0][sample["label"][0] > 0], sample["image"][0][sample["label"][0] > 0])
    assert float(out["image"].max()) <= 1.0


def test_organ_phase_reaches_training_through_the_config():
    config = load_config(CONFIG, overrides=["augmentation.organ_phase_prob=1", "augmentation.organ_phase_hu=[0,1]"])
    from UniversalSegLib.catalog import ClassCatalog

    catalog = ClassCatalog.default()
    right_adrenal = catalog.lookup("Right Adrenal Gland").index
    chain = augmentation_transforms(config, [LIVER, catalog.lookup("Duodenum").index, right_adrenal], catalog)
    phase = [t for t in chain.transforms if isinstance(t, RandOrganPhased)]
    assert len(phase) == 1
    assert phase[0].channels == [0, 2]  # liver and adrenal enhance, the duodenum (bowel contents) is not listed
    low, high = config.hu_window
    assert phase[0].target_range == pytest.approx(((0 - low) / (high - low), (1 - low) / (high - low)))


def test_class_targets_unchanged_by_the_shared_mask_helper():
    label = torch.tensor([[[[1, 2, 0, 3]]], [[[0, 5, 5, 0]]]], dtype=torch.uint8)
    out, annotated = class_targets(label, [[LIVER, [[0, 1], [0, 3]]], [ADRENAL, [[1, 5]]]], [ADRENAL, 1, LIVER])
    assert out[:, 0, 0].tolist() == [[0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 0, 1]]
    assert annotated.tolist() == [True, False, True]


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("augmentation.crop_centres", "organs", "crop_centres"),
        ("augmentation.organ_intensity_prob", "1.5", "organ_intensity_prob"),
        ("augmentation.organ_phase_prob", "-0.1", "organ_phase_prob"),
        ("augmentation.organ_phase_hu", "[100,20]", "organ_phase_hu .* breaks low < high"),
        ("augmentation.organ_phase_spread", "[0.5]", "organ_phase_spread must be \\[low, high\\]"),
    ],
)
def test_config_rejects_bad_values(key, value, message):
    cfg = Path(__file__).resolve().parents[1] / "training" / "configs" / "universalseg_tiny.yaml"
    assert load_config(cfg).augmentation.crop_centres == "classes"
    with pytest.raises(InputError, match=message):
        load_config(cfg, overrides=[f"{key}={value}"])


# --- ``universalseg-train --set`` (the command line override of one config value)
CONFIG = Path(__file__).resolve().parents[1] / "training" / "configs" / "universalseg_tiny.yaml"


@pytest.mark.parametrize(
    "item,message",
    [
        ("training.max_steps", "--set expects section.key=value"),
        ("=3", "--set expects section.key=value"),
        ("augmentation.crop_centres=organs", "crop_centres must be"),
        ("training.no_such_key=1", "no_such_key"),
        # a wrongly typed value is named, not a TypeError traceback
        ("training.lr=x", "config: training.lr must be a number, got 'x'"),
        ("training.max_steps=1.5", "training.max_steps must be a whole number"),
        ("augmentation.flip_prob=true", "augmentation.flip_prob must be a number"),
        ("model.width=[12]", "model.width must be a whole number"),
        ("model.architecture=[unet]", "model.architecture must be a string"),
    ],
)
def test_set_errors_are_one_line_and_exit_2(capsys, item, message):
    from training.cli import main

    assert main(["check", str(CONFIG), "--headers-only", "--set", item]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_yaml_exponent_without_a_dot_is_a_number():
    """PyYAML reads ``lr: 1e-4`` as a string; the config takes it as the number everyone means."""
    assert load_config(CONFIG, overrides=["training.lr=1e-4"]).training.lr == pytest.approx(1e-4)


def test_set_reaches_the_run(capsys):
    """``diagnose`` draws crops with the overridden crop size and sampling (the value, parsed as YAML, is used)."""
    from training.cli import main

    shared_path("data", "ct", "lidc_chest_upper_abdomen", "ct.nii.gz")  # the config's data
    assert (
        main(
            [
                "diagnose",
                str(CONFIG),
                "--samples",
                "2",
                "--set",
                "training.crop_size=[32, 48, 32]",
                "--set",
                "augmentation.crop_centres=foreground",
            ]
        )
        == 0
    )
    import json

    report = json.loads(capsys.readouterr().out)
    assert report["crop_size"] == [32, 48, 32] and report["crop_mm"] == [96, 144, 96]
