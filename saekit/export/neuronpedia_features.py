"""One latent's record in a Neuronpedia dashboard batch, built from `FeatureStats` and weights.

The record has the fields (names and meaning) of SAEDashboard's Neuronpedia feature: example
activations (top examples, then examples from equal-width activation intervals), the tokens
the decoder row most promotes and suppresses through the unembedding, histograms of the
latent's activations and of its logit effects over the whole vocabulary, its density, and the
residual dimensions its decoder row is most aligned with. Correlation tables need
co-activation statistics that `FeatureStats` does not keep, so they are written empty, as
SAEDashboard writes fields it did not compute.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from saekit.analysis.stats import Examples

#: Digits kept for every number written: files stay small, values stay readable.
DIGITS = 4


def rounded(values: list[float]) -> list[float]:
    return [round(float(v), DIGITS) for v in values]


def torch_rounded(values: Tensor) -> Tensor:
    """`rounded` for a whole tensor at once, in float64 so that each number prints short."""
    scale = 10.0**DIGITS
    return (values.double() * scale).round() / scale


class TokenText:
    """The text of single tokens, decoded once each (a latent's examples repeat tokens)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        text = self.cache.get(token)
        if text is None:
            text = self.tokenizer.decode([token]) if self.tokenizer is not None else f"<{token}>"
            self.cache[token] = text
        return text


@dataclass
class LogitTables:
    """Per latent of a batch: promoted and suppressed tokens and the logit-effect histogram."""

    pos_ids: Tensor
    """[n, n_logits] most promoted token ids, largest effect first."""
    pos_values: Tensor
    neg_ids: Tensor
    """[n, n_logits] most suppressed token ids, most negative first."""
    neg_values: Tensor
    hist_values: Tensor
    """[n, n_bins] bin centres of the histogram of all vocabulary effects."""
    hist_heights: Tensor
    """[n, n_bins] tokens per bin."""


@torch.no_grad()
def logit_tables(W_dec: Tensor, W_U: Tensor, n_logits: int = 10, n_bins: int = 50) -> LogitTables:
    """Logit effects W_dec [n, d] @ W_U [d, vocab] of a batch of latents, summarised.

    The histogram has `n_bins` equal bins from each latent's smallest to largest effect, the
    largest falling in the last bin (as torch.histc counts)."""
    effect = W_dec.float() @ W_U.float()  # [n, vocab]
    k = min(n_logits, effect.shape[1])
    top = effect.topk(k, dim=1)
    bottom = effect.topk(k, dim=1, largest=False)
    low = effect.min(dim=1, keepdim=True).values
    high = effect.max(dim=1, keepdim=True).values
    width = (high - low) / n_bins  # [n, 1]
    safe = torch.where(width > 0, width, torch.ones_like(width))
    bins = ((effect - low) / safe).floor().long().clamp(0, n_bins - 1)  # [n, vocab]
    rows = torch.arange(effect.shape[0])[:, None] * n_bins
    heights = torch.bincount((rows + bins).flatten(), minlength=effect.shape[0] * n_bins)
    centres = low + (torch.arange(n_bins) + 0.5) * width  # [n, n_bins]
    return LogitTables(
        top.indices, top.values, bottom.indices, bottom.values,
        centres, heights.reshape(effect.shape[0], n_bins),
    )


@torch.no_grad()
def neuron_alignment(W_dec: Tensor, n_rows: int = 3) -> tuple[Tensor, Tensor, Tensor]:
    """(indices, values, share of L1) [n, n_rows] of the largest entries of each decoder row:
    the output dimensions a latent writes to most."""
    rows = W_dec.float()
    top = rows.topk(min(n_rows, rows.shape[1]), dim=1)
    l1 = rows.abs().sum(dim=1, keepdim=True).clamp_min(1e-30)
    return top.indices, top.values, top.values.abs() / l1


def activation_histogram(counts: list[int], hist_range: float) -> tuple[list[float], list[int]]:
    """(bin centres, counts) of a latent's firing activations from its `FeatureStats`
    histogram (`counts` over [0, hist_range)); empty bins above the largest activation are
    left out (the histogram's range is a power of two above it)."""
    filled = [j for j, c in enumerate(counts) if c]
    if not filled:
        return [], []
    last = filled[-1] + 1
    width = hist_range / len(counts)
    return rounded([(j + 0.5) * width for j in range(last)]), counts[:last]


def _example(
    value: float, tokens: list[int], acts: list[float], left: int, text: Callable[[int], str],
    bin_min: float, bin_max: float, bin_contains: float,
) -> dict[str, Any]:
    """One example as SAEDashboard writes an activation: the window's token strings and
    values (`acts`, already rounded), and the index of the token the example was picked for."""
    keep = [j for j, t in enumerate(tokens) if t >= 0]  # -1: beyond the sequence's ends
    return {
        "bin_min": bin_min,
        "bin_max": bin_max,
        "bin_contains": bin_contains,
        "tokens": [text(tokens[j]) for j in keep],
        "values": [acts[j] for j in keep],
        "qualifying_token_index": sum(1 for j in keep if j < left),
    }


Row = tuple[float, list[int], list[float]]
"""An example: (activation, window token ids, window activations)."""


def example_rows(ex: Examples, latents: list[int]) -> list[list[Row]]:
    """The kept examples of each of `latents`, in the order kept (reads the tensors once for
    the whole batch: per-latent indexing would cost more than the rest of the export)."""
    keys = ex.keys[latents].tolist()
    values = ex.values[latents].tolist()
    tokens = ex.tokens[latents].tolist()
    acts = torch_rounded(ex.acts[latents]).tolist()
    return [
        [(v, t, a) for k, v, t, a in zip(keys[i], values[i], tokens[i], acts[i], strict=True)
         if k >= 0 and v > 0]
        for i in range(len(latents))
    ]


def activation_examples(
    top: list[Row],
    sample: list[Row],
    max_act: float,
    density: float,
    left: int,
    text: Callable[[int], str],
    n_intervals: int = 5,
    per_interval: int = 5,
) -> list[dict[str, Any]]:
    """A latent's activations records: its `top` examples (bin_min = bin_contains = -1,
    bin_max = the largest activation), then up to `per_interval` examples of its random
    firing `sample` from each of `n_intervals` equal-width activation intervals on
    [0, max_act], highest interval first.

    An interval's bin_contains estimates the fraction of all tokens whose activation lies in
    it: the latent's density times the share of its random firing sample in the interval.
    """
    if not top:
        return []
    records = [_example(*row, left, text, -1, round(max_act, DIGITS), -1) for row in top]
    edges = [max_act * i / n_intervals for i in range(n_intervals)] + [max_act]
    for i in reversed(range(n_intervals)):
        low, high = edges[i], edges[i + 1]
        inside = [row for row in sample if low < row[0] <= high]
        contains = density * len(inside) / len(sample) if sample else 0.0
        for row in inside[:per_interval]:
            records.append(_example(
                *row, left, text, round(low, DIGITS), round(high, DIGITS), round(contains, 8),
            ))
    return records
