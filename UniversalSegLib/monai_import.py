"""Import MONAI without the torchvision import it does not need here: about 2 s off every engine start.

``import monai`` loads every MONAI submodule, and through its optional torchvision backbones (``monai.networks.blocks.
backbone_fpn_utils``) torchvision and ``torch._dynamo``: 2 of the 8 s before a new engine process (every click of
the Slicer module starts one) reads the CT. The engine uses none of MONAI's torchvision parts, so torchvision is
hidden while MONAI loads (MONAI's ``optional_import`` then leaves those parts unavailable) and visible again
afterwards: a later ``import torchvision`` (open_clip's, for free-text prompts) works as usual.
"""

from __future__ import annotations

import sys


def import_monai() -> None:
    """Import MONAI (once) without torchvision, unless either is already loaded."""
    if "monai" in sys.modules or "torchvision" in sys.modules:
        return
    sys.modules["torchvision"] = None  # type: ignore[assignment]  # makes `import torchvision` raise ImportError
    try:
        import monai  # noqa: F401
    finally:
        del sys.modules["torchvision"]
