"""Partial-label loss: BCE + Dice per (sample, class), averaged only over the classes each sample annotates.

A dataset that annotates the liver says nothing about the kidneys in its scans, so a kidney channel of that sample must
not be pushed towards "absent": its loss terms are dropped (selected out, not multiplied by zero), so those logits get
exactly zero gradient. An annotated class that is absent from the sample (empty mask) is a true negative and counts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn


class PartialLabelLoss(nn.Module):
    """``forward(logits, target, annotated)``: logits (B, K, *spatial) raw scores, target (B, K, *spatial) in {0, 1}
    (any dtype), annotated (B, K) bool -> scalar loss = ``bce_weight`` * mean BCE + ``dice_weight`` * mean soft Dice
    loss, both averaged over the annotated (sample, class) pairs. Sigmoid per class (one-vs-all), computed in float32.
    """

    def __init__(self, bce_weight: float = 1.0, dice_weight: float = 1.0, smooth: float = 1e-5) -> None:
        super().__init__()
        self.bce_weight = float(bce_weight)
        self.dice_weight = float(dice_weight)
        # Per (sample, class) soft Dice; MONAI's reduction "none" keeps the (B, K) layout.
        self.dice = DiceLoss(sigmoid=True, reduction="none", smooth_nr=smooth, smooth_dr=smooth, batch=False)

    def terms(self, logits: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(BCE, Dice loss) per (sample, class): two (B, K) tensors."""
        logits = logits.float()
        target = target.to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(2).mean(2)
        dice = self.dice(logits, target).reshape(logits.shape[0], logits.shape[1])
        return bce, dice

    def reduce(self, bce: torch.Tensor, dice: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
        """Combine (B, K) terms into the loss over the annotated pairs (a graph-attached zero when there are none)."""
        annotated = annotated.to(torch.bool).to(bce.device)
        if not annotated.any():
            # Nothing to learn from: a zero that still belongs to the graph (distributed training needs every rank
            # to run backward through the same parameters).
            return (bce.sum() + dice.sum()) * 0.0
        return self.bce_weight * bce[annotated].mean() + self.dice_weight * dice[annotated].mean()

    def forward(self, logits: torch.Tensor, target: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
        if logits.shape != target.shape:
            raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} must have the same shape")
        if annotated.shape != logits.shape[:2]:
            raise ValueError(f"annotated must be (B, K) = {tuple(logits.shape[:2])}, got {tuple(annotated.shape)}")
        bce, dice = self.terms(logits, target)
        return self.reduce(bce, dice, annotated)


def retention_loss(logits: torch.Tensor, teacher_logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Distillation that keeps old classes' behaviour: BCE between the student's logits and the starting model's
    probabilities, averaged over the (sample, class) pairs in ``keep`` (B, K) bool; shapes as in PartialLabelLoss."""
    keep = keep.to(torch.bool).to(logits.device)
    if not keep.any():
        return logits.float().sum() * 0.0
    soft = torch.sigmoid(teacher_logits.float())
    per = F.binary_cross_entropy_with_logits(logits.float(), soft, reduction="none").flatten(2).mean(2)
    return per[keep].mean()
