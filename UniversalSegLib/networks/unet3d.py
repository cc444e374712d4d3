"""The 3D U-Net of Models Genesis, as used by the CLIP-Driven Universal Model (``backbone="unet"``).

Parameter names follow the released checkpoints (``down_tr64.ops.0.conv1.weight`` ...), so they load strictly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PerSampleBatchNorm3d(nn.BatchNorm3d):
    """Batch norm that always normalises with the statistics of the tensor it is given, one sample at a time.

    The released U-Net weights were trained and are used with batch statistics (Models Genesis' ``ContBatchNorm3d``
    calls ``F.batch_norm(..., training=True)`` also in eval mode); upstream inference feeds one window per batch, so
    each window is normalised by its own per-channel statistics. Computing them per sample (instance statistics)
    gives exactly that for any batch size, so a window's output never depends on which windows share its batch.
    Running statistics are kept as buffers only so that checkpoints load strictly; they are never used or updated.

    Input and output: (B, C, D, H, W).

    ``line_wise_statistics = True`` computes the same statistics as explicit means of line means (see
    :func:`line_wise_instance_norm`). It is set only while the model is converted for OpenVINO: OpenVINO fuses
    ``instance_norm`` into its MVN kernel, whose float32 sums over a 96^3 window are about 1000x less exact than
    PyTorch's (error 2e-3 after one layer of the released U-Net); explicit line-wise reductions are not fused and keep
    the converted model within float32 rounding of PyTorch's.
    """

    line_wise_statistics: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            raise ValueError(f"expected a 5-D (B, C, D, H, W) input, got {tuple(x.shape)}")
        if self.line_wise_statistics:
            return line_wise_instance_norm(x, self.weight, self.bias, self.eps)
        return F.instance_norm(x, None, None, self.weight, self.bias, use_input_stats=True, eps=self.eps)


def _line_wise_mean(x: torch.Tensor) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, C, 1, 1, 1): the mean of each (b, c) volume as the mean of its line means."""
    b, c = x.shape[:2]
    return x.mean(dim=4).reshape(b, c, -1).mean(dim=2).reshape(b, c, 1, 1, 1)


def line_wise_instance_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """Instance normalisation (biased variance, like ``F.instance_norm``) from two-level means.

    x (B, C, D, H, W), weight and bias (C,) -> (B, C, D, H, W). Equal to ``F.instance_norm`` up to float32 rounding.
    """
    centred = x - _line_wise_mean(x)
    scale = torch.rsqrt(_line_wise_mean(centred * centred) + eps)
    return centred * scale * weight.reshape(1, -1, 1, 1, 1) + bias.reshape(1, -1, 1, 1, 1)


class ConvBnRelu(nn.Module):
    """3x3x3 convolution -> per-sample batch norm -> ReLU (upstream ``LUConv``)."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv3d(in_channels, out_channels, kernel_size=3, padding=1)
        self.bn1 = PerSampleBatchNorm3d(out_channels, eps=1e-5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(x)))


def _double_conv(in_channels: int, mid_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(ConvBnRelu(in_channels, mid_channels), ConvBnRelu(mid_channels, out_channels))


class DownTransition(nn.Module):
    """Two conv blocks, then 2x max-pooling (except at the deepest level). Returns (pooled, skip before pooling)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, pool: bool) -> None:
        super().__init__()
        self.ops = _double_conv(in_channels, mid_channels, out_channels)
        self.pool = pool

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        skip = self.ops(x)
        return (F.max_pool3d(skip, 2) if self.pool else skip), skip


class UpTransition(nn.Module):
    """2x transposed convolution, concatenation [upsampled, skip], two conv blocks."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int) -> None:
        super().__init__()
        self.up_conv = nn.ConvTranspose3d(in_channels, in_channels, kernel_size=2, stride=2)
        self.ops = _double_conv(in_channels + skip_channels, out_channels, out_channels)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.ops(torch.cat((self.up_conv(x), skip), dim=1))


class UNet3DBackbone(nn.Module):
    """Models Genesis 3D U-Net without its output layer.

    ``base_channels=32`` is the released size (19.08 M parameters, bottleneck 512, decoder output 64); smaller values
    build narrower members of the same family (e.g. 8 -> 1/4 width) for CPU training and tests.

    ``forward(x)`` with x of shape (B, 1, D, H, W), D, H, W divisible by 8, returns
    ``(bottleneck, decoded)``: (B, 16*base, D/8, H/8, W/8) and (B, 2*base, D, H, W).
    """

    def __init__(self, in_channels: int = 1, base_channels: int = 32) -> None:
        super().__init__()
        c = base_channels
        self.down_tr64 = DownTransition(in_channels, c, 2 * c, pool=True)
        self.down_tr128 = DownTransition(2 * c, 2 * c, 4 * c, pool=True)
        self.down_tr256 = DownTransition(4 * c, 4 * c, 8 * c, pool=True)
        self.down_tr512 = DownTransition(8 * c, 8 * c, 16 * c, pool=False)
        self.up_tr256 = UpTransition(16 * c, 8 * c, 8 * c)
        self.up_tr128 = UpTransition(8 * c, 4 * c, 4 * c)
        self.up_tr64 = UpTransition(4 * c, 2 * c, 2 * c)
        self.bottleneck_channels = 16 * c
        self.decoder_channels = 2 * c

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out64, skip64 = self.down_tr64(x)
        out128, skip128 = self.down_tr128(out64)
        out256, skip256 = self.down_tr256(out128)
        bottleneck, _ = self.down_tr512(out256)
        up = self.up_tr256(bottleneck, skip256)
        up = self.up_tr128(up, skip128)
        up = self.up_tr64(up, skip64)
        return bottleneck, up
