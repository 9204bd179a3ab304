"""Streaming feature statistics against brute-force computations over the whole data."""

from __future__ import annotations

import pytest
import torch
from analysis_helpers import make_sae

from saekit.analysis.collect import feature_statistics, unembedding
from saekit.analysis.stats import FeatureStats, FeatureStatsAccumulator, logit_effects

D_SAE = 16


def random_batches(n: int = 5, batch: int = 3, pos: int = 10, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tokens = torch.randint(0, 1000, (batch, pos), generator=gen)
        # Sparse, with a wide range of sizes so the histogram has to grow.
        acts = torch.relu(torch.randn(batch, pos, D_SAE, generator=gen) - 0.8)
        acts = acts * torch.logspace(-2, 2, D_SAE)
        out.append((tokens, acts))
    return out


def accumulate(batches, **kwargs) -> FeatureStats:
    acc = FeatureStatsAccumulator(D_SAE, **kwargs)
    for tokens, acts in batches:
        acc.update(tokens, acts)
    return acc.result()


def test_counts_density_max_and_mean() -> None:
    batches = random_batches()
    stats = accumulate(batches)
    all_acts = torch.cat([a.reshape(-1, D_SAE) for _, a in batches])
    assert stats.n_tokens == all_acts.shape[0]
    assert torch.equal(stats.fire_count, (all_acts > 0).sum(0))
    torch.testing.assert_close(stats.density, (all_acts > 0).double().mean(0))
    torch.testing.assert_close(stats.max_act, all_acts.max(0).values)
    fired = (all_acts > 0).sum(0).clamp_min(1)
    torch.testing.assert_close(stats.mean_act, all_acts.double().sum(0) / fired)


def test_top_examples_are_the_global_top_with_their_windows() -> None:
    batches = random_batches()
    stats = accumulate(batches, top_k=4, left=3, right=2)
    tokens = torch.cat([t for t, _ in batches])  # [rows, pos]
    acts = torch.cat([a for _, a in batches])  # [rows, pos, d_sae]
    for latent in (0, 7, 15):
        examples = stats.top_examples(latent)
        expected = acts[..., latent].flatten().topk(4).values
        assert [e[0] for e in examples] == pytest.approx(expected.tolist())
        for value, window, window_acts in examples:
            row, pos = (acts[..., latent] == value).nonzero()[0].tolist()
            for j in range(6):
                p = pos - 3 + j
                inside = 0 <= p < tokens.shape[1]
                assert window[j] == (tokens[row, p] if inside else -1)
                assert window_acts[j] == pytest.approx(acts[row, p, latent] if inside else 0.0)


def test_histogram_counts_exactly_while_its_range_grows() -> None:
    batches = random_batches(n=6)
    stats = accumulate(batches, n_bins=8)
    all_acts = torch.cat([a.reshape(-1, D_SAE) for _, a in batches])
    for latent in range(D_SAE):
        values = all_acts[:, latent][all_acts[:, latent] > 0].double()
        top = float(stats.hist_range[latent])
        assert top >= values.max() and top / 2 < values.max()  # the smallest power of two
        expected = torch.histc(values, bins=8, min=0, max=top)
        # histc puts a value equal to the top edge in the last bin, as the accumulator does.
        assert stats.hist_counts[latent].tolist() == expected.long().tolist()


def test_random_sample_is_uniform_over_firing_examples() -> None:
    # Every firing token of latent 0 has a distinct value; across seeds each is drawn about
    # equally often, whatever its size or the batch it arrived in.
    tokens = torch.zeros(4, 5, dtype=torch.long)
    acts = torch.zeros(4, 5, 1)
    acts[..., 0] = torch.arange(1, 21, dtype=torch.float).reshape(4, 5)
    counts = torch.zeros(21)
    for seed in range(400):
        acc = FeatureStatsAccumulator(1, n_samples=5, seed=seed)
        for b in range(4):
            acc.update(tokens[b:b + 1], acts[b:b + 1])
        for value, *_ in _sample(acc.result()):
            counts[int(value)] += 1
    assert counts[0] == 0
    # 400 draws of 5 out of 20: each value expected 100 times.
    assert counts[1:].min() > 60 and counts[1:].max() < 140


def _sample(stats: FeatureStats):
    from saekit.analysis.stats_files import examples_of

    return examples_of(stats.sample, 0)


def test_quantile_bands_are_ordered_and_bounded() -> None:
    stats = accumulate(random_batches(n=8), n_samples=40)
    bands = stats.quantile_samples(15, n_bands=4, per_band=3)
    assert len(bands) == 4 and all(0 < len(b) <= 3 for b in bands)
    lows = [min(e[0] for e in band) for band in bands]
    highs = [max(e[0] for e in band) for band in bands]
    assert all(highs[i] <= lows[i + 1] for i in range(3))


def test_mask_excludes_tokens() -> None:
    tokens, acts = random_batches(n=1)[0]
    mask = torch.ones(tokens.shape, dtype=torch.bool)
    mask[:, 0] = False
    acc = FeatureStatsAccumulator(D_SAE)
    acc.update(tokens, acts, mask)
    stats = acc.result()
    assert stats.n_tokens == mask.sum()
    assert torch.equal(stats.fire_count, (acts[:, 1:] > 0).sum((0, 1)))


def test_logit_effects_match_the_full_product() -> None:
    gen = torch.Generator().manual_seed(0)
    W_dec, W_U = torch.randn(50, 8, generator=gen), torch.randn(8, 30, generator=gen)
    (top_ids, top_vals), (bot_ids, bot_vals) = logit_effects(W_dec, W_U, n=4, chunk=7)
    full = W_dec @ W_U
    torch.testing.assert_close(top_vals, full.topk(4, dim=1).values)
    torch.testing.assert_close(bot_vals, full.topk(4, dim=1, largest=False).values)
    torch.testing.assert_close(full.gather(1, top_ids), top_vals)
    torch.testing.assert_close(full.gather(1, bot_ids), bot_vals)
    with pytest.raises(ValueError, match="residual stream"):
        logit_effects(torch.randn(5, 7), W_U)


def test_feature_statistics_on_a_model_and_round_trip(backend, tmp_path) -> None:
    hook = "blocks.1.hook_resid_pre"
    sae = make_sae(hook)
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randint(3, 300, (2, 12), generator=gen) for _ in range(3)]
    for b in batches:
        b[:, 0] = 0  # BOS, a special token
    stats = feature_statistics(sae, backend, batches, top_k=5, n_logits=6)
    assert stats.n_tokens == 3 * 2 * 11
    acts = torch.cat([sae.encode(backend.activations(b, [hook])[hook])[:, 1:] for b in batches])
    assert torch.equal(stats.fire_count, (acts > 0).sum((0, 1)))
    torch.testing.assert_close(stats.max_act, acts.amax((0, 1)).detach())
    W_U = unembedding(backend)
    assert W_U.shape == (32, 300)
    expected = sae.W_dec.detach() @ W_U
    torch.testing.assert_close(stats.logit_top[1], expected.topk(6, dim=1).values)
    stats.save(tmp_path)
    loaded = FeatureStats.load(tmp_path)
    assert loaded.n_tokens == stats.n_tokens
    assert torch.equal(loaded.top.tokens, stats.top.tokens)
    assert torch.equal(loaded.logit_bottom[0], stats.logit_bottom[0])
    with pytest.raises(FileNotFoundError, match="feature_stats"):
        FeatureStats.load(tmp_path / "nothing")
