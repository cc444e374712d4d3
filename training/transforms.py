"""Training transforms: the inference preprocessing on image + label, then augmentation (MONAI dictionary transforms).

Deterministic part (cached, :func:`preprocessing_transforms`): read the CT and its labels ->
orientation RAS -> resample to the engine's spacing (image bilinear, labels nearest) -> HU window scaled to [0, 1]
-> crop to the body (voxels above the window's low end) -> pad to at least the crop size -> foreground/background voxel
indices for balanced cropping. These are the dictionary versions of the transforms in
:func:`UniversalSegLib.preprocessing.build_preprocessing`, with the same constants.

Random part (:func:`augmentation_transforms`): ``num_samples`` crops centred on labelled / unlabelled body voxels
(``RandCropByPosNegLabeld``, or with ``crop_centres: classes`` on a voxel of a class drawn uniformly among the case's
labelled classes, :class:`RandCropByClassd`) -> encoded labels to one channel per model class (:class:`ClassTargetsd`)
-> flips that keep laterality right (:class:`RandFlipLateralityd`) -> small rotations -> zoom -> per-organ intensity
offsets (:class:`RandOrganIntensityd`) -> another contrast phase per enhancing organ (:class:`RandOrganPhased`) ->
gamma contrast -> intensity scale/shift.

Sample layout after augmentation: ``image`` (1, X, Y, Z) float32 in about [0, 1], RAS axes; ``label`` (K, X, Y, Z)
uint8, one channel per model class; ``annotated`` (K,) bool, which of those channels this case annotates.
"""

from __future__ import annotations

import math
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    CastToTyped,
    Compose,
    CropForegroundd,
    EnsureTyped,
    FgBgToIndicesd,
    MapTransform,
    Orientationd,
    RandAdjustContrastd,
    RandCropByPosNegLabeld,
    Randomizable,
    RandRotated,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandZoomd,
    ScaleIntensityRanged,
    Spacingd,
    SpatialPadd,
)

from UniversalSegLib.catalog import ClassCatalog
from UniversalSegLib.imageio import read_image
from UniversalSegLib.preprocessing import HU_WINDOW, TARGET_SPACING_MM, sitk_to_metatensor

from .datasets import read_case_labels


class LoadCased(MapTransform):
    """Read a case dict (from :meth:`training.datasets.CaseSpec.to_data`) into tensors.

    Output: ``image`` MetaTensor (1, X, Y, Z) float32 in HU with its RAS affine; ``label`` MetaTensor (S, X, Y, Z)
    float32 holding the encoded label codes on the same grid; ``targets`` = [[catalog index, [[channel, code], ...]],
    ...] for the case's annotated classes.
    """

    def __init__(self) -> None:
        super().__init__(keys=["image", "label"])

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        image = read_image(d["image"])
        labels = read_case_labels(d, image)
        img = sitk_to_metatensor(image)
        lab = torch.from_numpy(np.ascontiguousarray(labels.array.transpose(0, 3, 2, 1)).astype(np.float32))
        d["image"] = img
        d["label"] = MetaTensor(lab, affine=img.affine.clone())
        d["targets"] = [[int(c), [[int(ch), int(code)] for ch, code in pairs]] for c, pairs in labels.classes.items()]
        for key in ("masks", "sources", "known_values", "stamp"):
            d.pop(key, None)
        return d


def preprocessing_transforms(
    spacing: Sequence[float] = TARGET_SPACING_MM,
    hu_window: Sequence[float] = HU_WINDOW,
    min_size: Sequence[int] | None = None,
    indices: bool = True,
) -> Compose:
    """The deterministic (cacheable) chain; see the module docstring. ``min_size``: pad to at least this size (the crop
    size) so every crop fits; ``indices``: precompute the voxel indices ``RandCropByPosNegLabeld`` samples from."""
    keys = ["image", "label"]
    steps: list = [
        LoadCased(),
        # Explicit axis labels = MONAI's current default (silences its deprecation warning; same as inference).
        Orientationd(keys=keys, axcodes="RAS", labels=(("L", "R"), ("P", "A"), ("I", "S"))),
        Spacingd(keys=keys, pixdim=tuple(spacing), mode=("bilinear", "nearest")),
        ScaleIntensityRanged(keys="image", a_min=hu_window[0], a_max=hu_window[1], b_min=0.0, b_max=1.0, clip=True),
        CropForegroundd(keys=keys, source_key="image", allow_smaller=True),
    ]
    if min_size is not None:
        steps.append(SpatialPadd(keys=keys, spatial_size=tuple(int(s) for s in min_size), mode="constant"))
    steps += [
        EnsureTyped(keys=keys, track_meta=False),
        CastToTyped(keys="label", dtype=torch.uint8),
    ]
    if indices:
        # Foreground = any annotated structure; background = other body voxels (image > 0 after scaling).
        steps.append(FgBgToIndicesd(keys="label", image_key="image", image_threshold=0.0))
        steps.append(ClassIndicesd())
    return Compose(steps)


def class_mask(label: torch.Tensor, pairs: Sequence) -> torch.Tensor:
    """Encoded labels (S, *spatial) + one class's [[channel, code], ...] -> (*spatial) bool mask of that class."""
    mask = torch.zeros(label.shape[1:], dtype=torch.bool)
    for ch, code in pairs:
        mask |= torch.as_tensor(label[int(ch)]) == int(code)
    return mask


class ClassIndicesd(MapTransform):
    """Cached: ``class_indices`` = {catalog index: flat voxel indices (int64 numpy) of that class} for every class the
    case annotates and contains (so :class:`RandCropByClassd` need not scan the volume each step)."""

    def __init__(self) -> None:
        super().__init__(keys=["label"])

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        label = torch.as_tensor(d["label"])
        found = {}
        for c, pairs in d["targets"]:
            idx = np.flatnonzero(class_mask(label, pairs).numpy().ravel())
            if idx.size:
                found[int(c)] = idx
        d["class_indices"] = found
        return d


class RandCropByClassd(Randomizable, MapTransform):
    """``num_samples`` crops of ``spatial_size`` from ``image`` (1, X, Y, Z) and ``label`` (S, X, Y, Z).

    With probability ``pos / (pos + neg)`` a crop is centred on a random voxel of one class drawn uniformly among the
    model's classes the case contains (from ``class_indices``), else on a random unlabelled body voxel
    (``label_bg_indices``). Uniform over classes, not voxels: a crop holds the adrenal glands as often as the liver,
    where foreground-voxel sampling (``RandCropByPosNegLabeld``) lands on the largest organs almost always. Centres are
    moved inwards so every crop lies inside the (padded) volume. Returns a list of sample dicts.
    """

    def __init__(
        self, spatial_size: Sequence[int], pos: float, neg: float, num_samples: int, model_classes: Sequence[int]
    ) -> None:
        MapTransform.__init__(self, keys=["image", "label"])
        self.size = [int(s) for s in spatial_size]
        self.pos_ratio = float(pos) / float(pos + neg)
        self.num_samples = int(num_samples)
        self.model_classes = {int(c) for c in model_classes}

    def randomize(self, data: Any = None) -> None:  # draws happen in __call__ (they depend on the case)
        pass

    def _centre(self, d: Mapping[Hashable, Any], shape: Sequence[int]) -> int:
        classes = sorted(c for c in d.get("class_indices", {}) if c in self.model_classes)
        background = d.get("label_bg_indices")
        if classes and (self.R.random_sample() < self.pos_ratio or background is None or len(background) == 0):
            pool = d["class_indices"][classes[self.R.randint(len(classes))]]
        elif background is not None and len(background):
            pool = np.asarray(background)
        else:
            return int(self.R.randint(int(np.prod(shape))))
        return int(pool[self.R.randint(len(pool))])

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict]:
        d = dict(data)
        image, label = d["image"], d["label"]
        shape = list(image.shape[1:])
        rest = {
            k: v
            for k, v in d.items()
            if k not in ("image", "label", "class_indices", "label_fg_indices", "label_bg_indices")
        }
        out = []
        for _ in range(self.num_samples):
            centre = np.unravel_index(self._centre(d, shape), shape)
            start = [int(min(max(c - s // 2, 0), max(n - s, 0))) for c, s, n in zip(centre, self.size, shape)]
            window = tuple(slice(b, b + s) for b, s in zip(start, self.size))
            sample = dict(rest)
            sample["image"] = image[(slice(None),) + window]
            sample["label"] = label[(slice(None),) + window]
            out.append(sample)
        return out


class _PerOrganIntensity(Randomizable, MapTransform):
    """Base of the per-organ intensity changes: for each class channel of ``label`` (K, ...) uint8 (after
    ClassTargetsd; ``channels``, or all when None), with probability ``prob``, replace the organ's voxels of ``image``
    (1, ...) by :meth:`_changed` of them. The cached input is never modified in place."""

    def __init__(self, prob: float, channels: Sequence[int] | None = None) -> None:
        MapTransform.__init__(self, keys=["image"])
        self.prob = float(prob)
        self.channels = None if channels is None else [int(k) for k in channels]

    def randomize(self, data: Any = None) -> None:
        pass

    def _changed(self, values: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        label = torch.as_tensor(d["label"])
        image = torch.as_tensor(d["image"]).clone()
        for k in range(label.shape[0]) if self.channels is None else self.channels:
            if self.R.random_sample() >= self.prob:
                continue
            mask = label[k] > 0
            if bool(mask.any()):
                image[0][mask] = self._changed(image[0][mask])
        d["image"] = image
        return d


class RandOrganIntensityd(_PerOrganIntensity):
    """Add one random offset, uniform in [-``offset``, ``offset``] (window-scaled units; 0.1 is about 43 HU with the
    default window), to the voxels of each labelled class of ``image`` (1, ...) with probability ``prob`` per class.

    Contrast agent moves organs by 100-200 HU (an arterial-phase kidney ~180 HU, a non-contrast one ~30 HU); with few
    patients per phase, shifting each organ on its own (as SynthSeg's per-label intensities do, milder) teaches shape
    and context rather than one phase's grey values. ``label`` (K, ...) uint8 per model class, after ClassTargetsd.
    """

    def __init__(self, prob: float, offset: float) -> None:
        super().__init__(prob)
        self.offset = float(offset)

    def _changed(self, values: torch.Tensor) -> torch.Tensor:
        return values + float(self.R.uniform(-self.offset, self.offset))


class RandOrganPhased(_PerOrganIntensity):
    """Give each listed organ of ``image`` (1, ...) another contrast phase, with probability ``prob`` per organ: its
    voxels become ``target + spread * (x - median)``, clipped to [0, 1], with ``target`` uniform in ``target_range`` and
    ``spread`` uniform in ``spread_range`` (window-scaled units). ``label`` (K, ...) uint8 per model class, after
    ClassTargetsd; ``channels`` are the positions of the organs that enhance with contrast agent.

    Why: the same organ differs by more than a fixed offset can bridge between phases (median HU, arterial chest CT vs
    non-contrast abdomen here: spleen 174 vs 35, kidneys 210 vs 15, aorta 399 vs 41) and enhancing organs are also
    less uniform (kidney IQR 150 vs 22 HU). Moving the organ's median anywhere in the soft-tissue range and shrinking
    its texture teaches the net to find it by shape and context. Organs holding air or contents (lungs, bowel, stomach)
    are left out: their grey values do not follow the contrast phase.
    """

    def __init__(
        self,
        prob: float,
        channels: Sequence[int],
        target_range: tuple[float, float],
        spread_range: tuple[float, float],
    ) -> None:
        super().__init__(prob, channels)
        self.target_range = (float(target_range[0]), float(target_range[1]))
        self.spread_range = (float(spread_range[0]), float(spread_range[1]))

    def _changed(self, values: torch.Tensor) -> torch.Tensor:
        target = float(self.R.uniform(*self.target_range))
        spread = float(self.R.uniform(*self.spread_range))
        return (target + spread * (values - values.median())).clamp(0.0, 1.0)


def class_targets(
    label: torch.Tensor, targets: Sequence, model_classes: Sequence[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encoded labels (S, *spatial) + the case's targets -> (K, *spatial) uint8 masks and (K,) bool annotated, K =
    ``len(model_classes)`` in that order. Classes the case annotates but the model lacks are dropped."""
    position = {c: i for i, c in enumerate(model_classes)}
    out = torch.zeros((len(model_classes), *label.shape[1:]), dtype=torch.uint8)
    annotated = torch.zeros(len(model_classes), dtype=torch.bool)
    for c, pairs in targets:
        k = position.get(int(c))
        if k is None:
            continue
        annotated[k] = True
        out[k] = class_mask(label, pairs).to(torch.uint8)
    return out, annotated


class ClassTargetsd(MapTransform):
    """``label`` (S, ...) encoded + ``targets`` -> ``label`` (K, ...) uint8 per model class and ``annotated`` (K,) bool."""

    def __init__(self, model_classes: Sequence[int]) -> None:
        super().__init__(keys=["label"])
        self.model_classes = [int(c) for c in model_classes]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        label = torch.as_tensor(d["label"])
        d["label"], d["annotated"] = class_targets(label, d.pop("targets"), self.model_classes)
        return d


def lateral_pairs(model_classes: Sequence[int], catalog: ClassCatalog) -> list[tuple[int, int]]:
    """Positions (in ``model_classes``) of right/left class pairs: same name once "Right"/"Left" is removed."""
    position = {c: i for i, c in enumerate(model_classes)}
    by_stem: dict[str, dict[str, int]] = {}
    for c in model_classes:
        info = catalog[c]
        if info.laterality in ("right", "left"):
            stem = " ".join(w for w in info.name.lower().split() if w not in ("right", "left"))
            by_stem.setdefault(stem, {})[info.laterality] = position[c]
    return [(p["right"], p["left"]) for p in by_stem.values() if "right" in p and "left" in p]


class RandFlipLateralityd(Randomizable, MapTransform):
    """Flip ``image`` (1, X, Y, Z) and ``label`` (K, X, Y, Z) along each of ``axes`` with probability ``prob``.

    A flip along axis 0 (RAS x, the patient's left-right) mirrors the body, so a right kidney ends up where a left one
    belongs: the channels (and ``annotated`` entries) of each right/left pair are swapped to keep the labels true.
    """

    def __init__(self, prob: float, axes: Sequence[int], pairs: Sequence[tuple[int, int]]) -> None:
        MapTransform.__init__(self, keys=["image", "label"])
        self.prob = float(prob)
        self.axes = [int(a) for a in axes]
        self.pairs = [tuple(p) for p in pairs]
        self._flips: list[int] = []

    def randomize(self, data: Any = None) -> None:
        self._flips = [a for a in self.axes if self.R.random_sample() < self.prob]

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        self.randomize()
        if not self._flips:
            return d
        dims = [a + 1 for a in self._flips]
        d["image"] = torch.flip(torch.as_tensor(d["image"]), dims)
        label = torch.flip(torch.as_tensor(d["label"]), dims)
        if 0 in self._flips and self.pairs:
            order = list(range(label.shape[0]))
            for right, left in self.pairs:
                order[right], order[left] = left, right
            label = label[order]
            if "annotated" in d:
                d["annotated"] = torch.as_tensor(d["annotated"])[order]
        d["label"] = label
        return d


class SelectKeysd(MapTransform):
    """Keep only the given keys (so samples collate into plain batches)."""

    def __init__(self, keys: KeysCollection) -> None:
        super().__init__(keys=keys)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        return {k: data[k] for k in self.keys if k in data}


def augmentation_transforms(config, model_classes: Sequence[int], catalog: ClassCatalog) -> Compose:
    """The random chain for training samples (see the module docstring); ``config`` is a TrainingConfig."""
    aug = config.augmentation
    crop = tuple(int(s) for s in config.training.crop_size)
    rad = math.radians(aug.rotate_degrees)
    if aug.crop_centres == "classes":
        crop_step: Any = RandCropByClassd(crop, aug.pos, aug.neg, aug.num_samples, model_classes)
    else:
        crop_step = RandCropByPosNegLabeld(
            keys=["image", "label"],
            label_key="label",
            spatial_size=crop,
            pos=aug.pos,
            neg=aug.neg,
            num_samples=aug.num_samples,
            image_key="image",
            image_threshold=0.0,
            fg_indices_key="label_fg_indices",
            bg_indices_key="label_bg_indices",
            allow_smaller=False,
        )
    steps: list = [crop_step, ClassTargetsd(model_classes)]
    if aug.flip_prob > 0 and aug.flip_axes:
        steps.append(RandFlipLateralityd(aug.flip_prob, aug.flip_axes, lateral_pairs(model_classes, catalog)))
    if aug.rotate_prob > 0 and rad > 0:
        steps += [
            CastToTyped(keys="label", dtype=torch.float32),
            RandRotated(
                keys=["image", "label"],
                range_x=rad,
                range_y=rad,
                range_z=rad,
                prob=aug.rotate_prob,
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
                keep_size=True,
            ),
            CastToTyped(keys="label", dtype=torch.uint8),
        ]
    if aug.scale_prob > 0 and aug.scale_range > 0:
        steps += [
            CastToTyped(keys="label", dtype=torch.float32),
            RandZoomd(
                keys=["image", "label"],
                prob=aug.scale_prob,
                min_zoom=1.0 - aug.scale_range,
                max_zoom=1.0 + aug.scale_range,
                mode=("trilinear", "nearest"),
                padding_mode="constant",
                keep_size=True,
            ),
            CastToTyped(keys="label", dtype=torch.uint8),
        ]
    if aug.organ_intensity_prob > 0 and aug.organ_intensity_offset > 0:
        steps.append(RandOrganIntensityd(aug.organ_intensity_prob, aug.organ_intensity_offset))
    if aug.organ_phase_prob > 0 and aug.organ_phase_classes:
        position = {c: k for k, c in enumerate(model_classes)}
        wanted = [catalog.lookup(name).index for name in aug.organ_phase_classes]
        low, high = config.hu_window
        steps.append(
            RandOrganPhased(
                aug.organ_phase_prob,
                [position[c] for c in wanted if c in position],
                tuple((hu - low) / (high - low) for hu in aug.organ_phase_hu),
                aug.organ_phase_spread,
            )
        )
    if aug.contrast_prob > 0:
        steps.append(
            RandAdjustContrastd(
                keys="image", prob=aug.contrast_prob, gamma=(float(aug.contrast_gamma[0]), float(aug.contrast_gamma[1]))
            )
        )
    if aug.intensity_scale_prob > 0 and aug.intensity_scale > 0:
        steps.append(RandScaleIntensityd(keys="image", factors=aug.intensity_scale, prob=aug.intensity_scale_prob))
    if aug.intensity_shift_prob > 0 and aug.intensity_shift > 0:
        steps.append(RandShiftIntensityd(keys="image", offsets=aug.intensity_shift, prob=aug.intensity_shift_prob))
    steps += [
        EnsureTyped(keys=["image", "label", "annotated"], track_meta=False),
        SelectKeysd(keys=["image", "label", "annotated", "case"]),
    ]
    return Compose(steps)
