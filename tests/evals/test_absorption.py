"""The first-letter absorption eval: the scores on planted hierarchies (hand-computed), the
vocabulary and prompts on small real tokenizers, and one run on a tiny random model."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from sae_factory import random_sae

from saekit import SAE
from saekit.evals.absorption import (
    EVAL_TYPE_ID,
    HEADLINE,
    AbsorptionConfig,
    plot_absorption,
    read_positions,
    run_absorption,
)
from saekit.evals.absorption_data import (
    alpha_words,
    first_letter,
    icl_prompt,
    is_alpha_word,
    letter_index,
    split_words,
    token_text,
)
from saekit.evals.absorption_math import (
    LabelledActs,
    class_absorption,
    fit_class_probes,
    split_latents,
    word_absorption,
)
from saekit.evals.context import EvalData
from saekit.evals.results import write_saebench_json
from saekit.sites import SAESite

SQRT_HALF = 1 / math.sqrt(2)


def hand_sae(encoder: list[torch.Tensor], decoder: list[torch.Tensor], bias: float = 0.0) -> SAE:
    """A ReLU SAE with the given encoder columns and decoder rows (one per latent)."""
    d_in = encoder[0].shape[0]
    sae = SAE.create("standard", d_in, len(encoder))
    with torch.no_grad():
        sae.W_enc.copy_(torch.stack(encoder, dim=1))
        sae.W_dec.copy_(torch.stack(decoder))
        sae.b_enc.fill_(bias)
        sae.b_dec.zero_()
    return sae


# ----- the scores on a planted parent/child hierarchy, computed by hand ------------------------


def planted_words() -> tuple[torch.Tensor, torch.Tensor]:
    """Parent P = e0 present in four children c1..c4 = e2..e5: inputs P + c_i."""
    eye = torch.eye(8)
    return eye, torch.stack([eye[0] + eye[2 + i] for i in range(4)])


def test_clean_parent_latent_shows_no_absorption() -> None:
    e, x = planted_words()
    sae = hand_sae([e[0], *e[2:6]], [e[0], *e[2:6]])  # latent 0: the parent; 1-4: children
    out = word_absorption(x, sae.encode(x).detach(), sae.W_dec.detach(), e[0], [0])
    assert out.probe_projection.tolist() == pytest.approx([1.0] * 4)
    assert out.main_projection.tolist() == pytest.approx([1.0] * 4)
    assert out.absorption_fraction.tolist() == [0.0] * 4
    assert out.is_full_absorption.tolist() == [False] * 4


def test_absorbing_child_latents_give_hand_computed_scores() -> None:
    e, x = planted_words()
    sae = hand_sae(
        # The parent latent is silent on c1 and half-fires on c2 ...
        [e[0] - e[2] - 0.5 * e[3], e[2], e[3], e[4], e[5]],
        # ... because c1's and c2's latents carry the parent direction in their decoders.
        [e[0], (e[2] + e[0]) * SQRT_HALF, (e[3] + e[0]) * SQRT_HALF, e[4], e[5]],
    )
    out = word_absorption(x, sae.encode(x).detach(), sae.W_dec.detach(), e[0], [0])
    # c1: no main projection, c1's latent carries 1 * cos 45 deg = 0.707 >= 40% of 1: full.
    # c2: main 0.5; c2's latent offers 0.707 but only 1 - 0.5 is missing: 0.5 / (0.5 + 0.5).
    assert out.main_projection.tolist() == pytest.approx([0.0, 0.5, 1.0, 1.0])
    assert out.absorption_fraction.tolist() == pytest.approx([1.0, 0.5, 0.0, 0.0])
    assert out.is_full_absorption.tolist() == [True, False, False, False]
    assert out.top_latent[0] == 1 and out.top_latent_projection[0] == pytest.approx(SQRT_HALF)
    # The per-letter figures SAEBench reports: mean fraction 0.375, full absorption rate 1/4.
    assert out.absorption_fraction.mean() == pytest.approx(0.375)
    assert out.is_full_absorption.float().mean() == pytest.approx(0.25)


def test_full_absorption_and_fraction_use_their_own_cosine_thresholds() -> None:
    # c1's latent barely points at the parent (cos ~0.05) but fires strongly (20): it passes
    # full absorption's cosine bar (0.025) and carries 20 * 0.05 ~ 1 of the projection, yet is
    # no candidate for the absorption fraction (cosine bar 0.1).
    e, x = planted_words()
    leaning = e[2] + 0.05 * e[0]
    sae = hand_sae([e[0] - e[2], 20 * e[2]], [e[0], leaning / leaning.norm()])
    out = word_absorption(x[:1], sae.encode(x[:1]).detach(), sae.W_dec.detach(), e[0], [0])
    assert out.is_full_absorption.tolist() == [True]
    assert out.absorption_fraction.tolist() == [0.0]
    # Three aligned latents at most make up the fraction: four absorbers of 0.2 each give 0.6.
    quarter = [(e[2 + i] + e[0]) * SQRT_HALF for i in range(4)]
    sae = hand_sae([e[0] - e[2]] + [0.2 * math.sqrt(2) * e[2]] * 4, [e[0], *quarter])
    out = word_absorption(x[:1], sae.encode(x[:1]).detach(), sae.W_dec.detach(), e[0], [0])
    assert out.absorption_fraction.tolist() == pytest.approx([1.0])  # 0.6 >= 0.4, main silent
    sae = hand_sae([e[0] - e[2]] + [0.1 * math.sqrt(2) * e[2]] * 4, [e[0], *quarter])
    out = word_absorption(x[:1], sae.encode(x[:1]).detach(), sae.W_dec.detach(), e[0], [0])
    assert out.absorption_fraction.tolist() == [0.0]  # 3 * 0.1 = 0.3 < 0.4 of the projection


def test_split_latents_follow_the_f1_jump_rule() -> None:
    ranked = [7, 3, 9, 1]
    # 0.5 -> 0.6 (+0.10 > 0.03: keep) -> 0.61 (+0.01: stop), the later jump is not reached.
    assert split_latents(ranked, [0.5, 0.6, 0.61, 0.9], 0.03) == [7, 3]
    assert split_latents(ranked, [0.9, 0.8, 1.0, 1.0], 0.03) == [7]
    assert split_latents(ranked, [0.1, 0.2, 0.3, 0.4], 0.03) == ranked


def planted_hierarchy(
    rng: torch.Generator, n_parents: int = 3, n_train: int = 30, n_test: int = 10
) -> tuple[torch.Tensor, LabelledActs, LabelledActs, list[list[int]]]:
    """Parents e_0..e_{P-1}; each has its own children (train ones, then test ones), each
    child one input parent + child + noise. Returns the basis, the splits and, per parent,
    the dimensions of its test children."""
    per = n_train + n_test
    d = n_parents + n_parents * per
    eye = torch.eye(d)
    train_x, train_y, test_x, test_y, test_children = [], [], [], [], []
    for p in range(n_parents):
        children = [n_parents + p * per + i for i in range(per)]
        test_children.append(children[n_train:])
        for i, child in enumerate(children):
            x = eye[p] + eye[child] + 0.02 * torch.randn(d, generator=rng)
            (train_x if i < n_train else test_x).append(x)
            (train_y if i < n_train else test_y).append(p)
    train = LabelledActs(torch.stack(train_x), torch.tensor(train_y))
    test = LabelledActs(torch.stack(test_x), torch.tensor(test_y))
    return eye, train, test, test_children


def hierarchy_sae(eye: torch.Tensor, n_parents: int, absorbed: dict[int, int]) -> SAE:
    """A latent per parent (0..P-1) and per child; `absorbed` {parent: child dim}: that
    child's latent holds the parent direction and the parent latent is silent on it."""
    d = eye.shape[0]
    enc, dec = [], []
    for p in range(n_parents):
        column = eye[p] - (eye[absorbed[p]] if p in absorbed else 0)
        enc.append(1.3 * column)  # 1.3 - bias 0.3 = activation 1; noise stays below the bias
        dec.append(eye[p])
    for child in range(n_parents, d):
        enc.append(1.3 * eye[child])
        parent = next((p for p, c in absorbed.items() if c == child), None)
        row = eye[child] + (eye[parent] if parent is not None else 0)
        dec.append(row / row.norm())
    return hand_sae(enc, dec, bias=-0.3)


def test_pipeline_finds_main_latents_and_planted_full_absorption() -> None:
    rng = torch.Generator().manual_seed(0)
    eye, train, test, test_children = planted_hierarchy(rng)
    probes = fit_class_probes(train.acts, train.labels, 3, progress=False)
    clean = hierarchy_sae(eye, 3, {})
    absorbing = hierarchy_sae(eye, 3, {0: test_children[0][0]})  # 1 of parent 0's 10 words

    for sae, expected_fraction in ((clean, [0.0, 0.0, 0.0]), (absorbing, [0.1, 0.0, 0.0])):
        classes = class_absorption(
            sae.encode, sae.W_dec.detach(), probes, train, test, max_k=4, progress=False
        )
        assert [c.label for c in classes] == [0, 1, 2]
        for c, fraction in zip(classes, expected_fraction, strict=True):
            assert c.split_latents == [c.label]  # the parent latent alone is the main latent
            assert c.num_probe_true_positives == 10 and c.probe_f1 == 1.0
            assert c.mean_absorption_fraction == pytest.approx(fraction, abs=1e-6)
            assert c.full_absorption_rate == pytest.approx(fraction, abs=1e-6)
    # The parent latent misses the absorbed word, so its 1-sparse F1 is 2 * 0.9 / 1.9.
    assert classes[0].f1_by_k[0] == pytest.approx(2 * 0.9 / 1.9)


# ----- vocabulary and prompts -----------------------------------------------------------------


def byte_level_tokenizer(tokens: list[str]) -> object:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def test_alpha_words_keep_letter_only_tokens_with_one_leading_space() -> None:
    # Byte-level spellings: "Ġ" is a space, "Ã©" is "é".
    tokens = ["<|endoftext|>", "Ġcat", "dog", "Ġa", "ĠC3PO", "Ġ", "Ġhello!", "ĠĠtwo",
              "cafÃ©", "ĠEmu", "x"]
    tok = byte_level_tokenizer(tokens)
    assert alpha_words(tok) == [" cat", "dog", " a", " Emu", "x"]
    assert alpha_words(tok, allow_leading_space=False) == ["dog", "x"]


def test_sentencepiece_tokens_keep_their_leading_space() -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={"<unk>": 0, "▁cat": 1, "cat": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    assert token_text(fast, "▁cat") == " cat"
    assert token_text(fast, "cat") == "cat"
    assert alpha_words(fast) == [" cat", "cat"]


def test_icl_prompt_layout_and_no_self_example() -> None:
    prompt = icl_prompt(" cat", [" dog", "emu"], "{word} has the first letter:", random.Random(0))
    lines = prompt.text.split("\n")
    assert lines[0] == ""  # the separator also opens the prompt
    assert sorted(lines[1:3]) == [" dog has the first letter: D", "emu has the first letter: E"]
    assert lines[3] == " cat has the first letter:"
    assert (prompt.word, prompt.letter) == (" cat", "c")
    pool = [" cat", " dog", " emu", " fox", " gnu"]
    for seed in range(30):
        drawn = icl_prompt(" cat", pool, "{word}:", random.Random(seed), max_examples=4)
        assert len(drawn.text.split("\n")) == 6 and drawn.text.count(" cat:") == 1
    assert first_letter("  Zebra") == "z"


def test_split_words_is_seeded_and_disjoint() -> None:
    words = [f" {a}{b}" for a in "abcdefghij" for b in "xyz"]  # 30 words
    split = split_words(words, "{word}:", seed=3)
    assert (len(split.train), len(split.test)) == (24, 6)
    train_words = {p.word for p in split.train}
    test_words = [p.word for p in split.test]
    assert train_words.isdisjoint(test_words) and train_words | set(test_words) == set(words)
    # Test prompts draw examples from test words only; absorption prompts from any word.
    for p in split.test:
        examples = {line.split(":")[0] for line in p.text.split("\n")[1:-1]}
        assert examples <= set(test_words) - {p.word}
    assert [p.word for p in split.absorption] == test_words
    assert split_words(words, "{word}:", seed=3) == split
    assert split_words(words, "{word}:", seed=4) != split


def test_default_read_position_is_the_word_token() -> None:
    from saekit.models.bundled import load_bundled_tokenizer

    tok = load_bundled_tokenizer()
    text = "\n dog has the first letter: D\n king has the first letter:"
    rows, positions = read_positions(tok, [text], None, -6)
    assert rows[0][0] == tok.bos_token_id  # GPT-2 style: BOS prepended, nothing appended
    assert tok.decode([rows[0][positions[0]]]) == " king"


# ----- end to end on a tiny random model ------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_data() -> EvalData:
    """A random 2-layer GPT-2 whose word embeddings are planted to carry the word's first
    letter (a direction per letter), so that the letter probes have something to find."""
    from saekit.models import load_model
    from saekit.models.tiny import tiny_gpt2, tiny_tokenizer

    tok = tiny_tokenizer(300)
    model = tiny_gpt2(vocab_size=300, d_model=32)
    letters = torch.randn(26, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embed = model.transformer.wte.weight
        for token, i in tok.get_vocab().items():
            text = token_text(tok, token)
            if is_alpha_word(text):
                embed[i] = 0.2 * embed[i] + letters[letter_index(text)]
    backend = load_model(model, tokenizer=tok)
    return EvalData(backend, SAESite("blocks.1.hook_resid_pre", "blocks.1.hook_resid_pre"),
                    progress=False)


# The tiny tokenizer splits " has the first letter" into many pieces; "{word}:" keeps the
# word two tokens from the end. Any letter the probe finds at all counts.
TINY_CONFIG = AbsorptionConfig(
    prompt_template="{word}:", prompt_token_pos=-2, min_GT_probe_f1=0.0, min_feats_for_eval=1,
    max_k_value=3,
)

SAEBENCH_METRICS = {
    "mean_absorption_fraction_score", "mean_full_absorption_score", "mean_num_split_features",
    "std_dev_absorption_fraction_score", "std_dev_full_absorption_score",
    "std_dev_num_split_features",
}
SAEBENCH_DETAIL = {
    "first_letter", "mean_absorption_fraction", "full_absorption_rate", "num_full_absorption",
    "num_probe_true_positives", "num_split_features",
}


def test_end_to_end_on_a_tiny_model(tiny_data: EvalData, tmp_path) -> None:
    saes = [random_sae("standard", d_in=32, d_sae=64, seed=s) for s in (0, 1)]
    results = run_absorption(saes, tiny_data, TINY_CONFIG)
    n_memo = len(tiny_data._memo)
    assert len(results) == 2
    for sae, result in zip(saes, results, strict=True):
        assert result.eval_type_id == EVAL_TYPE_ID == "absorption_first_letter"
        assert set(result.metrics) == {"mean"} and set(result.metrics["mean"]) == SAEBENCH_METRICS
        assert result.eval_config["model_name"] and result.eval_config["prompt_token_pos"] == -2
        assert result.details, "no letter was evaluated"
        for detail in result.details:
            assert set(detail) == SAEBENCH_DETAIL
            assert 0.0 <= detail["mean_absorption_fraction"] <= 1.0
            assert 0 <= detail["num_full_absorption"] <= detail["num_probe_true_positives"]
            assert detail["full_absorption_rate"] == pytest.approx(
                detail["num_full_absorption"] / detail["num_probe_true_positives"])
            assert 1 <= detail["num_split_features"] <= 3
        mean = result.metrics["mean"]
        fractions = [d["mean_absorption_fraction"] for d in result.details]
        assert mean["mean_absorption_fraction_score"] == pytest.approx(np.mean(fractions))
        for name in HEADLINE:
            assert 0.0 <= result.metric(name) <= 3.0
        assert "1B parameters" in result.unstructured["note"]
        record = json.loads(write_saebench_json(result, sae, tmp_path / "r.json").read_text())
        assert record["eval_result_metrics"]["mean"].keys() == SAEBENCH_METRICS
    # A second eval on the same data reuses the prompts' activations and the probes.
    again = run_absorption(saes[:1], tiny_data, TINY_CONFIG)
    assert len(tiny_data._memo) == n_memo
    assert again[0].details == results[0].details
    png = plot_absorption({"a": results[0], "b": results[1]}, tmp_path / "absorption.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_too_few_good_letters_reports_no_scores(tiny_data: EvalData) -> None:
    config = AbsorptionConfig(prompt_template="{word}:", prompt_token_pos=-2, max_k_value=2,
                              min_GT_probe_f1=1.0)  # no probe beats a perfect F1
    (result,) = run_absorption([random_sae("standard", d_in=32, d_sae=64)], tiny_data, config)
    assert all(v is None for v in result.metrics["mean"].values())
    assert result.details == [] and "min_GT_probe_f1" in result.unstructured["not_evaluated"]


def test_bad_settings_say_what_to_do(tiny_data: EvalData) -> None:
    with pytest.raises(ValueError, match="no \\{word\\} placeholder"):
        AbsorptionConfig(prompt_template="first letter:")
    with pytest.raises(ValueError, match="must be negative"):
        AbsorptionConfig(prompt_token_pos=2)
    # The default template's -6 does not land on the word with this tokenizer.
    with pytest.raises(ValueError, match="set prompt_token_pos"):
        run_absorption([random_sae("standard", d_in=32, d_sae=64)], tiny_data,
                       AbsorptionConfig(prompt_token_pos=-1))
