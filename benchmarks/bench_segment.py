"""End-to-end ``segment`` benchmark: time, CPU time and peak RSS per stage, windows, GFLOP/s; prints JSON.

Each configuration (CT x model x mode x classes) runs in a fresh Python process so that its peak RSS is its own.
The driver (default command) runs the chosen matrix, then compares masks: normal vs baseline (same masks expected)
and fast vs normal (the accuracy cost of ``--fast``), as per-class Dice.

    python benchmarks/bench_segment.py --ct chest --arch unet --mode baseline normal fast --out results.json
    python benchmarks/bench_segment.py --ct large --arch unet --mode normal          # 512x512x300 peak RSS
    python benchmarks/bench_segment.py run --ct abdomen --arch bundled --mode fast   # one configuration

CTs: ``abdomen`` (../shared/data/ct/totalseg_abdomen/ct.nii.gz, 122x101x112 at 3 mm), ``chest``
(../shared/data/ct/itkelastix_chest/ct.nii.gz, 512x512x141), ``large`` (the abdomen CT resampled to 512x512x300,
linear, made once in the work folder). Models: ``unet`` / ``swinunetr`` (released architectures with the
equivalence fixture's formula weights, ../shared/reference/equivalence/make_checkpoint.py, salt A: speed does not
depend on the values), ``bundled`` (UniversalSegLib/data/models/universalseg-tiny.safetensors when it exists, else
a width-8 U-Net with random weights). Modes: ``baseline`` (benchmarks/baseline.py), ``normal``, ``fast``.
See benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
SHARED = REPO.parent / "shared"
CTS = {
    "abdomen": SHARED / "data" / "ct" / "totalseg_abdomen" / "ct.nii.gz",
    "chest": SHARED / "data" / "ct" / "itkelastix_chest" / "ct.nii.gz",
    "large": None,  # made from the abdomen CT, see make_large_ct
}
ARCHS = ("unet", "swinunetr", "bundled")
MODES = ("baseline", "normal", "fast")
SUBSET = "liver,spleen,pancreas"
BUNDLED = REPO / "UniversalSegLib" / "data" / "models" / "universalseg-tiny.safetensors"
STAGES = ("load_model", "read", "preprocess", "windows", "postprocess", "resample", "write")
# Large organs for the --fast accuracy figure (catalog indices): spleen, kidneys, liver, stomach, lungs, colon,
# intestine, bladder.
LARGE_ORGANS = (1, 2, 3, 6, 7, 16, 17, 18, 19, 21)


# ----------------------------------------------------------------------------------------------- measuring
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class StageMeter:
    """Wall time, CPU time (user + system, all threads) and peak RSS of consecutive stages of this process.

    Peak RSS per stage: the kernel's high-water mark (VmHWM), reset at each stage start through
    ``/proc/self/clear_refs`` where allowed, plus a sampling thread over VmRSS (every 5 ms) as a fallback.
    """

    def __init__(self) -> None:
        self.stages: dict[str, dict] = {}
        self.current: str | None = None
        self._t = self._cpu = 0.0
        self._sampled = 0
        self._reset_ok = self._reset_hwm()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    @staticmethod
    def _reset_hwm() -> bool:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._sampled = max(self._sampled, _status_kib("VmRSS"))

    def mark(self, name: str | None) -> None:
        """End the current stage and start ``name`` (None: just end)."""
        now, cpu = time.perf_counter(), time.process_time()
        if self.current is not None:
            peak = max(self._sampled, _status_kib("VmRSS"))
            if self._reset_ok:
                peak = max(peak, _status_kib("VmHWM"))
            entry = self.stages.setdefault(self.current, {"wall_s": 0.0, "cpu_s": 0.0, "peak_rss_mib": 0.0})
            entry["wall_s"] = round(entry["wall_s"] + now - self._t, 3)
            entry["cpu_s"] = round(entry["cpu_s"] + cpu - self._cpu, 3)
            entry["peak_rss_mib"] = round(max(entry["peak_rss_mib"], peak / 1024), 1)
        if name is not None and self._reset_ok:
            self._reset_ok = self._reset_hwm()
        self._sampled = _status_kib("VmRSS")
        self.current, self._t, self._cpu = name, now, cpu

    def close(self) -> None:
        self.mark(None)
        self._stop.set()
        self._thread.join()


def flops_per_window(architecture: str, width: int, classes: int, roi: int = 96) -> dict:
    """Multiply-adds x 2 of one window (backbone + ``classes`` heads), counted by torch's FlopCounterMode on the
    meta device (shapes only, no compute)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from UniversalSegLib.networks import ModelConfig, UniversalModel

    model = UniversalModel(ModelConfig(architecture, width)).eval().to("meta")
    x = torch.zeros((1, 1, roi, roi, roi), device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        global_feature, head_input = model.encode(x)
    backbone = counter.get_total_flops()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.apply_heads(head_input, model.head_parameters(global_feature, torch.zeros((classes, 512), device="meta")))
    return {
        "backbone_gflop": round(backbone / 1e9, 2),
        "heads_gflop": round(counter.get_total_flops() / 1e9, 2),
        "total_gflop": round((backbone + counter.get_total_flops()) / 1e9, 2),
    }


def machine_info(gemm: bool = True) -> dict:
    """CPU, threads, versions, and a float32 / bfloat16 matrix-multiply rate as the practical compute limit."""
    import torch

    info = {
        "cpu": _cpu_model(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }
    for name in ("monai", "openvino", "SimpleITK"):
        try:
            info[name] = __import__(name).__version__
        except Exception:
            info[name] = None
    if gemm:
        # The network's main operation, a 3x3x3 convolution (64 -> 64 channels, 48^3 voxels, oneDNN), and a matrix
        # product (MKL), in float32 and bfloat16: the practical compute limit of this machine.
        import torch.nn.functional as F

        for dtype in (torch.float32, torch.bfloat16):
            x, w = torch.randn(1, 64, 48, 48, 48, dtype=dtype), torch.randn(64, 64, 3, 3, 3, dtype=dtype)
            with torch.inference_mode():
                F.conv3d(x, w, padding=1)
                t = time.perf_counter()
                for _ in range(3):
                    F.conv3d(x, w, padding=1)
                info[f"conv3d_{str(dtype)[6:]}_gflops"] = round(
                    3 * 2 * 27 * 64 * 64 * 48**3 / (time.perf_counter() - t) / 1e9, 1
                )
                a = torch.randn(2048, 2048, dtype=dtype)
                torch.mm(a, a)
                t = time.perf_counter()
                for _ in range(5):
                    torch.mm(a, a)
                info[f"gemm_{str(dtype)[6:]}_gflops"] = round(5 * 2 * 2048**3 / (time.perf_counter() - t) / 1e9, 1)
        info["load_during_rates"] = load_avg()
    return info


def _cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def load_avg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


# ----------------------------------------------------------------------------------------------- inputs
def make_large_ct(work: Path) -> Path:
    """The abdomen CT resampled (linear) to 512x512x300 over the same field of view; made once in ``work``."""
    import SimpleITK as sitk

    path = work / "abdomen_512x512x300.nii.gz"
    if path.exists():
        return path
    image = sitk.ReadImage(str(CTS["abdomen"]))
    size = [512, 512, 300]
    spacing = [image.GetSpacing()[i] * image.GetSize()[i] / size[i] for i in range(3)]
    # first voxel centre half a new voxel inside the old field of view's edge
    origin = image.TransformContinuousIndexToPhysicalPoint(
        [-0.5 + spacing[i] / image.GetSpacing()[i] / 2 for i in range(3)]
    )
    large = sitk.Resample(
        image,
        size,
        sitk.Transform(),
        sitk.sitkLinear,
        origin,
        spacing,
        image.GetDirection(),
        -1024.0,
        image.GetPixelID(),
    )
    tmp = work / ".large.tmp.nii.gz"
    sitk.WriteImage(large, str(tmp), True)
    tmp.replace(path)
    return path


def ct_path(name: str, work: Path) -> Path:
    return make_large_ct(work) if name == "large" else CTS[name]


def make_model(arch: str, work: Path) -> Path:
    """A checkpoint file for ``arch`` (see the module docstring); made once in ``work``."""
    import torch

    if arch == "bundled":
        override = os.environ.get("UNIVERSALSEG_BENCH_BUNDLED")
        if override:
            return Path(override)
        if BUNDLED.exists():
            return BUNDLED
    path = work / (f"{arch}_formula_A.pth" if arch != "bundled" else "unet_w8_random.safetensors")
    if path.exists():
        return path
    if arch == "bundled":
        from UniversalSegLib.catalog import ClassCatalog
        from UniversalSegLib.checkpoints import save_checkpoint
        from UniversalSegLib.networks import ModelConfig, UniversalModel

        torch.manual_seed(0)
        model = UniversalModel(ModelConfig("unet", 8))
        embeddings = torch.load(
            SHARED / "reference" / "clip_txt_encoding_32.pth", map_location="cpu", weights_only=True
        )
        model.organ_embedding.copy_(embeddings.float())
        model.class_names = ClassCatalog.default().names
        return save_checkpoint(model, path, {"name": "unet-w8-random", "licence": "benchmark weights"})
    script = SHARED / "reference" / "equivalence" / "make_checkpoint.py"
    spec = importlib.util.spec_from_file_location("make_checkpoint", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    torch.save(module.build(arch, "A"), path)
    return path


# ----------------------------------------------------------------------------------------------- one run
def run_one(args) -> dict:
    """Run one configuration in this process and return its measurements."""
    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    if args.backend != "auto":
        os.environ["UNIVERSALSEG_BACKEND"] = args.backend
    work = Path(args.work)
    ct = ct_path(args.ct, work)
    checkpoint = make_model(args.arch, work)
    out_dir = work / "outputs" / run_name(args.ct, args.arch, args.mode, args.classes)
    out_dir.mkdir(parents=True, exist_ok=True)
    load_before = load_avg()

    from UniversalSegLib.checkpoints import load_checkpoint
    from UniversalSegLib.imageio import read_image, write_outputs
    from UniversalSegLib.pipeline import Engine, SegmentationOptions
    from UniversalSegLib.progress import Progress

    meter = StageMeter()
    t0 = time.perf_counter()
    meter.mark("load_model")
    model = load_checkpoint(checkpoint).eval()
    record: dict = {}
    if args.mode == "baseline":
        from baseline import run_baseline

        if args.classes != "all":
            raise SystemExit("the baseline computes all classes (--classes all)")
        result = run_baseline(ct, model, out_dir / "labels.nii.gz", stage=meter.mark, device=args.device)
        meter.close()
        backend, precision = "torch", "float32"
    else:
        options = SegmentationOptions(device=args.device, fast=args.mode == "fast", sw_batch_size=args.window_batch)
        engine = Engine(model, options)
        meter.mark("read")
        image = read_image(ct)

        def progress(message: Progress) -> None:
            if message.stage != meter.current:
                meter.mark(message.stage)

        result = engine.segment(image, model_classes(model) if args.classes == "all" else SUBSET, progress=progress)
        meter.mark("write")
        write_outputs(result, out_dir / "labels.nii.gz", fmt="nii")
        meter.close()
        backend, precision = result.settings["backend"], result.settings["precision"]
        record["engine_timings_s"] = {k: round(v, 3) for k, v in result.timings.items()}
    settings = result.settings
    shape = settings["preprocessed_shape"]
    windows = settings["windows"]
    network_s = result.timings.get("windows_network")
    total_wall = time.perf_counter() - t0
    np.savez_compressed(
        out_dir / "masks.npz",
        **{f"start_{i}": np.asarray(m.start) for i, m in result.masks.items()},
        **{f"mask_{i}": m.array for i, m in result.masks.items()},
    )

    config = model.config
    flops = flops_per_window(config.architecture, int(config.width), len(settings["computed_classes"]))
    record.update(
        {
            "name": run_name(args.ct, args.arch, args.mode, args.classes),
            "ct": args.ct,
            "input_size": list(result.geometry.size),
            "input_spacing_mm": [round(s, 4) for s in result.geometry.spacing],
            "arch": args.arch,
            "architecture": config.architecture,
            "width": int(config.width),
            "checkpoint": str(checkpoint),
            "mode": args.mode,
            "classes": args.classes,
            "output_classes": len(result.masks),
            "backend": backend,
            "precision": precision,
            "threads": args.threads,
            "device": args.device,
            "settings": {k: settings[k] for k in ("overlap", "window_batch") if k in settings},
            "preprocessed_shape": list(shape),
            "windows": windows,
            "flops_per_window": flops,
            "stages": meter.stages,
            "total_wall_s": round(total_wall, 2),
            "total_cpu_s": round(sum(s["cpu_s"] for s in meter.stages.values()), 2),
            # ru_maxrss restarts with every per-stage reset of the high-water mark: take the largest stage peak
            "peak_rss_mib": max(
                [s["peak_rss_mib"] for s in meter.stages.values()]
                + [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024]
            ),
            "load_before": load_before,
            "load_after": load_avg(),
        }
    )
    if torch.cuda.is_available() and args.device != "cpu":
        record["peak_gpu_memory_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if network_s:
        record["network_s"] = round(network_s, 2)
        record["network_gflops"] = round(windows * flops["total_gflop"] / network_s, 1)
    windows_wall = meter.stages.get("windows", {}).get("wall_s")
    if windows_wall:
        record["windows_stage_gflops"] = round(windows * flops["total_gflop"] / windows_wall, 1)
    return record


def model_classes(model) -> list[int]:
    """Catalog indices of every class the checkpoint was trained for (all 32 for the released models)."""
    from UniversalSegLib.catalog import model_class_indices

    return sorted(c for c in model_class_indices(model, strict=False) if c is not None)


def run_name(ct: str, arch: str, mode: str, classes: str) -> str:
    return f"{ct}-{arch}-{mode}-{classes}"


# ----------------------------------------------------------------------------------------------- comparisons
def load_masks(work: Path, name: str) -> dict[int, tuple]:
    import numpy as np

    data = np.load(work / "outputs" / name / "masks.npz")
    return {
        int(k[5:]): (tuple(int(v) for v in data["start_" + k[5:]]), data[k])
        for k in data.files
        if k.startswith("mask_")
    }


def dice(a: tuple, b: tuple) -> float | None:
    """Dice of two (start, box) masks on the same grid; None when both are empty."""
    import numpy as np

    (sa, ma), (sb, mb) = a, b
    na, nb = int(ma.sum()), int(mb.sum())
    if na + nb == 0:
        return None
    lo = [max(x, y) for x, y in zip(sa, sb)]
    hi = [min(x + n, y + m) for x, n, y, m in zip(sa, ma.shape, sb, mb.shape)]
    inter = 0
    if all(h > low for low, h in zip(lo, hi)):
        crop_a = ma[tuple(slice(low - s, h - s) for low, h, s in zip(lo, hi, sa))]
        crop_b = mb[tuple(slice(low - s, h - s) for low, h, s in zip(lo, hi, sb))]
        inter = int(np.logical_and(crop_a, crop_b).sum())
    return 2.0 * inter / (na + nb)


def compare(work: Path, runs: list[dict]) -> list[dict]:
    from UniversalSegLib.catalog import ClassCatalog

    catalog = ClassCatalog.default()
    by_name = {r["name"]: r for r in runs}
    out = []
    for r in runs:
        for ref_mode, mode in (("baseline", "normal"), ("normal", "fast")):
            if r["mode"] != mode:
                continue
            ref_classes = "all" if ref_mode == "baseline" else r["classes"]
            ref = by_name.get(run_name(r["ct"], r["arch"], ref_mode, ref_classes))
            if ref is None:
                continue
            a, b = load_masks(work, ref["name"]), load_masks(work, r["name"])
            per_class = {}
            for index in sorted(set(a) & set(b)):
                d = dice(a[index], b[index])
                if d is not None:
                    per_class[catalog[index].name] = round(d, 5)
            entry = {
                "reference": ref["name"],
                "run": r["name"],
                "speedup_wall": round(ref["total_wall_s"] / r["total_wall_s"], 2),
                "speedup_cpu": round(ref["total_cpu_s"] / r["total_cpu_s"], 2),
                "peak_rss_ratio": round(r["peak_rss_mib"] / ref["peak_rss_mib"], 3),
                "dice": per_class,
                "min_dice": min(per_class.values()) if per_class else None,
            }
            large = [per_class[catalog[i].name] for i in LARGE_ORGANS if catalog[i].name in per_class]
            if large:
                entry["mean_dice_large_organs"] = round(sum(large) / len(large), 4)
            out.append(entry)
    return out


def markdown_table(runs: list[dict], comparisons: list[dict]) -> str:
    lines = [
        "| CT | model | mode | classes | backend / precision | windows | read | preprocess | windows (GFLOP/s) | post-process | resample back | write | total (CPU) | peak RSS |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        s = r["stages"]

        def w(name: str) -> str:
            return f"{s[name]['wall_s']:.1f} s" if name in s else "-"

        rate = r.get("network_gflops") or r.get("windows_stage_gflops")
        lines.append(
            f"| {r['ct']} {r['input_size'][0]}x{r['input_size'][1]}x{r['input_size'][2]} | {r['architecture']} w{r['width']} | "
            f"{r['mode']} | {r['classes']} | {r['backend']} / {r['precision']} | {r['windows']} | {w('read')} | {w('preprocess')} | "
            f"{w('windows')} ({rate:.0f}) | {w('postprocess')} | {w('resample')} | {w('write')} | "
            f"{r['total_wall_s']:.0f} s ({r['total_cpu_s']:.0f} s) | {r['peak_rss_mib'] / 1024:.2f} GiB |"
        )
    if comparisons:
        lines += [
            "",
            "| run vs reference | speed-up (wall / CPU) | peak RSS ratio | min Dice per class | mean Dice large organs |",
            "|---|---|---|---|---|",
        ]
        for c in comparisons:
            lines.append(
                f"| {c['run']} vs {c['reference']} | {c['speedup_wall']}x / {c['speedup_cpu']}x | {c['peak_rss_ratio']} | "
                f"{c['min_dice']} | {c.get('mean_dice_large_organs', '-')} |"
            )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "command",
        nargs="?",
        default="matrix",
        choices=("matrix", "run", "report"),
        help="matrix (default): every combination, each in a fresh process; run: one configuration here; "
        "report: merge the JSON files of earlier matrix runs (--inputs) into one document and table",
    )
    p.add_argument("--inputs", nargs="*", default=[], help="report: JSON files written by --out")
    p.add_argument("--ct", nargs="+", default=["chest"], choices=tuple(CTS))
    p.add_argument("--arch", nargs="+", default=["unet"], choices=ARCHS)
    p.add_argument("--mode", nargs="+", default=["baseline", "normal", "fast"], choices=MODES)
    p.add_argument(
        "--classes",
        nargs="+",
        default=["all"],
        choices=("all", "subset"),
        help=f"all classes of the model (32 for the released ones), or the subset {SUBSET}",
    )
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "openvino"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda (mixed precision) or auto")
    p.add_argument("--window-batch", type=int, default=1)
    p.add_argument(
        "--work",
        default=str(Path(os.environ.get("TMPDIR", "/tmp")) / "universalseg-bench"),
        help="folder for generated inputs, checkpoints and outputs",
    )
    p.add_argument("--out", help="write the JSON here too")
    p.add_argument("--table", help="write a Markdown table here")
    p.add_argument("--no-gemm", action="store_true", help="skip the matrix-multiply rate measurement")
    p.add_argument(
        "--bundled-checkpoint", help="use this checkpoint as the 'bundled' model (e.g. a training run's output)"
    )
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.bundled_checkpoint:
        os.environ["UNIVERSALSEG_BENCH_BUNDLED"] = str(Path(args.bundled_checkpoint).resolve())
    if args.command == "run":
        args.ct, args.arch, args.mode, args.classes = args.ct[0], args.arch[0], args.mode[0], args.classes[0]
        print(json.dumps(run_one(args)))
        return 0

    if args.command == "report":
        docs = [json.loads(Path(f).read_text()) for f in args.inputs]
        runs: dict[str, dict] = {}
        for d in docs:  # a configuration measured again in a later file replaces the earlier measurement
            for r in d["runs"]:
                runs.pop(r["name"], None)
                runs[r["name"]] = r
        document = {
            "machine": docs[0]["machine"] if docs else machine_info(gemm=False),
            "commands": [d.get("command") for d in docs],
            "runs": list(runs.values()),
        }
        return _finish(document, work, args)

    import torch

    torch.set_num_threads(args.threads)
    document = {
        "machine": machine_info(gemm=not args.no_gemm),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "runs": [],
    }
    order = {m: n for n, m in enumerate(MODES)}  # references first
    for ct in args.ct:
        for arch in args.arch:
            for classes in args.classes:
                for mode in sorted(args.mode, key=order.get):
                    if mode == "baseline" and classes != "all":
                        continue
                    cmd = [
                        sys.executable,
                        str(Path(__file__).resolve()),
                        "run",
                        "--ct",
                        ct,
                        "--arch",
                        arch,
                        "--mode",
                        mode,
                        "--classes",
                        classes,
                        "--backend",
                        args.backend,
                        "--threads",
                        str(args.threads),
                        "--device",
                        args.device,
                        "--window-batch",
                        str(args.window_batch),
                        "--work",
                        str(work),
                    ]
                    print(
                        f"[bench] {run_name(ct, arch, mode, classes)} (load {load_avg()})", file=sys.stderr, flush=True
                    )
                    proc = subprocess.run(cmd, capture_output=True, text=True)
                    if proc.returncode != 0:
                        print(proc.stderr[-4000:], file=sys.stderr)
                        document["runs"].append(
                            {"name": run_name(ct, arch, mode, classes), "error": proc.stderr.strip().splitlines()[-1:]}
                        )
                        continue
                    record = json.loads(proc.stdout.strip().splitlines()[-1])
                    print(
                        f"[bench]   {record['total_wall_s']} s, peak {record['peak_rss_mib']} MiB",
                        file=sys.stderr,
                        flush=True,
                    )
                    document["runs"].append(record)
    return _finish(document, work, args)


def _finish(document: dict, work: Path, args) -> int:
    ok = [r for r in document["runs"] if "error" not in r]
    document["comparisons"] = compare(work, ok)
    text = json.dumps(document, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    if args.table:
        Path(args.table).write_text(markdown_table(ok, document["comparisons"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
