"""The report `saekit train` prints: metric verdicts and the choice of latents to show."""

from __future__ import annotations

import torch

from saekit.analysis.stats import FeatureStatsAccumulator
from saekit.commands.report import format_metrics, pick_latents


def test_format_metrics_marks_each_target() -> None:
    table = format_metrics({"l0": 64.0, "explained_variance": 0.90, "dead_fraction": 0.0})
    rows = {line.split()[0]: line.split()[-1] for line in table.splitlines()[2:]}
    assert rows == {"l0": "ok", "explained_variance": "--", "dead_fraction": "ok"}


def test_pick_latents_prefers_consistent_latents() -> None:
    # Latent 0 fires on token 7 only; latent 1 fires on a different token each time;
    # latent 2 never fires. All on 2% of 1000 tokens.
    tokens = torch.arange(1000).reshape(10, 100) % 50 + 100
    tokens[:, ::50] = 7
    latents = torch.zeros(10, 100, 3)
    latents[:, ::50, 0] = 1.0 + torch.rand(10, 2)
    for row in range(10):  # stronger, but on a different token in every row
        latents[row, [row + 1, row + 31], 1] = 5.0
    acc = FeatureStatsAccumulator(3, top_k=10, n_samples=2, left=2, right=1)
    acc.update(tokens, latents)
    stats = acc.result()
    assert pick_latents(stats, n=2) == [0, 1]
