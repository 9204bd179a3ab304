"""log.jsonl: one JSON line of training metrics per logging step, kept consistent on resume."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LOG_FILE = "log.jsonl"


class RunLog:
    """Appends records to `run_dir/log.jsonl`; does nothing when there is no run folder."""

    def __init__(self, run_dir: Path | None, multi: bool = False) -> None:
        self.path = None if run_dir is None else Path(run_dir) / LOG_FILE
        self.multi = multi

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")

    def truncate_after(self, tokens: int) -> None:
        """Drop lines logged after `tokens`: a resumed run logs those steps again."""
        if self.path is None or not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash
                continue
            if record.get("tokens", 0) <= tokens:
                kept.append(line)
        self.path.write_text("".join(line + "\n" for line in kept))


def read_log(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every record of a run's log.jsonl."""
    path = Path(run_dir) / LOG_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
