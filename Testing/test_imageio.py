"""Tests of reading CTs and writing segmentations (UniversalSegLib.imageio), on the real CTs in ../shared/data/ct."""

from __future__ import annotations

import errno
import gzip
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from UniversalSegLib import imageio
from UniversalSegLib.catalog import ClassCatalog
from UniversalSegLib.errors import InputError, UniversalSegError
from UniversalSegLib.imageio import (
    check_ct_intensities,
    check_writable,
    dicom_series_files,
    is_dicom_series,
    output_format,
    read_image,
    read_seg_nrrd,
    with_format_suffix,
    write_dicom_seg,
    write_label_map,
    write_outputs,
    write_seg_nrrd,
    write_split_masks,
    write_summary,
)
from UniversalSegLib.result import CroppedMask, ImageGeometry, SegmentationResult

CT_FILES = [
    "itkelastix_chest/ct.nii.gz",
    "pyradiomics_lung/lung1_image.nrrd",
    "pyradiomics_lung/lung2_image.nrrd",
    "totalseg_abdomen/ct.nii.gz",
    "totalseg_abdomen/ct_upper_slab.nii.gz",
    "totalseg_cta_crop/ct.nii.gz",
]
SLAB = ("data", "ct", "totalseg_abdomen", "ct_upper_slab.nii.gz")
DICOM = ("data", "ct", "dcmqi_ct3slice", "dicom")

SPLEEN, RIGHT_KIDNEY, LIVER, LIVER_TUMOR = 1, 2, 6, 27


def _geometry_equal(a: sitk.Image, b: sitk.Image) -> None:
    assert a.GetSize() == b.GetSize()
    np.testing.assert_allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-6)
    np.testing.assert_allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(a.GetDirection(), b.GetDirection(), atol=1e-6)


def _result_from_ct(image: sitk.Image) -> SegmentationResult:
    """Masks made by thresholding a real CT: 'liver' = body (> -300 HU), 'liver tumor' = bone (> 300 HU, inside the
    body, so it overlaps the organ), 'spleen' = air below -900 HU (disjoint from the body), 'right kidney' empty."""
    array = sitk.GetArrayFromImage(image)
    masks = {
        SPLEEN: CroppedMask.from_full(array < -900),
        RIGHT_KIDNEY: CroppedMask.from_full(np.zeros(array.shape, dtype=bool)),
        LIVER: CroppedMask.from_full(array > -300),
        LIVER_TUMOR: CroppedMask.from_full(array > 300),
    }
    return SegmentationResult(
        geometry=ImageGeometry.of(image),
        masks=masks,
        catalog=ClassCatalog.default(),
        model_name="test-unet",
        device="cpu",
        timings={"total": 1.25},
        input_path="ct.nii.gz",
    )


@pytest.fixture(scope="module")
def slab_path():
    from conftest import shared_path

    return shared_path(*SLAB)


@pytest.fixture(scope="module")
def slab(slab_path) -> sitk.Image:
    return read_image(slab_path)


@pytest.fixture(scope="module")
def slab_result(slab) -> SegmentationResult:
    return _result_from_ct(slab)


@pytest.fixture(scope="module")
def dicom_dir():
    from conftest import shared_path

    return shared_path(*DICOM)


# ----------------------------------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rel", CT_FILES)
def test_reads_every_shared_ct_with_geometry_and_accepts_it_as_ct(shared, rel):
    path = shared("data", "ct", *rel.split("/"))
    image = read_image(path)
    raw = sitk.ReadImage(str(path))
    assert image.GetDimension() == 3
    assert image.GetPixelID() in (sitk.sitkInt16, sitk.sitkFloat32)
    _geometry_equal(image, raw)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(raw))
    check_ct_intensities(image)  # every real CT must pass, including the CTA crop


@pytest.mark.parametrize("suffix", [".nrrd", ".nhdr", ".mha", ".mhd", ".nii"])
def test_reads_copies_in_each_format(slab_path, slab, tmp_path, suffix):
    raw = sitk.ReadImage(str(slab_path))
    copy = sitk.GetImageFromArray(sitk.GetArrayFromImage(raw))  # geometry only, no NIfTI metadata
    copy.CopyInformation(raw)
    path = tmp_path / f"ct{suffix}"
    sitk.WriteImage(copy, str(path), useCompression=suffix != ".nii")
    image = read_image(path)
    _geometry_equal(image, slab)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(slab))


def test_reads_dicom_series_from_folder_parent_folder_and_one_file(dicom_dir):
    from_folder = read_image(dicom_dir)
    assert from_folder.GetSize() == (512, 512, 3)
    assert from_folder.GetMetaData("0008|0060") == "CT"
    # The parent folder also holds a DICOM SEG (liver.dcm): it is not taken for the scan.
    from_parent = read_image(dicom_dir.parent)
    from_file = read_image(dicom_dir / "02.dcm")
    for other in (from_parent, from_file):
        _geometry_equal(other, from_folder)
        np.testing.assert_array_equal(sitk.GetArrayViewFromImage(other), sitk.GetArrayViewFromImage(from_folder))
    check_ct_intensities(from_folder)  # a 3-slice CT with -3024 padding outside the scan circle
    assert is_dicom_series(dicom_dir) and is_dicom_series(dicom_dir / "01.dcm")
    assert not is_dicom_series(dicom_dir.parent.parent / "totalseg_abdomen")


def test_dicom_geometry_matches_the_dicom_headers(dicom_dir):
    import pydicom

    image = read_image(dicom_dir)
    files = dicom_series_files(dicom_dir)
    assert len(files) == 3
    for k, path in enumerate(files):
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        assert image.TransformPhysicalPointToIndex([float(v) for v in ds.ImagePositionPatient]) == (0, 0, k)
        np.testing.assert_allclose(image.GetSpacing()[:2], [float(v) for v in ds.PixelSpacing][::-1], rtol=1e-6)


def test_folder_with_two_series_reads_the_larger_and_says_which(dicom_dir, tmp_path, caplog):
    import pydicom

    for path in sorted(dicom_dir.glob("*.dcm")):
        shutil.copy(path, tmp_path / path.name)
    other = tmp_path / "other"
    other.mkdir()
    for name in ("01.dcm", "02.dcm"):
        ds = pydicom.dcmread(str(dicom_dir / name))
        ds.SeriesInstanceUID = "1.2.3.4.5.6.7.8"
        ds.SOPInstanceUID = ds.SOPInstanceUID + ".9"
        ds.save_as(str(other / name))
    with caplog.at_level(logging.WARNING, logger="UniversalSegLib.imageio"):
        image = read_image(tmp_path)
    assert image.GetSize() == (512, 512, 3)
    assert image.GetMetaData("0020|000e") != "1.2.3.4.5.6.7.8"
    assert "2 DICOM series" in caplog.text and "1.2.3.4.5.6.7.8" in caplog.text
    assert read_image(other).GetSize() == (512, 512, 2)


def test_missing_path(tmp_path):
    with pytest.raises(InputError, match="does not exist; check the path"):
        read_image(tmp_path / "nope.nii.gz")


def test_two_d_image(slab, tmp_path):
    path = tmp_path / "slice.nii.gz"
    sitk.WriteImage(slab[:, :, 10], str(path))
    with pytest.raises(InputError, match=r"is a 2-D image \(size 122x101\); UniversalSeg needs a 3-D CT volume"):
        read_image(path)


def test_single_dicom_slice_is_two_d(dicom_dir, tmp_path):
    shutil.copy(dicom_dir / "01.dcm", tmp_path / "01.dcm")
    with pytest.raises(InputError, match="is a 2-D image"):
        read_image(tmp_path)


def test_four_d_image_needs_a_frame(slab, tmp_path):
    path = tmp_path / "ct4d.nii.gz"
    sitk.WriteImage(sitk.JoinSeries([slab, slab + 10, slab + 20]), str(path))
    with pytest.raises(InputError, match=r"4-D image with 3 frames; pass --frame N \(0\.\.2\)"):
        read_image(path)
    frame = read_image(path, frame=1)
    _geometry_equal(frame, slab)
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(frame), sitk.GetArrayViewFromImage(slab) + 10)
    with pytest.raises(InputError, match="frame 3 is out of range: .* has 3 frames"):
        read_image(path, frame=3)
    with pytest.raises(InputError, match="frame 1 is out of range"):
        read_image(_write(slab, tmp_path / "ct3d.nii.gz"), frame=1)  # a 3-D image has one frame


def _write(image: sitk.Image, path: Path) -> Path:
    sitk.WriteImage(image, str(path), useCompression=True)
    return path


def test_truncated_nifti_gz(slab_path, tmp_path):
    # SimpleITK itself reads a truncated .nii.gz without an error, filling zeros: the check must catch it.
    data = slab_path.read_bytes()
    path = tmp_path / "truncated.nii.gz"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputError, match="truncated"):
        read_image(path)


def test_truncated_uncompressed_nifti(slab_path, tmp_path):
    path = tmp_path / "ct.nii"
    path.write_bytes(gzip.decompress(slab_path.read_bytes()))
    read_image(path)
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(InputError, match=r"truncated \(\d+ of \d+ bytes"):
        read_image(path)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_truncated_nrrd_and_mha(slab, tmp_path, suffix):
    path = _write(slab, tmp_path / f"ct{suffix}")
    path.write_bytes(path.read_bytes()[:-20000])
    with pytest.raises(InputError, match="truncated or corrupt; re-export|truncated or corrupt \\("):
        read_image(path)


def test_not_an_image(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a scan\n")
    with pytest.raises(InputError, match="not an image file SimpleITK can read"):
        read_image(text)
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(gzip.compress(b"\0" * 100))
    with pytest.raises(InputError, match="not an image file SimpleITK can read"):
        read_image(garbage)


def test_dicom_seg_is_not_a_scan(shared):
    with pytest.raises(InputError, match="is a DICOM SEG object, not an image series"):
        read_image(shared("data", "ct", "dcmqi_ct3slice", "liver.dcm"))


def test_rgb_image(slab, tmp_path):
    rgb = sitk.Compose([sitk.Cast(slab, sitk.sitkUInt8)] * 3)
    path = _write(rgb, tmp_path / "rgb.nrrd")
    with pytest.raises(InputError, match="colour \\(RGB\\) image with 3 values per voxel"):
        read_image(path)


def test_nan_values(slab, tmp_path):
    array = sitk.GetArrayFromImage(slab).astype(np.float32)
    array[5, 50, 50] = np.nan
    image = sitk.GetImageFromArray(array)
    image.CopyInformation(slab)
    with pytest.raises(InputError, match="NaN or infinite"):
        read_image(_write(image, tmp_path / "nan.nrrd"))  # (ITK's NIfTI reader itself turns NaN into 0)


def test_mr_like_intensities_are_refused_unless_forced(slab):
    array = sitk.GetArrayFromImage(slab).astype(np.float32)
    mr = (array - array.min()) / (array.max() - array.min()) * 1000.0  # 0..1000, no negatives: MR-like
    image = sitk.GetImageFromArray(mr)
    image.CopyInformation(slab)
    with pytest.raises(InputError) as info:
        check_ct_intensities(image)
    message = str(info.value)
    assert "does not look like a CT in Hounsfield units (intensity range 0..1000" in message
    assert message.endswith("pass --force to segment anyway") and "\n" not in message
    check_ct_intensities(image, force=True)
    # A z-scored (normalised) image spans a few units.
    zscored = sitk.GetImageFromArray((array - array.mean()) / array.std())
    with pytest.raises(InputError, match="spans only"):
        check_ct_intensities(zscored)
    # A CT whose air was clipped away (e.g. already windowed to [-175, 250]) has no air or lung.
    windowed = sitk.GetImageFromArray(np.clip(array, -175, 250))
    with pytest.raises(InputError, match="no air or lung below -300 HU"):
        check_ct_intensities(windowed)


def test_dicom_modality_other_than_ct_is_refused(dicom_dir, tmp_path):
    import pydicom

    for path in dicom_dir.glob("*.dcm"):
        ds = pydicom.dcmread(str(path))
        ds.Modality = "MR"
        ds.save_as(str(tmp_path / path.name))
    image = read_image(tmp_path)
    with pytest.raises(InputError, match="DICOM modality MR, not CT"):
        check_ct_intensities(image)
    check_ct_intensities(image, force=True)


# ----------------------------------------------------------------------------------------------------------------------
# Output paths
# ----------------------------------------------------------------------------------------------------------------------


def test_output_format_from_suffix_and_flag(tmp_path):
    assert output_format("a/seg.nii.gz") == "nii"
    assert output_format("a/seg.nii") == "nii"
    assert output_format("seg.nrrd") == "nrrd"
    assert output_format("seg.seg.nrrd") == "seg.nrrd"
    assert output_format("SEG.DCM") == "dicom-seg"
    assert output_format("out", "seg.nrrd") == "seg.nrrd"
    assert output_format("out.seg.nrrd", "seg.nrrd") == "seg.nrrd"
    assert with_format_suffix("out", "seg.nrrd") == Path("out.seg.nrrd")
    assert with_format_suffix("out.nii", "nii") == Path("out.nii")
    with pytest.raises(InputError, match="unknown output format 'png'; use one of: seg.nrrd, nii, nrrd, dicom-seg"):
        output_format("out", "png")
    with pytest.raises(InputError, match="cannot tell the output format of 'out.png'"):
        output_format("out.png")
    with pytest.raises(InputError, match="cannot tell the output format of 'out.nhdr'"):
        output_format("out.nhdr")  # a detached header's data file would not follow the atomic rename
    with pytest.raises(InputError, match="is a nii name but --format is nrrd"):
        output_format("out.nii.gz", "nrrd")


def test_unwritable_output_raises_before_writing(slab_result, tmp_path):
    # Tests run as root, where chmod does not stop writes: a path below a regular file cannot be written by anyone.
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    target = blocker / "out" / "seg.nii.gz"
    with pytest.raises(
        InputError, match=r"cannot write output '.*file\.txt/out/seg\.nii\.gz': '.*file\.txt' is a file"
    ):
        check_writable(target)
    summary = tmp_path / "summary.json"
    with pytest.raises(InputError, match="file.txt"):
        write_outputs(slab_result, target, summary=summary, split_masks=tmp_path / "masks")
    assert not summary.exists() and not (tmp_path / "masks").exists()  # nothing written before the check
    with pytest.raises(InputError, match="is a folder; give a file name"):
        check_writable(tmp_path)
    nested = tmp_path / "new" / "deeper" / "seg.nii.gz"
    check_writable(nested)  # a missing folder below a writable one is fine, and not created by the check
    assert not (tmp_path / "new").exists()


def test_read_only_folder_is_refused_when_not_root(tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root can write into read-only folders; covered by the path-below-a-file test")
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(InputError, match="is not writable"):
            check_writable(folder / "seg.nii.gz")
    finally:
        folder.chmod(0o700)


# ----------------------------------------------------------------------------------------------------------------------
# Writers
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["labels.nii.gz", "labels.nrrd"])
def test_label_map_values_are_catalog_indices_tumor_over_organ(slab, slab_result, tmp_path, name):
    path = write_label_map(slab_result, tmp_path / name)
    written = sitk.ReadImage(str(path))
    _geometry_equal(written, slab)
    assert written.GetPixelID() == sitk.sitkUInt8
    labels = sitk.GetArrayFromImage(written)
    ct = sitk.GetArrayFromImage(slab)
    expected = np.zeros(ct.shape, dtype=np.uint8)
    expected[ct < -900] = SPLEEN
    expected[ct > -300] = LIVER
    expected[ct > 300] = LIVER_TUMOR  # the tumor wins where it overlaps its organ
    np.testing.assert_array_equal(labels, expected)
    assert set(np.unique(labels)) == {0, SPLEEN, LIVER, LIVER_TUMOR}


def test_seg_nrrd_round_trip_keeps_names_colours_terminology_and_overlapping_masks(slab_result, tmp_path):
    catalog = ClassCatalog.default()
    path = write_seg_nrrd(slab_result, tmp_path / "seg.seg.nrrd")
    back = read_seg_nrrd(path)
    assert back["geometry"] == slab_result.geometry
    segments = {s["label_value"]: s for s in back["segments"]}
    assert sorted(segments) == sorted(slab_result.masks)  # label value = catalog index
    for index, segment in segments.items():
        info = catalog[index]
        assert segment["name"] == info.name
        assert segment["id"] == info.file_stem
        assert segment["color"] == tuple(c / 255.0 for c in info.color)
        assert segment["terminology"] == catalog.slicer_terminology(info)
        np.testing.assert_array_equal(segment["mask"], slab_result.mask_array(index).astype(bool))
    # The tumor overlaps the organ: it is stored in a second layer, so both masks are exact.
    assert segments[LIVER]["layer"] == 0 and segments[LIVER_TUMOR]["layer"] == 1
    assert (segments[LIVER]["mask"] & segments[LIVER_TUMOR]["mask"]).sum() == slab_result.masks[LIVER_TUMOR].voxel_count
    assert "Right" in segments[RIGHT_KIDNEY]["terminology"] and not segments[RIGHT_KIDNEY]["mask"].any()


def test_seg_nrrd_places_voxels_where_the_input_has_them(slab, tmp_path):
    """Single-layer file read by SimpleITK (an independent reader) and a 4-D one checked by its NRRD header, on a grid
    with a flipped direction (the slab is stored with x and y reversed) and an oblique one."""
    import nrrd

    array = sitk.GetArrayFromImage(slab)
    for direction in (slab.GetDirection(), _oblique_direction()):
        ct = sitk.GetImageFromArray(array)
        ct.CopyInformation(slab)
        ct.SetDirection(direction)
        ct.SetSpacing((3.0, 2.5, 4.0))
        result = _result_from_ct(ct)
        single = SegmentationResult(ImageGeometry.of(ct), {LIVER: result.masks[LIVER]}, result.catalog)
        path = write_seg_nrrd(single, tmp_path / "liver.seg.nrrd")
        read = sitk.ReadImage(str(path))
        _geometry_equal(read, ct)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(read), single.label_array())

        path = write_seg_nrrd(result, tmp_path / "all.seg.nrrd")
        voxels, header = nrrd.read(str(path))
        assert header["kinds"] == ["list", "domain", "domain", "domain"]
        assert header["space"] == "left-posterior-superior"
        expected = np.asarray(ct.GetDirection()).reshape(3, 3) * np.asarray(ct.GetSpacing())[None, :]
        np.testing.assert_allclose(header["space directions"][1:], expected.T, atol=1e-9)
        np.testing.assert_allclose(header["space origin"], ct.GetOrigin(), atol=1e-9)
        # A voxel of the tumor (layer 1) at index (x, y, z) of the input is at [1, x, y, z] in the file.
        z, y, x = np.argwhere(result.mask_array(LIVER_TUMOR))[0]
        assert voxels[1, x, y, z] == LIVER_TUMOR


def _oblique_direction() -> tuple[float, ...]:
    angle = np.deg2rad(20.0)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
    return tuple(float(v) for v in rotation.ravel())


def test_split_masks_match_the_result_and_keep_overlaps(slab, slab_result, tmp_path):
    paths = write_split_masks(slab_result, tmp_path / "masks")
    assert sorted(p.name for p in paths) == sorted(
        ["spleen.nii.gz", "right_kidney.nii.gz", "liver.nii.gz", "liver_tumor.nii.gz"]
    )
    for path in paths:
        mask = sitk.ReadImage(str(path))
        _geometry_equal(mask, slab)
        assert mask.GetPixelID() == sitk.sitkUInt8
        index = ClassCatalog.default().lookup(path.name.removesuffix(".nii.gz")).index
        np.testing.assert_array_equal(sitk.GetArrayFromImage(mask), slab_result.mask_array(index))
    liver = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "masks" / "liver.nii.gz")))
    tumor = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "masks" / "liver_tumor.nii.gz")))
    assert tumor.sum() > 0 and (liver[tumor > 0] == 1).all()


def test_summary_volumes_match_masks(slab_result, tmp_path):
    path = write_summary(slab_result, tmp_path / "summary.json")
    summary = json.loads(path.read_text())
    voxel_ml = float(np.prod(slab_result.geometry.spacing)) / 1000.0
    by_index = {c["index"]: c for c in summary["classes"]}
    for index in slab_result.masks:
        count = int(slab_result.mask_array(index).sum())
        assert by_index[index]["voxels"] == count
        assert by_index[index]["volume_ml"] == pytest.approx(count * voxel_ml, abs=1e-3)
    assert summary["model"] == "test-unet" and summary["geometry"]["size"] == [122, 101, 30]


def test_dicom_seg_references_the_source_series(dicom_dir, tmp_path):
    import highdicom as hd
    import pydicom

    image = read_image(dicom_dir)
    result = _result_from_ct(image)
    path = write_dicom_seg(result, tmp_path / "seg.dcm", dicom_dir)
    seg = hd.seg.segread(str(path))
    source = pydicom.dcmread(str(dicom_dir / "01.dcm"), stop_before_pixels=True)
    assert seg.Modality == "SEG"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == source.SeriesInstanceUID
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    catalog = ClassCatalog.default()
    infos = [catalog[i] for i in sorted(result.masks)]
    assert [s.SegmentLabel for s in seg.SegmentSequence] == [i.name for i in infos]
    for item, info in zip(seg.SegmentSequence, infos):
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == info.type.code
        assert item.SegmentedPropertyCategoryCodeSequence[0].CodeValue == info.category.code
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        assert item.SegmentationAlgorithmIdentificationSequence[0].AlgorithmName == "test-unet"
    kidney = seg.SegmentSequence[[i.index for i in infos].index(RIGHT_KIDNEY)]
    assert (
        kidney.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "24028007"
    )
    # Masks per source slice equal the result's masks (slice k of the image is the k-th file of the series).
    files = dicom_series_files(dicom_dir)
    uids = [pydicom.dcmread(str(f), stop_before_pixels=True).SOPInstanceUID for f in files]
    pixels = seg.get_pixels_by_source_instance(uids, assert_missing_frames_are_empty=True)
    for channel, info in enumerate(infos):
        np.testing.assert_array_equal(pixels[..., channel], result.mask_array(info.index))


def test_dicom_seg_needs_dicom_input(slab_path, slab_result, tmp_path):
    with pytest.raises(InputError, match="DICOM SEG output needs a DICOM series input"):
        write_dicom_seg(slab_result, tmp_path / "seg.dcm", slab_path)
    with pytest.raises(InputError, match="DICOM SEG output needs a DICOM series input"):
        write_outputs(slab_result, tmp_path / "seg.dcm", dicom_source=None)
    assert not (tmp_path / "seg.dcm").exists()


def test_dicom_seg_refuses_a_series_of_another_grid(dicom_dir, slab_result, tmp_path):
    with pytest.raises(InputError, match="write the DICOM SEG from the same series that was segmented"):
        write_dicom_seg(slab_result, tmp_path / "seg.dcm", dicom_dir)
    assert not list(tmp_path.iterdir())


def test_write_outputs_writes_everything_asked_for(slab_result, tmp_path):
    paths = write_outputs(
        slab_result,
        tmp_path / "out" / "ct",
        fmt="seg.nrrd",
        split_masks=tmp_path / "masks",
        summary=tmp_path / "summary.json",
    )
    assert paths[-1] == tmp_path / "out" / "ct.seg.nrrd"
    assert all(p.is_file() for p in paths) and len(paths) == 1 + 4 + 1
    assert not [p for p in tmp_path.rglob("*") if ".part" in p.name]


def test_failing_writer_leaves_no_partial_file(slab_result, tmp_path, monkeypatch):
    import slicerio.segmentation

    output = tmp_path / "seg.seg.nrrd"
    output.write_bytes(b"previous result")

    def failing_write(file, segmentation, **kwargs):
        Path(file).write_bytes(b"NRRD0004\npartial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(slicerio, "write_segmentation", failing_write)
    monkeypatch.setattr(slicerio.segmentation, "write_segmentation", failing_write)
    with pytest.raises(
        InputError, match=r"cannot write '.*seg\.seg\.nrrd': the disk is full \(No space left on device\)"
    ):
        write_outputs(slab_result, output, summary=tmp_path / "summary.json", split_masks=tmp_path / "masks")
    assert output.read_bytes() == b"previous result"  # the old file is untouched, not half-overwritten
    assert not (tmp_path / "summary.json").exists()  # outputs of the failed run are removed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["seg.seg.nrrd"]  # not even the masks folder it made


def test_failing_label_map_writer_leaves_no_file(slab_result, tmp_path, monkeypatch):
    def failing_write(image, path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("Exception thrown in SimpleITK WriteImage: ITK ERROR: NiftiImageIO(0x1): disk full")

    monkeypatch.setattr(imageio.sitk, "WriteImage", failing_write)
    with pytest.raises(UniversalSegError, match=r"cannot write '.*labels\.nii\.gz': disk full"):
        write_label_map(slab_result, tmp_path / "labels.nii.gz")
    assert not list(tmp_path.iterdir())
