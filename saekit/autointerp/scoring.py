"""Detection and fuzzing: the samples a scorer is shown, and the arithmetic of its scores.

Detection: activating test contexts and non-activating contexts, unmarked; the scorer says
which are activating. Fuzzing: the activating test contexts with their firing tokens marked
(right), mixed with contexts whose marks are wrong; the scorer says which are right. In
`inactive` mode the wrong ones are non-activating contexts with as many random tokens marked
as the right ones have on average (rounded up); in `active` mode they are the activating
test contexts with that many tokens that do not fire marked.

Scores per latent, from the confusion counts of the answers that could be read (TP, TN, FP,
FN; an unreadable answer counts as `failed`, not as wrong):
balanced accuracy = (TP / (TP + FN) + TN / (TN + FP)) / 2, over the classes present;
precision = TP / (TP + FP), recall = TP / (TP + FN), F1 = 2 P R / (P + R), each 0 when its
denominator is 0.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

from saekit.autointerp.config import AutointerpConfig
from saekit.autointerp.contexts import Context
from saekit.autointerp.prompts import Decoder, marked_text

SCORERS = ("detection", "fuzzing")


@dataclass(frozen=True)
class Sample:
    """One excerpt as a scorer sees it, and the answer that would be right."""

    text: str
    activating: bool


def detection_samples(
    test: Sequence[Context], negatives: Sequence[Context], decode: Decoder
) -> list[Sample]:
    """Unmarked text of the activating test contexts (True) and the negatives (False)."""
    return [
        Sample(marked_text(c, decode, [False] * len(c.tokens)), activating)
        for contexts, activating in ((test, True), (negatives, False))
        for c in contexts
    ]


def n_wrong_marks(test: Sequence[Context], threshold: float) -> int:
    """Tokens marked in a wrongly marked sample: the mean count of right marks, rounded up."""
    if not test:
        return 0
    return math.ceil(sum(sum(c.marked(threshold)) for c in test) / len(test))


def fuzzing_samples(
    test: Sequence[Context],
    negatives: Sequence[Context],
    decode: Decoder,
    cfg: AutointerpConfig,
    rng: random.Random,
) -> list[Sample]:
    """Rightly marked test contexts (True) and wrongly marked contexts (False), as the
    module docstring says."""
    right = [Sample(marked_text(c, decode, c.marked(cfg.mark_threshold)), True) for c in test]
    n_marks = n_wrong_marks(test, cfg.mark_threshold)
    wrong = []
    sources = negatives if cfg.fuzz_mode == "inactive" else test
    for ctx in sources:
        firing = ctx.marked(cfg.mark_threshold)
        candidates = [i for i, fires in enumerate(firing) if not fires]
        if not candidates or n_marks == 0:
            continue
        chosen = set(rng.sample(candidates, min(n_marks, len(candidates))))
        marks = [i in chosen for i in range(len(ctx.tokens))]
        wrong.append(Sample(marked_text(ctx, decode, marks), False))
    return right + wrong


def in_prompts(samples: Sequence[Sample], size: int) -> list[list[Sample]]:
    """The samples in groups of `size`, one group a scorer call."""
    return [list(samples[i:i + size]) for i in range(0, len(samples), size)]


def classification_scores(
    truth: Sequence[bool], predicted: Sequence[bool | None]
) -> dict[str, float]:
    """balanced_accuracy, f1, precision, recall, plus the counts n (answers read) and
    failed (answers that could not be read); see the module docstring. With no answer read
    the four scores are NaN (and left out of the record)."""
    if len(truth) != len(predicted):
        raise ValueError(f"{len(truth)} labels but {len(predicted)} predictions")
    pairs = [(t, p) for t, p in zip(truth, predicted, strict=True) if p is not None]
    tp = sum(t and p for t, p in pairs)
    tn = sum(not t and not p for t, p in pairs)
    fp = sum(not t and p for t, p in pairs)
    fn = sum(t and not p for t, p in pairs)
    rates = []
    if tp + fn:
        rates.append(tp / (tp + fn))
    if tn + fp:
        rates.append(tn / (tn + fp))
    if not pairs:  # nothing was read: no score at all, rather than zeros
        precision = recall = f1 = math.nan
    else:
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "balanced_accuracy": sum(rates) / len(rates) if rates else math.nan,
        "f1": f1,
        "precision": precision,
        "recall": recall,
        "n": float(len(pairs)),
        "failed": float(len(truth) - len(pairs)),
    }
