"""Next-token cross-entropy and KL divergence, scored at the predictions that count."""

from __future__ import annotations

import torch
from torch import Tensor


def log_probs(logits: Tensor) -> Tensor:
    """log-softmax over the last (vocabulary) dimension, in at least float32."""
    # Half-precision log-softmax over a large vocabulary loses digits the scores depend on.
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def token_ce(log_q: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy -log q(target) per prediction: log_q [..., vocab], targets [...]."""
    return -log_q.gather(-1, targets.to(log_q.device).long().unsqueeze(-1)).squeeze(-1)


def kl_divergence(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) summed over the vocabulary from log-probabilities [..., vocab] -> [...]."""
    if log_p.shape != log_q.shape:
        raise ValueError(f"shapes differ: {tuple(log_p.shape)} vs {tuple(log_q.shape)}")
    p = log_p.exp()
    # Where p is 0 the term is 0, even if log q is -inf.
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(dim=-1)


def prediction_mask(mask: Tensor) -> Tensor:
    """Positions t whose next-token prediction is scored: [batch, pos - 1] bool.

    Both the token read at t and the target at t + 1 must be ordinary tokens: predicting a
    BOS or a padding token, or predicting from one, says nothing about the SAE.
    """
    return mask[:, :-1] & mask[:, 1:]


class PredictionScorer:
    """Scores a batch's logits against the clean run's, at the scored predictions only.

    Selecting those rows first keeps the float32 log-softmax copies at [n, vocab] rather
    than [batch, pos, vocab].
    """

    def __init__(self, clean_logits: Tensor, tokens: Tensor, mask: Tensor) -> None:
        if clean_logits.ndim != 3 or tuple(tokens.shape) != tuple(clean_logits.shape[:2]):
            raise ValueError(
                f"expected logits [batch, pos, vocab] and tokens [batch, pos], got "
                f"{tuple(clean_logits.shape)} and {tuple(tokens.shape)}"
            )
        self.pred = prediction_mask(mask).to(clean_logits.device)  # [batch, pos - 1]
        self.targets = tokens[:, 1:].to(clean_logits.device)[self.pred]  # [n]
        self.log_p = log_probs(clean_logits[:, :-1][self.pred])  # [n, vocab]
        self.ce_clean = token_ce(self.log_p, self.targets)  # [n]

    def __call__(self, logits: Tensor) -> tuple[Tensor, Tensor]:
        """(cross-entropy [n], KL(clean || these) [n]) for logits [batch, pos, vocab]."""
        log_q = log_probs(logits[:, :-1][self.pred])
        return token_ce(log_q, self.targets), kl_divergence(self.log_p, log_q)
