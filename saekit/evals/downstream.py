"""Per-token cross-entropy and KL divergence from logits, and which predictions are scored."""

from __future__ import annotations

import torch
from torch import Tensor


def _log_probs(logits: Tensor) -> Tensor:
    # Half-precision log-softmax over a large vocabulary loses digits the scores depend on.
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def next_token_ce(logits: Tensor, tokens: Tensor) -> Tensor:
    """Cross-entropy of predicting tokens[:, t + 1] from position t: [batch, pos - 1].

    logits is [batch, pos, vocab], tokens [batch, pos].
    """
    if logits.ndim != 3 or tokens.shape != logits.shape[:2]:
        raise ValueError(
            f"expected logits [batch, pos, vocab] and tokens [batch, pos], got "
            f"{tuple(logits.shape)} and {tuple(tokens.shape)}"
        )
    log_probs = _log_probs(logits[:, :-1])  # [batch, pos - 1, vocab]
    targets = tokens[:, 1:].to(log_probs.device).long()
    return -log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def kl_divergence(clean_logits: Tensor, new_logits: Tensor) -> Tensor:
    """KL(p_clean || p_new) summed over the vocabulary, per position: [batch, pos]."""
    if clean_logits.shape != new_logits.shape:
        raise ValueError(
            f"logits shapes differ: {tuple(clean_logits.shape)} vs {tuple(new_logits.shape)}"
        )
    log_p = _log_probs(clean_logits)
    log_q = _log_probs(new_logits)
    # xlogy-style: where p is 0 the term is 0, even if log q is -inf.
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(dim=-1)


def prediction_mask(mask: Tensor) -> Tensor:
    """Positions t whose next-token prediction is scored: [batch, pos - 1] bool.

    Both the token read at t and the target at t + 1 must be ordinary tokens: predicting a
    BOS or a padding token, or predicting from one, says nothing about the SAE.
    """
    return mask[:, :-1] & mask[:, 1:]
