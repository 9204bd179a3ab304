"""Several SAEs from one model pass: hook patterns, --layers, sweeps, seeds, per-SAE
entries, the run folder of a run of several, exact resume and the one-pass guarantee."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

import saekit
from saekit.cli import build_parser
from saekit.commands.train import config_from_args
from saekit.models import load_model
from saekit.models.tiny import tiny_hooked_transformer, tiny_tokenizer
from saekit.training import ConfigError, TrainConfig
from saekit.training import checkpoint as ckpt
from saekit.training.many import SAE_CONFIG_FILE, SUMMARY_FILE, ManyOutcome
from saekit.training.runlog import read_log
from saekit.training.sweeps import (
    expand_hooks,
    layer_template,
    parse_layers,
    plan_saes,
    safe_name,
)

TEXTS = [f"to be or not to be, that is the question number {i}. " * 12 for i in range(120)]
HOOKS = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]


def config(out: Path, **data: object) -> dict:
    return {
        "sae": {"architecture": "topk", "expansion_factor": 2, "k": 8},
        "data": {"context_size": 32, "eval_tokens": 256, **data},
        "training": {"tokens": 256 * 12, "batch_size": 256, "lr": 1e-3},
        "run": {"out": str(out), "progress": False, "log_every": 4, "checkpoint_every": 1024},
    }


@pytest.fixture(scope="module")
def model() -> object:
    return tiny_hooked_transformer(tokenizer=tiny_tokenizer())


@pytest.fixture(scope="module")
def swept(tmp_path_factory: pytest.TempPathFactory, model: object) -> ManyOutcome:
    """Both residual hooks of the tiny model x k in (4, 8): four SAEs from one pass."""
    cfg = config(tmp_path_factory.mktemp("many") / "run", hook_name="blocks.*.hook_resid_pre")
    cfg["sweep"] = {"k": [4, 8]}
    return saekit.train(cfg, model=model, dataset=TEXTS)


# ----- hooks and layers ------------------------------------------------------------------


def test_layers_parse_ranges_steps_and_lists() -> None:
    assert parse_layers("0-11:2") == [0, 2, 4, 6, 8, 10]
    assert parse_layers("0,3,5-7") == [0, 3, 5, 6, 7]
    assert parse_layers("4") == [4]
    for bad, said in [("", "empty"), ("3-1", "empty range"), ("a-b", "cannot read"),
                      ("1,0-2", "more than once"), ("0-4:0", "empty range")]:
        with pytest.raises(ValueError, match=said):
            parse_layers(bad)


def test_layer_template_from_placeholder_or_the_one_number() -> None:
    assert layer_template(None) == "blocks.{layer}.hook_resid_pre"
    assert layer_template("blocks.5.hook_mlp_out") == "blocks.{layer}.hook_mlp_out"
    assert layer_template("model.layers.{layer}.mlp") == "model.layers.{layer}.mlp"
    with pytest.raises(ValueError, match=r"write \{layer\}"):
        layer_template("blocks.1.attn.3.x")


def test_globs_expand_in_layer_order_on_a_llama() -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2)
    names = load_model(LlamaForCausalLM(config)).hook_names()
    assert expand_hooks("blocks.*.hook_resid_pre", None, names, None) == [
        f"blocks.{i}.hook_resid_pre" for i in range(3)
    ]
    # Several patterns: each in layer order, in the order given; a hook found twice once.
    got = expand_hooks(["blocks.[12].hook_mlp_out", "blocks.?.hook_resid_pre",
                        "blocks.1.hook_mlp_out"], None, names, None)
    assert got == ["blocks.1.hook_mlp_out", "blocks.2.hook_mlp_out",
                   *(f"blocks.{i}.hook_resid_pre" for i in range(3))]
    # Module paths of the Hugging Face model, with --layers filling in the number.
    assert expand_hooks("model.layers.0.mlp.output", "0-2:2", names, None) == [
        "model.layers.0.mlp.output", "model.layers.2.mlp.output"
    ]
    with pytest.raises(ValueError, match="matches no hook.*close hook names: .*resid_pre"):
        expand_hooks("blocks.*.hook_resid_prex", None, names, None)
    with pytest.raises(ValueError, match="blocks.7.hook_resid_pre' does not exist"):
        expand_hooks(None, "0,7", names, None)


def test_globs_and_layers_on_the_bundled_model() -> None:
    names = load_model("bundled").hook_names()
    want = [f"blocks.{i}.hook_resid_pre" for i in range(4)]
    assert expand_hooks("blocks.*.hook_resid_pre", None, names, None) == want
    assert expand_hooks(None, "0-3", names, None) == want
    assert expand_hooks("blocks.{layer}.hook_resid_pre", "0-3:3", names, None) == [
        want[0], want[3]
    ]
    assert expand_hooks("blocks.2.hook_resid_pre", "1,3", names, None) == [want[1], want[3]]


# ----- sweeps, seeds and entries ---------------------------------------------------------


def parse(*argv: str) -> TrainConfig:
    return config_from_args(build_parser().parse_args(["train", *argv]))


def test_cli_sweep_seeds_hooks_and_layers_become_the_config() -> None:
    cfg = parse("--hook-name", "blocks.0.hook_resid_pre", "blocks.*.hook_mlp_out",
                "--sweep", "k=32,64", "expansion_factor=8,16", "--seeds", "0", "1", "2",
                "--eval-every", "50000", "--parallel", "sae")
    assert cfg.data.hook_name == ["blocks.0.hook_resid_pre", "blocks.*.hook_mlp_out"]
    assert cfg.sweep == {"k": ["32", "64"], "expansion_factor": ["8", "16"]}
    assert cfg.run.seeds == [0, 1, 2] and cfg.run.eval_every == 50000
    assert cfg.run.parallel == "sae" and cfg.many
    one = parse("--hook-name", "blocks.2.hook_resid_pre")
    assert one.data.hook_name == "blocks.2.hook_resid_pre" and not one.many
    assert parse("--layers", "0-3").many


def test_sweep_and_entries_are_validated_against_the_fields() -> None:
    cases = [
        (["--sweep", "kk=1,2"], "'kk' is not a field .*did you mean 'k'"),
        (["--sweep", "tokens=1000,2000"], "tokens cannot vary between SAEs"),
        (["--sweep", "k=8,x"], "k: cannot read .* as int"),
        (["--sweep", "k=8,8"], "k repeats a value"),
        (["--sweep", "k"], "write each swept field as FIELD=V1,V2"),
        (["--sweep", "context_size=64,128"], "not a field of the sae or training section"),
        (["--architecture", "standard", "--sweep", "k=8,16"], "k=8: .*k applies to"),
        (["--layers", "2-1"], "empty range"),
        (["--seeds", "1", "1"], "seeds repeat"),
        (["--parallel", "tensor"], "parallel 'tensor' is not one of data, sae"),
        (["--eval-every", "100", "--eval-tokens", "0"], "eval_every evaluates on held-out"),
    ]
    for argv, said in cases:
        with pytest.raises(ConfigError, match=said):
            parse(*argv)
    with pytest.raises(ConfigError, match=r"saes\[1\]\.name '\.\./up'"):
        TrainConfig.from_dict({"saes": [{"k": 4}, {"name": "../up"}]})
    with pytest.raises(ConfigError, match=r"saes\[0\] sets sae\.k, which the sweep varies"):
        TrainConfig.from_dict({"saes": [{"k": 4}], "sweep": {"k": [8, 16]}})


def test_plans_cross_hooks_sweep_seeds_and_entries_with_safe_unique_names() -> None:
    names = load_model(tiny_hooked_transformer()).hook_names()
    cfg = TrainConfig.from_dict({
        "sae": {"architecture": "topk", "k": 8},
        "data": {"hook_name": "blocks.*.hook_resid_pre"},
        "training": {"lr": 1e-3},
        "run": {"out": "runs/x", "seeds": [3, 4]},
        "sweep": {"expansion_factor": [2, 4], "training.lr": ["1e-3", "3e-3"]},
    })
    plans = plan_saes(cfg, names, None, "tiny")
    assert len(plans) == 2 * 2 * 2 * 2
    first = plans[0]
    assert first.name == "blocks.0.hook_resid_pre__expansion_factor=2__lr=0.001__seed=3"
    assert first.config.data.hook_name == "blocks.0.hook_resid_pre"
    assert first.config.sae.expansion_factor == 2 and first.config.training.lr == 1e-3
    assert first.config.run.seed == 3 and not first.config.many
    assert first.config.run.out == str(Path("runs/x") / first.name)
    assert [p.hook for p in plans] == [HOOKS[0]] * 8 + [HOOKS[1]] * 8
    assert len({p.name for p in plans}) == 16 and all(safe_name(p.name) for p in plans)
    # Entries: one SAE each (crossed with the hooks), named by their settings or a name.
    cfg = TrainConfig.from_dict({
        "sae": {"architecture": "topk", "k": 8},
        "data": {"hook_name": HOOKS},
        "saes": [{"k": 4}, {"architecture": "standard", "k": None, "name": "l1"},
                 {"hook_name": "blocks.0.hook_mlp_out", "k": 2}],
    })
    got = [(p.name, p.config.sae.architecture) for p in plan_saes(cfg, names, None, "tiny")]
    assert got == [
        ("blocks.0.hook_resid_pre__k=4", "topk"), ("blocks.0.hook_resid_pre__l1", "standard"),
        ("blocks.1.hook_resid_pre__k=4", "topk"), ("blocks.1.hook_resid_pre__l1", "standard"),
        ("blocks.0.hook_mlp_out__k=2", "topk"),
    ]
    twice = TrainConfig.from_dict({"data": {"hook_name": HOOKS}, "saes": [{"k": 4}, {"k": 4}]})
    with pytest.raises(ValueError, match="both be named"):
        plan_saes(twice, names, None, "tiny")


# ----- the run folder --------------------------------------------------------------------


def test_each_sub_folder_is_a_loadable_sae_with_its_own_files(swept: ManyOutcome) -> None:
    run = swept.run_dir
    names = [f"{h}__k={k}" for h in HOOKS for k in (4, 8)]
    assert list(swept.runs) == names
    metrics = json.loads((run / "metrics.json").read_text())
    assert list(metrics) == names
    for name in names:
        folder = run / name
        sae = saekit.SAE.load(folder)
        hook, k = name.split("__k=")
        assert sae.cfg.metadata.hook_name == hook and sae.cfg.k == int(k)
        own = json.loads((folder / "metrics.json").read_text())
        assert own == metrics[name] and own["l0"] == pytest.approx(int(k))
        assert [r["step"] for r in read_log(folder)] == [4, 8, 12]
        alone = TrainConfig.load(folder / SAE_CONFIG_FILE)
        assert alone.data.hook_name == hook and alone.sae.k == int(k) and not alone.many
    # The run's log holds every SAE's lines; the summary one row per SAE.
    assert {f"{n}/loss" for n in names} <= set(read_log(run)[-1])
    rows = (run / SUMMARY_FILE).read_text().splitlines()
    assert rows[0].split(",")[:4] == ["name", "hook", "k", "l0"]
    assert [r.split(",")[0] for r in rows[1:]] == names
    assert TrainConfig.load(run / "run_config.yaml").sweep == {"k": [4, 8]}


def test_a_swept_sae_equals_the_same_sae_trained_alone(
    swept: ManyOutcome, model: object, tmp_path: Path
) -> None:
    alone = saekit.train(
        config(tmp_path / "alone", hook_name=HOOKS[1]) | {"sae": {
            "architecture": "topk", "expansion_factor": 2, "k": 4}},
        model=model, dataset=TEXTS,
    )
    got = saekit.SAE.load(swept.run_dir / f"{HOOKS[1]}__k=4").state_dict()
    for key, value in alone.sae.state_dict().items():
        assert torch.equal(got[key], value), key
    assert swept.metrics[f"{HOOKS[1]}__k=4"]["explained_variance"] == pytest.approx(
        alone.metrics["explained_variance"], rel=1e-9
    )


def test_one_model_pass_per_batch_feeds_every_sae(model: object, tmp_path: Path) -> None:
    calls = {"n": 0}

    def count(*_: object) -> None:
        calls["n"] += 1

    handle = model.register_forward_pre_hook(count)  # type: ignore[attr-defined]
    try:
        one = config(tmp_path / "one", hook_name=HOOKS[1], eval_tokens=0)
        saekit.train(one, model=model, dataset=TEXTS)
        alone = calls["n"]
        calls["n"] = 0
        many = config(tmp_path / "many", hook_name="blocks.*.hook_resid_pre", eval_tokens=0)
        many["sweep"] = {"k": [4, 8]}
        saekit.train(many, model=model, dataset=TEXTS)
    finally:
        handle.remove()
    # Four SAEs on two hooks, and not one forward pass more than one SAE alone needs.
    assert alone > 0 and calls["n"] == alone


def test_resume_continues_every_sae_exactly(
    swept: ManyOutcome, model: object, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(swept.run_dir, run)
    (run / "run_config.yaml").write_text(
        (run / "run_config.yaml").read_text().replace(str(swept.run_dir), str(run))
    )
    # As if killed between the checkpoints at 2048 and 3072 tokens.
    shutil.rmtree(ckpt.latest_checkpoint(run))
    for name in swept.runs:
        shutil.rmtree(run / name)
    with (run / "log.jsonl").open("a") as handle:
        handle.write(json.dumps({"step": 11, "tokens": 2816, "junk": 1}) + "\n")
    resumed = saekit.train({"run": {"resume": str(run), "progress": False}},
                           model=model, dataset=TEXTS)
    assert isinstance(resumed, ManyOutcome)
    for name, outcome in swept.runs.items():
        got = saekit.SAE.load(run / name).state_dict()
        for key, value in outcome.sae.state_dict().items():
            assert torch.equal(got[key], value), f"{name}.{key}"
    assert [r["step"] for r in read_log(run)] == [4, 8, 12]
    with pytest.raises(ConfigError, match="sweep"):
        saekit.train({"run": {"resume": str(run)}, "sweep": {"k": [2]}},
                     model=model, dataset=TEXTS)


def test_unsupported_combinations_fail_before_any_folder(tmp_path: Path, model: object) -> None:
    cfg = config(tmp_path / "run", hook_name=HOOKS)
    cfg["data"]["activations"] = str(tmp_path / "cache")
    with pytest.raises(ValueError):
        saekit.train(cfg, model=model, dataset=TEXTS)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_torchrun_deals_the_saes_out_across_ranks(tmp_path: Path) -> None:
    """Two gloo ranks, launched as torchrun would, each train one of two SAEs (--parallel
    sae) of the bundled model's run; rank 0 writes both sub-folders."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "saekit.cli", "train", "--layers", "1,2", "--parallel", "sae",
            "--tokens", "8192", "--batch-size", "1024", "--expansion-factor", "2",
            "--context-size", "64", "--eval-tokens", "1024", "--eval-every", "4096",
            "--eval-every-tokens", "256", "--no-report", "--no-progress", "--device", "cpu",
            "--out", str(run)]
    procs = []
    for rank in range(2):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True))
    errors = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    names = ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"]
    for name in names:
        assert saekit.SAE.load(run / name).cfg.metadata.hook_name == name
        assert json.loads((run / name / "metrics.json").read_text())["l0"] > 0
    saved = ckpt.read_checkpoint(ckpt.latest_checkpoint(run))
    assert saved["parallel"] == "sae" and sorted(saved["jobs"]) == names
    evals = [r for r in read_log(run) if "eval" in r]
    assert [sorted(r["eval"]) for r in evals] == [names, names]  # gathered from both ranks
