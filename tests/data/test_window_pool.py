"""The window pool: every window once, in a seeded random order that mixes the whole pool,
resumable exactly, and disjoint across data-parallel ranks."""

from __future__ import annotations

import pytest
import torch

from saekit.data.rank_store import RankActivationStore
from saekit.data.store import ActivationStore
from saekit.data.tokens import TokenWindows
from saekit.data.window_pool import WindowPool
from saekit.models import load_model
from saekit.models.tiny import TINY_TEXTS, tiny_gpt2, tiny_tokenizer

#: Pre-tokenized rows whose ids count up: window i of 8 tokens holds 8i .. 8i+7, so a
#: served window names its own place in the dataset.
COUNTING = [{"input_ids": list(range(start, start + 40))} for start in range(0, 4000, 40)]


def counting_windows() -> TokenWindows:
    return TokenWindows(COUNTING, None, 8, vocab_size=4000)


def served(pool: WindowPool) -> list[int]:
    """The dataset place (window index) of every window the pool serves, in order."""
    return [int(window[0]) // 8 for window in pool]


def test_every_window_is_served_once_in_a_seeded_order() -> None:
    in_order = [int(w[0]) // 8 for w in counting_windows()]
    assert in_order == list(range(500))
    first = served(WindowPool(counting_windows(), 64, seed=0))
    assert sorted(first) == in_order  # each window exactly once, none lost at the end
    assert first != in_order
    assert served(WindowPool(counting_windows(), 64, seed=0)) == first
    assert served(WindowPool(counting_windows(), 64, seed=1)) != first


def test_the_first_windows_come_from_all_over_the_pool() -> None:
    # Read in order, the first 32 windows would be places 0-31; drawn from a pool of 256
    # they spread over it (uniform draws: their mean place is near 128, not 16).
    first = served(WindowPool(counting_windows(), 256, seed=0))[:32]
    assert max(first) > 128
    assert 80 < sum(first) / len(first) < 180


def test_resuming_serves_the_same_windows_in_the_same_order() -> None:
    whole = served(WindowPool(counting_windows(), 64, seed=3))
    pool = WindowPool(counting_windows(), 64, seed=3)
    head = [int(pool.batch(1)[0, 0]) // 8 for _ in range(123)]
    state = pool.state_dict()
    resumed = WindowPool(counting_windows(), 64, seed=3)
    resumed.load_state_dict(state)
    assert head + served(resumed) == whole
    assert resumed.windows_emitted == len(whole)
    # A reader built with another pool size (a resumed run with a longer budget) takes
    # the saved pool's.
    other = WindowPool(counting_windows(), 32, seed=3)
    other.load_state_dict(state)
    assert head + served(other) == whole
    with pytest.raises(ValueError, match="without a window pool"):
        other.load_state_dict(counting_windows().state_dict())


def test_a_pool_larger_than_the_dataset_serves_it_all() -> None:
    assert sorted(served(WindowPool(counting_windows(), 10_000, seed=0))) == list(range(500))


def test_ranks_drawing_from_one_pool_order_share_no_window() -> None:
    # The store's own seed differs per rank; the pool's is shared, so the ranks take turns
    # on one sequence of windows and together read each window once.
    backend = load_model(tiny_gpt2(300), tokenizer=tiny_tokenizer(300))
    docs = list(TINY_TEXTS) * 6
    options = {"context_size": 16, "batch_size": 1, "buffer_size": 8, "model_batch_size": 2,
               "window_pool": 8, "window_pool_seed": 5}
    seen: list[list[tuple[int, ...]]] = []
    for rank in range(2):
        store = RankActivationStore(
            backend, "blocks.1.hook_resid_pre", docs, rank=rank, world_size=2,
            seed=rank, **options,
        )
        windows: list[tuple[int, ...]] = []
        original = store._forward

        def record(tokens: torch.Tensor, windows=windows, original=original):  # noqa: ANN202
            windows.extend(tuple(t.tolist()) for t in tokens)
            return original(tokens)

        store._forward = record  # type: ignore[method-assign]
        list(store)
        seen.append(windows)
    whole = ActivationStore(
        backend, "blocks.1.hook_resid_pre", docs, seed=0, **options
    ).windows
    every = [tuple(w.tolist()) for w in whole]
    # As multisets: ranks drawing in different orders would read some windows twice and
    # miss others.
    assert sorted(seen[0] + seen[1]) == sorted(every)
    assert abs(len(seen[0]) - len(seen[1])) <= 2
