"""The evaluation suite: core plus the downstream evaluations, run over several SAEs at once.

Activations are computed once per model, site and dataset (`EvalData`) and shared by every
evaluation and every SAE that reads that site. Results are `EvalResult`s, written per SAE
and per evaluation in SAEBench's layout (`<out>/<eval type>/<sae>_eval_results.json`, as SAEBench
writes under its `eval_results/`),
with one PNG per evaluation and a side-by-side table.
"""

from __future__ import annotations

import importlib
import logging
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

    def load(self) -> tuple[Callable[..., list[EvalResult]], type, Callable[..., Path], tuple]:
        mod = importlib.import_module(self.module)
        return (
            getattr(mod, self.run),
            getattr(mod, self.config),
            getattr(mod, self.plot),
            mod.HEADLINE,
        )


#: The downstream evaluations, by the name `--suite` takes (core is run apart: it shares the
#: held-out pass that computes today's metrics).
DOWNSTREAM: dict[str, EvalSpec] = {
    spec.name: spec
    for spec in (
        EvalSpec("sparse_probing", "saekit.evals.probing", "run_sparse_probing",
                 "SparseProbingConfig", "plot_sparse_probing"),
        EvalSpec("scr", "saekit.evals.scr_tpp", "run_scr", "ScrConfig", "plot_scr"),
        EvalSpec("tpp", "saekit.evals.scr_tpp", "run_tpp", "TppConfig", "plot_tpp"),
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
        raise ValueError(
            f"unknown evaluation {', '.join(map(repr, unknown)) or '(none given)'}; "
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
            results = run([saes[i] for i in members], data, config)
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
    """A side-by-side table: a row per SAE, a column per headline metric of each evaluation."""
    names = list(dict.fromkeys(name for per_sae in results for name in per_sae))
    columns = [(name, metric) for name in names for metric in headline(name)]
    header = ["sae", *(f"{name}:{metric.split('.', 1)[1]}" for name, metric in columns)]
    rows = [header]
    for label, per_sae in zip(labels, results, strict=True):
        row = [label]
        for name, metric in columns:
            value = per_sae[name].metric(metric) if name in per_sae else None
            row.append("-" if value is None else f"{value:.4g}")
        rows.append(row)
    widths = [max(len(r[c]) for r in rows) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(lines)


def with_fields(config: Any, **values: Any) -> Any:
    """A copy of a config dataclass with the given fields set (None values skipped)."""
    return replace(config, **{k: v for k, v in values.items() if v is not None})
