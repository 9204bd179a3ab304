"""The bundled corpus split, tokenizer and demo GPT-2, in both backends."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import saekit
from saekit.assets import corpus
from saekit.models.bundled import (
    BUNDLED_MODEL_DIR,
    load_bundled_hf,
    load_bundled_hooked_transformer,
    load_bundled_tokenizer,
)

N_CTX_TEST = 128


@pytest.fixture(scope="module")
def tokenizer():
    return load_bundled_tokenizer()


@pytest.fixture(scope="module")
def hf_model():
    return load_bundled_hf()


@pytest.fixture(scope="module")
def tl_model():
    return load_bundled_hooked_transformer()


def _heldout_windows(tokenizer, per_work: int, n_ctx: int) -> torch.Tensor:
    """BOS-prefixed windows taken evenly through each held-out work."""
    rows = []
    for text in corpus.heldout_texts():
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        body = n_ctx - 1
        starts = torch.linspace(0, len(ids) - body, per_work).long().tolist()
        rows += [[tokenizer.bos_token_id] + ids[s : s + body] for s in starts]
    return torch.tensor(rows)


# --------------------------------------------------------------------------- corpus split


def test_assets_live_inside_the_package():
    package = Path(saekit.__file__).resolve().parent
    assert corpus.CORPUS_DIR.resolve().is_relative_to(package)
    assert BUNDLED_MODEL_DIR.resolve().is_relative_to(package)
    assert (corpus.CORPUS_DIR / "README.md").is_file()


def test_heldout_split_is_whole_disjoint_works_of_about_five_percent():
    works = dict(corpus.load_works())
    assert len(works) == 49
    train = corpus.train_works()
    held = corpus.heldout_works()
    train_names = {n for n, _ in train}
    held_names = {n for n, _ in held}

    assert held_names == set(corpus.HELDOUT_WORKS)
    assert not train_names & held_names
    assert train_names | held_names == set(works)
    # Whole works: each held-out text is the complete text of its work.
    for name, text in held:
        assert text == works[name]
    assert corpus.heldout_texts() == [t for _, t in held]
    assert corpus.train_texts() == [t for _, t in train]

    total = sum(len(t) for t in works.values())
    frac = sum(len(t) for _, t in held) / total
    assert 0.04 < frac < 0.06


def test_work_lengths_match_the_index():
    lines = (corpus.CORPUS_DIR / "works.txt").read_text().split("\n")
    lengths = [int(line.split("\t")[1]) for line in lines if line]
    assert [len(t) for _, t in corpus.load_works()] == lengths


# --------------------------------------------------------------------------- tokenizer


def test_tokenizer_has_bos_eos_and_round_trips(tokenizer, hf_model):
    assert tokenizer.bos_token == tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.bos_token_id is not None and tokenizer.eos_token_id is not None
    assert tokenizer.bos_token_id == hf_model.config.bos_token_id
    assert tokenizer.eos_token_id == hf_model.config.eos_token_id
    assert len(tokenizer) == hf_model.config.vocab_size

    text = corpus.heldout_text(3000) + "\n  Ætna, naïve “quotes” — 東京 🙂\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.bos_token_id not in ids
    assert tokenizer.decode(ids) == text
    # Byte-level BPE on this corpus: around 3 characters per token, not 1.
    assert len(ids) < len(text) / 2


def test_tokenizer_loads_with_auto_tokenizer():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(BUNDLED_MODEL_DIR)
    assert tok.bos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|endoftext|>")


# --------------------------------------------------------------------------- weights and backends


def test_weights_file_is_small_safetensors():
    weights = BUNDLED_MODEL_DIR / "model.safetensors"
    assert weights.stat().st_size < 25 * 1024 * 1024
    assert not list(BUNDLED_MODEL_DIR.glob("*.bin"))


def test_model_shape_within_the_demo_limits(hf_model, tl_model):
    c = hf_model.config
    assert 4 <= c.n_layer <= 6 and 256 <= c.n_embd <= 384 and 128 <= c.n_positions <= 256
    assert c.tie_word_embeddings
    assert tl_model.cfg.n_layers == c.n_layer and tl_model.cfg.d_vocab == c.vocab_size
    assert tl_model.cfg.n_ctx == c.n_positions


def test_hf_and_transformer_lens_logits_match(tokenizer, hf_model, tl_model):
    x = _heldout_windows(tokenizer, per_work=1, n_ctx=hf_model.config.n_positions)
    with torch.no_grad():
        hf_logits = hf_model(x).logits
        tl_logits, cache = tl_model.run_with_cache(x)
        hidden = hf_model(x, output_hidden_states=True).hidden_states
    assert (hf_logits - tl_logits).abs().max().item() < 1e-4
    # Unfolded weights: the residual stream itself matches too, not only the logits.
    for layer in range(tl_model.cfg.n_layers):
        resid = cache[f"blocks.{layer}.hook_resid_pre"]
        assert (resid - hidden[layer]).abs().max().item() < 1e-4


def test_transformer_lens_model_has_the_tokenizer(tl_model, tokenizer):
    tokens = tl_model.to_tokens("To be, or not to be")
    assert tokens[0, 0].item() == tokenizer.bos_token_id
    assert tl_model.to_string(tokens[0, 1:]) == "To be, or not to be"
    text = corpus.heldout_text(500)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:100]
    assert tl_model.to_tokens(text, prepend_bos=False)[0, :100].tolist() == ids


def test_model_beats_unigram_baseline_on_heldout_text(tokenizer, hf_model):
    # Unigram baseline from train-split counts (add-one smoothing), scored on held-out tokens.
    # Every third training work (both authors, ~2M characters) keeps the test fast.
    sample = corpus.train_texts()[::3]
    counts = torch.ones(len(tokenizer), dtype=torch.float64)
    for enc in tokenizer(sample, add_special_tokens=False)["input_ids"]:
        counts += torch.bincount(torch.tensor(enc), minlength=len(tokenizer))
    logp = counts.log() - counts.sum().log()

    x = _heldout_windows(tokenizer, per_work=8, n_ctx=hf_model.config.n_positions)
    targets = x[:, 1:]
    unigram_ce = float(-logp[targets].mean())
    with torch.no_grad():
        logits = hf_model(x).logits[:, :-1]
    model_ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)
    ).item()
    assert unigram_ce > 5.5  # sanity: the baseline itself is a sensible number
    assert model_ce < unigram_ce - 1.0, (model_ce, unigram_ce)


def test_bundled_is_a_dataset_name(tmp_path, monkeypatch) -> None:
    """"bundled" names the corpus wherever a dataset is read (train, cache, pretokenize), with
    the held-out works as its test split; a local folder called bundled still wins."""
    from saekit.data.text import load_text_dataset

    assert load_text_dataset("bundled") == corpus.train_texts()
    assert load_text_dataset("bundled", split="test") == corpus.heldout_texts()
    with pytest.raises(ValueError, match="splits train and test"):
        load_text_dataset("bundled", split="dev")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bundled").mkdir()
    (tmp_path / "bundled" / "a.txt").write_text("local text\n")
    assert list(load_text_dataset("bundled")["text"]) == ["local text"]
