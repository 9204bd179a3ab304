"""The whole pipeline: an oracle client whose scores are predictable, resuming from the cache,
the local transformers client on the bundled model, the model pass for non-activating
contexts, and the command's dry run."""

from __future__ import annotations

import json

import pytest
import torch
from analysis_helpers import make_sae
from test_autointerp_world import (
    PIECES,
    decode,
    marked_pieces,
    oracle,
    world_negatives,
    world_stats,
)

from saekit.analysis.explanations import EXPLANATIONS_FILE, read_explanations
from saekit.autointerp import (
    PROMPT_VERSION,
    AutointerpConfig,
    CallableClient,
    TransformersClient,
    autointerp,
    explain_latents,
    negative_pool,
    split_contexts,
)
from saekit.autointerp.prompts import render

CFG = AutointerpConfig(n_test=10, n_negatives=10)


def expected(tp: int, fn: int, tn: int, fp: int) -> dict[str, float]:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn)
    return {
        "balanced_accuracy": (tp / (tp + fn) + tn / (tn + fp)) / 2,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "precision": precision, "recall": recall, "n": float(tp + fn + tn + fp), "failed": 0.0,
    }


def test_oracle_scores_match_the_arithmetic(tmp_path):
    stats, pool = world_stats(), world_negatives()
    result = explain_latents(stats, pool, decode, tmp_path, explainer=oracle,
                             latents="0-3", config=CFG, progress=False)
    got = read_explanations(tmp_path)
    assert sorted(got) == [0, 1, 2] and result.plan.rare == [3]
    for latent, token in ((0, 7), (1, 9), (2, 11)):
        assert got[latent].explanation == f'the token "{PIECES[token]}"'
        assert got[latent].explainer_model == got[latent].scorer_model == "oracle"
        assert got[latent].prompt_version == PROMPT_VERSION

    def split(latent):
        return split_contexts(stats, latent, CFG)

    negatives = {i: pool.for_latent(i, CFG.n_negatives, CFG.seed) for i in range(3)}
    # Latent 0 is exactly "t07": every test context holds one, no negative does.
    assert got[0].scores["detection"] == expected(10, 0, 10, 0)
    assert got[0].scores["fuzzing"] == expected(10, 0, 10, 0)
    # Latent 1 is "t09 after t03": negatives holding a t09 elsewhere fool the explanation.
    fooled = sum(9 in c.tokens for c in negatives[1])
    assert 0 < fooled < 10
    assert got[1].scores["detection"] == pytest.approx(expected(10, 0, 10 - fooled, fooled))
    # Latent 2 is t11, and weakly t12: detection misses contexts with no t11; fuzzing
    # rejects every context where a t12 is marked.
    test2 = split(2).test
    no_t11 = sum(11 not in c.tokens for c in test2)
    assert got[2].scores["detection"] == pytest.approx(expected(10 - no_t11, no_t11, 10, 0))
    marked_t12 = 0
    for c in test2:
        top = max(c.acts)
        marks = [a > 0 and a >= 0.3 * top for a in c.acts]
        text = render([PIECES[t] for t in c.tokens], marks)
        marked_t12 += any(p != PIECES[11] for p in marked_pieces(text))
    assert 0 < marked_t12 < 10
    assert got[2].scores["fuzzing"] == pytest.approx(expected(10 - marked_t12, marked_t12, 10, 0))
    # One explainer call and 2 x ceil(20 / 5) scorer calls per latent.
    assert result.sent == result.plan.calls == 3 * 9


def test_rerun_is_free_and_other_settings_are_refused(tmp_path):
    stats, pool = world_stats(), world_negatives()
    calls = []

    def counting(messages):
        calls.append(messages)
        return oracle(messages)

    explain_latents(stats, pool, decode, tmp_path, explainer=counting, latents=[0],
                    config=CFG, progress=False)
    first = len(calls)
    # Same request, latent 0 done: nothing asked. Asking for 0 and 2: only 2's calls.
    again = explain_latents(stats, pool, decode, tmp_path, explainer=counting,
                            latents=[0, 2], config=CFG, progress=False)
    assert again.plan.done == [0] and len(calls) == first + 9
    # A torn last line (a killed writer) is dropped before appending.
    with (tmp_path / EXPLANATIONS_FILE).open("a") as f:
        f.write('{"latent": 5, "expl')
    explain_latents(stats, pool, decode, tmp_path, explainer=counting, latents=[1],
                    config=CFG, progress=False)
    assert sorted(read_explanations(tmp_path)) == [0, 1, 2]
    with pytest.raises(ValueError, match="n_test differ"):
        explain_latents(stats, pool, decode, tmp_path, explainer=counting, latents=[0],
                        config=AutointerpConfig(n_test=4), progress=False)
    with pytest.raises(ValueError, match="explainer_model"):
        explain_latents(stats, pool, decode, tmp_path, explainer=CallableClient(oracle, "x"),
                        latents=[0], config=CFG, progress=False)
    replaced = explain_latents(stats, pool, decode, tmp_path, latents=[0], config=CFG,
                               explainer=CallableClient(oracle, "x"), replace=True,
                               progress=False)
    assert replaced.explanations[0].explainer_model == "x"


def test_unreadable_answers_count_as_failed(tmp_path):
    scorer_calls = []

    def sloppy(messages):
        answer = oracle(messages)
        if answer.startswith("["):
            scorer_calls.append(messages)
            if len(scorer_calls) % 2 == 0:
                return "I cannot say"
        return answer

    explain_latents(world_stats(), world_negatives(), decode, tmp_path, explainer=sloppy,
                    latents=[0], config=CFG, concurrency=1, progress=False)
    scores = read_explanations(tmp_path)[0].scores
    # 4 calls of 5 excerpts per scorer, every second one unreadable: 10 read, 10 failed.
    for name in ("detection", "fuzzing"):
        assert scores[name]["n"] == 10 and scores[name]["failed"] == 10
        assert scores[name]["balanced_accuracy"] == 1.0


def test_dry_run_sends_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    result = explain_latents(world_stats(), world_negatives(), decode, out,
                             explainer=lambda m: pytest.fail("a call was made"),
                             latents="all", config=CFG, dry_run=True)
    assert not out.exists()
    assert result.plan.todo == [0, 1, 2] and result.plan.calls == 27
    assert result.plan.first_prompt[0]["role"] == "system"
    assert result.plan.prompt_tokens > 27 * 100
    assert result.plan.completion_tokens == 3 * (CFG.max_explanation_tokens
                                                  + 8 * CFG.max_label_tokens)


def test_negative_pool_marks_where_latents_fire(hf_backend, tokens):
    sae = make_sae("blocks.0.hook_resid_pre", d_sae=16)
    pool = negative_pool(sae, hf_backend, [tokens, tokens + 1], width=3, n_windows=5,
                         progress=False)
    assert pool.tokens.shape == (5, 3) and pool.fires.shape == (5, 16)
    latents = torch.cat([
        sae.encode(hf_backend.activations(t, ["blocks.0.hook_resid_pre"])
                   ["blocks.0.hook_resid_pre"]) for t in (tokens, tokens + 1)
    ])  # [rows, pos, d_sae]
    seqs = torch.cat([tokens, tokens + 1])
    for window, fires in zip(pool.tokens, pool.fires, strict=True):
        # Find the window in the sequences and recompute which latents fire there.
        hits = [(r, s) for r in range(seqs.shape[0]) for s in range(seqs.shape[1] - 2)
                if torch.equal(seqs[r, s:s + 3], window)]
        assert any(torch.equal((latents[r, s:s + 3] > 0).any(0), fires) for r, s in hits)


@pytest.fixture(scope="module")
def bundled():
    from saekit.models import load_model

    return load_model("bundled")


def test_transformers_client_on_the_bundled_model(tmp_path, bundled):
    from saekit.analysis.collect import feature_statistics
    from saekit.evals.api import heldout_token_batches

    torch.manual_seed(0)
    sae = make_sae("blocks.2.hook_resid_pre", d_in=256, d_sae=8)
    batches = heldout_token_batches(bundled.tokenizer, 1024, context_size=64, batch_size=8)
    stats = feature_statistics(sae, bundled, batches, progress=False)
    client = TransformersClient(bundled.model, bundled.tokenizer)
    cfg = AutointerpConfig(n_top=2, n_bands=1, per_band=1, n_test=2, n_negatives=2,
                           min_examples=4, max_explanation_tokens=6, max_label_tokens=4)
    result = autointerp(sae, tmp_path, explainer=client, latents=[0, 1], model=bundled,
                        stats=stats, negative_windows=16, config=cfg, progress=False)
    got = read_explanations(tmp_path)
    assert sorted(got) == [0, 1] and result.sent == result.plan.calls > 0
    for item in got.values():
        assert item.explainer_model.startswith("hf:") and item.explanation.strip()
        assert "\n" not in item.explanation
        for scores in item.scores.values():  # nonsense answers are failures, not errors
            assert scores["n"] + scores["failed"] == 4
    answers = [json.loads(line) for line in
               (tmp_path / "autointerp_answers.jsonl").read_text().splitlines()]
    assert len(answers) == result.sent
    assert (tmp_path / "autointerp_negatives.safetensors").is_file()


def test_statistics_are_saved_and_a_rerun_works_from_them(tmp_path, bundled):
    sae = make_sae("blocks.2.hook_resid_pre", d_in=256, d_sae=8)
    asked = []

    def answer(messages):
        asked.append(messages)
        user = messages[-1]["content"]
        if user.startswith("Description:"):
            return "[" + ", ".join("1" for line in user.splitlines() if line[:1].isdigit()) + "]"
        return "Explanation: something about the text"

    cfg = AutointerpConfig(n_top=2, n_bands=1, per_band=1, n_test=2, n_negatives=2,
                           min_examples=4)
    first = autointerp(sae, tmp_path, explainer=answer, latents="all", model=bundled,
                       n_tokens=1024, negative_windows=16, config=cfg, progress=False)
    assert first.sent == len(asked) > 0
    from saekit.analysis.stats import FeatureStats

    assert FeatureStats.load(tmp_path).d_sae == 8
    # A new run from the saved statistics and contexts asks the very same questions (all
    # answered from the cache) and writes the same results.
    (tmp_path / EXPLANATIONS_FILE).unlink()
    again = autointerp(sae, tmp_path, explainer=answer, latents="all", model=bundled,
                       n_tokens=1024, negative_windows=16, config=cfg, progress=False)
    assert again.sent == 0 and len(asked) == first.sent
    assert again.explanations == first.explanations


def test_cli_dry_run_prints_the_cost_and_first_prompt(tmp_path, capsys):
    pytest.importorskip("openai")
    from saekit.cli import main
    from saekit.models.tiny import tiny_gpt2, tiny_tokenizer

    tiny_gpt2(300).save_pretrained(tmp_path / "model")
    tiny_tokenizer(300).save_pretrained(tmp_path / "model")
    sae = make_sae("blocks.0.hook_resid_pre", d_sae=8)
    sae.cfg.metadata.model_name = str(tmp_path / "model")
    sae.cfg.metadata.context_size = 64
    sae.save(tmp_path / "sae")
    out = tmp_path / "run"
    code = main(["autointerp", str(tmp_path / "sae"), "--out", str(out), "--explainer",
                 "openai:some-model", "--base-url", "http://127.0.0.1:9/v1", "--latents",
                 "0-3", "--tokens", "1024", "--negative-windows", "16", "--min-examples", "4",
                 "--dry-run",
                 "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0
    head = printed.splitlines()[0]
    assert head.startswith("dry run: ") and " calls, about " in head and "prompt tokens" in head
    assert "--- system ---" in printed and "--- user ---" in printed and "<<" in printed
    assert not out.exists()
