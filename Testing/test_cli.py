"""The ``universalseg`` command line end to end on real CTs, with a small random-weight model (fast on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import REPO, shared_path
from UniversalSegLib.catalog import ClassCatalog
from UniversalSegLib.checkpoints import save_checkpoint
from UniversalSegLib.cli import main
from UniversalSegLib.imageio import read_seg_nrrd
from UniversalSegLib.networks import ModelConfig, UniversalModel
from UniversalSegLib.progress import STAGES

CATALOG = ClassCatalog.default()


@pytest.fixture
def slab() -> Path:
    return shared_path("data", "ct", "totalseg_abdomen", "ct_upper_slab.nii.gz")


def _run(args: list[str], capsys) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def _assert_same_geometry(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


def test_segment_nifti_label_map_split_masks_summary(tiny_model_path, slab, tmp_path, capsys):
    out = tmp_path / "seg.nii.gz"
    split = tmp_path / "masks"
    summary = tmp_path / "summary.json"
    code, _, err = _run(
        [
            "segment",
            str(slab),
            "-o",
            str(out),
            "--model",
            str(tiny_model_path),
            "--classes",
            "liver,right kidney,kidney tumor,spleen",
            "--split-masks",
            str(split),
            "--summary",
            str(summary),
            "--fast",
            "--progress",
            "none",
            "--device",
            "cpu",
        ],
        capsys,
    )
    assert code == 0, err
    ct = sitk.ReadImage(str(slab))
    labels = sitk.ReadImage(str(out))
    _assert_same_geometry(labels, ct)
    label_array = sitk.GetArrayFromImage(labels)
    shown_values = set(np.unique(label_array).tolist())
    assert shown_values <= {0, 1, 2, 6, 26} and shown_values - {0}  # the random model marks most of the slab
    info = json.loads(summary.read_text())
    names = {c["name"] for c in info["classes"]}
    assert names == {"Liver", "Right Kidney", "Kidney Tumor", "Spleen"}  # dependencies (Left Kidney) not output
    voxel_ml = float(np.prod(ct.GetSpacing())) / 1000
    for c in info["classes"]:
        mask = sitk.GetArrayFromImage(sitk.ReadImage(str(split / f"{c['file_stem']}.nii.gz")))
        assert c["voxels"] > 0, c["name"]  # empty masks would pass every check below
        assert mask.sum() == c["voxels"]
        assert c["volume_ml"] == pytest.approx(mask.sum() * voxel_ml, abs=1e-3)
        # the label map shows the class wherever no higher-priority class (tumor over organ) covers it
        shown = label_array == c["index"]
        assert np.all(mask[shown] == 1)
        if CATALOG[c["index"]].kind == "tumor":
            assert np.array_equal(shown, mask.astype(bool))
    assert info["settings"]["fast"] is True and info["model"] == "tiny-test"


def test_seg_nrrd_round_trip(tiny_model_path, slab, tmp_path, capsys):
    out = tmp_path / "seg.seg.nrrd"
    code, _, err = _run(
        [
            "segment",
            str(slab),
            "-o",
            str(out),
            "--model",
            str(tiny_model_path),
            "--classes",
            "aorta,liver tumor",
            "--fast",
            "--progress",
            "none",
        ],
        capsys,
    )
    assert code == 0, err
    seg = read_seg_nrrd(out)
    by_name = {s["name"]: s for s in seg["segments"]}
    assert set(by_name) == {"Aorta", "Liver Tumor"}
    aorta = CATALOG.lookup("aorta")
    assert by_name["Aorta"]["terminology"] == CATALOG.slicer_terminology(aorta)
    assert np.allclose(by_name["Aorta"]["color"], np.array(aorta.color) / 255.0, atol=1e-3)
    assert by_name["Aorta"]["label_value"] == aorta.index


def test_dicom_folder_input_and_dicom_seg(tiny_model_path, tmp_path, capsys):
    dicom = shared_path("data", "ct", "dcmqi_ct3slice", "dicom")
    out = tmp_path / "seg.dcm"
    code, _, err = _run(
        [
            "segment",
            str(dicom),
            "-o",
            str(out),
            "--model",
            str(tiny_model_path),
            "--classes",
            "liver,spleen",
            "--fast",
            "--progress",
            "none",
            "--summary",
            str(tmp_path / "s.json"),
        ],
        capsys,
    )
    assert code == 0, err
    import pydicom

    ds = pydicom.dcmread(out)
    assert ds.Modality == "SEG"
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["geometry"]["size"][2] == 3
    voxels = {c["name"]: c["voxels"] for c in summary["classes"]}
    assert set(voxels) == {"Liver", "Spleen"} and all(v > 0 for v in voxels.values()), voxels
    assert {s.SegmentLabel for s in ds.SegmentSequence} == {"Liver", "Spleen"}
    frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
    by_number = {s.SegmentNumber: s.SegmentLabel for s in ds.SegmentSequence}
    per_segment: dict[str, int] = {}
    for frame, item in zip(frames, ds.PerFrameFunctionalGroupsSequence):
        label = by_number[item.SegmentIdentificationSequence[0].ReferencedSegmentNumber]
        per_segment[label] = per_segment.get(label, 0) + int(np.count_nonzero(frame))
    assert per_segment == voxels  # the SEG holds the summary's voxels, segment by segment


def test_prompt_segments_what_it_says(tiny_model_path, slab, tmp_path, capsys):
    summary = tmp_path / "s.json"
    code, _, err = _run(
        [
            "segment",
            str(slab),
            "-o",
            str(tmp_path / "seg.nii.gz"),
            "--model",
            str(tiny_model_path),
            "--prompt",
            "IVC and both kidneys",
            "--fast",
            "--progress",
            "none",
            "--summary",
            str(summary),
        ],
        capsys,
    )
    assert code == 0, err
    assert "'IVC' -> Postcava" in err and "'both kidneys' -> Right Kidney, Left Kidney" in err
    names = [c["name"] for c in json.loads(summary.read_text())["classes"]]
    assert names == ["Right Kidney", "Left Kidney", "Postcava"]


def test_batch_folder_skips_done_and_survives_failures(tiny_model_path, slab, tmp_path, capsys):
    folder = tmp_path / "scans"
    folder.mkdir()
    image = sitk.ReadImage(str(slab))
    sitk.WriteImage(image[:, :, :12], str(folder / "a.nii.gz"))
    sitk.WriteImage(image[:, :, 12:], str(folder / "b.nrrd"))
    (folder / "broken.nii.gz").write_bytes(b"not a nifti at all")
    out = tmp_path / "out"
    args = [
        "segment",
        str(folder),
        "-o",
        str(out),
        "--model",
        str(tiny_model_path),
        "--classes",
        "spleen",
        "--fast",
        "--progress",
        "none",
    ]
    code, _, err = _run(args, capsys)
    assert code == 1  # one scan failed, the others were written
    assert "broken" in err
    assert (out / "a.nii.gz").exists() and (out / "b.nii.gz").exists() and not (out / "broken.nii.gz").exists()
    mtime = (out / "a.nii.gz").stat().st_mtime_ns
    code, _, err = _run(args + ["--shard", "0/2"], capsys)
    assert "skip a.nii.gz" in err
    assert (out / "a.nii.gz").stat().st_mtime_ns == mtime


def test_json_progress_lines(tiny_model_path, slab, tmp_path):
    """The machine-readable progress the Slicer module reads, from a real subprocess."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "UniversalSegLib",
            "segment",
            str(slab),
            "-o",
            str(tmp_path / "s.nii.gz"),
            "--model",
            str(tiny_model_path),
            "--classes",
            "spleen",
            "--fast",
            "--progress",
            "json",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    fractions = [line["progress"] for line in lines if "progress" in line]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any(line["stage"].startswith("windows ") for line in lines if "stage" in line)
    assert lines[-1]["done"] is True


# --------------------------------------------------------------------------------------------- bad input
def _error(args, capsys) -> str:
    code, _, err = _run(args, capsys)
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("universalseg: error: "), err
    return lines[0]


def test_missing_input(tmp_path, capsys):
    assert "not found" in _error(["segment", str(tmp_path / "nope.nii.gz"), "-o", str(tmp_path / "o.nii.gz")], capsys)


def test_corrupt_input(tiny_model_path, tmp_path, capsys):
    bad = tmp_path / "bad.nrrd"
    bad.write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 10 10 10\nencoding: raw\n\n\x00\x01")
    msg = _error(["segment", str(bad), "-o", str(tmp_path / "o.nii.gz"), "--model", str(tiny_model_path)], capsys)
    assert "bad.nrrd" in msg
    assert not (tmp_path / "o.nii.gz").exists()


def test_two_d_input(tiny_model_path, slab, tmp_path, capsys):
    sitk.WriteImage(sitk.ReadImage(str(slab))[:, :, 5], str(tmp_path / "slice.nii.gz"))
    msg = _error(
        ["segment", str(tmp_path / "slice.nii.gz"), "-o", str(tmp_path / "o.nii.gz"), "--model", str(tiny_model_path)],
        capsys,
    )
    assert "2-D" in msg


def test_four_d_needs_frame(tiny_model_path, slab, tmp_path, capsys):
    image = sitk.ReadImage(str(slab))
    sitk.WriteImage(sitk.JoinSeries([image, image]), str(tmp_path / "four.nii.gz"))
    msg = _error(
        ["segment", str(tmp_path / "four.nii.gz"), "-o", str(tmp_path / "o.nii.gz"), "--model", str(tiny_model_path)],
        capsys,
    )
    assert "--frame" in msg


def test_mr_like_input_refused_unless_forced(tiny_model_path, slab, tmp_path, capsys):
    image = sitk.Cast(sitk.RescaleIntensity(sitk.ReadImage(str(slab)), 0, 1000), sitk.sitkInt16)
    sitk.WriteImage(image, str(tmp_path / "mr.nii.gz"))
    msg = _error(
        ["segment", str(tmp_path / "mr.nii.gz"), "-o", str(tmp_path / "o.nii.gz"), "--model", str(tiny_model_path)],
        capsys,
    )
    assert "--force" in msg and "CT" in msg
    assert not (tmp_path / "o.nii.gz").exists()


def test_unknown_class_suggests(tmp_path, slab, capsys):
    msg = _error(["segment", str(slab), "-o", str(tmp_path / "o.nii.gz"), "--classes", "livr"], capsys)
    assert "livr" in msg and "Liver" in msg


def test_output_not_writable(slab, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    msg = _error(["segment", str(slab), "-o", str(blocker / "o.nii.gz"), "--classes", "liver"], capsys)
    assert "file.txt" in msg


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_cuda_requested_but_absent(slab, tmp_path, capsys):
    msg = _error(
        ["segment", str(slab), "-o", str(tmp_path / "o.nii.gz"), "--device", "cuda", "--classes", "liver"], capsys
    )
    assert "CUDA" in msg and "--device cpu" in msg


def test_bad_options(slab, tmp_path, capsys):
    assert "overlap" in _error(["segment", str(slab), "-o", str(tmp_path / "o.nii.gz"), "--overlap", "1.5"], capsys)
    assert "shard" in _error(["segment", str(slab), "-o", str(tmp_path / "o.nii.gz"), "--shard", "3/2"], capsys)


def test_not_enough_memory(tiny_model_path, slab, tmp_path):
    """Run under an address-space limit that the scan's probability maps cannot fit in."""
    vm = _peak_virtual_memory_after_import()
    limit = vm + 400 * 2**20  # room for the tiny model, not for 32 classes x the whole CT
    code = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_AS, (%d, %d)); "
        "from UniversalSegLib.cli import main; sys.exit(main(sys.argv[1:]))" % (limit, limit)
    )
    big = shared_path("data", "ct", "itkelastix_chest", "ct.nii.gz")
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            "segment",
            str(big),
            "-o",
            str(tmp_path / "o.nii.gz"),
            "--model",
            str(tiny_model_path),
            "--classes",
            "all",
            "--fast",
            "--progress",
            "none",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=300,
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "not enough memory" in proc.stderr and "fewer classes" in proc.stderr
    assert not (tmp_path / "o.nii.gz").exists()


def _peak_virtual_memory_after_import() -> int:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            "import UniversalSegLib.pipeline, UniversalSegLib.cli, torch\n"
            "for line in open('/proc/self/status'):\n"
            "    if line.startswith('VmPeak'): print(int(line.split()[1]) * 1024)",
        ],
        capture_output=True,
        text=True,
        env=dict(os.environ, PYTHONPATH=str(REPO)),
        timeout=120,
    )
    return int(proc.stdout.strip())


# --------------------------------------------------------------------------------------------- library API
def test_library_segment_with_prompt_progress_and_cancel(tiny_model_path, slab):
    from UniversalSegLib import segment
    from UniversalSegLib.inferer import Cancelled

    seen = []
    result = segment(
        slab,
        prompt="IVC and both kidneys",
        model=str(tiny_model_path),
        fast=True,
        device="cpu",
        progress=seen.append,
    )
    assert sorted(result.masks) == [2, 3, 9]
    assert [item["method"] for item in result.prompt_report] == ["synonym", "group"]
    fractions = [m.fraction for m in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and seen[-1].text == "done"
    order: list[str] = []
    for m in seen:
        if not order or order[-1] != m.stage:
            order.append(m.stage)
    assert order == list(STAGES)  # each stage once, in order
    windows = [m for m in seen if m.stage == "windows"]
    assert [m.done for m in windows] == list(range(windows[0].total + 1))
    calls = []
    with pytest.raises(Cancelled):
        segment(
            slab, "liver", model=str(tiny_model_path), device="cpu", cancel=lambda: calls.append(1) or len(calls) > 1
        )
    assert len(calls) == 2  # stopped between windows, right after the first one


def test_library_all_means_the_classes_the_model_knows(tmp_path, slab):
    from UniversalSegLib import segment

    embeddings = torch.load(
        shared_path("reference", "clip_txt_encoding_32.pth"), map_location="cpu", weights_only=True
    ).float()
    torch.manual_seed(0)
    model = UniversalModel(ModelConfig("unet", 4), num_classes=3)
    model.organ_embedding.copy_(embeddings[[0, 2, 5]])  # spleen, left kidney, liver
    model.class_names = [CATALOG[1].name, CATALOG[3].name, CATALOG[6].name]
    path = save_checkpoint(model, tmp_path / "three.safetensors", {"name": "three", "licence": "test weights"})
    result = segment(slab, "all", model=str(path), fast=True, device="cpu")
    assert sorted(result.masks) == [1, 3, 6]


def test_unknown_backend_is_a_clear_error(tiny_model_path, slab):
    from UniversalSegLib import InputError, segment

    with pytest.raises(InputError, match="unknown backend"):
        segment(slab, "liver", model=str(tiny_model_path), device="cpu", backend="tensorrt")


def test_library_rejects_unknown_prompt(tiny_model_path, slab, monkeypatch):
    from UniversalSegLib import ClassNameError, segment

    monkeypatch.setenv("UNIVERSALSEG_CLIP_WEIGHTS", str(slab.parent / "missing_clip_weights.safetensors"))
    with pytest.raises(ClassNameError, match="blorfnax"):
        segment(slab, prompt="liver, blorfnax", model=str(tiny_model_path), fast=True, device="cpu")


def test_demo_writes_segmentation_summary_and_overlay(tiny_model_path, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "demo"
    code, _, err = _run(
        ["demo", "-o", str(out), "--model", str(tiny_model_path), "--classes", "liver", "--fast", "--progress", "none"],
        capsys,
    )
    assert code == 0, err
    assert read_seg_nrrd(out / "segmentation.seg.nrrd")["segments"][0]["name"] == "Liver"
    assert json.loads((out / "summary.json").read_text())["classes"][0]["name"] == "Liver"
    with Image.open(out / "overlay.png") as png:
        assert png.width > 400 and png.height > 200
    assert "overlay.png" in err


def test_resolve_command_json(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("UNIVERSALSEG_CLIP_WEIGHTS", str(tmp_path / "no_clip_weights_here.safetensors"))
    code, out, _ = _run(["resolve", "IVC and both kidneys", "--json"], capsys)
    assert code == 0
    data = json.loads(out)
    assert data["items"] == [
        {"text": "IVC", "classes": ["Postcava"], "method": "synonym", "score": None, "suggestions": []},
        {
            "text": "both kidneys",
            "classes": ["Right Kidney", "Left Kidney"],
            "method": "group",
            "score": None,
            "suggestions": [],
        },
    ]
    code, out, _ = _run(["resolve", "livr, zzqx", "--json"], capsys)
    assert code == 2  # an item was rejected
    items = json.loads(out)["items"]
    assert items[0]["classes"] == ["Liver"] and items[0]["method"] == "fuzzy"
    assert items[1]["classes"] == [] and items[1]["method"] == "rejected"


def test_cta_crop_geometry_is_kept(tiny_model_path, tmp_path, capsys):
    """Another real CT (1.5 mm CT angiography crop): output grid equals the input grid, values are catalog indices."""
    ct_path = shared_path("data", "ct", "totalseg_cta_crop", "ct.nii.gz")
    out = tmp_path / "cta.nrrd"
    code, _, err = _run(
        [
            "segment",
            str(ct_path),
            "-o",
            str(out),
            "--model",
            str(tiny_model_path),
            "--classes",
            "aorta,celiac trunk",
            "--fast",
            "--progress",
            "none",
        ],
        capsys,
    )
    assert code == 0, err
    ct, labels = sitk.ReadImage(str(ct_path)), sitk.ReadImage(str(out))
    _assert_same_geometry(labels, ct)
    values = set(np.unique(sitk.GetArrayFromImage(labels)).tolist())
    assert values <= {0, 8, 25} and values & {8, 25}  # the random model marks much of the crop: not an empty map
