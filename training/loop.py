"""The training loop: partially labelled crops in, checkpoints out; resumable, data-parallel.

Data stream: batch ``(step, micro-batch, rank)`` is a pure function of the seed and those numbers (the case is drawn
and the random transforms are seeded from them), so a resumed run sees exactly the batches an uninterrupted run would
have seen, independent of data-loader workers. Together with the saved model, optimiser, scheduler, gradient scaler
and RNG states, resuming continues bit-for-bit on the same hardware.

Outputs in the run folder (``output:`` in the config, or ``--output``)::

    checkpoints/step_0000100.pt   training states (exact resume; the newest ``keep_checkpoints`` are kept)
    checkpoints/last.json         pointer to the newest state
    model_last.safetensors        the weights at the newest state, in the engine's format
    model_best.safetensors        the weights with the best mean validation Dice so far
    model.safetensors             the final export (written when the run ends, also when stopped early)
    log.csv, validation.csv       training loss / learning rate per logged step; validation Dice per class
    tensorboard/                  the same as TensorBoard scalars
    fit_summary.json              what happened: steps, Dice before/after, weight digests per rank
"""

from __future__ import annotations

import csv
import json
import logging
import math
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from UniversalSegLib.catalog import model_class_indices, rows_for
from UniversalSegLib.checkpoints import save_checkpoint
from UniversalSegLib.errors import InputError
from UniversalSegLib.inferer import SlidingWindowSegmenter
from UniversalSegLib.networks.universal_model import UniversalModel

from .config import TrainingConfig
from .datasets import CaseSpec, collect_cases, load_catalog, split_cases
from .distributed import (
    DistributedContext,
    all_gather_objects,
    any_rank,
    barrier,
    broadcast_object,
    cleanup,
    init_distributed,
    unwrap,
    weights_digest,
)
from .export import STATE_FORMAT, build_metadata, command_line, latest_state, read_state
from .losses import PartialLabelLoss, retention_loss
from .modeling import build_model
from .transforms import augmentation_transforms, class_targets, preprocessing_transforms

logger = logging.getLogger("training")
#: Modules whose output is the per-class head parameters (their learning rate is scaled by head_lr_scale).
HEAD_GENERATORS = ("controller", "text_to_vision", "GAP")


# ------------------------------------------------------------------------------------------------ data


def make_cached_dataset(data: list[dict], transform, mode: str, cache_dir: Path, workers: int, progress: bool):
    """MONAI dataset over the deterministic chain: in memory (``CacheDataset``), on disk (``PersistentDataset``) or
    recomputed each time (``Dataset``)."""
    from monai.data import CacheDataset, PersistentDataset
    from monai.data import Dataset as MonaiDataset

    if mode == "memory":
        return CacheDataset(data, transform, cache_rate=1.0, num_workers=max(1, workers), progress=progress)
    if mode == "disk":
        cache_dir.mkdir(parents=True, exist_ok=True)
        return PersistentDataset(data, transform, cache_dir=str(cache_dir))
    return MonaiDataset(data, transform)


class TrainingStream(Dataset):
    """Index ``i`` = ((step * accumulation + micro) * batch_size + b): draws a case (datasets weighted by their
    ``weight``, cases uniform within a dataset) and applies the augmentation, all seeded by (seed, rank, i).
    Returns the list of ``num_samples`` crops of that case."""

    def __init__(self, base, weights: Sequence[float], augment, seed: int, rank: int) -> None:
        self.base = base
        p = np.asarray(weights, dtype=np.float64)
        self.p = p / p.sum()
        self.augment = augment
        self.seed = int(seed)
        self.rank = int(rank)

    def __len__(self) -> int:  # indices come from StepSampler; the stream itself is unbounded
        return sys.maxsize

    def __getitem__(self, index: int):
        rng = np.random.default_rng([self.seed, self.rank, int(index)])
        case = int(rng.choice(len(self.p), p=self.p))
        item = self.base[case]
        self.augment.set_random_state(seed=int(rng.integers(0, 2**31 - 1)))
        return self.augment(item)


class StepSampler(Sampler[int]):
    """Stream indices from ``start`` (the resume point) to ``stop``."""

    def __init__(self, start: int, stop: int) -> None:
        self.start, self.stop = int(start), int(stop)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.start, self.stop))

    def __len__(self) -> int:
        return max(0, self.stop - self.start)


def case_weights(cases: Sequence[CaseSpec]) -> list[float]:
    """Sampling weight per case: its dataset's weight shared among the dataset's cases."""
    counts: dict[str, int] = {}
    for c in cases:
        counts[c.dataset] = counts.get(c.dataset, 0) + 1
    return [c.weight / counts[c.dataset] for c in cases]


# ------------------------------------------------------------------------------------------------ schedule


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Learning-rate multiplier at optimiser step ``step`` (0-based): linear warm-up, then cosine to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


# ------------------------------------------------------------------------------------------------ validation


def dice_scores(
    model: torch.nn.Module,
    val_items: Sequence[dict],
    classes: Sequence[int],
    catalog,
    *,
    roi_size: Sequence[int],
    overlap: float,
    device: torch.device,
) -> dict[str, list[float]]:
    """Dice per class name over validation cases, on the preprocessed grid (logit > 0 vs. the class mask); only
    classes a case annotates and that are present in it count."""
    from monai.metrics import compute_dice

    model = unwrap(model)
    assert isinstance(model, UniversalModel)
    was_training = model.training
    model.eval()
    out: dict[str, list[float]] = {}
    try:
        for item in val_items:
            target, annotated = class_targets(torch.as_tensor(item["label"]), item["targets"], classes)
            rows = [k for k in range(len(classes)) if annotated[k]]
            if not rows:
                continue
            image = torch.as_tensor(item["image"]).float()[None]
            segmenter = SlidingWindowSegmenter(model, roi_size=roi_size, overlap=overlap, device=device)
            logits = segmenter(image, model.organ_embedding[rows].float())
            pred = (logits > 0).float()
            truth = target[rows][None].float()
            dice = compute_dice(pred, truth, include_background=True, ignore_empty=True)[0]
            for n, k in enumerate(rows):
                if not torch.isnan(dice[n]):
                    out.setdefault(catalog[classes[k]].name, []).append(float(dice[n]))
    finally:
        model.train(was_training)
    return out


# ------------------------------------------------------------------------------------------------ logging


class RunLog:
    """CSV files and TensorBoard scalars of a run (main process only)."""

    def __init__(self, folder: Path, enabled: bool) -> None:
        self.folder = folder
        self.enabled = enabled
        self.tb = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(folder / "tensorboard"))
            except Exception as exc:  # tensorboard missing or broken: CSV logs still work
                logger.warning("TensorBoard logging is off (%s)", str(exc).splitlines()[0])

    def _append(self, name: str, row: dict) -> None:
        path = self.folder / name
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(row))
            if new:
                w.writeheader()
            w.writerow(row)

    def train(self, row: dict) -> None:
        if not self.enabled:
            return
        self._append("log.csv", row)
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"train/{k}", v, row["step"])

    def validation(self, step: int, scores: dict[str, list[float]]) -> None:
        if not self.enabled:
            return
        for name, values in sorted(scores.items()):
            self._append(
                "validation.csv",
                {"step": step, "class": name, "dice": round(float(np.mean(values)), 5), "cases": len(values)},
            )
            if self.tb is not None:
                self.tb.add_scalar(f"val_dice/{name}", float(np.mean(values)), step)
        if self.tb is not None and scores:
            self.tb.add_scalar("val_dice/mean", float(np.mean([np.mean(v) for v in scores.values()])), step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


# ------------------------------------------------------------------------------------------------ states


def _rng_state() -> dict[str, Any]:
    np_state: Any = np.random.get_state()  # the legacy tuple (the default); its stub also allows the dict form
    state = {
        "python": random.getstate(),
        "numpy": [
            np_state[0],
            torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["python"]))
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), int(n[2]), int(n[3]), float(n[4])))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------ fit


@dataclass
class FitResult:
    """What ``fit`` produced (on the main process; other ranks get the same step and digests)."""

    output: Path
    step: int
    model_path: Path | None
    summary: dict
    model: torch.nn.Module


class _StopFlag:
    """SIGTERM / SIGINT ask the loop to checkpoint and stop after the current step."""

    def __init__(self) -> None:
        self.raised = False
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_StopFlag":
        def handler(signum, frame):
            if self.raised:  # second signal: stop now
                raise KeyboardInterrupt
            self.raised = True
            logger.warning("stop requested: saving a checkpoint after this step")

        try:
            for s in (signal.SIGTERM, signal.SIGINT):
                self._old[s] = signal.signal(s, handler)
        except ValueError:  # not the main thread (e.g. inside a test runner thread): no signal handling
            self._old = {}
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._old.items():
            signal.signal(s, h)


def _amp(device: torch.device, mode: str):
    """(autocast context factory, GradScaler or None). On the CPU only an explicit ``bf16`` autocasts: CPUs with native
    bfloat16 units (AMX, AVX512-BF16) train about 2x faster with it; ``auto`` keeps float32 there."""
    if device.type == "cpu" and mode == "bf16":
        return (lambda: torch.autocast("cpu", dtype=torch.bfloat16)), None
    if device.type != "cuda" or mode == "off":
        return (lambda: nullcontext()), None
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    return (lambda: torch.autocast("cuda", dtype=dtype)), scaler


def fit(
    config: TrainingConfig,
    *,
    resume: str | Path | bool | None = None,
    progress: bool = True,
    command: str | None = None,
) -> FitResult:
    """Train as the config says. ``resume``: ``True``/``"auto"`` continues from the run folder's newest state (if
    any), a path continues from that state, ``None``/``False`` starts fresh (refusing a folder that has states)."""
    tr = config.training
    ctx = init_distributed(tr.device)
    threads = torch.get_num_threads()
    if tr.threads:
        torch.set_num_threads(int(tr.threads))
    out = Path(config.output)
    command = command or command_line()
    try:
        return _fit(config, ctx, out, resume, progress, command)
    finally:
        torch.set_num_threads(threads)
        cleanup(ctx)


def _resume_state(resume, out: Path, config: TrainingConfig, ctx: DistributedContext) -> dict | None:
    """The training state to continue from (``resume``: True/"auto" = the run folder's newest, or a path), or None for
    a fresh run; a fresh run refuses a folder that already holds states."""
    if not resume:
        if latest_state(out) is not None:
            raise InputError(
                f"{out} already holds training states; pass --resume to continue, or choose another --output"
            )
        return None
    path = latest_state(out) if resume in (True, "auto") else Path(resume)
    if path is None:
        return None
    state = read_state(path)
    if ctx.is_main:
        logger.warning("resuming from %s (step %d)", path, state["step"])
        if state.get("config_digest") != config.digest():
            logger.warning("the config differs from the one this state was trained with; continuing with the new one")
    return state


def _optimiser(model: torch.nn.Module, tr) -> tuple[list, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """(trainable parameters, AdamW with the head-generating modules at ``lr * head_lr_scale``, warm-up + cosine
    schedule) for the TrainingSection ``tr``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InputError("every parameter is frozen (model.freeze); nothing to train")
    head = [p for n, p in model.named_parameters() if p.requires_grad and n.split(".")[0] in HEAD_GENERATORS]
    body = [p for n, p in model.named_parameters() if p.requires_grad and n.split(".")[0] not in HEAD_GENERATORS]
    groups = [
        g for g in ({"params": body, "lr": tr.lr}, {"params": head, "lr": tr.lr * tr.head_lr_scale}) if g["params"]
    ]
    optimizer = torch.optim.AdamW(groups, lr=tr.lr, weight_decay=tr.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, tr.warmup_steps, tr.max_steps, tr.min_lr_ratio)
    )
    return params, optimizer, scheduler


def _restore_progress(
    state: dict, optimizer, scheduler, scaler, ctx: DistributedContext
) -> tuple[int, dict[str, dict[str, float]], dict[str, Any]]:
    """Put a resumed state's optimiser, schedule, scaler and this rank's random generators back; (step, validation
    history, best)."""
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    rngs = state.get("rng") or []
    if ctx.rank < len(rngs):
        _set_rng_state(rngs[ctx.rank])
    best = dict(state.get("best") or {"mean": -1.0, "step": None})
    return int(state["step"]), dict(state.get("history") or {}), best


def _fit(config: TrainingConfig, ctx: DistributedContext, out: Path, resume, progress: bool, command: str) -> FitResult:
    tr = config.training
    started = time.monotonic()
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
    barrier(ctx)
    random.seed(tr.seed + ctx.rank)
    np.random.seed((tr.seed + ctx.rank) % 2**32)
    torch.manual_seed(tr.seed)  # same initial weights on every rank (DDP also broadcasts rank 0's)

    catalog = load_catalog(config)
    cases = collect_cases(config, catalog)
    train_cases, val_cases = split_cases(cases)
    if not train_cases:
        raise InputError("no training cases: every case is in the validation split; set split: train on a dataset")

    state = _resume_state(resume, out, config, ctx)
    start = build_model(config, catalog, train_cases)
    model_classes = start.classes
    if state is not None:
        if model_class_indices(list(state["class_names"]), catalog, strict=False) != list(model_classes):
            raise InputError(
                "the resumed state has other classes than this config gives; resume with the config it was trained with"
            )
        start.model.load_state_dict(state["model"], strict=True)
    model = start.model.to(ctx.device)
    model.metadata = {}
    teacher = start.teacher.to(ctx.device) if start.teacher is not None else None
    teacher_rows: list[int] = []
    if teacher is not None:
        # student row k (class model_classes[k]) learns from the teacher's row for the same catalog class
        teacher_row_of = {
            c: r for r, c in enumerate(model_class_indices(teacher, catalog, strict=False)) if c is not None
        }
        teacher_rows = [k for k, c in enumerate(model_classes) if c in teacher_row_of]
        teacher_index = rows_for(teacher, [model_classes[k] for k in teacher_rows], catalog)

    # --- data
    crop = tuple(tr.crop_size)
    prep = preprocessing_transforms(config.spacing, config.hu_window, min_size=crop)
    train_data = [c.to_data() for c in train_cases]
    base = make_cached_dataset(train_data, prep, tr.cache, out / "cache", tr.num_workers, progress and ctx.is_main)
    augment = augmentation_transforms(config, model_classes, catalog)
    stream = TrainingStream(base, case_weights(train_cases), augment, tr.seed, ctx.rank)
    val_items: list[dict] = []
    if val_cases and ctx.is_main:
        from monai.data import CacheDataset

        val_prep = preprocessing_transforms(config.spacing, config.hu_window, min_size=None, indices=False)
        cached = CacheDataset([c.to_data() for c in val_cases], val_prep, cache_rate=1.0, num_workers=1, progress=False)
        val_items = [cached[i] for i in range(len(cached))]

    # --- optimisation
    params, optimizer, scheduler = _optimiser(model, tr)
    autocast, scaler = _amp(ctx.device, tr.amp)
    loss_fn = PartialLabelLoss(tr.bce_weight, tr.dice_weight)
    step = 0
    history: dict[str, dict[str, float]] = {}
    best: dict[str, Any] = {"mean": -1.0, "step": None}
    if state is not None:
        step, history, best = _restore_progress(state, optimizer, scheduler, scaler, ctx)

    if ctx.enabled:
        ddp_kwargs: dict[str, Any] = {"device_ids": [ctx.device.index]} if ctx.device.type == "cuda" else {}
        net: torch.nn.Module = torch.nn.parallel.DistributedDataParallel(model, **ddp_kwargs)
    else:
        net = model

    per_step = tr.grad_accumulation * tr.batch_size
    from monai.data import list_data_collate

    loader = DataLoader(
        stream,
        batch_size=tr.batch_size,
        sampler=StepSampler(step * per_step, tr.max_steps * per_step),
        num_workers=tr.num_workers,
        collate_fn=list_data_collate,
        pin_memory=ctx.device.type == "cuda",
        persistent_workers=False,
    )
    batches = iter(loader)
    log = RunLog(out, ctx.is_main)
    bar = None
    if progress and ctx.is_main:
        from tqdm import tqdm

        bar = tqdm(
            total=tr.max_steps,
            initial=step,
            desc="fit",
            unit="step",
            dynamic_ncols=True,
            mininterval=1.0 if sys.stderr.isatty() else 30.0,
        )

    meta_common: dict[str, Any] = dict(
        cases=cases,
        init=start.init,
        start_metadata=start.start_metadata,
        embedding_sources=start.embedding_sources,
        world_size=ctx.world_size,
        device=str(ctx.device),
        command=command,
    )
    digests: list[str] = []
    last_ckpt_time = time.monotonic()
    last_ckpt_step = step
    interval: dict[str, float] = {"loss": 0.0, "bce": 0.0, "dice": 0.0, "retain": 0.0, "n": 0}
    interval_start = time.monotonic()
    stop_reason = "max_steps"

    def validate_now(at: int) -> dict[str, float] | None:
        scores = None
        if ctx.is_main and val_items:
            raw = dice_scores(
                model,
                val_items,
                model_classes,
                catalog,
                roi_size=config.validation.roi_size,
                overlap=config.validation.overlap,
                device=ctx.device,
            )
            log.validation(at, raw)
            scores = {k: float(np.mean(v)) for k, v in raw.items()}
            history[str(at)] = scores
            if bar is not None:
                bar.write(f"step {at}: validation Dice " + ", ".join(f"{k} {v:.3f}" for k, v in sorted(scores.items())))
            mean = float(np.mean(list(scores.values()))) if scores else -1.0
            if mean > best["mean"] and at > 0:
                best.update(mean=mean, step=at)
                meta = build_metadata(
                    config,
                    step=at,
                    validation=scores,
                    validation_step=at,
                    elapsed_minutes=(time.monotonic() - started) / 60,
                    **meta_common,
                )
                save_checkpoint(model, out / "model_best.safetensors", meta)
        barrier(ctx)
        return scores

    def checkpoint(at: int) -> None:
        nonlocal digests, last_ckpt_time, last_ckpt_step
        digests = all_gather_objects(ctx, weights_digest(model))
        rngs = all_gather_objects(ctx, _rng_state())
        if ctx.is_main:
            if len(set(digests)) != 1:
                raise RuntimeError(
                    f"weights differ across ranks at step {at}: {digests}; the distributed setup is broken"
                )
            folder = out / "checkpoints"
            folder.mkdir(exist_ok=True)
            name = f"step_{at:07d}.pt"
            last_val = history.get(max(history, key=int)) if history else None
            meta = build_metadata(
                config,
                step=at,
                validation=last_val,
                validation_step=int(max(history, key=int)) if history else None,
                elapsed_minutes=(time.monotonic() - started) / 60,
                **meta_common,
            )
            state = {
                "format": STATE_FORMAT,
                "format_version": 1,
                "step": at,
                "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
                "model_config": model.config.to_dict(),
                "class_names": list(model.class_names),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else {},
                "rng": rngs,
                "config": config.to_dict(),
                "config_digest": config.digest(),
                "history": history,
                "best": best,
                "world_size": ctx.world_size,
                "metadata": json.dumps(meta),
            }
            _atomic_torch_save(state, folder / name)
            (folder / "last.json").write_text(json.dumps({"step": at, "file": name}))
            for old in sorted(folder.glob("step_*.pt"))[: -max(1, tr.keep_checkpoints)]:
                old.unlink(missing_ok=True)
            save_checkpoint(model, out / "model_last.safetensors", meta)
        last_ckpt_time = time.monotonic()
        last_ckpt_step = at
        barrier(ctx)

    def micro_step(batch: dict) -> dict[str, float]:
        """Forward and backward of one micro-batch (gradients accumulate); its loss terms for the log."""
        image = batch["image"].to(ctx.device, non_blocking=True).float()
        target = batch["label"].to(ctx.device, non_blocking=True)
        annotated = batch["annotated"].to(ctx.device).bool()
        # Only classes some sample annotates (or the teacher keeps) need logits: fewer heads, same loss.
        wanted = annotated.any(0)
        if teacher_rows:
            wanted[teacher_rows] = True
        rows = torch.nonzero(wanted).flatten()
        if rows.numel() == 0:
            rows = torch.arange(1, device=ctx.device)
        with autocast():
            logits = net(image, model.organ_embedding[rows])
        sel = annotated[:, rows]
        bce, dice = loss_fn.terms(logits, target[:, rows])
        loss = loss_fn.reduce(bce, dice, sel)
        bce, dice = bce.detach(), dice.detach()
        retain = torch.zeros((), device=ctx.device)
        if teacher is not None and tr.retain_weight > 0:
            with torch.no_grad(), autocast():
                t_logits = teacher(image, teacher.organ_embedding[teacher_index])
            pos = {int(r): n for n, r in enumerate(rows.tolist())}
            cols = [pos[r] for r in teacher_rows]
            keep = ~annotated[:, teacher_rows]
            retain = retention_loss(logits[:, cols], t_logits, keep)
            loss = loss + tr.retain_weight * retain
        scaled = loss / tr.grad_accumulation
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        return {
            "loss": float(loss.detach()),
            "bce": float(bce[sel].mean()) if sel.any() else 0.0,
            "dice": float(dice[sel].mean()) if sel.any() else 0.0,
            "retain": float(retain.detach()),
        }

    at_start = config.validation.at_start if config.validation.at_start is not None else start.init != "scratch"
    if step == 0 and at_start:
        validate_now(0)

    net.train()
    with _StopFlag() as stop:
        while step < tr.max_steps:
            optimizer.zero_grad(set_to_none=True)
            for micro in range(tr.grad_accumulation):
                sync = micro == tr.grad_accumulation - 1 or not ctx.enabled
                ddp = net if isinstance(net, torch.nn.parallel.DistributedDataParallel) else None
                with ddp.no_sync() if ddp is not None and not sync else nullcontext():
                    terms = micro_step(next(batches))
                for key, value in terms.items():
                    interval[key] += value
                interval["n"] += 1
            if scaler is not None:
                scaler.unscale_(optimizer)
            if tr.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, tr.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            step_lr = optimizer.param_groups[0]["lr"]
            scheduler.step()
            step += 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{interval['loss'] / max(interval['n'], 1):.4f}", refresh=False)

            if step % tr.log_every == 0 or step == tr.max_steps:
                n = max(interval["n"], 1)
                seconds = time.monotonic() - interval_start
                log.train(
                    {
                        "step": step,
                        "lr": step_lr,
                        "loss": round(interval["loss"] / n, 6),
                        "bce": round(interval["bce"] / n, 6),
                        "dice_loss": round(interval["dice"] / n, 6),
                        "retain": round(interval["retain"] / n, 6),
                        "seconds_per_step": round(seconds / max(1, n / tr.grad_accumulation), 3),
                        "elapsed_minutes": round((time.monotonic() - started) / 60, 2),
                    }
                )
                interval = {"loss": 0.0, "bce": 0.0, "dice": 0.0, "retain": 0.0, "n": 0}
                interval_start = time.monotonic()

            over_time = tr.max_minutes is not None and (time.monotonic() - started) / 60 >= tr.max_minutes
            stopping = any_rank(ctx, stop.raised or over_time)
            if config.validation.every and step % config.validation.every == 0 and step < tr.max_steps and not stopping:
                validate_now(step)
            due_time = (
                tr.checkpoint_minutes is not None and (time.monotonic() - last_ckpt_time) / 60 >= tr.checkpoint_minutes
            )
            if step % tr.checkpoint_every == 0 or any_rank(ctx, due_time) or stopping:
                if step != last_ckpt_step:
                    checkpoint(step)
            if stopping:
                stop_reason = "signal" if stop.raised else "max_minutes"
                break

    if bar is not None:
        bar.close()
    # Final validation and export (always, also after an early stop, so the run folder is usable).
    # Rank 0 decides (only it holds the validation history), so every rank takes the same path through the barriers.
    need_final = broadcast_object(ctx, bool(val_cases) and str(step) not in history)
    final_scores = validate_now(step) if need_final else history.get(str(step))
    if step != last_ckpt_step:
        checkpoint(step)
    model_path = None
    summary: dict[str, Any] = {}
    if ctx.is_main:
        meta = build_metadata(
            config,
            step=step,
            validation=final_scores,
            validation_step=step if final_scores else None,
            elapsed_minutes=(time.monotonic() - started) / 60,
            **meta_common,
        )
        model_path = save_checkpoint(model, out / "model.safetensors", meta)
        steps_seen = sorted(history, key=int)
        summary = {
            "name": config.name,
            "output": str(out),
            "steps": step,
            "max_steps": tr.max_steps,
            "stopped_by": stop_reason,
            "world_size": ctx.world_size,
            "device": str(ctx.device),
            "elapsed_minutes": round((time.monotonic() - started) / 60, 2),
            "classes": list(model.class_names),
            "init": start.init,
            "validation_first": {"step": int(steps_seen[0]), "dice": history[steps_seen[0]]} if steps_seen else None,
            "validation_last": {"step": int(steps_seen[-1]), "dice": history[steps_seen[-1]]} if steps_seen else None,
            "best": best,
            "rank_weight_digests": digests,
            "model": str(model_path),
            "command": command,
        }
        (out / "fit_summary.json").write_text(json.dumps(summary, indent=2))
    log.close()
    barrier(ctx)
    return FitResult(output=out, step=step, model_path=model_path, summary=summary, model=model)
