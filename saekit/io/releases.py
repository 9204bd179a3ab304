"""The registry of published SAE releases: which Hub repo holds which SAE, in which layout.

The data ships as `saekit/io/data/releases.json` (built by scripts/build_release_registry.py;
the facts come from sae-lens's registry, see LICENSE-THIRD-PARTY). Its shape:

    {"format_version": 1,
     "releases": {
       "<release name>": {
         "model": "gpt2-small",            # model the SAEs read
         "repo_id": "owner/name",          # Hugging Face Hub model repo
         "layout": "native",               # file layout, see saekit.io.converters
         "config_overrides": {...},        # optional: cfg.json keys to override
         "aliases": ["short-name"],        # optional: other names for the release
         "saes": [{"id": "...",            # what users pass as sae_id
                   "path": "...",          # folder in the repo; defaults to id
                   "l0": 10.0, "variance_explained": 0.9, "neuronpedia_id": "...",
                   "norm_scaling_factor": 1.5}]}}}   # all optional

Add releases at run time with `register_release`.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache, cached_property
from importlib import resources
from pathlib import PurePosixPath
from typing import Any

DATA_FILE = "releases.json"


def check_relative_path(value: str, what: str) -> str:
    """Refuse ids that would escape the folder they are joined to ('..', absolute paths)."""
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    if "\\" in value or "\x00" in value:
        raise ValueError(f"{what} {value!r} may not contain backslashes or NUL characters")
    path = PurePosixPath(value)
    if path.is_absolute() or (len(value) > 1 and value[1] == ":"):
        raise ValueError(f"{what} {value!r} is an absolute path; give a path inside the repo")
    if ".." in path.parts:
        raise ValueError(f"{what} {value!r} contains '..'; give a path inside the repo")
    return value


@dataclass(frozen=True)
class PretrainedEntry:
    """One published SAE of a release."""

    id: str
    path: str
    l0: float | None = None
    variance_explained: float | None = None
    neuronpedia_id: str | None = None
    norm_scaling_factor: float | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any], release: str) -> PretrainedEntry:
        sae_id = data["id"]
        path = data.get("path", sae_id)
        check_relative_path(path, f"path of {sae_id!r} in release {release!r}")
        return cls(
            id=sae_id,
            path=path,
            l0=data.get("l0"),
            variance_explained=data.get("variance_explained"),
            neuronpedia_id=data.get("neuronpedia_id"),
            norm_scaling_factor=data.get("norm_scaling_factor"),
        )


@dataclass(frozen=True)
class Release:
    """A group of SAEs published together in one Hub repo."""

    name: str
    model: str
    repo_id: str
    layout: str
    raw_saes: tuple[dict[str, Any], ...] = field(repr=False)
    """The SAE records as stored; `saes` builds entries from them on first use (the registry
    holds ~14k SAEs and most commands touch one release)."""
    config_overrides: dict[str, Any] | None = None
    aliases: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, name: str, data: dict[str, Any]) -> Release:
        missing = [key for key in ("model", "repo_id", "layout", "saes") if key not in data]
        if missing:
            raise ValueError(f"release {name!r} has no {missing} field(s)")
        return cls(
            name=name,
            model=data["model"],
            repo_id=data["repo_id"],
            layout=data["layout"],
            raw_saes=tuple(data["saes"]),
            config_overrides=data.get("config_overrides"),
            aliases=tuple(data.get("aliases", ())),
        )

    @cached_property
    def saes(self) -> tuple[PretrainedEntry, ...]:
        return tuple(PretrainedEntry.from_dict(s, self.name) for s in self.raw_saes)

    @cached_property
    def _by_id(self) -> dict[str, PretrainedEntry]:
        by_id = {sae.id: sae for sae in self.saes}
        if len(by_id) != len(self.saes):
            raise ValueError(f"release {self.name!r} lists an SAE id twice")
        return by_id

    def __len__(self) -> int:
        return len(self.raw_saes)

    @property
    def sae_ids(self) -> list[str]:
        return [sae.id for sae in self.saes]

    def sae(self, sae_id: str | None) -> PretrainedEntry:
        """The SAE `sae_id`; an unknown id is answered with the release's ids or the closest."""
        if sae_id is None:
            if len(self.saes) == 1:
                return self.saes[0]
            raise ValueError(
                f"release {self.name!r} holds {len(self.saes)} SAEs; pass sae_id, one of: "
                f"{_preview(self.sae_ids)} (`saekit pretrained show {self.name}` lists them)"
            )
        check_relative_path(sae_id, "sae_id")
        if sae_id in self._by_id:
            return self._by_id[sae_id]
        close = difflib.get_close_matches(sae_id, self.sae_ids, n=5, cutoff=0.5)
        if close:
            hint = f"closest ids: {', '.join(close)}"
        else:
            hint = f"its ids are: {_preview(self.sae_ids)}"
        raise ValueError(
            f"release {self.name!r} has no SAE {sae_id!r}; {hint} "
            f"(`saekit pretrained show {self.name}` lists all {len(self.saes)})"
        )


def _preview(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown if len(names) <= limit else f"{shown}, ... ({len(names) - limit} more)"


_EXTRA: dict[str, Release] = {}


@cache
def _builtin_releases() -> dict[str, Release]:
    text = resources.files("saekit.io").joinpath("data", DATA_FILE).read_text(encoding="utf-8")
    raw = json.loads(text)
    if raw.get("format_version") != 1:
        raise ValueError(f"{DATA_FILE}: format_version {raw.get('format_version')!r} is not 1")
    return {name: Release.from_dict(name, data) for name, data in raw["releases"].items()}


def all_releases() -> dict[str, Release]:
    """Every known release by name: the built-in registry plus `register_release` additions."""
    return {**_builtin_releases(), **_EXTRA}


def register_release(name: str, data: dict[str, Any] | Release) -> Release:
    """Add a release (same fields as the registry file); refuses names already taken."""
    if name in all_releases() or name in _alias_table():
        raise ValueError(f"release {name!r} already exists; pick another name")
    release = data if isinstance(data, Release) else Release.from_dict(name, data)
    if release.name != name:
        raise ValueError(f"release object is named {release.name!r}, not {name!r}")
    _EXTRA[name] = release
    return release


#: Trailing name parts that describe the SAEs rather than their authors.
_NOT_AUTHOR_TAGS = {"res", "mlp", "att", "all", "pt", "it", "z", "in", "out"}


def _is_author_tag(tag: str) -> bool:
    return 2 <= len(tag) <= 3 and tag.isalpha() and tag.islower() and tag not in _NOT_AUTHOR_TAGS


def _alias_table() -> dict[str, str]:
    """Short name -> release: explicit aliases, then each release minus a trailing author tag
    (`gemma-2b-res` -> `gemma-2b-res-jb`) where only one release fits."""
    releases = all_releases()
    table: dict[str, str] = {}
    candidates: dict[str, list[str]] = {}
    for name in releases:
        stem, _, tag = name.rpartition("-")
        if stem and _is_author_tag(tag) and stem not in releases:
            candidates.setdefault(stem, []).append(name)
    for stem, names in candidates.items():
        if len(names) == 1:
            table[stem] = names[0]
    for name, release in releases.items():
        for alias in release.aliases:
            table[alias] = name
    return table


def resolve_release_name(name: str) -> str | None:
    """The registry name for `name` (itself or an alias), or None."""
    if name in all_releases():
        return name
    return _alias_table().get(name)


def get_release(name: str) -> Release:
    """The release called `name` (or an alias); an unknown name lists the closest names."""
    resolved = resolve_release_name(name)
    if resolved is not None:
        return all_releases()[resolved]
    raise ValueError(unknown_release_message(name))


def unknown_release_message(name: str) -> str:
    names = list(all_releases()) + list(_alias_table())
    close = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    close = close or [n for n in all_releases() if name.lower() in n.lower()][:5]
    hint = f"closest names: {', '.join(close)}. " if close else ""
    return (
        f"unknown release {name!r}. {hint}`saekit pretrained list --search TEXT` searches the "
        "registry; a Hub repo id (owner/name) or a local folder also works as release"
    )


def find_releases(model: str | None = None, search: str | None = None) -> list[Release]:
    """Releases whose model contains `model` and whose name, repo or model contains `search`
    (both case-insensitive)."""
    found: Iterable[Release] = all_releases().values()
    if model:
        needle = model.lower()
        found = [r for r in found if needle in r.model.lower()]
    if search:
        needle = search.lower()
        found = [
            r
            for r in found
            if any(needle in text.lower() for text in (r.name, r.repo_id, r.model, *r.aliases))
        ]
    return sorted(found, key=lambda r: r.name)
