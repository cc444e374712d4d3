"""The ``universalseg`` command line: segment CTs (one scan or a folder), resolve prompts, list classes and models."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

from . import __version__
from .errors import InputError, UniversalSegError, printable
from .formats import IMAGE_SUFFIXES, OUTPUT_FORMATS, STATS_FORMATS, image_stem, output_stem
from .progress import Progress
from .request import SegmentationRequest

OUTPUT_SUFFIXES = {fmt: suffixes[0] for fmt, suffixes in OUTPUT_FORMATS.items()}  # the default suffix of each
EXIT_USER_ERROR = 2
EXIT_BATCH_FAILURES = 1
EXIT_INTERRUPTED = 130  # SIGINT (Ctrl-C); SIGTERM exits 128 + 15 = 143


def _add_segment_parser(sub) -> None:
    p = sub.add_parser(
        "segment",
        help="segment a CT (file or DICOM folder) or a folder of CTs",
        description="Segment abdominal organs and tumors in CT scans with the CLIP-Driven Universal Model.",
    )
    p.add_argument(
        "input", help="CT file (.nii.gz, .nrrd, .mha, .mhd), DICOM series folder, or a folder of scans (batch)"
    )
    p.add_argument("-o", "--output", required=True, help="output file (single scan) or folder (batch)")
    # The segmentation settings' flags come from the request's fields (UniversalSegLib.request).
    groups = SegmentationRequest.add_arguments(p)
    groups["what to segment"].add_argument(
        "--experimental-prompts",
        action="store_true",
        help="feed unrecognised prompt items as raw CLIP embeddings to the model (EXPERIMENTAL results)",
    )
    groups["model and device"].add_argument(
        "--accept-licence",
        "--accept-license",
        action="store_true",
        dest="accept_licence",
        help="accept the model weights' licence (needed once before downloading official weights)",
    )
    run = groups["inference"]
    run.add_argument("--frame", type=int, help="frame (0-based) of a 4-D input to segment")
    run.add_argument("--force", action="store_true", help="segment even if the intensities do not look like CT (HU)")
    out = p.add_argument_group("outputs")
    out.add_argument(
        "--format", choices=sorted(OUTPUT_SUFFIXES), help="output format (default: from the output's suffix)"
    )
    out.add_argument(
        "--split-masks", metavar="DIR", help="also write one binary mask per class into DIR (<file_stem>.nii.gz)"
    )
    out.add_argument("--summary", metavar="JSON", help="write a JSON summary (volumes in mL, model, device, timings)")
    out.add_argument(
        "--stats",
        choices=STATS_FORMATS,
        help="also write per-class volume (mL), mean and median HU and uncertainty beside the output "
        "(<output name>.stats.csv or .json)",
    )
    batch = p.add_argument_group("batch (INPUT is a folder of scans)")
    batch.add_argument(
        "--shard", metavar="I/N", help="process only scans with index %% N == I (0-based), e.g. $SLURM_ARRAY_TASK_ID/8"
    )
    batch.add_argument("--redo", action="store_true", help="segment scans whose output already exists again")
    dicom = p.add_argument_group("DICOM series checks")
    dicom.add_argument(
        "--skip-unreadable-slices",
        action="store_true",
        help="segment a DICOM series without its unreadable files (refused by default; named in the summary's warnings)",
    )
    dicom.add_argument(
        "--allow-irregular-slices",
        action="store_true",
        help="segment a DICOM series with missing slices or uneven spacing (refused by default)",
    )
    p.add_argument(
        "--progress",
        choices=("bar", "json", "none"),
        default="bar",
        help="progress display: a bar on stderr, JSON lines on stdout (for the Slicer module), or none",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="universalseg", description=__doc__)
    parser.add_argument("--version", action="version", version=f"universalseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log details")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_segment_parser(sub)
    r = sub.add_parser("resolve", help="show what a free-text prompt resolves to, without segmenting")
    r.add_argument("text", nargs="+", help="prompt text, e.g. 'IVC and both kidneys'")
    r.add_argument("--json", action="store_true", help="print JSON")
    r.add_argument("--model", help="model whose class embeddings the CLIP step compares with")
    r.add_argument("--no-clip", action="store_true", help="skip the CLIP step (no download)")
    r.add_argument("--experimental-prompts", action="store_true", help="report unrecognised items as experimental")
    demo = sub.add_parser(
        "demo", help="segment the bundled sample CT with the default model; writes a PNG overlay to look at"
    )
    demo.add_argument(
        "-o", "--output", default="universalseg_demo", help="output folder (default: ./universalseg_demo)"
    )
    SegmentationRequest.add_arguments(demo, exclude=("prompt",))  # the settings of segment, but classes only
    demo.add_argument("--accept-licence", "--accept-license", action="store_true", dest="accept_licence")
    demo.add_argument("--progress", choices=("bar", "json", "none"), default="bar")
    c = sub.add_parser("classes", help="list the class catalog and which classes a model provides")
    c.add_argument("--json", action="store_true", help="print JSON")
    c.add_argument("--model", help="registry name or checkpoint file (default: the bundled default model)")
    m = sub.add_parser("models", help="list the models the engine can use, what is downloaded, and licences")
    m.add_argument("--json", action="store_true", help="print JSON")
    d = sub.add_parser("download", help="download a model's weights into the cache")
    d.add_argument("name", help="registry name, e.g. universal-unet")
    d.add_argument("--accept-licence", "--accept-license", action="store_true", dest="accept_licence")
    return parser


# ----------------------------------------------------------------------------------------------------- helpers
class _Progress:
    """Renders engine progress as a tqdm bar (stderr) or JSON lines (stdout)."""

    def __init__(self, mode: str, label: str = "") -> None:
        self.mode = mode
        self.label = label
        self.bar = None
        if mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(
                total=1000,
                desc=label,
                unit="‰",
                leave=False,
                file=sys.stderr,
                bar_format="{desc} {percentage:3.0f}%|{bar}| {elapsed}<{remaining}",
            )

    def __call__(self, message: Progress) -> None:
        if self.mode == "json":
            line = {"progress": round(message.fraction, 4), "stage": message.text, "input": self.label}
            print(json.dumps(line), flush=True)
        elif self.bar is not None:
            self.bar.set_description_str(f"{self.label} {message.text}".strip())
            self.bar.n = int(message.fraction * 1000)
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _parse_shard(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise InputError(f"--shard must look like I/N (e.g. 0/4), got {text!r}") from None
    if n < 1 or not 0 <= i < n:
        raise InputError(f"--shard {text}: need 0 <= I < N")
    return i, n


def _is_scan_file(path: Path) -> bool:
    return path.is_file() and image_stem(path.name) is not None


def _case_name(path: Path) -> str:
    return image_stem(path.name) or path.name


def find_scans(folder: Path) -> list[Path]:
    """Scans in a batch folder: image files directly inside it, and sub-folders holding a DICOM series."""
    from .imageio import is_dicom_series

    scans = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if _is_scan_file(entry):
            scans.append(entry)
        elif entry.is_dir() and is_dicom_series(entry):
            scans.append(entry)
    return scans


def _is_batch_input(path: Path) -> bool:
    """A folder is a batch when it holds scan files or scan sub-folders rather than DICOM files itself."""
    if not path.is_dir():
        return False
    files = [p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")]
    if any(_is_scan_file(p) for p in files):
        return True
    from .imageio import is_dicom_file  # a folder with DICOM files directly inside is one series

    return not any(is_dicom_file(p) for p in files)


def _output_paths(args, scan: Path | None, batch: bool):
    """(output file, split-mask folder, summary file, format) for one scan."""
    from .imageio import output_format

    if not batch:
        output = Path(args.output)
        fmt = output_format(output, args.format)
        return (
            output,
            (Path(args.split_masks) if args.split_masks else None),
            (Path(args.summary) if args.summary else None),
            fmt,
        )
    fmt = args.format or "nii"
    assert scan is not None  # batch mode names each output after its scan
    name = _case_name(scan)
    folder = Path(args.output)
    split = Path(args.split_masks) / name if args.split_masks else None
    summary = folder / f"{name}.summary.json"  # always written in batch mode: it marks the scan as done
    return folder / f"{name}{OUTPUT_SUFFIXES[fmt]}", split, summary, fmt


def _plan_run(
    args, scans: list[Path], batch: bool, stems: Sequence[str] = ()
) -> list[tuple[Path, Path | None, Path | None, str, Path | None]]:
    """Check every output of the run against every input and against each other, before any work starts.

    Returns, per scan, (output, split-mask folder, summary, format, statistics file) with the output's format suffix
    added."""
    from .imageio import plan_outputs
    from .output_safety import OutputPlan

    plan = OutputPlan()
    for scan in scans:
        plan.protect(scan)
    planned = []
    for scan in scans:
        output, split, summary, fmt = _output_paths(args, scan, batch)
        output, fmt = plan_outputs(
            plan,
            output,
            fmt=fmt,
            split_masks=split,
            split_stems=list(stems),
            summary=summary,
            dicom_source=scan if fmt == "dicom-seg" else None,
            of=scan.name if batch else None,
        )
        stats = None
        if getattr(args, "stats", None):
            stats = output.parent / f"{output_stem(output.name, fmt)}.stats.{args.stats}"
            plan.add(stats, f"statistics{' of ' + scan.name if batch else ''}")
        planned.append((output, split, summary, fmt, stats))
    return planned


def _requested_classes(names: Sequence[str] | None, catalog) -> tuple[list[int], bool]:
    """(catalog indices named by --classes, whether it said 'all'). An empty value ("" from an unset shell variable,
    or ",,,") names nothing, whatever its spelling."""
    from .pipeline import select_classes

    tokens = [t.strip() for t in (names or ()) if t.strip()]
    named = [t for t in tokens if t.lower() != "all"]
    return select_classes(named, catalog) if named else [], len(named) < len(tokens)


# ----------------------------------------------------------------------------------------------------- commands
def _batch_scans(args, source: Path) -> list[Path]:
    """The scans of a batch folder (this shard's share with ``--shard``), after the batch-only option checks."""
    if args.format == "dicom-seg":
        raise InputError("--format dicom-seg needs a DICOM series input; in batch mode use nii, nrrd or seg.nrrd")
    if args.summary:
        raise InputError(
            "--summary applies to a single scan; in batch mode each scan's summary is written "
            "beside its output (<name>.summary.json)"
        )
    scans = find_scans(source)
    if not scans:
        raise InputError(
            f"no scans found in {printable(source)} (looked for {', '.join(IMAGE_SUFFIXES)} files and DICOM sub-folders)"
        )
    shard = _parse_shard(args.shard)
    return [s for n, s in enumerate(scans) if n % shard[1] == shard[0]] if shard else scans


def _read_single_scan(args, source: Path, output: Path, fmt: str, notes: list[str], read_options: dict, classes: int):
    """Read and check the one scan (and the room for an uncompressed output) before the model loads."""
    from .imageio import check_ct_intensities, nifti_file_bytes, read_image
    from .output_safety import check_free_space

    image = read_image(source, notes=notes, **read_options)
    check_ct_intensities(image, force=args.force, name=printable(source))
    if fmt == "nii" and output.name.lower().endswith(".nii"):  # uncompressed: the size is known now
        label_bytes = 1 if classes < 256 else 2  # the label map's voxel type (see write_label_map)
        check_free_space(
            output.parent, nifti_file_bytes(image.GetSize(), label_bytes), f"the output '{printable(output.name)}'"
        )
    return image


def _run_classes(args, request, engine, classes: list[int], wants_all: bool) -> tuple[list[int], dict, list]:
    """(catalog classes, experimental prompt embeddings by text, prompt report) for this run: "all" is every class
    the model knows; prompts add what they resolve to (and must all resolve unless --experimental-prompts)."""
    from .pipeline import resolve_prompts

    if wants_all:
        # "all" means every class this model knows; named ones still count.
        classes = sorted(set(classes) | set(engine.available_classes()))
    report: list = []
    extra: dict = {}
    if request.prompt:
        resolution, note = resolve_prompts(
            list(request.prompt), engine.model, allow_experimental=args.experimental_prompts
        )
        _print_resolution(resolution, note)
        if resolution.rejected:
            raise InputError(
                "some prompt items were not recognised (see above); fix them, use --classes, or add "
                "--experimental-prompts to try them as raw CLIP embeddings"
            )
        report = resolution.to_json()["items"]
        classes = sorted(set(classes) | set(resolution.classes))
        extra = {it.text: it.embedding for it in resolution.experimental}
    elif request.classes is None:
        classes = engine.available_classes()
    if not classes and not extra:
        raise InputError("no classes to segment")
    return classes, extra, report


def cmd_segment(args) -> int:
    from .monai_import import import_monai

    import_monai()  # before anything imports MONAI (2 s off each start)
    from .catalog import ClassCatalog
    from .checkpoints import resolve_device
    from .imageio import read_image, write_outputs
    from .output_safety import check_regular_input
    from .pipeline import memory_errors_as_input_errors

    catalog = ClassCatalog.default()
    source = Path(args.input)
    if not source.exists():
        raise InputError(f"input not found: {printable(source)}")
    check_regular_input(source)  # a FIFO would block the reader forever, deaf to Ctrl-C
    batch = _is_batch_input(source)
    # Check everything the user typed before loading anything heavy.
    request = SegmentationRequest.from_args(args)
    request.validate(catalog)  # the one check of the settings
    options = request.to_options(force=args.force, frame=args.frame)
    resolve_device(request.device)
    classes, wants_all = _requested_classes(request.classes, catalog)
    read_options = dict(
        frame=args.frame,
        skip_unreadable_slices=args.skip_unreadable_slices,
        allow_irregular_slices=args.allow_irregular_slices,
    )
    notes: list[str] = []
    if batch:
        scans = _batch_scans(args, source)
        _plan_run(args, scans, batch)
    else:
        if args.shard:
            raise InputError("--shard applies to a folder of scans, but the input is a single scan")
        scans = [source]
        ((output, _split, _summary, fmt, _stats),) = _plan_run(args, scans, batch)
        # Read and check the scan before loading the model, so a bad input fails at once.
        preloaded = _read_single_scan(args, source, output, fmt, notes, read_options, len(catalog))

    engine = _load_engine(args, request.model, options)
    classes, extra, report = _run_classes(args, request, engine, classes, wants_all)
    # Now the split-mask names are known: check them against the inputs and the other outputs too.
    planned = _plan_run(args, scans, batch, [catalog[i].file_stem for i in classes] if args.split_masks else ())
    names = ", ".join(catalog[i].name for i in classes) + (f" + {len(extra)} experimental" if extra else "")
    _info(args, printable(f"segmenting {names} with {engine.model.metadata.get('name')} on {engine.device}"))
    licence = engine.model.metadata.get("licence")
    if licence:
        _info(args, printable(f"model weights licence: {licence}"))

    failures = 0
    done = 0
    for scan, (output, split, summary, fmt, stats) in zip(scans, planned):
        if batch and not args.redo and output.exists() and summary and summary.exists():
            _info(args, printable(f"skip {scan.name}: {output} exists (use --redo to segment again)"))
            continue
        progress = _Progress(args.progress, printable(scan.name))
        try:
            # reading and writing allocate too: running out of memory anywhere is the same one line
            with memory_errors_as_input_errors():
                scan_notes = notes
                if batch:
                    scan_notes = []
                    image = read_image(scan, notes=scan_notes, **read_options) if scan.is_dir() else scan
                else:
                    image = preloaded
                result = engine.segment(
                    image,
                    classes,
                    extra_embeddings=extra or None,
                    prompt_report=report,
                    progress=progress,
                    input_path=scan,
                )
                result.settings["request"] = request.to_json()  # the summary records what was asked
                written = write_outputs(
                    result,
                    output,
                    fmt=fmt,
                    split_masks=split,
                    summary=summary,
                    dicom_source=scan if fmt == "dicom-seg" else None,
                    warnings=scan_notes,
                    stats=stats,
                    image=(read_image(scan, **read_options) if isinstance(image, (str, Path)) else image)
                    if stats
                    else None,
                )
        except UniversalSegError as exc:
            if not batch:
                raise
            failures += 1
            print(f"universalseg: error: {printable(scan.name)}: {printable(exc)}", file=sys.stderr)
            continue
        finally:
            progress.close()
        done += 1
        if args.progress == "json":
            print(json.dumps({"done": True, "input": str(scan), "outputs": [str(p) for p in written]}), flush=True)
        region = result.settings.get("region") or {}
        windows = (
            f"; {region['windows_run'] + region['locate_windows']} of {region['windows_full']} windows, around the "
            "requested classes"
            if region.get("used")
            else ""
        )
        _info(
            args,
            printable(
                f"{scan.name}: wrote {', '.join(str(p) for p in written)} "
                f"({result.timings.get('total', 0):.1f} s{windows})"
            ),
        )
    if batch:
        _info(args, f"batch finished: {done} segmented, {failures} failed, {len(scans) - done - failures} skipped")
    return EXIT_BATCH_FAILURES if failures else 0


SAMPLE_CT = Path(__file__).resolve().parent / "data" / "sample" / "abdomen_ct.nii.gz"


def cmd_demo(args) -> int:
    from .monai_import import import_monai

    import_monai()
    from .imageio import check_writable, read_image, write_outputs
    from .overlay import render_overlay
    from .pipeline import select_classes

    request = SegmentationRequest.from_args(args)
    request.validate()
    out = Path(args.output)
    check_writable(out, is_folder=True)
    out.mkdir(parents=True, exist_ok=True)
    engine = _load_engine(args, request.model, request.to_options())
    classes = (
        select_classes(list(request.classes), engine.catalog, engine.available_classes())
        if request.classes
        else engine.available_classes()
    )
    image = read_image(SAMPLE_CT)
    _info(
        args,
        f"demo: segmenting the bundled sample CT ({SAMPLE_CT.name}) with {engine.model.metadata.get('name')} on {engine.device}",
    )
    progress = _Progress(args.progress, SAMPLE_CT.name)
    try:
        result = engine.segment(image, classes, progress=progress, input_path=SAMPLE_CT)
        result.settings["request"] = request.to_json()
    finally:
        progress.close()
    written = write_outputs(result, out / "segmentation.seg.nrrd", summary=out / "summary.json")
    written += write_outputs(result, out / "segmentation.nii.gz")
    written.append(render_overlay(image, result, out / "overlay.png"))
    for entry in result.summary()["classes"]:
        if entry["voxels"]:
            _info(args, f"  {entry['name']:30s} {entry['volume_ml']:10.1f} mL")
    for note in result.plausibility():
        _info(args, f"  plausibility: {note}")
    _info(args, "wrote " + ", ".join(str(p) for p in written))
    _info(
        args, f"open {out / 'overlay.png'} to look at the result, or load {out / 'segmentation.seg.nrrd'} in 3D Slicer"
    )
    return 0


def _load_engine(args, model, options):
    """Load the model, showing download progress (first use of a registry model) in the chosen progress style."""
    from .download import format_size, tqdm_progress
    from .pipeline import Engine

    if args.progress == "json":

        def download_progress(done: int, total: int | None) -> None:
            stage = f"download {format_size(done)}" + (f" of {format_size(total)}" if total else "")
            print(json.dumps({"progress": 0.0, "stage": stage, "download": [done, total]}), flush=True)

        return Engine(model, options, accept_licence=args.accept_licence, download_progress=download_progress)
    if args.progress == "bar":
        with tqdm_progress("downloading model weights") as bar:
            return Engine(model, options, accept_licence=args.accept_licence, download_progress=bar)
    return Engine(model, options, accept_licence=args.accept_licence)


def _info(args, message: str) -> None:
    if args.progress != "json":
        print(message, file=sys.stderr)


def _print_resolution(resolution, note: str | None) -> None:
    print("prompt resolution:", file=sys.stderr)
    for line in resolution.describe().splitlines():  # the items echo what the user typed: escape it
        print(f"  {printable(line)}", file=sys.stderr)
    if note:
        print(f"  note: {printable(note)}", file=sys.stderr)


def cmd_resolve(args) -> int:
    from .pipeline import resolve_prompts

    model = None
    if args.model:
        from .checkpoints import load_model

        model = load_model(args.model)
    resolution, note = resolve_prompts(
        args.text, model, allow_experimental=args.experimental_prompts, use_clip=not args.no_clip
    )
    if args.json:
        data = resolution.to_json()
        if note:
            data["note"] = note
        print(json.dumps(data, indent=2))
    else:
        for line in resolution.describe().splitlines():  # the items echo what the user typed: escape it
            print(printable(line))
        if note:
            print(f"note: {printable(note)}")
    return 0 if not resolution.rejected else EXIT_USER_ERROR


def cmd_classes(args) -> int:
    from .catalog import ClassCatalog
    from .checkpoints import checkpoint_classes
    from .registry import DEFAULT_MODEL

    catalog = ClassCatalog.default()
    known = checkpoint_classes(args.model)  # None: an official model, all catalog classes
    names, dice = known if known is not None else (catalog.names, {})
    provided = {n.lower() for n in names}
    held_out = {k.lower(): v for k, v in dice.items()}
    model_name = str(args.model or DEFAULT_MODEL)
    rows: list[dict[str, Any]] = []
    for c in catalog:
        rows.append(
            {
                "index": c.index,
                "name": c.name,
                "file_stem": c.file_stem,
                "kind": c.kind,
                "prompt_name": c.prompt_name,
                "synonyms": list(c.synonyms),
                "parents": [catalog[p].name for p in c.parents],
                "laterality": c.laterality,
                "color": list(c.color),
                "terminology": catalog.slicer_terminology(c),
                "in_model": c.name.lower() in provided or c.prompt_name.lower() in provided,
                "held_out_dice": held_out.get(c.name.lower()),
            }
        )
    if args.json:
        print(json.dumps({"model": model_name, "classes": rows}, indent=2))
        return 0
    print(f"{'#':>2}  {'name':30s} {'file stem':30s} {'kind':7s} {'model':6s} synonyms")
    for r in rows:
        mark = "-" if not r["in_model"] else (f"{r['held_out_dice']:.2f}" if r["held_out_dice"] is not None else "yes")
        print(
            f"{r['index']:>2}  {r['name']:30s} {r['file_stem']:30s} {r['kind']:7s} {mark:6s} {', '.join(r['synonyms'][:6])}"
        )
    missing = sum(1 for r in rows if not r["in_model"])
    note = " (numbers: its Dice on patients it never saw)" if held_out else ""
    print(
        f"\nmodel {model_name} provides {len(rows) - missing} of {len(rows)} classes{note}; '-' marks classes it does not "
        f"provide (asking for one is an error): use --model universal-unet for all {len(rows)}"
    )
    return 0


def cmd_models(args) -> int:
    from .registry import ModelRegistry

    rows = ModelRegistry.default().describe()
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    for r in rows:
        default = " (default)" if r.get("default") else ""
        print(f"{r['name']}{default}: {r.get('architecture') or r.get('kind')} — {r.get('description', '')}")
        print(f"    licence: {r['licence']} ({r['licence_url']}){' — accepted' if r.get('licence_accepted') else ''}")
        print(
            f"    status: {r['status']}  {r.get('path') if r.get('status') != 'not downloaded' else ''}  {r.get('size_text') or ''}".rstrip()
        )
    return 0


def cmd_download(args) -> int:
    from .download import tqdm_progress
    from .registry import ModelRegistry

    registry = ModelRegistry.default()
    entry = registry.get(args.name)
    print(f"{entry.name}: licence {entry.licence} ({entry.licence_url})", file=sys.stderr)
    with tqdm_progress(entry.name) as progress:
        path = registry.download(entry.name, accept_licence=args.accept_licence, progress=progress)
    print(path)
    return 0


COMMANDS = {
    "segment": cmd_segment,
    "demo": cmd_demo,
    "resolve": cmd_resolve,
    "classes": cmd_classes,
    "models": cmd_models,
    "download": cmd_download,
}


class Terminated(KeyboardInterrupt):
    """SIGTERM (the Slicer module's Cancel, a scheduler's time limit) as an exception, so that the run unwinds and the
    output transaction removes its temporary files; the exit code is 128 + the signal's number (143)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminate(signum, frame):
    signal.signal(signum, _exit_now)  # a second signal while unwinding ends the process at once
    raise Terminated(signum)


def _exit_now(signum, frame):
    """After the command has finished (or on a repeated signal): exit at once with 128 + signum, without raising into
    whatever runs then (atexit handlers would print a KeyboardInterrupt traceback)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001 - a closed pipe: nothing more to say
            pass
    os._exit(128 + signum)


class _PrintableFormatter(logging.Formatter):
    """Log lines with control characters from user input (file names, prompts) escaped."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


def setup_process(verbose: bool) -> None:
    """What every command line of the project does first: log lines (control characters escaped) at INFO with
    ``--verbose``, else WARNING; ``UNIVERSALSEG_THREADS`` caps PyTorch's threads."""
    handler = logging.StreamHandler()
    handler.setFormatter(_PrintableFormatter("%(levelname)s: %(message)s"))
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, handlers=[handler])
    if os.environ.get("UNIVERSALSEG_THREADS"):
        import torch

        torch.set_num_threads(int(os.environ["UNIVERSALSEG_THREADS"]))


def run_command(prog: str, command: Callable[[], int], interrupted: str = "interrupted") -> int:
    """``command()``'s exit code, or the project's one-line error (exit 2) for a UniversalSegError; Ctrl-C exits 130,
    SIGTERM (raised as :class:`Terminated`) 128 + 15."""
    try:
        return command()
    except UniversalSegError as exc:
        print(f"{prog}: error: {printable(exc)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as exc:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 128 + exc.signum if isinstance(exc, Terminated) else EXIT_INTERRUPTED


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line. ``argv`` None means a real program run (from ``sys.argv``): then, once the command has
    finished, SIGINT/SIGTERM end the process at once with 130/143; called with ``argv`` (tests, scripts), the
    previous signal handlers are put back."""
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_process(args.verbose)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)} if in_main_thread else {}
    if in_main_thread:
        # Cancel from the Slicer module (or a scheduler) arrives as SIGTERM: unwind so temporary files are removed.
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return run_command(
            "universalseg", lambda: COMMANDS[args.command](args), "interrupted; no partial output was written"
        )
    finally:
        if in_main_thread:
            for sig, old in previous.items():
                signal.signal(sig, _exit_now if argv is None else (old if old is not None else signal.SIG_DFL))


if __name__ == "__main__":
    sys.exit(main())
