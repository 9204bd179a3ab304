"""The short report `saekit train` prints when a run finishes: the held-out metrics next to the
values a good SAE reaches, and a few latents with the text that activates them most; for a
crosscoder, its latents by relative decoder norm (`relative_norm_summary`, which `saekit
dashboard` prints too)."""

from __future__ import annotations

import math
from collections import Counter
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from saekit.analysis.crosscoder_norms import CrosscoderNorms

#: (metric, what a good SAE reaches, test) for the headline metrics.
TARGETS: tuple[tuple[str, str, Any], ...] = (
    ("l0", "50 to 200", lambda v: 50 <= v <= 200),
    ("explained_variance", ">= 0.95", lambda v: v >= 0.95),
    ("ce_loss_score", ">= 0.99", lambda v: v >= 0.99),
    ("kl_div_score", ">= 0.95", lambda v: v >= 0.95),
    ("dead_fraction", "<= 0.02", lambda v: v <= 0.02),
    ("dense_fraction", "<= 0.01", lambda v: v <= 0.01),
)
#: Latents shown, chosen among those firing on this share of tokens (rare enough to be
#: specific, common enough to have examples).
DENSITY_RANGE = (1e-3, 5e-2)


def format_metrics(metrics: dict[str, Any]) -> str:
    """The headline metrics, each with the value a good SAE reaches and whether this one does."""
    rows = ["  metric                  value      good SAE", "  " + "-" * 46]
    for name, good, passes in TARGETS:
        value = metrics.get(name)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue
        mark = "ok" if passes(value) else "--"
        rows.append(f"  {name:22s} {value:9.4f}   {good:10s} {mark}")
    return "\n".join(rows)


def pick_latents(stats: Any, n: int = 5) -> list[int]:
    """The `n` latents with the most consistent top examples (the same token again and again
    reads as a clear feature), among latents of moderate density."""
    density = stats.density
    lo, hi = DENSITY_RANGE
    candidates = [i for i in range(stats.d_sae) if lo <= float(density[i]) <= hi]
    if len(candidates) < n:  # a short run or an odd SAE: fall back to any latent that fired
        candidates = [i for i in range(stats.d_sae) if stats.fire_count[i] > 0]

    def dominant(latent: int) -> tuple[int, float]:
        """(most common top-example token, its share of the top examples)."""
        tokens = [window[stats.left] for _, window, _ in stats.top_examples(latent)]
        if not tokens:
            return -1, 0.0
        token, count = Counter(tokens).most_common(1)[0]
        return token, count / len(tokens)

    ranked = sorted(
        candidates, key=lambda i: (dominant(i)[1], float(stats.max_act[i])), reverse=True
    )
    # One latent per dominant token, so the report shows different features.
    chosen: list[int] = []
    seen: set[int] = set()
    for latent in ranked:
        token = dominant(latent)[0]
        if token not in seen:
            chosen.append(latent)
            seen.add(token)
        if len(chosen) == n:
            return chosen
    return chosen + [i for i in ranked if i not in chosen][: n - len(chosen)]


def describe_latent(stats: Any, latent: int, tokenizer: Any, examples: int = 3) -> str:
    """One latent: its density, the tokens it fires on most, and a few contexts."""
    top = stats.top_examples(latent)
    counts = Counter(window[stats.left] for _, window, _ in top)
    tokens = ", ".join(
        f"{tokenizer.decode([t]).strip() or repr(tokenizer.decode([t]))!s} x{c}"
        for t, c in counts.most_common(4)
    )
    lines = [f"  latent {latent} (fires on {float(stats.density[latent]):.2%} of tokens): {tokens}"]
    for value, window, _ in top[:examples]:
        before = tokenizer.decode([t for t in window[: stats.left] if t >= 0])
        token = tokenizer.decode([window[stats.left]])
        after = tokenizer.decode([t for t in window[stats.left + 1 :] if t >= 0])
        context = f"...{before[-40:]}[[{token}]]{after[:20]}...".replace("\n", " ")
        lines.append(f"      {value:6.2f}  {context}")
    return "\n".join(lines)


def heldout_statistics(sae: Any, backend: Any, batches: list[Any], n_tokens: int = 16_384) -> Any:
    """Feature statistics of `sae` on the first `n_tokens` tokens of held-out `batches`."""
    from saekit.analysis import feature_statistics

    taken, got = [], 0
    for batch in batches:
        if got >= n_tokens:
            break
        taken.append(batch)
        got += batch.numel()
    return feature_statistics(sae, backend, taken)


def latent_report(stats: Any, tokenizer: Any, n_latents: int = 5) -> str:
    """A few latents with the held-out text that activates them most."""
    return "\n".join(describe_latent(stats, i, tokenizer) for i in pick_latents(stats, n_latents))


def relative_norm_summary(norms: CrosscoderNorms, n_bins: int = 10, width: int = 40) -> str:
    """A crosscoder's latents by class (a-only, shared, b-only, neither) and a text histogram
    of their relative decoder norms between sites a and b in `n_bins` equal bins on [0, 1],
    bars at most `width` characters long. `norms` is `CrosscoderNorms.of(crosscoder)` or
    the `crosscoder` of its feature statistics."""
    from saekit.analysis.crosscoder_norms import CLASS_ORDER

    if n_bins < 1 or width < 1:
        raise ValueError(f"n_bins and width must be >= 1, got {n_bins} and {width}")
    relative = norms.relative
    counts = norms.counts()
    labels = norms.class_labels()
    name_a, name_b = norms.site_names[norms.a], norms.site_names[norms.b]
    total = max(norms.d_sae, 1)
    label_width = max(len(labels[c]) for c in CLASS_ORDER)
    lines = [
        f"  relative decoder norms of {norms.d_sae:,} latents (0: {name_a} only, 0.5: both "
        f"alike, 1: {name_b} only; exclusive below {norms.band:g} and above "
        f"{1 - norms.band:g})",
    ]
    for name in CLASS_ORDER:
        if name == "neither" and not counts[name]:
            continue
        lines.append(f"    {labels[name]:{label_width}s} {counts[name]:9,d} "
                     f"({counts[name] / total:6.1%})")
    finite = relative[~relative.isnan()]
    bins = (finite * n_bins).floor().long().clamp(0, n_bins - 1)
    heights = torch.bincount(bins, minlength=n_bins).tolist()
    peak = max(max(heights), 1)
    for b, count in enumerate(heights):
        bar = "#" * math.ceil(width * count / peak) if count else ""
        lines.append(f"    {b / n_bins:4.2f}-{(b + 1) / n_bins:4.2f} |{bar:{width}s} {count:,d}")
    return "\n".join(lines)
