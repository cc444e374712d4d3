"""The CLIP-Driven Universal Model: a segmentation backbone plus text-conditioned dynamic class heads.

Each class is named by a 512-d CLIP text embedding. A controller turns [global image feature, text feature] into
the 153 parameters of a tiny per-class head (1x1x1 convolutions 8 -> 8 -> 8 -> 1, ReLU between) that is applied to
the decoder's per-voxel features. Classes are independent (sigmoid, one-vs-all), so any subset, and any new
embedding, can be computed on its own.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from math import gcd
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .swin_unetr import SwinUNETRBackbone
from .unet3d import UNet3DBackbone

HEAD_CHANNELS = 8
TEXT_DIM = 512
FEATURE_DIM = 256
# Controller output per class, laid out as [w1 (8x8), w2 (8x8), w3 (1x8), b1 (8), b2 (8), b3 (1)], weights (out, in).
HEAD_PARAM_SPLITS = (
    HEAD_CHANNELS * HEAD_CHANNELS,
    HEAD_CHANNELS * HEAD_CHANNELS,
    HEAD_CHANNELS,
    HEAD_CHANNELS,
    HEAD_CHANNELS,
    1,
)
NUM_HEAD_PARAMS = sum(HEAD_PARAM_SPLITS)  # 153

ARCHITECTURES = ("unet", "swinunetr")
RELEASED_WIDTH = {"unet": 32, "swinunetr": 48}


@dataclass(frozen=True)
class ModelConfig:
    """Which member of the family to build.

    ``width`` is the U-Net's base channel count (released: 32) or Swin UNETR's ``feature_size`` (released: 48).
    """

    architecture: str = "unet"
    width: int | None = None
    in_channels: int = 1

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {self.architecture!r}; choose one of {', '.join(ARCHITECTURES)}")
        if self.width is None:
            object.__setattr__(self, "width", RELEASED_WIDTH[self.architecture])

    @property
    def window_multiple(self) -> int:
        """Spatial sizes the backbone accepts must be multiples of this."""
        return 8 if self.architecture == "unet" else 32

    def to_dict(self) -> dict:
        return asdict(self)


def _group_norm(channels: int) -> nn.GroupNorm:
    # The released models use 16 groups; narrower members use the largest divisor of 16 their width allows.
    return nn.GroupNorm(gcd(16, channels), channels)


def build_backbone(config: ModelConfig) -> UNet3DBackbone | SwinUNETRBackbone:
    assert config.width is not None  # filled in by ModelConfig.__post_init__
    if config.architecture == "unet":
        return UNet3DBackbone(config.in_channels, base_channels=config.width)
    return SwinUNETRBackbone(config.in_channels, feature_size=config.width)


class UniversalModel(nn.Module):
    """Backbone + text-conditioned dynamic heads.

    ``forward(image, class_embeddings)``: image (B, 1, D, H, W) float, class_embeddings (K, 512) -> logits
    (B, K, D, H, W). Only the K given classes are computed; each class is computed independently of the others,
    so a subset equals the matching slice of the full output.

    ``organ_embedding`` (N, 512) holds the embeddings of the classes the checkpoint was trained with, in the
    order of ``class_names``.
    """

    organ_embedding: torch.Tensor  # a buffer (register_buffer below)

    def __init__(self, config: ModelConfig, num_classes: int = 32) -> None:
        super().__init__()
        self.config = config
        self.backbone = build_backbone(config)
        bottleneck, decoded = self.backbone.bottleneck_channels, self.backbone.decoder_channels
        self.precls_conv = nn.Sequential(
            _group_norm(decoded), nn.ReLU(), nn.Conv3d(decoded, HEAD_CHANNELS, kernel_size=1)
        )
        self.GAP = nn.Sequential(
            _group_norm(bottleneck),
            nn.ReLU(),
            nn.AdaptiveAvgPool3d(1),
            nn.Conv3d(bottleneck, FEATURE_DIM, kernel_size=1),
        )
        self.controller = nn.Conv3d(2 * FEATURE_DIM, NUM_HEAD_PARAMS, kernel_size=1)
        self.text_to_vision = nn.Linear(TEXT_DIM, FEATURE_DIM)
        self.register_buffer("organ_embedding", torch.zeros(num_classes, TEXT_DIM))
        self.class_names: list[str] = [f"class {i + 1}" for i in range(num_classes)]
        self.metadata: dict = {}

    @property
    def class_embeddings(self) -> torch.Tensor:
        """(N, 512) embeddings of the checkpoint's classes, in ``class_names`` order."""
        return self.organ_embedding

    def embeddings_for(self, indices: Sequence[int]) -> torch.Tensor:
        """Embeddings of the checkpoint's classes at the given 1-based catalog indices: (K, 512), found by the model's
        class names (:func:`~UniversalSegLib.catalog.rows_for`: a model trained for a subset has other rows)."""
        from UniversalSegLib.catalog import rows_for

        return self.organ_embedding[rows_for(self, indices)]

    def encode(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Backbone pass shared by all classes: image (B, 1, D, H, W) -> (global feature (B, 256), head input (B, 8, D, H, W))."""
        bottleneck, decoded = self.backbone(image)
        global_feature = self.GAP(bottleneck).flatten(1)
        return global_feature, self.precls_conv(decoded)

    def head_parameters(self, global_feature: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
        """Controller output for every (sample, class): (B, 256) x (K, 512) -> (B, K, 153).

        Each class is computed separately so a class's parameters do not depend on which other classes are asked for.
        """
        weight = self.controller.weight.flatten(1)
        per_class = []
        for k in range(class_embeddings.shape[0]):
            text = F.relu(self.text_to_vision(class_embeddings[k : k + 1].to(weight.dtype)))  # (1, 256)
            cond = torch.cat([global_feature, text.expand(global_feature.shape[0], -1)], dim=1)  # (B, 512)
            per_class.append(F.linear(cond, weight, self.controller.bias))
        return torch.stack(per_class, dim=1)

    @staticmethod
    def head_layers(x: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One class's dynamic head: flattened head input (B, 8, N) and that class's params (B, 153) -> (hidden 1
        (B, 8, N), hidden 2 (B, 8, N), logits (B, 1, N))."""
        b, c = x.shape[:2]
        w1, w2, w3, b1, b2, b3 = torch.split(params, HEAD_PARAM_SPLITS, dim=1)  # type: ignore[arg-type]  # a tuple works
        h1 = F.relu(torch.baddbmm(b1[:, :, None], w1.reshape(b, c, c), x))
        h2 = F.relu(torch.baddbmm(b2[:, :, None], w2.reshape(b, c, c), h1))
        return h1, h2, torch.baddbmm(b3[:, :, None], w3.reshape(b, 1, c), h2)

    @staticmethod
    def apply_heads(head_input: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Run the dynamic heads: head input (B, 8, D, H, W) and params (B, K, 153) -> logits (B, K, D, H, W)."""
        b, c, *spatial = head_input.shape
        x = head_input.reshape(b, c, -1)
        out = [UniversalModel.head_layers(x, params[:, k])[2] for k in range(params.shape[1])]
        return torch.cat(out, dim=1).reshape(b, params.shape[1], *spatial)

    def forward(self, image: torch.Tensor, class_embeddings: torch.Tensor | None = None) -> torch.Tensor:
        if class_embeddings is None:
            class_embeddings = self.organ_embedding
        if class_embeddings.dim() != 2 or class_embeddings.shape[1] != TEXT_DIM:
            raise ValueError(f"class_embeddings must be (K, {TEXT_DIM}), got {tuple(class_embeddings.shape)}")
        global_feature, head_input = self.encode(image)
        params = self.head_parameters(global_feature, class_embeddings.to(global_feature.device))
        return self.apply_heads(head_input, params)
