"""Text to token batches and back, framed as the model (or its SAEs) saw text in training.

The framing rule is `saekit.data.tokens.sequence_framing`: BOS first for GPT-2-style and
Llama-style tokenizers (as TransformerLens's `to_tokens` does), the tokenizer's own special
tokens for BERT-style ones, nothing for tokenizers without a BOS (Qwen).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from saekit.data.tokens import sequence_framing

PADDING_SIDES = ("right", "left")


def need_tokenizer(tokenizer: Any) -> Any:
    if tokenizer is None:
        raise ValueError(
            "this model has no tokenizer, so text cannot be tokenized; pass token ids "
            "[batch, pos] instead, or load the model with its tokenizer"
        )
    return tokenizer


def framing_for(prepend_bos: bool | None, recorded: Iterable[bool | None]) -> bool | None:
    """The `prepend_bos` to tokenize with: the caller's, else what the attached SAEs
    recorded when they all agree, else None (the tokenizer's own framing)."""
    if prepend_bos is not None:
        return prepend_bos
    values = set(recorded)
    return values.pop() if len(values) == 1 else None


def to_tokens(
    tokenizer: Any,
    text: str | Sequence[str],
    prepend_bos: bool | None = None,
    padding_side: str | None = "right",
) -> Tensor:
    """Token ids [batch, pos] for a text or a list of texts (shorter rows padded).

    `prepend_bos`: True starts each row with BOS, False adds no special token, None frames
    text as the tokenizer does (`sequence_framing`)."""
    tokenizer = need_tokenizer(tokenizer)
    padding_side = padding_side or "right"  # TransformerLens's None: the default side
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {', '.join(PADDING_SIDES)}, got "
                         f"{padding_side!r}")
    texts = [text] if isinstance(text, str) else list(text)
    if not texts or not all(isinstance(t, str) for t in texts):
        raise TypeError("to_tokens takes a string or a non-empty list of strings")
    _, prefix, suffix = sequence_framing(tokenizer, prepend_bos)
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    rows = [[*prefix, *ids, *suffix] for ids in encoded]
    width = max(len(row) for row in rows)
    if width == 0:
        raise ValueError("the text tokenizes to nothing; give some text or prepend_bos=True")
    pad = pad_token_id(tokenizer)
    out = torch.full((len(rows), width), pad, dtype=torch.long)
    for i, row in enumerate(rows):
        ids = torch.tensor(row, dtype=torch.long)
        if padding_side == "right":
            out[i, : len(row)] = ids
        else:
            out[i, width - len(row) :] = ids
    return out


def pad_token_id(tokenizer: Any) -> int:
    """The id that pads rows: the tokenizer's pad token, else EOS, else BOS, else 0."""
    for attr in ("pad_token_id", "eos_token_id", "bos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return 0


def _ids(tokens: Tensor | Sequence[int] | int) -> list[Any]:
    if isinstance(tokens, Tensor):
        return tokens.tolist()
    if isinstance(tokens, int):
        return [tokens]
    return list(tokens)


def to_string(tokenizer: Any, tokens: Tensor | Sequence[int] | Sequence[Sequence[int]]) -> Any:
    """Decoded text: a string for one row of ids [pos], a list of strings for [batch, pos]."""
    tokenizer = need_tokenizer(tokenizer)
    ids = _ids(tokens)
    if ids and isinstance(ids[0], list):
        return [tokenizer.decode(row, clean_up_tokenization_spaces=False) for row in ids]
    return tokenizer.decode(ids, clean_up_tokenization_spaces=False)


def to_str_tokens(tokenizer: Any, tokens: Tensor | Sequence[int]) -> Any:
    """Each token decoded on its own: a list of strings for [pos], a list of lists for
    [batch, pos]."""
    tokenizer = need_tokenizer(tokenizer)
    ids = _ids(tokens)
    if ids and isinstance(ids[0], list):
        return [[tokenizer.decode([t]) for t in row] for row in ids]
    return [tokenizer.decode([t]) for t in ids]
