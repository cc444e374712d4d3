"""The engine's fast paths give the masks of the straightforward ones.

* slab-by-slab blending and thresholding (``SlidingWindowSegmenter.predict_masks``) vs MONAI's full float32 logits,
  thresholded after the sigmoid;
* the OpenVINO backend vs PyTorch, bfloat16 vs float32;
* per-axis index inversion (``InverseIndex``) vs MONAI's inverse transform, on real CTs and re-oriented copies;
* the engine end to end vs the straightforward pipeline, with a tiny random U-Net (no full-size network here).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from conftest import shared_path
from UniversalSegLib.catalog import ClassCatalog
from UniversalSegLib.inferer import (
    OpenVINOWindowNetwork,
    SlidingWindowSegmenter,
    WindowLayout,
    count_windows,
    cpu_supports_bfloat16,
    openvino_available,
    resolve_backend,
)
from UniversalSegLib.networks import ModelConfig, UniversalModel
from UniversalSegLib.networks.unet3d import line_wise_instance_norm
from UniversalSegLib.pipeline import Engine, SegmentationOptions
from UniversalSegLib.postprocess import PostprocessOptions, dependencies, postprocess
from UniversalSegLib.preprocessing import bounding_box, preprocess

CATALOG = ClassCatalog.default()
ROI = (32, 32, 32)  # small windows keep the tests fast; the U-Net accepts any multiple of 8
needs_openvino = pytest.mark.skipif(not openvino_available(), reason="openvino is not installed")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny networks are thousands of small operations: one thread is fastest, above all on a shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_model() -> UniversalModel:
    """A 1/8-width U-Net with random weights and the real class embeddings."""
    torch.manual_seed(0)
    model = UniversalModel(ModelConfig("unet", 4)).eval()
    embeddings = torch.load(shared_path("reference", "clip_txt_encoding_32.pth"), map_location="cpu", weights_only=True)
    model.organ_embedding.copy_(embeddings.float())
    model.class_names = CATALOG.names
    model.metadata = {"name": "tiny-random", "licence": "test weights"}
    return model


@pytest.fixture(scope="module")
def slab_image() -> torch.Tensor:
    """A real preprocessed CT crop (1, 1, 56, 48, 40): windows of 32 in 3 x 2 x 2 positions at overlap 0.5."""
    pre = preprocess(sitk.ReadImage(str(shared_path("data", "ct", "totalseg_abdomen", "ct_upper_slab.nii.gz"))))
    return pre.image.as_tensor()[None, :, 70:126, 60:108, 10:50].contiguous()


def _median_thresholds(probabilities: torch.Tensor) -> list[float]:
    """Per-class thresholds that put about half the voxels on each side: every blending error would show."""
    return [float(p.median()) for p in probabilities]


def _assert_same_masks(masks: torch.Tensor, probabilities: torch.Tensor, thresholds: list[float]) -> None:
    """Masks equal ``probabilities > thresholds`` except where a probability is within float32 rounding of its
    threshold (the sigmoid of a slab and of the whole volume may differ in the last bit)."""
    expected = torch.stack([p > t for p, t in zip(probabilities, thresholds)])
    assert masks.shape == expected.shape and masks.dtype == torch.bool
    differ = masks != expected
    if differ.any():
        gap = torch.stack([(p - t).abs() for p, t in zip(probabilities, thresholds)])[differ]
        assert float(gap.max()) < 1e-6, (
            f"{int(differ.sum())} voxels differ, up to {float(gap.max())} from the threshold"
        )
    assert int(differ.sum()) <= 3


@pytest.mark.parametrize(
    "crop",
    [(slice(None), slice(None), slice(None)), (slice(None), slice(None), slice(0, 20))],
    ids=["windows", "padded-z"],
)
def test_predict_masks_equals_thresholded_full_logits(tiny_model, slab_image, crop):
    image = slab_image[(slice(None), slice(None), *crop)].contiguous()
    embeddings = tiny_model.class_embeddings[[0, 5, 10, 25]]
    segmenter = SlidingWindowSegmenter(tiny_model, roi_size=ROI, overlap=0.5, backend="torch")
    probabilities = torch.sigmoid(segmenter(image, embeddings)[0])
    thresholds = _median_thresholds(probabilities)
    assert len(WindowLayout.of(image.shape[2:], ROI, 0.5)) == count_windows(image.shape[2:], ROI, 0.5) > 1
    for axis in (0, 1, 2):  # the band can move along any axis (default: the longest, here 0)
        masks = segmenter.predict_masks(image, embeddings, thresholds, stream_axis=axis)
        _assert_same_masks(masks, probabilities, thresholds)
    assert segmenter.windows_done == count_windows(image.shape[2:], ROI, 0.5)
    assert set(segmenter.timings) == {"setup", "network", "blend"}


def test_predict_masks_window_batch_and_single_threshold(tiny_model, slab_image):
    embeddings = tiny_model.class_embeddings[[5]]
    one = SlidingWindowSegmenter(tiny_model, roi_size=ROI, overlap=0.25, backend="torch")
    probabilities = torch.sigmoid(one(slab_image, embeddings)[0])
    batched = SlidingWindowSegmenter(tiny_model, roi_size=ROI, overlap=0.25, sw_batch_size=3, backend="torch")
    threshold = float(probabilities.median())
    _assert_same_masks(batched.predict_masks(slab_image, embeddings, threshold), probabilities, [threshold])
    with pytest.raises(ValueError, match="2 thresholds for 1 classes"):
        batched.predict_masks(slab_image, embeddings, [0.5, 0.5])


def test_float16_band_gives_the_float32_masks(tiny_model, slab_image, monkeypatch):
    from UniversalSegLib import inferer

    embeddings = tiny_model.class_embeddings[[0, 5, 10, 25]]
    segmenter = SlidingWindowSegmenter(tiny_model, roi_size=ROI, overlap=0.5, backend="torch")
    probabilities = torch.sigmoid(segmenter(slab_image, embeddings)[0])
    thresholds = _median_thresholds(probabilities)
    full = segmenter.predict_masks(slab_image, embeddings, thresholds)
    assert segmenter.accumulate_dtype == torch.float32  # small band: the published float32 arithmetic
    monkeypatch.setattr(inferer, "BAND_FLOAT32_BUDGET", 0)  # as for 32 classes of a large CT
    half = segmenter.predict_masks(slab_image, embeddings, thresholds)
    assert segmenter.accumulate_dtype == torch.float16
    # Thresholds at the medians put half the voxels next to the cut (the hardest case): differences stay where the
    # float16 rounding of the running sums (relative 2^-11) can move a probability across it.
    differ = full != half
    gap = torch.stack([(p - t).abs() for p, t in zip(probabilities, thresholds)])[differ]
    assert float(differ.float().mean()) < 0.01 and float(gap.max()) < 1e-3
    for a, b in zip(full.numpy(), half.numpy()):
        assert _dice(a, b) >= 0.99


def test_predict_masks_progress_and_cancel(tiny_model, slab_image):
    from UniversalSegLib.inferer import Cancelled

    seen = []
    segmenter = SlidingWindowSegmenter(
        tiny_model, roi_size=ROI, backend="torch", progress=lambda done, total: seen.append((done, total))
    )
    segmenter.predict_masks(slab_image, tiny_model.class_embeddings[:1])
    total = count_windows(slab_image.shape[2:], ROI, 0.5)
    assert seen == [(done, total) for done in range(total + 1)]
    calls = iter(range(100))
    stopper = SlidingWindowSegmenter(tiny_model, roi_size=ROI, backend="torch", cancel=lambda: next(calls) >= 2)
    with pytest.raises(Cancelled):
        stopper.predict_masks(slab_image, tiny_model.class_embeddings[:1])
    assert stopper.windows_done == 2


def test_backend_choice(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("UNIVERSALSEG_BACKEND", raising=False)
    expected = "openvino" if openvino_available() else "torch"
    assert resolve_backend("auto", cpu, "unet") == expected
    assert resolve_backend("auto", cpu, "swinunetr", "float32") == "torch"  # OpenVINO is slower for it in float32
    assert resolve_backend("auto", cpu, "swinunetr", "bfloat16") == expected
    assert resolve_backend("auto", torch.device("cuda"), "unet") == "torch"
    monkeypatch.setenv("UNIVERSALSEG_BACKEND", "torch")
    assert resolve_backend("auto", cpu, "unet") == "torch"
    monkeypatch.setenv("UNIVERSALSEG_BACKEND", "fastest")
    with pytest.raises(ValueError, match="UNIVERSALSEG_BACKEND"):
        resolve_backend("auto", cpu)
    with pytest.raises(ValueError, match="CPU only"):
        resolve_backend("openvino", torch.device("cuda"))


@needs_openvino
def test_openvino_backend_matches_torch(tiny_model, slab_image):
    embeddings = tiny_model.class_embeddings[[0, 5]]
    torch_logits = SlidingWindowSegmenter(tiny_model, roi_size=ROI, backend="torch")(slab_image, embeddings)
    openvino = SlidingWindowSegmenter(tiny_model, roi_size=ROI, backend="openvino")
    ov_logits = openvino(slab_image, embeddings)
    scale = float(torch_logits.abs().max())
    assert float((ov_logits - torch_logits).abs().max()) <= 1e-4 * scale + 1e-5
    probabilities = torch.sigmoid(torch_logits[0])
    thresholds = _median_thresholds(probabilities)
    masks = openvino.predict_masks(slab_image, embeddings, thresholds)
    expected = torch.stack([p > t for p, t in zip(probabilities, thresholds)])
    assert float((masks != expected).float().mean()) < 1e-3  # only voxels whose logit is within rounding of the cut


def test_line_wise_instance_norm_equals_instance_norm():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 10, 12, 14, dtype=torch.float64) * 0.05 + 0.5  # a large mean and a small spread
    weight, bias = torch.randn(3, dtype=torch.float64), torch.randn(3, dtype=torch.float64)
    expected = torch.nn.functional.instance_norm(x, None, None, weight, bias, use_input_stats=True, eps=1e-5)
    torch.testing.assert_close(line_wise_instance_norm(x, weight, bias, 1e-5), expected, rtol=1e-12, atol=1e-12)


@needs_openvino
def test_openvino_full_window_within_float32_rounding(slab_image):
    """On a full 96^3 window, OpenVINO's fused MVN kernel sums less exactly than PyTorch (head-input errors of 1e-2
    were measured); the converted model must stay close to PyTorch's float32 output."""
    torch.manual_seed(2)
    model = UniversalModel(ModelConfig("unet", 8)).eval()
    window = torch.nn.functional.pad(slab_image, (28, 28, 24, 24, 20, 20))  # (1, 1, 96, 96, 96), real CT in the middle
    network = OpenVINOWindowNetwork(model, (96, 96, 96), threads=1, disk_cache=False)
    with torch.no_grad():
        feature, head_input = model.encode(window)
    result = network.compiled.create_infer_request().infer({0: window.numpy()})
    ov_head_input = torch.from_numpy(np.array(result[1]))
    error = (ov_head_input - head_input).abs()
    scale = float(head_input.abs().mean())
    assert float(error.mean()) < 1e-4 * scale, f"mean error {float(error.mean()):.2e} for mean |value| {scale:.2e}"
    network.release()


@needs_openvino
def test_openvino_threads_follow_torch_and_model_is_cached(tiny_model):
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        network = OpenVINOWindowNetwork(tiny_model, ROI)
        assert network.threads == 1
        assert network.compiled.get_property("INFERENCE_NUM_THREADS") == 1
    finally:
        torch.set_num_threads(threads)
    again = OpenVINOWindowNetwork(tiny_model, ROI, threads=1)
    assert again.converted is network.converted  # converted once per weights
    again.release()
    assert again.compiled is None  # the working memory goes with the compiled model; compiled again on use
    assert again(torch.zeros((1, 1, *ROI)), tiny_model.class_embeddings[:2]).shape == (1, 2, *ROI)
    with torch.no_grad():
        tiny_model.text_to_vision.bias.add_(1.0)  # other weights: a new digest, converted again
    try:
        assert OpenVINOWindowNetwork(tiny_model, ROI, threads=1).digest != network.digest
    finally:
        with torch.no_grad():
            tiny_model.text_to_vision.bias.sub_(1.0)


@pytest.mark.skipif(not cpu_supports_bfloat16(), reason="no bfloat16 on this CPU: would compare float32 with float32")
def test_bfloat16_close_to_float32(tiny_model, slab_image):
    embeddings = tiny_model.class_embeddings[[5]]
    full = SlidingWindowSegmenter(tiny_model, roi_size=ROI, backend="auto")
    half = SlidingWindowSegmenter(tiny_model, roi_size=ROI, backend="auto", precision="bfloat16")
    a, b = full(slab_image, embeddings).flatten(), half(slab_image, embeddings).flatten()
    assert full.effective_precision == "float32"
    assert half.effective_precision == "bfloat16"
    assert not torch.equal(a, b)  # really another precision, not the float32 run twice
    corr = torch.corrcoef(torch.stack([a, b]))[0, 1]
    assert float(corr) > 0.99


@pytest.mark.skipif(cpu_supports_bfloat16(), reason="this CPU has bfloat16 (see test_bfloat16_close_to_float32)")
def test_bfloat16_falls_back_to_float32_without_cpu_support(tiny_model):
    half = SlidingWindowSegmenter(tiny_model, roi_size=ROI, backend="torch", precision="bfloat16")
    assert half.effective_precision == "float32"


def _reoriented(image: sitk.Image, order: tuple[int, int, int], flips: tuple[bool, bool, bool]) -> sitk.Image:
    """The same CT with its array axes permuted and flipped (geometry follows, so it is the same scan)."""
    return sitk.Flip(sitk.PermuteAxes(image, list(order)), list(flips))


def _rotated(image: sitk.Image, degrees: float) -> sitk.Image:
    """The same voxels with a direction rotated about the scanner's z axis (an oblique acquisition)."""
    out = sitk.Image(image)
    a = np.deg2rad(degrees)
    rotation = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    out.SetDirection((rotation @ np.asarray(image.GetDirection()).reshape(3, 3)).ravel().tolist())
    return out


@pytest.mark.parametrize("variant", ["slab", "permuted-flipped", "oblique", "lung-nrrd", "cta-1.5mm"])
def test_inverse_index_equals_monai_inverse(variant):
    if variant == "lung-nrrd":
        image = sitk.ReadImage(str(shared_path("data", "ct", "pyradiomics_lung", "lung1_image.nrrd")))
    elif variant == "cta-1.5mm":  # already at the target spacing: MONAI does not resample
        image = sitk.ReadImage(str(shared_path("data", "ct", "totalseg_cta_crop", "ct.nii.gz")))
    else:
        image = sitk.ReadImage(str(shared_path("data", "ct", "totalseg_abdomen", "ct_upper_slab.nii.gz")))
        if variant == "permuted-flipped":
            image = _reoriented(image, (2, 0, 1), (True, False, True))
        elif variant == "oblique":
            image = _rotated(image, 20.0)
    pre = preprocess(image)
    index = pre.inverse_index
    assert index is not None and index.input_shape == tuple(reversed(image.GetSize()))
    rng = np.random.default_rng(0)
    noise = rng.random(pre.shape) > 0.5  # every misplaced plane would show
    np.testing.assert_array_equal(index.invert(noise), pre.invert_mask(noise))
    blob = np.zeros(pre.shape, dtype=bool)
    lo = [s // 3 for s in pre.shape]
    blob[lo[0] : lo[0] + 9, lo[1] : lo[1] + 5, lo[2] : lo[2] + 7] = rng.random((9, 5, 7)) > 0.4
    start, box = pre.invert_mask_box(blob)
    expected_start, expected_box = bounding_box(pre.invert_mask(blob))
    assert start == expected_start
    np.testing.assert_array_equal(box, expected_box)
    empty_start, empty = pre.invert_mask_box(np.zeros(pre.shape, dtype=bool))
    assert empty.shape == (0, 0, 0)


def test_non_separable_inversion_falls_back_to_monai(tiny_model, monkeypatch, tmp_path):
    """Where the per-axis maps cannot describe the inversion (``InverseIndex.of`` gives None: a rotation between the
    grids, or a preprocessing chain it does not know), the engine inverts with MONAI's inverse transform and its
    masks are those of the per-axis path, voxel for voxel, boxes placed where they belong."""
    import UniversalSegLib.preprocessing as preprocessing

    image = sitk.ReadImage(str(shared_path("data", "ct", "totalseg_abdomen", "ct_upper_slab.nii.gz")))
    path = tmp_path / "crop.nii.gz"
    sitk.WriteImage(_reoriented(image[:, :, 10:22], (2, 0, 1), (True, False, True)), str(path))  # body and air
    wanted = [6, 1]
    engine = Engine(tiny_model)
    per_axis = engine.segment(path, wanted)
    calls = []
    original = preprocessing.InverseIndex.of
    not_separable = classmethod(lambda cls, pre: calls.append(original(pre)) and None)
    monkeypatch.setattr(preprocessing.InverseIndex, "of", not_separable)
    fallback = engine.segment(path, wanted)
    assert calls and calls[0] is not None  # the separable path was really replaced by the fallback
    for c in wanted:
        expected = per_axis.mask_array(c).astype(bool)
        assert expected.any() and not expected.all()  # a real mask with a boundary, not all or nothing
        np.testing.assert_array_equal(fallback.mask_array(c).astype(bool), expected, err_msg=CATALOG[c].name)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int(np.logical_and(a, b).sum()) / total


def test_engine_equals_straightforward_pipeline(tiny_model):
    """Normal mode (streamed masks, per-axis inversion, OpenVINO when installed) vs MONAI full logits, sigmoid,
    published post-processing and MONAI's inverse per class."""
    path = shared_path("data", "ct", "totalseg_abdomen", "ct_upper_slab.nii.gz")
    wanted = [6, 1, 26]  # liver, spleen, kidney tumour (needs both kidneys)
    engine = Engine(tiny_model, SegmentationOptions(device="cpu"))
    started = time.perf_counter()
    result = engine.segment(path, wanted)
    wall = time.perf_counter() - started
    assert result.settings["precision"] == "float32" and result.settings["backend"] in ("torch", "openvino")
    assert set(result.masks) == set(wanted)
    timings = result.timings
    stages = ("read", "preprocess", "windows", "postprocess", "resample")
    assert all(timings[s] >= 0 for s in stages)
    assert timings["total"] == pytest.approx(sum(timings[s] for s in stages))  # the stages, each counted once
    assert 0 < timings["windows_network"] <= timings["windows"] and 0 < timings["total"] <= wall

    pre = preprocess(sitk.ReadImage(str(path)))
    computed = sorted(set(wanted) | dependencies(wanted))
    logits = SlidingWindowSegmenter(tiny_model, backend="torch")(pre.image[None], tiny_model.embeddings_for(computed))[
        0
    ]
    masks = {c: (torch.sigmoid(logits[n]) > 0.5).numpy() for n, c in enumerate(computed)}
    masks = postprocess(masks, PostprocessOptions())
    for c in wanted:
        expected = pre.invert_mask(masks[c])
        ours = result.mask_array(c).astype(bool)
        assert _dice(ours, expected) >= 0.999, CATALOG[c].name
