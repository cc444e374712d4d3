"""Issue #15 case 4: every kind of malformed checkpoint gets one line saying what is wrong with the file, never a
traceback, and random bytes are not blamed on pickle code execution."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import shared_path
from UniversalSegLib.checkpoints import METADATA_KEY, load_checkpoint, save_checkpoint
from UniversalSegLib.cli import main
from UniversalSegLib.errors import CheckpointError
from UniversalSegLib.networks import ModelConfig, UniversalModel


def _tiny() -> UniversalModel:
    torch.manual_seed(0)
    model = UniversalModel(ModelConfig("unet", 4)).eval()
    model.organ_embedding.copy_(torch.randn(32, 512))
    model.metadata = {"name": "tiny", "licence": "test"}
    return model


def _with_metadata(tmp_path: Path, name: str, edit) -> Path:
    """A valid project checkpoint whose metadata JSON is changed by ``edit(meta) -> new metadata``."""
    good = save_checkpoint(_tiny(), tmp_path / "good.safetensors")
    from safetensors import safe_open

    with safe_open(str(good), framework="pt") as f:
        meta = json.loads(f.metadata()[METADATA_KEY])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    path = tmp_path / name
    save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(edit(meta))})
    return path


def _make(kind: str, tmp_path: Path) -> Path:
    if kind == "empty":
        path = tmp_path / "empty.pth"
        path.write_bytes(b"")
    elif kind == "tiny":
        path = tmp_path / "five.pth"
        path.write_bytes(b"hello")
    elif kind == "random":
        path = tmp_path / "random.pth"
        path.write_bytes(bytes((n * 7919 + 13) % 256 for n in range(4096)))  # fixed "random" bytes, not a pickle
    elif kind == "pickle_named_safetensors":
        path = tmp_path / "model.safetensors"
        torch.save({"net": {"module.x": torch.zeros(2)}}, path)
    elif kind == "metadata_list":
        path = _with_metadata(tmp_path, "list.safetensors", lambda meta: [meta])
    elif kind == "architecture_mismatch":
        path = _with_metadata(tmp_path, "swin.safetensors", lambda meta: {**meta, "architecture": "swinunetr"})
    elif kind == "format_version":
        path = _with_metadata(tmp_path, "v9.safetensors", lambda meta: {**meta, "format_version": 9})
    elif kind == "nan":
        model = _tiny()
        with torch.no_grad():
            next(model.parameters()).view(-1)[0] = float("nan")
        path = save_checkpoint(model, tmp_path / "nan.safetensors")
    elif kind == "truncated_safetensors":
        good = save_checkpoint(_tiny(), tmp_path / "good.safetensors")
        path = tmp_path / "cut.safetensors"
        path.write_bytes(good.read_bytes()[:5000])
    else:
        raise AssertionError(kind)
    return path


EXPECTED = {
    "empty": "is empty (0 bytes)",
    "tiny": "only 5 bytes",
    "random": "is not a checkpoint: neither a PyTorch file nor a safetensors file",
    "pickle_named_safetensors": "is named .safetensors but is a PyTorch (pickle) file",
    "metadata_list": "metadata is a JSON list, not an object",
    "architecture_mismatch": "metadata says architecture 'swinunetr' but its tensors are a 'unet' model",
    "format_version": "format version 9; this UniversalSeg reads version 1; update UniversalSeg",
    "nan": "holds NaN or infinite values",
    "truncated_safetensors": "is truncated",
}


@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_malformed_checkpoint_gets_one_clear_error(kind, tmp_path):
    path = _make(kind, tmp_path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert EXPECTED[kind] in message and "\n" not in message
    assert "pickle code execution" not in message


@pytest.mark.parametrize(
    "kind",
    [
        "empty",
        "tiny",
        "random",
        "pickle_named_safetensors",
        "metadata_list",
        "architecture_mismatch",
        "nan",
        "format_version",
    ],
)
def test_cli_malformed_checkpoint_exit_2_one_line(kind, tmp_path, capsys):
    path = _make(kind, tmp_path)
    slab = shared_path("data", "ct", "totalseg_abdomen", "ct_upper_slab.nii.gz")
    code = main(
        [
            "segment",
            str(slab),
            "-o",
            str(tmp_path / "o.nii.gz"),
            "--model",
            str(path),
            "--classes",
            "liver",
            "--progress",
            "none",
        ]
    )
    _out, err = capsys.readouterr()
    lines = [line for line in err.strip().splitlines() if line]
    assert code == 2 and len(lines) == 1 and EXPECTED[kind] in lines[0], err
    assert not (tmp_path / "o.nii.gz").exists()


def test_random_bytes_starting_like_a_pickle_are_not_called_code_execution(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"\x80\x02" + os.urandom(2000))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    assert "pickle code execution" not in str(info.value)


def test_safetensors_header_length_beyond_the_file(tmp_path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(struct.pack("<Q", 10**9) + b'{"a": 1}' + b"\0" * 64)
    with pytest.raises(CheckpointError, match="not a safetensors file"):
        load_checkpoint(path)
