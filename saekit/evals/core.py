"""The `core` evaluation in SAEBench's layout: today's metrics plus its weight statistics.

Token-based figures (reconstruction, shrinkage, sparsity, CE/KL, firing frequencies) come
from one `evaluate_saes` pass; the weight-based ones (per-latent encoder/decoder cosines,
norms, the largest cosine to any other latent) are computed here, in blocks so that a
million-latent SAE never needs a d_sae x d_sae matrix.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from saekit.evals.metrics import EvalMetrics
from saekit.evals.plots import png_figure
from saekit.evals.results import EvalResult
from saekit.saes.base import SAE

EVAL_TYPE = "core"

#: What a side-by-side table shows for core.
HEADLINE: tuple[str, ...] = (
    "sparsity.l0",
    "reconstruction_quality.explained_variance",
    "model_performance_preservation.ce_loss_score",
    "misc_metrics.frac_alive",
)

#: Rows of the cosine matrices computed at once (memory: rows x d_sae floats).
_BLOCK = 2048


@dataclass
class CoreConfig:
    """The settings of a core run, with SAEBench's names where it has them."""

    model_name: str = ""
    dataset: str = "bundled held-out works"
    context_size: int = 128
    batch_size_prompts: int = 8
    n_eval_tokens: int = 65_536
    compute_kl: bool = True
    compute_ce_loss: bool = True
    compute_l2_norms: bool = True
    compute_sparsity_metrics: bool = True
    compute_variance_metrics: bool = True
    compute_featurewise_density_statistics: bool = True
    compute_featurewise_weight_based_metrics: bool = True
    exclude_special_tokens_from_reconstruction: bool = True


def core_result(sae: SAE, metrics: EvalMetrics, config: CoreConfig | None = None) -> EvalResult:
    """The core result of `sae` from its `EvalMetrics` and its weights."""
    from dataclasses import asdict

    config = config or CoreConfig()
    freq = metrics.firing_frequency.to(torch.float64)
    total = float(freq.sum())
    over_1, over_10 = freq > 0.01, freq > 0.1
    weights = latent_weight_statistics(sae)
    metric_groups = {
        "model_behavior_preservation": {
            "kl_div_score": metrics.kl_div_score,
            "kl_div_with_ablation": metrics.kl_div_with_ablation,
            "kl_div_with_sae": metrics.kl_div_with_sae,
        },
        "model_performance_preservation": {
            "ce_loss_score": metrics.ce_loss_score,
            "ce_loss_with_ablation": metrics.ce_loss_with_ablation,
            "ce_loss_with_sae": metrics.ce_loss_with_sae,
            "ce_loss_without_sae": metrics.ce_loss_without_sae,
        },
        "reconstruction_quality": {
            "explained_variance": metrics.explained_variance,
            # SAEBench keeps its earlier formula under this name; we report only the
            # correct one, so the legacy field is left empty rather than guessed.
            "explained_variance_legacy": None,
            "mse": metrics.mse,
            "cossim": metrics.cos_sim,
        },
        "shrinkage": {
            "l2_norm_in": metrics.l2_norm_in,
            "l2_norm_out": metrics.l2_norm_out,
            "l2_ratio": metrics.l2_ratio,
            "relative_reconstruction_bias": metrics.relative_reconstruction_bias,
        },
        "sparsity": {"l0": metrics.l0, "l1": metrics.l1},
        "token_stats": {
            "total_tokens_eval_reconstruction": metrics.n_prediction_tokens or metrics.n_tokens,
            "total_tokens_eval_sparsity_variance": metrics.n_tokens,
        },
        "misc_metrics": {
            "freq_over_1_percent": float(over_1.double().mean()),
            "freq_over_10_percent": float(over_10.double().mean()),
            "normalized_freq_over_1_percent": float(freq[over_1].sum()) / total if total else 0.0,
            "normalized_freq_over_10_percent": float(freq[over_10].sum()) / total
            if total
            else 0.0,
            "average_max_encoder_cosine_sim": _mean(weights["max_encoder_cosine_sim"]),
            "average_max_decoder_cosine_sim": _mean(weights["max_decoder_cosine_sim"]),
            "frac_alive": float((freq > 0).double().mean()),
        },
    }
    fires = freq * metrics.n_tokens
    sequences = metrics.sequences_fired
    consistent = (
        torch.where(sequences > 0, fires / sequences.clamp_min(1), torch.zeros_like(fires))
        if sequences is not None
        else None
    )
    details = []
    for i in range(sae.cfg.d_sae):
        row: dict[str, float | int | None] = {"index": i, "feature_density": float(freq[i])}
        row["consistent_activation_heuristic"] = (
            float(consistent[i]) if consistent is not None else None
        )
        for name, values in weights.items():
            row[name] = None if values is None else float(values[i])
        details.append(row)
    return EvalResult(EVAL_TYPE, asdict(config), metric_groups, details)


def latent_weight_statistics(sae: SAE) -> dict[str, Tensor | None]:
    """Per-latent weight statistics [d_sae] (None where the SAE has no such weights):
    encoder bias and norm, decoder norm, encoder-decoder cosine, and the largest cosine of
    each encoder column / decoder row to any other latent's."""
    with torch.no_grad():
        w_dec = sae.W_dec.detach().float()  # [d_sae, d_out]
        w_enc = _encoder_rows(sae)  # [d_sae, d_in] or None
        bias = _encoder_bias(sae)
        enc_dec = None
        if w_enc is not None and w_enc.shape[1] == w_dec.shape[1]:
            enc_dec = torch.nn.functional.cosine_similarity(w_enc, w_dec, dim=1)
        return {
            "encoder_bias": bias,
            "encoder_norm": None if w_enc is None else w_enc.norm(dim=1),
            "decoder_norm": w_dec.norm(dim=1),
            "encoder_decoder_cosine_sim": enc_dec,
            "max_decoder_cosine_sim": max_cosine_to_others(w_dec),
            "max_encoder_cosine_sim": None if w_enc is None else max_cosine_to_others(w_enc),
        }


def max_cosine_to_others(rows: Tensor) -> Tensor:
    """For each row of [n, d], the largest cosine similarity with any other row -> [n]."""
    unit = torch.nn.functional.normalize(rows.float(), dim=1)
    out = torch.empty(unit.shape[0])
    for start in range(0, unit.shape[0], _BLOCK):
        block = unit[start : start + _BLOCK] @ unit.T  # [block, n]
        idx = torch.arange(block.shape[0])
        block[idx, idx + start] = float("-inf")  # not itself
        out[start : start + block.shape[0]] = block.max(dim=1).values.cpu()
    return out


def _encoder_rows(sae: SAE) -> Tensor | None:
    w_enc = getattr(sae, "W_enc", None)
    if not isinstance(w_enc, Tensor) or w_enc.ndim != 2 or w_enc.shape[1] != sae.cfg.d_sae:
        return None
    return w_enc.detach().float().T


def _encoder_bias(sae: SAE) -> Tensor | None:
    # Gated SAEs decide firing with the gate's bias; the others have one encoder bias.
    for name in ("b_enc", "b_gate"):
        value = getattr(sae, name, None)
        if isinstance(value, Tensor) and value.shape == (sae.cfg.d_sae,):
            return value.detach().float()
    return None


def _mean(values: Tensor | None) -> float | None:
    return None if values is None or values.numel() < 2 else float(values.mean())


def plot_core(results: Mapping[str, EvalResult], path: str | Path) -> Path:
    """One PNG: the feature-density histogram of each SAE, and L0 against explained variance."""
    with png_figure(path, 1, 2, figsize=(11, 4)) as (fig, (dens, front)):
        for label, result in results.items():
            density = torch.tensor([row["feature_density"] for row in result.details])
            logs = density.clamp_min(1e-10).log10()
            dens.hist(logs.numpy(), bins=50, histtype="step", label=label)
            front.scatter(
                result.metric("sparsity.l0"),
                result.metric("reconstruction_quality.explained_variance"),
                label=label,
            )
        dens.set_xlabel("log10 firing frequency (dead latents at -10)")
        dens.set_ylabel("latents")
        dens.set_title("feature density")
        front.set_xlabel("L0")
        front.set_ylabel("explained variance")
        front.set_title("sparsity against reconstruction")
        for ax in (dens, front):
            ax.legend(fontsize="small")
    return Path(path)
