"""Shared fixtures: the reference data in ../shared (beside the checkout), and small models."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

torch.set_num_threads(min(2, os.cpu_count() or 1))


def shared_path(*parts: str) -> Path:
    """Path under ../shared; skips the test when missing (fails in CI, where the data must be there)."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        message = f"reference data {path} is missing (../shared beside the checkout holds it)"
        if IN_CI:
            pytest.fail(message + "; CI must have it")
        pytest.skip(message)
    return path


@pytest.fixture
def shared():
    return shared_path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's real model cache from tests."""
    if "UNIVERSALSEG_HOME" not in os.environ or not os.environ["UNIVERSALSEG_HOME"].startswith(str(tmp_path_factory.getbasetemp())):
        monkeypatch.setenv("UNIVERSALSEG_HOME", str(tmp_path_factory.mktemp("universalseg_home")))


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """A 1/8-width U-Net Universal Model with random weights and the real 32 class embeddings (fast on CPU)."""
    from UniversalSegLib.catalog import ClassCatalog
    from UniversalSegLib.checkpoints import save_checkpoint
    from UniversalSegLib.networks import ModelConfig, UniversalModel

    embeddings = torch.load(shared_path("reference", "clip_txt_encoding_32.pth"), map_location="cpu", weights_only=True).float()
    torch.manual_seed(0)
    model = UniversalModel(ModelConfig("unet", 4))
    model.organ_embedding.copy_(embeddings)
    model.class_names = ClassCatalog.default().names
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    return save_checkpoint(model, path, {"name": "tiny-test", "licence": "test weights"})


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 2 MiB file system (tmpfs) mounted for the test, to fill up: needs root on Linux (CI runs so);
    skipped elsewhere. Unmounted afterwards."""
    import subprocess

    mount = tmp_path / "small_fs"
    mount.mkdir()
    if sys.platform != "linux" or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root on Linux")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)], capture_output=True, text=True)
    if proc.returncode != 0:
        message = f"cannot mount a tmpfs here ({proc.stderr.strip()})"
        if IN_CI:
            pytest.fail(message + "; CI runs as root on Linux and must run this test")
        pytest.skip(message)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)
