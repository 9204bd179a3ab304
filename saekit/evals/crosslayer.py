"""Held-out evaluation of a cross-layer transcoder: each layer's reconstruction of the MLP
output (FVU, L0 and the rest of the standard metrics, from the clean model's activations; the
skip path included for a CLT that has one),
and the replacement model's next-token CE and KL against the clean model and against every
MLP output zero-ablated at once.

Per batch the model runs once clean (capturing every layer's input and output), once with
the CLT in place of every MLP (`saekit.analysis.replacement`) and once with every MLP output
zeroed. Special tokens are left out of every figure and keep their own activations.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saekit.analysis.replacement import clt_replacements, replacement_hooks
from saekit.data.tokens import keep_mask, special_token_ids
from saekit.evals.accumulators import (
    DownstreamAccumulator,
    DownstreamStats,
    ReconstructionAccumulator,
    SparsityAccumulator,
)
from saekit.evals.downstream import PredictionScorer
from saekit.evals.metrics import EvalMetrics
from saekit.evals.token_pass import TokenPass, eval_mode
from saekit.models.backend import ModelBackend, Replacement
from saekit.saes.clt import CrossLayerTranscoder, stack_layers


@dataclass
class CLTEvaluation:
    """A CLT's held-out figures."""

    layers: list[EvalMetrics]
    """Per CLT layer: its reconstruction of that layer's MLP output and its latents'
    sparsity (no CE/KL: those belong to the whole replacement)."""
    downstream: DownstreamStats | None
    """The replacement model's CE/KL figures (`ce_loss_with_sae`: every MLP replaced;
    `ce_loss_with_ablation`: every MLP output zeroed); None without the downstream passes."""

    @property
    def fvu(self) -> list[float]:
        """Fraction of variance unexplained per layer: 1 - explained variance."""
        return [1.0 - m.explained_variance for m in self.layers]

    @property
    def l0(self) -> float:
        """Latents per token per layer, averaged over layers."""
        return sum(m.l0 for m in self.layers) / len(self.layers)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "l0": self.l0,
            "fvu": self.fvu,
            "layers": [m.to_dict() for m in self.layers],
        }
        if self.downstream is not None:
            out.update(vars(self.downstream))
        return out


def _per_token(t: Tensor, mask: Tensor) -> Tensor:
    """[batch, pos, d] -> [kept tokens, d]."""
    return t.reshape(-1, t.shape[-1])[mask.reshape(-1).to(t.device)]


def _capture(store: dict[str, Tensor], name: str) -> Replacement:
    def fn(act: Tensor) -> Tensor:
        store[name] = act.detach()
        return act

    return fn


def _zeros_at(mask: Tensor) -> Replacement:
    def fn(act: Tensor) -> Tensor:
        keep = mask.to(act.device)[..., None]
        return torch.where(keep, torch.zeros_like(act), act)

    return fn


def evaluate_clt(
    clt: CrossLayerTranscoder,
    model: ModelBackend,
    token_batches: Iterable[Tensor],
    *,
    downstream: bool = True,
    hooks: tuple[Sequence[str], Sequence[str]] | None = None,
    special_ids: Iterable[int] | None = None,
    max_tokens: int | None = None,
    progress: bool | None = None,
) -> CLTEvaluation:
    """Evaluate a CLT over held-out `token_batches` ([batch, pos] each; not the training
    tokens). `hooks` are (input hooks, output hooks) per layer, default the CLT's metadata;
    `special_ids` default to the tokenizer's special tokens; `max_tokens` stops early."""
    hooks_in, hooks_out = replacement_hooks(clt, hooks)
    specials = special_token_ids(model.tokenizer) if special_ids is None else set(special_ids)
    recon_acc = [ReconstructionAccumulator() for _ in range(clt.n_layers)]
    sparse_acc = [SparsityAccumulator(clt.cfg.d_sae) for _ in range(clt.n_layers)]
    down_acc = DownstreamAccumulator() if downstream else None
    batches = TokenPass(
        token_batches, desc="evaluating CLT", max_tokens=max_tokens, progress=progress
    )
    with torch.no_grad(), eval_mode(clt):
        for tokens in batches:
            mask = keep_mask(tokens, specials)  # [batch, pos]
            acts: dict[str, Tensor] = {}
            wanted = hooks_in + hooks_out
            if down_acc is not None:
                clean = model.logits(tokens, {h: _capture(acts, h) for h in wanted})
            else:
                acts = model.activations(tokens, wanted)
            x = stack_layers(acts, hooks_in).to(clt.device)  # [batch, pos, n_layers, d_in]
            y = stack_layers(acts, hooks_out)  # [batch, pos, n_layers, d_out]
            latents = clt.encode(x)
            recon = clt.reconstruct(x, latents).to(y.device, y.dtype)  # skip path included
            for layer in range(clt.n_layers):
                sparse_acc[layer].update(_per_token(latents[..., layer, :], mask))
                recon_acc[layer].update(
                    _per_token(y[..., layer, :], mask), _per_token(recon[..., layer, :], mask)
                )
            if down_acc is not None:
                scored = PredictionScorer(clean, tokens, mask)
                spliced = model.logits(
                    tokens, clt_replacements(clt, keep=mask, hooks=(hooks_in, hooks_out))
                )
                ablated = model.logits(tokens, {h: _zeros_at(mask) for h in hooks_out})
                ce_sae, kl_sae = scored(spliced)
                ce_abl, kl_abl = scored(ablated)
                down_acc.update(scored.ce_clean, ce_sae, ce_abl, kl_sae, kl_abl)
    layers = [
        EvalMetrics.from_stats(r.result(), s.result())
        for r, s in zip(recon_acc, sparse_acc, strict=True)
    ]
    return CLTEvaluation(layers, down_acc.result() if down_acc is not None else None)
