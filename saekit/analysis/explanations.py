"""`explanations.jsonl`: one line per explained latent, shared by auto-interpretation (which
writes it), the dashboard and the Neuronpedia export (which read it).

A line: {"latent": 12, "explanation": "...", "scores": {"detection": {"balanced_accuracy":
0.8, "f1": 0.7}, "fuzzing": {...}}, "explainer_model": "...", "scorer_model": "...",
"prompt_version": "..."}. `scores` may be empty (explained, not yet scored).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

EXPLANATIONS_FILE = "explanations.jsonl"


@dataclass
class Explanation:
    """One latent's explanation and the scores it earned."""

    latent: int
    explanation: str
    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    """{scorer name: {metric: value}}, e.g. {"detection": {"balanced_accuracy": 0.8}}."""
    explainer_model: str = ""
    scorer_model: str = ""
    prompt_version: str = ""

    def score(self, scorer: str = "detection", metric: str = "balanced_accuracy") -> float:
        """One score, NaN when that scorer has not run (so sorting puts it last)."""
        return float(self.scores.get(scorer, {}).get(metric, math.nan))

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)


def explanations_path(folder_or_file: str | Path) -> Path:
    """The explanations file itself, or `explanations.jsonl` inside a folder."""
    path = Path(folder_or_file)
    return path / EXPLANATIONS_FILE if path.is_dir() else path


def read_explanations(folder_or_file: str | Path) -> dict[int, Explanation]:
    """{latent: Explanation} from a file or a folder holding one; {} when there is none.

    A later line for the same latent replaces an earlier one, so appending is how a result
    is updated. A torn last line (a run killed mid-write) is skipped; any other bad line is
    an error that names the file and the line.
    """
    path = explanations_path(folder_or_file)
    if not path.is_file():
        return {}
    lines = path.read_text(encoding="utf-8").splitlines()
    found: dict[int, Explanation] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            item = Explanation(
                latent=int(record["latent"]),
                explanation=str(record["explanation"]),
                scores={str(k): {str(m): float(v) for m, v in s.items()}
                        for k, s in (record.get("scores") or {}).items()},
                explainer_model=str(record.get("explainer_model", "")),
                scorer_model=str(record.get("scorer_model", "")),
                prompt_version=str(record.get("prompt_version", "")),
            )
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            if number == len(lines):
                break
            raise ValueError(
                f"{path}:{number} is not an explanation record ({err}); fix or delete that line"
            ) from err
        found[item.latent] = item
    return found


def append_explanations(folder_or_file: str | Path, items: Iterable[Explanation]) -> Path:
    """Append records (one line each, flushed) so that an interrupted run keeps its work."""
    path = explanations_path(folder_or_file)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        for item in items:
            handle.write(item.to_json() + "\n")
            handle.flush()
    return path


def explanation_table(items: Mapping[int, Explanation]) -> list[dict[str, object]]:
    """Rows for tables and exports: latent, explanation and every score as `scorer.metric`."""
    rows = []
    for latent in sorted(items):
        item = items[latent]
        row: dict[str, object] = {"latent": latent, "explanation": item.explanation}
        for scorer, metrics in item.scores.items():
            for metric, value in metrics.items():
                row[f"{scorer}.{metric}"] = value
        rows.append(row)
    return rows
