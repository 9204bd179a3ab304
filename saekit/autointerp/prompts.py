"""The prompts: contexts as marked text, the explainer's request, the scorers' requests, and
the parsing of their answers.

Contexts are shown as their text with the tokens where the latent fires marked
`<<like this>>` (a run of marked tokens inside one pair of marks), newlines as `↵`, one
context a line. Prompts are chat messages ({"role": ..., "content": ...}) that any chat model
reads; their wording is versioned by `PROMPT_VERSION` (config.py).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from saekit.autointerp.contexts import Context, ContextSplit

Messages = list[dict[str, str]]
#: Token id -> its text as shown in a prompt.
Decoder = Callable[[int], str]

OPEN, CLOSE = "<<", ">>"
#: Strengths listed per context in the explainer's prompt (the rest are left out).
MAX_STRENGTHS = 8
#: An explanation longer than this is cut (a model that ignored "one sentence").
MAX_EXPLANATION_CHARS = 300


class TokenText:
    """Decodes one token at a time, remembering each, and makes the text safe to mark: a
    newline shows as `↵` (one context a line) and text that looks like a mark is changed."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._known: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        text = self._known.get(token)
        if text is None:
            text = clean_piece(self.tokenizer.decode([token]))
            self._known[token] = text
        return text


def clean_piece(text: str) -> str:
    """A token's text made safe to show between marks."""
    return (
        text.replace("\r\n", "↵").replace("\n", "↵").replace("\r", "↵")
        .replace(OPEN, "‹‹").replace(CLOSE, "››")
    )


def mapping_decoder(table: Mapping[int, str]) -> Decoder:
    """A decoder from a {token id: text} table (the texts are cleaned as TokenText does)."""
    return lambda token: clean_piece(table[token])


def render(pieces: Sequence[str], marked: Sequence[bool]) -> str:
    """The text of `pieces` with each run of marked pieces inside one pair of marks."""
    out: list[str] = []
    inside = False
    for piece, mark in zip(pieces, marked, strict=True):
        if mark and not inside:
            out.append(OPEN)
        elif not mark and inside:
            out.append(CLOSE)
        inside = mark
        out.append(piece)
    if inside:
        out.append(CLOSE)
    return "".join(out)


def marked_text(ctx: Context, decode: Decoder, marked: Sequence[bool]) -> str:
    return render([decode(t) for t in ctx.tokens], marked)


# ----- the explainer ------------------------------------------------------------------------

EXPLAINER_SYSTEM = """\
You are helping to interpret a neural network. A latent of a sparse autoencoder trained on a \
language model's internal activations responds to some pattern in text: a particular token, \
a word or part of a word, a phrase, a grammatical role, or a topic.

You will see short excerpts of text on which the latent is active. In each excerpt the \
tokens where it is active are marked <<like this>>; after each excerpt, its strength on the \
marked tokens is given on a scale from 1 to 10 (10 is the strongest seen). The first \
excerpts are the ones where it is most active; the rest are drawn from across its range of \
activations, weakest first.

Say in one short sentence, 15 words at most, what the latent responds to. Be specific: name \
the tokens it fires on and the contexts that matter. Good answers look like: 'the suffix \
"est" of superlative adjectives'; 'names of cities after "in" or "at"'; 'the first word \
after an opening quotation mark'; 'words about the sea and sailing'. Do not mention the \
<< >> marks, do not list alternatives, do not explain your reasoning at length.

End your answer with one line of the form
Explanation: <your sentence>"""


def strengths(ctx: Context, decode: Decoder, marked: Sequence[bool], scale: float) -> str:
    """`"moon" 9, " the" 6`: the marked tokens with their activation on a 1-10 scale."""
    items = []
    for token, act, mark in zip(ctx.tokens, ctx.acts, marked, strict=True):
        if mark and len(items) < MAX_STRENGTHS:
            level = max(1, min(10, math.ceil(10 * act / scale))) if scale > 0 else 1
            items.append(f'"{decode(token)}" {level}')
    return ", ".join(items)


def explainer_messages(
    split: ContextSplit, decode: Decoder, threshold: float, max_act: float
) -> Messages:
    """The explainer's prompt for one latent: its top contexts, then its quantile bands.

    `max_act` is the latent's largest activation (10 on the strength scale)."""
    lines = ["Excerpts where the latent is most active:"]
    number = 0
    for ctx in split.top:
        number += 1
        lines.append(_explainer_line(number, ctx, decode, threshold, max_act))
    sampled = [ctx for band in split.bands for ctx in band]
    if sampled:
        lines += ["", "Excerpts from across its range of activations, weakest first:"]
        for ctx in sampled:
            number += 1
            lines.append(_explainer_line(number, ctx, decode, threshold, max_act))
    return [
        {"role": "system", "content": EXPLAINER_SYSTEM},
        {"role": "user", "content": "\n".join(lines)},
    ]


def _explainer_line(
    number: int, ctx: Context, decode: Decoder, threshold: float, max_act: float
) -> str:
    marked = ctx.marked(threshold)
    text = marked_text(ctx, decode, marked)
    return f"{number}. {text}   (strength: {strengths(ctx, decode, marked, max_act)})"


_EXPLANATION = re.compile(r"^\W*explanation\W*:\s*(.*)$", re.IGNORECASE)


def parse_explanation(answer: str) -> str:
    """The one-line explanation in an explainer's answer: the text after the last
    `Explanation:`, else the last non-empty line; markdown emphasis at its ends and quotes
    around the whole of it are trimmed."""
    lines = [line.strip() for line in answer.strip().splitlines() if line.strip()]
    found = ""
    for line in lines:
        match = _EXPLANATION.match(line)
        if match and match.group(1).strip():
            found = match.group(1)
    if not found and lines:
        found = lines[-1]
    # Markdown emphasis around it means nothing; quotes around all of it neither.
    found = " ".join(found.split()).strip(" *_`")
    if len(found) >= 2 and found[0] == found[-1] and found[0] in "\"'":
        found = found[1:-1].strip()
    if len(found) > MAX_EXPLANATION_CHARS:
        found = found[:MAX_EXPLANATION_CHARS].rsplit(" ", 1)[0] + " ..."
    return found


# ----- the scorers --------------------------------------------------------------------------

DETECTION_SYSTEM = """\
You are testing a description of a latent of a language model. You will be given the \
description and numbered excerpts of text. The latent is active somewhere in some of the \
excerpts and nowhere in the others. Judging only by the description, decide for each \
excerpt whether the latent is active anywhere in it.

Answer with a list of 0s and 1s, one for each excerpt in order: 1 if the latent is active \
in it, 0 if not. For example, for five excerpts: [0, 1, 1, 0, 0]. Answer with the list only."""

FUZZING_SYSTEM = """\
You are testing a description of a latent of a language model. You will be given the \
description and numbered excerpts of text in which some tokens are marked <<like this>>. \
In some excerpts the marks are right: they are on tokens where the latent is active. In \
others they are wrong. Judging only by the description, decide for each excerpt whether \
every marked token is one the latent is active on.

Answer with a list of 0s and 1s, one for each excerpt in order: 1 if all marks are right, \
0 if any is wrong. For example, for five excerpts: [1, 0, 0, 1, 1]. Answer with the list \
only."""

SCORER_SYSTEMS = {"detection": DETECTION_SYSTEM, "fuzzing": FUZZING_SYSTEM}


def scorer_messages(scorer: str, explanation: str, texts: Sequence[str]) -> Messages:
    """A scorer's prompt: the explanation and the excerpts, numbered from 1."""
    excerpts = "\n".join(f"{i}. {text}" for i, text in enumerate(texts, start=1))
    return [
        {"role": "system", "content": SCORER_SYSTEMS[scorer]},
        {"role": "user", "content": f"Description: {explanation}\n\nExcerpts:\n{excerpts}"},
    ]


_TRUE = {"1", "true", "yes", "y"}
_FALSE = {"0", "false", "no", "n"}


def parse_labels(answer: str, n: int) -> list[bool] | None:
    """The `n` labels in a scorer's answer (`[1, 0, 1]`, `1,0,1`, `true false true`), or
    None when the answer does not hold exactly `n` of them."""
    bracket = re.search(r"\[([^\[\]]*)\]", answer)
    body = bracket.group(1) if bracket else answer
    words = [w for w in re.split(r"[\s,;]+", body.strip().lower()) if w]
    if bracket is None:  # bare labels inside prose: only unmistakable ones count
        words = [w.strip(".") for w in words if w.strip(".") in ("0", "1", "true", "false")]
    if len(words) != n or any(w not in _TRUE | _FALSE for w in words):
        return None
    return [w in _TRUE for w in words]
