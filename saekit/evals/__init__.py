"""Evaluation: every standard SAE metric on held-out tokens, streamed in float64.

`evaluate` / `evaluate_many` for users (with `suite=` for the downstream evaluations),
`make_evaluator` for the trainer, `evaluate_saes` for callers who bring their own backend and
token batches; `compare` for two dictionaries (`saekit.training.synthetic.run_synthetic`
trains SAEs on known features and scores their recovery).
"""

from saekit.evals.api import (
    Evaluator,
    evaluate,
    evaluate_many,
    heldout_token_batches,
    make_evaluator,
)
from saekit.evals.compare import Comparison, compare
from saekit.evals.ground_truth import SyntheticConfig
from saekit.evals.metrics import METRIC_NAMES, EvalMetrics
from saekit.evals.results import EvalResult, SuiteResult
from saekit.evals.runner import evaluate_saes
from saekit.evals.synthetic import SyntheticFeatures
from saekit.sites import SAESite, sae_site

__all__ = [
    "METRIC_NAMES",
    "Comparison",
    "EvalResult",
    "SuiteResult",
    "SyntheticConfig",
    "SyntheticFeatures",
    "compare",
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
