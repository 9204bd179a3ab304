"""The SAE's configuration: what it is (architecture, sizes) and where it reads from (metadata).

These dataclasses mirror the current (sae-lens 6.x) `cfg.json` layout field for field, so a
config read from disk and written back is unchanged. Older flat layouts are translated in
`saekit.io.cfg_layout`, not here.
"""

from __future__ import annotations

import dataclasses
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

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SAEMetadata:
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
    metadata: SAEMetadata = field(default_factory=SAEMetadata)
    """Model, hook and data the SAE belongs to."""

    def __post_init__(self) -> None:
        if isinstance(self.metadata, dict):
            self.metadata = SAEMetadata.from_dict(self.metadata)
        self.dtype = dtype_name(self.dtype)
        for name in ("d_in", "d_sae"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.d_out is not None and (not isinstance(self.d_out, int) or self.d_out <= 0):
            raise ValueError(f"d_out must be a positive integer or None, got {self.d_out!r}")
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
            widths = list(self.matryoshka_widths)
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
