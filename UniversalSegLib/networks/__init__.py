"""Network definitions: the Universal Model and its two backbones."""

from .swin_unetr import ReleasedPatchMerging, SwinUNETRBackbone
from .unet3d import PerSampleBatchNorm3d, UNet3DBackbone
from .universal_model import ARCHITECTURES, ModelConfig, UniversalModel

__all__ = [
    "ARCHITECTURES",
    "ModelConfig",
    "PerSampleBatchNorm3d",
    "ReleasedPatchMerging",
    "SwinUNETRBackbone",
    "UNet3DBackbone",
    "UniversalModel",
]
