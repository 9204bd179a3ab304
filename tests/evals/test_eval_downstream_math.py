"""Cross-entropy, KL and the scored predictions against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from saekit.data.tokens import keep_mask
from saekit.evals.downstream import (
    PredictionScorer,
    kl_divergence,
    log_probs,
    prediction_mask,
    token_ce,
)


def test_token_ce_by_hand() -> None:
    logits = torch.tensor([[0.0, 0.0], [1.0, 0.0]])
    ce = token_ce(log_probs(logits), torch.tensor([0, 0]))
    assert ce[0].item() == pytest.approx(math.log(2))
    assert ce[1].item() == pytest.approx(-math.log(math.e / (1 + math.e)))


def test_kl_by_hand_and_self_is_zero() -> None:
    p = torch.tensor([0.5, 0.5])
    q = torch.tensor([0.25, 0.75])
    kl = kl_divergence(p.log(), q.log())
    assert kl.item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75))
    lp = log_probs(torch.randn(3, 5, 11))
    assert torch.equal(kl_divergence(lp, lp), torch.zeros(3, 5))


def test_kl_handles_zero_probability() -> None:
    clean = log_probs(torch.tensor([0.0, -math.inf]))
    new = log_probs(torch.tensor([0.0, 0.0]))
    assert kl_divergence(clean, new).item() == pytest.approx(math.log(2))


def test_masks() -> None:
    tokens = torch.tensor([[50, 3, 4, 50, 5], [7, 8, 9, 0, 0]])
    mask = keep_mask(tokens, {50, 0})
    assert mask.tolist() == [[False, True, True, False, True], [True, True, True, False, False]]
    pred = prediction_mask(mask).tolist()
    assert pred == [[False, True, False, False], [True, True, False, False]]


def test_scorer_scores_next_tokens_at_unmasked_positions() -> None:
    # vocab 3, one sequence [BOS=2, 0, 1, 1]; positions 1 and 2 are scored (BOS is masked).
    tokens = torch.tensor([[2, 0, 1, 1]])
    clean = torch.zeros(1, 4, 3)
    clean[0, 1] = torch.tensor([0.0, 2.0, 0.0])  # predicts token 1 (correct) with e^2/(e^2+2)
    new = clean.clone()
    new[0, 2] = torch.tensor([5.0, 0.0, 0.0])  # now predicts 0 at position 2, target is 1
    scorer = PredictionScorer(clean, tokens, keep_mask(tokens, {2}))
    expected_clean = [-math.log(math.e**2 / (math.e**2 + 2)), math.log(3)]
    assert scorer.ce_clean.tolist() == pytest.approx(expected_clean)
    ce, kl = scorer(new)
    assert ce.tolist() == pytest.approx([expected_clean[0], -math.log(1 / (math.e**5 + 2))])
    q = torch.tensor([math.e**5, 1.0, 1.0]) / (math.e**5 + 2)
    assert kl.tolist() == pytest.approx([0.0, float((1 / 3 * (1 / 3 / q).log()).sum())])
    assert scorer(clean)[1].tolist() == [0.0, 0.0]
