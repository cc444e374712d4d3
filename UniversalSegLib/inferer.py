"""Sliding-window inference with the published pipeline's Gaussian blending.

Two ways to run the windows over a preprocessed volume, with the same window positions, padding and weights as
MONAI's ``sliding_window_inference`` (which the published pipeline used):

* :meth:`SlidingWindowSegmenter.__call__` returns the blended logits of every class over the whole volume (MONAI's
  inferer does the tiling); memory grows with classes x volume in float32.
* :meth:`SlidingWindowSegmenter.predict_masks` returns the thresholded masks only. It visits the windows in MONAI's
  order and blends them into a band of the volume as thick as one window along the volume's longest axis; every slab
  behind the band is final (no later window touches it) and is thresholded and dropped. The masks equal
  ``sigmoid(__call__(...)) > threshold``: bit for bit when the band moves along the first axis (the same float32
  sums in the same order), and up to the float32 rounding of a differently ordered sum otherwise.

The network runs on a *backend*: ``"torch"`` (the model itself; mixed precision on CUDA) or ``"openvino"``
(the model's shared backbone pass converted to OpenVINO for the CPU, about twice as fast as PyTorch there; the
per-class heads stay in PyTorch). Precision ``"bfloat16"`` runs the backbone in bfloat16 on CPUs that support it
(the engine's ``--fast`` mode); ``"float32"`` is the published arithmetic.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from time import perf_counter
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.data.utils import dense_patch_slices, get_valid_patch_size
from monai.inferers import sliding_window_inference
from monai.networks.layers import GaussianFilter

from .networks.universal_model import UniversalModel
from .request import BACKENDS as _REQUEST_BACKENDS

logger = logging.getLogger(__name__)

ROI_SIZE: tuple[int, int, int] = (96, 96, 96)
#: Checked, with their messages, by the request (UniversalSegLib.request); here they are only asserted.
BACKENDS: tuple[str, ...] = _REQUEST_BACKENDS
PRECISIONS: tuple[str, ...] = ("float32", "bfloat16")
#: Largest float32 blending band (bytes) before ``predict_masks`` stores the band in float16 (e.g. 32 classes of a
#: 512x512x141 CT need 690 MB in float32); see ``SlidingWindowSegmenter.predict_masks``.
BAND_FLOAT32_BUDGET = 256 * 2**20
#: Voxels per chunk when applying the per-class heads: keeps each head's 8-channel intermediates in cache
#: (about 3x faster than one pass over a whole 96^3 window on CPU; the arithmetic per voxel is unchanged).
HEAD_CHUNK_VOXELS = 32768

#: Called with (windows done, windows in all) before the first window and after each.
WindowProgress = Callable[[int, int], None]
#: A box of voxels, ``((x0, x1), (y0, y1), (z0, z1))``, half-open index ranges on a volume's grid.
Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


class Cancelled(Exception):
    """Raised when the caller's cancel check returns True between windows."""


@lru_cache(maxsize=4)
def gaussian_weight_map_monai090(roi_size: tuple[int, ...], sigma_scale: float = 0.125) -> torch.Tensor:
    """The window weight map of MONAI 0.9.0's Gaussian blending, with which the published results were made.

    A unit impulse at index ``size // 2`` blurred with a Gaussian of sigma ``sigma_scale * size`` (erf kernel,
    truncated at 4 sigma), divided by its maximum, clamped below at max(smallest non-zero value, 1e-3).
    Current MONAI computes its Gaussian map differently, so the map is passed to the inferer explicitly.
    Returns a float32 tensor of shape ``roi_size``.
    """
    impulse = torch.zeros(roi_size, dtype=torch.float32)
    impulse[tuple(s // 2 for s in roi_size)] = 1.0
    blur = GaussianFilter(len(roi_size), [s * sigma_scale for s in roi_size], truncated=4.0, approx="erf")
    with torch.no_grad():
        weights = blur(impulse[None, None])[0, 0]
    weights = weights / weights.max()
    min_non_zero = weights[weights != 0].min().item()
    return torch.clamp(weights, min=max(min_non_zero, 1e-3))


@dataclass(frozen=True)
class WindowLayout:
    """Where MONAI's ``sliding_window_inference`` puts its windows on an image of ``image_shape``.

    The image is zero-padded symmetrically (``pad[axis] = (before, after)``) to at least the ROI in every axis;
    ``starts`` (N, 3) are the windows' first voxels in the padded image, in MONAI's visiting order (first axis
    slowest).
    """

    image_shape: tuple[int, int, int]
    padded_shape: tuple[int, int, int]
    pad: tuple[tuple[int, int], ...]
    roi_size: tuple[int, int, int]
    starts: np.ndarray
    interval: tuple[int, int, int] = (1, 1, 1)  # between neighbouring windows' starts

    @classmethod
    def of(cls, image_shape: Sequence[int], roi_size: Sequence[int] = ROI_SIZE, overlap: float = 0.5) -> "WindowLayout":
        image_shape = tuple(int(s) for s in image_shape)
        roi = tuple(int(r) for r in roi_size)
        pad = tuple(((r - s) // 2, (r - s) - (r - s) // 2) if s < r else (0, 0) for s, r in zip(image_shape, roi))
        padded = tuple(max(s, r) for s, r in zip(image_shape, roi))
        roi = tuple(get_valid_patch_size(padded, roi))
        # MONAI's _get_scan_interval: a full-size axis steps by the ROI, others by int(roi * (1 - overlap)) >= 1
        interval = [r if r == s else max(int(r * (1 - overlap)), 1) for r, s in zip(roi, padded)]
        starts = np.asarray(
            [[sl.start for sl in window] for window in dense_patch_slices(padded, roi, interval)], dtype=np.int64
        )
        return cls(image_shape, padded, pad, roi, starts, tuple(interval))  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.starts)

    @property
    def core_inset(self) -> tuple[int, int, int]:
        """Per axis, how far a window's *core* lies inside its sides: the cores of neighbouring windows still meet,
        so every voxel is in some window's core ((roi - interval) // 2; 0 without overlap)."""
        x, y, z = ((r - i) // 2 for r, i in zip(self.roi_size, self.interval))
        return x, y, z

    def touching(self, boxes: Sequence[Box | None], inset: Sequence[int] = (0, 0, 0)) -> np.ndarray:
        """Bool (N,): which windows reach at least one of ``boxes`` (on the unpadded image grid; ``None``: the whole
        image) with the part of the window ``inset`` voxels inside its sides. With ``inset`` 0 every window that
        reaches a voxel of a box is among them, so blending only these windows gives every voxel of the boxes the
        value of the full run; with ``inset`` d, every voxel at least d inside a box."""
        if not boxes or any(b is None for b in boxes):
            return np.ones(len(self.starts), dtype=bool)
        before = np.asarray([p[0] for p in self.pad])
        roi = np.asarray(self.roi_size)
        hit = np.zeros(len(self.starts), dtype=bool)
        for box in boxes:
            assert box is not None
            lo = np.asarray([a for a, _ in box]) + before
            hi = np.asarray([b for _, b in box]) + before
            hit |= np.all((self.starts + inset < hi) & (self.starts + roi - inset > lo), axis=1)
        return hit


def count_windows(spatial_shape: Sequence[int], roi_size: Sequence[int] = ROI_SIZE, overlap: float = 0.5) -> int:
    """Number of windows MONAI's inferer visits for an image of ``spatial_shape`` (after padding to the ROI)."""
    return len(WindowLayout.of(spatial_shape, roi_size, overlap))


def select_autocast(device: torch.device, precision: str = "float32"):
    """Mixed precision (float16) on CUDA; bfloat16 autocast on CPU only when asked; otherwise full precision."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.float16)
    if precision == "bfloat16":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return nullcontext()


# ------------------------------------------------------------------------------------------------ backends
def openvino_available() -> bool:
    """True when the ``openvino`` package can be imported."""
    try:
        import openvino  # noqa: F401
    except Exception:  # a broken install raises more than ImportError
        return False
    return True


def cpu_supports_bfloat16() -> bool:
    """True when this CPU has native bfloat16 arithmetic (AVX512-BF16 or AMX), where bfloat16 pays off."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def resolve_backend(backend: str, device: torch.device, architecture: str = "unet", precision: str = "float32") -> str:
    """Which backend runs the windows. ``UNIVERSALSEG_BACKEND`` (torch, openvino, auto) overrides ``auto``.

    ``auto`` picks OpenVINO on CPU when it is installed and faster there (measured on a 2-core AVX-512 CPU, see
    benchmarks/README.md): the U-Net in float32 (about 1.8x) and bfloat16 (about 4x); Swin UNETR in bfloat16 only
    (about 7x; in float32 OpenVINO is slower than PyTorch for it). Otherwise PyTorch.
    """
    assert backend in BACKENDS, backend  # the request checks it (request.check_setting)
    if backend == "auto":
        backend = os.environ.get("UNIVERSALSEG_BACKEND", "auto").strip().lower() or "auto"
        if backend not in BACKENDS:
            raise ValueError(f"UNIVERSALSEG_BACKEND={backend!r} is not one of {', '.join(BACKENDS)}")
    if backend == "auto":
        faster = architecture == "unet" or precision == "bfloat16"
        return "openvino" if device.type == "cpu" and faster and openvino_available() else "torch"
    if backend == "openvino" and device.type != "cpu":
        raise ValueError("the openvino backend runs on the CPU only; use backend 'torch' (or 'auto') with CUDA")
    if backend == "openvino" and not openvino_available():
        raise ValueError(
            "the openvino backend needs the openvino package: pip install openvino (or use backend 'torch')"
        )
    return backend


def apply_heads_chunked(
    model: UniversalModel,
    global_feature: torch.Tensor,
    head_input: torch.Tensor,
    class_embeddings: torch.Tensor,
    chunk: int = HEAD_CHUNK_VOXELS,
) -> torch.Tensor:
    """The model's per-class heads over a batch of windows, ``chunk`` voxels at a time.

    global_feature (B, 256), head_input (B, 8, D, H, W), class_embeddings (K, 512) -> logits (B, K, D, H, W) float32,
    equal to ``model.apply_heads(head_input, model.head_parameters(global_feature, class_embeddings))``.
    """
    params = model.head_parameters(global_feature, class_embeddings.to(global_feature.device))
    b, c, *spatial = head_input.shape
    flat = head_input.reshape(b, c, -1, 1, 1)
    n = flat.shape[2]
    out = torch.empty((b, params.shape[1], n, 1, 1), dtype=torch.float32, device=head_input.device)
    # Thousands of small operations: on CPU one thread does them fastest, and does not stall in thread barriers when
    # other processes share the cores (two threads measured up to 100x slower on a busy 2-core machine).
    with _torch_threads(1) if head_input.device.type == "cpu" else nullcontext():
        for s in range(0, n, chunk):
            out[:, :, s : s + chunk] = model.apply_heads(flat[:, :, s : s + chunk], params)
    return out.reshape(b, params.shape[1], *spatial)


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op threads, then restore the caller's setting."""
    before = torch.get_num_threads()
    if before == n:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class TorchWindowNetwork:
    """Windows (B, 1, D, H, W) -> logits (B, K, D, H, W) float32 with the PyTorch model on its device."""

    name = "torch"

    def __init__(self, model: UniversalModel, device: torch.device, precision: str = "float32") -> None:
        self.model = model
        self.device = device
        if device.type == "cpu" and precision == "bfloat16":
            # PyTorch's CPU bfloat16 pays off for the U-Net's convolutions only (Swin UNETR gets slower).
            architecture = getattr(getattr(model, "config", None), "architecture", "unet")
            if not cpu_supports_bfloat16() or architecture != "unet":
                logger.info("bfloat16 does not pay off here (CPU or architecture): running in float32")
                precision = "float32"
        self.precision = "float16" if device.type == "cuda" else precision  # CUDA: automatic mixed precision

    def __call__(self, windows: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), select_autocast(self.device, self.precision):
            global_feature, head_input = self.model.encode(windows.to(self.device))
            if self.device.type == "cuda":  # heads in float16 too, as one batched call
                return self.model.apply_heads(
                    head_input, self.model.head_parameters(global_feature, class_embeddings)
                ).float()
        with torch.inference_mode():
            return apply_heads_chunked(self.model, global_feature.float(), head_input.float(), class_embeddings)


# Converted OpenVINO backbones by weights digest: converting takes seconds, and the CLI's batch mode, the Slicer module
# and the tests run the same weights many times in one process. Converted models are also kept on disk (cache_dir()).
# Compiling is fast (well under a second) and the compiled model holds the working memory of an inference (about
# 1.4 GB for the released U-Net), so it is compiled for each run and released after it.
_OPENVINO_MODELS: "OrderedDict[tuple, object]" = OrderedDict()
_OPENVINO_MODELS_MAX = 2


def model_digest(model: UniversalModel) -> str:
    """A digest of the architecture and every weight of ``model`` (changes whenever a weight changes)."""
    h = hashlib.blake2b(digest_size=20)
    h.update(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    for name, tensor in model.state_dict().items():
        array = tensor.detach().to("cpu").contiguous().numpy()
        h.update(f"{name}:{array.dtype}:{array.shape};".encode())
        h.update(array.data)
    return h.hexdigest()


@contextmanager
def _line_wise_norm_statistics(model: torch.nn.Module) -> Iterator[None]:
    """Trace the U-Net's instance statistics as explicit line-wise means (see ``PerSampleBatchNorm3d``)."""
    from .networks.unet3d import PerSampleBatchNorm3d

    norms = [m for m in model.modules() if isinstance(m, PerSampleBatchNorm3d)]
    for m in norms:
        m.line_wise_statistics = True
    try:
        yield
    finally:
        for m in norms:
            m.line_wise_statistics = False


class _EncodeModule(torch.nn.Module):
    def __init__(self, model: UniversalModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.encode(image)


class OpenVINOWindowNetwork:
    """The backbone pass (``model.encode``) compiled with OpenVINO for the CPU; heads in PyTorch.

    One window per inference (batching does not pay on CPU). ``precision``: ``float32`` (results equal PyTorch's up to
    float32 rounding) or ``bfloat16`` (on CPUs with native bfloat16; otherwise float32). The converted model is cached
    in memory and, unless ``disk_cache=False``, under ``cache_dir()/openvino`` (keyed by a digest of the weights).
    """

    name = "openvino"

    def __init__(
        self,
        model: UniversalModel,
        roi_size: Sequence[int],
        precision: str = "float32",
        threads: int | None = None,
        disk_cache: bool = True,
    ) -> None:
        import openvino as ov

        self.model = model
        self.roi_size = tuple(int(r) for r in roi_size)
        core = ov.Core()
        if precision == "bfloat16" and "BF16" not in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
            logger.info("this CPU has no native bfloat16: OpenVINO runs in float32")
            precision = "float32"
        self.precision = precision
        self.threads = int(threads or torch.get_num_threads())
        self.digest = model_digest(model)
        key = (self.digest, self.roi_size)
        converted = _OPENVINO_MODELS.get(key)
        if converted is None:
            converted = _OPENVINO_MODELS[key] = self._load_or_convert(ov, core, disk_cache)
            while len(_OPENVINO_MODELS) > _OPENVINO_MODELS_MAX:
                _OPENVINO_MODELS.popitem(last=False)
        _OPENVINO_MODELS.move_to_end(key)
        self.converted = converted
        self._core = core
        self.compiled = None
        self.request = None
        self._compile()

    def _compile(self) -> None:
        self.compiled = self._core.compile_model(
            self.converted,
            "CPU",
            {
                "INFERENCE_PRECISION_HINT": "bf16" if self.precision == "bfloat16" else "f32",
                "INFERENCE_NUM_THREADS": self.threads,
                "PERFORMANCE_HINT": "LATENCY",
            },
        )

    def _cache_path(self, ov) -> Path | None:
        try:
            from .download import cache_dir

            folder = cache_dir(create=True) / "openvino"
        except Exception:  # no writable cache: convert every time
            return None
        roi = "x".join(str(r) for r in self.roi_size)
        version = ov.get_version().split("-")[0]
        # g2: instance statistics traced line-wise (older cached graphs used OpenVINO's less exact MVN)
        return folder / f"{self.model.config.architecture}-{roi}-{self.digest}-ov{version}-g2.xml"

    def _load_or_convert(self, ov, core, disk_cache: bool):
        path = self._cache_path(ov) if disk_cache else None
        if path is not None and path.is_file() and path.with_suffix(".bin").is_file():
            try:
                return core.read_model(str(path))
            except Exception as exc:  # a damaged cache entry: convert again
                logger.warning("ignoring cached OpenVINO model %s (%s)", path, str(exc).splitlines()[0])
        converted = self._convert(ov)
        if path is not None:
            tmp = path.parent / f".{path.stem}.{os.getpid()}.tmp"
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                # compress_to_fp16=False: keep the float32 weights (the default would round them to float16)
                ov.save_model(converted, str(tmp.with_suffix(".xml")), compress_to_fp16=False)
                tmp.with_suffix(".bin").replace(path.with_suffix(".bin"))
                tmp.with_suffix(".xml").replace(path)
            except OSError as exc:
                logger.warning("could not cache the OpenVINO model in %s (%s)", path.parent, exc)
            finally:
                tmp.with_suffix(".xml").unlink(missing_ok=True)
                tmp.with_suffix(".bin").unlink(missing_ok=True)
        return converted

    def _convert(self, ov):
        import warnings

        model = self.model
        # U-Nets accept any multiple of 8: trace a small window (fast) and set the shape afterwards. Swin UNETR's
        # window partitioning is traced with fixed shapes, so it is traced at the ROI.
        small = model.config.architecture == "unet"
        example = tuple(min(32, r) for r in self.roi_size) if small else self.roi_size
        was_training = model.training
        model.eval()
        try:
            with warnings.catch_warnings(), torch.no_grad(), _line_wise_norm_statistics(model):
                warnings.simplefilter("ignore")  # torch.jit.trace deprecation notices from the converter
                module = _EncodeModule(model)
                if small:
                    converted = ov.convert_model(
                        module,
                        example_input=(torch.zeros((1, 1, *example), device=model.organ_embedding.device),),
                        input=[ov.PartialShape([1, 1, -1, -1, -1])],
                    )
                    converted.reshape({0: [1, 1, *self.roi_size]})
                else:
                    converted = ov.convert_model(
                        module,
                        example_input=(torch.zeros((1, 1, *example), device=model.organ_embedding.device),),
                        input=[ov.PartialShape([1, 1, *example])],
                    )
        finally:
            model.train(was_training)
        return converted

    def release(self) -> None:
        """Free the compiled model and its working memory; the next call compiles again (the converted model stays
        cached)."""
        self.request = None
        self.compiled = None

    def __call__(self, windows: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
        if self.compiled is None:
            self._compile()
        if self.request is None:
            assert self.compiled is not None
            self.request = self.compiled.create_infer_request()
        request = self.request
        features, heads = [], []
        for window in windows:
            result = request.infer({0: np.ascontiguousarray(window[None].detach().cpu().numpy(), dtype=np.float32)})
            features.append(torch.from_numpy(np.array(result[0])))
            heads.append(torch.from_numpy(np.array(result[1])))
        with torch.inference_mode():
            return apply_heads_chunked(self.model, torch.cat(features), torch.cat(heads), class_embeddings.cpu())


# ------------------------------------------------------------------------------------------------ segmenter
class SlidingWindowSegmenter:
    """Run a Universal Model over a whole preprocessed volume in 96^3 windows, blending with Gaussian weights.

    ``__call__(image, class_embeddings)``: image (1, 1, X, Y, Z) in [0, 1], class_embeddings (K, 512)
    -> blended logits (1, K, X, Y, Z) float32 on ``output_device``. ``predict_masks(image, class_embeddings,
    thresholds)`` -> bool (K, X, Y, Z) on the CPU, without holding the logits of the whole volume. Thresholding
    logits at 0 equals thresholding the sigmoid at 0.5 (the published pipeline blends logits, then applies the
    sigmoid).

    ``backend``: ``"torch"`` (default), ``"openvino"`` (CPU) or ``"auto"`` (see :func:`resolve_backend`);
    ``precision``: ``"float32"`` or ``"bfloat16"`` (CPU backbone in bfloat16 where the CPU supports it). After a
    run, ``timings`` holds seconds spent in the network (``network``), in blending and thresholding (``blend``), and
    in preparing the backend (``setup``, e.g. converting the model to OpenVINO).
    """

    def __init__(
        self,
        model: UniversalModel,
        *,
        roi_size: Sequence[int] = ROI_SIZE,
        overlap: float = 0.5,
        sw_batch_size: int = 1,
        device: torch.device | str = "cpu",
        output_device: torch.device | str = "cpu",
        progress: WindowProgress | None = None,
        cancel: Callable[[], bool] | None = None,
        backend: str = "torch",
        precision: str = "float32",
    ) -> None:
        # Checked, with messages for the user, by the request (UniversalSegLib.request.check_setting).
        assert 0.0 <= overlap < 1.0 and sw_batch_size >= 1 and precision in PRECISIONS, (
            overlap,
            sw_batch_size,
            precision,
        )
        self.model = model
        self.roi_size = tuple(int(r) for r in roi_size)
        self.overlap = overlap
        self.sw_batch_size = sw_batch_size
        self.device = torch.device(device)
        self.output_device = torch.device(output_device)
        self.progress = progress
        self.cancel = cancel
        self.precision = precision
        architecture = getattr(getattr(model, "config", None), "architecture", "unet")
        self.backend = resolve_backend(backend, self.device, architecture, precision)
        self.windows_done = 0
        self.windows_run = self.windows_total = 0  # of the last predict_masks (fewer run with boxes)
        self.uncertain: PackedMasks | None = None  # of the last predict_masks, with an uncertain_band
        self.timings: dict[str, float] = {}
        self.accumulate_dtype: torch.dtype | None = None  # of the last predict_masks band
        self._network: TorchWindowNetwork | OpenVINOWindowNetwork | None = None

    @property
    def network(self) -> TorchWindowNetwork | OpenVINOWindowNetwork:
        """The per-window network of the chosen backend (built on first use)."""
        if self._network is None:
            t = perf_counter()
            if self.backend == "openvino":
                self._network = OpenVINOWindowNetwork(self.model, self.roi_size, self.precision)
            else:
                self._network = TorchWindowNetwork(self.model, self.device, self.precision)
            self.timings["setup"] = self.timings.get("setup", 0.0) + perf_counter() - t
        return self._network

    @property
    def effective_precision(self) -> str:
        """The precision the backbone actually runs in (bfloat16 falls back to float32 without CPU support)."""
        return self.network.precision

    def _start(self, total: int) -> None:
        self.windows_done = 0
        self.timings = {"setup": 0.0, "network": 0.0, "blend": 0.0}
        if self.progress is not None:
            self.progress(0, total)
        _ = self.network

    def _run_network(self, windows: torch.Tensor, embeddings: torch.Tensor, total: int) -> torch.Tensor:
        if self.cancel is not None and self.cancel():
            raise Cancelled("segmentation cancelled")
        t = perf_counter()
        logits = self.network(windows, embeddings)
        self.timings["network"] += perf_counter() - t
        self.windows_done += windows.shape[0]
        if self.progress is not None:
            self.progress(self.windows_done, total)
        return logits

    def __call__(self, image: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
        total = count_windows(image.shape[2:], self.roi_size, self.overlap)
        self._start(total)
        embeddings = class_embeddings.to(self.device, torch.float32)

        def predictor(windows: torch.Tensor) -> torch.Tensor:
            return self._run_network(windows, embeddings, total).to(windows.device)

        weights = gaussian_weight_map_monai090(self.roi_size).to(self.device)
        t = perf_counter()
        with torch.inference_mode():
            out = sliding_window_inference(
                image.as_tensor() if hasattr(image, "as_tensor") else image,
                self.roi_size,
                self.sw_batch_size,
                predictor,
                overlap=self.overlap,
                mode="gaussian",
                roi_weight_map=weights,
                padding_mode="constant",
                cval=0.0,
                sw_device=self.device,
                device=self.output_device,
            )
        self.timings["blend"] = perf_counter() - t - self.timings["network"]
        self.release()
        assert isinstance(out, torch.Tensor)  # one predictor output -> one tensor (MONAI's union covers dict/tuple)
        return out

    def release(self) -> None:
        """Free the backend's working memory (OpenVINO's compiled model); the next run prepares it again."""
        if isinstance(self._network, OpenVINOWindowNetwork):
            self._network.release()

    def predict_masks(
        self,
        image: torch.Tensor,
        class_embeddings: torch.Tensor,
        thresholds: float | Sequence[float] = 0.5,
        *,
        stream_axis: int | None = None,
        accumulate_dtype: torch.dtype | None = None,
        boxes: Sequence[Box | None] | None = None,
        uncertain_band: tuple[float, float] | None = None,
    ) -> torch.Tensor:
        """Thresholded masks of K classes: bool (K, X, Y, Z) on the CPU, ``sigmoid(blended logit) > threshold``.

        Blending runs on the GPU when the segmenter's device is CUDA, else on the CPU; the masks always end on the CPU.

        ``image`` (1, 1, X, Y, Z); ``thresholds``: one probability in (0, 1) for all classes or one per class.
        ``stream_axis``: the axis the blending band moves along (default: the longest axis of the padded image,
        which needs the least memory: K x roi x the other two sizes). ``accumulate_dtype``: storage of the band's
        running sums: float32 (the published arithmetic) or float16 (half the memory; each window's sum is added in
        float32 and rounded once: on the released U-Net's 32 classes about 1 voxel in 10^5 changes, Dice >= 0.9999
        per class). Default: float32 while the band fits in ``BAND_FLOAT32_BUDGET`` bytes, else float16.

        ``boxes``: one :data:`Box` per class (``None``: the whole image), where that class's mask is wanted. Only the
        windows whose core reaches a box run (:meth:`WindowLayout.touching` with the layout's ``core_inset``): a
        class's mask equals the full run's bit for bit (the same windows, weights and sums) at least ``core_inset``
        inside its box, is blended from the windows that ran in the rest of the box, and is False outside it.
        ``windows_run`` and ``windows_total`` tell how many windows ran of how many.

        ``uncertain_band`` ``(low, high)``: also keep, as ``uncertain`` (:class:`PackedMasks`), where each class's
        probability lies strictly inside it (where the model is unsure), from the same blended values.
        """
        image = image.as_tensor() if hasattr(image, "as_tensor") else image
        if image.dim() != 5 or image.shape[:2] != (1, 1):
            raise ValueError(f"image must be (1, 1, X, Y, Z), got {tuple(image.shape)}")
        k = int(class_embeddings.shape[0])
        thresholds = [float(thresholds)] * k if isinstance(thresholds, (int, float)) else [float(t) for t in thresholds]
        if len(thresholds) != k:
            raise ValueError(f"{len(thresholds)} thresholds for {k} classes")
        if boxes is not None and len(boxes) != k:
            raise ValueError(f"{len(boxes)} boxes for {k} classes")
        layout = WindowLayout.of(image.shape[2:], self.roi_size, self.overlap)
        axis = int(np.argmax(layout.padded_shape)) if stream_axis is None else int(stream_axis)
        run = np.flatnonzero(layout.touching(boxes or [], layout.core_inset))
        self.windows_total, self.windows_run = len(layout), len(run)
        self._start(len(run))
        embeddings = class_embeddings.to(self.device, torch.float32)
        # Blending happens where the network runs (a GPU blends far faster than the CPU it would wait for).
        work = self.device if self.device.type == "cuda" else torch.device("cpu")
        t_blend = perf_counter()

        volume = image[0, 0].to("cpu", torch.float32)  # a view when already float32 on the CPU
        if any(p != (0, 0) for p in layout.pad):
            volume = F.pad(volume, [v for p in reversed(layout.pad) for v in p], mode="constant", value=0.0)
        if accumulate_dtype is None:
            band_voxels = int(np.prod(layout.padded_shape)) // layout.padded_shape[axis] * layout.roi_size[axis]
            accumulate_dtype = torch.float32 if 4 * k * band_voxels <= BAND_FLOAT32_BUDGET else torch.float16
        self.accumulate_dtype = accumulate_dtype
        band = _BlendBand(layout, axis, layout.starts[run], thresholds, accumulate_dtype, work, uncertain_band)

        # MONAI's order within each band position (of the windows that run)
        order = run[np.argsort(layout.starts[run, axis], kind="stable")]
        groups = np.split(order, np.flatnonzero(np.diff(layout.starts[order, axis])) + 1) if len(order) else []
        with torch.inference_mode():
            for group in groups:
                band.move_to(int(layout.starts[group[0], axis]))
                for first in range(0, len(group), self.sw_batch_size):
                    batch = group[first : first + self.sw_batch_size]
                    windows = torch.stack([volume[_window_slices(layout.starts[i], layout.roi_size)] for i in batch])[
                        :, None
                    ]
                    logits = self._run_network(windows, embeddings, len(run)).to(work, torch.float32)
                    for n, i in enumerate(batch):
                        band.add(layout.starts[i], logits[n])
            del volume
            masks = band.finish()  # frees the band's sums before unpacking
        self.uncertain = band.packed_masks(band.uncertain) if band.uncertain is not None else None
        del band
        self.release()
        for c, box in enumerate(boxes or []):
            if box is not None:  # outside its box a class saw only some of its windows
                region = (c,) + tuple(slice(a, b) for a, b in box)
                inside = masks[region].copy()
                masks[c] = False
                masks[region] = inside
                if self.uncertain is not None:
                    self.uncertain.clip(c, box)
        self.timings["blend"] = perf_counter() - t_blend - self.timings["network"]
        return torch.from_numpy(masks)


@dataclass
class PackedMasks:
    """K bool masks stored 1 bit per voxel (``np.packbits`` along spatial ``axis``; ``count`` voxels on it)."""

    packed: np.ndarray  # uint8 (K, ...)
    axis: int
    count: int

    def __len__(self) -> int:
        return int(self.packed.shape[0])

    def __getitem__(self, c: int) -> np.ndarray:
        """Mask ``c``, bool (X, Y, Z)."""
        return np.unpackbits(self.packed[c], axis=self.axis, count=self.count).view(np.bool_)

    def unpack(self) -> np.ndarray:
        """All masks, bool (K, X, Y, Z)."""
        return np.unpackbits(self.packed, axis=self.axis + 1, count=self.count).view(np.bool_)

    def clip(self, c: int, box: "Box") -> None:
        """Clear mask ``c`` outside ``box``."""
        mask = self[c]
        region = tuple(slice(a, b) for a, b in box)
        kept = np.zeros_like(mask)
        kept[region] = mask[region]
        self.packed[c] = np.packbits(kept, axis=self.axis)


class _BlendBand:
    """MONAI's Gaussian blending, one window-thick band at a time (:meth:`SlidingWindowSegmenter.predict_masks`).

    ``sums`` (K, band) holds the weighted logits of the planes [start, start + roi) of the padded volume along
    ``axis``; windows are added in MONAI's order, and when the band moves on, the planes it leaves are final: their
    ``sigmoid(sum(w * logit) / sum(w)) > threshold`` is stored bit-packed (1 bit per voxel, along ``pack_axis``, an
    axis the band does not move along). ``starts``: the first voxels (padded) of the windows that run; the count map
    sums their weights. float16 ``sums`` add each window in float32 and round once.
    """

    def __init__(
        self,
        layout: WindowLayout,
        axis: int,
        starts: np.ndarray,
        thresholds: Sequence[float],
        dtype: torch.dtype,
        device: torch.device,
        uncertain_band: tuple[float, float] | None = None,
    ) -> None:
        self.layout, self.axis, self.starts, self.thresholds = layout, axis, starts, list(thresholds)
        self.uncertain_band = uncertain_band
        self.roi_axis = layout.roi_size[axis]
        self.weights = gaussian_weight_map_monai090(layout.roi_size).to(device)
        self.device = device
        shape = list(layout.padded_shape)
        shape[axis] = self.roi_axis
        self.sums = torch.zeros((len(self.thresholds), *shape), dtype=dtype, device=device)
        self.exact = dtype == torch.float32
        self.start = 0  # padded coordinate of the band's first plane
        self.pack_axis = 2 if axis != 2 else 1
        packed = list(layout.image_shape)
        packed[self.pack_axis] = (packed[self.pack_axis] + 7) // 8
        self.packed = np.zeros((len(self.thresholds), *packed), dtype=np.uint8)
        self.uncertain = np.zeros_like(self.packed) if uncertain_band is not None else None

    def add(self, start: np.ndarray, logits: torch.Tensor) -> None:
        """Add one window's logits (K, *roi), float32, whose first voxel (padded) is ``start``; modifies ``logits``."""
        local = start.copy()
        local[self.axis] -= self.start
        # MONAI: buffer *= weights, output[window] += buffer (same float32 operations)
        target = self.sums[(slice(None),) + _window_slices(local, self.layout.roi_size)]
        weighted = logits.mul_(self.weights)
        if self.exact:
            target += weighted
        else:  # class by class keeps the float32 temporaries small
            for c in range(len(self.thresholds)):
                target[c].copy_(target[c].float() + weighted[c])

    def move_to(self, new_start: int) -> None:
        """Move the band's first plane to ``new_start``, thresholding the planes it leaves."""
        d = new_start - self.start
        if d <= 0:
            return
        self._finalize(new_start)
        keep = self.roi_axis - d
        for i in range(max(keep, 0)):  # plane by plane, front to back: source planes are read before overwritten
            self.sums.select(self.axis + 1, i).copy_(self.sums.select(self.axis + 1, i + d))
        self.sums.narrow(self.axis + 1, max(keep, 0), min(d, self.roi_axis)).zero_()
        self.start = new_start

    def finish(self) -> np.ndarray:
        """Threshold what is left and return the masks, bool (K, X, Y, Z) on the unpadded grid."""
        self._finalize(self.layout.padded_shape[self.axis])
        del self.sums
        return self.packed_masks(self.packed).unpack()

    def packed_masks(self, packed: np.ndarray) -> "PackedMasks":
        return PackedMasks(packed, self.pack_axis, self.layout.image_shape[self.pack_axis])

    def _weight_sum(self, a: int, b: int) -> torch.Tensor:
        """MONAI's count map (sum of the window weights) over the padded planes [a, b), in MONAI's window order."""
        axis, roi_axis, layout = self.axis, self.roi_axis, self.layout
        shape = list(layout.padded_shape)
        shape[axis] = b - a
        total = torch.zeros(shape, dtype=torch.float32, device=self.device)
        for start in self.starts:
            lo = int(start[axis])
            if lo >= b or lo + roi_axis <= a:
                continue
            target = list(_window_slices(start, layout.roi_size))
            target[axis] = slice(max(lo, a) - a, min(lo + roi_axis, b) - a)
            source = [slice(None)] * 3
            source[axis] = slice(max(lo, a) - lo, min(lo + roi_axis, b) - lo)
            total[tuple(target)] += self.weights[tuple(source)]
        return total

    def _finalize(self, stop: int) -> None:
        """Threshold the planes [start, stop) of the band into ``packed``."""
        axis, layout = self.axis, self.layout
        # planes past the band were reached by no window that ran (a gap in the boxes): their masks stay False
        lo, hi = self.start, min(stop, self.start + self.roi_axis)
        # the part of [lo, hi) inside the unpadded image, in padded coordinates
        before = layout.pad[axis][0]
        a, b = max(lo, before), min(hi, before + layout.image_shape[axis])
        if a >= b:
            return
        den = self._weight_sum(a, b)
        inner = [slice(p[0], p[0] + s) for p, s in zip(layout.pad, layout.image_shape)]
        inner[axis] = slice(None)
        target = [slice(None)] * 3
        target[axis] = slice(a - before, b - before)
        for c, threshold in enumerate(self.thresholds):
            num = self.sums[c].narrow(axis, a - lo, b - a).float()
            # The published rule on MONAI's blended output: sigmoid(sum(w * logit) / sum(w)) > threshold.
            probability = torch.sigmoid(num / den)[tuple(inner)]
            self.packed[c][tuple(target)] = np.packbits((probability > threshold).cpu().numpy(), axis=self.pack_axis)
            if self.uncertain is not None and self.uncertain_band is not None:
                low, high = self.uncertain_band
                unsure = ((probability > low) & (probability < high)).cpu().numpy()
                self.uncertain[c][tuple(target)] = np.packbits(unsure, axis=self.pack_axis)


def _window_slices(start: Sequence[int], roi_size: Sequence[int]) -> tuple[slice, ...]:
    return tuple(slice(int(s), int(s) + int(r)) for s, r in zip(start, roi_size))
