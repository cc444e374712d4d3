"""File formats by name: the image suffixes read as scans and the output formats with their suffixes.

Light on purpose (no SimpleITK): the command line builds its choices from these tables before any scan is read.
"""

from __future__ import annotations

from pathlib import Path

from .errors import InputError

# Output format name -> file name suffixes that imply it (first one is the default when a name has none).
OUTPUT_FORMATS: dict[str, tuple[str, ...]] = {
    "seg.nrrd": (".seg.nrrd",),
    "nii": (".nii.gz", ".nii"),
    "nrrd": (".nrrd",),  # not .nhdr: its separate data file would not follow the atomic rename
    "dicom-seg": (".dcm",),
}
# Spellings accepted for --format.
_FORMAT_ALIASES = {
    "nii": "nii",
    "nii.gz": "nii",
    "nifti": "nii",
    "nrrd": "nrrd",
    "seg.nrrd": "seg.nrrd",
    "seg": "seg.nrrd",
    "slicer": "seg.nrrd",
    "dicom-seg": "dicom-seg",
    "dicomseg": "dicom-seg",
    "dcm": "dicom-seg",
    "dicom": "dicom-seg",
}
# Image files the engine and training read as scans (DICOM comes as a folder or .dcm files).
IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")


#: Formats of the per-class statistics table (``--stats``).
STATS_FORMATS: tuple[str, ...] = ("csv", "json")


def output_stem(name: str, fmt: str) -> str:
    """``name`` without the suffix of output format ``fmt`` it ends with ("seg.nii" -> "seg")."""
    for suffix in OUTPUT_FORMATS[fmt]:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def image_stem(name: str) -> str | None:
    """``name`` without its image suffix ("ct.nii.gz" -> "ct"; case-insensitive), None when it has none."""
    for suffix in IMAGE_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return None


def _format_from_suffix(path: Path) -> str | None:
    name = path.name.lower()
    for fmt, suffixes in OUTPUT_FORMATS.items():  # ".seg.nrrd" is tested before ".nrrd"
        if name.endswith(suffixes):
            return fmt
    return None


def output_format(path: str | Path, fmt: str | None = None) -> str:
    """The output format ("nii", "nrrd", "seg.nrrd" or "dicom-seg") from ``--format`` or else the file name suffix.

    Raises:
        InputError: unknown ``fmt``, a name whose suffix says another format than ``fmt``, or no format at all.
    """
    path = Path(path)
    implied = _format_from_suffix(path)
    if fmt is not None:
        chosen = _FORMAT_ALIASES.get(fmt.strip().lower())
        if chosen is None:
            raise InputError(f"unknown output format '{fmt}'; use one of: {', '.join(OUTPUT_FORMATS)}")
        if implied is not None and implied != chosen:
            raise InputError(
                f"output name '{path.name}' is a {implied} name but --format is {chosen}; "
                f"name the file *{OUTPUT_FORMATS[chosen][0]} or drop --format"
            )
        return chosen
    if implied is None:
        raise InputError(
            f"cannot tell the output format of '{path.name}'; name it *.nii.gz, *.nrrd, *.seg.nrrd or *.dcm, "
            "or pass --format nii|nrrd|seg.nrrd|dicom-seg"
        )
    return implied


def with_format_suffix(path: str | Path, fmt: str) -> Path:
    """``path`` with the default suffix of ``fmt`` appended when its name has no output suffix (``out`` -> ``out.nii.gz``)."""
    path = Path(path)
    return path if _format_from_suffix(path) else path.with_name(path.name + OUTPUT_FORMATS[fmt][0])
