"""Cold start (issue: speed): every Slicer click starts a new engine process; how long until its first window runs?

    python benchmarks/bench_cold_start.py --out benchmarks/results/cold_start.json

Runs ``universalseg segment CT --classes liver --progress json`` as the Slicer module does (a new process each
time) and stamps each progress line with the seconds since the process was started: a *cold* run (an empty model
cache: OpenVINO converts the network and writes it to the cache) and then *warm* runs (the same cache). Also the
time to import the engine alone (``python -c "import UniversalSegLib.pipeline"``). Prints JSON; goal: start to
first window, warm cache, <= 5 s on CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_presets import SHARED, cpu_model, print_report  # noqa: E402

MARKS = ("read", "preprocess", "windows 0/", "windows 1/", "postprocess", "done")


def timed_run(command: list[str], env: dict[str, str]) -> dict:
    """Seconds from spawning ``command`` to the first progress line of each mark, and to its exit."""
    stamps: dict[str, float] = {}
    start = time.perf_counter()
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            now = time.perf_counter() - start
            try:
                stage = json.loads(line).get("stage", "")
            except json.JSONDecodeError:
                continue
            for mark in MARKS:
                if stage.startswith(mark) and mark not in stamps:
                    stamps[mark] = round(now, 2)
        code = proc.wait()
    stamps["exit"] = round(time.perf_counter() - start, 2)
    if code != 0:
        raise SystemExit(f"{' '.join(command)} exited with {code}")
    return stamps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ct", type=Path, default=SHARED / "lidc_chest_upper_abdomen" / "ct.nii.gz")
    parser.add_argument("--model", default=None, help="checkpoint path or registry name (default: bundled model)")
    parser.add_argument("--warm-runs", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as work:
        env = dict(os.environ, UNIVERSALSEG_HOME=str(Path(work) / "home"))
        command = [sys.executable, "-m", "UniversalSegLib", "segment", str(args.ct), "--classes", "liver"]
        command += ["--progress", "json", "-o", str(Path(work) / "out.seg.nrrd")]
        if args.model:
            command += ["--model", args.model]
        t = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import UniversalSegLib.pipeline"], check=True, env=env)
        import_s = time.perf_counter() - t
        cold = timed_run(command, env)
        warm = [timed_run(command, env) for _ in range(args.warm_runs)]
    best = min(warm, key=lambda w: w.get("windows 0/", w["exit"]))
    document = {
        "benchmark": "bench_cold_start",
        "command": "python benchmarks/bench_cold_start.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "cpu": cpu_model(),
        "ct": str(args.ct.name if args.ct.parent == SHARED else args.ct),
        "model": args.model or "bundled",
        "import_engine_s": round(import_s, 2),
        "cold": cold,
        "warm": warm,
        "start_to_first_window_warm_s": best.get("windows 0/"),
        "goal_s": 5.0,
    }
    print_report(document, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
