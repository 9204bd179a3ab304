"""`evaluate`, `evaluate_many` and `make_evaluator`: the evaluation entry points.

They resolve the model (from the SAE's metadata when not given) and the held-out tokens (the
bundled corpus's held-out works when no dataset is given), then run `evaluate_saes`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from saekit.evals.core import CoreConfig, core_result
from saekit.evals.metrics import EvalMetrics
from saekit.evals.results import SuiteResult
from saekit.evals.runner import evaluate_saes
from saekit.evals.suite import parse_suite, run_downstream
from saekit.models.backend import ModelBackend
from saekit.models.positions import check_context_size
from saekit.saes.base import SAE
from saekit.sites import SAESite, check_one_site, sae_site
from saekit.targets import resolve_model

logger = logging.getLogger(__name__)

#: Evaluation tokens when none are asked for: enough for stable CE figures on a CPU.
DEFAULT_EVAL_TOKENS = 65_536
#: Sequence length when neither the caller nor the SAE's metadata gives one.
DEFAULT_CONTEXT_SIZE = 128


def heldout_token_batches(
    tokenizer: Any,
    n_tokens: int = DEFAULT_EVAL_TOKENS,
    *,
    dataset: Any = None,
    context_size: int = DEFAULT_CONTEXT_SIZE,
    batch_size: int = 8,
    prepend_bos: bool | None = True,
    split: str = "train",
) -> list[Tensor]:
    """Token batches [batch_size, context_size] covering about `n_tokens` tokens.

    `dataset` is anything `saekit.data` reads (path, Hub name, Dataset, list of texts); None
    means the bundled corpus's held-out works, which no bundled model or SAE trained on.
    """
    from saekit.data.tokens import TokenWindows, window_batches

    if n_tokens <= 0:
        raise ValueError(f"tokens must be positive, got {n_tokens}")
    if dataset is None:
        from saekit.assets.corpus import heldout_texts

        dataset = heldout_texts()
    windows = TokenWindows(dataset, tokenizer, context_size, prepend_bos=prepend_bos, split=split)
    return window_batches(windows, n_tokens, batch_size)


def _eval_dataset(dataset: Any, split: str | None, meta: Any) -> tuple[Any, str]:
    """The text and split to evaluate on when the caller named no split (see `evaluate`)."""
    if dataset is None or split is not None:
        return dataset, split or "train"
    from saekit.data.heldout import heldout_rows, same_source
    from saekit.data.text import heldout_split, load_text_dataset

    found = heldout_split(dataset)
    if found is not None:
        return dataset, found
    if not same_source(dataset, meta.dataset_path):
        return dataset, "train"
    n_heldout = meta.extra.get("heldout_documents")
    if isinstance(n_heldout, int) and n_heldout > 0:
        return heldout_rows(load_text_dataset(dataset), limit=n_heldout), "train"
    logger.warning(
        "%s is the SAE's training data and has no test or validation split: these metrics "
        "are measured on text it was trained on; pass held-out text instead",
        dataset,
    )
    return dataset, "train"


def downstream_possible(backend: Any, wanted: bool) -> bool:
    """Whether the CE/KL figures can be computed: they need next-token logits, which an
    encoder-only model (BERT, a T5 encoder) does not give; one line says so."""
    if wanted and not getattr(backend, "causal_lm", True):
        logger.info(
            "CE and KL figures are skipped: %s has no next-token head (not a causal LM)",
            getattr(backend, "name", "the model"),
        )
        return False
    return wanted


def evaluate_many(
    saes: Sequence[SAE],
    model: Any = None,
    dataset: Any = None,
    tokens: int = DEFAULT_EVAL_TOKENS,
    *,
    context_size: int | None = None,
    batch_size: int = 8,
    downstream: bool = True,
    prepend_bos: bool | None = None,
    split: str | None = None,
    suite: str | Sequence[str] | None = None,
    configs: Mapping[str, Any] | None = None,
) -> list[Any]:
    """Evaluate SAEs of one model in a single pass over the held-out tokens.

    Arguments as for `evaluate`; returns one `EvalMetrics` per SAE, in order (one
    `SuiteResult` per SAE when `suite` is given).
    """
    saes = list(saes)
    for sae in saes:  # before the model loads
        check_one_site(sae, "evaluate and evaluate_many take SAEs that read one hook")
    if suite is not None:
        return _evaluate_suite(
            saes, parse_suite(suite), model, dataset, tokens, configs,
            context_size=context_size, batch_size=batch_size, downstream=downstream,
            prepend_bos=prepend_bos, split=split,
        )
    if not saes:
        raise ValueError("no SAEs to evaluate")
    backend = resolve_model(saes, model)
    meta = saes[0].cfg.metadata
    context_size = context_size or meta.context_size or DEFAULT_CONTEXT_SIZE
    check_context_size(backend, context_size)
    dataset, split = _eval_dataset(dataset, split, meta)
    batches = heldout_token_batches(
        backend.tokenizer,
        tokens,
        dataset=dataset,
        context_size=context_size,
        batch_size=batch_size,
        prepend_bos=meta.window_prepend_bos if prepend_bos is None else prepend_bos,
        split=split,
    )
    downstream = downstream_possible(backend, downstream)
    return evaluate_saes(backend, saes, batches, downstream=downstream)


def evaluate(
    sae: SAE,
    model: Any = None,
    dataset: Any = None,
    tokens: int = DEFAULT_EVAL_TOKENS,
    *,
    context_size: int | None = None,
    batch_size: int = 8,
    downstream: bool = True,
    prepend_bos: bool | None = None,
    split: str | None = None,
    suite: str | Sequence[str] | None = None,
    configs: Mapping[str, Any] | None = None,
) -> Any:
    """Every standard metric of `sae` on held-out text; with `suite`, also the downstream
    evaluations.

    Args:
        sae: the SAE; its metadata names the hook it reads (and, for transcoders, writes).
            A CLT or a crosscoder, which reads several sites at once, is refused before any
            work: `evaluate_clt` and `evaluate_crosscoder` evaluate them.
        model: a `ModelBackend`, a model object or a name for `saekit.models.load_model`;
            None means the model named in the SAE's metadata (`model_name`).
        dataset: held-out text (path, Hub name, Dataset, list of strings); None means the
            bundled corpus's held-out works. Do not pass the SAE's training data.
        tokens: how many tokens to evaluate on (rounded up to whole sequences).
        context_size: sequence length; default: the SAE's metadata, else 128.
        batch_size: sequences per forward pass.
        downstream: compute the CE/KL figures (three more forward passes per batch).
        prepend_bos: start each sequence with BOS; default: the SAE's metadata, else what
            the tokenizer does (`saekit.data.tokens.sequence_framing`).
        split: dataset split; default: the dataset's test, then validation split; without
            one, the documents a saekit run held out when the dataset is the SAE's training
            data (its metadata says how many), else the whole dataset (with a warning when
            that is the SAE's training data).
        suite: the evaluations to run ("core", "sparse_probing", "scr", "tpp",
            "absorption", a comma-separated string of them, or "all"); None: the standard
            metrics only, as an `EvalMetrics`.
        configs: per-evaluation config objects by name (e.g. {"sparse_probing":
            SparseProbingConfig(k_values=[1, 5])}); missing ones take their defaults.

    Returns:
        `EvalMetrics` (`.to_dict()` gives the metrics by their standard names); with
        `suite`, a `SuiteResult`: `result["sparse_probing"]` is that evaluation's
        `EvalResult`, and `result.metrics` the `EvalMetrics` when core ran.
    """
    return evaluate_many(
        [sae],
        model,
        dataset,
        tokens,
        context_size=context_size,
        batch_size=batch_size,
        downstream=downstream,
        prepend_bos=prepend_bos,
        split=split,
        suite=suite,
        configs=configs,
    )[0]


def _evaluate_suite(
    saes: list[SAE],
    names: list[str],
    model: Any,
    dataset: Any,
    tokens: int,
    configs: Mapping[str, Any] | None,
    **options: Any,
) -> list[SuiteResult]:
    if not saes:
        raise ValueError("no SAEs to evaluate")
    backend = resolve_model(saes, model)
    out = [SuiteResult() for _ in saes]
    meta = saes[0].cfg.metadata
    if "core" in names:
        metrics = evaluate_many(saes, backend, dataset, tokens, **options)
        core_config = CoreConfig(
            model_name=str(meta.model_name or getattr(backend, "name", "")),
            dataset=str(dataset) if dataset is not None else CoreConfig.dataset,
            context_size=options["context_size"] or meta.context_size or DEFAULT_CONTEXT_SIZE,
            batch_size_prompts=options["batch_size"],
            n_eval_tokens=tokens,
            compute_kl=options["downstream"],
            compute_ce_loss=options["downstream"],
        )
        for result, sae, m in zip(out, saes, metrics, strict=True):
            result.metrics = m
            result.results["core"] = core_result(sae, m, core_config)
    others = [name for name in names if name != "core"]
    if others:
        prepend_bos = options["prepend_bos"]
        found = run_downstream(
            saes, others, backend,
            context_size=options["context_size"] or meta.context_size or DEFAULT_CONTEXT_SIZE,
            prepend_bos=meta.window_prepend_bos if prepend_bos is None else prepend_bos,
            configs=configs,
        )
        for result, per_sae in zip(out, found, strict=True):
            result.results.update(per_sae)
    return out


class Evaluator:
    """A callable that evaluates an SAE on fixed held-out token batches (see make_evaluator)."""

    def __init__(
        self,
        model: ModelBackend,
        token_batches: list[Tensor],
        downstream: bool,
        hook: str | None = None,
        hook_out: str | None = None,
        head_index: int | None = None,
    ) -> None:
        self.model = model
        self.token_batches = token_batches
        self.downstream = downstream
        self.hook, self.hook_out, self.head_index = hook, hook_out, head_index
        self.last: EvalMetrics | None = None
        """The full result of the latest call, per-latent arrays included."""

    def __call__(self, sae: SAE) -> dict[str, Any]:
        check_one_site(sae, "make_evaluator's evaluator takes SAEs that read one hook")
        site = sae_site(sae, self.hook, self.hook_out)
        if self.head_index is not None:
            site = SAESite(site.hook_in, site.hook_out, self.head_index)
        was_training = sae.training
        sae.eval()
        try:
            (self.last,) = evaluate_saes(
                self.model, [sae], self.token_batches, downstream=self.downstream, sites=[site]
            )
        finally:
            sae.train(was_training)
        return self.last.to_dict()


def make_evaluator(
    model: Any,
    token_batches: Tensor | Iterable[Tensor],
    *,
    batch_size: int = 8,
    downstream: bool = True,
    hook: str | None = None,
    hook_out: str | None = None,
    head_index: int | None = None,
) -> Evaluator:
    """An evaluator for the trainer: `evaluator(sae) -> {metric name: value}`.

    Each call evaluates the SAE on the same held-out tokens and returns `EvalMetrics.to_dict()`
    (l0, l1, mse, explained_variance, cos_sim, l2_ratio, relative_reconstruction_bias, the
    CE and KL figures, dead_fraction, dense_fraction, n_tokens); the full result, with the
    per-latent arrays, stays in `evaluator.last`.

    Args:
        model: a `ModelBackend` or anything `saekit.models.load_model` accepts.
        token_batches: held-out tokens: a [n, pos] tensor (split into batches of
            `batch_size`) or an iterable of [batch, pos] tensors (read once and kept).
        downstream: compute the CE/KL figures too.
        hook, hook_out, head_index: where the SAE sits; None means its metadata.

    The SAE must take the model's raw activations: fold any training-time input scale into
    it first (`SAE.fold_activation_norm_scaling_factor`).
    """
    from saekit.models import load_model

    backend = load_model(model)
    if isinstance(token_batches, Tensor):
        if token_batches.ndim != 2:
            raise ValueError(
                f"token_batches as one tensor must be [n, pos], got {tuple(token_batches.shape)}"
            )
        batches = list(token_batches.split(batch_size))
    else:
        batches = [torch.as_tensor(t) for t in token_batches]
    if not batches:
        raise ValueError("make_evaluator needs at least one token batch")
    downstream = downstream_possible(backend, downstream)
    return Evaluator(backend, batches, downstream, hook, hook_out, head_index)


def metrics_table(results: Mapping[str, EvalMetrics]) -> list[dict[str, Any]]:
    """One row per SAE name: the name followed by its scalar metrics (for CSV files)."""
    return [{"sae": name, **metrics.to_dict()} for name, metrics in results.items()]
