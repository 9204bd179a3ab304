"""The SAE's configuration: what it is (architecture, sizes) and where it reads from (metadata).

These dataclasses mirror the current (sae-lens 6.x) `cfg.json` layout field for field, so a
config read from disk and written back is unchanged. Older flat layouts are translated in
`saekit.io.cfg_layout`, not here.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}

NORMALIZE_MODES = ("none", "expected_average_only_in", "constant_norm_rescale", "layer_norm")
RESHAPE_MODES = ("none", "hook_z")


def dtype_name(dtype: torch.dtype | str) -> str:
    """The config spelling of a dtype ("float32"), accepting "torch.float32" and torch dtypes."""
    if isinstance(dtype, torch.dtype):
        for name, value in DTYPES.items():
            if value == dtype:
                return name
        raise ValueError(f"dtype {dtype} is not supported; use one of {sorted(DTYPES)}")
    name = dtype.removeprefix("torch.")
    if name not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}")
    return name


def whole_number(name: str, value: Any, *, optional: bool = False) -> int | None:
    """`value` as an int, refusing bools, strings and fractions (a float that is exactly a
    whole number, as some writers store sizes, is taken as that number)."""
    if value is None and optional:
        return None
    if isinstance(value, float) and value.is_integer():
        return int(value)
    # numbers.Integral takes numpy's integers too (a shape read with numpy).
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        nothing = " or null" if optional else ""
        raise ValueError(f"{name} must be a whole number{nothing}, got {value!r}")
    return int(value)


def flag(name: str, value: Any, *, optional: bool = False) -> bool | None:
    """`value` if it is a real bool: a string such as "no" is truthy and would read as
    true."""
    if value is None and optional:
        return None
    if not isinstance(value, bool):
        nothing = " or null" if optional else ""
        raise ValueError(f"{name} must be true or false{nothing}, got {value!r}")
    return value


def text(name: str, value: Any, *, optional: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        nothing = " or null" if optional else ""
        raise ValueError(f"{name} must be a string{nothing}, got {value!r}")
    return value


@dataclass
class SAEMetadata:
    """Where the SAE was trained: model, hook(s) and data. None where unknown."""

    model_name: str | None = None
    """Model the SAE reads, as a Hub id, a local folder or "bundled"."""
    hook_name: str | None = None
    """Hook the SAE reads (TransformerLens name such as `blocks.8.hook_resid_pre`)."""
    hook_name_out: str | None = None
    """Transcoders only: the hook whose activation the SAE reconstructs."""
    hook_head_index: int | None = None
    """Attention head the SAE reads, when the hook is per head."""
    context_size: int | None = None
    """Tokens per sequence during training."""
    prepend_bos: bool | None = None
    """Whether sequences started with a BOS token."""
    dataset_path: str | None = None
    """Dataset the SAE was trained on."""
    neuronpedia_id: str | None = None
    """Neuronpedia identifier, when the SAE is published there."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Other metadata keys, kept so that a round trip loses nothing."""

    def __post_init__(self) -> None:
        # Typed fields are read by loaders and evaluators: refuse a wrong type here, by name.
        for name in ("model_name", "hook_name", "hook_name_out", "dataset_path",
                     "neuronpedia_id"):
            text(f"metadata.{name}", getattr(self, name), optional=True)
        for name in ("hook_head_index", "context_size"):
            setattr(self, name, whole_number(f"metadata.{name}", getattr(self, name),
                                             optional=True))
        flag("metadata.prepend_bos", self.prepend_bos, optional=True)
        if not isinstance(self.extra, dict):
            raise ValueError(f"metadata.extra must be a mapping, got {self.extra!r}")

    def __getattr__(self, name: str) -> Any:
        # Reached only for names that are not fields: the other keys (SAELens's seqpos_slice,
        # model_from_pretrained_kwargs, ...) read as attributes, and a key that is absent
        # reads as None, as SAELens's SAEMetadata answers.
        if name.startswith("_") or name == "extra":
            raise AttributeError(name)
        return self.__dict__.get("extra", {}).get(name)

    def __getitem__(self, key: str) -> Any:
        """`metadata["hook_name"]`, as SAELens allows; None for a key that is absent."""
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        value = getattr(self, key)
        return default if value is None else value

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEMetadata:
        if not isinstance(data, dict):
            raise ValueError(f"metadata must be a mapping, got {data!r}")
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        extra = {k: v for k, v in data.items() if k not in known}
        return cls(**{k: v for k, v in data.items() if k in known}, extra=extra)

    @property
    def window_prepend_bos(self) -> bool | None:
        """How to frame text for this SAE, as `TokenWindows(prepend_bos=...)` takes it: the
        recorded prepend_bos, or None (follow the tokenizer) when the SAE was trained with
        the tokenizer's own special tokens (`sequence_framing: tokenizer`) or nothing is
        recorded."""
        if self.extra.get("sequence_framing") == "tokenizer":
            return None
        return self.prepend_bos

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out


@dataclass
class SAEConfig:
    """Everything needed to rebuild an SAE's function from its weights."""

    architecture: str
    """Registered architecture name (`saekit.list_architectures()`)."""
    d_in: int
    """Width of the activation the SAE reads."""
    d_sae: int
    """Number of latents."""
    dtype: str = "float32"
    """Parameter dtype: float32, float64, float16 or bfloat16."""
    device: str = "cpu"
    """Device the parameters live on."""
    apply_b_dec_to_input: bool = True
    """Subtract b_dec from the input before encoding."""
    normalize_activations: str = "none"
    """none | expected_average_only_in | constant_norm_rescale | layer_norm."""
    reshape_activations: str = "none"
    """none | hook_z (inputs [..., n_heads, d_head] are flattened to d_in = n_heads * d_head)."""
    d_out: int | None = None
    """Transcoders: width of the activation reconstructed (defaults to d_in)."""
    k: int | None = None
    """topk, batchtopk, matryoshka_batchtopk: latents kept per token."""
    rescale_acts_by_decoder_norm: bool = False
    """topk: rank latents by activation times decoder-row norm."""
    matryoshka_widths: list[int] | None = None
    """matryoshka_batchtopk: nested prefix widths, ascending, the last equal to d_sae."""
    n_layers: int | None = None
    """clt: layers the SAE spans; each has its own encoder and d_sae latents."""
    activation_fn: str | None = None
    """clt: the latents' rule, relu | jumprelu | topk | batchtopk (published as jumprelu)."""
    skip_connection: bool = False
    """clt: each layer's output also gets a linear path from that layer's input, x_l @
    W_skip[l].T (W_skip [n_layers, d_out, d_in]), as affine skip transcoders have."""
    metadata: SAEMetadata = field(default_factory=SAEMetadata)
    """Model, hook and data the SAE belongs to."""

    def __post_init__(self) -> None:
        # Every field's type is checked: a cfg.json from elsewhere may hold k: 3.5 or
        # "apply_b_dec_to_input": "no", which would otherwise load and misbehave later.
        if isinstance(self.metadata, dict):
            self.metadata = SAEMetadata.from_dict(self.metadata)
        if not isinstance(self.metadata, SAEMetadata):
            raise ValueError(f"metadata must be a mapping, got {self.metadata!r}")
        text("architecture", self.architecture)
        if not isinstance(self.dtype, torch.dtype):
            text("dtype", self.dtype)
        self.dtype = dtype_name(self.dtype)
        if isinstance(self.device, torch.device):
            self.device = str(self.device)
        text("device", self.device)
        for name in ("d_in", "d_sae", "d_out"):
            value = getattr(self, name)
            if value is None and name == "d_out":
                continue
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
                nothing = " or None" if name == "d_out" else ""
                raise ValueError(f"{name} must be a positive integer{nothing}, got {value!r}")
            setattr(self, name, int(value))
        self.k = whole_number("k", self.k, optional=True)
        self.n_layers = whole_number("n_layers", self.n_layers, optional=True)
        if self.n_layers is not None and self.n_layers <= 0:
            raise ValueError(f"n_layers must be a positive integer, got {self.n_layers}")
        text("activation_fn", self.activation_fn, optional=True)
        flag("apply_b_dec_to_input", self.apply_b_dec_to_input)
        flag("rescale_acts_by_decoder_norm", self.rescale_acts_by_decoder_norm)
        flag("skip_connection", self.skip_connection)
        text("normalize_activations", self.normalize_activations)
        text("reshape_activations", self.reshape_activations)
        if self.normalize_activations not in NORMALIZE_MODES:
            raise ValueError(
                f"normalize_activations={self.normalize_activations!r} is not known; "
                f"use one of {', '.join(NORMALIZE_MODES)}"
            )
        if self.reshape_activations not in RESHAPE_MODES:
            raise ValueError(
                f"reshape_activations={self.reshape_activations!r} is not known; "
                f"use one of {', '.join(RESHAPE_MODES)}"
            )
        if self.k is not None and not (0 < self.k <= self.d_sae):
            raise ValueError(f"k must be between 1 and d_sae={self.d_sae}, got {self.k}")
        if self.matryoshka_widths is not None:
            if not isinstance(self.matryoshka_widths, (list, tuple)):
                raise ValueError(
                    f"matryoshka_widths must be a list of widths, got {self.matryoshka_widths!r}"
                )
            widths = [whole_number("matryoshka_widths", w) for w in self.matryoshka_widths]
            if widths != sorted(set(widths)) or widths[-1] != self.d_sae or widths[0] <= 0:
                raise ValueError(
                    "matryoshka_widths must be strictly ascending positive widths ending at "
                    f"d_sae={self.d_sae}, got {widths}"
                )
            self.matryoshka_widths = widths

    @property
    def output_width(self) -> int:
        """Width of the reconstruction: d_out for transcoders, d_in otherwise."""
        return self.d_out if self.d_out is not None else self.d_in

    @property
    def latent_count(self) -> int:
        """Latents in all: d_sae, or d_sae per layer of a cross-layer transcoder (a
        crosscoder's sites, also counted in n_layers, share one set of d_sae)."""
        return self.d_sae * (self.n_layers or 1) if self.architecture == "clt" else self.d_sae

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def to_dict(self) -> dict[str, Any]:
        """The current cfg.json layout; keys that do not apply to this SAE are left out."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "metadata":
                value = self.metadata.to_dict()
            elif value is None or (f.name == "rescale_acts_by_decoder_norm" and self.k is None):
                continue
            elif f.name == "skip_connection" and not value:
                continue  # the usual case; cfg.json files stay as they were
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEConfig:
        """Build from the current layout; unknown top-level keys are rejected by name."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown SAE config keys {unknown}; known keys are {sorted(known)}")
        return cls(**data)

    def replace(self, **changes: Any) -> SAEConfig:
        """A copy with some fields changed (the metadata is copied too, never shared)."""
        copy = dataclasses.replace(self, metadata=SAEMetadata.from_dict(self.metadata.to_dict()))
        return dataclasses.replace(copy, **changes)
