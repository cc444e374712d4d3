"""A PNG that a person can look at: CT slices with the segmentation drawn over them."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .result import SegmentationResult

# Soft-tissue window for display (HU).
DISPLAY_WINDOW = (-160.0, 240.0)


def _to_display_orientation(image: sitk.Image) -> sitk.Image:
    """Reorient to LPS so that array rows run anterior->posterior and columns right->left (radiological view)."""
    return sitk.DICOMOrient(image, "LPS")


def render_overlay(image: sitk.Image, result: SegmentationResult, path: str | Path, *, axial_slices: int = 3, alpha: float = 0.45) -> Path:
    """Write a PNG with ``axial_slices`` axial slices and one coronal slice of ``image`` with class colours blended in.

    Slices are taken where the segmentation is largest, so the picture shows the result, not empty anatomy.
    """
    from PIL import Image, ImageDraw

    ct = sitk.GetArrayFromImage(_to_display_orientation(image)).astype(np.float32)  # (z, y, x), LPS
    labels = sitk.GetArrayFromImage(_to_display_orientation(result.label_image()))
    lo, hi = DISPLAY_WINDOW
    grey = (np.clip((ct - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    palette = np.zeros((max(int(labels.max()), max(result.masks, default=0)) + 1, 3), dtype=np.float32)
    for info, _ in result:
        palette[info.index] = info.color

    def blend(grey2d: np.ndarray, labels2d: np.ndarray) -> np.ndarray:
        rgb = np.repeat(grey2d[..., None], 3, axis=2).astype(np.float32)
        on = labels2d > 0
        rgb[on] = (1 - alpha) * rgb[on] + alpha * palette[labels2d[on]]
        return rgb.astype(np.uint8)

    spacing = _to_display_orientation(image).GetSpacing()
    per_slice = (labels > 0).sum(axis=(1, 2))
    if per_slice.any():
        nz = np.flatnonzero(per_slice)
        picks = np.linspace(nz[0], nz[-1], axial_slices + 2)[1:-1].round().astype(int)
    else:
        picks = np.linspace(0, labels.shape[0] - 1, axial_slices + 2)[1:-1].round().astype(int)
    panels = []
    for z in picks[::-1]:  # head first
        panel = Image.fromarray(blend(grey[z], labels[z]))
        panel = panel.resize((round(panel.width * spacing[0]), round(panel.height * spacing[1])))
        panels.append((f"axial {z}", panel))
    body_rows = np.flatnonzero((ct > -300).any(axis=(0, 2)))  # coronal slice through the middle of the body
    y = int(body_rows[len(body_rows) // 2]) if len(body_rows) else labels.shape[1] // 2
    coronal = Image.fromarray(blend(grey[::-1, y, :], labels[::-1, y, :]))
    coronal = coronal.resize((round(coronal.width * spacing[0]), round(coronal.height * spacing[2])))
    panels.append((f"coronal {y}", coronal))

    height = max(p.height for _, p in panels) + 20
    legend_rows = [(info.name, info.color) for info, m in result if m.voxel_count]
    legend_height = 18 * ((len(legend_rows) + 2) // 3) + 10
    width = sum(p.width for _, p in panels) + 10 * (len(panels) + 1)
    canvas = Image.new("RGB", (max(width, 600), height + legend_height + 10), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    x = 10
    for title, panel in panels:
        canvas.paste(panel, (x, 20))
        draw.text((x, 4), title, fill=(255, 255, 255))
        x += panel.width + 10
    for n, (name, color) in enumerate(legend_rows):
        lx, ly = 10 + (n % 3) * 200, height + 10 + (n // 3) * 18
        draw.rectangle([lx, ly, lx + 12, ly + 12], fill=tuple(int(c) for c in color))
        draw.text((lx + 18, ly), name, fill=(255, 255, 255))
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    canvas.save(tmp, format="PNG")
    tmp.replace(path)
    return path
