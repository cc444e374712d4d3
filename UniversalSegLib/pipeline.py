"""The segmentation engine: CT in, per-class masks on the input grid out.

One code path for the CLI, the Slicer module, scripts and benchmarks::

    from UniversalSegLib import segment
    result = segment("ct.nii.gz", classes="liver,spleen")
    result.label_image()   # SimpleITK multi-label map on the input grid
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from .catalog import ClassCatalog, ClassInfo, model_class_indices, rows_for
from .checkpoints import load_model, resolve_device
from .errors import ClassNameError, InputError, UniversalSegError
from .imageio import check_ct_intensities, read_image
from .inferer import ROI_SIZE, Cancelled, PackedMasks, SlidingWindowSegmenter, WindowLayout
from .networks.universal_model import UniversalModel
from .postprocess import (
    LARGEST_COMPONENT_CLASSES,
    PostprocessOptions,
    dependencies,
    postprocess,
    steps_for_model,
)
from .preprocessing import HU_WINDOW, TARGET_SPACING_MM, Preprocessed, preprocess
from .progress import STAGES, Progress, ProgressCallback
from .region import RegionReport, locate, margin_voxels, predict_masks_in_boxes, worth_it
from .request import PRESETS, check_setting
from .result import CroppedMask, ImageGeometry, SegmentationResult
from .uncertainty import UNCERTAIN_BAND, summarise_uncertainty

DEFAULT_OVERLAP = 0.5


NOT_ENOUGH_GPU_MEMORY = "not enough GPU memory for this scan; try fewer classes, --window-batch 1, or --device cpu"
NOT_ENOUGH_MEMORY = "not enough memory for this scan; try fewer classes, or a machine with more memory"


def is_out_of_memory(exc: BaseException | None) -> bool:
    """True for allocation failures (NumPy's MemoryError, PyTorch's CPU allocator RuntimeError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:  # MONAI wraps transform errors: look through the chain
        seen.add(id(exc))
        if isinstance(exc, MemoryError):
            return True
        text = str(exc)
        if isinstance(exc, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower()):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


@contextmanager
def memory_errors_as_input_errors() -> Iterator[None]:
    """Turn allocation failures inside the block into one InputError saying what to do (GPU or CPU memory)."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        raise InputError(NOT_ENOUGH_GPU_MEMORY) from None
    except (MemoryError, RuntimeError) as exc:
        if is_out_of_memory(exc):
            raise InputError(NOT_ENOUGH_MEMORY) from None
        raise


@dataclass
class SegmentationOptions:
    """How to run the engine (built from a :class:`~UniversalSegLib.request.SegmentationRequest` by its
    ``to_options``, or directly by scripts). ``overlap=None`` means 0.5 (also with ``fast``); ``precision=None`` or
    ``"auto"`` means float32, or bfloat16 with ``fast`` (the request's preset, ``request.PRESETS``). The values are
    checked with the request's checks (:func:`~UniversalSegLib.request.check_setting`)."""

    overlap: float | None = None
    sw_batch_size: int = 1
    device: str = "auto"
    fast: bool = False
    threshold: float = 0.5
    class_thresholds: dict[int, float] = field(default_factory=dict)
    postprocess: PostprocessOptions = field(default_factory=PostprocessOptions)
    force: bool = False
    frame: int | None = None
    spacing: tuple[float, float, float] | None = None  # None: the model's (see model_preprocessing)
    backend: str = "auto"  # what runs the windows: auto, torch or openvino (see inferer.resolve_backend)
    precision: str | None = None  # of the backbone: auto, float32 or bfloat16 (where the CPU has it natively)
    region: bool = True  # full-resolution windows only where the requested classes are (UniversalSegLib.region)

    @property
    def effective_overlap(self) -> float:
        if self.overlap is not None:
            return self.overlap
        return float(PRESETS["fast"].get("overlap", DEFAULT_OVERLAP)) if self.fast else DEFAULT_OVERLAP

    @property
    def effective_precision(self) -> str:
        if self.precision not in (None, "auto"):
            return self.precision
        return str(PRESETS["fast"].get("precision", "float32")) if self.fast else "float32"

    def validate(self) -> None:
        check_setting("overlap", self.effective_overlap)
        check_setting("backend", self.backend)
        check_setting("precision", self.effective_precision)
        check_setting("window_batch", self.sw_batch_size)
        check_setting("threshold", self.threshold)
        for index, t in self.class_thresholds.items():
            check_setting("threshold", t, f" for class {index}")


@dataclass(frozen=True)
class ModelPreprocessing:
    """The grid a model was trained on: voxel spacing (mm), HU window and sliding-window size (voxels).

    Official checkpoints use the published 1.5 mm, [-175, 250] HU and 96^3 windows; a checkpoint trained by
    ``universalseg-train`` records its own in the metadata entry ``preprocessing`` (e.g. the bundled model: 3 mm, 64^3),
    and the engine preprocesses and inverts with those for that model only."""

    spacing_mm: tuple[float, float, float] = TARGET_SPACING_MM
    hu_window: tuple[float, float] = HU_WINDOW
    roi_size: tuple[int, int, int] = ROI_SIZE


def _triple(values: Iterable[float]) -> tuple[float, float, float]:
    """Three floats (a spacing) from any sequence of three numbers; ValueError for another length."""
    x, y, z = (float(v) for v in values)
    return x, y, z


def model_preprocessing(model: UniversalModel) -> ModelPreprocessing:
    """The model's :class:`ModelPreprocessing`, from ``model.metadata["preprocessing"]`` when present."""
    meta = (getattr(model, "metadata", None) or {}).get("preprocessing") or {}
    try:
        spacing = tuple(float(v) for v in meta.get("spacing_mm", TARGET_SPACING_MM))
        window = tuple(float(v) for v in meta.get("hu_window", HU_WINDOW))
        roi = tuple(int(v) for v in meta.get("roi_size", ROI_SIZE))
    except (TypeError, ValueError):
        raise InputError(f"model metadata 'preprocessing' is malformed: {meta!r}") from None
    if (
        len(spacing) != 3
        or min(spacing) <= 0
        or len(window) != 2
        or window[0] >= window[1]
        or len(roi) != 3
        or min(roi) < 16
    ):
        raise InputError(f"model metadata 'preprocessing' is out of range: {meta!r}")
    return ModelPreprocessing(spacing, window, roi)


def select_classes(
    classes: str | int | Iterable[str | int] | None, catalog: ClassCatalog, available: Iterable[int] | None = None
) -> list[int]:
    """Catalog indices for ``"all"``, ``"liver,spleen"``, names, or indices. Unknown names raise ClassNameError.

    ``"all"`` means ``available`` (the classes a model knows) when given, else every catalog class."""
    if classes is None:
        return []
    if isinstance(classes, int):
        classes = [classes]
    if isinstance(classes, str):
        classes = [c for c in classes.split(",") if c.strip()]
    indices: set[int] = set()
    for item in classes:
        if isinstance(item, (int, np.integer)):
            indices.add(catalog[int(item)].index)
        elif str(item).strip().lower() == "all":
            indices.update(available if available is not None else (c.index for c in catalog))
        else:
            indices.add(catalog.lookup(str(item).strip()).index)
    return sorted(indices)


def _stage(progress: ProgressCallback | None, stage: str, done: int | None = None, total: int | None = None) -> None:
    if progress is not None:
        progress(Progress.at(stage, done, total))


def _model_channels(model: UniversalModel, wanted: Sequence[int], catalog: ClassCatalog) -> dict[int, int]:
    """Map catalog index -> row of the model's class embeddings, for every wanted class (:func:`catalog.rows_for`;
    ClassNameError for a class the model was not trained for)."""
    return dict(zip(wanted, rows_for(model, wanted, catalog)))


class Engine:
    """A loaded model plus options, reusable across many scans (the CLI's batch mode keeps one)."""

    def __init__(
        self,
        model: UniversalModel | str | Path | None = None,
        options: SegmentationOptions | None = None,
        *,
        accept_licence: bool = False,
        download_progress: Callable[[int, int | None], None] | None = None,
    ) -> None:
        self.options = options or SegmentationOptions()
        self.options.validate()
        self.device = resolve_device(self.options.device)
        if isinstance(model, UniversalModel):
            self.model = model.to(self.device).eval()
        else:
            self.model = load_model(
                model, device=self.device, accept_licence=accept_licence, download_progress=download_progress
            )
        self.catalog = ClassCatalog.default()

    def postprocess_options(self, options: PostprocessOptions | None = None) -> PostprocessOptions:
        """``options`` (default: the engine's) less the steps this model cannot run (see ``steps_for_model``)."""
        return steps_for_model(self.available_classes(), options or self.options.postprocess)

    def available_classes(self) -> list[int]:
        """Catalog indices of the classes this model was trained for (all 32 for the official models)."""
        return sorted(i for i in model_class_indices(self.model, self.catalog, strict=False) if i is not None)

    def segment(
        self,
        image_or_path: sitk.Image | str | Path,
        classes: str | Iterable[str | int] | None = "all",
        *,
        extra_embeddings: dict[str, torch.Tensor] | None = None,
        prompt_report: list | None = None,
        progress: ProgressCallback | None = None,
        cancel: Callable[[], bool] | None = None,
        input_path: str | Path | None = None,
    ) -> SegmentationResult:
        """Segment one CT. ``classes``: catalog names/indices or "all"; ``extra_embeddings``: experimental free-text
        classes (text -> 512-d CLIP embedding), returned with indices above the catalog's. ``input_path`` names the
        source in the summary when an already-read image is given."""
        with memory_errors_as_input_errors():
            prediction = self.predict(
                image_or_path,
                classes,
                extra_embeddings=extra_embeddings,
                progress=progress,
                cancel=cancel,
                input_path=input_path,
            )
            return self.finish(prediction, prompt_report=prompt_report, progress=progress, cancel=cancel)

    def predict(
        self,
        image_or_path: sitk.Image | str | Path,
        classes: str | Iterable[str | int] | None = "all",
        *,
        extra_embeddings: dict[str, torch.Tensor] | None = None,
        progress: ProgressCallback | None = None,
        cancel: Callable[[], bool] | None = None,
        input_path: str | Path | None = None,
    ) -> "Prediction":
        """Read, preprocess, run the windows and threshold: masks on the preprocessed grid, before post-processing."""
        opts = self.options
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        _stage(progress, "read")
        input_path = str(input_path) if input_path is not None else None
        if isinstance(image_or_path, sitk.Image):
            image = image_or_path
        else:
            input_path = str(image_or_path)
            image = read_image(image_or_path, frame=opts.frame)
        check_ct_intensities(image, force=opts.force, name=input_path or "the input")
        timings["read"] = time.perf_counter() - t0

        requested = select_classes(classes, self.catalog, self.available_classes())
        extra = dict(extra_embeddings or {})
        if not requested and not extra:
            raise InputError(
                "no classes to segment; name classes (e.g. --classes liver,spleen or --classes all) or give a --prompt"
            )
        needed = sorted(set(requested) | dependencies(requested, self.postprocess_options()))
        rows = _model_channels(self.model, needed, self.catalog)
        embeddings = [self.model.class_embeddings[rows[i]] for i in needed]
        extra_indices = {}
        for n, (text, emb) in enumerate(extra.items()):
            extra_indices[len(self.catalog) + 1 + n] = text
            embeddings.append(
                torch.as_tensor(emb, dtype=torch.float32, device=self.model.organ_embedding.device).reshape(-1)
            )
        channel_classes = needed + list(extra_indices)

        t = time.perf_counter()
        _stage(progress, "preprocess")
        grid = model_preprocessing(self.model)
        spacing = _triple(opts.spacing) if opts.spacing is not None else grid.spacing_mm
        pre = preprocess(image, spacing=spacing, hu_window=grid.hu_window)
        timings["preprocess"] = time.perf_counter() - t

        t = time.perf_counter()
        overlap = opts.effective_overlap  # checked when the engine was made (Engine.__init__)
        try:
            segmenter = SlidingWindowSegmenter(
                self.model,
                roi_size=grid.roi_size,
                overlap=overlap,
                sw_batch_size=opts.sw_batch_size,
                device=self.device,
                progress=(lambda done, total: _stage(progress, "windows", done, total)) if progress else None,
                cancel=cancel,
                backend=opts.backend,  # auto: OpenVINO on the CPU when installed (about 1.7x faster), else PyTorch
                precision=opts.effective_precision,  # bfloat16: the backbone in bfloat16 where the CPU has it
            )
        except ValueError as exc:  # a backend that cannot run here (openvino with CUDA or not installed)
            raise InputError(str(exc)) from None
        # Published rule: a voxel belongs to the class when sigmoid(blended logit) is strictly above the threshold.
        # The segmenter thresholds slab by slab, never holding float maps of the whole volume.
        thresholds = [opts.class_thresholds.get(index, opts.threshold) for index in channel_classes]
        volume, class_embeddings = pre.image[None], torch.stack(embeddings)
        layout = WindowLayout.of(pre.shape, grid.roi_size, overlap)
        region = self._plan_region(layout, volume, class_embeddings, channel_classes, spacing, cancel)
        if region.used:
            boxes = [region.boxes[index] for index in channel_classes]
            run = predict_masks_in_boxes(
                segmenter,
                volume,
                class_embeddings,
                thresholds,
                boxes,
                margin_voxels(layout, spacing),
                uncertain_band=UNCERTAIN_BAND,
            )
            stacked, region.windows_run, network = run.masks, run.windows, run.network_seconds
            region.boxes = dict(zip(channel_classes, run.boxes))
            region.regrown = [channel_classes[c] for c in run.regrown]
        else:
            stacked = segmenter.predict_masks(volume, class_embeddings, thresholds, uncertain_band=UNCERTAIN_BAND)
            region.windows_run, network = segmenter.windows_run, segmenter.timings.get("network", 0.0)
        masks: dict[int, np.ndarray] = {
            index: stacked[channel].numpy() for channel, index in enumerate(channel_classes)
        }
        del stacked
        timings["windows"] = time.perf_counter() - t
        # Parts of the windows stage, for the summary (not added to the total).
        timings["windows_network"] = network
        timings["windows_setup"] = segmenter.timings.get("setup", 0.0)
        timings["windows_locate"] = region.seconds
        return Prediction(
            image_geometry=ImageGeometry.of(image),
            preprocessed=pre,
            masks=masks,
            requested=requested,
            computed=needed,
            experimental=extra_indices,
            overlap=overlap,
            windows=len(layout),
            region=region,
            uncertain=segmenter.uncertain,
            channels=channel_classes,
            spacing=spacing,
            roi_size=grid.roi_size,
            timings=timings,
            input_path=input_path,
            backend=segmenter.backend,
            precision=segmenter.effective_precision,
            accumulation=str(segmenter.accumulate_dtype).replace("torch.", ""),
        )

    def _plan_region(
        self,
        layout: WindowLayout,
        volume: torch.Tensor,
        class_embeddings: torch.Tensor,
        channel_classes: Sequence[int],
        spacing: Sequence[float],
        cancel: Callable[[], bool] | None,
    ) -> RegionReport:
        """Whether the region step runs, and with which boxes (by class index; see UniversalSegLib.region).
        ``channel_classes``: the class index of each row of ``class_embeddings`` (experimental ones included)."""
        report = RegionReport(False, "", windows_full=len(layout))
        if not self.options.region:
            report.reason = "switched off (--no-roi)"
        elif len(channel_classes) > len(self.catalog) // 2:
            report.reason = "more than half the catalog's classes are computed (together they span the trunk)"
        elif len(layout) <= 2:
            report.reason = "the scan is only one or two windows"
        if report.reason:
            return report
        post = self.postprocess_options()
        keeps_largest = set(LARGEST_COMPONENT_CLASSES) if post.enabled and post.largest_component else set()
        t = time.perf_counter()
        boxes, report.locate_windows = locate(
            self.model,
            volume,
            class_embeddings,
            margin_voxels(layout, spacing),
            roi_size=layout.roi_size,
            keeps_largest=[c in keeps_largest for c in channel_classes],
            device=self.device,
            backend=self.options.backend,
            cancel=cancel,
        )
        report.seconds = time.perf_counter() - t
        report.boxes = dict(zip(channel_classes, boxes))
        if worth_it(layout, boxes):
            report.used, report.reason = True, "the requested classes were located"
        else:
            report.reason = "the requested classes reach most of the scan"
        return report

    def finish(
        self,
        prediction: "Prediction",
        *,
        postprocess_options: PostprocessOptions | None = None,
        prompt_report: list | None = None,
        progress: ProgressCallback | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> SegmentationResult:
        """Post-process a prediction (in the preprocessed grid, as published) and bring the requested classes back
        to the input grid. ``prediction`` is not modified, so it can be finished with other options again."""
        opts = self.options
        post_opts = self.postprocess_options(postprocess_options)
        timings = dict(prediction.timings)
        catalog_size = len(self.catalog)
        t = time.perf_counter()
        _stage(progress, "postprocess")
        masks = dict(prediction.masks)
        masks.update(postprocess({i: m for i, m in masks.items() if i <= catalog_size}, post_opts))
        outputs = prediction.requested + list(prediction.experimental)
        t_uncertainty = time.perf_counter()
        uncertainty: dict[int, dict] = {}
        if prediction.uncertain is not None:  # on the final masks, in the model's grid (part of this stage)
            for index in outputs:
                uncertainty[index] = summarise_uncertainty(
                    masks[index],
                    prediction.uncertain[prediction.channels.index(index)],
                    prediction.spacing,
                    prediction.preprocessed.image.affine.numpy(),
                )
        timings["postprocess_uncertainty"] = time.perf_counter() - t_uncertainty
        timings["postprocess"] = time.perf_counter() - t

        t = time.perf_counter()
        cropped: dict[int, CroppedMask] = {}
        for n, index in enumerate(outputs):
            if cancel is not None and cancel():
                raise Cancelled("segmentation cancelled")
            _stage(progress, "resample", n, len(outputs))
            # Nearest-neighbour inversion by per-axis index maps, straight to the mask's bounding box. Popping the
            # mask frees post-processed copies as the results grow (the prediction keeps its own masks).
            start, box = prediction.preprocessed.invert_mask_box(masks.pop(index))
            cropped[index] = CroppedMask(start, box)
        masks.clear()
        timings["resample"] = time.perf_counter() - t
        timings["total"] = sum(v for k, v in timings.items() if k in STAGES)
        _stage(progress, "resample", len(outputs) or 1, len(outputs) or 1)  # the run's end: "done"

        extra_classes = {
            index: _experimental_class(index, text, self.catalog) for index, text in prediction.experimental.items()
        }
        meta = self.model.metadata
        return SegmentationResult(
            geometry=prediction.image_geometry,
            masks=cropped,
            catalog=self.catalog,
            model_name=str(meta.get("name", meta.get("source", ""))),
            model_licence=str(meta.get("licence", "")),
            device=str(self.device),
            timings=timings,
            settings={
                "overlap": prediction.overlap,
                "fast": opts.fast,
                "window_batch": opts.sw_batch_size,
                "backend": prediction.backend,
                "precision": prediction.precision,
                "blend_accumulation": prediction.accumulation,
                "threshold": opts.threshold,
                "class_thresholds": {str(k): v for k, v in opts.class_thresholds.items()},
                "postprocess": asdict(post_opts),
                "spacing_mm": list(prediction.spacing),
                "window_size": list(prediction.roi_size),
                "preprocessed_shape": list(prediction.preprocessed.shape),
                "windows": prediction.windows,
                "region": prediction.region.to_json(),
                "computed_classes": prediction.computed,
            },
            prompt_report=list(prompt_report or []),
            experimental=dict(prediction.experimental),
            extra_classes=extra_classes,
            input_path=prediction.input_path,
            uncertainty=uncertainty,
        )


@dataclass
class Prediction:
    """Thresholded masks on the preprocessed grid (bool (X, Y, Z), RAS, the model's spacing, cropped), before
    post-processing."""

    image_geometry: ImageGeometry
    preprocessed: Preprocessed
    masks: dict[int, np.ndarray]
    requested: list[int]
    computed: list[int]
    experimental: dict[int, str]
    overlap: float
    windows: int
    timings: dict[str, float]
    input_path: str | None = None
    backend: str = "torch"  # what ran the windows: "torch" or "openvino"
    precision: str = "float32"  # of the backbone: "float32" or "bfloat16" (CPU, --fast)
    accumulation: str = "float32"  # storage of the blending band: "float16" for large class x volume products
    spacing: tuple[float, float, float] = TARGET_SPACING_MM  # of the preprocessed grid (mm)
    roi_size: tuple[int, int, int] = ROI_SIZE  # sliding-window size (voxels)
    region: RegionReport = field(default_factory=lambda: RegionReport(False, "not planned"))
    uncertain: PackedMasks | None = None  # per channel: probability inside UNCERTAIN_BAND
    channels: list[int] = field(default_factory=list)  # class index of each channel of ``uncertain``


def _experimental_class(index: int, text: str, catalog: ClassCatalog) -> ClassInfo:
    """A stand-in catalog entry for a free-text class fed straight to the controller (experimental)."""
    stem = "".join(ch if ch.isalnum() else "_" for ch in text.lower()).strip("_")
    return ClassInfo(
        index=index,
        name=f"{text} (experimental)",
        prompt_name=text,
        file_stem=f"experimental_{stem}",
        kind="organ",
        synonyms=(),
        parents=(),
        laterality=None,
        color=(255, 255, 0),
        category=catalog[1].category,
        type=catalog[1].type,
        type_modifier=None,
        anatomic_region=None,
    )


def resolve_prompts(
    texts: str | Sequence[str],
    model: UniversalModel | None = None,
    *,
    allow_experimental: bool = False,
    use_clip: bool = True,
):
    """Resolve free-text prompts for ``model`` (its class embeddings feed the CLIP step).

    The catalog steps (exact, synonym, group, fuzzy) run first; only when an item is left over is the CLIP text
    encoder loaded (downloaded on first use). Returns ``(PromptResolution, note)``; ``note`` says why CLIP could not
    help (e.g. offline), or is None.
    """
    from .errors import DownloadError
    from .prompts import resolve_prompt

    resolution = resolve_prompt(texts)
    if not use_clip or not (resolution.rejected):
        return resolution, None
    try:
        from .text_encoder import ClipTextEncoder

        encoder = ClipTextEncoder.pretrained()
    except (DownloadError, UniversalSegError) as exc:
        return resolution, f"CLIP text matching is unavailable ({exc})"
    embeddings = None  # a model without every catalog class: compare with the catalog's own CLIP embeddings
    if model is not None:
        catalog = ClassCatalog.default()
        indices = model_class_indices(model, catalog, strict=False)
        if sorted(i for i in indices if i is not None) == [c.index for c in catalog]:
            embeddings = (
                model.class_embeddings.detach().float().cpu()[rows_for(model, range(1, len(catalog) + 1), catalog)]
            )
    return resolve_prompt(
        texts, encoder=encoder, class_embeddings=embeddings, allow_experimental=allow_experimental
    ), None


def segment(
    image_or_path: sitk.Image | str | Path,
    classes: str | Iterable[str | int] | None = None,
    *,
    prompt: str | Sequence[str] | None = None,
    allow_experimental: bool = False,
    model: UniversalModel | str | Path | None = None,
    options: SegmentationOptions | None = None,
    accept_licence: bool = False,
    progress: ProgressCallback | None = None,
    cancel: Callable[[], bool] | None = None,
    **option_overrides,
) -> SegmentationResult:
    """Segment one CT with one call.

    ``classes``: catalog names/indices, ``"liver,spleen"`` or ``"all"``; ``prompt``: free text such as
    ``"IVC and both kidneys"`` (combines with ``classes``; with neither, all classes). The prompt's resolution is in
    ``result.prompt_report``; unrecognised prompt items raise :class:`ClassNameError` unless ``allow_experimental``.
    ``option_overrides`` are :class:`SegmentationOptions` fields (overlap, fast, device, ...).
    """
    options = options or SegmentationOptions(**option_overrides)
    engine = Engine(model, options, accept_licence=accept_licence)
    wanted = select_classes(classes, engine.catalog, engine.available_classes())
    report: list = []
    extra: dict[str, torch.Tensor] = {}
    if prompt:
        resolution, note = resolve_prompts(prompt, engine.model, allow_experimental=allow_experimental)
        if resolution.rejected:
            raise ClassNameError(
                "prompt not understood: "
                + "; ".join(resolution.describe().splitlines())
                + (f" ({note})" if note else "")
            )
        report = resolution.to_json()["items"]
        wanted = sorted(set(wanted) | set(resolution.classes))
        extra = {item.text: torch.tensor(item.embedding) for item in resolution.experimental}
    elif classes is None:
        wanted = engine.available_classes()
    return engine.segment(
        image_or_path, wanted, extra_embeddings=extra, prompt_report=report, progress=progress, cancel=cancel
    )


__all__ = [
    "Engine",
    "Prediction",
    "SegmentationOptions",
    "segment",
    "select_classes",
    "resolve_prompts",
    "Cancelled",
    "UniversalSegError",
]
