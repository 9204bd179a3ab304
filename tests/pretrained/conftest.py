"""Shared fixtures: a stand-in Hub endpoint and Hub caches laid out as huggingface_hub does."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from fake_hub_server import FakeHub


def write_hub_cache(cache_dir: Path, repo_id: str, files: dict[str, bytes], commit: str) -> Path:
    """Lay out `files` as huggingface_hub's cache does after downloading them at `commit`:
    models--owner--name/{blobs/<etag>, snapshots/<commit>/<path> -> blob, refs/main}."""
    repo = cache_dir / ("models--" + repo_id.replace("/", "--"))
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    for path, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


def folder_files(folder: Path, prefix: str) -> dict[str, bytes]:
    """Every file under `folder`, keyed by its path in a repo under `prefix`."""
    return {
        f"{prefix}/{p.relative_to(folder).as_posix()}".lstrip("/"): p.read_bytes()
        for p in folder.rglob("*")
        if p.is_file()
    }


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """HF_HUB_OFFLINE=1 as huggingface_hub sees it (it reads the variable at import)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def online(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Hub reachable as huggingface_hub sees it, even where the shell sets
    HF_HUB_OFFLINE=1 (an offline cluster): tests that talk to a stand-in Hub need that."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


@pytest.fixture
def fake_hub(online: None) -> Iterator[FakeHub]:
    with FakeHub() as hub:
        yield hub


class HubCache:
    """A Hub cache folder under a test's tmp_path; `add` lays out one repo snapshot."""

    def __init__(self, root: Path) -> None:
        self.dir = root

    def add(self, repo_id: str, files: dict[str, bytes], commit: str = "a" * 40) -> Path:
        return write_hub_cache(self.dir, repo_id, files, commit)

    def add_folder(self, repo_id: str, folder: Path, prefix: str, commit: str = "a" * 40) -> Path:
        return self.add(repo_id, folder_files(folder, prefix), commit)


@pytest.fixture
def hub_cache(tmp_path: Path) -> HubCache:
    return HubCache(tmp_path / "hub-cache")
