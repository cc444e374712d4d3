"""UniversalSeg training: partially labelled datasets in, Universal Model checkpoints out.

Command line: ``universalseg-train check | fit | evaluate | export`` (:mod:`training.cli`). From Python::

    from training import load_config, fit
    result = fit(load_config("training/configs/tiny_holdout_abdomen.yaml"))
"""

from __future__ import annotations


def __getattr__(name: str):
    # Heavy modules (torch, MONAI) load on first use.
    if name in ("load_config", "parse_config", "TrainingConfig"):
        from . import config

        return getattr(config, name)
    if name in ("fit", "FitResult"):
        from . import loop

        return getattr(loop, name)
    if name == "check_config":
        from .check import check_config

        return check_config
    if name in ("evaluate_models", "format_table"):
        from . import evaluate

        return getattr(evaluate, name)
    if name == "export_model":
        from .export import export_model

        return export_model
    if name == "PartialLabelLoss":
        from .losses import PartialLabelLoss

        return PartialLabelLoss
    raise AttributeError(f"module 'training' has no attribute {name!r}")


__all__ = [
    "load_config",
    "parse_config",
    "TrainingConfig",
    "fit",
    "FitResult",
    "check_config",
    "evaluate_models",
    "format_table",
    "export_model",
    "PartialLabelLoss",
]
