"""Fetch a published SAE by registry name, Hub repo id or local folder, converted to saekit's
layout (`SAE.from_pretrained` builds the SAE from what this returns)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, NamedTuple

from torch import Tensor

from saekit.config import SAEConfig
from saekit.io.cfg_layout import apply_overrides, config_from_dict
from saekit.io.converters import ConvertContext, converter_for, detect_layout
from saekit.io.native import ShapeCheck
from saekit.io.releases import (
    PretrainedEntry,
    check_relative_path,
    get_release,
    resolve_release_name,
    unknown_release_message,
)
from saekit.io.sources import FileSource, HubSource, LocalSource

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class PretrainedParts(NamedTuple):
    """A published SAE fetched and converted to saekit's layout; `SAE.from_pretrained`
    builds the SAE from it."""

    cfg: SAEConfig
    tensors: dict[str, Tensor]
    sparsity: Tensor | None
    """log10 firing frequency per latent [d_sae], or None when the release has none."""
    norm_scaling_factor: float | None
    """The release's activation scaling factor, to fold into the weights, if it has one."""
    source: str
    """Where the files came from, for messages."""


def fetch_pretrained(
    release: str,
    sae_id: str | None = None,
    *,
    revision: str | None = None,
    force_download: bool = False,
    token: str | bool | None = None,
    cache_dir: str | Path | None = None,
    endpoint: str | None = None,
    layout: str | None = None,
    check_shapes: ShapeCheck | None = None,
) -> PretrainedParts:
    """Fetch and convert a published SAE.

    `release` is a registry name (`saekit pretrained list`), an alias such as `gemma-2b-res`,
    a Hub repo id `owner/name` (then `sae_id` is the folder inside the repo) or a local folder
    laid out like such a repo. Hub files go through the Hugging Face cache (`cache_dir`,
    default HF_HUB_CACHE), at `revision`; `force_download` fetches them again. `layout`
    overrides the registry's or the detected file layout. `check_shapes`
    (`SAE.check_tensor_shapes`) lets a native folder's weights header be checked against its
    cfg.json before any tensor is read.
    """
    if sae_id is not None:
        check_relative_path(sae_id, "sae_id")  # before any path is built from it
    entry: PretrainedEntry | None = None
    overrides: dict[str, Any] | None = None
    model: str | None = None
    registry_name = resolve_release_name(release)
    source: FileSource
    if Path(release).is_dir():
        source, folder, repo_id = LocalSource(release), sae_id or "", None
    elif registry_name is not None:
        info = get_release(registry_name)
        entry = info.sae(sae_id)
        source = HubSource(info.repo_id, revision, force_download, token, cache_dir, endpoint)
        folder, repo_id, model = entry.path, info.repo_id, info.model
        layout = layout or info.layout
        overrides = info.config_overrides
    elif _REPO_ID.match(release):
        source = HubSource(release, revision, force_download, token, cache_dir, endpoint)
        folder, repo_id = sae_id or "", release
    else:
        raise ValueError(unknown_release_message(release))

    layout = layout or detect_layout(source, folder)
    ctx = ConvertContext(folder, repo_id, model, overrides, check_shapes)
    converted = converter_for(layout, release)(source, ctx)
    raw = apply_overrides(converted.cfg, overrides)
    where = source.describe(folder or ".")
    cfg = config_from_dict(raw, source=where)
    if entry is not None and entry.neuronpedia_id and not cfg.metadata.neuronpedia_id:
        cfg.metadata.neuronpedia_id = entry.neuronpedia_id
    scale = entry.norm_scaling_factor if entry is not None else None
    return PretrainedParts(cfg, converted.tensors, converted.sparsity, scale, where)

