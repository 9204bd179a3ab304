"""explanations.jsonl: the record format shared by auto-interpretation, dashboards and exports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from saekit.analysis.explanations import (
    EXPLANATIONS_FILE,
    Explanation,
    append_explanations,
    explanation_table,
    read_explanations,
)


def test_round_trip_with_later_lines_replacing_earlier(tmp_path: Path) -> None:
    first = Explanation(3, "first try", explainer_model="m", prompt_version="v1")
    better = Explanation(3, "the letter é", {"detection": {"balanced_accuracy": 0.75}})
    other = Explanation(10, "commas", {"fuzzing": {"f1": 0.5, "balanced_accuracy": 0.6}})
    append_explanations(tmp_path, [first, other])
    append_explanations(tmp_path / EXPLANATIONS_FILE, [better])

    found = read_explanations(tmp_path)
    assert found == {3: better, 10: other}
    assert found[3].score() == 0.75
    assert math.isnan(found[10].score("detection"))
    assert explanation_table(found)[1] == {
        "latent": 10, "explanation": "commas", "fuzzing.f1": 0.5, "fuzzing.balanced_accuracy": 0.6,
    }


def test_missing_file_is_empty_and_torn_last_line_is_skipped(tmp_path: Path) -> None:
    assert read_explanations(tmp_path) == {}
    path = append_explanations(tmp_path, [Explanation(1, "a")])
    with path.open("a", encoding="utf-8") as handle:
        handle.write('{"latent": 2, "explan')  # a run killed mid-write
    assert list(read_explanations(path)) == [1]


def test_a_bad_line_in_the_middle_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / EXPLANATIONS_FILE
    path.write_text(json.dumps({"latent": "x"}) + "\n" + Explanation(1, "a").to_json() + "\n")
    with pytest.raises(ValueError, match=rf"{EXPLANATIONS_FILE}:1 "):
        read_explanations(path)
