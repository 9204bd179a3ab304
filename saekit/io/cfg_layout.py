"""Translate any cfg.json layout the community has written into saekit's `SAEConfig`.

Two layouts exist: the current one (sae-lens 6.x: sizes and flags at the top level, where the
SAE came from under `metadata`) and the older flat one (everything at the top level, with
several spellings for the same thing). Both are read here; saekit always writes the current one.
"""

from __future__ import annotations

from typing import Any

from saekit.config import SAEConfig, SAEMetadata

#: Flat-layout spelling -> metadata field. The first spelling present wins.
_METADATA_ALIASES: dict[str, tuple[str, ...]] = {
    "model_name": ("model_name",),
    "hook_name": ("hook_name", "hook_point"),
    "hook_name_out": ("hook_name_out", "hook_point_out"),
    "hook_head_index": ("hook_head_index", "hook_point_head_index"),
    "context_size": ("context_size",),
    "prepend_bos": ("prepend_bos",),
    "dataset_path": ("dataset_path",),
    "neuronpedia_id": ("neuronpedia_id",),
}

#: Flat-layout keys that only described training, or that the current layout derives; they are
#: kept under metadata so nothing is lost, except these that carry no information.
_DROPPED_KEYS = {"device", "activation_fn_str", "activation_fn_kwargs", "activation_fn"}

#: Top-level keys of the current layout that sae-lens writes but saekit does not model
#: (training-only settings); kept in metadata so a round trip keeps them.
_SAE_FIELDS = {
    "architecture",
    "d_in",
    "d_sae",
    "dtype",
    "device",
    "apply_b_dec_to_input",
    "normalize_activations",
    "reshape_activations",
    "d_out",
    "k",
    "rescale_acts_by_decoder_norm",
    "matryoshka_widths",
    "n_layers",
    "activation_fn",
    "skip_connection",
}


#: Flat-layout activation_fn_str -> architecture.
_FLAT_ACTIVATIONS = {"relu": "standard", "topk": "topk", "tanh-relu": "tanh_relu"}


def _normalize_mode(value: Any) -> str:
    # Before sae-lens 3.x normalisation was a bool: True meant scaling to an expected norm.
    if value is True:
        return "expected_average_only_in"
    if value is False or value is None:
        return "none"
    if not isinstance(value, str):
        raise ValueError(f"normalize_activations must be a string or a bool, got {value!r}")
    return value


def _architecture_from_flat(raw: dict[str, Any]) -> tuple[str, int | None]:
    """(architecture, k) for a flat config, from `architecture` or `activation_fn_str`."""
    kwargs = raw.get("activation_fn_kwargs") or {}
    k = raw.get("k", kwargs.get("k"))
    architecture = raw.get("architecture", "standard")
    if architecture != "standard":
        return architecture, k
    # Before sae-lens 5, "standard" covered every activation function, named separately.
    activation = raw.get("activation_fn_str", raw.get("activation_fn", "relu"))
    if activation in _FLAT_ACTIVATIONS:
        return _FLAT_ACTIVATIONS[activation], k if activation == "topk" else None
    raise ValueError(
        f"activation_fn_str={activation!r} in a flat cfg.json has no saekit architecture; "
        f"supported: {', '.join(_FLAT_ACTIVATIONS)}"
    )


def is_flat_layout(raw: dict[str, Any]) -> bool:
    return "metadata" not in raw


def apply_overrides(raw: dict[str, Any], overrides: dict[str, Any] | None) -> dict[str, Any]:
    """The registry's config overrides applied to a cfg dict of either layout."""
    if not overrides:
        return raw
    raw = dict(raw)
    if is_flat_layout(raw):
        raw.update(overrides)
        return raw
    top_level = set(SAEConfig.__dataclass_fields__) - {"metadata"}
    metadata = dict(raw.get("metadata") or {})
    for key, value in overrides.items():
        if key in top_level:
            raw[key] = value
        else:
            metadata[key] = value
    raw["metadata"] = metadata
    return raw


def config_from_dict(raw: dict[str, Any], source: str = "cfg.json") -> SAEConfig:
    """Read a cfg.json dict in either layout; errors name `source` and the missing key."""
    for key in ("d_in", "d_sae"):
        if key not in raw:
            raise ValueError(f"{source} has no {key!r} key; every SAE config needs d_in and d_sae")
    if is_flat_layout(raw):
        return _from_flat(raw, source)
    return _from_current(raw, source)


def _from_current(raw: dict[str, Any], source: str) -> SAEConfig:
    if "architecture" not in raw:
        raise ValueError(f"{source} has no 'architecture' key")
    fields = {k: v for k, v in raw.items() if k in _SAE_FIELDS}
    if not isinstance(raw["metadata"] or {}, dict):
        raise ValueError(f"{source}: metadata must be a mapping, got {raw['metadata']!r}")
    metadata = dict(raw["metadata"] or {})
    # Training-only settings sae-lens keeps at the top level travel in metadata.
    metadata.update({k: v for k, v in raw.items() if k not in _SAE_FIELDS and k != "metadata"})
    fields["normalize_activations"] = raw.get("normalize_activations")
    # Built (and type-checked) inside _build, so that errors name the file.
    fields["metadata"] = metadata
    return _build(fields, source)


def _from_flat(raw: dict[str, Any], source: str) -> SAEConfig:
    architecture, k = _architecture_from_flat(raw)
    fields: dict[str, Any] = {
        # Flat layouts spell the activation function of pre-6.0 SAEs `activation_fn`: it
        # names the architecture (above), not a cross-layer transcoder's rule.
        key: raw[key] for key in _SAE_FIELDS - {"architecture", "activation_fn"} if key in raw
    }
    fields["architecture"] = architecture
    if k is not None:
        fields["k"] = int(k)
    fields["normalize_activations"] = raw.get("normalize_activations")
    hook_name = raw.get("hook_name", raw.get("hook_point")) or ""
    if "reshape_activations" not in raw and "hook_z" in hook_name:
        # The flat layout has no reshape flag: sae-lens inferred it from the hook name.
        fields["reshape_activations"] = "hook_z"
    metadata: dict[str, Any] = {}
    used: set[str] = set()
    for field_name, spellings in _METADATA_ALIASES.items():
        for spelling in spellings:
            if spelling in raw:
                metadata[field_name] = raw[spelling]
                used.update(spellings)
                break
    leftovers = set(raw) - _SAE_FIELDS - used - _DROPPED_KEYS
    metadata.update({key: raw[key] for key in sorted(leftovers)})
    fields["metadata"] = metadata
    return _build(fields, source)


def _build(fields: dict[str, Any], source: str) -> SAEConfig:
    fields.pop("device", None)  # where to load is the caller's choice, not the file's
    try:
        fields["normalize_activations"] = _normalize_mode(fields.get("normalize_activations"))
        fields["metadata"] = SAEMetadata.from_dict(fields["metadata"])
        return SAEConfig(**fields)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from err
