"""A PNG that a person can look at: CT slices with the segmentation drawn over them, and a legend with volumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .result import SegmentationResult

# Soft-tissue window for display (HU).
DISPLAY_WINDOW = (-160.0, 240.0)

# Categorical palette for the picture, in order of use (Sasha Trubetskoy's 20 distinct colours, then 5 more): the
# catalog's terminology colours give neighbours such as liver, aorta and celiac trunk nearly the same red.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (67, 99, 216),
    (245, 130, 49),
    (145, 30, 180),
    (66, 212, 244),
    (240, 50, 230),
    (191, 239, 69),
    (250, 190, 212),
    (70, 153, 144),
    (220, 190, 255),
    (154, 99, 36),
    (255, 250, 200),
    (128, 0, 0),
    (170, 255, 195),
    (128, 128, 0),
    (255, 216, 177),
    (0, 0, 117),
    (169, 169, 169),
    (255, 255, 255),
    (0, 130, 200),
    (210, 245, 60),
    (0, 128, 128),
    (255, 120, 120),
)


def _to_display_orientation(image: sitk.Image) -> sitk.Image:
    """Reorient to LPS so that array rows run anterior->posterior and columns right->left (radiological view)."""
    return sitk.DICOMOrient(image, "LPS")


def _outline(labels2d: np.ndarray) -> np.ndarray:
    """Bool (H, W): pixels whose 4-neighbourhood holds another label (each segment's border)."""
    edge = np.zeros(labels2d.shape, dtype=bool)
    edge[1:, :] |= labels2d[1:, :] != labels2d[:-1, :]
    edge[:-1, :] |= labels2d[:-1, :] != labels2d[1:, :]
    edge[:, 1:] |= labels2d[:, 1:] != labels2d[:, :-1]
    edge[:, :-1] |= labels2d[:, :-1] != labels2d[:, 1:]
    return edge & (labels2d > 0)


def render_overlay(
    image: sitk.Image, result: SegmentationResult, path: str | Path, *, axial_slices: int = 3, alpha: float = 0.35
) -> Path:
    """Write a PNG with ``axial_slices`` axial slices and one coronal slice of ``image``, each segment filled
    translucently and outlined in a colour of its own, and a legend with each segment's volume.

    Slices are taken where the segmentation is largest, so the picture shows the result, not empty anatomy.
    """
    from PIL import Image, ImageDraw

    ct = sitk.GetArrayFromImage(_to_display_orientation(image)).astype(np.float32)  # (z, y, x), LPS
    labels = sitk.GetArrayFromImage(_to_display_orientation(result.label_image()))
    lo, hi = DISPLAY_WINDOW
    grey = (np.clip((ct - lo) / (hi - lo), 0, 1) * 255).astype(np.uint8)
    summary = {c["index"]: c for c in result.summary()["classes"]}
    shown = [info for info, mask in result if mask.voxel_count]
    palette = np.zeros((max(int(labels.max()), max(result.masks, default=0)) + 1, 3), dtype=np.float32)
    for n, info in enumerate(shown):
        palette[info.index] = PALETTE[n % len(PALETTE)]

    def blend(grey2d: np.ndarray, labels2d: np.ndarray) -> np.ndarray:
        rgb = np.repeat(grey2d[..., None], 3, axis=2).astype(np.float32)
        on = labels2d > 0
        rgb[on] = (1 - alpha) * rgb[on] + alpha * palette[labels2d[on]]
        edge = _outline(labels2d)
        rgb[edge] = palette[labels2d[edge]]
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
    legend_rows = [
        (
            f"{info.name}  {summary[info.index]['volume_ml']:.0f} mL"
            if summary[info.index]["volume_ml"] >= 10
            else f"{info.name}  {summary[info.index]['volume_ml']:.1f} mL",
            tuple(int(c) for c in palette[info.index]),
        )
        for info in shown
    ]
    notes = result.plausibility()
    columns = 3
    legend_height = 18 * ((len(legend_rows) + columns - 1) // columns) + 10 + 16 * len(notes)
    width = sum(p.width for _, p in panels) + 10 * (len(panels) + 1)
    canvas = Image.new("RGB", (max(width, 720), height + legend_height + 10), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    x = 10
    for title, panel in panels:
        canvas.paste(panel, (x, 20))
        draw.text((x, 4), title, fill=(255, 255, 255))
        x += panel.width + 10
    for n, (text, color) in enumerate(legend_rows):
        lx, ly = 10 + (n % columns) * 240, height + 10 + (n // columns) * 18
        draw.rectangle([lx, ly, lx + 12, ly + 12], fill=color)
        draw.text((lx + 18, ly), text, fill=(255, 255, 255))
    ny = height + 10 + 18 * ((len(legend_rows) + columns - 1) // columns) + 4
    for n, note in enumerate(notes):
        draw.text((10, ny + 16 * n), "! " + note, fill=(255, 200, 0))
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    canvas.save(tmp, format="PNG")
    tmp.replace(path)
    return path
