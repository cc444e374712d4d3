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
