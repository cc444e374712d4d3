"""Partial-label loss: classes a sample does not annotate get exactly zero gradient; the schedule and metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.losses import PartialLabelLoss, retention_loss


def _batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2, 4, 6, 6, 6, generator=g, requires_grad=True)
    target = (torch.rand(2, 4, 6, 6, 6, generator=g) > 0.6).float()
    target[0, 3] = 0  # annotated as absent: a true negative, must still count
    annotated = torch.tensor([[True, False, True, True], [False, True, False, False]])
    return logits, target, annotated


def test_unannotated_classes_get_exactly_zero_gradient():
    logits, target, annotated = _batch()
    loss = PartialLabelLoss()(logits, target, annotated)
    loss.backward()
    grad = logits.grad
    for b in range(2):
        for k in range(4):
            g = grad[b, k]
            if annotated[b, k]:
                assert g.abs().sum() > 0, f"annotated (sample {b}, class {k}) got no gradient"
            else:
                assert torch.count_nonzero(g) == 0, f"not annotated (sample {b}, class {k}) got gradient"


def test_unannotated_targets_do_not_change_the_loss():
    logits, target, annotated = _batch()
    loss_fn = PartialLabelLoss()
    before = loss_fn(logits, target, annotated)
    changed = target.clone()
    changed[~annotated] = 1.0 - changed[~annotated]  # flip every label the samples do not annotate
    assert torch.equal(loss_fn(logits, changed, annotated), before)
    flipped_annotated = target.clone()
    flipped_annotated[0, 0] = 1.0 - flipped_annotated[0, 0]
    assert not torch.equal(loss_fn(logits, flipped_annotated, annotated), before)


def test_loss_is_mean_of_bce_and_dice_over_annotated_pairs():
    logits, target, annotated = _batch(1)
    loss_fn = PartialLabelLoss(bce_weight=0.7, dice_weight=0.3)
    p = torch.sigmoid(logits.detach())
    bce = -(target * torch.log(p) + (1 - target) * torch.log(1 - p)).flatten(2).mean(2)
    inter = (p * target).flatten(2).sum(2)
    dice = 1 - (2 * inter + 1e-5) / (p.flatten(2).sum(2) + target.flatten(2).sum(2) + 1e-5)
    expected = 0.7 * bce[annotated].mean() + 0.3 * dice[annotated].mean()
    assert torch.allclose(loss_fn(logits.detach(), target, annotated), expected, atol=1e-5)


def test_nothing_annotated_gives_zero_attached_to_graph():
    logits, target, _ = _batch()
    loss = PartialLabelLoss()(logits, target, torch.zeros(2, 4, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.count_nonzero(logits.grad) == 0


def test_shape_errors():
    logits, target, annotated = _batch()
    with pytest.raises(ValueError, match="same shape"):
        PartialLabelLoss()(logits, target[:, :3], annotated)
    with pytest.raises(ValueError, match="annotated must be"):
        PartialLabelLoss()(logits, target, annotated[:, :3])


def test_retention_loss_only_on_kept_pairs():
    logits, _, annotated = _batch()
    teacher = torch.randn(2, 4, 6, 6, 6)
    keep = ~annotated
    retention_loss(logits, teacher, keep).backward()
    assert torch.count_nonzero(logits.grad[annotated]) == 0
    assert logits.grad[keep].abs().sum() > 0


def test_lr_schedule_warmup_then_cosine():
    from training.loop import lr_factor

    assert lr_factor(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(10, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_factor(100, 10, 100, 0.1) == pytest.approx(0.1)
    values = [lr_factor(s, 10, 100, 0.1) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_surface_scores():
    from training.evaluate import score_masks

    a = np.zeros((20, 20, 20), bool)
    a[5:15, 5:15, 5:15] = True
    same = score_masks(a, a, (1.0, 1.0, 1.0), 1.0)
    assert same["dice"] == pytest.approx(1.0) and same["nsd"] == pytest.approx(1.0)
    shifted = np.roll(a, 4, axis=0)
    s = score_masks(shifted, a, (1.0, 1.0, 1.0), 1.0)
    assert s["dice"] == pytest.approx(2 * 6 * 100 / 2000)  # 6 of 10 slices overlap
    assert 0.0 < s["nsd"] < 1.0
    # A 4-voxel shift is within a 5 mm tolerance when voxels are 1 mm apart, not when they are 2 mm apart.
    assert score_masks(shifted, a, (1.0, 1.0, 1.0), 5.0)["nsd"] == pytest.approx(1.0)
    assert score_masks(shifted, a, (2.0, 1.0, 1.0), 5.0)["nsd"] < 1.0
    empty = score_masks(a, np.zeros_like(a), (1.0, 1.0, 1.0), 1.0)
    assert empty["dice"] is None and empty["predicted_voxels"] == 1000


def test_head_prior_initialisation():
    """From scratch, the controller bias starts the heads' hidden biases positive and the output at the prior."""
    from training.modeling import init_head_bias
    from UniversalSegLib.networks import ModelConfig, UniversalModel
    from UniversalSegLib.networks.universal_model import HEAD_PARAM_SPLITS

    model = UniversalModel(ModelConfig("unet", 4), num_classes=2)
    init_head_bias(model, 0.02)
    w1, w2, w3, b1, b2, b3 = torch.split(model.controller.bias.detach(), HEAD_PARAM_SPLITS)
    assert torch.all(b1 == 0.1) and torch.all(b2 == 0.1)
    assert torch.sigmoid(b3).item() == pytest.approx(0.02)
    with pytest.raises(Exception, match="between 0 and 1"):
        init_head_bias(model, 1.5)
