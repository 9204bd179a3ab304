"""Sharded activation stores: the ranks together read every token once, and only once."""

from __future__ import annotations

import pytest
import torch

from saekit.data.rank_store import RankActivationStore
from saekit.data.store import ActivationStore
from saekit.models import load_model
from saekit.models.tiny import TINY_TEXTS, tiny_gpt2, tiny_tokenizer

HOOK = "blocks.1.hook_resid_pre"
# Batches of one row: no partial batch is dropped, so the shards must add up exactly.
OPTIONS = {"context_size": 16, "batch_size": 1, "buffer_size": 8, "model_batch_size": 2,
           "shuffle": False}


def all_rows(store: ActivationStore) -> torch.Tensor:
    return torch.cat(list(store))


def canonical(rows: torch.Tensor) -> torch.Tensor:
    key = rows.double() @ torch.linspace(1.0, 2.0, rows.shape[1], dtype=torch.float64)
    return rows[key.argsort()]


def test_two_shards_cover_the_rows_of_one_store_without_overlap() -> None:
    backend = load_model(tiny_gpt2(300), tokenizer=tiny_tokenizer(300))
    docs = list(TINY_TEXTS) * 3
    whole = all_rows(ActivationStore(backend, HOOK, docs, **OPTIONS))
    shards = [
        all_rows(RankActivationStore(backend, HOOK, docs, rank=r, world_size=2, **OPTIONS))
        for r in range(2)
    ]
    # Together the shards hold exactly the rows of the whole store (as a multiset: no row
    # read twice, none missed), split about evenly.
    together = torch.cat(shards)
    assert together.shape == whole.shape
    torch.testing.assert_close(canonical(together), canonical(whole), rtol=1e-5, atol=1e-6)
    assert abs(shards[0].shape[0] - shards[1].shape[0]) <= OPTIONS["model_batch_size"] * 16
    with pytest.raises(ValueError, match="rank 2 is outside 0..1"):
        RankActivationStore(backend, HOOK, docs, rank=2, world_size=2, **OPTIONS)
