"""Export trained weights to the project's checkpoint format (safetensors + JSON metadata) with their provenance.

The metadata records what a user of the file needs to judge it: how it was trained (command, config, steps, start
checkpoint), on which data under which licences, the licence of the weights and of the class embeddings inside them
(``organ_embedding``), and the validation Dice per class.
"""

from __future__ import annotations

import json
import platform
import shlex
import sys
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from UniversalSegLib import __version__
from UniversalSegLib.catalog import ClassCatalog, model_class_indices
from UniversalSegLib.checkpoints import save_checkpoint
from UniversalSegLib.errors import CheckpointError, InputError
from UniversalSegLib.networks.universal_model import ModelConfig, UniversalModel

STATE_FORMAT = "universalseg-training-state"


def command_line() -> str:
    """The command that started this process, shell-quoted."""
    return " ".join(shlex.quote(a) for a in [Path(sys.argv[0]).name, *sys.argv[1:]])


def data_provenance(config, cases: Sequence) -> list[dict[str, Any]]:
    """Per dataset: type, case counts, annotated classes, licence and source, as given in the config."""
    catalog = ClassCatalog.from_json(config.catalog) if config.catalog else ClassCatalog.default()
    out = []
    for ds in config.datasets:
        mine = [c for c in cases if c.dataset == ds.name]
        classes = sorted({a for c in mine for a in c.annotated})
        out.append(
            {
                "dataset": ds.name,
                "type": ds.type,
                "train_cases": sum(c.split in ("train", "both") for c in mine),
                "val_cases": sum(c.split in ("val", "both") for c in mine),
                "annotated_classes": [catalog[c].name for c in classes],
                "licence": ds.licence or "not stated",
                "source": ds.source or "",
            }
        )
    return out


def build_metadata(
    config,
    *,
    step: int,
    cases: Sequence = (),
    validation: Mapping[str, float] | None = None,
    validation_step: int | None = None,
    init: str = "scratch",
    start_metadata: Mapping[str, Any] | None = None,
    embedding_sources: Mapping[str, str] | None = None,
    world_size: int = 1,
    device: str = "cpu",
    command: str | None = None,
    elapsed_minutes: float | None = None,
) -> dict[str, Any]:
    """The checkpoint metadata of a training run (JSON-serialisable)."""
    from .modeling import UPSTREAM_EMBEDDINGS_COPYRIGHT, UPSTREAM_EMBEDDINGS_LICENCE

    upstream_used = any("upstream" in s for s in (embedding_sources or {}).values())
    start = dict(start_metadata or {})
    # Licences of the class embeddings inside the weights, by where they came from.
    emb_licences = []
    if upstream_used:
        emb_licences.append(UPSTREAM_EMBEDDINGS_LICENCE)
    if any(s == "starting checkpoint" for s in (embedding_sources or {}).values()):
        inherited = (start.get("class_embeddings") or {}).get("licence") or start.get("licence") or "unspecified"
        emb_licences.append(f"{inherited} (from the starting checkpoint)")
    if any("text encoder" in s for s in (embedding_sources or {}).values()):
        emb_licences.append("MIT (computed with OpenAI CLIP ViT-B/32)")
    if any(s.startswith("file ") for s in (embedding_sources or {}).values()):
        emb_licences.append("as stated by the embeddings file's provider")
    meta: dict[str, Any] = {
        "name": config.name,
        "description": config.description,
        "licence": config.licence,
        "provenance": {
            "trained_with": f"UniversalSeg {__version__} (universalseg-train)",
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command": command or command_line(),
            "config_file": str(config.source_path) if config.source_path else None,
            "config": config.to_dict(),
            "config_digest": config.digest(),
            "steps": int(step),
            "init": init,
            "init_provenance": {k: start.get(k) for k in ("name", "licence", "provenance", "source") if start.get(k)},
            "world_size": int(world_size),
            "device": device,
            "elapsed_minutes": round(elapsed_minutes, 2) if elapsed_minutes is not None else None,
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        # The grid the engine must preprocess with for this model (UniversalSegLib.pipeline.model_preprocessing).
        "preprocessing": {
            "spacing_mm": [float(v) for v in config.spacing],
            "hu_window": [float(v) for v in config.hu_window],
            "roi_size": [int(v) for v in config.validation.roi_size],
        },
        "training_data": data_provenance(config, cases) if cases else [],
        "class_embeddings": {
            "sources": dict(embedding_sources or {}),
            "licence": "; ".join(dict.fromkeys(emb_licences)) or "unspecified",
            "copyright": UPSTREAM_EMBEDDINGS_COPYRIGHT if upstream_used else "",
        },
        "validation_dice": {k: round(float(v), 4) for k, v in (validation or {}).items()},
        "validation_step": validation_step,
    }
    if upstream_used:
        meta["licence_notes"] = (
            f"The 'organ_embedding' tensor holds the upstream class embeddings ({UPSTREAM_EMBEDDINGS_LICENCE}, "
            f"(c) {UPSTREAM_EMBEDDINGS_COPYRIGHT}); the network was trained conditioned on them."
        )
    if start.get("licence") and init != "scratch":
        meta["licence_notes"] = (
            meta.get("licence_notes", "") + f" Fine-tuned from {init} (licence {start['licence']})."
        ).strip()
    return meta


def read_state(path: str | Path) -> dict[str, Any]:
    """A training state written by ``fit`` (loaded without executing code from the file)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"training state not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read training state {path}: {str(exc).splitlines()[0][:200]}") from None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a UniversalSeg training state (format {STATE_FORMAT!r})")
    return state


def latest_state(run_dir: str | Path) -> Path | None:
    """The newest training state of a run folder (``checkpoints/last.json``, else the highest step file)."""
    folder = Path(run_dir) / "checkpoints"
    pointer = folder / "last.json"
    if pointer.is_file():
        try:
            name = json.loads(pointer.read_text())["file"]
            if (folder / name).is_file():
                return folder / name
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    states = sorted(folder.glob("step_*.pt"))
    return states[-1] if states else None


def model_from_state(state: Mapping[str, Any]) -> UniversalModel:
    """Rebuild the trained model (with class names and metadata) from a training state."""
    cfg = state["model_config"]
    model = UniversalModel(
        ModelConfig(cfg["architecture"], int(cfg["width"]), int(cfg.get("in_channels", 1))),
        num_classes=len(state["class_names"]),
    )
    model.load_state_dict(state["model"], strict=True)
    model.class_names = list(state["class_names"])
    meta = state.get("metadata") or {}
    model.metadata = json.loads(meta) if isinstance(meta, str) else dict(meta)
    return model


def export_model(
    source: str | Path,
    output: str | Path,
    *,
    which: str = "last",
    extra: Mapping[str, Any] | None = None,
    offered: "OfferedClasses | None" = None,
) -> Path:
    """Write a project checkpoint from a run folder (``which``: ``last`` state or ``best`` validated weights) or a
    training-state file. ``extra`` metadata (e.g. name, licence) overrides the recorded one. ``offered``: keep only the
    classes that passed the held-out Dice floor (recorded in the metadata entry ``held_out``)."""
    from UniversalSegLib.checkpoints import load_project_checkpoint

    source = Path(source)
    output = Path(output)
    if source.is_dir():
        if which == "best":
            best = source / "model_best.safetensors"
            if not best.is_file():
                raise InputError(f"{source} has no model_best.safetensors (no validation ran); export 'last' instead")
            model = load_project_checkpoint(best)
        else:
            state_path = latest_state(source)
            # fit's final export (after the final validation) and model_last.safetensors (written with each state)
            # hold the newest weights with their full metadata; use the newest of them that is current.
            candidates = [p for p in (source / "model.safetensors", source / "model_last.safetensors") if p.is_file()]
            if state_path is None and not candidates:
                raise InputError(
                    f"{source} holds no training state (checkpoints/step_*.pt); is it a run folder of 'fit'?"
                )
            current = [p for p in candidates if state_path is None or p.stat().st_mtime >= state_path.stat().st_mtime]
            if current:
                model = load_project_checkpoint(current[0])
            else:
                assert state_path is not None  # with no state, every candidate is current
                model = model_from_state(read_state(state_path))
    else:
        model = model_from_state(read_state(source))
    if offered is not None:
        model = keep_classes(model, offered.classes)
        model.metadata["held_out"] = offered.metadata()
    output.parent.mkdir(parents=True, exist_ok=True)
    return save_checkpoint(model, output, dict(extra or {}))


@dataclass
class OfferedClasses:
    """Which classes a shipped checkpoint offers: those whose held-out Dice (``universalseg-train evaluate`` on
    patients the model never saw) reaches ``floor``. ``dice``: class name -> held-out Dice; ``cases``: the held-out
    case names; ``classes``: the kept class names (a class the evaluation did not score is dropped)."""

    floor: float
    dice: dict[str, float]
    cases: list[str]
    evaluation: str

    @property
    def classes(self) -> list[str]:
        """Classes at or above the floor, less those whose published post-processing needs a class that is not kept
        (a right lung scored with the lung split, which needs the left lung, is not offered without it)."""
        from UniversalSegLib.postprocess import dependencies

        catalog = ClassCatalog.default()
        kept = {name: catalog.lookup(name).index for name, d in self.dice.items() if d >= self.floor}
        have = set(kept.values())
        return [name for name, index in kept.items() if dependencies([index]) <= have]

    def metadata(self) -> dict[str, Any]:
        return {
            "floor": self.floor,
            "evaluation": self.evaluation,
            "cases": self.cases,
            "dice": {k: round(v, 4) for k, v in self.dice.items()},
            "offered": self.classes,
        }

    @classmethod
    def from_evaluation(cls, path: str | Path, floor: float, model_key: str | None = None) -> "OfferedClasses":
        """Read an ``evaluation.json`` written by ``universalseg-train evaluate`` (its first model unless
        ``model_key`` names one)."""
        path = Path(path)
        try:
            report = json.loads(path.read_text(encoding="utf-8"))
            key = model_key or report["models"][0]
            summary = report["summary"][key]
        except (OSError, ValueError, KeyError, IndexError, TypeError):
            raise InputError(f"{path} is not an evaluation.json of 'universalseg-train evaluate'") from None
        if not 0 < floor < 1:
            raise InputError(f"the Dice floor must be between 0 and 1, got {floor}")
        dice = {name: float(s["dice"]) for name, s in summary.items() if s.get("dice") is not None}
        return cls(floor=floor, dice=dice, cases=list(report.get("cases", [])), evaluation=path.name)


def keep_classes(model: UniversalModel, names: Sequence[str]) -> UniversalModel:
    """The same network offering only ``names`` (its other class-embedding rows removed). The backbone and the
    controller are shared by all classes, so each kept class's output is unchanged."""
    catalog = ClassCatalog.default()
    position = {c: r for r, c in enumerate(model_class_indices(model, catalog, strict=False)) if c is not None}
    found = {n: info for n in names if (info := catalog.find(n)) is not None}
    missing = [n for n in names if n not in found or found[n].index not in position]
    if missing:
        raise InputError(f"the model has no class {', '.join(missing)}; it has: {', '.join(model.class_names)}")
    if not names:
        raise InputError(
            "no class reaches the Dice floor; the checkpoint would offer nothing (lower --floor or train longer)"
        )
    rows = [position[found[n].index] for n in names]
    kept = UniversalModel(model.config, num_classes=len(rows))
    state = {k: v for k, v in model.state_dict().items() if k != "organ_embedding"}
    kept.load_state_dict(state, strict=False)
    with torch.no_grad():
        kept.organ_embedding.copy_(model.organ_embedding[rows])
    kept.class_names = [model.class_names[i] for i in rows]
    kept.metadata = dict(model.metadata)
    return kept
