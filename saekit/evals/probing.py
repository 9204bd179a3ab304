"""Sparse probing, as SAEBench defines it: how well do k SAE latents alone tell classes apart?

For each binary task of each dataset (see `probe_data`), activations are mean-pooled over each
text's own tokens. The baselines are logistic probes on the model's pooled activations: on
all of them (`llm_test_accuracy`) and on the k dimensions whose class means differ most
(`llm_top_k_test_accuracy`). For the SAE, every token is encoded, the latents are pooled the
same way, the k latents whose class means (on the training split) differ most are kept, and a
logistic probe on those k gives `sae_top_k_test_accuracy`; a probe on all latents gives
`sae_test_accuracy`. Accuracies are averaged over a dataset's tasks, then over datasets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from saekit.evals.context import EvalData
from saekit.evals.plots import png_figure
from saekit.evals.probe_data import ProbeDataset, ProbeTask, resolve_probe_datasets
from saekit.evals.probes import pooled_latents, probe_task_accuracy, top_k_mean_diff
from saekit.evals.results import EvalResult
from saekit.progress import bar
from saekit.saes.base import SAE

EVAL_TYPE = "sparse_probing"

#: The k of SAEBench's schema: results carry a metric for each (None when not run).
SCHEMA_K_VALUES: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100)

#: What a side-by-side table shows for sparse probing.
HEADLINE: tuple[str, ...] = (
    "llm.llm_test_accuracy",
    "sae.sae_top_1_test_accuracy",
    "sae.sae_top_5_test_accuracy",
    "sae.sae_top_20_test_accuracy",
)


@dataclass
class SparseProbingConfig:
    """Settings of a sparse-probing run, with SAEBench's names."""

    random_seed: int = 42
    """Seed of the probes' data sampling (which negatives a one-vs-rest task takes)."""
    dataset_names: list[str] = field(default_factory=lambda: ["author", "genre", "folio"])
    """Built-in dataset names (author, genre, folio, genre_period) or paths / Hub names of
    labelled datasets (see `probe_data.load_probe_dataset`)."""
    probe_train_set_size: int = 4000
    """Most training texts of one task (both classes together)."""
    probe_test_set_size: int = 1000
    """Most test texts of one task."""
    context_length: int | None = None
    """Tokens per text; None: the EvalData's context size (recorded as such)."""
    sae_batch_size: int = 125
    """Texts encoded by the SAE at once."""
    model_name: str = ""
    """The model's name, for the record; "": the backend's name."""
    k_values: list[int] = field(default_factory=lambda: [1, 2, 5, 10, 20, 50])
    """The numbers of latents (or model dimensions) the sparse probes read."""
    text_column: str | None = None
    """Text column of user datasets (default: found by name)."""
    label_columns: list[str] | None = None
    """One or two label columns of user datasets (default: "label" etc.)."""

    def __post_init__(self) -> None:
        if not self.k_values or any(int(k) < 1 for k in self.k_values):
            raise ValueError(f"k_values must be positive integers, got {self.k_values}")
        if not self.dataset_names:
            raise ValueError("dataset_names is empty; name at least one probe dataset")
        for name in ("probe_train_set_size", "probe_test_set_size", "sae_batch_size"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be at least 2, got {getattr(self, name)}")


def run_sparse_probing(
    saes: Sequence[SAE], data: EvalData, config: SparseProbingConfig | None = None
) -> list[EvalResult]:
    """Sparse probing of each SAE on `data`'s hook; one result per SAE, in order."""
    config = config or SparseProbingConfig()
    datasets = resolve_probe_datasets(
        config.dataset_names, config.text_column, config.label_columns
    )
    eval_config = recorded_config(asdict(config), data)
    per_sae: list[dict[str, dict[str, dict[str, float]]]] = [{} for _ in saes]
    for dataset in datasets:
        acts = data.text_activations(dataset.memo_key, dataset.texts)
        tasks = _tasks(dataset, config)
        llm = data.memo(
            ("sparse_probing_llm", dataset.memo_key, config.random_seed,
             config.probe_train_set_size, config.probe_test_set_size, tuple(config.k_values)),
            lambda acts=acts, tasks=tasks: _accuracies(
                acts.mean_pooled().numpy(), tasks, config.k_values, "llm", data.progress
            ),
        )
        for i, sae in enumerate(saes):
            latents = pooled_latents(sae, acts, batch_size=config.sae_batch_size,
                                     progress=data.progress)
            sae_acc = _accuracies(latents, tasks, config.k_values, "sae", data.progress)
            per_sae[i][dataset.name] = {**llm, **sae_acc}
    names = _metric_names(config.k_values)
    return [_result(per_class, eval_config, names) for per_class in per_sae]


def _metric_names(k_values: Sequence[int]) -> list[str]:
    """The metric names of a result, in SAEBench's order: every k of its schema, then any
    other k that was run."""
    ks = [*SCHEMA_K_VALUES, *sorted({int(k) for k in k_values} - set(SCHEMA_K_VALUES))]
    return [
        f"{prefix}_{middle}test_accuracy"
        for prefix in ("llm", "sae")
        for middle in ["", *(f"top_{k}_" for k in ks)]
    ]


def recorded_config(config: dict[str, Any], data: EvalData) -> dict[str, Any]:
    """The config as recorded: the context length and model name actually used."""
    config = dict(config)
    if config.get("context_length") is None:
        config["context_length"] = data.context_size
    if not config.get("model_name"):
        config["model_name"] = str(getattr(data.backend, "name", "") or "")
    return config


def _tasks(dataset: ProbeDataset, config: SparseProbingConfig) -> list[ProbeTask]:
    tasks = []
    for column in dataset.label_columns:
        for task in dataset.binary_tasks(
            column, config.random_seed, config.probe_train_set_size, config.probe_test_set_size
        ):
            if len(dataset.label_columns) > 1:
                task = replace(task, name=f"{column}: {task.name}")
            tasks.append(task)
    return tasks


def _accuracies(
    features: np.ndarray, tasks: list[ProbeTask], k_values: Sequence[int], prefix: str,
    progress: bool | None,
) -> dict[str, dict[str, float]]:
    """{metric: {task: accuracy}}: a probe on all features (`{prefix}_test_accuracy`), then
    on the top k of each k (`{prefix}_top_{k}_test_accuracy`)."""
    full_name = f"{prefix}_test_accuracy"
    out: dict[str, dict[str, float]] = {full_name: {}}
    out.update({f"{prefix}_top_{k}_test_accuracy": {} for k in k_values})
    shown = bar(desc=f"{prefix} probes", unit="probe", total=len(tasks) * (1 + len(k_values)),
                progress=progress)
    with shown:
        for task in tasks:
            x_train, x_test = features[task.train_idx], features[task.test_idx]
            out[full_name][task.name] = probe_task_accuracy(
                x_train, task.train_y, x_test, task.test_y
            )
            shown.update(1)
            for k in k_values:
                keep = top_k_mean_diff(x_train, task.train_y, int(k))
                out[f"{prefix}_top_{k}_test_accuracy"][task.name] = probe_task_accuracy(
                    x_train[:, keep], task.train_y, x_test[:, keep], task.test_y
                )
                shown.update(1)
    return out


def _mean(values: Sequence[float]) -> float | None:
    return float(np.mean(values)) if len(values) else None


def _result(per_class: dict[str, dict[str, dict[str, float]]], eval_config: dict[str, Any],
            names: list[str]) -> EvalResult:
    """SAEBench's layout: per-dataset means of the task accuracies (details), their means over
    datasets (metrics), and every task's accuracy (unstructured). Metrics not run are None."""
    details = []
    for name, metrics in per_class.items():
        row: dict[str, Any] = {"dataset_name": f"{name}_results"}
        row.update({m: _mean(list(metrics[m].values())) if m in metrics else None for m in names})
        details.append(row)
    averaged = {m: _mean([d[m] for d in details if d[m] is not None]) for m in names}
    metrics = {
        "llm": {m: v for m, v in averaged.items() if m.startswith("llm_")},
        "sae": {m: v for m, v in averaged.items() if m.startswith("sae_")},
    }
    unstructured = {f"{name}_results": metrics for name, metrics in per_class.items()}
    return EvalResult(EVAL_TYPE, eval_config, metrics, details, unstructured)


def plot_sparse_probing(results: Mapping[str, EvalResult], path: str | Path) -> Path:
    """Mean test accuracy against k, one line per SAE, the model's top-k dimensions dashed
    and the full-activation probe dotted: one PNG."""
    with png_figure(path, figsize=(6.5, 4.2)) as (fig, ax):
        baseline = None
        for label, result in results.items():
            ks = _k_values(result.metrics["sae"], "sae")
            ax.plot(ks, [result.metrics["sae"][f"sae_top_{k}_test_accuracy"] for k in ks],
                    marker="o", label=label)
            baseline = baseline or result
        if baseline is not None:
            llm = baseline.metrics["llm"]
            ks = _k_values(llm, "llm")
            ax.plot(ks, [llm[f"llm_top_{k}_test_accuracy"] for k in ks], "k--", marker="x",
                    label="model, top-k dims")
            full = llm.get("llm_test_accuracy")
            if full is not None and not math.isnan(full):
                ax.axhline(full, color="grey", linestyle=":", label="model, all dims")
        ax.set_xscale("log")
        ax.set_xlabel("k (latents or dimensions probed)")
        ax.set_ylabel("test accuracy (mean over tasks)")
        ax.set_title("sparse probing")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return Path(path)


def _k_values(metrics: Mapping[str, Any], prefix: str) -> list[int]:
    ks = []
    for name, value in metrics.items():
        if name.startswith(f"{prefix}_top_") and value is not None:
            ks.append(int(name[len(prefix) + 5 :].split("_")[0]))
    return sorted(ks)
