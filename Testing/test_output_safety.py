"""Issue #15: never destroy the user's data, never report success on a failed write.

One test (or a few) per case of the issue, against the real CLI and writers, on real CTs from ../shared and the tiny
random-weight model. Every bad case must give one clear line, a non-zero exit, no traceback, no partial or empty
file, and leave every pre-existing file byte-identical.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from conftest import REPO, shared_path
from UniversalSegLib import imageio
from UniversalSegLib.catalog import ClassCatalog
from UniversalSegLib.cli import main
from UniversalSegLib.errors import InputError
from UniversalSegLib.imageio import read_image, write_label_map, write_outputs
from UniversalSegLib.result import CroppedMask, ImageGeometry, SegmentationResult

TEMP_MARK = ".part"  # in every temporary output name (UniversalSegLib.output_safety.temporary_name)

ENV = dict(os.environ, PYTHONPATH=str(REPO))
LIVER, SPLEEN = 6, 1


@pytest.fixture
def slab() -> Path:
    return shared_path("data", "ct", "totalseg_abdomen", "ct_upper_slab.nii.gz")


@pytest.fixture
def ct_copy(slab, tmp_path) -> Path:
    folder = tmp_path / "d"
    folder.mkdir()
    return Path(shutil.copy(slab, folder / "ct.nii.gz"))


@pytest.fixture
def dicom_copy(tmp_path) -> Path:
    """A writable copy of the real 3-slice CT DICOM series."""
    folder = tmp_path / "dicom"
    shutil.copytree(shared_path("data", "ct", "dcmqi_ct3slice", "dicom"), folder)
    folder.chmod(0o755)
    for file in folder.iterdir():
        file.chmod(0o644)
    return folder


def _digests(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _one_error_line(args: list[str], capsys) -> str:
    code = main(args)
    _out, err = capsys.readouterr()
    lines = [line for line in err.strip().splitlines() if line]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("universalseg: error: "), err
    assert "Traceback" not in err
    return lines[0]


def _result(image: sitk.Image, input_path: str | None) -> SegmentationResult:
    array = sitk.GetArrayFromImage(image)
    return SegmentationResult(
        geometry=ImageGeometry.of(image),
        masks={LIVER: CroppedMask.from_full(array > -300), SPLEEN: CroppedMask.from_full(array > 300)},
        catalog=ClassCatalog.default(),
        model_name="test",
        device="cpu",
        timings={"total": 0.0},
        input_path=input_path,
    )


def _no_temporaries(folder: Path) -> None:
    assert not [p for p in folder.rglob("*") if TEMP_MARK in p.name], list(folder.rglob("*"))


# ----------------------------------------------------------------------------------------------------- case 1
@pytest.mark.parametrize("spelling", ["same", "dot", "dotdot", "symlink", "hardlink", "symlinked_folder"])
def test_output_onto_the_input_is_refused_before_any_work(ct_copy, tmp_path, spelling, capsys):
    folder = ct_copy.parent
    output = {
        "same": ct_copy,
        "dot": folder / "." / "ct.nii.gz",
        "dotdot": folder / ".." / folder.name / "ct.nii.gz",
        "symlink": folder / "link.nii.gz",
        "hardlink": folder / "hard.nii.gz",
        "symlinked_folder": tmp_path / "alias" / "ct.nii.gz",
    }[spelling]
    if spelling == "symlink":
        output.symlink_to(ct_copy)
    elif spelling == "hardlink":
        os.link(ct_copy, output)
    elif spelling == "symlinked_folder":
        (tmp_path / "alias").symlink_to(folder)
    before = _digests(folder)
    # A model that does not exist: the refusal must come before the model is even looked for.
    line = _one_error_line(
        [
            "segment",
            str(ct_copy),
            "-o",
            str(output),
            "--model",
            str(tmp_path / "none.safetensors"),
            "--classes",
            "liver",
        ],
        capsys,
    )
    assert "input" in line and "destroy" in line and "choose another output" in line
    assert _digests(folder) == before


def test_output_onto_a_slice_of_the_input_dicom_series_is_refused(dicom_copy, tmp_path, capsys):
    before = _digests(dicom_copy)
    line = _one_error_line(
        [
            "segment",
            str(dicom_copy),
            "-o",
            str(dicom_copy / "02.dcm"),
            "--classes",
            "liver",
            "--model",
            str(tmp_path / "none.safetensors"),
        ],
        capsys,
    )
    assert "02.dcm" in line and "a file of the input" in line
    assert _digests(dicom_copy) == before


def test_an_earlier_dicom_seg_in_the_series_folder_may_be_replaced(dicom_copy):
    """Writing the SEG into the series folder and running again is fine: the SEG is not part of the scan."""
    from UniversalSegLib.output_safety import OutputPlan

    shutil.copy(shared_path("data", "ct", "dcmqi_ct3slice", "liver.dcm"), dicom_copy / "seg.dcm")
    assert read_image(dicom_copy).GetSize()[2] == 3  # neither read as a slice nor reported unreadable
    plan = OutputPlan().protect(dicom_copy)
    plan.add(dicom_copy / "seg.dcm")
    with pytest.raises(InputError, match="destroy the input"):
        plan.add(dicom_copy / "01.dcm")


def test_summary_onto_the_input_is_refused(ct_copy, tmp_path, capsys):
    before = _digests(ct_copy.parent)
    line = _one_error_line(
        [
            "segment",
            str(ct_copy),
            "-o",
            str(tmp_path / "seg.nii.gz"),
            "--summary",
            str(ct_copy),
            "--classes",
            "liver",
            "--model",
            str(tmp_path / "none.safetensors"),
        ],
        capsys,
    )
    assert "summary" in line and "destroy" in line
    assert _digests(ct_copy.parent) == before and not (tmp_path / "seg.nii.gz").exists()


def test_batch_output_folder_equal_to_the_input_folder_is_refused(slab, tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    shutil.copy(slab, scans / "a.nii.gz")
    before = _digests(scans)
    line = _one_error_line(
        ["segment", str(scans), "-o", str(scans), "--classes", "liver", "--model", str(tmp_path / "none.safetensors")],
        capsys,
    )
    assert "a.nii.gz" in line and "destroy" in line
    assert _digests(scans) == before


def test_outputs_differing_only_in_case_collide_on_a_case_insensitive_file_system(slab, tmp_path, monkeypatch, capsys):
    """On a case-insensitive file system (macOS, Windows) 'SEG.json' and 'seg.json' are one file. Linux has none to
    mount here, so the probe is told what such a file system answers; the comparison itself is the real one. (An
    output spelled like an input in another case is caught there by the inode: the input exists.)"""
    from UniversalSegLib import output_safety

    monkeypatch.setattr(output_safety, "_case_insensitive", lambda folder: True)
    line = _one_error_line(
        [
            "segment",
            str(slab),
            "-o",
            str(tmp_path / "seg.nii.gz"),
            "--summary",
            str(tmp_path / "SEG.NII.GZ"),
            "--classes",
            "liver",
            "--model",
            str(tmp_path / "none.safetensors"),
        ],
        capsys,
    )
    assert "same file" in line
    monkeypatch.undo()
    plan = output_safety.OutputPlan()
    plan.add(tmp_path / "seg.nii.gz")
    plan.add(tmp_path / "SEG.NII.GZ", "summary")  # case-sensitive here: two files


def test_case_insensitivity_probe_on_this_file_system(tmp_path):
    from UniversalSegLib import output_safety

    assert output_safety._case_insensitive(str(tmp_path)) is False  # Linux tmp: case matters
    assert output_safety.same_file_key(tmp_path / "a" / ".." / "X") == output_safety.same_file_key(tmp_path / "X")


def test_library_write_outputs_refuses_to_overwrite_its_input(ct_copy):
    before = ct_copy.read_bytes()
    result = _result(read_image(ct_copy), str(ct_copy))
    with pytest.raises(InputError, match="destroy the input"):
        write_outputs(result, ct_copy)
    with pytest.raises(InputError, match="destroy the input"):
        write_label_map(result, ct_copy.parent / "." / ct_copy.name)
    assert ct_copy.read_bytes() == before


# ----------------------------------------------------------------------------------------------------- case 2
def _fill(folder: Path, leave_bytes: int) -> None:
    """Fill the file system of ``folder`` until only about ``leave_bytes`` are free."""
    free = shutil.disk_usage(folder).free
    with open(folder / "filler", "wb") as f:
        f.write(b"\0" * max(free - leave_bytes, 0))


@pytest.mark.parametrize("name", ["seg.nii.gz", "seg.nii", "seg.nrrd"])
def test_full_disk_keeps_the_previous_file_and_reports_it(small_tmpfs, slab, name):
    image = read_image(slab)
    result = _result(image, str(slab))
    old = small_tmpfs / name
    old.write_bytes(b"previous segmentation " * 100)
    before = old.read_bytes()
    _fill(small_tmpfs, 8 * 1024)
    with pytest.raises(InputError, match=r"cannot write '.*small_fs/.*'.*(disk is full|free space)"):
        write_outputs(result, old, split_masks=small_tmpfs / "masks", summary=small_tmpfs / "summary.json")
    assert old.read_bytes() == before
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["filler", name]  # no temporaries, no masks folder


def test_full_disk_cli_exit_2_and_old_file_byte_identical(small_tmpfs, slab, tiny_model_path, capsys):
    old = small_tmpfs / "existing.nii.gz"
    old.write_bytes(b"the user's previous result " * 40)
    before = old.read_bytes()
    _fill(small_tmpfs, 6 * 1024)
    line = _one_error_line(
        [
            "segment",
            str(slab),
            "-o",
            str(old),
            "--model",
            str(tiny_model_path),
            "--classes",
            "liver,spleen",
            "--split-masks",
            str(small_tmpfs / "m"),
            "--fast",
            "--progress",
            "json",
        ],
        capsys,
    )
    assert "disk is full" in line
    assert old.read_bytes() == before
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["existing.nii.gz", "filler"]


def test_uncompressed_nifti_free_space_is_checked_before_the_run(small_tmpfs, slab, tmp_path, capsys):
    _fill(small_tmpfs, 64 * 1024)  # the label map needs 352 + 122*101*30 bytes = 370 kB
    line = _one_error_line(
        [
            "segment",
            str(slab),
            "-o",
            str(small_tmpfs / "seg.nii"),
            "--classes",
            "liver",
            "--model",
            str(tmp_path / "none.safetensors"),
        ],
        capsys,
    )
    assert "not enough free space" in line and "seg.nii" in line


def test_silently_truncated_write_is_caught_by_the_read_back(slab, tmp_path, monkeypatch):
    """What SimpleITK's NIfTI writer does on a full disk (anywhere, without root): it writes part and says nothing."""
    result = _result(read_image(slab), None)
    out = tmp_path / "seg.nii.gz"
    out.write_bytes(b"old")
    real_write = sitk.WriteImage

    def short_write(image, path, *args, **kwargs):
        real_write(image, path, *args, **kwargs)
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)

    monkeypatch.setattr(imageio.sitk, "WriteImage", short_write)
    for name in ("seg.nii.gz", "seg.nii"):
        with pytest.raises(InputError, match="incomplete"):
            write_label_map(result, tmp_path / name)
    assert out.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["seg.nii.gz"]


def test_transaction_puts_back_the_previous_files_when_a_rename_fails(tmp_path, monkeypatch):
    from UniversalSegLib import output_safety
    from UniversalSegLib.output_safety import OutputTransaction

    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text("old a")
    b.write_text("old b")
    real_replace = os.replace
    calls = []

    def failing_replace(src, dst):
        calls.append(dst)
        if Path(dst) == b and TEMP_MARK in Path(src).name:
            raise OSError(errno.EIO, "Input/output error")
        return real_replace(src, dst)

    monkeypatch.setattr(output_safety.os, "replace", failing_replace)
    with pytest.raises(InputError, match="cannot write .*b.json.*Input/output error"):
        with OutputTransaction() as txn:
            for dest in (a, b):
                with txn.stage(dest, output_safety.verify_text("new")) as tmp:
                    tmp.write_text("new")
    assert a.read_text() == "old a" and b.read_text() == "old b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "b.json"]


def test_empty_write_is_refused(tmp_path):
    from UniversalSegLib.output_safety import safe_output

    with pytest.raises(InputError, match="empty"):
        with safe_output(tmp_path / "x.json") as tmp:
            tmp.write_text("")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------------- case 3
def test_truncated_dicom_slice_is_refused_with_its_name(dicom_copy, tmp_path, tiny_model_path, capsys):
    with open(dicom_copy / "02.dcm", "r+b") as f:
        f.truncate(300_000)  # header intact, pixel data cut: GDCM silently leaves the file out of the series
    line = _one_error_line(
        [
            "segment",
            str(dicom_copy),
            "-o",
            str(tmp_path / "seg.dcm"),
            "--classes",
            "liver",
            "--model",
            str(tmp_path / "none.safetensors"),
        ],
        capsys,
    )
    assert "02.dcm" in line and "unreadable" in line and "--skip-unreadable-slices" in line
    code = main(
        [
            "segment",
            str(dicom_copy),
            "-o",
            str(tmp_path / "seg.nii.gz"),
            "--classes",
            "liver",
            "--model",
            str(tiny_model_path),
            "--fast",
            "--progress",
            "none",
            "--summary",
            str(tmp_path / "s.json"),
            "--skip-unreadable-slices",
        ]
    )
    assert code == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert any("02.dcm" in w for w in summary["warnings"]) and summary["geometry"]["size"][2] == 2


def test_dicom_series_with_a_missing_slice_is_refused_unless_allowed(dicom_copy, tmp_path):
    import pydicom

    extra = pydicom.dcmread(dicom_copy / "01.dcm")
    extra.ImagePositionPatient = [-235.199997, -226.800003, -130.690002]  # 2 mm after the last slice: one is missing
    extra.SOPInstanceUID = pydicom.uid.generate_uid()
    extra.InstanceNumber = 4
    extra.save_as(dicom_copy / "04.dcm")
    with pytest.raises(imageio.InputError, match="unevenly spaced.*--allow-irregular-slices"):
        read_image(dicom_copy)
    notes: list[str] = []
    assert read_image(dicom_copy, allow_irregular_slices=True, notes=notes).GetSize()[2] == 4
    assert notes and "unevenly spaced" in notes[0]


# ----------------------------------------------------------------------------------------------------- case 5
def test_summary_equal_to_output_is_refused(slab, tmp_path, capsys):
    out = tmp_path / "seg.nii.gz"
    line = _one_error_line(
        [
            "segment",
            str(slab),
            "-o",
            str(out),
            "--summary",
            str(tmp_path / "." / "seg.nii.gz"),
            "--classes",
            "liver",
            "--model",
            str(tmp_path / "none.safetensors"),
        ],
        capsys,
    )
    assert "same file" in line
    assert not list(tmp_path.iterdir())


def test_output_inside_split_masks_with_a_class_name_is_refused(slab, tmp_path, tiny_model_path, capsys):
    line = _one_error_line(
        [
            "segment",
            str(slab),
            "-o",
            str(tmp_path / "m" / "liver.nii.gz"),
            "--split-masks",
            str(tmp_path / "m"),
            "--classes",
            "liver",
            "--model",
            str(tiny_model_path),
            "--fast",
            "--progress",
            "json",
        ],
        capsys,
    )
    assert "liver.nii.gz" in line and "same file" in line
    assert not list(tmp_path.iterdir())


def test_batch_scans_with_the_same_name_are_refused(slab, tmp_path, capsys):
    scans = tmp_path / "scans"
    scans.mkdir()
    image = sitk.ReadImage(str(slab))
    sitk.WriteImage(image, str(scans / "a.nii.gz"))
    sitk.WriteImage(image, str(scans / "a.nrrd"))
    line = _one_error_line(
        [
            "segment",
            str(scans),
            "-o",
            str(tmp_path / "out"),
            "--classes",
            "liver",
            "--model",
            str(tmp_path / "none.safetensors"),
        ],
        capsys,
    )
    assert "of a.nii.gz" in line and "of a.nrrd" in line and "same file" in line
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------- case 6, 7
@pytest.mark.parametrize("value", ["", ",,,", " , "])
def test_empty_classes_means_nothing_requested(slab, tmp_path, value, capsys):
    line = _one_error_line(
        [
            "segment",
            str(slab),
            "-o",
            str(tmp_path / "o.nii.gz"),
            "--classes",
            value,
            "--model",
            str(tmp_path / "none.safetensors"),
        ],
        capsys,
    )
    assert "--classes" in line and "names no class" in line


def test_dicom_seg_for_a_nifti_input_is_refused_before_the_run(slab, tmp_path, capsys):
    line = _one_error_line(
        [
            "segment",
            str(slab),
            "-o",
            str(tmp_path / "seg.dcm"),
            "--classes",
            "liver",
            "--model",
            str(tmp_path / "none.safetensors"),
        ],
        capsys,
    )
    assert "DICOM SEG output needs a DICOM series input" in line


# ----------------------------------------------------------------------------------------------------- case 8
def test_control_characters_from_the_user_are_escaped(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("UNIVERSALSEG_CLIP_WEIGHTS", str(tmp_path / "no_clip_weights.safetensors"))
    main(["resolve", "\x1b[2J\x1b[Hliver", "\x1b]0;owned\x07spleen", "--no-clip"])
    out, err = capsys.readouterr()
    assert "\x1b" not in out + err and "\x07" not in out + err
    assert "\\x1b[2J" in out
    line = _one_error_line(["segment", str(tmp_path / "\x1b[2Jct.nii.gz"), "-o", str(tmp_path / "o.nii.gz")], capsys)
    assert "\x1b" not in line and "\\x1b[2Jct.nii.gz" in line
    from UniversalSegLib.errors import printable

    assert printable("a\nb\tc\x9b") == "a\\nb\\tc\\x9b"


# ----------------------------------------------------------------------------------------------------- case 9
def _child(code: str, args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=ENV, timeout=timeout)


def test_sigterm_during_the_run_exits_143_and_leaves_nothing(slab, tmp_path, tiny_model_path):
    code = (
        "import os, signal, sys\n"
        "from UniversalSegLib import cli\n"
        "call = cli._Progress.__call__\n"
        "def kill_at_first_window(self, message):\n"
        "    call(self, message)\n"
        "    if message.stage == 'windows': os.kill(os.getpid(), signal.SIGTERM)\n"
        "cli._Progress.__call__ = kill_at_first_window\n"
        "sys.exit(cli.main())\n"
    )
    out = tmp_path / "out"
    proc = _child(
        code,
        [
            "segment",
            str(slab),
            "-o",
            str(out / "seg.nii.gz"),
            "--model",
            str(tiny_model_path),
            "--classes",
            "liver",
            "--summary",
            str(out / "s.json"),
            "--progress",
            "none",
            "--fast",
        ],
    )
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and "interrupted" in proc.stderr
    assert not out.exists()


def test_sigterm_while_outputs_are_renamed_gives_all_of_them(slab, tmp_path, tiny_model_path):
    """The signal arrives in the middle of putting the files in place: it waits until all are, then exits 143."""
    code = (
        "import os, signal, sys\n"
        "from UniversalSegLib import cli, output_safety\n"
        "real = os.replace\n"
        "def replace(src, dst):\n"
        "    if '.part' in os.path.basename(src):  # one of our outputs being put in place\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return real(src, dst)\n"
        "output_safety.os.replace = replace\n"
        "sys.exit(cli.main())\n"
    )
    out, summary = tmp_path / "seg.nii.gz", tmp_path / "s.json"
    proc = _child(
        code,
        [
            "segment",
            str(slab),
            "-o",
            str(out),
            "--model",
            str(tiny_model_path),
            "--classes",
            "liver",
            "--summary",
            str(summary),
            "--progress",
            "none",
            "--fast",
        ],
    )
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert out.exists() and summary.exists()  # all or none; here all, complete
    assert json.loads(summary.read_text())["classes"][0]["name"] == "Liver"
    assert sitk.ReadImage(str(out)).GetSize() == sitk.ReadImage(str(slab)).GetSize()
    _no_temporaries(tmp_path)


def test_sigterm_at_exit_gives_no_atexit_traceback():
    code = (
        "import atexit, os, signal, sys, time\n"
        "from UniversalSegLib import cli\n"
        "atexit.register(lambda: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(2)))\n"
        "sys.exit(cli.main())\n"
    )
    proc = _child(code, ["resolve", "liver", "--no-clip", "--json"], timeout=120)
    assert proc.returncode == 143
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr, proc.stderr
    assert json.loads(proc.stdout)["items"][0]["classes"] == ["Liver"]  # the command's own output was complete


def test_fifo_input_is_refused_at_once(tmp_path):
    fifo = tmp_path / "ct.nii.gz"
    os.mkfifo(fifo)
    proc = _child(
        "import sys\nfrom UniversalSegLib.cli import main\nsys.exit(main())\n",
        ["segment", str(fifo), "-o", str(tmp_path / "o.nii.gz"), "--classes", "liver"],
        timeout=60,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"universalseg: error: input '{fifo}' is a FIFO (named pipe), not a file; save the scan to a file and pass that"
    ]


def test_nifti_nan_voxels_are_refused_not_zeroed(slab, tmp_path):
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(slab))).astype(np.float32)
    array[5, 50, 50] = np.nan
    image = sitk.GetImageFromArray(array)
    for name in ("nan.nii.gz", "nan.nii"):
        sitk.WriteImage(image, str(tmp_path / name))
        with pytest.raises(imageio.InputError, match="NaN or infinite"):
            read_image(tmp_path / name)


# ----------------------------------------------------------------------------------------------------- training export
def test_training_export_is_all_or_nothing_on_a_failed_write(slab, tmp_path, monkeypatch):
    """Re-exporting a case whose dataset file cannot be written keeps the previous export whole (image, label,
    dataset.json byte-identical), not a new image beside the old entry."""
    from UniversalSegLib import output_safety
    from UniversalSegLib.training_export import ExportedClass, export_case

    image = read_image(slab)
    array = sitk.GetArrayFromImage(image)
    export_case(tmp_path / "export", image, [ExportedClass(LIVER, array > -300)], case_id="c1")
    before = _digests(tmp_path / "export")
    real_write_text = Path.write_text

    def failing_write_text(self, text, *args, **kwargs):
        if self.name.startswith(".dataset"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(output_safety.Path, "write_text", failing_write_text)
    with pytest.raises(InputError, match="disk is full"):
        export_case(tmp_path / "export", image, [ExportedClass(LIVER, array > 300)], case_id="c1")  # a corrected mask
    assert _digests(tmp_path / "export") == before
