"""What the training crops show the model: per class, how much of the organ one crop can hold, and how often the
sampled crops contain it (``universalseg-train diagnose CONFIG``; prints JSON).

Used to find what limits a model before tuning it: a class that a crop never holds whole, or that appears in few
sampled crops, learns slowly whatever the step count.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .config import TrainingConfig
from .datasets import collect_cases, load_catalog, split_cases
from .modeling import model_classes
from .transforms import augmentation_transforms, class_targets, preprocessing_transforms


def _centred_fraction(mask: np.ndarray, crop: tuple[int, int, int]) -> float:
    """Share of ``mask``'s voxels inside a ``crop`` box centred on the mask's bounding-box centre (the best a crop
    aimed at the organ can do). ``mask``: bool (X, Y, Z)."""
    idx = np.nonzero(mask)
    lo = np.array([i.min() for i in idx])
    hi = np.array([i.max() for i in idx]) + 1
    centre = (lo + hi) // 2
    start = np.maximum(centre - np.array(crop) // 2, 0)
    box = tuple(slice(int(s), int(s + c)) for s, c in zip(start, crop))
    return float(mask[box].sum() / mask.sum())


def diagnose(config: TrainingConfig, samples: int = 64, seed: int = 0) -> dict[str, Any]:
    """Per training case and class: extent (mm), share inside one centred crop; over ``samples`` sampled training
    crops (the fit's own sampling and augmentation): share of crops that contain each class and its mean voxel share
    in them."""
    catalog = load_catalog(config)
    train, _ = split_cases(collect_cases(config, catalog))
    classes = model_classes(config, catalog, train, [])
    crop = config.training.crop_size  # three ints (checked by load_config)
    prep = preprocessing_transforms(config.spacing, config.hu_window, min_size=crop)
    augment = augmentation_transforms(config, classes, catalog)
    augment.set_random_state(seed)
    cases: dict[str, Any] = {}
    presence = np.zeros(len(classes))
    annotated_crops = np.zeros(len(classes))
    share = np.zeros(len(classes))
    for case in train:
        item = prep(case.to_data())
        masks, annotated = class_targets(torch.as_tensor(item["label"]), item["targets"], classes)
        rows = {}
        for k, c in enumerate(classes):
            m = masks[k].numpy().astype(bool)
            if not annotated[k] or not m.any():
                continue
            idx = np.nonzero(m)
            extent = [float((i.max() - i.min() + 1) * s) for i, s in zip(idx, config.spacing)]
            rows[catalog[c].name] = {
                "extent_mm": [round(e) for e in extent],
                "in_one_centred_crop": round(_centred_fraction(m, crop), 3),
            }
        cases[case.name] = {"preprocessed_shape": list(item["image"].shape[1:]), "classes": rows}
        per_case = max(1, samples // len(train))
        drawn = 0
        while drawn < per_case:
            for sample in augment(item):
                label, ann = sample["label"], sample["annotated"]
                voxels = label.reshape(label.shape[0], -1).float().mean(dim=1).numpy()
                present = voxels > 0
                annotated_crops += ann.numpy()
                presence += present & ann.numpy()
                share += np.where(present & ann.numpy(), voxels, 0.0)
                drawn += 1
    crops = {
        catalog[c].name: {
            "crops_annotating": int(annotated_crops[k]),
            "share_of_those_containing_it": round(float(presence[k] / annotated_crops[k]), 3)
            if annotated_crops[k]
            else None,
            "mean_voxel_share_when_present": round(float(share[k] / presence[k]), 4) if presence[k] else None,
        }
        for k, c in enumerate(classes)
    }
    return {
        "spacing_mm": list(config.spacing),
        "crop_size": list(crop),
        "crop_mm": [round(c * s) for c, s in zip(crop, config.spacing)],
        "cases": cases,
        "sampled_crops": crops,
    }


def head_activity(model, window: torch.Tensor) -> dict[str, dict[str, float]]:
    """Whether each class's dynamic head is alive on one preprocessed ``window`` (1, 1, X, Y, Z): the share of its
    hidden ReLU units (2 layers x 8) that fire on at least one voxel, and the spread (std) of its logits. Dead heads
    (share 0, spread 0) give one constant logit per class: the failure that made an earlier bundled model learn
    nothing."""
    model = model.eval()
    with torch.no_grad():
        global_feature, head_input = model.encode(window)
        params = model.head_parameters(global_feature, model.class_embeddings)
        x = head_input.reshape(*head_input.shape[:2], -1)
        out = {}
        for k, name in enumerate(model.class_names):
            h1, h2, logit = model.head_layers(x, params[:, k])
            alive = torch.cat([(h1 > 0).any(dim=2), (h2 > 0).any(dim=2)], dim=1).float().mean()
            out[name] = {
                "alive_units": round(float(alive), 3),
                "logit_std": round(float(logit.std()), 3),
                "foreground_share": round(float((logit > 0).float().mean()), 4),
            }
    return out
