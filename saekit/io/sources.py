"""Where a pretrained SAE's files come from: a local folder or a Hugging Face Hub repo.

Hub downloads go through `huggingface_hub.hf_hub_download`, so they land in (and are read back
from) the standard Hub cache: a second load works offline (HF_HUB_OFFLINE=1), `revision` pins a
branch, tag or commit, and `force_download` fetches again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

from saekit.io.releases import check_relative_path

log = logging.getLogger(__name__)
T = TypeVar("T")


class FileSource(Protocol):
    """Files of one SAE repo, by path inside it."""

    def describe(self, path: str = "") -> str:
        """A human-readable location, for error messages."""
        ...

    def fetch(self, path: str, required: bool = True) -> Path | None:
        """A local path to the file (downloading it if needed); None if absent and optional."""
        ...

    def read(self, path: str, reader: Callable[[Path], T]) -> T:
        """`reader(local path)`; a reader failure on a cached download re-fetches once."""
        ...


def join(folder: str, name: str) -> str:
    return f"{folder.strip('/')}/{name}" if folder.strip("/") else name


class LocalSource:
    """A folder on disk laid out like the Hub repo."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def describe(self, path: str = "") -> str:
        return str(self.root / path) if path else str(self.root)

    def fetch(self, path: str, required: bool = True) -> Path | None:
        check_relative_path(path, "file path")
        file = self.root / path
        if file.is_file():
            return file
        if required:
            raise FileNotFoundError(f"{file} not found")
        return None

    def read(self, path: str, reader: Callable[[Path], T]) -> T:
        file = self.fetch(path)
        assert file is not None
        return reader(file)


class HubSource:
    """A Hugging Face Hub model repo, read through the Hub cache."""

    def __init__(
        self,
        repo_id: str,
        revision: str | None = None,
        force_download: bool = False,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        endpoint: str | None = None,
    ) -> None:
        self.repo_id = repo_id
        self.revision = revision
        self.force_download = force_download
        self.token = token
        self.cache_dir = cache_dir
        self.endpoint = endpoint
        self._refetched: set[str] = set()
        #: Files fetched so far, so that reading a file's header and then its tensors asks
        #: the Hub once and downloads it once (force_download included).
        self._fetched: dict[str, Path] = {}
        #: Optional files that could not be checked because the Hub was unreachable.
        self.offline_misses: list[str] = []

    def describe(self, path: str = "") -> str:
        at = f"@{self.revision}" if self.revision else ""
        return f"{self.repo_id}{at}/{path}" if path else f"Hub repo {self.repo_id}{at}"

    def _download(self, path: str, force: bool) -> str:
        from huggingface_hub import hf_hub_download

        return hf_hub_download(
            self.repo_id,
            path,
            revision=self.revision,
            force_download=force,
            token=self.token,
            cache_dir=self.cache_dir,
            endpoint=self.endpoint,
        )

    def fetch(self, path: str, required: bool = True) -> Path | None:
        from huggingface_hub.errors import (
            EntryNotFoundError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        check_relative_path(path, "file path")
        if path in self._fetched:
            return self._fetched[path]
        try:
            local = Path(self._download(path, self.force_download))
        except LocalEntryNotFoundError as err:
            # Offline (or the Hub unreachable) and not in the cache. An optional file (such as
            # sparsity.safetensors) counts as absent, so a cached SAE still loads offline.
            if not required:
                self.offline_misses.append(path)
                return None
            raise FileNotFoundError(self.offline_message(path)) from err
        except RevisionNotFoundError as err:
            raise ValueError(
                f"revision {self.revision!r} not found in {self.repo_id}; use a branch, tag or "
                "commit that exists (default: main)"
            ) from err
        except RepositoryNotFoundError as err:
            raise ValueError(
                f"Hub repo {self.repo_id!r} not found (or private: pass token=... or log in "
                "with `hf auth login`)"
            ) from err
        except EntryNotFoundError as err:
            if required:
                raise FileNotFoundError(f"{self.describe(path)} not found on the Hub") from err
            return None
        self._fetched[path] = local
        return local

    def offline_message(self, path: str) -> str:
        return (
            f"cannot download {self.describe(path)}: the Hub cannot be reached (HF_HUB_OFFLINE "
            "is set or there is no network) and the file is not in the Hub cache; connect once "
            "to download it, or copy a Hub cache that holds it and point HF_HUB_CACHE at it"
        )

    def read(self, path: str, reader: Callable[[Path], T]) -> T:
        file = self.fetch(path)
        assert file is not None
        try:
            return reader(file)
        except (ValueError, OSError, RuntimeError) as err:
            if path in self._refetched:
                raise
            # A cached file that no longer parses is most often a truncated download.
            log.warning("%s could not be read (%s); downloading it again", path, err)
            self._refetched.add(path)
            try:
                fresh = Path(self._download(path, force=True))
            except Exception as fetch_err:
                raise ValueError(
                    f"the cached {self.describe(path)} is corrupt ({err}) and could not be "
                    f"downloaded again ({type(fetch_err).__name__}); connect to the network "
                    "and load with force_download=True"
                ) from err
            self._fetched[path] = fresh
            return reader(fresh)
