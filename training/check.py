"""``universalseg-train check``: validate a config against its files and report class coverage per dataset.

Checks, per case: image and label files exist and can be read; the label (or each mask) lies on the image's grid
(size, spacing, origin, orientation); label values are known (mapped, named or ignored); the case annotates at least
one class. Reports how many cases of each dataset annotate each class and in how many the class is present.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from UniversalSegLib.errors import UniversalSegError

from .config import TrainingConfig
from .datasets import (
    CaseSpec,
    class_masks,
    dataset_cases,
    geometry_mismatch,
    load_catalog,
    read_case_labels,
)


@dataclass
class CheckReport:
    """Result of :func:`check_config`. ``coverage[dataset][class name] = [annotated cases, cases where present]``
    (present is -1 when values were not read)."""

    datasets: dict[str, dict[str, Any]] = field(default_factory=dict)
    coverage: dict[str, dict[str, list[int]]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "datasets": self.datasets,
            "coverage": self.coverage,
            "errors": self.errors,
            "warnings": self.warnings,
        }

    def format(self) -> str:
        """Human-readable report: datasets, a class x dataset coverage table ("present/annotated"), errors, warnings."""
        lines = []
        for name, info in self.datasets.items():
            lines.append(f"dataset {name} ({info['type']}): {info['train']} training, {info['val']} validation case(s)")
        classes = sorted({c for cov in self.coverage.values() for c in cov}, key=lambda c: self._order.get(c, 999))
        if classes:
            names = list(self.coverage)
            width = max(len(c) for c in classes) + 2
            cols = [max(len(n), 7) + 2 for n in names]
            lines.append("")
            lines.append("class coverage (cases where present / cases annotating it):")
            lines.append("class".ljust(width) + "".join(n.ljust(w) for n, w in zip(names, cols)))
            for c in classes:
                cells = []
                for n, w in zip(names, cols):
                    cov = self.coverage[n].get(c)
                    cell = "" if cov is None else (f"?/{cov[0]}" if cov[1] < 0 else f"{cov[1]}/{cov[0]}")
                    cells.append(cell.ljust(w))
                lines.append(c.ljust(width) + "".join(cells))
        if self.warnings:
            lines.append("")
            lines.append(f"warnings ({len(self.warnings)}):")
            lines += [f"  {w}" for w in self.warnings]
        lines.append("")
        if self.errors:
            lines.append(f"errors ({len(self.errors)}):")
            lines += [f"  {e}" for e in self.errors]
        else:
            lines.append("config OK")
        return "\n".join(lines)

    _order: dict[str, int] = field(default_factory=dict, repr=False)


def _header(path: Path):
    """Image information without reading pixels (a DICOM folder is read fully through the engine's reader)."""
    import SimpleITK as sitk

    if path.is_dir():
        from UniversalSegLib.imageio import read_image

        return read_image(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    reader.ReadImageInformation()
    return reader


def check_case(case: CaseSpec, read_values: bool = True) -> tuple[list[str], dict[int, bool] | None]:
    """Errors of one case and, when values are read, whether each annotated class is present."""
    errors: list[str] = []
    if not case.image.exists():
        return [f"{case.name}: image not found: {case.image}"], None
    try:
        image = _header(case.image)
    except (RuntimeError, UniversalSegError) as exc:
        return [f"{case.name}: cannot read image {case.image} ({str(exc).strip().splitlines()[-1][:120]})"], None
    if image.GetDimension() != 3:
        return [f"{case.name}: image {case.image.name} is {image.GetDimension()}-D; CT volumes must be 3-D"], None
    for path in ([case.label] if case.label else []) + [p for _, p in case.masks]:
        if not path.exists():
            errors.append(f"{case.name}: label file not found: {path}")
            continue
        try:
            other = _header(path)
        except RuntimeError as exc:
            errors.append(f"{case.name}: cannot read label {path} ({str(exc).strip().splitlines()[-1][:120]})")
            continue
        why = geometry_mismatch(image, other)
        if why:
            errors.append(f"{case.name}: geometry mismatch: {path.name}: {why}")
    if errors or not read_values:
        return errors, None
    needs_image = any(r.side for _, refs in case.sources for r in refs)
    try:
        full = None
        if needs_image:
            from UniversalSegLib.imageio import read_image

            full = read_image(case.image)
        labels = read_case_labels(case, full)
    except UniversalSegError as exc:
        return [str(exc)], None
    present = {c: bool(m.any()) for c, m in class_masks(labels).items()}
    return errors, present


def check_config(config: TrainingConfig, read_values: bool = True, progress=None) -> CheckReport:
    """Validate every dataset and case of ``config`` (see the module docstring). ``read_values=False`` only checks
    files and headers (fast); ``progress(done, total, name)`` is called per case."""
    report = CheckReport()
    catalog = load_catalog(config)
    report._order = {c.name: c.index for c in catalog}
    all_cases: list[CaseSpec] = []
    per_dataset: dict[str, list[CaseSpec]] = {}
    for ds in config.datasets:
        try:
            cases = dataset_cases(ds, config, catalog)
        except UniversalSegError as exc:
            report.errors.append(f"dataset {ds.name}: {exc}")
            report.datasets[ds.name] = {"type": ds.type, "train": 0, "val": 0, "cases": 0}
            report.coverage[ds.name] = {}
            continue
        per_dataset[ds.name] = cases
        all_cases += cases
        report.datasets[ds.name] = {
            "type": ds.type,
            "train": sum(c.split in ("train", "both") for c in cases),
            "val": sum(c.split in ("val", "both") for c in cases),
            "cases": len(cases),
        }
        report.coverage[ds.name] = {}
    total = len(all_cases)
    done = 0
    for name, cases in per_dataset.items():
        cov = report.coverage[name]
        for case in cases:
            errors, present = check_case(case, read_values)
            report.errors += errors
            for c in case.annotated:
                entry = cov.setdefault(catalog[c].name, [0, 0 if read_values else -1])
                entry[0] += 1
                if present is not None and present.get(c):
                    entry[1] += 1
            done += 1
            if progress is not None:
                progress(done, total, case.name)
    train = [c for c in all_cases if c.split in ("train", "both")]
    if all_cases and not train:
        report.errors.append("no training cases: every case is in the validation split")
    if all_cases and not any(c.split in ("val", "both") for c in all_cases):
        report.warnings.append(
            "no validation cases: add 'split: val', 'val_cases' or 'val_fraction' to a dataset to measure Dice while training"
        )
    annotated = {c for case in train for c in case.annotated}
    if config.model.classes:
        try:
            wanted = [c.index for c in catalog.select(config.model.classes)]
        except UniversalSegError as exc:
            report.errors.append(f"model.classes: {exc}")
            wanted = []
        lacking = [catalog[c].name for c in wanted if c not in annotated]
        if lacking and config.model.init == "scratch":
            report.warnings.append(
                f"model class(es) no training case annotates (they will not be learned): {', '.join(lacking)}"
            )
        extra = [catalog[c].name for c in sorted(annotated) if c not in wanted]
        if extra:
            report.warnings.append(f"annotated class(es) outside model.classes (ignored): {', '.join(extra)}")
    if read_values:
        never = [
            name for name, cov in ((n, c) for ds in report.coverage.values() for n, c in ds.items()) if cov[1] == 0
        ]
        for cname in sorted(set(never)):
            if all(ds.get(cname, [0, 0])[1] == 0 for ds in report.coverage.values()):
                report.warnings.append(f"class {cname} is annotated but present in no case (only negatives)")
    crop = config.training.crop_size
    if any(s % 8 for s in crop) and (config.model.architecture or "unet") == "unet":
        report.errors.append(f"training.crop_size {list(crop)} must be a multiple of 8 for the U-Net")
    if any(s % 32 for s in crop) and config.model.architecture == "swinunetr":
        report.errors.append(f"training.crop_size {list(crop)} must be a multiple of 32 for Swin UNETR")
    return report
