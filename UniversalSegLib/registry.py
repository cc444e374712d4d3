"""Model registry: which weights UniversalSeg can use, where they come from, and under which licence.

The registry is a JSON data file (``UniversalSegLib/data/models.json``) listing the official checkpoints (downloaded on
first use into the per-user cache, :func:`UniversalSegLib.download.cache_dir`), models bundled with the package
(``bundled_path``, relative to the data folder) and auxiliary weights such as the CLIP text encoder. Anywhere a model
name is accepted, the path of a local checkpoint file is accepted too (:meth:`ModelRegistry.resolve`).

Weights whose licence needs consent (the official checkpoints are CC BY-NC-ND 4.0) are downloaded only after the user
accepted it once: ``accept_licence=True`` (CLI ``--accept-licence``), ``UNIVERSALSEG_ACCEPT_LICENSE=1``, or an
acceptance remembered in ``<cache>/licences.json``.
"""

from __future__ import annotations

import contextlib
import difflib
import json
import os
import re
import tempfile
import types
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any, Iterable, Iterator, Mapping

from .download import DownloadProgress, cache_dir, download_file, format_size
from .errors import CheckpointError, InputError

__all__ = [
    "ACCEPT_LICENCE_ENV",
    "DEFAULT_MODEL",
    "MODEL_KINDS",
    "ModelEntry",
    "ModelRegistry",
    "accept_licence",
    "licence_accepted",
]

#: Registry name used when no model is given.
DEFAULT_MODEL: str = "universalseg-tiny"
#: Environment variable that accepts every model licence (``1``/``true``/``yes``/``on``).
ACCEPT_LICENCE_ENV = "UNIVERSALSEG_ACCEPT_LICENSE"
_ACCEPT_LICENCE_ENV_ALIASES = (ACCEPT_LICENCE_ENV, "UNIVERSALSEG_ACCEPT_LICENCE")  # British spelling, as the flag
MODEL_KINDS = ("segmentation", "text_encoder")
_LICENCES_FILE = "licences.json"
_DEFAULT_JSON = Path(__file__).resolve().parent / "data" / "models.json"
_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt", ".safetensors", ".bin", ".tar")


@dataclass(frozen=True)
class ModelEntry:
    """One registry entry.

    Attributes:
        name: registry name, lowercase (e.g. ``"universal-unet"``).
        architecture: ``"unet"`` | ``"swinunetr"`` for segmentation models; an identifier for other kinds.
        description: one sentence for listings.
        licence: licence name, e.g. ``"CC BY-NC-ND 4.0"``; licence_url: where to read it.
        url: download URL, or None for bundled-only models.
        filename: file name in the cache (no folders).
        size: size in bytes, None if unknown. sha256: hex digest, None if unknown (then only completeness is checked).
        bundled_path: path relative to the registry's data folder for models shipped with the package, else None.
        requires_licence_acceptance: whether the user must accept ``licence`` before the weights are downloaded/used.
        kind: ``"segmentation"`` or ``"text_encoder"``.
        extra: free-form metadata (homepage, format, ...); not used for equality.
    """

    name: str
    architecture: str
    description: str
    licence: str
    licence_url: str
    url: str | None
    filename: str
    size: int | None = None
    sha256: str | None = None
    bundled_path: str | None = None
    requires_licence_acceptance: bool = True
    kind: str = "segmentation"
    extra: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)


# ---------------------------------------------------------------------------------------------------- licences


def _licences_path(create: bool) -> Path:
    return cache_dir(create=create) / _LICENCES_FILE


def _read_acceptances() -> dict[str, Any]:
    path = _licences_path(create=False)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # missing or unreadable: nothing accepted (the user is asked again)
        return {}
    accepted = data.get("accepted") if isinstance(data, dict) else None
    return accepted if isinstance(accepted, dict) else {}


def _env_accepts() -> bool:
    return any(
        os.environ.get(var, "").strip().lower() in {"1", "true", "yes", "on"} for var in _ACCEPT_LICENCE_ENV_ALIASES
    )


def licence_accepted(entry: ModelEntry) -> bool:
    """True if ``entry`` needs no acceptance, ``$UNIVERSALSEG_ACCEPT_LICENSE`` accepts, or it was accepted before.

    A remembered acceptance counts only for the same licence name and URL (a changed licence is asked again).
    """
    if not entry.requires_licence_acceptance or _env_accepts():
        return True
    record = _read_acceptances().get(entry.name)
    return (
        isinstance(record, dict)
        and record.get("licence") == entry.licence
        and record.get("licence_url") == entry.licence_url
    )


def accept_licence(entry: ModelEntry) -> None:
    """Remember in ``<cache>/licences.json`` that the user accepted ``entry``'s licence (atomic write)."""
    _remember_acceptance(entry)


def _remember_acceptance(entry: ModelEntry) -> None:
    path = _licences_path(create=True)
    accepted = _read_acceptances()
    accepted[entry.name] = {
        "licence": entry.licence,
        "licence_url": entry.licence_url,
        "accepted_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    payload = json.dumps({"schema_version": 1, "accepted": accepted}, indent=2, sort_keys=True)
    fd, tmp = tempfile.mkstemp(prefix=".licences-", suffix=".json", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(payload + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise InputError(
            f"cannot record the licence acceptance in {path} ({exc.strerror or exc}); "
            "set UNIVERSALSEG_HOME to a writable folder"
        ) from exc


def _licence_refusal(entry: ModelEntry) -> InputError:
    return InputError(
        f"the weights of model '{entry.name}' are licensed under {entry.licence} ({entry.licence_url}); "
        f"read the licence, then accept it once with --accept-licence "
        f"(e.g. `universalseg download {entry.name} --accept-licence`, or accept_licence=True in Python) "
        f"or by setting {ACCEPT_LICENCE_ENV}=1"
    )


# ---------------------------------------------------------------------------------------------------- registry


def _normalise_name(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _looks_like_path(text: str) -> bool:
    return "/" in text or "\\" in text or text.startswith(("~", ".")) or text.lower().endswith(_CHECKPOINT_SUFFIXES)


class ModelRegistry:
    """An ordered collection of :class:`ModelEntry`, with lookup, cache status, licence gate and download."""

    def __init__(self, entries: Iterable[ModelEntry], data_dir: Path, source: Path | None = None) -> None:
        """
        Args:
            entries: the models; names must be unique.
            data_dir: folder that ``bundled_path`` values are relative to.
            source: the JSON file the entries came from (for messages only).
        """
        self._entries: dict[str, ModelEntry] = {}
        for entry in entries:
            if entry.name in self._entries:
                raise InputError(f"model registry {source or ''}: the name '{entry.name}' is listed twice")
            self._entries[entry.name] = entry
        self.data_dir = Path(data_dir)
        self.source = source

    # -- construction ------------------------------------------------------------------------------------------

    @classmethod
    def default(cls) -> "ModelRegistry":
        """The registry shipped with the package (``UniversalSegLib/data/models.json``)."""
        return cls.from_json(_DEFAULT_JSON)

    @classmethod
    def from_json(cls, path: str | Path, data_dir: str | Path | None = None) -> "ModelRegistry":
        """Load a registry file; ``bundled_path`` values are relative to ``data_dir`` (default: the file's folder).

        Every entry is validated; a malformed file raises InputError naming the file, the entry and the problem.
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise InputError(f"model registry file not found: {path}") from exc
        except (OSError, ValueError) as exc:
            raise InputError(f"model registry {path} is not readable JSON ({exc}); fix or replace the file") from exc
        if not isinstance(data, dict) or not isinstance(data.get("models"), list):
            raise InputError(f"model registry {path} must be a JSON object with a 'models' list")
        if data.get("schema_version", 1) != 1:
            raise InputError(
                f"model registry {path} has schema_version {data.get('schema_version')!r}; this version of "
                "UniversalSeg reads version 1: update UniversalSeg"
            )
        entries = [_entry_from_dict(item, i, path) for i, item in enumerate(data["models"])]
        return cls(entries, Path(data_dir) if data_dir is not None else path.parent, source=path)

    # -- lookup ------------------------------------------------------------------------------------------------

    def __iter__(self) -> Iterator[ModelEntry]:
        return iter(self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._find(name) is not None

    def names(self, kind: str | None = None) -> list[str]:
        """Entry names in registry order, optionally only those of one ``kind``."""
        return [e.name for e in self.entries(kind)]

    def entries(self, kind: str | None = None) -> list[ModelEntry]:
        """Entries in registry order, optionally only those of one ``kind`` (e.g. ``"segmentation"``)."""
        if kind is not None and kind not in MODEL_KINDS:
            raise InputError(f"unknown model kind {kind!r}; use one of {', '.join(MODEL_KINDS)}")
        return [e for e in self._entries.values() if kind is None or e.kind == kind]

    def _find(self, name: str) -> ModelEntry | None:
        if name in self._entries:
            return self._entries[name]
        wanted = _normalise_name(name)  # "Universal_UNet" finds "universal-unet"
        return next((e for e in self._entries.values() if _normalise_name(e.name) == wanted), None)

    def get(self, name: str) -> ModelEntry:
        """The entry called ``name`` (case and ``_``/``-`` insensitive); InputError with a suggestion otherwise."""
        entry = self._find(name)
        if entry is not None:
            return entry
        normalised = {_normalise_name(n): n for n in self._entries}
        close = difflib.get_close_matches(_normalise_name(name), list(normalised), n=1, cutoff=0.5)
        hint = f"did you mean '{normalised[close[0]]}'? " if close else ""
        raise InputError(
            f"unknown model '{name}': {hint}known models: {', '.join(self._entries)} "
            "(see `universalseg models`), or pass the path of a checkpoint file"
        )

    # -- files -------------------------------------------------------------------------------------------------

    def _entry(self, entry: ModelEntry | str) -> ModelEntry:
        return entry if isinstance(entry, ModelEntry) else self.get(entry)

    def bundled_file(self, entry: ModelEntry | str) -> Path | None:
        """Where a bundled model's file should be (whether or not it exists); None for non-bundled entries."""
        entry = self._entry(entry)
        return self.data_dir / entry.bundled_path if entry.bundled_path else None

    def download_path(self, entry: ModelEntry | str) -> Path:
        """Where ``entry`` is (or would be) downloaded: ``<cache>/models/<name>/<filename>``."""
        entry = self._entry(entry)
        return cache_dir(create=False) / "models" / entry.name / entry.filename

    def cached_path(self, entry: ModelEntry | str) -> Path | None:
        """The local file of ``entry`` if it is bundled or already downloaded, else None.

        A file at the download path is complete and verified: downloads are renamed there only after verification.
        """
        entry = self._entry(entry)
        bundled = self.bundled_file(entry)
        if bundled is not None and bundled.is_file():
            return bundled
        downloaded = self.download_path(entry)
        return downloaded if downloaded.is_file() else None

    def resolve(
        self,
        name_or_path: str | Path,
        *,
        accept_licence: bool = False,
        download: bool = True,
        progress: DownloadProgress | None = None,
    ) -> Path:
        """The checkpoint file for a registry name or a local path, downloading it if needed.

        Args:
            name_or_path: path of an existing checkpoint file (returned as is, ``~`` expanded), or a registry name.
            accept_licence: accept (and remember) the model's licence; also ``$UNIVERSALSEG_ACCEPT_LICENSE=1``.
            download: if False, a model that is not bundled or cached raises InputError instead of downloading.
            progress: download progress callback ``progress(bytes_done, total_or_None)``, e.g. ``tqdm_progress``.

        Raises:
            InputError: path not found / a folder, unknown name (with a suggestion), licence not accepted,
                model not downloaded and ``download=False``.
            CheckpointError: a bundled model's file is missing from the installation.
            DownloadError: the download failed or did not verify.
        """
        text = str(name_or_path).strip()
        if not text:
            raise InputError("no model given: pass a model name from `universalseg models` or a checkpoint file path")
        pathlike = isinstance(name_or_path, Path) or _looks_like_path(text)
        candidate = Path(text).expanduser()
        if candidate.is_file():
            return candidate
        if pathlike or self._find(text) is None:
            if candidate.is_dir():
                raise InputError(f"model path {candidate} is a folder; pass the checkpoint file inside it")
            if pathlike:
                raise InputError(
                    f"checkpoint file not found: {candidate}; check the path, or use a model name from "
                    "`universalseg models`"
                )
        entry = self.get(text)  # raises the "did you mean" error for unknown names

        bundled = self.bundled_file(entry)
        if bundled is not None and bundled.is_file():
            self._licence_gate(entry, accept_licence)
            return bundled
        downloaded = self.download_path(entry)
        if downloaded.is_file():
            return downloaded  # complete and verified; it got here through the licence gate of an earlier run
        if entry.url is None:
            raise CheckpointError(
                f"the bundled model '{entry.name}' is missing from the installation ({bundled}); reinstall "
                "UniversalSeg, or pass the path of a checkpoint file"
            )
        if not download:
            raise InputError(
                f"model '{entry.name}' is not downloaded yet; run `universalseg download {entry.name}` "
                "or allow downloading"
            )
        self._licence_gate(entry, accept_licence)
        cache_dir(create=True)  # a clear InputError if the cache folder cannot be created
        return download_file(entry.url, downloaded, sha256=entry.sha256, expected_size=entry.size, progress=progress)

    @staticmethod
    def _licence_gate(entry: ModelEntry, accept: bool) -> None:
        """Remember an acceptance given now (argument or environment); refuse if the licence was never accepted."""
        if not entry.requires_licence_acceptance:
            return
        if accept or _env_accepts():
            _remember_acceptance(entry)
        elif not licence_accepted(entry):
            raise _licence_refusal(entry)

    def download(self, name: str, *, accept_licence: bool = False, progress: DownloadProgress | None = None) -> Path:
        """``universalseg download NAME``: make the registry model ``name`` available locally; returns its path."""
        entry = self.get(name)
        return self.resolve(entry.name, accept_licence=accept_licence, download=True, progress=progress)

    def describe(self) -> list[dict[str, Any]]:
        """Rows for ``universalseg models``, one per entry, in registry order.

        Keys: name, kind, architecture, description, licence, licence_url, licence_accepted (bool), default (bool),
        status ("bundled" | "downloaded" | "not downloaded"), path (str, or "not downloaded"), size (bytes of the
        local file, else the registry's size, else None) and size_text (e.g. "246.9 MiB", "unknown").
        """
        rows = []
        for entry in self:
            local = self.cached_path(entry)
            bundled = self.bundled_file(entry)
            if local is None:
                status = "not downloaded"
            elif bundled is not None and local == bundled:
                status = "bundled"
            else:
                status = "downloaded"
            size = local.stat().st_size if local is not None else entry.size
            rows.append(
                {
                    "name": entry.name,
                    "kind": entry.kind,
                    "architecture": entry.architecture,
                    "description": entry.description,
                    "licence": entry.licence,
                    "licence_url": entry.licence_url,
                    "licence_accepted": licence_accepted(entry),
                    "default": entry.name == DEFAULT_MODEL,
                    "status": status,
                    "path": str(local) if local is not None else "not downloaded",
                    "size": size,
                    "size_text": format_size(size),
                }
            )
        return rows


# ------------------------------------------------------------------------------------------- entry validation


_FIELD_NAMES = {f.name for f in fields(ModelEntry)}
_REQUIRED = ("name", "architecture", "licence", "licence_url")


def _entry_from_dict(item: Any, index: int, path: Path) -> ModelEntry:
    label = f"model registry {path}, entry #{index + 1}"
    if not isinstance(item, dict):
        raise InputError(f"{label}: must be a JSON object")
    if isinstance(item.get("name"), str):
        label += f" ('{item['name']}')"

    def bad(problem: str) -> InputError:
        return InputError(f"{label}: {problem}")

    unknown = sorted(k for k in item if k not in _FIELD_NAMES and not k.startswith("_"))
    if unknown:
        raise bad(f"unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(_FIELD_NAMES))}")
    for key in _REQUIRED:
        if not isinstance(item.get(key), str) or not item[key].strip():
            raise bad(f"'{key}' must be a non-empty string")
    name = item["name"]
    if not _NAME_RE.match(name):
        raise bad("'name' must be lowercase letters, digits, '.', '_' or '-'")

    kind = item.get("kind", "segmentation")
    if kind not in MODEL_KINDS:
        raise bad(f"'kind' must be one of {', '.join(MODEL_KINDS)}, got {kind!r}")

    url = item.get("url")
    if url is not None and (not isinstance(url, str) or not re.match(r"^https?://\S+$", url, flags=re.IGNORECASE)):
        raise bad(f"'url' must be an http(s) URL or null, got {url!r}")

    bundled_path = item.get("bundled_path")
    if bundled_path is not None:
        pure = PurePosixPath(str(bundled_path))
        if not isinstance(bundled_path, str) or not bundled_path or pure.is_absolute() or ".." in pure.parts:
            raise bad(f"'bundled_path' must be a relative path inside the data folder, got {bundled_path!r}")
    if url is None and bundled_path is None:
        raise bad("needs a 'url' to download from or a 'bundled_path'")

    filename = item.get("filename")
    if filename is None:  # default: last component of the bundled path or URL
        if bundled_path:
            source = bundled_path
        else:
            assert url is not None  # checked above: without a bundled_path there is a url
            source = url.split("?")[0].rstrip("/")
        filename = PurePosixPath(source).name
    if (
        not isinstance(filename, str)
        or filename in {"", ".", ".."}
        or "/" in filename
        or "\\" in filename
        or filename.endswith((".part", ".lock", ".meta"))
    ):
        raise bad(f"'filename' must be a plain file name (no folders), got {filename!r}")

    size = item.get("size")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size <= 0):
        raise bad(f"'size' must be a positive number of bytes or null, got {size!r}")

    sha256 = item.get("sha256")
    if sha256 is not None:
        if not isinstance(sha256, str) or not _SHA256_RE.match(sha256.strip().lower()):
            raise bad(f"'sha256' must be 64 hexadecimal characters or null, got {sha256!r}")
        sha256 = sha256.strip().lower()

    requires = item.get("requires_licence_acceptance", True)
    if not isinstance(requires, bool):
        raise bad("'requires_licence_acceptance' must be true or false")
    description = item.get("description", "")
    if not isinstance(description, str):
        raise bad("'description' must be a string")
    extra = item.get("extra") or {}
    if not isinstance(extra, dict):
        raise bad("'extra' must be a JSON object")

    return ModelEntry(
        name=name,
        architecture=item["architecture"],
        description=description,
        licence=item["licence"],
        licence_url=item["licence_url"],
        url=url,
        filename=filename,
        size=size,
        sha256=sha256,
        bundled_path=bundled_path,
        requires_licence_acceptance=requires,
        kind=kind,
        extra=types.MappingProxyType(dict(extra)),
    )
