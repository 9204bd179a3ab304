"""`saekit synthetic`: trains, writes loadable SAEs, the results file in SAEBench's layout, the
plot and the ground truth; prints the table; shows progress; bad values are one error line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from saekit import SAE
from saekit.cli import main
from saekit.evals.results import SAEBENCH_FIELDS
from saekit.evals.synthetic import SyntheticFeatures

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--d", "16", "--features", "16", "--directions", "orthogonal", "--tokens", "10240",
        "--batch-size", "256", "--eval-samples", "2000", "--lr", "3e-3", "--d-sae", "32"]


def test_trains_scores_and_writes_everything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(["synthetic", "--architecture", "topk,standard", *TINY, "--k", "2",
                 "--out", str(out)]) == 0
    captured = capsys.readouterr()
    rows = {}
    for name in ("topk", "standard"):
        match = re.search(rf"^  {name} +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+) +([\d.]+) +"
                          r"(-?[\d.]+)$", captured.out, re.MULTILINE)
        assert match, captured.out
        rows[name] = [float(v) for v in match.groups()]
    assert "training" in captured.err and "scoring recovery" in captured.err

    document = json.loads((out / "synthetic_results.json").read_text())
    assert document["config"]["architectures"] == ["topk", "standard"]
    assert document["config"]["target_l0"] == 2.0
    for name, printed in rows.items():
        record = document["results"][name]
        assert list(record) == list(SAEBENCH_FIELDS)
        assert record["eval_type_id"] == "synthetic_ground_truth"
        metrics = record["eval_result_metrics"]
        assert printed[0] == pytest.approx(metrics["recovery"]["mcc"], abs=6e-4)
        assert printed[4] == pytest.approx(metrics["sparsity"]["l0"], abs=6e-3)
        sae = SAE.load(out / name)
        assert (sae.architecture, sae.cfg.d_in, sae.cfg.d_sae) == (name, 16, 32)
    assert rows["topk"][4] == pytest.approx(2.0)  # k
    truth = load_file(str(out / "ground_truth.safetensors"))
    expected = SyntheticFeatures(d=16, n_features=16, directions="orthogonal").sampler()
    assert torch.equal(truth["directions"], expected.directions)
    assert (out / "synthetic_results.png").read_bytes()[:4] == b"\x89PNG"


def test_an_existing_out_folder_needs_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("keep")
    assert main(["synthetic", *TINY, "--out", str(out), "--no-progress"]) == 2
    assert "already holds files; pass --overwrite" in capsys.readouterr().err
    assert main(["synthetic", *TINY, "--out", str(out), "--overwrite", "-q"]) == 0
    assert not (out / "old.txt").exists() and (out / "topk").is_dir()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--directions", "orthogonal", "--d", "8", "--features", "9"], "do not fit in d=8"),
        (["--architecture", "topkk"], "unknown SAE architecture 'topkk'"),
        (["--firing-max", "2"], "firing_max must be in (0, 1]"),
        (["--parents", "2"], "needs both n_parents and children_per_parent"),
        (["--k", "40", "--features", "16", "--d", "16"], "k=40 is larger than d_sae=16"),
    ],
)
def test_bad_values_are_one_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    argv = ["synthetic", "--tokens", "2048", "--batch-size", "256", *flags,
            "--out", str(tmp_path / "o"), "--no-progress"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("saekit: error:") and message in err[0]
    assert not (tmp_path / "o").exists()


def test_help_names_the_scores(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["synthetic", "--help"])
    text = capsys.readouterr().out
    for word in ("MCC", "--zipf-exponent", "--children-per-parent", "--group-correlation",
                 "--noise", "--architecture"):
        assert word in text
