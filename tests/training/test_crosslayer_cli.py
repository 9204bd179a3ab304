"""`saekit train --architecture clt | crosscoder`: the command line trains a cross-layer
transcoder or a crosscoder (several hooks of one model, or one hook of two models) into a
run folder like a one-SAE run's, with held-out figures computed here by hand, bitwise exact
resume, and one-line refusals of settings such a run cannot follow."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_world import write_corpus

from saekit import SAE
from saekit.analysis.crosscoder_norms import CrosscoderNorms
from saekit.cli import main
from saekit.commands.train import format_multisite_metrics
from saekit.data.tokens import special_token_ids
from saekit.models import load_model
from saekit.models.tiny import tiny_gpt2, tiny_tokenizer
from saekit.saes.clt import CrossLayerTranscoder
from saekit.saes.crosscoder import Crosscoder
from saekit.training.activations import heldout_text
from saekit.training.config import TrainConfig
from saekit.training.crosslayer_run import CLASSES_KEY
from saekit.training.runlog import read_log

#: A tiny budget on the tiny model: seconds on a CPU.
TINY = "--context-size 32 --batch-size 256 --eval-tokens 512 --expansion-factor 2 --no-progress -q"
#: The same on the bundled model (d_model 256), one latent per dimension.
BUNDLED = TINY.replace("--expansion-factor 2", "--expansion-factor 1")
RUN_FILES = ("run_config.yaml", "run_state.json", "log.jsonl", "metrics.json", "cfg.json",
             "sae_weights.safetensors", "sparsity.safetensors")


def save_model(folder: Path, seed: int, vocab: int = 300) -> Path:
    tiny_gpt2(vocab, seed=seed).save_pretrained(folder)
    tiny_tokenizer(vocab).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two random GPT-2s sharing a tokenizer (a, b), one with another tokenizer (other),
    and a corpus."""
    root = tmp_path_factory.mktemp("crosslayer")
    return {
        "root": root,
        "a": save_model(root / "a", seed=0),
        "b": save_model(root / "b", seed=1),
        "other": save_model(root / "other", seed=0, vocab=400),
        "corpus": write_corpus(root / "corpus.txt"),
    }


def tiny_train(world: dict[str, Path], out: Path, *args: str) -> int:
    return main([
        "train", "--model", str(world["a"]), "--dataset", str(world["corpus"]),
        "--out", str(out), *TINY.split(), *args,
    ])


def hand_relative_norms(xc: Crosscoder) -> list[float | None]:
    """||W_dec[i, b]|| / (||W_dec[i, a]|| + ||W_dec[i, b]||) per latent, in plain Python
    (None: no decoder at either site)."""
    out: list[float | None] = []
    for site_a, site_b in xc.W_dec.detach().double().tolist():  # each [d_in]
        a, b = (math.sqrt(sum(v * v for v in site)) for site in (site_a, site_b))
        out.append(b / (a + b) if a + b > 0 else None)
    return out


def hand_classes(xc: Crosscoder, band: float = 0.1) -> dict[str, int]:
    """How many latents are exclusive to site a (relative norm below `band`), to site b
    (above 1 - band), shared (in between) or have no decoder at either site."""
    counts = {"a_only": 0, "shared": 0, "b_only": 0, "neither": 0}
    for r in hand_relative_norms(xc):
        if r is None:
            counts["neither"] += 1
        else:
            counts["a_only" if r < band else "b_only" if r > 1 - band else "shared"] += 1
    return counts


def heldout_batches(run: Path) -> tuple[Any, list[torch.Tensor]]:
    """The run's model and held-out token batches, as its config and state say."""
    cfg = TrainConfig.load(run / "run_config.yaml")
    backend = load_model(cfg.data.model)
    state = json.loads((run / "run_state.json").read_text())
    heldout, _ = heldout_text(cfg, backend, None, None, state)
    assert heldout is not None
    return backend, heldout.batches


def unexplained(target: list[torch.Tensor], recon: list[torch.Tensor]) -> float:
    """1 - explained variance, by hand: squared error over variance about the mean."""
    y, r = torch.cat(target).double(), torch.cat(recon).double()
    return float((y - r).pow(2).sum() / (y - y.mean(dim=0)).pow(2).sum())


def by_hand_fvu(sae: Any, backend: Any, batches: list[torch.Tensor], inputs: list[str],
                targets: list[str]) -> list[float]:
    """Per site: the FVU of the saved SAE on raw activations of the held-out tokens (special
    tokens left out), computed without saekit's evaluators."""
    specials = torch.tensor(sorted(special_token_ids(backend.tokenizer)))
    ys: list[list[torch.Tensor]] = [[] for _ in targets]
    rs: list[list[torch.Tensor]] = [[] for _ in targets]
    with torch.no_grad():
        for tokens in batches:
            keep = ~torch.isin(tokens, specials).reshape(-1)
            acts = backend.activations(tokens, list(dict.fromkeys(inputs + targets)))
            rows = {h: a.reshape(-1, a.shape[-1])[keep] for h, a in acts.items()}
            x = torch.stack([rows[h] for h in inputs], dim=1)  # [tokens, sites, d_in]
            recon = sae.decode(sae.encode(x))  # [tokens, sites, d_out]
            for site, hook in enumerate(targets):
                ys[site].append(rows[hook])
                rs[site].append(recon[:, site])
    return [unexplained(y, r) for y, r in zip(ys, rs, strict=True)]


# ----- cross-layer transcoders ---------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clt(world: dict[str, Path]) -> Path:
    out = world["root"] / "clt"
    assert tiny_train(
        world, out, "--architecture", "clt", "--k", "8", "--lr", "3e-3", "--tokens", "32768"
    ) == 0
    return out


def test_a_clt_run_writes_a_loadable_run_folder(tiny_clt: Path) -> None:
    for name in RUN_FILES:
        assert (tiny_clt / name).is_file(), name
    assert any((tiny_clt / "checkpoints").iterdir())
    clt = SAE.load(tiny_clt)
    assert isinstance(clt, CrossLayerTranscoder) and clt.n_layers == 2 and clt.cfg.k == 8
    # Every layer by default, read at the MLP input and written at the MLP output.
    extra = clt.cfg.metadata.extra
    assert extra["hook_names"] == [f"blocks.{n}.ln2.hook_normalized" for n in (0, 1)]
    assert extra["hook_names_out"] == [f"blocks.{n}.hook_mlp_out" for n in (0, 1)]
    assert read_log(tiny_clt)[-1]["tokens"] == 32768
    saved = TrainConfig.load(tiny_clt / "run_config.yaml")
    assert saved.sae.architecture == "clt" and not saved.many


def test_a_clt_runs_metrics_are_its_figures_on_the_held_out_text(tiny_clt: Path) -> None:
    metrics = json.loads((tiny_clt / "metrics.json").read_text())
    clt = SAE.load(tiny_clt)
    extra = clt.cfg.metadata.extra
    backend, batches = heldout_batches(tiny_clt)
    expected = by_hand_fvu(clt, backend, batches, extra["hook_names"], extra["hook_names_out"])
    # The saved CLT takes raw activations: the norm factor was folded in exactly.
    assert metrics["fvu"] == pytest.approx(expected, rel=1e-5)
    assert all(f < 1 for f in metrics["fvu"]), metrics["fvu"]
    assert [m["hook_name_out"] for m in metrics["layers"]] == extra["hook_names_out"]
    assert metrics["l0"] <= 8
    for key in ("ce_loss_with_sae", "ce_loss_without_sae", "ce_loss_score", "kl_div_score"):
        assert isinstance(metrics[key], float), key
    assert metrics["evaluated_on"]["tokens"] == sum(b.numel() for b in batches)


def test_a_clt_on_the_bundled_model_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "clt"
    args = ["train", "--architecture", "clt", "--layers", "1-3", "--target-l0", "16",
            "--lr", "3e-3", "--tokens", "4096", "--out", str(out), *BUNDLED.split()]
    assert main(args) == 0
    report = capsys.readouterr().out
    clt = SAE.load(out)
    assert clt.n_layers == 3 and clt.cfg.k == 16 and clt.cfg.d_sae == 256
    assert clt.cfg.metadata.extra["hook_names"][0] == "blocks.1.ln2.hook_normalized"
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["fvu"]) == 3 and all(f < 1 for f in metrics["fvu"]), metrics["fvu"]
    # The printed report: a row per layer, and the replacement model's scores.
    for layer, fvu in enumerate(metrics["fvu"]):
        assert f"blocks.{layer + 1}.hook_mlp_out  {fvu:.4f}" in report
    assert f"ce_loss_score {metrics['ce_loss_score']:.4f}" in report


@pytest.mark.parametrize("kind", ["clt", "model_diffing"])
def test_resuming_a_run_with_a_larger_budget_equals_the_uninterrupted_run(
    world: dict[str, Path], kind: str
) -> None:
    settings = ["--architecture", "clt", "--k", "8"] if kind == "clt" else [
        "--architecture", "crosscoder", "--activation-fn", "topk", "--k", "4",
        "--model-b", str(world["b"]), "--hook-name", "blocks.1.hook_resid_pre",
    ]
    # The dead-latent window and checkpoints fixed, not a share of the budget.
    settings += ["--dead-after-tokens", "512", "--checkpoint-every", "1024"]
    whole, part = world["root"] / f"whole_{kind}", world["root"] / f"part_{kind}"
    assert tiny_train(world, whole, *settings, "--tokens", "4096") == 0
    assert tiny_train(world, part, *settings, "--tokens", "2048") == 0
    assert main(["train", "--resume", str(part), "--tokens", "4096", "--no-progress", "-q"]) == 0
    a, b = SAE.load(whole).state_dict(), SAE.load(part).state_dict()
    assert a.keys() == b.keys()
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name
    assert (json.loads((whole / "metrics.json").read_text())
            == json.loads((part / "metrics.json").read_text()))
    assert read_log(part)[-1]["tokens"] == read_log(whole)[-1]["tokens"] == 4096


# ----- crosscoders ---------------------------------------------------------------------------


def test_a_crosscoder_over_two_hooks_reports_each_site(world: dict[str, Path]) -> None:
    out = world["root"] / "two_hooks"
    assert tiny_train(
        world, out, "--architecture", "crosscoder", "--activation-fn", "topk", "--k", "4",
        "--hook-name", "blocks.*.hook_resid_pre", "--lr", "1e-2", "--tokens", "4096",
    ) == 0
    xc = SAE.load(out)
    hooks = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
    assert isinstance(xc, Crosscoder) and xc.n_sites == 2
    assert xc.cfg.metadata.extra["hook_names"] == hooks
    metrics = json.loads((out / "metrics.json").read_text())
    assert [s["site"] for s in metrics["sites"]] == hooks
    backend, batches = heldout_batches(out)
    expected = by_hand_fvu(xc, backend, batches, hooks, hooks)
    got = [1 - s["explained_variance"] for s in metrics["sites"]]
    assert got == pytest.approx(expected, rel=1e-5)
    assert all(s["explained_variance"] > 0.3 for s in metrics["sites"]), metrics["sites"]
    assert 0 < metrics["l0"] <= 4 and 0 <= metrics["dead_fraction"] < 1
    # Two sites: the latents' classes by relative decoder norm, those of the saved weights.
    assert metrics[CLASSES_KEY] == hand_classes(xc)
    assert list(metrics[CLASSES_KEY]) == ["a_only", "shared", "b_only", "neither"]
    assert sum(metrics[CLASSES_KEY].values()) == xc.cfg.d_sae


def test_model_diffing_two_models_names_both_and_counts_classes(
    world: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "diff"
    assert tiny_train(
        world, out, "--architecture", "crosscoder", "--model-b", str(world["b"]),
        "--hook-name", "blocks.1.hook_resid_pre", "--tokens", "2048",
    ) == 0
    report = capsys.readouterr().out
    xc = SAE.load(out)
    assert xc.cfg.activation_fn == "relu"  # the crosscoder's default rule
    assert xc.cfg.metadata.extra["model_names"] == [str(world["a"]), str(world["b"])]
    assert xc.cfg.metadata.hook_name == "blocks.1.hook_resid_pre"
    metrics = json.loads((out / "metrics.json").read_text())
    classes = metrics[CLASSES_KEY]
    assert classes == hand_classes(xc)
    assert f"{str(world['b'])}: blocks.1.hook_resid_pre" in report
    # The report names the classes by model and draws the relative norms' histogram.
    labels = {"a_only": f"{world['a']} only", "shared": "shared", "b_only": f"{world['b']} only"}
    for name, label in labels.items():
        line = rf"^ +{re.escape(label)} +{classes[name]} \("
        assert re.search(line, report, re.MULTILINE), report
    assert "a_only" not in report and "b_only" not in report
    relative = [r for r in hand_relative_norms(xc) if r is not None]
    by_hand = [sum(1 for r in relative if lo / 5 <= r < (lo + 1) / 5 or (lo == 4 and r == 1))
               for lo in range(5)]
    bins = re.findall(r"^ {4}\d\.\d\d-\d\.\d\d \|#* *(\d+)$", report, re.MULTILINE)
    assert [int(n) for n in bins] == by_hand


def test_the_report_names_the_classes_by_site_with_a_histogram() -> None:
    xc = SAE.create("crosscoder", 2, 4, n_layers=2)
    assert isinstance(xc, Crosscoder)
    with torch.no_grad():
        xc.W_dec.zero_()
        xc.W_dec[0, 0] = torch.tensor([3.0, 4.0])  # base only: relative norm 0
        xc.W_dec[1, 1] = torch.tensor([0.0, 2.0])  # chat only: 1
        xc.W_dec[2, 0] = torch.tensor([1.0, 0.0])  # both alike: 0.5; latent 3 writes nowhere
        xc.W_dec[2, 1] = torch.tensor([0.0, 1.0])
    xc.cfg.metadata.extra.update(model_names=["base", "chat"], hook_names=["h", "h"])
    metrics = {
        "sites": [{"site": "base: h", "explained_variance": 0.5, "mse": 1.0},
                  {"site": "chat: h", "explained_variance": 0.25, "mse": 2.0}],
        "l0": 1.5, "dead_fraction": 0.25,
        CLASSES_KEY: {"a_only": 1, "shared": 1, "b_only": 1, "neither": 1},
    }
    text = format_multisite_metrics(metrics, CrosscoderNorms.of(xc))
    counts = dict(re.findall(r"^ {4}(\S.*?) +(\d+) \(", text, re.MULTILINE))
    assert counts == {"base only": "1", "shared": "1", "chat only": "1",
                      "no decoder at either site": "1"}
    bins = re.findall(r"^ {4}(\d\.\d\d)-\d\.\d\d \|#* *(\d+)$", text, re.MULTILINE)
    assert bins == [("0.00", "1"), ("0.20", "0"), ("0.40", "1"), ("0.60", "0"), ("0.80", "1")]
    assert "a_only" not in text
    # From metrics.json alone (no crosscoder at hand) the classes keep their stored names.
    plain = format_multisite_metrics(metrics)
    assert "a_only 1, shared 1, b_only 1, neither 1" in plain and "base only" not in plain


def test_diffing_the_bundled_model_against_itself_finds_only_shared_latents(
    tmp_path: Path,
) -> None:
    out = tmp_path / "self"
    assert main([
        "train", "--architecture", "crosscoder", "--activation-fn", "topk", "--k", "8",
        "--model-b", "bundled", "--hook-name", "blocks.2.hook_resid_pre", "--lr", "3e-3",
        "--tokens", "2048", "--out", str(out), *BUNDLED.split(),
    ]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    # Both sites read the same activations, so every latent writes to both alike and each
    # site is rebuilt as well as the other.
    assert metrics[CLASSES_KEY] == {"shared": 256, "a_only": 0, "b_only": 0, "neither": 0}
    a, b = (s["explained_variance"] for s in metrics["sites"])
    assert a > 0.2 and abs(a - b) < 0.02, (a, b)


# ----- refusals ------------------------------------------------------------------------------


@pytest.mark.parametrize(("args", "said"), [
    (["--architecture", "clt", "--hook-name", "blocks.*.hook_resid_pre"], "not several names"),
    (["--architecture", "clt", "--layers", "2"], "over one layer is a per-layer transcoder"),
    (["--architecture", "clt", "--model-b", "bundled"], "model_b is for crosscoders"),
    (["--architecture", "clt", "--init-from", "somewhere"], "init_from is not available"),
    (["--architecture", "clt", "--parallel", "sae"], "parallel 'sae'"),
    (["--architecture", "clt", "--seeds", "1", "2"], "run.seeds is not available"),
    (["--architecture", "clt", "--eval-every", "1024"], "run.eval_every is not available"),
    (["--architecture", "crosscoder"], "reads several sites"),
    (["--architecture", "crosscoder", "--hook-name", "blocks.1.hook_resid_pre"],
     "reads several sites"),
    (["--architecture", "crosscoder", "--model-b", "bundled", "--layers", "0-1"],
     "one hook in each model"),
    (["--architecture", "crosscoder", "--layers", "0-1", "--k", "8"],
     "k applies to the topk and batchtopk rules"),
    (["--architecture", "crosscoder", "--layers", "0-1", "--activation-fn", "jumprelu"],
     "'jumprelu' is not a rule of 'crosscoder'"),
    (["--architecture", "topk", "--activation-fn", "topk"], "activation_fn chooses"),
    (["--architecture", "topk", "--model-b", "bundled"], "second model of a crosscoder"),
])
def test_bad_combinations_are_one_line_before_any_work(
    args: list[str], said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    assert main(["train", *args, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("saekit: error:") and said in err, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize(("args", "said"), [
    (["--architecture", "crosscoder", "--model-b", "{other}"], "tokenizes differently"),
    (["--architecture", "crosscoder", "--hook-name", "blocks.1.hook_resid_pr*"],
     "names one hook"),
    (["--architecture", "clt", "--hook-name", "blocks.0.hook_resid_mid", "--hook-out",
      "blocks.0.mlp.hook_nothing"], "blocks.0.mlp.hook_nothing"),
])
def test_sites_the_model_cannot_give_are_refused_before_training(
    world: dict[str, Path], args: list[str], said: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    args = [a.replace("{other}", str(world["other"])) for a in args]
    assert tiny_train(world, out, *args, "--tokens", "512") == 2
    err = capsys.readouterr().err
    assert err.startswith("saekit: error:") and said in err, err
    assert not out.exists()


# ----- data parallel -------------------------------------------------------------------------


@pytest.mark.slow
def test_a_clt_trains_data_parallel_on_two_ranks(world: dict[str, Path]) -> None:
    """Two gloo ranks launched as torchrun would: each reads its share of every batch, and
    rank 0 alone writes the run folder. (Two Python processes importing torch: slow.)"""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    out = world["root"] / "ddp"
    args = ["train", "--architecture", "clt", "--k", "8", "--lr", "3e-3", "--tokens", "32768",
            "--model", str(world["a"]), "--dataset", str(world["corpus"]), "--out", str(out),
            *TINY.split()]
    root = Path(__file__).resolve().parents[2]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(root)}
        code = "import sys; from saekit.cli import main; sys.exit(main(sys.argv[1:]))"
        procs.append(subprocess.Popen([sys.executable, "-c", code, *args], env=env,
                                      stderr=subprocess.PIPE, text=True))
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    from saekit.training import checkpoint as ckpt

    state = ckpt.read_checkpoint(ckpt.latest_checkpoint(out))
    assert state["world_size"] == 2 and state["parallel"] == "data"
    metrics = json.loads((out / "metrics.json").read_text())
    assert all(f < 1 for f in metrics["fvu"]), metrics["fvu"]
    assert isinstance(SAE.load(out), CrossLayerTranscoder)
