"""The words and prompts of the first-letter absorption eval (SAEBench's `absorption`).

The vocabulary is every token of the tokenizer that reads as letters only (one leading space
allowed), so each word is one token and its first letter is a fact the model may know. Each
word is asked about in an in-context-learning prompt of the form

    \\n{example} has the first letter: E\\n ... \\n{word} has the first letter:

and the activation read is the one at the word's own token (`prompt_token_pos` counted from
the end of the prompt: -6 for the default template), as SAEBench does.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

LETTERS = "abcdefghijklmnopqrstuvwxyz"
_ALPHA = frozenset(LETTERS + LETTERS.upper())

#: Share of the vocabulary the probes train on; the rest is the test split (SAEBench: 0.8).
TRAIN_FRACTION = 0.8
#: Examples in each prompt (SAEBench: 10).
MAX_ICL_EXAMPLES = 10
#: Between examples, and before the first one (SAEBench prepends it: some tokenizers treat a
#: text's first token differently).
EXAMPLE_SEPARATOR = "\n"
#: Draws of examples that contain the word itself before the word is taken out of the pool.
MAX_DRAWS = 100


def token_text(tokenizer: Any, token: str) -> str:
    """The text of one vocabulary entry, with its leading space where it has one.

    SentencePiece tokenizers (Mistral's) mark a leading space by "▁" but drop it when one
    token is decoded alone; it is put back so that " word" and "word" stay distinct."""
    text = tokenizer.convert_tokens_to_string([token])
    if token.startswith("▁") and not text.startswith(" "):
        text = " " + text
    return text


def is_alpha_word(text: str, allow_leading_space: bool = True) -> bool:
    """True for a non-empty run of ASCII letters, after at most one leading space."""
    if allow_leading_space and text.startswith(" "):
        text = text[1:]
    return bool(text) and all(char in _ALPHA for char in text)


def alpha_words(tokenizer: Any, allow_leading_space: bool = True) -> list[str]:
    """Every token of `tokenizer` that is letters only (see `is_alpha_word`), as text, in
    token-id order. A text reached by two tokens (a byte-fallback twin) is kept once."""
    vocab: dict[str, int] = tokenizer.get_vocab()
    words: list[str] = []
    seen: set[str] = set()
    for token, _ in sorted(vocab.items(), key=lambda item: item[1]):
        text = token_text(tokenizer, token)
        if text not in seen and is_alpha_word(text, allow_leading_space):
            seen.add(text)
            words.append(text)
    return words


def first_letter(word: str) -> str:
    """The word's first letter, lower case ("  Cat" -> "c")."""
    for char in word.strip():
        if char.isalpha():
            return char.lower()
    raise ValueError(f"{word!r} has no letter")


def letter_index(word: str) -> int:
    """The class of a word for the probes: 0 for a, ..., 25 for z."""
    letter = first_letter(word)
    if letter not in LETTERS:
        raise ValueError(f"{word!r} starts with {letter!r}, which is not a letter a-z")
    return LETTERS.index(letter)


def answer(word: str) -> str:
    """How a prompt's example answers: a space and the capital first letter (" C")."""
    return " " + first_letter(word).upper()


@dataclass(frozen=True)
class SpellingPrompt:
    """One prompt: `text` asks for the first letter of `word`; `letter` is the answer (a-z)."""

    text: str
    word: str
    letter: str


def icl_prompt(
    word: str,
    examples: Sequence[str],
    template: str,
    rng: random.Random,
    max_examples: int = MAX_ICL_EXAMPLES,
) -> SpellingPrompt:
    """A prompt for `word` with up to `max_examples` answered examples drawn from `examples`
    (never the word itself), each on its own line, the question last."""
    if "{word}" not in template:
        raise ValueError(f"prompt_template {template!r} has no {{word}} placeholder")
    pool = list(examples)
    chosen = rng.sample(pool, min(max_examples, len(pool)))
    # Redraw while the word is among its own examples; a small pool that always holds it
    # falls back to drawing from the pool without it.
    for _ in range(MAX_DRAWS):
        if word not in chosen:
            break
        chosen = rng.sample(pool, min(max_examples, len(pool)))
    if word in chosen:
        pool = [ex for ex in pool if ex != word]
        chosen = rng.sample(pool, min(max_examples, len(pool)))
    lines = [template.format(word=ex) + answer(ex) for ex in chosen]
    lines.append(template.format(word=word))
    text = EXAMPLE_SEPARATOR + EXAMPLE_SEPARATOR.join(lines)
    return SpellingPrompt(text, word, first_letter(word))


@dataclass(frozen=True)
class WordSplit:
    """The vocabulary split for the probes, with one prompt per word.

    train / test: the probe's training and test prompts (examples drawn from the same split);
    absorption: a second prompt for each test word, its examples drawn from the whole
    vocabulary, on which absorption is measured (SAEBench's calculator builds these anew)."""

    train: list[SpellingPrompt]
    test: list[SpellingPrompt]
    absorption: list[SpellingPrompt]


def split_words(words: Sequence[str], template: str, seed: int) -> WordSplit:
    """Shuffle `words`, keep `TRAIN_FRACTION` for training, and build every prompt, all from
    one seeded generator (the same seed gives the same prompts)."""
    if len(words) < 2:
        raise ValueError(f"the vocabulary has {len(words)} alphabetic words; need at least 2")
    rng = random.Random(seed)
    shuffled = rng.sample(list(words), len(words))
    cut = int(len(shuffled) * TRAIN_FRACTION)
    train_words, test_words = shuffled[:cut], shuffled[cut:]
    if not train_words or not test_words:
        raise ValueError(f"{len(words)} words are too few to split into train and test")
    train = [icl_prompt(w, train_words, template, rng) for w in train_words]
    test = [icl_prompt(w, test_words, template, rng) for w in test_words]
    absorption = [icl_prompt(w, shuffled, template, rng) for w in test_words]
    return WordSplit(train, test, absorption)
