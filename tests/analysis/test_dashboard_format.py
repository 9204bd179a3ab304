"""The files of saved feature statistics and of the dashboard: round trips, the older format,
size, and how tokens are spelt. Files are read here with a loader written from the format's
description (saekit/analysis/stats_files.py), not with saekit's own reader."""

from __future__ import annotations

import base64
import json
import math
import re
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from saekit.analysis.dashboard import token_strings, write_dashboard
from saekit.analysis.explanations import Explanation
from saekit.analysis.stats import FeatureStats, FeatureStatsAccumulator

D_SAE, WINDOW, LEFT = 12, 9, 6
DTYPES = {"u1": "<u1", "u2": "<u2", "u4": "<u4", "i4": "<i4", "f2": "<f2", "f4": "<f4",
          "f8": "<f8"}


def read_call(path: Path, name: str) -> dict:
    """The JSON argument of a `window.NAME({...});` file."""
    match = re.fullmatch(rf"window\.{name}\((.*)\);\n", path.read_text(encoding="utf-8"),
                         re.DOTALL)
    assert match, f"{path} is not a {name} script"
    return json.loads(match.group(1))


def unpack(packed: dict) -> dict[str, np.ndarray]:
    """Arrays: little-endian, each padded to a multiple of 8 bytes, deflated, base64."""
    raw = zlib.decompress(base64.b64decode(packed["data"]))
    out, offset = {}, 0
    for name, code, shape in packed["arrays"]:
        dtype = np.dtype(DTYPES[code])
        n = math.prod(shape)
        out[name] = np.frombuffer(raw, dtype, n, offset).reshape(shape)
        offset += n * dtype.itemsize
        offset += -offset % 8
    assert offset == len(raw)
    return out


def make_stats(seed: int = 0, logits: bool = True) -> FeatureStats:
    """Statistics of random sparse activations, with latents that never fire."""
    gen = torch.Generator().manual_seed(seed)
    acc = FeatureStatsAccumulator(D_SAE, top_k=5, n_samples=7, left=LEFT, right=WINDOW - 1 - LEFT,
                                  n_bins=8)
    for _ in range(6):
        tokens = torch.randint(0, 300, (3, 20), generator=gen)
        acts = torch.relu(torch.randn(3, 20, D_SAE, generator=gen) - 1.0)
        acts = acts * torch.logspace(-1, 3, D_SAE)  # up to 1000s: beyond what float16 holds/10
        acts[..., :2] = 0  # dead latents
        acc.update(tokens, acts)
    stats = acc.result()
    if logits:
        ids = torch.randint(0, 300, (D_SAE, 4), generator=gen)
        stats.logit_top = (ids, torch.rand(D_SAE, 4, generator=gen))
        stats.logit_bottom = (ids.flip(1), -torch.rand(D_SAE, 4, generator=gen))
    return stats


def assert_same_examples(loaded: FeatureStats, stats: FeatureStats) -> None:
    for latent in range(D_SAE):
        got, want = loaded.top_examples(latent), stats.top_examples(latent)
        assert [e[1] for e in got] == [e[1] for e in want]
        scale = max([abs(a) for e in want for a in e[2]], default=1.0)
        for (value, _, acts), (value2, _, acts2) in zip(got, want, strict=True):
            assert value == pytest.approx(value2, rel=1e-3)
            # float16 relative to the latent's largest activation in its windows
            assert acts == pytest.approx(acts2, abs=scale * 1e-3)
        got_sample = sorted(round(e[0], 2) for e in loaded.quantile_samples(latent, 2, 10)
                            for e in [*e])
        want_sample = sorted(round(e[0], 2) for e in stats.quantile_samples(latent, 2, 10)
                             for e in [*e])
        assert got_sample == pytest.approx(want_sample, rel=1e-2)


def test_round_trip_keeps_what_the_api_answers(tmp_path: Path) -> None:
    stats = make_stats()
    stats.save(tmp_path, shard_size=2)
    stats.save(tmp_path, shard_size=5)  # three shards, the last one short; none left over
    assert sorted(p.name for p in (tmp_path / "feature_stats").iterdir()) == [
        "000000.js", "000001.js", "000002.js"]
    loaded = FeatureStats.load(tmp_path)
    assert loaded.n_tokens == stats.n_tokens and loaded.left == stats.left
    for name in ("fire_count", "act_sum", "max_act", "hist_counts", "hist_range"):
        got, want = getattr(loaded, name), getattr(stats, name)
        assert got.dtype == want.dtype and torch.equal(got, want), name
    for group in ("top", "sample"):
        got, want = getattr(loaded, group), getattr(stats, group)
        assert torch.equal(got.tokens, want.tokens)
        assert got.tokens.dtype == want.tokens.dtype == torch.int32
        assert torch.equal(got.keys >= 0, want.keys >= 0)  # which slots hold examples
        # Keys kept only as order: descending within each latent.
        assert (got.keys[:, :-1] >= got.keys[:, 1:]).all()
    torch.testing.assert_close(loaded.top.keys[stats.top.keys >= 0],
                               stats.top.keys[stats.top.keys >= 0], rtol=1e-3, atol=0)
    assert_same_examples(loaded, stats)
    assert torch.equal(loaded.logit_top[0], stats.logit_top[0])
    assert torch.equal(loaded.logit_bottom[1], stats.logit_bottom[1])
    # Saved again, the loaded statistics give the same files: nothing drifts.
    loaded.save(tmp_path / "again", shard_size=5)
    for shard in ("000000.js", "000002.js"):
        first = unpack(read_call(tmp_path / "feature_stats" / shard, "SAEKIT_SHARD"))
        second = unpack(read_call(tmp_path / "again" / "feature_stats" / shard, "SAEKIT_SHARD"))
        for name, array in first.items():
            np.testing.assert_array_equal(second[name], array, err_msg=name)


def test_files_follow_the_documented_layout(tmp_path: Path) -> None:
    stats = make_stats()
    stats.save(tmp_path, shard_size=8)
    header = read_call(tmp_path / "feature_stats.js", "SAEKIT_STATS")
    assert header == {
        "format": "saekit-feature-stats", "version": 2, "d_sae": D_SAE,
        "n_tokens": stats.n_tokens, "left": LEFT, "right": WINDOW - 1 - LEFT, "top_k": 5,
        "n_samples": 7, "n_bins": 8, "n_logits": 4, "shard_size": 8, "n_shards": 2,
    }
    shard = read_call(tmp_path / "feature_stats" / "000001.js", "SAEKIT_SHARD")
    assert (shard["shard"], shard["first"], shard["count"]) == (1, 8, 4)
    arrays = unpack(shard)
    latent = 8 + int(arrays["fire_count"].argmax())
    row = latent - 8
    assert arrays["fire_count"][row] == stats.fire_count[latent]
    assert arrays["tokens"].shape == (4, 12, WINDOW)
    n_top = int(arrays["n_top"][row])
    assert n_top == len(stats.top_examples(latent))
    # token id + 1, top examples first, activations relative to act_scale
    np.testing.assert_array_equal(arrays["tokens"][row, :n_top].astype(np.int64) - 1,
                                  stats.top.tokens[latent, :n_top].numpy())
    acts = arrays["acts"][row, :n_top].astype(np.float32) * arrays["act_scale"][row]
    np.testing.assert_allclose(acts, stats.top.acts[latent, :n_top].numpy(),
                               atol=float(arrays["act_scale"][row]) * 1e-3)
    assert (arrays["tokens"][row, n_top:5] == 0).all()  # empty slots: 0 = no token


def test_older_format_is_still_read(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    stats = make_stats()
    # The older layout, written here by hand: one safetensors file and a small json.
    tensors = {"fire_count": stats.fire_count, "act_sum": stats.act_sum,
               "max_act": stats.max_act, "hist_counts": stats.hist_counts,
               "hist_range": stats.hist_range}
    for group in ("top", "sample"):
        for field in ("keys", "values", "tokens", "acts"):
            tensors[f"{group}.{field}"] = getattr(getattr(stats, group), field)
    tensors["logit_top.ids"], tensors["logit_top.values"] = stats.logit_top
    save_file({k: v.contiguous() for k, v in tensors.items()},
              str(tmp_path / "feature_stats.safetensors"))
    (tmp_path / "feature_stats.json").write_text(
        json.dumps({"n_tokens": stats.n_tokens, "left": stats.left}))
    loaded = FeatureStats.load(tmp_path)
    assert torch.equal(loaded.sample.keys, stats.sample.keys)
    assert torch.equal(loaded.top.acts, stats.top.acts)
    assert torch.equal(loaded.logit_top[0], stats.logit_top[0])
    assert loaded.logit_bottom is None
    # Saving into the same folder writes today's format, which is then read first.
    loaded.save(tmp_path)
    assert not torch.equal(FeatureStats.load(tmp_path).sample.keys, stats.sample.keys)


def test_bad_folders_are_named(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    with pytest.raises(FileNotFoundError, match="feature_stats.js is missing"):
        FeatureStats.load(tmp_path)
    # `saekit eval` writes firing rates under the older file name: say so.
    save_file({"firing_frequency": torch.zeros(3)}, str(tmp_path / "feature_stats.safetensors"))
    (tmp_path / "feature_stats.json").write_text("{}")
    with pytest.raises(ValueError, match="saekit eval"):
        FeatureStats.load(tmp_path)
    make_stats().save(tmp_path / "cut", shard_size=5)
    (tmp_path / "cut" / "feature_stats" / "000001.js").unlink()
    with pytest.raises(FileNotFoundError, match="000001.js is missing"):
        FeatureStats.load(tmp_path / "cut")
    shard = tmp_path / "cut" / "feature_stats" / "000000.js"
    shard.write_text(shard.read_text().replace('"data":"', '"data":"AAAA'))
    (tmp_path / "cut" / "feature_stats" / "000001.js").write_text(shard.read_text())
    with pytest.raises(ValueError, match="000000.js is damaged"):
        FeatureStats.load(tmp_path / "cut")
    with pytest.raises(ValueError, match="shard_size"):
        make_stats().save(tmp_path / "x", shard_size=0)


def test_site_and_statistics_fit_a_size_budget(tmp_path: Path, tokenizer) -> None:
    """Bytes per latent stay below what the kept data needs uncompressed (token ids and
    float16 activations of kept examples only, histogram, logits, a few scalars) plus the
    fixed files, and far below the older format's dense float32 copy."""
    stats = make_stats()
    out = tmp_path / "site"
    write_dashboard(stats, tokenizer, out, progress=False)
    per_latent = {p.relative_to(out): p.stat().st_size for p in out.rglob("*") if p.is_file()}
    fixed = sum(size for path, size in per_latent.items()
                if path.parts[0] == "assets" or path.suffix == ".html"
                or path.name in ("vocab.js", "site.js", "feature_stats.js"))
    total = sum(per_latent.values())
    kept = int((stats.top.keys >= 0).sum() + (stats.sample.keys >= 0).sum())
    n_bins = stats.hist_counts.shape[1]
    raw = kept * WINDOW * (2 + 2) + D_SAE * (n_bins * 4 + 4 * (2 + 4) * 2 + 4 * 4 + 8)
    index_raw = D_SAE * (4 * 3 + 5 * 2 + 4 * 2)
    overhead = 400 * 2  # JSON around each data file (index + one shard)
    assert total - fixed <= (raw + index_raw) * 4 / 3 + overhead
    old = sum(t.numel() * t.element_size() for g in (stats.top, stats.sample)
              for t in (g.keys, g.values, g.tokens, g.acts))
    assert total - fixed < old / 2


def test_byte_pieces_show_as_their_bytes(tokenizer) -> None:
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    # Byte-level BPE (GPT-2 style): a piece standing for a lone UTF-8 lead byte.
    lone = tokenizer.convert_tokens_to_ids("¤")  # the byte 0xA4 in byte-level spelling
    newline = tokenizer.convert_tokens_to_ids("Ċ")  # the byte 0x0A
    strings = token_strings(tokenizer, [lone, newline])
    assert strings == {lone: "\\xa4", newline: "\n"}
    # Byte fallback (sentencepiece style): pieces spelt <0xNN>.
    vocab = {"<unk>": 0, "<0x0A>": 1, "<0xE2>": 2, "a": 3, "▁b": 4}
    model = Tokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    model.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    fallback = PreTrainedTokenizerFast(tokenizer_object=model)
    assert token_strings(fallback, range(5)) == {
        0: "<unk>", 1: "\n", 2: "\\xe2", 3: "a", 4: " b"}
    assert token_strings(None, [7]) == {7: "<7>"}


def test_explanations_are_written_per_shard(tmp_path: Path, tokenizer) -> None:
    stats = make_stats()
    explanations = {
        3: Explanation(3, "words about <kings>", {"detection": {"balanced_accuracy": 0.75}}),
        9: Explanation(9, "numbers", {"detection": {"balanced_accuracy": 0.5},
                                      "fuzzing": {"balanced_accuracy": 0.25}}),
    }
    write_dashboard(stats, tokenizer, tmp_path, explanations=explanations, shard_size=8,
                    progress=False)
    site = read_call(tmp_path / "data" / "site.js", "SAEKIT_SITE")
    assert site["score_columns"] == ["detection.balanced_accuracy", "fuzzing.balanced_accuracy"]
    assert site["explained_shards"] == [0, 1]
    second = read_call(tmp_path / "data" / "explanations" / "000001.js", "SAEKIT_EXPLANATIONS")
    assert second["items"]["9"]["explanation"] == "numbers"
    index = unpack(read_call(tmp_path / "data" / "index.js", "SAEKIT_INDEX"))
    scores = index["score:detection.balanced_accuracy"]
    assert scores[3] == 0.75 and scores[9] == 0.5 and np.isnan(scores[0])
    assert np.isnan(index["score:fuzzing.balanced_accuracy"][3])
    with pytest.raises(ValueError, match="latent 12 .*12 latents"):
        write_dashboard(stats, tokenizer, tmp_path / "bad",
                        explanations={12: Explanation(12, "x")}, progress=False)
    assert not (tmp_path / "bad").exists()  # refused before writing anything


def test_index_columns(tmp_path: Path, tokenizer) -> None:
    stats = make_stats()
    write_dashboard(stats, tokenizer, tmp_path, progress=False)
    index = unpack(read_call(tmp_path / "data" / "index.js", "SAEKIT_INDEX"))
    np.testing.assert_array_equal(index["fire_count"], stats.fire_count.numpy())
    np.testing.assert_allclose(index["max_act"], stats.max_act.numpy())
    np.testing.assert_allclose(index["mean_act"], stats.mean_act.numpy(), rtol=1e-6)
    vocab = read_call(tmp_path / "data" / "vocab.js", "SAEKIT_VOCAB")
    for latent in range(D_SAE):
        centers = [e[1][LEFT] for e in stats.top_examples(latent)]
        # distinct tokens fired on, most frequent first, ties in order of the examples
        expected = sorted(dict.fromkeys(centers), key=lambda t: (-centers.count(t),
                                                                 centers.index(t)))
        got = [int(t) - 1 for t in index["fires_on"][latent] if t > 0]
        assert got == expected
        assert all(str(t) in vocab for t in got)
        np.testing.assert_array_equal(index["promotes"][latent].astype(np.int64) - 1,
                                      stats.logit_top[0][latent])
