"""Which window overlap and precision keep the answer: per-class Dice of each preset against the published setting
(overlap 0.5, float32) and against the reference labels, with trained weights; prints JSON.

    python benchmarks/bench_presets.py --model runs/universalseg-tiny-stage4/model.safetensors --out presets.json

Everything runs in this one process, so the windows-stage times are ratios on the same machine (the CPU model is
recorded). CTs: the labelled patients of ../shared/data/ct (each with its reference labels), plus the unlabelled
``itkelastix_chest``. The decision rule (issue: speed): the cheapest preset whose Dice against overlap 0.5 / float32
is >= 0.95 on every large organ it finds (>= 1,000 voxels in the reference run) is the ``--fast`` preset; bfloat16 may
be the normal precision only where its Dice against float32 at overlap 0.5 is >= 0.995 on those organs.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = REPO.parent / "shared" / "data" / "ct"
sys.path.insert(0, str(REPO))

CTS = {
    "totalseg_abdomen": ("totalseg_abdomen/ct.nii.gz", "non-contrast abdomen + pelvis, 3 mm"),
    "lidc_chest_upper_abdomen": ("lidc_chest_upper_abdomen/ct.nii.gz", "contrast chest + upper abdomen"),
    "ccth_wholebody": ("ccth_wholebody/ct.nii.gz", "whole body"),
    "itkelastix_chest": ("itkelastix_chest/ct.nii.gz", "non-contrast chest, 512x512x141"),
}
PRESETS = [
    (0.5, "float32"),
    (0.5, "bfloat16"),
    (0.25, "float32"),
    (0.25, "bfloat16"),
    (0.0, "float32"),
    (0.0, "bfloat16"),
]
LARGE_VOXELS = 1000  # a class is "large" when the reference run gives it at least this many input voxels


def dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def print_report(document: dict, out: Path | None) -> None:
    """Print a benchmark's JSON document, and write it to ``out`` when given."""
    text = json.dumps(document, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="universalseg-tiny", help="checkpoint path or registry name (trained)")
    parser.add_argument("--ct", nargs="+", default=list(CTS), choices=list(CTS))
    parser.add_argument("--backend", default="auto", choices=("auto", "torch", "openvino"))
    parser.add_argument(
        "--presets",
        help="overlap/precision pairs to try, e.g. 0.4/bfloat16,0.33/bfloat16 (default: 0.5, 0.25, 0 x float32, "
        "bfloat16); the reference 0.5/float32 always runs first",
    )
    parser.add_argument(
        "--decide-on",
        help="comma-separated class names the decision looks at (default: every large class the model finds)",
    )
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)

    import torch

    from UniversalSegLib.checkpoints import load_model
    from UniversalSegLib.imageio import read_image
    from UniversalSegLib.inferer import cpu_supports_bfloat16
    from UniversalSegLib.pipeline import Engine, SegmentationOptions

    model = load_model(args.model, device="cpu")
    report: dict = {
        "command": " ".join(["python", "benchmarks/bench_presets.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {"cpu": cpu_model(), "threads": torch.get_num_threads(), "native_bfloat16": cpu_supports_bfloat16()},
        "model": str(args.model),
        "cts": {},
    }
    presets = PRESETS
    if args.presets:
        pairs = [item.split("/") for item in args.presets.split(",")]
        presets = [(0.5, "float32")] + [
            (float(o), p.strip()) for o, p in pairs if (float(o), p.strip()) != (0.5, "float32")
        ]
    engines = {
        preset: Engine(model, SegmentationOptions(overlap=preset[0], precision=preset[1], backend=args.backend))
        for preset in presets
    }
    for name in args.ct:
        image = read_image(SHARED / CTS[name][0])
        runs: dict[str, dict] = {}
        reference: dict[int, np.ndarray] = {}
        for (overlap, precision), engine in engines.items():
            if name == args.ct[0]:  # warm-up, not timed: the first run converts and compiles (OpenVINO)
                engine.segment(image[: image.GetWidth() // 2, : image.GetHeight() // 2, :], "all")
            t = time.perf_counter()
            result = engine.segment(image, "all")
            wall = time.perf_counter() - t
            masks = {info.index: result.mask_array(info.index) for info, _ in result}
            key = f"overlap {overlap:g} / {precision}"
            if not reference:
                reference = masks
            large = {c: m for c, m in reference.items() if int(m.sum()) >= LARGE_VOXELS}
            per_class = {
                result.class_info(c).name: round(dice(masks.get(c, np.zeros_like(m)), m), 4) for c, m in large.items()
            }
            runs[key] = {
                "overlap": overlap,
                "precision": result.settings.get("precision", precision),
                "windows": result.settings.get("windows"),
                "windows_s": round(result.timings.get("windows", float("nan")), 2),
                "total_s": round(wall, 2),
                "dice_vs_overlap_0.5_float32": per_class,
                "min_dice_large": min(per_class.values()) if per_class else None,
            }
        base = runs["overlap 0.5 / float32"]["total_s"]
        for r in runs.values():
            r["speedup"] = round(base / r["total_s"], 2) if r["total_s"] else None
        report["cts"][name] = {"what": CTS[name][1], "runs": runs}
    wanted = {n.strip().lower() for n in args.decide_on.split(",")} if args.decide_on else None

    def worst(key: str) -> float | None:
        """The lowest Dice against overlap 0.5 / float32 of the decided-on classes, over all CTs."""
        values = [
            d
            for ct in report["cts"].values()
            for name, d in ct["runs"][key]["dice_vs_overlap_0.5_float32"].items()
            if wanted is None or name.lower() in wanted
        ]
        return min(values) if values else None

    lowest = {key: worst(key) for key in runs}
    report["decision"] = {
        "classes": sorted(wanted) if wanted else "every class with >= 1,000 voxels in the reference run",
        "lowest_dice_vs_overlap_0.5_float32": lowest,
        "presets_keeping_dice_0.95": [k for k, v in lowest.items() if v is not None and v >= 0.95],
        "bfloat16_at_overlap_0.5_keeps_0.995": (lowest.get("overlap 0.5 / bfloat16") or 0.0) >= 0.995,
    }
    print_report(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
