"""Model registry: the shipped entries, name lookup, local paths, bundled models, licence gate and cache status.

Downloads go to a real HTTP server on 127.0.0.1 (``http_server`` fixture in ``conftest.py``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from UniversalSegLib import download as dl
from UniversalSegLib.errors import CheckpointError, DownloadError, InputError
from UniversalSegLib.registry import (
    ACCEPT_LICENCE_ENV,
    DEFAULT_MODEL,
    ModelEntry,
    ModelRegistry,
    accept_licence,
    licence_accepted,
)

HF = "https://huggingface.co/ljwztc/CLIP-Driven-Universal-Model/resolve/main/"
CC = "CC BY-NC-ND 4.0"
CC_URL = "https://creativecommons.org/licenses/by-nc-nd/4.0/"


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("UNIVERSALSEG_HOME", str(tmp_path / "cache"))
    for var in (ACCEPT_LICENCE_ENV, "UNIVERSALSEG_ACCEPT_LICENCE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(dl, "_BACKOFF_S", 0.01)
    return tmp_path / "cache"


def _entry(**overrides) -> dict:
    entry = {
        "name": "test-model",
        "kind": "segmentation",
        "architecture": "unet",
        "description": "a test model",
        "licence": "Test Licence 1.0",
        "licence_url": "https://example.org/test-licence",
        "url": None,
        "filename": "test_model.pth",
        "size": None,
        "sha256": None,
        "bundled_path": None,
        "requires_licence_acceptance": True,
    }
    entry.update(overrides)
    return entry


def _registry(tmp_path: Path, *entries: dict, data_dir: Path | None = None) -> ModelRegistry:
    path = tmp_path / "registry" / "models.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"schema_version": 1, "models": list(entries)}), encoding="utf-8")
    return ModelRegistry.from_json(path, data_dir=data_dir)


@pytest.fixture
def served(http_server):
    """A registry entry downloadable from the local server: (server state, payload, entry dict)."""
    payload = os.urandom(300_000)
    url = http_server.add("/weights/test_model.pth", payload)
    return http_server, payload, _entry(url=url, size=len(payload), sha256=hashlib.sha256(payload).hexdigest())


# ------------------------------------------------------------------------------------------ shipped registry


def test_official_checkpoints_need_their_licence_and_default_model_runs_offline(tmp_path):
    """What the shipped entries make the registry do: the official checkpoints (CC BY-NC-ND 4.0) are refused until
    their licence is accepted, before any network access, and are cached under the file names their host uses; the
    default model resolves without any network."""
    registry = ModelRegistry.default()
    for name, filename in (
        ("universal-unet", "clip_driven_universal_unet.pth"),
        ("universal-swinunetr", "clip_driven_universal_swin_unetr.pth"),
    ):
        with pytest.raises(InputError) as info:
            registry.resolve(name)
        assert CC in str(info.value) and CC_URL in str(info.value) and "--accept-licence" in str(info.value)
        manual = registry.download_path(name)
        assert manual.name == filename and registry.cached_path(name) is None
        with pytest.raises(InputError, match=f"universalseg download {name}"):
            registry.resolve(name, download=False, accept_licence=True)
    assert registry.names("segmentation")[:2] == ["universal-unet", "universal-swinunetr"]
    default = registry.resolve(DEFAULT_MODEL)  # bundled: no download, no licence question
    assert default.is_file() and registry.get(DEFAULT_MODEL).kind == "segmentation"


def test_default_registry_text_encoder_matches_open_clip():
    entry = ModelRegistry.default().get("clip-vit-b-32")
    assert entry.kind == "text_encoder" and entry.licence == "MIT" and not entry.requires_licence_acceptance
    assert entry.url.split("/")[-2] == entry.sha256  # OpenAI's URLs carry the file's sha256
    open_clip_pretrained = pytest.importorskip("open_clip.pretrained")
    assert entry.url == open_clip_pretrained.get_pretrained_url("ViT-B-32", "openai")


def test_unknown_name_suggests_the_closest():
    registry = ModelRegistry.default()
    with pytest.raises(InputError, match="did you mean 'universal-swinunetr'") as info:
        registry.resolve("universal-swinunet")
    assert "universalseg models" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(InputError, match="did you mean 'universal-unet'"):
        registry.get("universl-unet")
    assert registry.get("Universal_UNet").name == "universal-unet"  # case and _/- do not matter


def test_resolve_existing_local_path_returns_it(tmp_path):
    checkpoint = tmp_path / "my_weights.pth"
    checkpoint.write_bytes(b"weights")
    registry = ModelRegistry.default()
    assert registry.resolve(checkpoint) == checkpoint
    assert registry.resolve(str(checkpoint)) == checkpoint


def test_resolve_missing_path_or_folder_is_explained(tmp_path):
    registry = ModelRegistry.default()
    with pytest.raises(InputError, match="checkpoint file not found: .*nope.pth"):
        registry.resolve(str(tmp_path / "nope.pth"))
    with pytest.raises(InputError, match="is a folder"):
        registry.resolve(tmp_path)
    with pytest.raises(InputError, match="no model given"):
        registry.resolve("  ")


# -------------------------------------------------------------------------------------------- licence gate


def test_licence_not_accepted_refuses_before_downloading(tmp_path, served):
    server, _, entry = served
    registry = _registry(tmp_path, entry)
    with pytest.raises(InputError) as info:
        registry.resolve("test-model")
    message = str(info.value)
    for needle in ("Test Licence 1.0", "https://example.org/test-licence", "--accept-licence", ACCEPT_LICENCE_ENV):
        assert needle in message
    assert "\n" not in message
    assert server.requests == []
    assert registry.cached_path("test-model") is None


def test_licence_accepted_by_argument_downloads_and_is_remembered(tmp_path, served, isolated_cache):
    server, payload, entry = served
    registry = _registry(tmp_path, entry)
    path = registry.resolve("test-model", accept_licence=True)
    assert path == isolated_cache / "models" / "test-model" / "test_model.pth"
    assert path.read_bytes() == payload
    assert licence_accepted(registry.get("test-model"))
    record = json.loads((isolated_cache / "licences.json").read_text())["accepted"]["test-model"]
    assert record["licence"] == "Test Licence 1.0" and record["licence_url"] == "https://example.org/test-licence"

    path.unlink()  # a later download needs no acceptance any more
    assert registry.resolve("test-model") == path and path.read_bytes() == payload
    assert len(server.requests) == 2


def test_licence_accepted_by_environment_is_remembered(tmp_path, served, monkeypatch):
    server, payload, entry = served
    registry = _registry(tmp_path, entry)
    monkeypatch.setenv(ACCEPT_LICENCE_ENV, "1")
    assert registry.resolve("test-model").read_bytes() == payload
    monkeypatch.delenv(ACCEPT_LICENCE_ENV)
    assert licence_accepted(registry.get("test-model"))


def test_changed_licence_must_be_accepted_again(tmp_path):
    entry = _registry(tmp_path, _entry(url="https://example.org/x.pth")).get("test-model")
    assert not licence_accepted(entry)
    accept_licence(entry)
    assert licence_accepted(entry)
    changed = ModelEntry(**{**entry.__dict__, "licence_url": "https://example.org/licence-v2"})
    assert not licence_accepted(changed)


def test_corrupt_acceptance_file_means_not_accepted(tmp_path, isolated_cache):
    entry = _registry(tmp_path, _entry(url="https://example.org/x.pth")).get("test-model")
    isolated_cache.mkdir(parents=True)
    (isolated_cache / "licences.json").write_text("{not json")
    assert not licence_accepted(entry)
    accept_licence(entry)  # rewrites the file
    assert licence_accepted(entry)


def test_download_failure_leaves_cache_empty(tmp_path, served):
    _, _, entry = served
    registry = _registry(tmp_path, {**entry, "sha256": "0" * 64})
    with pytest.raises(DownloadError, match="checksum mismatch"):
        registry.resolve("test-model", accept_licence=True)
    assert registry.cached_path("test-model") is None
    assert registry.describe()[0]["path"] == "not downloaded"
    assert list(registry.download_path("test-model").parent.glob("*.part")) == []


def test_not_downloaded_and_download_disabled(tmp_path, served):
    server, _, entry = served
    registry = _registry(tmp_path, entry)
    with pytest.raises(InputError, match="universalseg download test-model"):
        registry.resolve("test-model", download=False, accept_licence=True)
    assert server.requests == []


# ---------------------------------------------------------------------------------------------- cache status


def test_describe_reports_cache_status(tmp_path, served):
    _, payload, entry = served
    registry = _registry(tmp_path, entry, _entry(name="other", url="https://example.org/o.pth", size=2048))
    before = {row["name"]: row for row in registry.describe()}
    assert before["test-model"]["path"] == "not downloaded" and before["test-model"]["status"] == "not downloaded"
    assert before["test-model"]["licence"] == "Test Licence 1.0" and before["test-model"]["architecture"] == "unet"
    assert before["other"]["size"] == 2048 and before["other"]["size_text"] == "2.0 KiB"
    assert not before["test-model"]["licence_accepted"]

    path = registry.download("test-model", accept_licence=True)
    after = {row["name"]: row for row in registry.describe()}
    assert after["test-model"]["path"] == str(path) and after["test-model"]["status"] == "downloaded"
    assert after["test-model"]["size"] == len(payload) and after["test-model"]["licence_accepted"]
    assert after["other"]["path"] == "not downloaded"


def test_bundled_model_resolves_without_network(tmp_path, http_server):
    data_dir = tmp_path / "package_data"
    (data_dir / "models").mkdir(parents=True)
    (data_dir / "models" / "tiny.pt").write_bytes(b"tiny weights")
    registry = _registry(
        tmp_path,
        _entry(
            name="universalseg-tiny",
            bundled_path="models/tiny.pt",
            filename="tiny.pt",
            licence="Apache-2.0",
            requires_licence_acceptance=False,
        ),
        data_dir=data_dir,
    )
    assert registry.resolve("universalseg-tiny") == data_dir / "models" / "tiny.pt"
    row = registry.describe()[0]
    assert row["status"] == "bundled" and row["path"] == str(data_dir / "models" / "tiny.pt") and row["size"] == 12
    assert http_server.requests == []


def test_missing_bundled_file_is_a_checkpoint_error(tmp_path):
    registry = _registry(
        tmp_path,
        _entry(name="universalseg-tiny", bundled_path="models/tiny.pt", requires_licence_acceptance=False),
        data_dir=tmp_path / "empty",
    )
    with pytest.raises(CheckpointError, match="reinstall"):
        registry.resolve("universalseg-tiny")


def test_bundled_paths_default_to_the_registry_folder(tmp_path):
    registry = _registry(tmp_path, _entry(bundled_path="models/t.pt", filename=None))
    assert registry.bundled_file("test-model") == tmp_path / "registry" / "models" / "t.pt"
    assert registry.get("test-model").filename == "t.pt"


# ------------------------------------------------------------------------------------------ file validation


@pytest.mark.parametrize(
    ("overrides", "problem"),
    [
        ({"filename": "../evil.pth", "url": "https://example.org/x"}, "plain file name"),
        ({"url": None, "bundled_path": None}, "needs a 'url'"),
        ({"url": "https://example.org/x", "bundled_path": "../outside.pt"}, "relative path inside"),
        ({"url": "ftp://example.org/x"}, "http\\(s\\) URL"),
        ({"url": "https://example.org/x", "sha256": "xyz"}, "64 hexadecimal"),
        ({"url": "https://example.org/x", "size": -1}, "positive number of bytes"),
        ({"url": "https://example.org/x", "kind": "detector"}, "'kind' must be one of"),
        ({"url": "https://example.org/x", "licence": ""}, "'licence' must be a non-empty string"),
        ({"url": "https://example.org/x", "weights": "x"}, "unknown key"),
        ({"url": "https://example.org/x", "name": "Bad Name"}, "lowercase"),
    ],
)
def test_malformed_entries_are_refused_with_the_entry_named(tmp_path, overrides, problem):
    with pytest.raises(InputError, match=problem) as info:
        _registry(tmp_path, _entry(**overrides))
    assert "entry #1" in str(info.value) and "models.json" in str(info.value)


def test_duplicate_names_and_unreadable_files_are_refused(tmp_path):
    entry = _entry(url="https://example.org/x")
    with pytest.raises(InputError, match="listed twice"):
        _registry(tmp_path, entry, entry)
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(InputError, match="not readable JSON"):
        ModelRegistry.from_json(bad)
    with pytest.raises(InputError, match="not found"):
        ModelRegistry.from_json(tmp_path / "absent.json")


def test_listing_does_not_create_the_cache(isolated_cache):
    ModelRegistry.default().describe()
    assert not isolated_cache.exists()
