"""Per-latent statistics from one streaming pass, in memory bounded by latents x examples kept.

For every latent at once: firing count (density), mean and max activation, the top
activating examples with their context windows, a uniform random sample of firing examples
(from which quantile bands are drawn), and an activation histogram. Logit effects come from
the weights alone (`logit_effects`).

Streaming rules: top examples are merged by top-k over (kept, new); the random sample is a
reservoir kept as the top-k of uniform random keys, which is a uniform sample of everything
seen; the histogram has `n_bins` equal bins on [0, R) with R a power of two per latent, and
when a larger activation arrives R doubles and pairs of bins merge, so counts stay exact.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from saekit.analysis.stats_files import Examples, FeatureStats


class FeatureStatsAccumulator:
    """Streaming accumulator; `update` per batch of latents, `result` at the end.

    Args:
        d_sae: number of latents.
        top_k: top examples kept per latent.
        n_samples: random firing examples kept per latent (for quantile bands).
        left, right: context tokens kept before and after each example's token.
        n_bins: histogram bins (even).
        seed: seeds the random sample.
    """

    def __init__(
        self,
        d_sae: int,
        *,
        top_k: int = 20,
        n_samples: int = 40,
        left: int = 12,
        right: int = 4,
        n_bins: int = 32,
        seed: int = 0,
    ) -> None:
        if top_k < 1 or n_samples < 1:
            raise ValueError(f"top_k and n_samples must be >= 1, got {top_k}, {n_samples}")
        if left < 0 or right < 0:
            raise ValueError(f"left and right must be >= 0, got {left}, {right}")
        if n_bins < 2 or n_bins % 2:
            raise ValueError(f"n_bins must be an even number >= 2, got {n_bins}")
        self.d_sae, self.left, self.right, self.n_bins = d_sae, left, right, n_bins
        self.window = left + 1 + right
        self.n_tokens = 0
        self.fire_count = torch.zeros(d_sae, dtype=torch.long)
        self.act_sum = torch.zeros(d_sae, dtype=torch.float64)
        self.max_act = torch.zeros(d_sae)
        self.top = self._empty(top_k)
        self.sample = self._empty(n_samples)
        self.hist_counts = torch.zeros(d_sae, n_bins, dtype=torch.long)
        # log2 of each histogram's range; None-like sentinel for latents not yet seen firing.
        self.hist_exp = torch.full((d_sae,), -10_000, dtype=torch.long)
        self.generator = torch.Generator().manual_seed(seed)

    def _empty(self, k: int) -> Examples:
        return Examples(
            torch.full((self.d_sae, k), -1.0),
            torch.zeros(self.d_sae, k),
            torch.full((self.d_sae, k, self.window), -1, dtype=torch.int32),
            torch.zeros(self.d_sae, k, self.window),
        )

    @torch.no_grad()
    def update(self, tokens: Tensor, latents: Tensor, mask: Tensor | None = None) -> None:
        """Add a batch: tokens [batch, pos], latents [batch, pos, d_sae], mask [batch, pos]
        (True where the token counts; special tokens should be False)."""
        if latents.ndim != 3 or tuple(latents.shape[:2]) != tuple(tokens.shape):
            raise ValueError(
                f"expected tokens [batch, pos] and latents [batch, pos, d_sae], got "
                f"{tuple(tokens.shape)} and {tuple(latents.shape)}"
            )
        if latents.shape[-1] != self.d_sae:
            raise ValueError(f"latents have {latents.shape[-1]} latents, expected {self.d_sae}")
        latents = latents.detach().float().cpu()
        tokens = tokens.cpu()
        if mask is not None:
            latents = latents * mask.cpu()[:, :, None]
            self.n_tokens += int(mask.sum())
        else:
            self.n_tokens += tokens.numel()
        flat = latents.reshape(-1, self.d_sae)  # [n, d_sae]
        # Only firing entries matter to every statistic: work on them alone (latents are
        # sparse, so this is much less work than passes over the dense batch).
        token_idx, latent_idx = flat.nonzero(as_tuple=True)
        values = flat[token_idx, latent_idx]
        self.fire_count += torch.bincount(latent_idx, minlength=self.d_sae)
        self.act_sum.index_add_(0, latent_idx, values.double())
        batch_max = torch.zeros(self.d_sae).scatter_reduce(0, latent_idx, values, "amax")
        self.max_act = torch.maximum(self.max_act, batch_max)
        self._update_histogram(latent_idx, values, batch_max)
        self.top = self._merge(self.top, values, token_idx, latent_idx, tokens, latents)
        keys = torch.rand(values.shape, generator=self.generator)
        self.sample = self._merge(self.sample, keys, token_idx, latent_idx, tokens, latents)

    def _merge(
        self,
        kept: Examples,
        keys: Tensor,
        token_idx: Tensor,
        latent_idx: Tensor,
        tokens: Tensor,
        latents: Tensor,
    ) -> Examples:
        """Keep the k highest keys per latent among the kept examples and the new entries
        (keys, flat token index and latent of each firing entry)."""
        n_pos = tokens.shape[1]
        k = kept.keys.shape[1]
        # An entry can only enter if it beats its latent's k-th kept key (kept is sorted).
        entering = keys > kept.keys[latent_idx, -1]
        keys, token_idx, latent_idx = keys[entering], token_idx[entering], latent_idx[entering]
        # Sort by latent, highest key first within a latent; rank within the latent.
        order = torch.argsort(keys, descending=True, stable=True)
        order = order[torch.argsort(latent_idx[order], stable=True)]
        lat = latent_idx[order]
        counts = torch.bincount(lat, minlength=self.d_sae)
        rank = torch.arange(lat.numel()) - (torch.cumsum(counts, 0) - counts)[lat]
        first = rank < k
        lat, rank, order = lat[first], rank[first], order[first]
        tok = token_idx[order]
        row, pos = tok // n_pos, tok % n_pos
        # Context windows of the entering entries only: [entries, window].
        where = pos[:, None] + torch.arange(self.window) - self.left
        inside = (where >= 0) & (where < n_pos)
        where = where.clamp(0, n_pos - 1)
        new_keys = torch.full((self.d_sae, k), -1.0)
        new_keys[lat, rank] = keys[order]
        new_values = torch.zeros(self.d_sae, k)
        new_values[lat, rank] = latents[row, pos, lat]
        new_tokens = torch.full((self.d_sae, k, self.window), -1, dtype=torch.int32)
        new_tokens[lat, rank] = torch.where(inside, tokens[row[:, None], where].to(torch.int32), -1)
        new_acts = torch.zeros(self.d_sae, k, self.window)
        new_acts[lat, rank] = torch.where(inside, latents[row[:, None], where, lat[:, None]], 0.0)
        best = torch.cat([kept.keys, new_keys], dim=1).topk(k, dim=1).indices  # [d_sae, k]

        def pick(old: Tensor, new: Tensor) -> Tensor:
            both = torch.cat([old, new], dim=1)
            index = best.reshape(*best.shape, *([1] * (both.ndim - 2))).expand(
                -1, -1, *both.shape[2:]
            )
            return both.gather(1, index)

        return Examples(
            pick(kept.keys, new_keys), pick(kept.values, new_values),
            pick(kept.tokens, new_tokens), pick(kept.acts, new_acts),
        )

    def _update_histogram(self, latent_idx: Tensor, values: Tensor, batch_max: Tensor) -> None:
        fired = batch_max > 0
        if not fired.any():
            return
        needed = torch.ceil(torch.log2(batch_max.clamp_min(1e-30))).long()
        unseen = fired & (self.hist_exp == -10_000)
        self.hist_exp[unseen] = needed[unseen]
        grow = (needed - self.hist_exp).clamp_min(0) * fired
        half = self.n_bins // 2
        for step in range(int(grow.max())):
            sel = grow > step
            merged = self.hist_counts[sel].reshape(-1, half, 2).sum(-1)
            self.hist_counts[sel] = torch.cat([merged, torch.zeros_like(merged)], dim=1)
        self.hist_exp += grow
        width = torch.pow(2.0, self.hist_exp[latent_idx].double()) / self.n_bins
        bins = (values.double() / width).floor().long().clamp(0, self.n_bins - 1)
        counts = torch.bincount(
            latent_idx * self.n_bins + bins, minlength=self.d_sae * self.n_bins
        )
        self.hist_counts += counts.reshape(self.d_sae, self.n_bins)

    def result(self) -> FeatureStats:
        seen = self.hist_exp != -10_000
        hist_range = torch.where(seen, torch.pow(2.0, self.hist_exp.float()), 0.0)
        return FeatureStats(
            self.n_tokens, self.left, self.fire_count.clone(), self.act_sum.clone(),
            self.max_act.clone(), self.top, self.sample, self.hist_counts.clone(), hist_range,
        )


@torch.no_grad()
def logit_effects(
    W_dec: Tensor, W_U: Tensor, n: int = 10, chunk: int = 512
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """((ids, values), (ids, values)) [d_sae, n] of the tokens each latent's decoder row most
    promotes and most suppresses through the unembedding: W_dec [d_sae, d] @ W_U [d, vocab].

    Works in chunks of latents, so memory is chunk x vocab, not d_sae x vocab.
    """
    if W_dec.shape[1] != W_U.shape[0]:
        raise ValueError(
            f"the decoder writes {W_dec.shape[1]} features but the unembedding reads "
            f"{W_U.shape[0]}; logit effects need an SAE that writes to the residual stream"
        )
    n = min(n, W_U.shape[1])
    tops, bottoms = [], []
    for start in range(0, W_dec.shape[0], chunk):
        effect = W_dec[start:start + chunk].float() @ W_U.float()  # [chunk, vocab]
        top = effect.topk(n, dim=1)
        bottom = effect.topk(n, dim=1, largest=False)
        tops.append((top.indices, top.values))
        bottoms.append((bottom.indices, bottom.values))
    return (
        (torch.cat([t[0] for t in tops]), torch.cat([t[1] for t in tops])),
        (torch.cat([b[0] for b in bottoms]), torch.cat([b[1] for b in bottoms])),
    )


def histogram_edges(stats: FeatureStats, latent: int) -> Tensor:
    """[n_bins + 1] bin edges of one latent's histogram."""
    n_bins = stats.hist_counts.shape[1]
    return torch.linspace(0, float(stats.hist_range[latent]), n_bins + 1)


def log10_density(stats: FeatureStats) -> Tensor:
    """[d_sae] log10 of each latent's firing density (-inf where it never fired)."""
    return torch.log10(stats.density.float().clamp_min(0)).where(
        stats.fire_count > 0, torch.tensor(-math.inf)
    )
