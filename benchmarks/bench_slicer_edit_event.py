"""GUI-thread cost of one segment edit for the Slicer module (issue 13, defect 5); prints JSON.

A 32-class result on a 512x512x300 CT (synthetic masks, :mod:`bench_slicer_synthetic`) is imported as the module
imports it; then a Segment Editor-like stroke (a 9-voxel-radius ball merged into the liver) is applied. Timed, per
stroke: ``event_handler_s``, the observer callbacks the stroke triggers (the Widget only restarts a timer), and
``review_refresh_s``, what that timer then runs on the GUI thread (``segmentReview(verify=False)``: no voxels read).
Goal: their sum < 20 ms. ``refresh_button_s`` is the on-demand comparison with the AI masks after the stroke
("Refresh"). Needs ``slicer-core``. Usage: ``python benchmarks/bench_slicer_edit_event.py [--out FILE]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import slicer  # noqa: E402
from bench_slicer_synthetic import addVolume, printReport, syntheticResult

import UniversalSeg as US  # noqa: E402  (sys.path set up by bench_slicer_synthetic)
from UniversalSegLib.imageio import write_seg_nrrd, write_summary  # noqa: E402
from UniversalSegSlicerLib.observers import SegmentationObserver  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--strokes", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-slicer-edit-") as tmp:
        tmp = Path(tmp)
        result = syntheticResult()
        segPath = write_seg_nrrd(result, tmp / "segmentation.seg.nrrd")
        summary = write_summary(result, tmp / "summary.json")
        headless = US.createHeadlessScene()
        volume = addVolume(headless.scene)
        logic = US.UniversalSegLogic(headless.scene)
        node = headless.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "result")
        report = logic.importEngineOutput(volume, node, summary, segPath)

    handlerSeconds: list[float] = []
    pending = []

    def onEvent():  # the Widget's handler: restart the review timer
        started = time.perf_counter()
        pending.append(True)
        handlerSeconds.append(time.perf_counter() - started)

    observer = SegmentationObserver(onEvent)
    observer.observe(node)
    liverId = report.segmentIds[US.ClassCatalog.default().lookup("liver").index]
    liver = result.masks[US.ClassCatalog.default().lookup("liver").index]
    radius = 9
    zz, yy, xx = np.ogrid[-radius : radius + 1, -radius : radius + 1, -radius : radius + 1]
    ball = (zz**2 + yy**2 + xx**2) <= radius**2
    matrix = US.ijkToRas(volume)
    strokes = []
    for n in range(args.strokes):
        k, j, i = (s + 10 + 3 * n for s in liver.start)  # a corner of the liver's box: outside the ellipsoid
        brush = US.orientedImageFromCrop(ball, [i - radius, j - radius, k - radius], matrix)
        handlerSeconds.clear()
        seglogic = slicer.vtkSlicerSegmentationsModuleLogic
        seglogic.SetBinaryLabelmapToSegment(brush, node, liverId, seglogic.MODE_MERGE_MAX)
        started = time.perf_counter()
        rows = logic.segmentReview(node, verify=False)  # the timer's callback
        refresh = time.perf_counter() - started
        stale = [row.name for row in rows if row.stale]
        strokes.append(
            {
                "events": len(handlerSeconds),
                "event_handler_s": sum(handlerSeconds),
                "review_refresh_s": refresh,
                "stale": stale,
            }
        )
    started = time.perf_counter()
    verified = logic.segmentReview(node, verify=True)
    refreshButton = time.perf_counter() - started
    observer.stop()
    perStroke = [s["event_handler_s"] + s["review_refresh_s"] for s in strokes]
    out = {
        "benchmark": "slicer_edit_event",
        "grid": [512, 512, 300],
        "segments": node.GetSegmentation().GetNumberOfSegments(),
        "layers": node.GetSegmentation().GetNumberOfLayers(),
        "strokes": len(strokes),
        "events_per_stroke": strokes[0]["events"],
        "gui_time_per_stroke_s": {"median": round(statistics.median(perStroke), 5), "max": round(max(perStroke), 5)},
        "event_handler_s_max": round(max(s["event_handler_s"] for s in strokes), 6),
        "review_refresh_s_max": round(max(s["review_refresh_s"] for s in strokes), 5),
        "stale_after_stroke": strokes[-1]["stale"],
        "refresh_button_s": round(refreshButton, 4),
        "liver_state_after_refresh": next(r.state for r in verified if r.segmentId == liverId),
        "goal_s": 0.02,
        "meets_goal": max(perStroke) < 0.02,
        "load": list(os.getloadavg()),
    }
    printReport(out, args.out)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    sys.exit(main())
