"""``universalseg-train``: check a training config, fit a model, evaluate models, export checkpoints.

universalseg-train check training/configs/tiny_holdout_abdomen.yaml
universalseg-train fit training/configs/tiny_holdout_abdomen.yaml [--resume] [--set training.max_steps=100]
torchrun --nproc_per_node 2 -m training.cli fit CONFIG          # data-parallel (GPUs: NCCL, CPUs: Gloo)
universalseg-train evaluate --model runs/tiny/model.safetensors --model universalseg-tiny CONFIG --split val
universalseg-train export runs/tiny -o my-model.safetensors [--which best]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from UniversalSegLib.cli import run_command, setup_process
from UniversalSegLib.errors import InputError

if TYPE_CHECKING:
    from .config import TrainingConfig

EXIT_CHECK_FAILED = 1


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="training config (.yaml/.yml or .json)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set training.max_steps=100 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="universalseg-train",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check", help="validate a config: files, geometry, label values; print class coverage")
    _config_args(p)
    p.add_argument(
        "--headers-only", action="store_true", help="only check files and headers (do not read label values)"
    )
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")

    p = sub.add_parser(
        "diagnose", help="what the training crops show: organ extent vs crop, share of crops holding each class (JSON)"
    )
    _config_args(p)
    p.add_argument("--samples", type=int, default=64, help="training crops to draw (default 64)")

    p = sub.add_parser("fit", help="train or fine-tune a model (torchrun for several GPUs/nodes)")
    _config_args(p)
    p.add_argument("--output", help="run folder (default: the config's 'output')")
    p.add_argument(
        "--resume",
        nargs="?",
        const="auto",
        default=None,
        metavar="STATE",
        help="continue from the run folder's newest state, or from the given state file",
    )
    p.add_argument(
        "--init", help="start from this checkpoint (path or registry name) instead of the config's model.init"
    )
    p.add_argument("--max-steps", type=int, help="override training.max_steps")
    p.add_argument("--max-minutes", type=float, help="stop cleanly (checkpoint + export) after this many minutes")
    p.add_argument("--device", help="auto, cpu or cuda (override training.device)")
    p.add_argument("--threads", type=int, help="CPU threads for PyTorch (1 is fastest on busy machines)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    p = sub.add_parser("evaluate", help="run the engine on labelled scans; per-class Dice and NSD (JSON + table)")
    p.add_argument("config", nargs="?", help="training config whose datasets hold the labelled scans")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config value"
    )
    p.add_argument(
        "--model",
        action="append",
        required=True,
        help="checkpoint path or registry name; repeat to compare models (e.g. before/after fine-tuning)",
    )
    p.add_argument(
        "--split", choices=("val", "train", "all"), default="val", help="which cases of the config (default val)"
    )
    p.add_argument("--image", help="a single CT instead of a config")
    p.add_argument("--label", help="its label map, values = catalog indices (1 Spleen ... 32 Kidney Cyst)")
    p.add_argument("--classes", help="only these classes (comma-separated names)")
    p.add_argument(
        "--output", default="evaluation", help="folder for evaluation.json and evaluation.md (default ./evaluation)"
    )
    p.add_argument("--nsd-tolerance", type=float, default=2.0, help="NSD tolerance in mm (default 2)")
    p.add_argument(
        "--fast", action="store_true", help="the fast preset of universalseg segment (bfloat16 on CPUs that have it)"
    )
    p.add_argument("--overlap", type=float, help="window overlap (default 0.5)")
    p.add_argument("--no-postprocess", action="store_true", help="score the thresholded masks without post-processing")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument(
        "--accept-licence",
        "--accept-license",
        action="store_true",
        help="accept the model's licence (official weights)",
    )

    p = sub.add_parser(
        "export", help="write a project checkpoint (safetensors + provenance) from a run folder or state"
    )
    p.add_argument("source", help="run folder of 'fit' or a training state file (checkpoints/step_*.pt)")
    p.add_argument("-o", "--output", required=True, help="output .safetensors file")
    p.add_argument(
        "--which", choices=("last", "best"), default="last", help="newest state (default) or best validated weights"
    )
    p.add_argument("--name", help="model name recorded in the metadata")
    p.add_argument("--licence", "--license", dest="licence", help="licence of the weights recorded in the metadata")
    p.add_argument("--description", help="description recorded in the metadata")
    p.add_argument(
        "--held-out",
        metavar="EVALUATION_JSON",
        help="evaluation.json of 'evaluate' on patients the model never saw: keep only classes whose Dice there reaches --floor",
    )
    p.add_argument("--floor", type=float, default=0.6, help="held-out Dice a class needs to be offered (default 0.6)")
    return parser


def _load(args) -> TrainingConfig:
    from .config import load_config

    return load_config(args.config, args.overrides)


def cmd_check(args) -> int:
    from .check import check_config

    config = _load(args)
    show = sys.stderr.isatty()

    def progress(done: int, total: int, name: str) -> None:
        if show:
            print(f"\rchecking {done}/{total} {name[:60]:<60}", end="", file=sys.stderr, flush=True)

    report = check_config(config, read_values=not args.headers_only, progress=progress)
    if show:
        print("\r" + " " * 80 + "\r", end="", file=sys.stderr)
    print(report.format())
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2))
    return 0 if report.ok else EXIT_CHECK_FAILED


def cmd_fit(args) -> int:
    overrides = list(args.overrides)
    if args.max_steps is not None:
        overrides.append(f"training.max_steps={args.max_steps}")
    if args.max_minutes is not None:
        overrides.append(f"training.max_minutes={args.max_minutes}")
    if args.device:
        overrides.append(f"training.device={args.device}")
    if args.threads is not None:
        overrides.append(f"training.threads={args.threads}")
    if args.init:
        overrides.append(
            f"model.init={json.dumps(str(Path(args.init).expanduser().resolve()) if Path(args.init).expanduser().exists() else args.init)}"
        )
    if args.output:
        overrides.append(f"output={json.dumps(str(Path(args.output).expanduser().resolve()))}")
    from .config import load_config
    from .loop import fit

    config = load_config(args.config, overrides)
    result = fit(config, resume=args.resume, progress=not args.no_progress)
    if result.summary:
        s = result.summary
        print(f"trained {s['steps']} steps ({s['stopped_by']}) in {s['elapsed_minutes']} min; model: {s['model']}")
        last = s.get("validation_last")
        if last:
            first = s.get("validation_first")
            for name, dice in sorted(last["dice"].items()):
                before = (
                    f" (step {first['step']}: {first['dice'][name]:.3f})"
                    if first and first["step"] != last["step"] and name in first["dice"]
                    else ""
                )
                print(f"  validation Dice {name}: {dice:.3f}{before}")
    return 0


def cmd_evaluate(args) -> int:
    from .datasets import CaseSpec, collect_cases, split_cases
    from .evaluate import evaluate_models, format_table, write_report

    if args.image or args.label:
        if not (args.image and args.label) or args.config:
            raise InputError("give either a config, or both --image and --label")
        import numpy as np
        import SimpleITK as sitk

        from UniversalSegLib.catalog import ClassCatalog

        catalog = ClassCatalog.default()
        values = {int(v) for v in np.unique(sitk.GetArrayViewFromImage(sitk.ReadImage(args.label)))} - {0}
        bad = sorted(v for v in values if not 1 <= v <= len(catalog))
        if bad:
            raise InputError(f"{args.label} has values {bad[:5]} that are not catalog indices (1..{len(catalog)})")
        annotated = [c.index for c in catalog.select(args.classes)] if args.classes else sorted(values)
        from .datasets import SourceRef

        cases = [
            CaseSpec(
                dataset="input",
                case_id=Path(args.image).name,
                image=Path(args.image),
                label=Path(args.label),
                sources=tuple((c, (SourceRef(c),)) for c in annotated),
                annotated=tuple(annotated),
                label_names={c.index: c.name for c in catalog},
            )
        ]
    else:
        if not args.config:
            raise InputError("give a training config (its validation cases are scored) or --image and --label")
        config = _load(args)
        train, val = split_cases(collect_cases(config))
        cases = {"val": val, "train": train, "all": list({c.name: c for c in train + val}.values())}[args.split]
        if not cases:
            raise InputError(
                f"the config has no '{args.split}' cases; use --split all or add 'split: val' to a dataset"
            )
    report = evaluate_models(
        args.model,
        cases,
        classes=args.classes,
        device=args.device,
        fast=args.fast,
        overlap=args.overlap,
        postprocess=not args.no_postprocess,
        nsd_tolerance=args.nsd_tolerance,
        accept_licence=args.accept_licence,
        progress=lambda msg: print(msg, file=sys.stderr),
    )
    js, md = write_report(report, args.output)
    print(format_table(report))
    print(f"\nwritten: {js} and {md}")
    return 0


def cmd_diagnose(args) -> int:
    from .diagnose import diagnose

    print(json.dumps(diagnose(_load(args), samples=args.samples), indent=2))
    return 0


def cmd_export(args) -> int:
    from .export import OfferedClasses, export_model

    extra = {k: v for k, v in (("name", args.name), ("licence", args.licence), ("description", args.description)) if v}
    offered = OfferedClasses.from_evaluation(args.held_out, args.floor) if args.held_out else None
    path = export_model(args.source, args.output, which=args.which, extra=extra, offered=offered)
    if offered is not None:
        dropped = sorted(set(offered.dice) - set(offered.classes))
        print(
            f"offers {len(offered.classes)} classes with held-out Dice >= {offered.floor}: {', '.join(offered.classes)}"
        )
        if dropped:
            print(
                f"dropped (held-out Dice below {offered.floor}, or a class its post-processing needs is dropped): {', '.join(dropped)}"
            )
    print(f"exported {path}")
    return 0


COMMANDS = {
    "check": cmd_check,
    "diagnose": cmd_diagnose,
    "fit": cmd_fit,
    "evaluate": cmd_evaluate,
    "export": cmd_export,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_process(args.verbose)  # (fit handles SIGTERM itself: it checkpoints and stops)
    return run_command("universalseg-train", lambda: COMMANDS[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
