"""The activation cache: written rows equal the store's, resume, refusal, corruption."""

from __future__ import annotations

import json

import pytest
import torch

from saekit.data.cache import (
    CachedActivations,
    CacheError,
    check_cache_matches,
    read_cache_metadata,
    write_activation_cache,
)
from saekit.data.store import ActivationStore
from saekit.models import load_model
from saekit.models.tiny import TINY_TEXTS, tiny_gpt2, tiny_tokenizer

DOCS = list(TINY_TEXTS) * 2
HOOK = "blocks.1.hook_resid_pre"
N = 150


@pytest.fixture(scope="module")
def backend():
    return load_model(tiny_gpt2(300), tokenizer=tiny_tokenizer(300))


@pytest.fixture(scope="module")
def reference_rows(backend) -> torch.Tensor:
    store = ActivationStore(backend, HOOK, DOCS, context_size=16, batch_size=1, buffer_size=1,
                            model_batch_size=2, shuffle=False)
    return torch.cat(list(store))


def write(backend, out, hooks=HOOK, **kwargs):
    options = {"context_size": 16, "model_batch_size": 2, "shard_rows": 40}
    options.update(kwargs)
    return write_activation_cache(backend, hooks, DOCS, out, N, **options)


@pytest.fixture(scope="module")
def cache(backend, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache")
    write(backend, out, model_name="tiny-gpt2", dataset_name="tiny-docs")
    return out


def test_cache_holds_the_store_rows_in_order(cache, reference_rows) -> None:
    meta = read_cache_metadata(cache)
    assert meta["complete"] and meta["n_tokens"] == N
    assert meta["model"] == "tiny-gpt2" and meta["dataset"] == "tiny-docs"
    assert meta["hooks"] == [HOOK] and meta["d_in"] == {HOOK: 32}
    assert meta["context_size"] == 16 and meta["dtype"] == "float32"
    assert meta["tokenizer"]["vocab_size"] == 300
    reader = CachedActivations(cache, batch_size=1, buffer_size=1, shuffle=False)
    assert reader.d_in == 32
    torch.testing.assert_close(torch.cat(list(reader)), reference_rows[:N])


@pytest.mark.parametrize("mix", ["blocks", "shards"])
def test_shuffled_reading_is_a_permutation_and_resumes(cache, reference_rows, mix) -> None:
    reader = CachedActivations(cache, batch_size=10, buffer_size=50, seed=1, mix=mix,
                               block_rows=16)
    rows = torch.cat(list(reader))
    assert rows.shape == (N, 32)
    direction = torch.randn(32, generator=torch.Generator().manual_seed(0))
    expected = reference_rows[:N]
    torch.testing.assert_close(
        rows[(rows @ direction).argsort()], expected[(expected @ direction).argsort()]
    )
    assert not torch.allclose(rows, expected)

    first = CachedActivations(cache, batch_size=10, buffer_size=50, seed=1, mix=mix,
                              block_rows=16)
    head = [next(first) for _ in range(7)]
    resumed = CachedActivations(cache, batch_size=10, buffer_size=50, seed=1, mix=mix,
                                block_rows=16)
    resumed.load_state_dict(first.state_dict())
    torch.testing.assert_close(torch.cat(head + list(resumed)), rows)


def test_norm_scaling_factor_from_cache(cache, reference_rows) -> None:
    reader = CachedActivations(cache, batch_size=10, buffer_size=50, shuffle=False,
                               mix="shards")
    first_shard = reader.shards[0]["rows"]  # >= 40: shards hold whole forward passes
    assert 40 <= first_shard < 80
    factor = reader.estimate_norm_scaling_factor(n_batches=4)  # 40 rows: the first shard
    expected = 32**0.5 / reference_rows[:first_shard].norm(dim=-1).mean().item()
    assert factor == pytest.approx(expected, rel=1e-5)
    assert next(reader).shape == (10, 32)


class CrashingModel:
    """A model backend that fails after a number of forward passes (a killed job)."""

    def __init__(self, backend, passes: int) -> None:
        self.backend, self.passes = backend, passes
        self.tokenizer, self.device, self.name = backend.tokenizer, backend.device, backend.name

    def hook_names(self) -> list[str]:
        return self.backend.hook_names()

    def activations(self, tokens, hooks):
        if tokens.shape[1] > 2:  # the width probe is not a forward pass over data
            self.passes -= 1
            if self.passes < 0:
                raise KeyboardInterrupt
        return self.backend.activations(tokens, hooks)

    def logits(self, tokens, replacements=None):
        return self.backend.logits(tokens, replacements)


def test_interrupted_write_resumes_to_the_same_files(backend, cache, tmp_path) -> None:
    with pytest.raises(KeyboardInterrupt):
        write(CrashingModel(backend, passes=3), tmp_path, model_name="tiny-gpt2",
              dataset_name="tiny-docs")
    meta = read_cache_metadata(tmp_path)
    assert not meta["complete"]
    written = json.loads((tmp_path / "progress.json").read_text())
    assert 0 < len(written) < len(json.loads((cache / "progress.json").read_text()))
    # Only the last shard keeps the dataset position (the one a resume needs).
    assert ["position" in record for record in written] == [False] * (len(written) - 1) + [True]
    with pytest.raises(CacheError, match="unfinished"):
        CachedActivations(tmp_path)
    write(backend, tmp_path, model_name="tiny-gpt2", dataset_name="tiny-docs")
    assert json.loads((tmp_path / "progress.json").read_text()) == json.loads(
        (cache / "progress.json").read_text()
    )
    for shard in cache.glob("shard_*.safetensors"):
        assert (tmp_path / shard.name).read_bytes() == shard.read_bytes()


def test_mismatched_metadata_is_refused(backend, cache) -> None:
    with pytest.raises(CacheError, match=r"hooks: cache has \['blocks.1.hook_resid_pre'\]"):
        write(backend, cache, hooks="blocks.0.hook_resid_pre", model_name="tiny-gpt2",
              dataset_name="tiny-docs")
    with pytest.raises(CacheError, match="model: cache has 'tiny-gpt2', this run has 'other'"):
        write(backend, cache, model_name="other", dataset_name="tiny-docs")
    meta = read_cache_metadata(cache)
    with pytest.raises(CacheError, match="d_in of blocks.1.hook_resid_pre: cache has 32"):
        check_cache_matches(meta, d_in=64)
    with pytest.raises(CacheError, match="model: cache has 'tiny-gpt2', the run uses 'gpt2'"):
        CachedActivations(cache, expect_model="gpt2")
    with pytest.raises(CacheError, match="the run needs"):
        CachedActivations(cache, hooks="blocks.0.hook_resid_post")


@pytest.mark.parametrize("mix", ["blocks", "shards"])
def test_damaged_shards_are_detected(backend, tmp_path, mix) -> None:
    write(backend, tmp_path)
    shard = tmp_path / "shard_00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x40
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="shard_00001.safetensors fails its CRC-32 check"):
        list(CachedActivations(tmp_path, batch_size=8, buffer_size=8, shuffle=False, mix=mix))
    shard.write_bytes(bytes(data[:-100]))
    with pytest.raises(CacheError, match="truncated"):
        list(CachedActivations(tmp_path, batch_size=8, buffer_size=8, shuffle=False, mix=mix))


def test_several_hooks_and_folder_checks(backend, tmp_path) -> None:
    hooks = ["blocks.0.hook_resid_post", HOOK]
    write(backend, tmp_path / "two", hooks=hooks, dtype="bfloat16")
    reader = CachedActivations(tmp_path / "two", batch_size=16, buffer_size=64, seed=2)
    for batch in reader:
        assert batch[hooks[0]].dtype == torch.bfloat16
        torch.testing.assert_close(batch[hooks[0]], batch[HOOK])
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("x")
    with pytest.raises(CacheError, match="not empty and holds no cache metadata"):
        write(backend, tmp_path / "busy")
    with pytest.raises(FileNotFoundError, match="holds no activation cache"):
        CachedActivations(tmp_path / "busy")
    with pytest.raises(ValueError, match="buffer_size=4 cannot hold one batch"):
        CachedActivations(tmp_path / "two", batch_size=8, buffer_size=4)


def test_converting_reads_and_unread_tensors_are_checked(backend, tmp_path) -> None:
    """A bfloat16 cache read as float32 goes through a conversion (not the direct read) and
    gives the stored values; a tensor of a hook not asked for is still covered by the CRC."""
    hooks = ["blocks.0.hook_resid_post", "blocks.0.hook_resid_pre"]
    write(backend, tmp_path, hooks=hooks, dtype="bfloat16")
    stored = CachedActivations(tmp_path, batch_size=8, buffer_size=8, shuffle=False,
                               hooks=hooks[1])
    as_float = CachedActivations(tmp_path, batch_size=8, buffer_size=8, shuffle=False,
                                 hooks=hooks[1], dtype="float32")
    for low, high in zip(stored, as_float, strict=True):
        assert high.dtype == torch.float32
        torch.testing.assert_close(high, low.float(), rtol=0, atol=0)
    shard = tmp_path / "shard_00000.safetensors"
    data = bytearray(shard.read_bytes())
    data_start = 8 + int.from_bytes(data[:8], "little")
    header = json.loads(bytes(data[8:data_start]))
    begin = data_start + header[hooks[0]]["data_offsets"][0]  # in the tensor we do not read
    data[begin] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="fails its CRC-32 check"):
        list(CachedActivations(tmp_path, batch_size=8, buffer_size=8, hooks=hooks[1]))


@pytest.mark.parametrize("mix", ["blocks", "shards"])
@pytest.mark.parametrize("shuffle", [True, False])
def test_reused_batch_memory_serves_the_same_rows(cache, shuffle, mix) -> None:
    fresh = list(CachedActivations(cache, batch_size=10, buffer_size=50, seed=3, shuffle=shuffle,
                                   mix=mix))
    ring_batches, copies = [], []
    reader = CachedActivations(cache, batch_size=10, buffer_size=50, seed=3, shuffle=shuffle,
                               reuse_batches=3, mix=mix)
    for batch in reader:
        ring_batches.append(batch)
        copies.append(batch.clone())  # taken now: the ring overwrites it three batches on
    assert len(copies) == len(fresh) == N // 10
    for got, want in zip(copies, fresh, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    pointers = [b.data_ptr() for b in ring_batches]
    assert len(set(pointers)) == 3
    assert all(pointers[i] == pointers[i + 3] for i in range(len(pointers) - 3))
    assert all(pointers[i] != pointers[i + 1] for i in range(len(pointers) - 1))


@pytest.mark.parametrize("mix", ["blocks", "shards"])
def test_reused_batch_memory_resumes_exactly(cache, mix) -> None:
    reader = CachedActivations(cache, batch_size=10, buffer_size=50, seed=5, reuse_batches=2,
                               mix=mix)
    for _ in range(4):
        next(reader)
    state = reader.state_dict()
    rest = [b.clone() for b in reader]
    again = CachedActivations(cache, batch_size=10, buffer_size=50, seed=5, reuse_batches=2,
                              mix=mix)
    again.load_state_dict(state)
    resumed = [b.clone() for b in again]
    assert len(resumed) == len(rest) == N // 10 - 4
    for got, want in zip(resumed, rest, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_bad_reuse_batches_is_refused(cache, bad) -> None:
    with pytest.raises(ValueError, match="reuse_batches"):
        CachedActivations(cache, batch_size=10, buffer_size=50, reuse_batches=bad)


def test_shards_are_served_in_place_and_never_written(cache, reference_rows) -> None:
    """Rows come from the mapped files (the buffer's own memory holds only rows carried
    over, fewer than a batch), and writing into a mapped tensor leaves the file alone."""
    reader = CachedActivations(cache, batch_size=10, buffer_size=50, seed=4, mix="shards")
    rows = torch.cat([next(reader) for _ in range(12)])
    assert all(t.shape[0] <= 10 for t in reader._storage.values())
    assert len(reader._segments) > 1  # carried rows, then mapped shards
    before = (cache / "shard_00000.safetensors").read_bytes()
    shard = reader.read_shard(0)[HOOK]
    torch.testing.assert_close(shard, reference_rows[: shard.shape[0]], rtol=0, atol=0)
    shard.add_(1.0)
    assert (cache / "shard_00000.safetensors").read_bytes() == before
    # Every batch row is one of the cache's rows, exactly.
    assert (rows[:, None, :] == reference_rows[None, :N, :]).all(-1).any(1).all()


def test_damaged_header_and_a_shard_changed_after_its_check(backend, tmp_path) -> None:
    from saekit.data.shards import check_shard, map_shard

    write(backend, tmp_path)
    record = json.loads((tmp_path / "progress.json").read_text())[0]
    shard = tmp_path / record["file"]
    data = bytearray(shard.read_bytes())
    layout = check_shard(shard, record, [HOOK])
    assert layout.rows == record["rows"] and layout.tensors[HOOK].shape == (record["rows"], 32)
    with pytest.raises(CacheError, match="no tensor for hook 'blocks.0.hook_z'"):
        check_shard(shard, record, ["blocks.0.hook_z"])
    data[9] = ord("!")  # inside the JSON header
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="damaged header"):
        check_shard(shard, record, [HOOK])
    shard.write_bytes(bytes(data[:-8]))
    with pytest.raises(CacheError, match="changed size while it was being read"):
        map_shard(layout)
