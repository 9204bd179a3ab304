"""Crosscoders in the feature statistics: collected over several hooks of one model and over
the same hook of two models (the bundled model and tiny random ones), each latent's decoder
norm per site kept in the statistics files (round trip; older folders still load), the text
summary, the `saekit dashboard` command and the Neuronpedia export."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from analysis_helpers import D_MODEL, VOCAB
from test_dashboard_format import read_call, unpack

from saekit import SAE
from saekit.analysis.collect import feature_statistics
from saekit.analysis.crosscoder_norms import CLASS_ORDER, CrosscoderNorms
from saekit.analysis.stats import FeatureStats, FeatureStatsAccumulator
from saekit.commands.report import relative_norm_summary
from saekit.data.tokens import keep_mask, special_token_ids
from saekit.evals.api import heldout_token_batches
from saekit.models import load_model
from saekit.models.tiny import TINY_TEXTS, tiny_gpt2
from saekit.saes.crosscoder import MODELS_KEY, SITE_HOOKS_KEY, Crosscoder

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TINY_HOOKS = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
BUNDLED_HOOKS = ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"]


@pytest.fixture(autouse=True)
def _single_thread(one_thread: None) -> None:
    """Small matmuls run fastest on one thread."""


@pytest.fixture(scope="module")
def tiny_other(tokenizer) -> Any:
    """A second tiny model, other random weights, the same tokenizer."""
    return load_model(tiny_gpt2(VOCAB, d_model=D_MODEL, seed=1), tokenizer=tokenizer)


def make_crosscoder(
    d_in: int, d_sae: int = 48, n_sites: int = 2, seed: int = 0, **extra: Any
) -> Crosscoder:
    """A random relu crosscoder whose latents fire often, with metadata `extra`."""
    torch.manual_seed(seed)
    cc = SAE.create("crosscoder", d_in, d_sae, n_layers=n_sites, activation_fn="relu")
    with torch.no_grad():
        cc.W_enc.copy_(torch.randn_like(cc.W_enc) / d_in**0.5)
        cc.W_dec.copy_(torch.randn_like(cc.W_dec) / d_sae**0.5)
        cc.b_enc.fill_(0.1)
    cc.cfg.metadata.extra.update(extra)
    assert isinstance(cc, Crosscoder)
    return cc


def hand_counts(
    cc: Crosscoder, models: list[Any], hooks: list[str], batches: list[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fire count, activation sum, max) per latent: every site's activation read on its
    own, stacked [batch, pos, site, d] and encoded; special tokens left out."""
    specials = special_token_ids(models[0].tokenizer)
    count = torch.zeros(cc.cfg.d_sae, dtype=torch.long)
    total = torch.zeros(cc.cfg.d_sae, dtype=torch.float64)
    peak = torch.zeros(cc.cfg.d_sae)
    for tokens in batches:
        sites = []
        for s, hook in enumerate(hooks):
            model = models[s] if len(models) > 1 else models[0]
            sites.append(model.activations(tokens, [hook])[hook])
        with torch.no_grad():
            z = cc.encode(torch.stack(sites, dim=2)).float()  # [batch, pos, d_sae]
        z = z * keep_mask(tokens, specials)[:, :, None]
        count += (z > 0).sum(dim=(0, 1))
        total += z.double().sum(dim=(0, 1))
        peak = torch.maximum(peak, z.amax(dim=(0, 1)))
    return count, total, peak


def hand_classes(cc: Crosscoder, band: float = 0.1) -> list[str]:
    """Each latent's class from its decoder norms at sites 0 (a) and 1 (b), in plain Python:
    relative norm b / (a + b) below `band` a_only, above 1 - band b_only, else shared;
    neither without a decoder at either site."""
    classes = []
    for site_a, site_b in cc.W_dec.detach().double().tolist():  # each [d_in]
        a, b = (math.sqrt(sum(v * v for v in site)) for site in (site_a, site_b))
        if a + b == 0:
            classes.append("neither")
        else:
            r = b / (a + b)
            classes.append("a_only" if r < band else "b_only" if r > 1 - band else "shared")
    return classes


def check_against_hand(stats: FeatureStats, cc: Crosscoder, models, hooks, batches) -> None:
    count, total, peak = hand_counts(cc, models, hooks, batches)
    assert int(count.sum()) > 0
    assert torch.equal(stats.fire_count, count)
    torch.testing.assert_close(stats.act_sum, total, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.max_act, peak)
    assert stats.logit_top is None  # a crosscoder writes to several sites, no one unembedding
    torch.testing.assert_close(stats.crosscoder.site_norms, cc.W_dec.detach().norm(dim=-1))


# ----- the norms --------------------------------------------------------------------------


def test_norms_shares_classes_and_site_names_by_hand() -> None:
    cc = make_crosscoder(2, d_sae=4, n_sites=3)
    with torch.no_grad():
        cc.W_dec.zero_()
        cc.W_dec[0, 0] = torch.tensor([3.0, 4.0])  # 5 at site 0 only
        cc.W_dec[1, 1] = torch.tensor([0.0, 2.0])  # 2 at site 1, 2 at site 2
        cc.W_dec[1, 2] = torch.tensor([2.0, 0.0])
        cc.W_dec[2, 0] = torch.tensor([1.0, 0.0])  # 1, 3 and 0: relative 0.75
        cc.W_dec[2, 1] = torch.tensor([0.0, 3.0])  # latent 3 writes only to site 2
        cc.W_dec[3, 2] = torch.tensor([1.0, 0.0])
    norms = CrosscoderNorms.of(cc)
    assert norms.site_names == ["site 0", "site 1", "site 2"]  # no metadata: numbered
    rel = norms.relative
    torch.testing.assert_close(rel[:3], torch.tensor([0.0, 1.0, 0.75]))
    assert torch.isnan(rel[3])
    assert norms.classes == ["a_only", "b_only", "shared", "neither"]
    assert norms.counts() == {"a_only": 1, "shared": 1, "b_only": 1, "neither": 1}
    assert list(norms.counts()) == ["a_only", "shared", "b_only", "neither"] == list(CLASS_ORDER)
    torch.testing.assert_close(norms.shares, torch.tensor(
        [[1.0, 0, 0], [0, 0.5, 0.5], [0.25, 0.75, 0], [0, 0, 1]]))
    other = replace(norms, a=2, b=1, band=0.3)  # site 1 against site 2
    torch.testing.assert_close(other.relative[:2], torch.tensor([torch.nan, 0.5]),
                               equal_nan=True)
    assert other.classes[3] == "a_only" and other.class_labels()["a_only"] == "site 2 only"
    assert other.class_codes.tolist() == [CLASS_ORDER.index(c) for c in other.classes]

    cc.cfg.metadata.extra[SITE_HOOKS_KEY] = ["h0", "h1", "h2"]
    assert CrosscoderNorms.of(cc).site_names == ["h0", "h1", "h2"]
    diff = make_crosscoder(2, **{SITE_HOOKS_KEY: ["h", "h"], MODELS_KEY: ["base", "chat"]})
    assert CrosscoderNorms.of(diff).class_labels()["b_only"] == "chat only"
    both = make_crosscoder(2, **{SITE_HOOKS_KEY: ["h1", "h2"], MODELS_KEY: ["m", "n"]})
    assert CrosscoderNorms.of(both).site_names == ["m h1", "n h2"]

    with pytest.raises(ValueError, match="one per site"):
        CrosscoderNorms(torch.ones(3, 2), ["only one"])
    with pytest.raises(ValueError, match="at least two sites"):
        CrosscoderNorms(torch.ones(3, 1), ["x"])
    with pytest.raises(ValueError, match="out of range"):
        CrosscoderNorms(torch.ones(3, 2), ["x", "y"], b=2)
    with pytest.raises(ValueError, match="band"):
        CrosscoderNorms(torch.ones(3, 2), ["x", "y"], band=0.6)
    with pytest.raises(ValueError, match="crosscoders"):
        CrosscoderNorms.of(SAE.create("standard", 4, 8))


# ----- collecting -------------------------------------------------------------------------


def tiny_batches(tokenizer, n_tokens: int = 400) -> list[torch.Tensor]:
    return heldout_token_batches(tokenizer, n_tokens, dataset=list(TINY_TEXTS) * 10,
                                 context_size=20)


def test_two_hooks_of_a_tiny_model(hf_backend, tokenizer) -> None:
    cc = make_crosscoder(D_MODEL, **{SITE_HOOKS_KEY: TINY_HOOKS})
    batches = tiny_batches(tokenizer)
    stats = feature_statistics(cc, hf_backend, batches, top_k=4, progress=False)
    check_against_hand(stats, cc, [hf_backend], TINY_HOOKS, batches)
    assert stats.crosscoder.site_names == TINY_HOOKS
    # hooks= overrides the metadata (here: the two sites swapped).
    swapped = feature_statistics(cc, hf_backend, batches, hooks=TINY_HOOKS[::-1], top_k=4,
                                 progress=False)
    check_against_hand(swapped, cc, [hf_backend], TINY_HOOKS[::-1], batches)
    assert not torch.equal(swapped.fire_count, stats.fire_count)


def test_model_diffing_of_two_tiny_models(hf_backend, tiny_other, tokenizer) -> None:
    hook = TINY_HOOKS[1]
    cc = make_crosscoder(D_MODEL, **{SITE_HOOKS_KEY: [hook, hook], MODELS_KEY: ["m0", "m1"]})
    batches = tiny_batches(tokenizer)
    stats = feature_statistics(cc, [hf_backend, tiny_other], batches, top_k=4, progress=False)
    check_against_hand(stats, cc, [hf_backend, tiny_other], [hook, hook], batches)
    assert stats.crosscoder.site_names == ["m0", "m1"]
    # The same model twice is not the two models: the statistics differ.
    same = feature_statistics(cc, [hf_backend, hf_backend], batches, top_k=4, progress=False)
    assert not torch.equal(same.fire_count, stats.fire_count)


def test_two_hooks_and_model_diffing_on_the_bundled_model(bundled) -> None:
    batches = heldout_token_batches(bundled.tokenizer, 256, context_size=16)
    cc = make_crosscoder(256, d_sae=32, **{SITE_HOOKS_KEY: BUNDLED_HOOKS})
    stats = feature_statistics(cc, bundled, batches, top_k=4, progress=False)
    check_against_hand(stats, cc, [bundled], BUNDLED_HOOKS, batches)

    changed = load_model("bundled")
    with torch.no_grad():
        changed.model.transformer.h[1].mlp.c_proj.weight.mul_(3.0)
    hook = BUNDLED_HOOKS[1]
    diff = make_crosscoder(256, d_sae=32, seed=1,
                           **{SITE_HOOKS_KEY: [hook, hook], MODELS_KEY: ["bundled", "x3"]})
    stats = feature_statistics(diff, [bundled, changed], batches, top_k=4, progress=False)
    check_against_hand(stats, diff, [bundled, changed], [hook, hook], batches)


def test_bad_sites_are_refused(hf_backend, tiny_other, tokenizer) -> None:
    batches = tiny_batches(tokenizer, 100)
    diff = make_crosscoder(D_MODEL, **{SITE_HOOKS_KEY: [TINY_HOOKS[0]] * 2,
                                       MODELS_KEY: ["m0", "m1"]})
    with pytest.raises(ValueError, match="compares 2 models"):
        feature_statistics(diff, hf_backend, batches)
    with pytest.raises(ValueError, match="records none"):
        feature_statistics(make_crosscoder(D_MODEL), hf_backend, batches)
    with pytest.raises(ValueError, match="3 models"):
        feature_statistics(diff, [hf_backend, tiny_other, hf_backend], batches)
    clt = SAE.create("clt", D_MODEL, 8, n_layers=2, activation_fn="relu")
    with pytest.raises(ValueError, match="a clt is not supported"):
        feature_statistics(clt, hf_backend, batches)
    sae = SAE.create("standard", D_MODEL, 8)
    sae.cfg.metadata.hook_name = TINY_HOOKS[0]
    with pytest.raises(ValueError, match="for crosscoders"):
        feature_statistics(sae, [hf_backend, tiny_other], batches)


# ----- files ------------------------------------------------------------------------------


def small_stats(d_sae: int, seed: int = 0) -> FeatureStats:
    gen = torch.Generator().manual_seed(seed)
    acc = FeatureStatsAccumulator(d_sae, top_k=3, n_samples=4, left=2, right=1, n_bins=4)
    for _ in range(3):
        acc.update(torch.randint(0, 50, (2, 10), generator=gen),
                   torch.relu(torch.randn(2, 10, d_sae, generator=gen)))
    return acc.result()


def test_statistics_files_keep_the_norms(tmp_path: Path) -> None:
    stats = small_stats(10)
    norms = torch.rand(10, 3)
    norms[4] = torch.tensor([0.0, 0.0, 2.0])  # no decoder at a or b: "neither", NaN
    norms[5] = torch.tensor([1.0, 0.0, 0.0])
    stats.crosscoder = CrosscoderNorms(norms, ["base", "chat", "blocks.3"], a=0, b=1,
                                       band=0.2)
    stats.save(tmp_path, shard_size=4)

    # The files, read with the test's own loader: the header names the sites, each shard
    # holds its latents' norms as float32.
    header = read_call(tmp_path / "feature_stats.js", "SAEKIT_STATS")
    assert header["version"] == 2
    assert header["crosscoder"] == {"site_names": ["base", "chat", "blocks.3"], "a": 0,
                                    "b": 1, "band": 0.2}
    shards = [unpack(read_call(tmp_path / "feature_stats" / f"{i:06d}.js", "SAEKIT_SHARD"))
              for i in range(3)]
    on_disk = torch.cat([torch.from_numpy(s["site_norms"].copy()) for s in shards])
    assert on_disk.dtype == torch.float32 and torch.equal(on_disk, norms)

    loaded = FeatureStats.load(tmp_path)
    assert torch.equal(loaded.crosscoder.site_norms, norms)
    assert (loaded.crosscoder.site_names, loaded.crosscoder.band) == (
        ["base", "chat", "blocks.3"], 0.2)
    torch.testing.assert_close(loaded.relative_norm, stats.relative_norm, equal_nan=True)
    assert loaded.norm_classes == stats.norm_classes
    assert loaded.norm_classes[4:6] == ["neither", "a_only"]
    assert torch.equal(loaded.fire_count, stats.fire_count)

    # Saved again without norms (an ordinary SAE's statistics), nothing of them is left.
    stats.crosscoder = None
    stats.save(tmp_path, shard_size=4)
    assert FeatureStats.load(tmp_path).crosscoder is None
    assert "crosscoder" not in read_call(tmp_path / "feature_stats.js", "SAEKIT_STATS")

    with pytest.raises(ValueError, match="describe 3 latents"):
        replace(small_stats(10), crosscoder=CrosscoderNorms(torch.ones(3, 2), ["a", "b"])
                ).save(tmp_path / "bad")


def test_a_damaged_crosscoder_section_is_reported(tmp_path: Path) -> None:
    stats = small_stats(4)
    stats.crosscoder = CrosscoderNorms(torch.rand(4, 2), ["a", "b"])
    stats.save(tmp_path)
    header = tmp_path / "feature_stats.js"
    header.write_text(header.read_text().replace('"band":0.1', '"band":"wide"'))
    with pytest.raises(ValueError, match="damaged crosscoder section"):
        FeatureStats.load(tmp_path)


def test_a_folder_written_before_crosscoder_norms_still_loads() -> None:
    """tests/fixtures/feature_stats_v2 was written by saekit before this change, from the
    statistics rebuilt here."""
    gen = torch.Generator().manual_seed(3)
    acc = FeatureStatsAccumulator(6, top_k=3, n_samples=4, left=2, right=1, n_bins=4, seed=5)
    for _ in range(3):
        tokens = torch.randint(0, 50, (2, 10), generator=gen)
        acts = torch.relu(torch.randn(2, 10, 6, generator=gen) - 0.5)
        acts[..., 0] = 0
        acc.update(tokens, acts)
    expected = acc.result()
    loaded = FeatureStats.load(FIXTURES / "feature_stats_v2")
    assert loaded.crosscoder is None and loaded.relative_norm is None
    assert loaded.norm_classes is None
    assert torch.equal(loaded.fire_count, expected.fire_count)
    torch.testing.assert_close(loaded.act_sum, expected.act_sum)
    assert [e[1] for e in loaded.top_examples(3)] == [e[1] for e in expected.top_examples(3)]


# ----- summary, command, export -------------------------------------------------------------


def test_relative_norm_summary_counts_classes_and_bins() -> None:
    norms = CrosscoderNorms(
        torch.tensor([[1.0, 0], [0, 1], [1, 1], [0, 0], [3, 1], [1, 3], [2, 2]]),
        ["gpt2", "gpt2-chat"],
    )
    text = relative_norm_summary(norms, n_bins=4, width=8)
    counts = dict(re.findall(r"^ {4}(\S.*?) +(\d+) \(", text, re.MULTILINE))
    assert counts == {"gpt2 only": "1", "shared": "4", "gpt2-chat only": "1",
                      "no decoder at either site": "1"}
    # Relative norms 0, 1, 0.5, 0.25, 0.75, 0.5 in bins of 0.25 (1 falls in the last).
    bins = re.findall(r"^ {4}(\d\.\d\d)-(\d\.\d\d) \|(#*) *(\d+)$", text, re.MULTILINE)
    assert [(lo, int(n)) for lo, _, _, n in bins] == [
        ("0.00", 1), ("0.25", 1), ("0.50", 2), ("0.75", 2)]
    assert [len(bar) for _, _, bar, _ in bins] == [4, 4, 8, 8]
    assert "0: gpt2 only" in text and "1: gpt2-chat only" in text


def read_js(path: Path, name: str) -> Any:
    match = re.fullmatch(rf"window\.{name}\((.*)\);\n", path.read_text(), re.DOTALL)
    assert match, path
    return json.loads(match.group(1))


def test_cli_dashboard_of_a_model_diffing_crosscoder(tmp_path, tokenizer, capsys) -> None:
    from saekit.cli import main

    folders = []
    for seed in (0, 1):
        folder = tmp_path / f"model{seed}"
        tiny_gpt2(VOCAB, d_model=D_MODEL, seed=seed).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders.append(str(folder))
    hook = TINY_HOOKS[1]
    cc = make_crosscoder(D_MODEL, **{SITE_HOOKS_KEY: [hook, hook], MODELS_KEY: folders})
    cc.cfg.metadata.model_name = folders[0]
    with torch.no_grad():  # a few latents that write to one model only
        cc.W_dec[:5, 1] = 0
        cc.W_dec[5:8, 0] = 0
    cc.save(tmp_path / "cc")
    texts = tmp_path / "texts.txt"
    texts.write_text("\n".join(TINY_TEXTS * 5))
    out = tmp_path / "dash"
    code = main(["dashboard", str(tmp_path / "cc"), "--out", str(out), "--dataset", str(texts),
                 "--tokens", "400", "--context-size", "20", "--top-k", "4"])
    assert code == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == str((out / "index.html").resolve())
    by_hand = hand_classes(cc)
    expected = {name: by_hand.count(name) for name in ("a_only", "shared", "b_only", "neither")}
    assert expected["a_only"] >= 5 and expected["b_only"] >= 3
    for name, label in (("a_only", f"{folders[0]} only"), ("b_only", f"{folders[1]} only")):
        assert any(re.fullmatch(rf" +{re.escape(label)} +{expected[name]} \(.*", line)
                   for line in printed), printed

    site = read_js(out / "data" / "site.js", "SAEKIT_SITE")
    assert site["crosscoder"]["site_names"] == folders
    assert site["crosscoder"]["counts"] == [expected[c] for c in CLASS_ORDER]
    index = unpack(read_js(out / "data" / "index.js", "SAEKIT_INDEX"))
    classes = [CLASS_ORDER[c] for c in index["norm_class"].tolist()]
    assert classes == by_hand
    stats = FeatureStats.load(out)
    models = [load_model(f) for f in folders]
    batches = heldout_token_batches(tokenizer, 400, dataset=str(texts), context_size=20,
                                    batch_size=16)
    count, _, _ = hand_counts(cc, models, [hook, hook], batches)
    assert torch.equal(stats.fire_count, count)


def test_neuronpedia_export_carries_site_shares(tmp_path, hf_backend, tokenizer) -> None:
    from saekit.export import export_neuronpedia

    cc = make_crosscoder(D_MODEL, **{SITE_HOOKS_KEY: TINY_HOOKS})
    cc.cfg.metadata.model_name = "tiny"
    with torch.no_grad():
        cc.W_dec[0, 1] = 0  # latent 0 writes to site 0 only
    batches = tiny_batches(tokenizer)
    stats = feature_statistics(cc, hf_backend, batches, top_k=4, progress=False)
    out = export_neuronpedia(cc, tmp_path / "np", stats=stats, model=hf_backend,
                             features_per_batch=100, progress=False)
    features = json.loads((out / "batch-0.json").read_text())["features"]
    assert len(features) == int((stats.fire_count > 0).sum())
    norms = cc.W_dec.detach().norm(dim=-1)  # [d_sae, 2]
    for feature in features:
        i = feature["feature_index"]
        share = (norms[i] / norms[i].sum()).tolist()
        assert feature["decoder_weights_dist"] == pytest.approx(share, abs=1e-4)
        # Several sites: no one decoder row to align, no one unembedding to read through.
        assert feature["pos_str"] == [] and feature["neuron_alignment_indices"] == []
    assert features[0]["feature_index"] == 0  # latent 0 fires (b_enc 0.1)
    assert features[0]["decoder_weights_dist"] == [1.0, 0.0]
