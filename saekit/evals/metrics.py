"""The named result of an evaluation: every standard metric, by its name (defined in
docs/evaluation.md)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

from torch import Tensor

from saekit.evals.accumulators import DownstreamStats, ReconstructionStats, SparsityStats

#: Scalar metrics in the order reports list them; the names are the reference's.
METRIC_NAMES: tuple[str, ...] = (
    "l0",
    "l1",
    "mse",
    "explained_variance",
    "cos_sim",
    "l2_ratio",
    "relative_reconstruction_bias",
    "ce_loss_without_sae",
    "ce_loss_with_sae",
    "ce_loss_with_ablation",
    "ce_loss_score",
    "kl_div_with_sae",
    "kl_div_with_ablation",
    "kl_div_score",
    "dead_fraction",
    "dense_fraction",
)


@dataclass
class EvalMetrics:
    """Metrics of one SAE over the evaluation tokens (special tokens excluded).

    The CE/KL fields are None when the evaluation ran without the downstream model passes.
    """

    n_tokens: int
    """Tokens the reconstruction and sparsity metrics were computed over."""
    l0: float
    l1: float
    mse: float
    explained_variance: float
    cos_sim: float
    l2_ratio: float
    relative_reconstruction_bias: float
    dead_fraction: float
    dense_fraction: float
    firing_frequency: Tensor
    """[d_sae] fraction of evaluation tokens on which each latent fires (feature density)."""
    mean_activation_when_firing: Tensor
    """[d_sae] each latent's mean value over the tokens where it fires."""
    max_activation: Tensor
    """[d_sae] each latent's largest value."""
    ce_loss_without_sae: float | None = None
    ce_loss_with_sae: float | None = None
    ce_loss_with_ablation: float | None = None
    ce_loss_score: float | None = None
    kl_div_with_sae: float | None = None
    kl_div_with_ablation: float | None = None
    kl_div_score: float | None = None
    n_prediction_tokens: int | None = None
    """Next-token predictions the CE/KL figures average over."""
    l2_norm_in: float | None = None
    """Mean ||x|| of the SAE's input over the evaluation tokens."""
    l2_norm_out: float | None = None
    """Mean ||x^|| of its reconstruction."""
    sequences_fired: Tensor | None = None
    """[d_sae] sequences each latent fires in."""

    @classmethod
    def from_stats(
        cls,
        recon: ReconstructionStats,
        sparsity: SparsityStats,
        downstream: DownstreamStats | None = None,
    ) -> EvalMetrics:
        values: dict[str, Any] = {}
        for part in (recon, sparsity, downstream):
            if part is not None:
                values.update({f.name: getattr(part, f.name) for f in fields(part)})
        if downstream is not None:
            values["n_prediction_tokens"] = values.pop("n_tokens")
            values["n_tokens"] = recon.n_tokens
        return cls(**values)

    def to_dict(self, per_latent: bool = False) -> dict[str, Any]:
        """The scalar metrics by their reference names (those not computed are left out), plus
        n_tokens; with per_latent, also the per-latent arrays as lists."""
        out: dict[str, Any] = {}
        for name in METRIC_NAMES:
            value = getattr(self, name)
            if value is not None:
                out[name] = float(value)
        out["n_tokens"] = self.n_tokens
        if self.n_prediction_tokens is not None:
            out["n_prediction_tokens"] = self.n_prediction_tokens
        if per_latent:
            for name in ("firing_frequency", "mean_activation_when_firing", "max_activation"):
                out[name] = getattr(self, name).tolist()
        return out

    def log10_feature_density(self, eps: float = 1e-10) -> Tensor:
        """log10 of each latent's firing frequency (dead latents at log10(eps)): the standard
        feature-density histogram's data, and the content of `sparsity.safetensors`."""
        return self.firing_frequency.clamp_min(eps).log10()


def json_safe(metrics: dict[str, Any]) -> dict[str, Any]:
    """A copy with every NaN / infinite float replaced by None, for strict JSON; nested
    mappings and lists (a CLT's per-layer or a crosscoder's per-site figures) too."""
    return _finite_or_none(metrics)


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    return value
