"""Block mixing in `CachedActivations`: every buffer draws blocks from the whole cache.

The caches here are written by hand in the documented folder format (metadata.json,
progress.json, safetensors shards), with rows that name themselves: column 0 holds the
row's index in the whole cache and column 1 its shard, so where every served row came from
can be read off the batch.
"""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from saekit.data.cache import CachedActivations, CacheError

HOOK = "blocks.0.hook_resid_pre"
WIDTH = 4


def write_indexed_cache(folder: Path, shard_rows: list[int], hooks: tuple[str, ...] = (HOOK,),
                        dtype: torch.dtype = torch.float32) -> None:
    """A cache of len(shard_rows) shards whose rows are [global index, shard, 1, -1]; a
    second hook holds the same rows times 2."""
    folder.mkdir(parents=True)
    records, begin = [], 0
    for number, rows in enumerate(shard_rows):
        index = torch.arange(begin, begin + rows, dtype=torch.float64)
        shard = torch.full((rows,), float(number), dtype=torch.float64)
        data = torch.stack([index, shard, torch.ones(rows), -torch.ones(rows)], dim=1)
        tensors = {h: (data * (1 + i)).to(dtype).contiguous() for i, h in enumerate(hooks)}
        blob = save(tensors)
        name = f"shard_{number:05d}.safetensors"
        (folder / name).write_bytes(blob)
        records.append({"file": name, "rows": rows, "bytes": len(blob),
                        "crc32": f"{zlib.crc32(blob):08x}"})
        begin += rows
    (folder / "progress.json").write_text(json.dumps(records))
    meta = {
        "format": "saekit-activation-cache", "version": 1, "model": "indexed",
        "hooks": list(hooks), "d_in": dict.fromkeys(hooks, WIDTH),
        "dtype": {torch.float32: "float32", torch.bfloat16: "bfloat16"}[dtype],
        "context_size": 8, "n_tokens": begin, "complete": True,
    }
    (folder / "metadata.json").write_text(json.dumps(meta))


def index_of(batch: torch.Tensor) -> torch.Tensor:
    return batch[:, 0].round().long()


@pytest.fixture(scope="module")
def wide(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """64 shards of 256 rows: 16,384 rows, 1,024 blocks of 16."""
    folder = tmp_path_factory.mktemp("mix") / "wide"
    write_indexed_cache(folder, [256] * 64)
    return folder


def reader(folder: Path, **options: object) -> CachedActivations:
    settings: dict[str, object] = {"batch_size": 64, "buffer_size": 256, "block_rows": 16}
    settings.update(options)
    return CachedActivations(folder, **settings)  # type: ignore[arg-type]


def test_a_buffer_draws_its_blocks_from_all_over_the_cache(wide: Path) -> None:
    # One batch = one whole buffer of 16 blocks, so the batch shows what a fill gathered.
    first = index_of(next(reader(wide, batch_size=256)))
    assert len(first) == 256 and len(set(first.tolist())) == 256
    blocks = (first // 16).unique()
    assert len(blocks) == 16  # whole blocks: 16 rows from each of 16 blocks
    assert all(int((first // 16 == b).sum()) == 16 for b in blocks)
    shards = (first // 256).unique()
    # 16 blocks drawn from 64 shards land in ~14 distinct shards on average; P(< 10) < 1e-3.
    assert len(shards) >= 10
    assert int(blocks.max() - blocks.min()) > 512  # spread over the cache, not one stretch
    # The shards mode fills the same buffer from one shard.
    old = index_of(next(reader(wide, batch_size=256, mix="shards")))
    assert len((old // 256).unique()) == 1
    # The buffer is shuffled: the rows of a block are not served in a run.
    assert not torch.equal(first, first.sort().values)


def test_every_row_is_served_once_per_pass(wide: Path) -> None:
    served = torch.cat([index_of(b) for b in reader(wide, seed=3)])
    assert torch.equal(served.sort().values, torch.arange(64 * 256))
    # Rows arrive whole: each one's shard column agrees with its index.
    rows = torch.cat(list(reader(wide, seed=3)))
    assert torch.equal(rows[:, 1], (index_of(rows) // 256).float())


def test_short_last_blocks_and_empty_shards(tmp_path: Path) -> None:
    """Shards of uneven sizes (not multiples of the block, one empty): each row once, and
    the last partial batch dropped (a pass serves whole batches only, as in "shards")."""
    sizes = [100, 0, 37, 256, 5, 90]
    write_indexed_cache(tmp_path / "c", sizes)
    total = sum(sizes)
    served = torch.cat([index_of(b) for b in reader(tmp_path / "c", batch_size=50, seed=1)])
    assert len(served) == total // 50 * 50
    assert len(served.unique()) == len(served) and int(served.max()) < total
    every = torch.cat([index_of(b) for b in reader(tmp_path / "c", batch_size=1, seed=1)])
    assert torch.equal(every.sort().values, torch.arange(total))


def test_without_shuffling_rows_come_in_cache_order(tmp_path: Path) -> None:
    write_indexed_cache(tmp_path / "c", [70, 33, 128])
    served = torch.cat([index_of(b) for b in reader(tmp_path / "c", batch_size=1, shuffle=False)])
    assert torch.equal(served, torch.arange(231))


def test_the_order_is_fixed_by_the_seed(wide: Path) -> None:
    def first_buffer(seed: int) -> list[int]:
        return index_of(next(reader(wide, batch_size=256, seed=seed))).tolist()

    assert first_buffer(0) == first_buffer(0)
    assert set(first_buffer(0)) != set(first_buffer(1))  # other blocks, not only reordered
    assert set(first_buffer(0)) != set(
        index_of(next(reader(wide, batch_size=256, block_rows=32))).tolist()
    )


@pytest.mark.parametrize("stop_after", [1, 7, 12])  # mid-buffer, at a buffer's end, later
def test_resume_mid_pass_gives_the_same_batches(wide: Path, stop_after: int) -> None:
    # Batches of 48 do not divide the 256-row buffer, so rows are carried between fills.
    first = reader(wide, batch_size=48, seed=7, reuse_batches=2)
    for _ in range(stop_after):
        next(first)
    state = first.state_dict()
    assert state["config"]["mix"] == "blocks" and state["config"]["block_rows"] == 16
    rest = [b.clone() for b in first]
    again = reader(wide, batch_size=48, seed=7, reuse_batches=2)
    again.load_state_dict(state)
    resumed = [b.clone() for b in again]
    assert len(resumed) == len(rest) == 64 * 256 // 48 - stop_after
    assert all(torch.equal(a, b) for a, b in zip(resumed, rest, strict=True))


def test_a_position_saved_in_another_mode_is_refused(wide: Path) -> None:
    blocks = reader(wide)
    next(blocks)
    with pytest.raises(ValueError, match="mix: saved 'blocks', now 'shards'"):
        reader(wide, mix="shards").load_state_dict(blocks.state_dict())
    with pytest.raises(ValueError, match="block_rows: saved 16, now 32"):
        reader(wide, block_rows=32).load_state_dict(blocks.state_dict())


def test_a_position_saved_before_block_mixing_continues_in_shards_mode(
    wide: Path, caplog: pytest.LogCaptureFixture
) -> None:
    old = reader(wide, mix="shards", seed=2)
    for _ in range(5):
        next(old)
    state = old.state_dict()
    rest = list(old)
    for key in ("mix", "block_rows"):  # what a state written before this option held
        del state["config"][key]
    new = reader(wide, seed=2)
    with caplog.at_level(logging.WARNING):
        new.load_state_dict(state)
    assert "predates block mixing" in caplog.text and new.mix == "shards"
    assert all(torch.equal(a, b) for a, b in zip(list(new), rest, strict=True))


def test_a_damaged_shard_is_named_before_any_of_its_rows_is_served(tmp_path: Path) -> None:
    write_indexed_cache(tmp_path / "c", [64] * 16)
    shard = tmp_path / "c" / "shard_00009.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01  # a low bit of a float: still finite, only the CRC sees it
    shard.write_bytes(bytes(data))
    for seed in range(4):
        served: list[torch.Tensor] = []
        with pytest.raises(CacheError, match="shard_00009.safetensors fails its CRC-32"):
            for batch in reader(tmp_path / "c", batch_size=16, buffer_size=64, seed=seed):
                served.append(index_of(batch))
        got = torch.cat(served) if served else torch.empty(0, dtype=torch.long)
        assert not bool(((got >= 9 * 64) & (got < 10 * 64)).any())


def test_several_hooks_and_a_converting_read(tmp_path: Path) -> None:
    hooks = (HOOK, "blocks.1.hook_resid_pre")
    write_indexed_cache(tmp_path / "c", [40, 40, 40], hooks=hooks, dtype=torch.bfloat16)
    rows = 0
    for batch in reader(tmp_path / "c", batch_size=20, buffer_size=60, dtype="float32"):
        assert batch[hooks[1]].dtype == torch.float32
        assert torch.equal(batch[hooks[1]], 2 * batch[hooks[0]])
        rows += 20
    assert rows == 120


def test_norm_estimate_reads_blocks_and_keeps_the_position(wide: Path) -> None:
    fresh = reader(wide, seed=4)
    expected_first = next(fresh)
    estimating = reader(wide, seed=4)
    factor = estimating.estimate_norm_scaling_factor(n_batches=1000)  # more than the cache
    rows = torch.cat(list(reader(wide, batch_size=1, shuffle=False))).double()
    assert factor == pytest.approx(WIDTH**0.5 / rows.norm(dim=-1).mean().item(), rel=1e-12)
    assert torch.equal(next(estimating), expected_first)


@pytest.mark.parametrize(
    ("options", "named"),
    [({"mix": "rows"}, "mix must be one of blocks, shards"),
     ({"block_rows": 0}, "block_rows must be a positive integer"),
     ({"block_rows": 2.5}, "block_rows must be a positive integer")],
)
def test_bad_mixing_options_are_refused(wide: Path, options: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        reader(wide, **options)
