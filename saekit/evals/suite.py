"""The evaluation suite: core plus the downstream evaluations, run over several SAEs at once.

Activations are computed once per model, site and dataset (`EvalData`) and shared by every
evaluation and every SAE that reads that site. Results are `EvalResult`s, written per SAE
and per evaluation in SAEBench's layout (`<out>/<eval type>/<sae>_eval_results.json`, as SAEBench
writes under its `eval_results/`),
with one PNG per evaluation and a side-by-side table.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from saekit.evals.context import EvalData
from saekit.evals.results import EvalResult, write_saebench_json
from saekit.saes.base import SAE
from saekit.sites import sae_site

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalSpec:
    """Where an evaluation lives: its module and the names of its entry points there."""

    name: str
    module: str
    run: str
    config: str
    plot: str
    headline: str = "HEADLINE"

    def load(self) -> tuple[Callable[..., list[EvalResult]], type, Callable[..., Path], tuple]:
        mod = importlib.import_module(self.module)
        return (
            getattr(mod, self.run),
            getattr(mod, self.config),
            getattr(mod, self.plot),
            getattr(mod, self.headline),
        )


#: The downstream evaluations, by the name `--suite` takes (core is run apart: it shares the
#: held-out pass that computes today's metrics).
DOWNSTREAM: dict[str, EvalSpec] = {
    spec.name: spec
    for spec in (
        EvalSpec("sparse_probing", "saekit.evals.probing", "run_sparse_probing",
                 "SparseProbingConfig", "plot_sparse_probing"),
        EvalSpec("scr", "saekit.evals.scr_tpp", "run_scr", "ScrConfig", "plot_scr",
                 "SCR_HEADLINE"),
        EvalSpec("tpp", "saekit.evals.scr_tpp", "run_tpp", "TppConfig", "plot_tpp",
                 "TPP_HEADLINE"),
        EvalSpec("absorption", "saekit.evals.absorption", "run_absorption",
                 "AbsorptionConfig", "plot_absorption"),
    )
}
SUITE_NAMES: tuple[str, ...] = ("core", *DOWNSTREAM)


def parse_suite(suite: str | Sequence[str] | None) -> list[str]:
    """The evaluations asked for, in suite order: "core,scr", ["core", "scr"], "all"."""
    if suite is None:
        return ["core"]
    names = suite.split(",") if isinstance(suite, str) else list(suite)
    names = [n.strip().lower() for n in names if n.strip()]
    if names == ["all"]:
        return list(SUITE_NAMES)
    unknown = [n for n in names if n not in SUITE_NAMES]
    if unknown or not names:
        close = difflib.get_close_matches(unknown[0], SUITE_NAMES, n=1) if unknown else []
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise ValueError(
            f"unknown evaluation {', '.join(map(repr, unknown)) or '(none given)'}{hint}; "
            f"the suite has {', '.join(SUITE_NAMES)} (or all)"
        )
    return [n for n in SUITE_NAMES if n in names]


def run_downstream(
    saes: Sequence[SAE],
    names: Sequence[str],
    backend: Any,
    *,
    context_size: int = 128,
    prepend_bos: bool | None = None,
    configs: Mapping[str, Any] | None = None,
    progress: bool | None = None,
) -> list[dict[str, EvalResult]]:
    """Run the downstream evaluations `names` (not core) on every SAE: one dict per SAE,
    evaluation name -> result. SAEs at the same site share their activations."""
    configs = dict(configs or {})
    out: list[dict[str, EvalResult]] = [{} for _ in saes]
    groups: dict[Any, list[int]] = {}
    for i, sae in enumerate(saes):
        groups.setdefault(sae_site(sae), []).append(i)
    for site, members in groups.items():
        data = EvalData(backend, site, context_size=context_size, prepend_bos=prepend_bos,
                        progress=progress)
        for name in names:
            run, config_class, _, _ = DOWNSTREAM[name].load()
            config = configs.get(name) or config_class()
            logger.info("%s on %d SAE(s) at %s", name, len(members), site.hook_in)
            started = time.perf_counter()
            results = run([saes[i] for i in members], data, config)
            logger.info("%s done in %.0f s", name, time.perf_counter() - started)
            for i, result in zip(members, results, strict=True):
                out[i][name] = result
    return out


def headline(name: str) -> tuple[str, ...]:
    """The metrics the side-by-side table shows for evaluation `name`."""
    if name == "core":
        from saekit.evals.core import HEADLINE

        return HEADLINE
    return DOWNSTREAM[name].load()[3]


def plot(name: str, results: Mapping[str, EvalResult], path: str | Path) -> Path:
    """The evaluation's PNG comparing the SAEs in `results` (label -> result)."""
    if name == "core":
        from saekit.evals.core import plot_core

        return plot_core(results, path)
    return DOWNSTREAM[name].load()[2](results, path)


def save_suite_results(
    out: str | Path,
    saes: Sequence[SAE],
    labels: Sequence[str],
    results: Sequence[Mapping[str, EvalResult]],
) -> list[Path]:
    """Write every result in SAEBench's layout, and one PNG per evaluation; returns the
    files written."""
    out = Path(out)
    written: list[Path] = []
    names = list(dict.fromkeys(name for per_sae in results for name in per_sae))
    for sae, label, per_sae in zip(saes, labels, results, strict=True):
        for result in per_sae.values():
            folder = out / result.eval_type_id
            path = folder / f"{label}_eval_results.json"
            written.append(write_saebench_json(result, sae, path, sae_id=label))
    for name in names:
        by_label = {label: r[name] for label, r in zip(labels, results, strict=True) if name in r}
        written.append(plot(name, by_label, out / f"{name}.png"))
    return written


def suite_table(labels: Sequence[str], results: Sequence[Mapping[str, EvalResult]]) -> str:
    """Side-by-side tables, one per evaluation: a row per SAE, a column per headline
    metric."""
    names = list(dict.fromkeys(name for per_sae in results for name in per_sae))
    blocks = []
    for name in names:
        metrics = headline(name)
        rows = [[name, *(metric.split(".", 1)[1] for metric in metrics)]]
        for label, per_sae in zip(labels, results, strict=True):
            values = [per_sae[name].metric(m) if name in per_sae else None for m in metrics]
            rows.append([label, *("-" if v is None else f"{v:.4g}" for v in values)])
        widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
        blocks.append("\n".join(
            "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
            for r in rows
        ))
    return "\n\n".join(blocks)


#: The evaluations that read probing datasets (`dataset_names`, `text_column`,
#: `label_columns` in their configs).
PROBING = ("sparse_probing", "scr", "tpp")


def probing_configs(
    names: Sequence[str],
    datasets: Sequence[str] | None = None,
    text_column: str | None = None,
    label_columns: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Configs for the probing evaluations among `names` that read `datasets` (built-in
    names or user files / Hub datasets) instead of their defaults."""
    if not datasets and (text_column or label_columns):
        raise ValueError(
            "--text-column / --label-column describe a --probe-dataset; name the dataset too"
        )
    configs: dict[str, Any] = {}
    for name in names:
        if name not in PROBING or not datasets:
            continue
        config_class = DOWNSTREAM[name].load()[1]
        configs[name] = replace(
            config_class(), dataset_names=list(datasets), text_column=text_column,
            label_columns=list(label_columns) if label_columns else None,
        )
    return configs
