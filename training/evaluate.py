"""``universalseg-train evaluate``: run the engine on labelled scans and score it per class (Dice and NSD).

The prediction is exactly what users get (:class:`UniversalSegLib.pipeline.Engine`: preprocessing, sliding windows,
post-processing, masks on the input grid); the reference masks come from the dataset's labels through the same
mapping as training. Scores use MONAI's metrics on the input grid: Dice, and the normalised surface Dice (NSD) at a
tolerance in millimetres. Several models can be compared on the same scans (e.g. before/after fine-tuning).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from UniversalSegLib.catalog import ClassCatalog, model_class_indices
from UniversalSegLib.errors import InputError
from UniversalSegLib.postprocess import PostprocessOptions, steps_for_model

from .datasets import CaseSpec, class_masks, read_case_labels


def score_masks(
    pred: np.ndarray, truth: np.ndarray, spacing_zyx: Sequence[float], tolerance_mm: float
) -> dict[str, Any]:
    """Dice and NSD of two bool (z, y, x) masks. Empty reference: Dice/NSD are None (reported, not averaged)."""
    from monai.metrics import compute_dice, compute_surface_dice

    p = torch.from_numpy(np.ascontiguousarray(pred, dtype=np.float32))[None, None]
    t = torch.from_numpy(np.ascontiguousarray(truth, dtype=np.float32))[None, None]
    out: dict[str, Any] = {"reference_voxels": int(truth.sum()), "predicted_voxels": int(pred.sum())}
    if not truth.any():
        out.update(dice=None, nsd=None)
        return out
    out["dice"] = float(compute_dice(p, t, include_background=True, ignore_empty=True)[0, 0])
    if not pred.any():
        out["nsd"] = 0.0
    else:
        nsd = compute_surface_dice(
            p,
            t,
            class_thresholds=[float(tolerance_mm)],
            include_background=True,
            spacing=[float(s) for s in spacing_zyx],
        )
        out["nsd"] = float(nsd[0, 0])
    return out


def evaluate_models(
    models: Sequence[str],
    cases: Sequence[CaseSpec],
    *,
    classes: str | Sequence[str] | None = None,
    device: str = "auto",
    fast: bool = False,
    overlap: float | None = None,
    postprocess: bool = True,
    nsd_tolerance: float = 2.0,
    accept_licence: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Score each model on each case. Returns ``{"models": [...], "cases": [...], "per_case": {model: {case: {class:
    scores}}}, "summary": {model: {class: {dice, nsd, cases, false_positive_cases}}}}``."""

    from UniversalSegLib.checkpoints import load_model
    from UniversalSegLib.imageio import read_image
    from UniversalSegLib.pipeline import Engine, SegmentationOptions

    catalog = ClassCatalog.default()
    wanted = {c.index for c in catalog.select(classes)} if classes else None
    if not cases:
        raise InputError("no labelled cases to evaluate")
    references: dict[str, tuple[dict[int, np.ndarray], tuple[float, float, float]]] = {}
    per_case: dict[str, dict[str, dict[str, dict]]] = {}
    summary: dict[str, dict[str, dict]] = {}
    for model_ref in models:
        model = load_model(model_ref, device="cpu", accept_licence=accept_licence)
        known = {c for c in model_class_indices(model, catalog, strict=False) if c is not None}
        options = SegmentationOptions(
            device=device,
            fast=fast,
            overlap=overlap,
            postprocess=steps_for_model(known, PostprocessOptions() if postprocess else PostprocessOptions.none()),
        )
        engine = Engine(model, options)
        per_case[model_ref] = {}
        for case in cases:
            if case.name not in references:
                image = read_image(case.image)
                labels = read_case_labels(case, image)
                sx, sy, sz = (float(s) for s in image.GetSpacing())
                references[case.name] = (class_masks(labels), (sz, sy, sx))  # array axes z, y, x
            truth, spacing = references[case.name]
            todo = sorted(c for c in truth if c in known and (wanted is None or c in wanted))
            if not todo:
                continue
            if progress is not None:
                progress(f"{model_ref}: {case.name} ({len(todo)} classes)")
            result = engine.segment(str(case.image), todo)
            scores = {}
            for c in todo:
                scores[catalog[c].name] = score_masks(result.mask_array(c), truth[c], spacing, nsd_tolerance)
            per_case[model_ref][case.name] = scores
        summary[model_ref] = summarise(per_case[model_ref])
        del engine, model
    return {
        "models": list(models),
        "cases": [c.name for c in cases],
        "nsd_tolerance_mm": nsd_tolerance,
        "per_case": per_case,
        "summary": summary,
    }


def summarise(per_case: dict[str, dict[str, dict]]) -> dict[str, dict[str, Any]]:
    """Per class: mean Dice and NSD over cases where the class is present; cases with false positives where absent."""
    out: dict[str, dict[str, Any]] = {}
    classes = sorted({c for scores in per_case.values() for c in scores})
    for c in classes:
        rows = [s[c] for s in per_case.values() if c in s]
        present = [r for r in rows if r["dice"] is not None]
        out[c] = {
            "dice": float(np.mean([r["dice"] for r in present])) if present else None,
            "nsd": float(np.mean([r["nsd"] for r in present])) if present else None,
            "cases": len(present),
            "false_positive_cases": sum(1 for r in rows if r["dice"] is None and r["predicted_voxels"] > 0),
        }
    return out


def _fmt(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def format_table(report: dict[str, Any]) -> str:
    """Markdown table: one row per class, Dice and NSD per model (and the change when two models are compared)."""
    models = report["models"]
    catalog = ClassCatalog.default()
    order = {c.name: c.index for c in catalog}
    classes = sorted({c for m in models for c in report["summary"].get(m, {})}, key=lambda c: order.get(c, 999))
    labels = [Path(m).name if ("/" in m or m.endswith(".safetensors")) else m for m in models]
    head = ["class"]
    for lab in labels:
        head += [f"Dice {lab}", f"NSD {lab}"]
    if len(models) == 2:
        head += ["Dice change", "NSD change"]
    head.append("cases")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for c in classes:
        row = [c]
        vals = []
        for m in models:
            s = report["summary"].get(m, {}).get(c, {})
            row += [_fmt(s.get("dice")), _fmt(s.get("nsd"))]
            vals.append(s)
        if len(models) == 2:
            a, b = vals
            for key in ("dice", "nsd"):
                row.append(f"{b[key] - a[key]:+.3f}" if a.get(key) is not None and b.get(key) is not None else "-")
        row.append(str(max((v.get("cases", 0) for v in vals), default=0)))
        lines.append("| " + " | ".join(row) + " |")
    for m, lab in zip(models, labels):
        present = [s["dice"] for s in report["summary"].get(m, {}).values() if s.get("dice") is not None]
        if present:
            lines.append(f"\nmean Dice {lab}: {np.mean(present):.3f} over {len(present)} classes")
    lines.append(f"\nNSD tolerance: {report['nsd_tolerance_mm']} mm; reference cases: {len(report['cases'])}")
    return "\n".join(lines)


def write_report(report: dict[str, Any], folder: str | Path) -> tuple[Path, Path]:
    """``evaluation.json`` and ``evaluation.md`` in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    js = folder / "evaluation.json"
    md = folder / "evaluation.md"
    js.write_text(json.dumps(report, indent=2))
    md.write_text(format_table(report) + "\n")
    return js, md
