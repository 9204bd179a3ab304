"""Which contexts of a latent the explainer sees and which the scorers test on.

Activating contexts come from the feature statistics: the top examples and a uniform random
sample of firing tokens, each with its window of tokens and activations. The explainer sees
the top contexts and samples from each activation quantile band; the scorers test on other
contexts of the random sample, spread across its range of activations. A test context never
shares a run of tokens with a context the explainer saw (the same passage seen through a
neighbouring token counts as seen), so an explanation is never scored on text it was made
from.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from saekit.analysis.stats import FeatureStats
from saekit.autointerp.config import AutointerpConfig

#: Runs of this many tokens in common make two contexts "the same passage".
SHARED_RUN = 8


@dataclass(frozen=True)
class Context:
    """A window of text: token ids and the latent's activation at each token."""

    tokens: tuple[int, ...]
    acts: tuple[float, ...]

    @property
    def max_act(self) -> float:
        return max(self.acts, default=0.0)

    def marked(self, threshold: float) -> list[bool]:
        """Tokens whose activation is at least `threshold` times the context's largest."""
        top = self.max_act
        if top <= 0:
            return [False] * len(self.acts)
        return [a > 0 and a >= threshold * top for a in self.acts]


def context(tokens: Sequence[int], acts: Sequence[float]) -> Context:
    """A context from a statistics window, dropping the positions beyond the sequence (-1)."""
    kept = [(int(t), float(a)) for t, a in zip(tokens, acts, strict=True) if int(t) >= 0]
    return Context(tuple(t for t, _ in kept), tuple(a for _, a in kept))


@dataclass
class ContextSplit:
    """One latent's contexts: `top` and `bands` for the explainer, `test` for the scorers."""

    top: list[Context]
    """The strongest contexts, strongest first."""
    bands: list[list[Context]]
    """Contexts from each activation quantile band, weakest band first."""
    test: list[Context]
    """Contexts the scorers test on, weakest first; none of them was shown to the explainer."""
    n_distinct: int
    """Distinct activating contexts the statistics hold for this latent."""

    @property
    def train(self) -> list[Context]:
        return self.top + [c for band in self.bands for c in band]


def _runs(tokens: Sequence[int], n: int) -> set[tuple[int, ...]]:
    return {tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)}


def _run_length(window: int) -> int:
    return max(2, min(SHARED_RUN, window // 2))


def shares_passage(ctx: Context, seen: set[tuple[int, ...]], n: int) -> bool:
    """Whether `ctx` has a run of `n` tokens in `seen`; a context shorter than `n` counts
    when it lies inside one of the seen runs."""
    if len(ctx.tokens) < n:
        return any(_contains(run, ctx.tokens) for run in seen)
    return not _runs(ctx.tokens, n).isdisjoint(seen)


def _contains(run: tuple[int, ...], part: tuple[int, ...]) -> bool:
    return any(run[i:i + len(part)] == part for i in range(len(run) - len(part) + 1))


def _distinct(contexts: Iterable[Context]) -> list[Context]:
    seen: set[Context] = set()
    out = []
    for ctx in contexts:
        if ctx not in seen:
            seen.add(ctx)
            out.append(ctx)
    return out


def spread(items: Sequence[Context], n: int) -> list[Context]:
    """`n` items evenly spread over a sorted list (the middle of each of n equal parts)."""
    if len(items) <= n:
        return list(items)
    return [items[(2 * i + 1) * len(items) // (2 * n)] for i in range(n)]


def split_contexts(stats: FeatureStats, latent: int, cfg: AutointerpConfig) -> ContextSplit:
    """The explainer's and the scorers' contexts of `latent`.

    The test contexts are chosen first, spread over the random sample's range of
    activations (leaving out the top contexts the explainer is meant to see, while there are
    enough others), and at most half of the distinct contexts, so that a rare latent is
    still tested. The explainer then gets the top contexts and, from each of `n_bands`
    quantile bands of the sample, `per_band` contexts spread over the band; none of them is
    a test context or shares a passage with one.
    """
    tops = _distinct(context(t, a) for _, t, a in stats.top_examples(latent))
    # The whole random sample, weakest first: one band holding every example.
    whole = stats.quantile_samples(latent, n_bands=1, per_band=stats.sample.keys.shape[1])
    sample = _distinct(context(t, a) for _, t, a in reversed(whole[0])) if whole else []
    n_distinct = len(_distinct(tops + sample))
    n_test = min(cfg.n_test, n_distinct // 2)
    best = set(tops[: cfg.n_top])
    candidates = [c for c in sample if c not in best]
    test = spread(candidates if len(candidates) >= n_test else sample, n_test)
    n = _run_length(stats.top.tokens.shape[2])
    held: set[tuple[int, ...]] = set()
    for c in test:
        held |= _runs(c.tokens, n)
    used = set(test)

    def free(ctx: Context) -> bool:
        return ctx not in used and not shares_passage(ctx, held, n)

    top = [c for c in tops if free(c)][: cfg.n_top]
    used.update(top)
    bands = []
    for b in range(cfg.n_bands):
        lo, hi = len(sample) * b // cfg.n_bands, len(sample) * (b + 1) // cfg.n_bands
        picked = spread([c for c in sample[lo:hi] if free(c)], cfg.per_band)
        used.update(picked)
        bands.append(picked)
    return ContextSplit(top=top, bands=bands, test=test, n_distinct=n_distinct)
