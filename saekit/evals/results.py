"""One evaluation's result for one SAE, written in SAEBench's result layout.

SAEBench's eval output schema (`BaseEvalOutput`) has: `eval_type_id`, `eval_config`,
`eval_id`, `datetime_epoch_millis`, `eval_result_metrics` (categories of flat metrics),
`eval_result_details` (a list of records), `sae_bench_commit_hash`, `sae_lens_id`,
`sae_lens_release_id`, `sae_lens_version`, `sae_cfg_dict` and `eval_result_unstructured`.
Files in that layout load into the notebooks and scripts people use to plot SAEBench results.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from saekit.evals.metrics import EvalMetrics
    from saekit.saes.base import SAE

#: Every top-level field of SAEBench's eval output schema, in its order.
SAEBENCH_FIELDS: tuple[str, ...] = (
    "eval_type_id",
    "eval_config",
    "eval_id",
    "datetime_epoch_millis",
    "eval_result_metrics",
    "eval_result_details",
    "sae_bench_commit_hash",
    "sae_lens_id",
    "sae_lens_release_id",
    "sae_lens_version",
    "sae_cfg_dict",
    "eval_result_unstructured",
)

Metric = float | int | None


@dataclass
class EvalResult:
    """What one evaluation found for one SAE.

    `metrics` maps a category name to flat metrics (no nesting, as SAEBench requires);
    `details` holds the per-task, per-letter or per-latent records."""

    eval_type_id: str
    eval_config: dict[str, Any]
    metrics: dict[str, dict[str, Metric]]
    details: list[dict[str, Any]] = field(default_factory=list)
    unstructured: Any = None

    def __post_init__(self) -> None:
        for category, values in self.metrics.items():
            for name, value in values.items():
                if isinstance(value, (dict, list, tuple)):
                    raise ValueError(
                        f"metric {category}.{name} is a {type(value).__name__}; metrics are "
                        "flat numbers (put structured results in details)"
                    )

    def metric(self, dotted: str) -> Metric:
        """A metric by `category.name`."""
        category, name = dotted.split(".", 1)
        return self.metrics[category][name]


@dataclass
class SuiteResult:
    """One SAE's results from a suite run: evaluation name -> `EvalResult`, and, when core
    ran, its full `EvalMetrics` (with the per-latent arrays)."""

    results: dict[str, EvalResult] = field(default_factory=dict)
    metrics: EvalMetrics | None = None

    def __getitem__(self, name: str) -> EvalResult:
        return self.results[name]

    def __contains__(self, name: object) -> bool:
        return name in self.results

    def names(self) -> list[str]:
        return list(self.results)


def saebench_record(result: EvalResult, sae: SAE, sae_id: str | None = None) -> dict[str, Any]:
    """The SAEBench output record of `result` for `sae` (JSON-ready: NaN becomes null)."""
    meta = sae.cfg.metadata
    record = {
        "eval_type_id": result.eval_type_id,
        "eval_config": result.eval_config,
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": result.metrics,
        "eval_result_details": result.details,
        # The schema names the code that ran the evaluation; we record ours.
        "sae_bench_commit_hash": f"saekit-{_saekit_version()}",
        "sae_lens_id": sae_id if sae_id is not None else getattr(meta, "sae_lens_id", None),
        "sae_lens_release_id": getattr(meta, "sae_lens_release_id", None),
        "sae_lens_version": None,
        "sae_cfg_dict": sae.cfg.to_dict(),
        "eval_result_unstructured": result.unstructured,
    }
    return _json_ready(record)


def write_saebench_json(
    result: EvalResult, sae: SAE, path: str | Path, sae_id: str | None = None
) -> Path:
    """Write `result` as one SAEBench result file; returns its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(saebench_record(result, sae, sae_id), indent=2, allow_nan=False)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + "\n", encoding="utf-8")
    tmp.replace(path)  # never a half-written result file
    return path


def _saekit_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("saekit")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _json_ready(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        value = value.item()  # numpy / torch scalars
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)
