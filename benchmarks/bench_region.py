"""The region step (issue: speed): a subset request with and without it, on the same CT in one process; prints JSON.

    python benchmarks/bench_region.py                                   # bundled model, its liver
    python benchmarks/bench_region.py --model runs/universalseg-tiny-stage4/model.safetensors \\
        --classes liver,spleen,pancreas --out benchmarks/results/region_stage4_3classes.json

Per CT: windows of the full run, windows the localiser and the boxes ran, network GFLOP of each (windows x the
model's GFLOP per window, counted by torch's FlopCounterMode), wall time of the windows stage and in all, and Dice
of each class against the run without the region step (``--no-roi``), after the published post-processing (what
the user gets) and before it. Goals: >= 4x fewer network FLOPs and >= 3x
less wall time for a 3-class request (liver, spleen, pancreas) on the chest CT and on ``ccth_wholebody``, Dice >= 0.99.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from bench_presets import SHARED, cpu_model, dice, print_report  # noqa: E402
from bench_segment import flops_per_window  # noqa: E402

CTS = {
    "lidc_chest_upper_abdomen": "lidc_chest_upper_abdomen/ct.nii.gz",
    "ccth_wholebody": "ccth_wholebody/ct.nii.gz",
    "totalseg_abdomen": "totalseg_abdomen/ct.nii.gz",
}


def run_ct(model, path: Path, classes: str, precision: str) -> dict:
    from UniversalSegLib.pipeline import Engine, SegmentationOptions
    from UniversalSegLib.postprocess import postprocess

    runs = {}
    for region in (False, True):
        engine = Engine(model, SegmentationOptions(region=region, precision=precision))
        t = time.perf_counter()
        prediction = engine.predict(path, classes)
        runs[region] = (prediction, time.perf_counter() - t)
    (full, full_s), (boxed, boxed_s) = runs[False], runs[True]
    finished = {region: postprocess(dict(p.masks), engine.postprocess_options()) for region, (p, _) in runs.items()}
    config = engine.model.config
    per_window = flops_per_window(config.architecture, int(config.width), len(full.computed), full.roi_size[0])
    gflop = per_window["total_gflop"]
    report = boxed.region
    windows_region = report.windows_run + report.locate_windows
    return {
        "preprocessed_shape": list(full.preprocessed.shape),
        "region": report.to_json(),
        "windows_full": report.windows_full,
        "windows_with_region": windows_region,
        "network_gflop_full": round(report.windows_full * gflop, 1),
        "network_gflop_with_region": round(windows_region * gflop, 1),
        "flop_ratio": round(report.windows_full / max(windows_region, 1), 2),
        "seconds_full": round(full_s, 2),
        "seconds_with_region": round(boxed_s, 2),
        "time_ratio": round(full_s / boxed_s, 2),
        "windows_stage_seconds": [round(full.timings["windows"], 2), round(boxed.timings["windows"], 2)],
        # what the user gets (after the published post-processing) and the thresholded masks before it
        "dice_vs_full": {
            engine.catalog[i].name: round(dice(finished[True][i], finished[False][i]), 5) for i in full.requested
        },
        "dice_vs_full_before_postprocess": {
            engine.catalog[i].name: round(dice(boxed.masks[i], full.masks[i]), 5) for i in full.requested
        },
        "voxels_full": {engine.catalog[i].name: int(full.masks[i].sum()) for i in full.requested},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="checkpoint path or registry name (default: bundled model)")
    parser.add_argument("--classes", default="liver", help="the request (default: liver)")
    parser.add_argument("--cts", default=",".join(CTS), help=f"comma-separated, of: {', '.join(CTS)}")
    parser.add_argument("--precision", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(torch.get_num_threads())
    document = {
        "benchmark": "bench_region",
        "command": "python benchmarks/bench_region.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "model": args.model or "bundled",
        "classes": args.classes,
        "precision": args.precision,
        "cts": {},
    }
    for name in [c.strip() for c in args.cts.split(",") if c.strip()]:
        if name not in CTS:
            parser.error(f"unknown CT {name!r}; choose from {', '.join(CTS)}")
        document["cts"][name] = run_ct(args.model, SHARED / CTS[name], args.classes, args.precision)
        print(json.dumps({name: document["cts"][name]}), file=sys.stderr, flush=True)
    print_report(document, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
