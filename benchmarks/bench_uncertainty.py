"""Does the uncertainty point at the errors? Voxel uncertainty against voxel error on labelled CTs; prints JSON.

    python benchmarks/bench_uncertainty.py --out benchmarks/results/uncertainty_bundled_liver.json

For each CT, the bundled model's liver (or ``--model``/``--classes``): the blended probability p of every voxel
(the segmenter's logits, brought back to the input grid at 19 probability levels), uncertainty u = 1 - |2p - 1|, and
error = (p > 0.5) != the reference label (TotalSegmentator's). Within a band around the organ (the bounding box of
label and prediction, widened by 10 mm): the area under the ROC curve of u for finding error voxels (0.5 = no
signal), the share of error voxels that the engine marks uncertain (p in 0.2-0.8, what the summary counts) and the
share of those marked voxels that are errors. ``totalseg_abdomen`` is the bundled model's held-out patient; the
others were in its training data (their figures flatter it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_presets import SHARED, cpu_model, print_report  # noqa: E402

#: CT, its reference labels, the label value of each class there, whether the bundled model was trained on it.
CTS = {
    "totalseg_abdomen": ("totalseg_abdomen/ct.nii.gz", "totalseg_abdomen/labels_totalseg_v2.nii.gz", 5, False),
    "lidc_chest_upper_abdomen": (
        "lidc_chest_upper_abdomen/ct.nii.gz",
        "lidc_chest_upper_abdomen/labels_totalseg_v2.nii.gz",
        5,
        True,
    ),
}
LEVELS = np.round(np.linspace(0.05, 0.95, 19), 2)
BAND_MM = 10.0


def auc(score: np.ndarray, positive: np.ndarray) -> float | None:
    """Area under the ROC curve of ``score`` for ``positive`` (Mann-Whitney, ties counted half)."""
    from scipy.stats import rankdata

    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return None
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def probability_on_input_grid(engine, prediction, channel: int) -> np.ndarray:
    """The blended probability of one class, (z, y, x) on the input grid, at the resolution of ``LEVELS``."""
    import torch

    from UniversalSegLib.inferer import SlidingWindowSegmenter
    from UniversalSegLib.pipeline import model_preprocessing

    grid = model_preprocessing(engine.model)
    segmenter = SlidingWindowSegmenter(engine.model, roi_size=grid.roi_size, overlap=prediction.overlap)
    rows = [engine.model.class_names.index(engine.catalog[channel].name)]
    with torch.inference_mode():
        logits = segmenter(prediction.preprocessed.image[None], engine.model.class_embeddings[rows])[0, 0]
    probability = torch.sigmoid(logits).numpy()
    out = None
    for level in LEVELS:
        above = prediction.preprocessed.invert_mask(probability > level)
        out = np.where(above, level, 0.0) if out is None else np.where(above, level, out)
    assert out is not None
    return out


def run_ct(model, name: str, class_name: str) -> dict:
    import SimpleITK as sitk

    from UniversalSegLib.pipeline import Engine

    ct, labels, value, trained_on = CTS[name]
    engine = Engine(model)
    index = engine.catalog.lookup(class_name).index
    prediction = engine.predict(SHARED / ct, class_name)
    p = probability_on_input_grid(engine, prediction, index)
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(SHARED / labels))) == value
    predicted = p > 0.5
    union = reference | predicted
    spacing = np.array(sitk.ReadImage(str(SHARED / ct)).GetSpacing()[::-1])
    grow = np.ceil(BAND_MM / spacing).astype(int)
    hit = [np.flatnonzero(union.any(axis=tuple(a for a in range(3) if a != ax))) for ax in range(3)]
    band = tuple(slice(max(h[0] - g, 0), min(h[-1] + 1 + g, s)) for h, g, s in zip(hit, grow, union.shape))
    error = (predicted != reference)[band].ravel()
    u = (1.0 - np.abs(2.0 * p - 1.0))[band].ravel()
    marked = ((p > 0.2) & (p < 0.8))[band].ravel()
    return {
        "class": engine.catalog[index].name,
        "trained_on_this_patient": trained_on,
        "band_voxels": int(error.size),
        "error_voxels": int(error.sum()),
        "auc_uncertainty_vs_error": None if (a := auc(u, error)) is None else round(a, 4),
        "errors_marked_uncertain": round(float((error & marked).sum() / max(error.sum(), 1)), 4),
        "marked_voxels_that_are_errors": round(float((error & marked).sum() / max(marked.sum(), 1)), 4),
        "dice": round(float(2 * (predicted & reference).sum() / max(predicted.sum() + reference.sum(), 1)), 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint path or registry name (default: bundled model)")
    parser.add_argument("--classes", default="liver")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    document = {
        "benchmark": "bench_uncertainty",
        "command": "python benchmarks/bench_uncertainty.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "cpu": cpu_model(),
        "model": args.model or "bundled",
        "cts": {name: run_ct(args.model, name, args.classes) for name in CTS},
    }
    print_report(document, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
