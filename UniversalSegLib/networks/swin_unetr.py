"""Swin UNETR backbone of the Universal Model (``backbone="swinunetr"``), built from MONAI's classes.

The released weights were trained with a patch-merging layer that concatenates the eight 2x2x2 sub-grids in a
particular (duplicating) order; MONAI's current ``PatchMerging`` differs, so we supply that layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.nets.swin_unetr import PatchMergingV2, SwinUNETR

# (d, h, w) offsets of the sub-grids, in the order the released weights expect. Two appear twice and
# (1, 1, 0), (0, 1, 1) never: that is how the checkpoints were trained.
RELEASED_MERGE_OFFSETS: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),
    (1, 0, 0),
    (0, 1, 0),
    (0, 0, 1),
    (1, 0, 1),
    (0, 1, 0),
    (0, 0, 1),
    (1, 1, 1),
)


class ReleasedPatchMerging(PatchMergingV2):
    """Patch merging with the sub-grid order of the released Universal Model checkpoints.

    Input (B, D, H, W, C) channels-last; output (B, ceil(D/2), ceil(H/2), ceil(W/2), 2C).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5:
            return super().forward(x)
        _, d, h, w, _ = x.shape
        if d % 2 or h % 2 or w % 2:
            x = F.pad(x, (0, 0, 0, w % 2, 0, h % 2, 0, d % 2))
        parts = [x[:, i::2, j::2, k::2, :] for i, j, k in RELEASED_MERGE_OFFSETS]
        return self.reduction(self.norm(torch.cat(parts, -1)))


class SwinUNETRBackbone(SwinUNETR):
    """MONAI ``SwinUNETR(use_v2=False, normalize=True)`` without its output block.

    ``feature_size=48`` is the released size (62.19 M parameters, bottleneck 768, decoder output 48).
    ``forward(x)`` with x of shape (B, 1, D, H, W), D, H, W divisible by 32, returns
    ``(bottleneck, decoded)``: ``encoder10`` of the last hidden state, (B, 16*f, D/32, H/32, W/32), and the
    decoder output (B, f, D, H, W).
    """

    def __init__(self, in_channels: int = 1, feature_size: int = 48) -> None:
        super().__init__(
            in_channels=in_channels,
            out_channels=1,
            feature_size=feature_size,
            drop_rate=0.0,
            attn_drop_rate=0.0,
            dropout_path_rate=0.0,
            normalize=True,
            use_checkpoint=False,
            spatial_dims=3,
            downsample=ReleasedPatchMerging,  # type: ignore[arg-type]  # MONAI takes a PatchMerging class too
            use_v2=False,
        )
        del self.out  # the Universal Model's class heads replace the output block
        self.bottleneck_channels = 16 * feature_size
        self.decoder_channels = feature_size

    def forward(self, x_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_input_size(x_in.shape[2:])
        hidden = self.swinViT(x_in, self.normalize)
        enc0 = self.encoder1(x_in)
        enc1 = self.encoder2(hidden[0])
        enc2 = self.encoder3(hidden[1])
        enc3 = self.encoder4(hidden[2])
        dec4 = self.encoder10(hidden[4])
        dec3 = self.decoder5(dec4, hidden[3])
        dec2 = self.decoder4(dec3, enc3)
        dec1 = self.decoder3(dec2, enc2)
        dec0 = self.decoder2(dec1, enc1)
        return dec4, self.decoder1(dec0, enc0)
