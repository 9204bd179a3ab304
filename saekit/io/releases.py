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

`saekit/io/data/extra_releases.json`, in the same shape, holds releases that sae-lens's
registry does not list (whole cross-layer transcoders), each with the public source of its
facts under "source"; a rebuild of releases.json leaves it alone. Add releases at run time
with `register_release`.
"""

from __future__ import annotations

import difflib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from functools import cache, cached_property
from importlib import resources
from pathlib import PurePosixPath
from typing import Any, NamedTuple

DATA_FILE = "releases.json"
#: Releases beyond sae-lens's registry, kept apart so that rebuilding DATA_FILE keeps them.
EXTRA_DATA_FILE = "extra_releases.json"


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


def _read_data_file(name: str) -> dict[str, Release]:
    text = resources.files("saekit.io").joinpath("data", name).read_text(encoding="utf-8")
    raw = json.loads(text)
    if raw.get("format_version") != 1:
        raise ValueError(f"{name}: format_version {raw.get('format_version')!r} is not 1")
    return {key: Release.from_dict(key, data) for key, data in raw["releases"].items()}


@cache
def _builtin_releases() -> dict[str, Release]:
    releases = _read_data_file(DATA_FILE)
    extra = _read_data_file(EXTRA_DATA_FILE)
    twice = sorted(set(releases) & set(extra))
    if twice:
        raise ValueError(f"{EXTRA_DATA_FILE} repeats releases of {DATA_FILE}: {twice}")
    return {**releases, **extra}


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
_NOT_AUTHOR_TAGS = {"res", "mlp", "att", "all", "pt", "it", "z", "in", "out", "clt"}


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


class SAEFacts(NamedTuple):
    """What a registry entry tells about one SAE without downloading it; None where the
    registry does not say (the cfg.json would, once fetched)."""

    hook: str | None
    architecture: str | None
    width: int | None


#: The architecture each foreign layout loads as (native and dictionary_learning folders
#: declare theirs in their config, so only their names hint at it).
_LAYOUT_ARCHITECTURES = {
    "gemma_scope": "jumprelu",
    "gemma_scope_transcoder": "jumprelu_transcoder",
    "gemma_scope_2": "jumprelu",
    "llama_scope": "jumprelu",
    "llama_scope_r1_distill": "jumprelu",
    "qwen_scope": "topk",
    "goodfire": "standard",
    "deepseek_r1": "standard",
    "connor_rob_hook_z": "standard",
    "mwhanna_transcoder": "transcoder",
    "mntss_clt_layer_transcoder": "transcoder",
    "mntss_clt": "clt",
    "gemma_scope_2_clt": "clt",
    "temporal": "temporal",
}
#: Words in release or SAE names that name an architecture, most specific first.
_NAME_ARCHITECTURES = (
    ("matryoshka", "matryoshka_batchtopk"),
    ("batch_top_k", "batchtopk"), ("batchtopk", "batchtopk"),
    ("topk", "topk"), ("top_k", "topk"), ("jumprelu", "jumprelu"), ("gated", "gated"),
    ("vanilla", "standard"), ("standard", "standard"),
)
#: Site words in folder and release names, and the hook each stands for.
_SITE_HOOKS = (
    ("transcoder", "ln2.hook_normalized"), ("resid_post", "hook_resid_post"),
    ("resid-post", "hook_resid_post"), ("resid_mid", "hook_resid_mid"),
    ("resid-mid", "hook_resid_mid"), ("mlp_out", "hook_mlp_out"), ("mlp", "hook_mlp_out"),
    ("attn_out", "hook_attn_out"), ("att", "attn.hook_z"), ("res", "hook_resid_post"),
)
_LAYOUT_HOOKS = {
    "mwhanna_transcoder": "ln2.hook_normalized",
    "mntss_clt_layer_transcoder": "hook_resid_mid",
    "qwen_scope": "hook_resid_post",
    "goodfire": "hook_resid_post",
    "deepseek_r1": "hook_resid_post",
    "temporal": "hook_resid_post",
}
#: Whole cross-layer transcoders read a hook in every block: their facts name it for all.
_CLT_LAYOUT_HOOKS = {"gemma_scope_2_clt": "ln2.hook_normalized", "mntss_clt": "hook_resid_mid"}
_LLAMA_SCOPE_SITES = {"r": "hook_resid_post", "a": "hook_attn_out", "m": "hook_mlp_out",
                      "tc": "ln2.hook_normalized"}


def parse_width(text: str) -> int:
    """A dictionary width as users write it: 16384, 16k (x1024), 1m (x1024^2) or 2pow14."""
    match = re.fullmatch(r"\s*(\d+)\s*([km]?)\s*|\s*2pow(\d+)\s*", text.lower())
    if match is None:
        raise ValueError(f"width {text!r} is not a number; give e.g. 16384, 16k or 2pow14")
    if match.group(3):
        return 2 ** int(match.group(3))
    return int(match.group(1)) * {"": 1, "k": 1024, "m": 1024**2}[match.group(2)]


def _width(text: str) -> int | None:
    for pattern in (r"width[_-](\d+[km]?)\b", r"width-(2pow\d+)", r"-W(\d+)K-",
                    r"_(\d+k)(?:_|$)", r"_(\d{4,7})(?:_|:|$)"):
        match = re.search(pattern, text)
        if match:
            value = match.group(1)
            return parse_width(value + ("k" if pattern == r"-W(\d+)K-" else ""))
    return None


def _hook(release: Release, entry: PretrainedEntry) -> str | None:
    if release.layout in _CLT_LAYOUT_HOOKS:
        return f"blocks.*.{_CLT_LAYOUT_HOOKS[release.layout]}"
    text = f"{entry.id} {entry.path}"
    explicit = re.search(r"blocks\.(\d+)\.((?:attn\.)?hook_[a-z]+(?:_[a-z]+)*)", text)
    if explicit:
        return f"blocks.{explicit.group(1)}.{explicit.group(2)}"
    llama = re.search(r"\bL(\d+)(R|A|M|TC)\b", entry.path)
    if llama:
        return f"blocks.{llama.group(1)}.{_LLAMA_SCOPE_SITES[llama.group(2).lower()]}"
    layer = re.search(r"(?:layer|layers)[_.]?(\d+)|-l(\d+)\.pth?$|^(\d+)$", entry.path)
    if layer is None:
        return "hook_embed" if entry.path.startswith("embedding") else None
    number = next(g for g in layer.groups() if g is not None)
    site = _LAYOUT_HOOKS.get(release.layout)
    if site is None:
        names = f"{entry.path.split('/')[0]} {release.name}".lower()
        site = next((hook for word, hook in _SITE_HOOKS if word in names), None)
    return f"blocks.{number}.{site}" if site else None


def _architecture(release: Release, entry: PretrainedEntry) -> str | None:
    if release.layout == "gemma_scope_2" and entry.path.startswith("transcoder"):
        return "jumprelu_skip_transcoder" if entry.path.endswith("_affine") else (
            "jumprelu_transcoder")
    if release.layout in _LAYOUT_ARCHITECTURES:
        return _LAYOUT_ARCHITECTURES[release.layout]
    names = f"{release.name} {entry.path}".lower()
    return next((arch for word, arch in _NAME_ARCHITECTURES if word in names), None)


def sae_facts(release: Release, entry: PretrainedEntry) -> SAEFacts:
    """Hook, architecture and width of a registry entry, read off its names and layout."""
    width = _width(f"{entry.path} {entry.id}") or _width(f"{release.name} {release.repo_id}")
    return SAEFacts(_hook(release, entry), _architecture(release, entry), width)


#: Model families whose Hub repos are gated (the licence must be accepted while logged in),
#: and SAE repos gated themselves (Goodfire's carry the Llama licence).
_GATED_MODELS = re.compile(r"^(meta-llama/|google/gemma|gemma-|llama)", re.IGNORECASE)
_GATED_REPOS = re.compile(r"^Goodfire/")


def access_note(release: Release) -> str | None:
    """Why loading or using the release needs a Hugging Face access token, or None."""
    if _GATED_REPOS.match(release.repo_id):
        return "SAE repo gated"
    if _GATED_MODELS.match(release.model):
        return "model gated"
    return None


class ReleaseMatch(NamedTuple):
    """A release and the SAEs of it that matched the filters."""

    release: Release
    saes: tuple[PretrainedEntry, ...]


def find_releases(
    model: str | None = None,
    search: str | None = None,
    hook: str | None = None,
    architecture: str | None = None,
    width: str | int | None = None,
) -> list[Release]:
    """Releases whose model contains `model` and whose name, repo or model contains `search`
    (both case-insensitive), holding at least one SAE that matches `hook`, `architecture`
    and `width` (see `match_releases`)."""
    return [m.release for m in match_releases(model, search, hook, architecture, width)]


def match_releases(
    model: str | None = None,
    search: str | None = None,
    hook: str | None = None,
    architecture: str | None = None,
    width: str | int | None = None,
) -> list[ReleaseMatch]:
    """Like `find_releases`, with each release's matching SAEs. `hook` is a part of the hook
    name (`resid_post`, `blocks.12.`), `architecture` a name (`jumprelu`; a transcoder's
    name contains its base, so `jumprelu` also finds `jumprelu_transcoder`), `width` the
    number of latents (16384, 16k); SAEs whose registry entry does not tell are left out."""
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
    wanted_width = parse_width(str(width)) if width is not None else None
    matches = []
    for release in sorted(found, key=lambda r: r.name):
        if hook is None and architecture is None and wanted_width is None:
            matches.append(ReleaseMatch(release, release.saes))
            continue
        saes = tuple(
            entry for entry in release.saes
            if _facts_match(sae_facts(release, entry), hook, architecture, wanted_width)
        )
        if saes:
            matches.append(ReleaseMatch(release, saes))
    return matches


def _facts_match(
    facts: SAEFacts, hook: str | None, architecture: str | None, width: int | None
) -> bool:
    if hook is not None and (facts.hook is None or hook.lower() not in facts.hook.lower()):
        return False
    if architecture is not None and (
        facts.architecture is None or architecture.lower() not in facts.architecture
    ):
        return False
    return width is None or facts.width == width
