"""Data-parallel training: two CPU processes (Gloo) launched by torchrun both finish with identical weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from training.distributed import weights_digest
from UniversalSegLib.checkpoints import load_checkpoint

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(600)
def test_two_process_gloo_run_keeps_ranks_identical(tmp_path, shared):
    abdomen = shared("data", "ct", "totalseg_abdomen")
    config = {
        "name": "ddp",
        "output": str(tmp_path / "run"),
        "spacing": [3.0, 3.0, 3.0],
        "model": {"architecture": "unet", "width": 4},
        "augmentation": {"num_samples": 1},
        "training": {
            "max_steps": 2,
            "crop_size": 32,
            "lr": 0.003,
            "warmup_steps": 1,
            "checkpoint_every": 1,
            "log_every": 1,
            "threads": 1,
            "device": "cpu",
        },
        "validation": {"every": 0},
        "datasets": [
            {
                "name": "slab",
                "type": "totalsegmentator",
                "root": str(abdomen),
                "image": "ct_upper_slab.nii.gz",
                "label_file": "ct_upper_slab_labels_totalseg_v2.nii.gz",
                "labels": {"Liver": ["liver"], "Spleen": ["spleen"]},
            }
        ],
    }
    path = tmp_path / "ddp.json"
    path.write_text(json.dumps(config))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "training.cli",
        "fit",
        str(path),
        "--no-progress",
    ]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "fit_summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    digests = summary["rank_weight_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    # The digests are of the weights that were saved, and training moved them.
    model = load_checkpoint(tmp_path / "run" / "model.safetensors")
    assert weights_digest(model) == digests[0]
    from training.export import read_state

    first = read_state(tmp_path / "run" / "checkpoints" / "step_0000001.pt")
    assert first["world_size"] == 2 and len(first["rng"]) == 2  # each rank's RNG state is kept for exact resume
    # the second (averaged) step changed the trained parameters, not only buffers: training moves the weights
    moved = [
        name
        for name, param in model.named_parameters()
        if not torch.allclose(param.detach().cpu(), first["model"][name], rtol=0, atol=1e-7)
    ]
    assert moved, "no parameter changed between step 1 and step 2"
    assert any(name.startswith("backbone.") for name in moved), moved  # the U-Net itself learned
