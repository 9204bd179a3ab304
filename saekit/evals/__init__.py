"""Evaluation: every standard SAE metric on held-out tokens, streamed in float64.

`evaluate` / `evaluate_many` for users, `make_evaluator` for the trainer, `evaluate_saes` for
callers who bring their own backend and token batches.
"""

from saekit.evals.api import (
    Evaluator,
    evaluate,
    evaluate_many,
    heldout_token_batches,
    make_evaluator,
)
from saekit.evals.metrics import METRIC_NAMES, EvalMetrics
from saekit.evals.runner import evaluate_saes
from saekit.sites import SAESite, sae_site

__all__ = [
    "METRIC_NAMES",
    "EvalMetrics",
    "Evaluator",
    "SAESite",
    "evaluate",
    "evaluate_many",
    "evaluate_saes",
    "heldout_token_batches",
    "make_evaluator",
    "sae_site",
]
