"""Cross-entropy, KL and token masks against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from saekit.data.tokens import keep_mask
from saekit.evals.downstream import kl_divergence, next_token_ce, prediction_mask


def test_next_token_ce_by_hand() -> None:
    # vocab 2; position 0 uniform, position 1 puts probability e/(1+e) on token 0.
    logits = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [5.0, 5.0]]])
    tokens = torch.tensor([[0, 1, 0]])
    ce = next_token_ce(logits, tokens)
    assert ce.shape == (1, 2)
    assert ce[0, 0].item() == pytest.approx(math.log(2))
    assert ce[0, 1].item() == pytest.approx(-math.log(math.e / (1 + math.e)))


def test_kl_by_hand_and_self_is_zero() -> None:
    p = torch.tensor([0.5, 0.5])
    q = torch.tensor([0.25, 0.75])
    kl = kl_divergence(p.log()[None, None], q.log()[None, None])
    assert kl.item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(0.5 / 0.75))
    logits = torch.randn(3, 5, 11)
    assert torch.equal(kl_divergence(logits, logits), torch.zeros(3, 5))


def test_kl_handles_zero_probability() -> None:
    clean = torch.tensor([[[0.0, -math.inf]]])
    new = torch.tensor([[[0.0, 0.0]]])
    assert kl_divergence(clean, new).item() == pytest.approx(math.log(2))


def test_masks() -> None:
    tokens = torch.tensor([[50, 3, 4, 50, 5], [7, 8, 9, 0, 0]])
    mask = keep_mask(tokens, {50, 0})
    assert mask.tolist() == [[False, True, True, False, True], [True, True, True, False, False]]
    assert prediction_mask(mask).tolist() == [
        [False, True, False, False],
        [True, True, False, False],
    ]
    assert keep_mask(tokens, set()).all()
