"""Prompt builder, context split, latent selection and scoring arithmetic, against hand counts."""

from __future__ import annotations

import math
import random

import pytest
import torch
from test_autointerp_world import (
    WIDTH,
    decode,
    marked_pieces,
    world_negatives,
    world_stats,
)

from saekit.autointerp import AutointerpConfig, Context, parse_latents, split_contexts
from saekit.autointerp.contexts import context, shares_passage, spread
from saekit.autointerp.prompts import (
    TokenText,
    explainer_messages,
    parse_explanation,
    parse_labels,
    render,
    scorer_messages,
)
from saekit.autointerp.scoring import (
    classification_scores,
    detection_samples,
    fuzzing_samples,
    in_prompts,
    n_wrong_marks,
)


def test_render_marks_runs_and_cleans_pieces():
    assert render(["a", " b", " c", " d"], [False, True, True, False]) == "a<< b c>> d"
    assert render(["x", "y"], [True, True]) == "<<xy>>"
    assert render(["x", "y"], [False, False]) == "xy"

    class Tok:
        def decode(self, ids):
            return {0: "line\n", 1: "a<<b", 2: ">>"}[ids[0]]

    text = TokenText(Tok())
    assert [text(0), text(1), text(2)] == ["line↵", "a‹‹b", "››"]


def test_marks_follow_the_threshold():
    ctx = Context((1, 2, 3, 4), (0.0, 1.0, 0.29, 0.3))
    assert ctx.marked(0.3) == [False, True, False, True]
    assert ctx.marked(1.0) == [False, True, False, False]
    assert Context((1,), (0.0,)).marked(0.3) == [False]
    # Positions beyond the sequence (-1) are dropped from a statistics window.
    assert context([-1, -1, 5, 6], [0.0, 0.0, 2.0, 0.0]) == Context((5, 6), (2.0, 0.0))


def test_explainer_prompt_lists_top_then_bands_with_strengths():
    stats = world_stats()
    cfg = AutointerpConfig(n_top=3, n_bands=2, per_band=2, n_test=4)
    split = split_contexts(stats, 0, cfg)
    messages = explainer_messages(split, decode, cfg.mark_threshold, float(stats.max_act[0]))
    assert [m["role"] for m in messages] == ["system", "user"]
    lines = messages[1]["content"].splitlines()
    numbered = [line for line in lines if line[:1].isdigit()]
    assert len(numbered) == 3 + sum(len(b) for b in split.bands)
    assert [line.split(".")[0] for line in numbered] == [str(i + 1) for i in range(len(numbered))]
    # Every excerpt marks t07 (latent 0 fires on exactly those) and nothing else.
    for line in numbered:
        text, strength = line.split("   (strength: ")
        assert set(marked_pieces(text)) == {" t07"}
        assert len(marked_pieces(text)) == text.count(" t07")
        assert strength.count('" t07"') == min(8, text.count(" t07"))
    # The strongest context has strength 10 on the 1-10 scale.
    top = split.top[0]
    assert f'" t07" {math.ceil(10 * top.max_act / float(stats.max_act[0]))}' in numbered[0]
    assert '" t07" 10' in numbered[0]


def test_parse_explanation():
    assert parse_explanation("Step 1...\nExplanation: the word *sea*.") == "the word *sea*."
    assert parse_explanation("**Explanation:** \"verbs of motion\"") == "verbs of motion"
    assert parse_explanation("Explanation: a\nmore\nEXPLANATION: b") == "b"
    assert parse_explanation('Explanation: the token " t07"') == 'the token " t07"'
    assert parse_explanation('Explanation: the token " t07"') == 'the token " t07"'
    assert parse_explanation("just a line\n\n  last   line  ") == "last line"
    assert parse_explanation("") == ""
    long = parse_explanation("Explanation: " + "word " * 100)
    assert len(long) <= 304 and long.endswith("...")


@pytest.mark.parametrize(("answer", "n", "expected"), [
    ("[1, 0, 1]", 3, [True, False, True]),
    ("Sure: [0,0,1,1,0] done", 5, [False, False, True, True, False]),
    ("[true, false]", 2, [True, False]),
    ("1, 0, 1", 3, [True, False, True]),
    ("[1, 0]", 3, None),
    ("[1, 2, 0]", 3, None),
    ("no idea", 2, None),
])
def test_parse_labels(answer, n, expected):
    assert parse_labels(answer, n) == expected


def test_scorer_prompt_numbers_excerpts():
    messages = scorer_messages("detection", "the token x", ["a b", "c"])
    assert messages[-1]["content"] == "Description: the token x\n\nExcerpts:\n1. a b\n2. c"
    assert "<<like this>>" in scorer_messages("fuzzing", "e", ["a"])[0]["content"]


def test_split_keeps_test_contexts_apart():
    stats = world_stats()
    cfg = AutointerpConfig()
    for latent in range(3):
        split = split_contexts(stats, latent, cfg)
        assert len(split.test) == cfg.n_test
        assert len(split.top) == cfg.n_top
        train = split.train
        assert not set(train) & set(split.test)
        # No test context shares 8 tokens in a row with a context the explainer saw.
        for t in split.test:
            for seen in train:
                runs = {seen.tokens[i:i + 8] for i in range(len(seen.tokens) - 7)}
                assert all(t.tokens[i:i + 8] not in runs for i in range(len(t.tokens) - 7))
        # Test contexts come from the random sample, weakest first, across its range.
        value = {context(t, a): v for v, t, a in stats.quantile_samples(latent, 1, 40)[0]}
        values = sorted(value.values())
        shown = [value[t] for t in split.test]
        assert shown == sorted(shown)
        assert shown[0] <= values[len(values) // 4] and shown[-1] >= values[-len(values) // 4]
    assert split_contexts(stats, 3, cfg).n_distinct == 0


def test_split_of_a_rare_latent_still_tests_half():
    tokens = torch.randint(0, 7, (1, 40), generator=torch.Generator().manual_seed(0))
    tokens[0, [3, 20, 37]] = 7  # three firings, far apart
    from saekit.analysis.stats import FeatureStatsAccumulator

    acc = FeatureStatsAccumulator(1, top_k=20, n_samples=40, left=12, right=4)
    acc.update(tokens, (tokens == 7).float()[..., None])
    split = split_contexts(acc.result(), 0, AutointerpConfig())
    assert split.n_distinct == 3
    assert len(split.test) == 1 and len(split.train) == 2
    assert not set(split.test) & set(split.train)


def test_shares_passage_and_spread():
    seen = {(1, 2, 3)}
    assert shares_passage(Context((9, 1, 2, 3), (0.0,) * 4), seen, 3)
    assert not shares_passage(Context((1, 2, 4, 3), (0.0,) * 4), seen, 3)
    assert shares_passage(Context((2, 3), (0.0, 0.0)), seen, 3)  # shorter: inside a seen run
    items = [Context((i,), (float(i),)) for i in range(10)]
    assert [c.tokens[0] for c in spread(items, 3)] == [1, 5, 8]
    assert spread(items[:2], 3) == items[:2]


def test_latent_specs():
    assert parse_latents("0-3,7,2").ids == (0, 1, 2, 3, 7)
    assert parse_latents("all").all and parse_latents("random:5").random == 5
    assert parse_latents([4, 4, 1]).ids == (4, 1)
    for bad in ("3-1", "x", "random:0", "1-", "random:-2", ""):
        with pytest.raises(ValueError, match="--latents"):
            parse_latents(bad)
    with pytest.raises(ValueError, match="has 8 latents, 0 to 7"):
        parse_latents("5-9").check(8)
    fires = torch.tensor([0, 50, 3, 20, 11])
    chosen = parse_latents("random:2").choose(fires, min_fires=10, seed=0)
    assert len(chosen) == 2 and set(chosen) <= {1, 3, 4}
    assert parse_latents("random:9").choose(fires, min_fires=10) == [1, 3, 4]


def test_classification_scores_by_hand():
    truth = [True] * 6 + [False] * 4
    # TP 4, FN 1 (one unreadable), TN 3, FP 1.
    pred = [True, True, True, True, False, None, False, False, False, True]
    s = classification_scores(truth, pred)
    assert s["n"] == 9 and s["failed"] == 1
    assert s["recall"] == pytest.approx(4 / 5)
    assert s["precision"] == pytest.approx(4 / 5)
    assert s["balanced_accuracy"] == pytest.approx((4 / 5 + 3 / 4) / 2)
    assert s["f1"] == pytest.approx(2 * 0.8 * 0.8 / 1.6)
    nothing = classification_scores([True, False], [False, False])
    assert nothing["precision"] == 0 and nothing["f1"] == 0 and nothing["balanced_accuracy"] == 0.5
    unread = classification_scores([True, False], [None, None])
    assert unread["n"] == 0 and unread["failed"] == 2
    assert all(math.isnan(unread[k]) for k in ("balanced_accuracy", "f1", "precision", "recall"))


def test_detection_and_fuzzing_samples_by_hand():
    cfg = AutointerpConfig()
    test = [
        Context((1, 7, 2), (0.0, 1.0, 0.0)),        # one mark
        Context((7, 7, 2, 3), (1.0, 0.5, 0.1, 0.0)),  # two marks (0.1 < 0.3)
    ]
    negatives = [Context((4, 5, 6, 8), (0.0,) * 4), Context((9, 10), (0.0, 0.0))]
    det = detection_samples(test, negatives, decode)
    assert [s.activating for s in det] == [True, True, False, False]
    assert det[0].text == " t01 t07 t02" and "<<" not in "".join(s.text for s in det)
    assert n_wrong_marks(test, 0.3) == 2  # ceil((1 + 2) / 2)
    fuzz = fuzzing_samples(test, negatives, decode, cfg, random.Random(0))
    assert [s.text for s in fuzz[:2]] == [" t01<< t07>> t02", "<< t07 t07>> t02 t03"]
    assert [s.activating for s in fuzz] == [True, True, False, False]
    for s in fuzz[2:]:  # two random tokens marked in each non-activating context
        assert len(marked_pieces(s.text)) == 2
    active = fuzzing_samples(test, negatives, decode,
                             AutointerpConfig(fuzz_mode="active"), random.Random(0))
    wrong = [s.text for s in active if not s.activating]
    # Marks land only on tokens that do not fire: t01/t02 in the first, t02/t03 in the second.
    assert wrong[0].replace("<<", "").replace(">>", "") == " t01 t07 t02"
    assert "<< t07" not in wrong[0] and "<< t01>>" in wrong[0] and "<< t02>>" in wrong[0]
    assert wrong[1] == " t07 t07<< t02 t03>>"
    groups = in_prompts(det, 3)
    assert [len(g) for g in groups] == [3, 1]


def test_negative_windows_for_a_latent_never_fire():
    pool = world_negatives()
    chosen = pool.for_latent(0, 10, seed=0)
    assert len(chosen) == 10 and all(len(c.tokens) == WIDTH for c in chosen)
    assert all(7 not in c.tokens for c in chosen)
    assert chosen == pool.for_latent(0, 10, seed=0) != pool.for_latent(0, 10, seed=1)
