"""Draws the extension and module icons (128x128 RGBA PNG): a stylised axial abdominal CT slice with coloured organs.

Colours are the class catalog's. Run from the repository root: ``python UniversalSegExtension/make_icons.py``.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from UniversalSegLib.catalog import ClassCatalog

SIZE = 128
SCALE = 4  # draw large, then downsample for smooth edges
REPO = Path(__file__).resolve().parents[1]
OUTPUTS = (
    REPO / "UniversalSegExtension" / "UniversalSeg.png",
    REPO / "UniversalSeg" / "Resources" / "Icons" / "UniversalSeg.png",
)


def _box(cx: float, cy: float, rx: float, ry: float) -> tuple[int, int, int, int]:
    s = SCALE
    return (int((cx - rx) * s), int((cy - ry) * s), int((cx + rx) * s), int((cy + ry) * s))


def draw() -> Image.Image:
    catalog = ClassCatalog.default()
    colour = {c.file_stem: tuple(c.color) + (255,) for c in catalog}
    big = Image.new("RGBA", (SIZE * SCALE, SIZE * SCALE), (0, 0, 0, 0))
    d = ImageDraw.Draw(big)
    # rounded dark tile
    d.rounded_rectangle((0, 0, SIZE * SCALE - 1, SIZE * SCALE - 1), radius=22 * SCALE, fill=(24, 30, 42, 255))
    # body outline (fat, muscle) and spine, as on an axial CT slice (patient's right on the image's left)
    d.ellipse(_box(64, 66, 54, 42), fill=(150, 150, 150, 255))
    d.ellipse(_box(64, 66, 50, 38), fill=(92, 92, 92, 255))
    d.ellipse(_box(64, 95, 9, 8), fill=(235, 235, 235, 255))  # vertebral body
    # organs in catalog colours
    d.ellipse(_box(40, 56, 26, 20), fill=colour["liver"])
    d.ellipse(_box(93, 66, 11, 14), fill=colour["spleen"])
    d.ellipse(_box(76, 50, 15, 10), fill=colour["stomach"])
    d.ellipse(_box(44, 84, 9, 11), fill=colour["right_kidney"])
    d.ellipse(_box(84, 84, 9, 11), fill=colour["left_kidney"])
    d.ellipse(_box(66, 82, 5, 5), fill=colour["aorta"])
    d.ellipse(_box(55, 80, 5, 4), fill=colour["postcava"])
    d.ellipse(_box(33, 52, 6, 5), fill=colour["liver_tumor"])  # a lesion in the liver
    # selection outline around the liver, as drawn by a segmentation tool
    d.ellipse(_box(40, 56, 27, 21), outline=(255, 255, 255, 255), width=2 * SCALE)
    return big.resize((SIZE, SIZE), Image.LANCZOS).filter(ImageFilter.SMOOTH_MORE)


def main() -> None:
    image = draw()
    for path in OUTPUTS:
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path, optimize=True)
        print(path)


if __name__ == "__main__":
    main()
