"""Fine-tuning with `--init-from` / `sae.init_from`: a saved run, a saved SAE folder or a
published release continues training on tiny random-weight GPT-2 models (not the bundled
one); settings that contradict the source fail before any work; the run records where it
started; `--resume` continues a fine-tuning run without its source."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from cli_world import write_corpus
from safetensors.numpy import load_file

import saekit
from saekit import SAE
from saekit.cli import main
from saekit.errors import SaekitError
from saekit.models.tiny import tiny_gpt2, tiny_tokenizer
from saekit.training import ConfigError, TrainConfig
from saekit.training.runlog import read_log

HOOK = "blocks.1.hook_resid_pre"
BATCH = 256
#: The tiny run's settings as flags: 64-token windows, 256-token steps, no report.
RUN_FLAGS = [
    "--context-size", "64", "--batch-size", str(BATCH), "--eval-tokens", "256",
    "--dead-after-tokens", "2048", "--no-report", "--no-progress", "-q",
]


@dataclass
class World:
    root: Path
    model: Path
    """A random GPT-2 (2 layers, d_model 32)."""
    other_model: Path
    """The same shape with other random weights: a "new checkpoint" of the model."""
    wide_model: Path
    """A random GPT-2 with d_model 48."""
    corpus: Path
    source: Path
    """A finished topk run (64 latents, k 8) on `model`, 16 steps at HOOK."""

    def flags(self, out: Path, steps: int, model: Path | None = None) -> list[str]:
        return [
            "--model", str(model or self.model), "--dataset", str(self.corpus),
            "--out", str(out), "--tokens", str(steps * BATCH), *RUN_FLAGS,
        ]


def save_model(folder: Path, tokenizer: Any, d_model: int, seed: int) -> Path:
    tiny_gpt2(300, d_model=d_model, seed=seed).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    root = tmp_path_factory.mktemp("init-from")
    tokenizer = tiny_tokenizer(300)
    built = World(
        root,
        save_model(root / "model", tokenizer, 32, seed=0),
        save_model(root / "other-model", tokenizer, 32, seed=1),
        save_model(root / "wide-model", tokenizer, 48, seed=0),
        write_corpus(root / "corpus.txt"),
        root / "source",
    )
    args = ["train", *built.flags(built.source, 16), "--architecture", "topk",
            "--expansion-factor", "2", "--k", "8"]
    assert main(args) == 0
    return built


def documented_hash(folder: Path) -> str:
    """The weights hash as the docs define it, from the safetensors file alone: per tensor in
    name order, "name NUL dtype NUL [shape] NUL" then its little-endian bytes."""
    digest = hashlib.sha256()
    for name, array in sorted(load_file(str(folder / "sae_weights.safetensors")).items()):
        dtype = {np.float32: "float32", np.float64: "float64"}[array.dtype.type]
        digest.update(f"{name}\0{dtype}\0{list(array.shape)}\0".encode())
        digest.update(array.astype(array.dtype.newbyteorder("<")).tobytes())
    return digest.hexdigest()


def final_loss(run: Path) -> float:
    return read_log(run)[-1]["loss"]


def test_fine_tuning_a_saved_run_beats_a_fresh_sae_after_the_same_steps(
    world: World, tmp_path: Path
) -> None:
    tuned, fresh = tmp_path / "tuned", tmp_path / "fresh"
    assert main(["train", *world.flags(tuned, 4), "--init-from", str(world.source)]) == 0
    assert main(["train", *world.flags(fresh, 4), "--architecture", "topk",
                 "--expansion-factor", "2", "--k", "8"]) == 0
    # Same data, same steps: the SAE that starts trained ends with the lower loss, on the
    # training batches and on held-out text.
    assert final_loss(tuned) < 0.9 * final_loss(fresh)
    held_out = {run: json.loads((run / "metrics.json").read_text()) for run in (tuned, fresh)}
    assert held_out[tuned]["mse"] < held_out[fresh]["mse"]
    # What the SAE is came from the source.
    source, sae = SAE.load(world.source), SAE.load(tuned)
    assert (sae.cfg.architecture, sae.cfg.d_sae, sae.cfg.k) == ("topk", 64, 8)
    assert sae.cfg.metadata.hook_name == source.cfg.metadata.hook_name == HOOK
    saved = TrainConfig.load(tuned / "run_config.yaml")
    assert saved.sae.init_from == str(world.source)
    assert (saved.sae.architecture, saved.sae.d_sae, saved.sae.k) == ("topk", 64, 8)
    assert saved.data.hook_name == HOOK


def test_the_run_records_its_source_and_the_hash_of_its_start(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = tmp_path / "run"
    args = ["train", *world.flags(run, 2), "--init-from", str(world.source), "--eval-tokens", "0"]
    args.remove("-q")
    assert main(args) == 0
    expected = documented_hash(world.source)
    state = json.loads((run / "run_state.json").read_text())["init_from"]
    assert state["source"] == str(world.source)
    assert state["identity"] == str(world.source.resolve())
    assert state["weights_sha256"] == expected
    meta = json.loads((run / "cfg.json").read_text())["metadata"]
    assert meta["init_from"]["weights_sha256"] == expected
    assert meta["init_from"]["architecture"] == "topk"
    assert f"fine-tuned from {world.source.resolve()} (weights sha256 {expected[:16]}" in (
        capsys.readouterr().out
    )


def one_step(world: World, folder: Path, out: Path, **training: Any) -> Any:
    """One step at lr 1e-12 from `folder` (through a TrainConfig, as Python callers build
    it): no weight moves measurably, so the SAE saved is the one training started from."""
    cfg = {
        "sae": {"init_from": str(folder)},
        "data": {"model": str(world.model), "dataset": str(world.corpus), "context_size": 64,
                 "eval_tokens": 0},
        "training": {"tokens": BATCH, "batch_size": BATCH, "lr": 1e-12, **training},
        "run": {"out": str(out), "progress": False, "report": False},
    }
    return saekit.train(TrainConfig.from_dict(cfg))


def random_source(folder: Path, architecture: str, **fields: Any) -> Path:
    """A saved SAE on HOOK with random weights: rows of unequal norms, nonzero biases and,
    for jumprelu, thresholds of every size (none of it the output of saekit's training)."""
    torch.manual_seed(5)
    sae = SAE.create(architecture, 32, 48, metadata={"hook_name": HOOK}, **fields)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(48, 1) * 4 + 0.5)
        sae.W_enc.normal_(0, 0.4)
        for name, tensor in sae.named_parameters():
            if name.startswith(("b_", "r_")):  # biases (gated: b_gate, b_mag, r_mag)
                tensor.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
        if hasattr(sae, "threshold"):
            sae.threshold.uniform_(0.0, 0.3)
    return sae.save(folder)


@pytest.mark.parametrize(
    ("architecture", "fields"),
    [("topk", {"source": True}), ("jumprelu", {}), ("standard", {}), ("gated", {})],
)
def test_training_starts_from_the_source_s_function(
    world: World, tmp_path: Path, architecture: str, fields: dict[str, Any]
) -> None:
    # One step at a learning rate of 1e-12 moves no weight measurably: the SAE that comes
    # out is the one training started from, which must compute what the source computes
    # (no decoder bias set from data, no rows renormalised, no thresholds reset).
    if fields.get("source"):
        folder = world.source
    else:
        folder = random_source(tmp_path / "source", architecture)
    outcome = one_step(
        world, folder, tmp_path / "run", lift_quiet_latents=False, resample_dead_latents=False
    )
    source = SAE.load(folder)
    assert type(outcome.sae) is type(source)
    x = torch.randn(512, 32) * 2
    torch.testing.assert_close(outcome.sae(x), source(x), rtol=1e-4, atol=1e-5)
    # Saving puts decoder rows at unit norm, moving their norms into the latents: each
    # latent times its row's norm is what the source's is.
    def weighted(sae: SAE) -> torch.Tensor:
        return sae.encode(x) * sae.W_dec.norm(dim=1)

    torch.testing.assert_close(weighted(outcome.sae), weighted(source), rtol=1e-4, atol=1e-5)
    assert (outcome.sae.encode(x) > 0).float().mean() > 0.05  # latents do fire on x
    state = json.loads((tmp_path / "run" / "run_state.json").read_text())
    assert state["init_from"]["weights_sha256"] == documented_hash(folder)


def test_topk_rows_of_unequal_norms_need_free_decoder_rows(world: World, tmp_path: Path) -> None:
    # Unit-norm rows would change which latents win the top-k of such an SAE.
    folder = random_source(tmp_path / "source", "topk", k=6)
    with pytest.raises(ConfigError, match="--decoder-norm free"):
        one_step(world, folder, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()
    outcome = one_step(world, folder, tmp_path / "run", decoder_norm="free")
    x = torch.randn(256, 32) * 2
    torch.testing.assert_close(outcome.sae(x), SAE.load(folder)(x), rtol=1e-4, atol=1e-5)


def test_an_sae_that_expects_scaled_inputs_takes_the_run_s_factor(
    world: World, tmp_path: Path
) -> None:
    # normalize_activations expected_average_only_in: the source takes activations already
    # multiplied by a factor it does not record. The run estimates its own factor s, and the
    # SAE it saves takes raw activations: it computes source(s * x) / s.
    folder = random_source(
        tmp_path / "source", "standard", normalize_activations="expected_average_only_in"
    )
    source = SAE.load(folder)
    outcome = one_step(world, folder, tmp_path / "run")
    scale = json.loads((tmp_path / "run" / "run_state.json").read_text())["norm_scaling_factor"]
    assert outcome.sae.cfg.normalize_activations == "none"
    x = torch.randn(256, 32) / scale * 6
    torch.testing.assert_close(outcome.sae(x), source(scale * x) / scale, rtol=1e-4, atol=1e-6)


def test_a_source_that_is_not_there_is_one_line_naming_the_flag(
    world: World, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "runs" / "nope"
    (tmp_path / "runs").mkdir()
    assert main(["train", *world.flags(tmp_path / "run", 2), "--init-from", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"saekit: error: --init-from {missing}: ") and err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_a_fresh_sae_would_not_pass_the_start_check(world: World, tmp_path: Path) -> None:
    # The check above can fail: the same one-step run without --init-from computes
    # something else than the source.
    cfg = {
        "sae": {"architecture": "topk", "expansion_factor": 2, "k": 8},
        "data": {"model": str(world.model), "dataset": str(world.corpus), "context_size": 64,
                 "eval_tokens": 0},
        "training": {"tokens": BATCH, "batch_size": BATCH, "lr": 1e-12},
        "run": {"out": str(tmp_path / "run"), "progress": False, "report": False},
    }
    fresh = saekit.train(cfg).sae
    x = torch.randn(64, 32)
    assert not torch.allclose(fresh(x), SAE.load(world.source)(x), atol=1e-3)


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--architecture", "jumprelu"], ["--architecture jumprelu", "architecture topk"]),
        (["--d-sae", "128"], ["--d-sae 128", "d_sae 64"]),
        (["--expansion-factor", "4"], ["--expansion-factor 4", "64 latents on d_in 32"]),
        (["--k", "16"], ["--k 16", "k 8"]),
        (["--hook", "blocks.0.hook_resid_pre"],
         ["--hook blocks.0.hook_resid_pre", f"hook_name {HOOK}"]),
        (["--target-l0", "4"], ["--target-l0 4", "k=8"]),
    ],
)
def test_a_setting_that_contradicts_the_source_fails_before_any_work(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], flags: list[str], named: list[str],
) -> None:
    def no_model(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    import saekit.models

    monkeypatch.setattr(saekit.models, "load_model", no_model)
    out = tmp_path / "run"
    code = main(["train", *world.flags(out, 2), "--init-from", str(world.source), *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("saekit: error: ") and err.count("\n") == 1
    for text in named:
        assert text in err
    assert "without --init-from" in err
    assert not out.exists()


def test_every_contradiction_is_listed_at_once(world: World, tmp_path: Path) -> None:
    cfg = {
        "sae": {"init_from": str(world.source), "architecture": "standard", "d_sae": 32},
        "data": {"hook_name": "blocks.0.hook_resid_pre"},
        "run": {"out": str(tmp_path / "run")},
    }
    with pytest.raises(ConfigError) as info:
        saekit.train(cfg)
    assert len(info.value.problems) == 3
    assert "without --init-from" in info.value.problems[-1]
    assert not (tmp_path / "run").exists()


class Watched(list):
    """Texts that note whether anyone read them."""

    read = False

    def __iter__(self):  # noqa: ANN204 - list's own signature
        self.read = True
        return super().__iter__()

    def __getitem__(self, index):  # noqa: ANN001, ANN204
        self.read = True
        return super().__getitem__(index)


def test_a_model_of_another_width_fails_before_any_text_is_read(
    world: World, tmp_path: Path
) -> None:
    texts = Watched(world.corpus.read_text().splitlines())
    cfg = {
        "sae": {"init_from": str(world.source)},
        "data": {"model": str(world.wide_model), "context_size": 64, "eval_tokens": 256},
        "training": {"tokens": 2 * BATCH, "batch_size": BATCH},
        "run": {"out": str(tmp_path / "run"), "progress": False},
    }
    with pytest.raises(SaekitError) as info:
        saekit.train(cfg, dataset=texts)
    message = str(info.value)
    assert "width 32" in message and "width 48" in message and HOOK in message
    assert str(world.source) in message
    assert not texts.read
    assert not (tmp_path / "run").exists()


def test_fine_tuning_on_another_checkpoint_of_the_model(world: World, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["train", *world.flags(run, 2, model=world.other_model),
                 "--init-from", str(world.source)]) == 0
    sae = SAE.load(run)
    assert sae.cfg.metadata.model_name == str(world.other_model)
    assert sae.cfg.metadata.init_from["source"] == str(world.source)


def test_a_transcoder_keeps_both_of_its_hooks(world: World, tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = SAE.create(
        "transcoder", 32, 48, d_out=32,
        metadata={"hook_name": "blocks.0.hook_resid_mid", "hook_name_out": "blocks.0.hook_mlp_out"},
    ).save(tmp_path / "source")
    run = tmp_path / "run"
    assert main(["train", *world.flags(run, 2), "--init-from", str(source)]) == 0
    meta = SAE.load(run).cfg.metadata
    assert (meta.hook_name, meta.hook_name_out) == (
        "blocks.0.hook_resid_mid", "blocks.0.hook_mlp_out"
    )
    code = main(["train", *world.flags(tmp_path / "b", 2), "--init-from", str(source),
                 "--hook-out", "blocks.1.hook_mlp_out"])
    assert code == 2 and not (tmp_path / "b").exists()


def hub_cache(root: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """`files` laid out as huggingface_hub's cache holds a download of `repo_id`."""
    repo = root / ("models--" + repo_id.replace("/", "--"))
    commit = "b" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    for path, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / path
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return root


def test_a_published_release_fine_tunes_offline(
    world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from huggingface_hub import constants

    from saekit.io import releases

    repo = "saekit-tests/tiny-gpt2-saes"
    files = {f"{HOOK}/{p.name}": p.read_bytes() for p in world.source.iterdir() if p.is_file()}
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(hub_cache(tmp_path / "hub", repo, files)))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(releases, "_EXTRA", {})
    releases.register_release("tiny-gpt2-res-test", {
        "model": "tiny-gpt2", "repo_id": repo, "layout": "native",
        "saes": [{"id": HOOK, "path": HOOK}],
    })
    run = tmp_path / "run"
    spec = f"tiny-gpt2-res-test/{HOOK}"
    assert main(["train", *world.flags(run, 2), "--init-from", spec]) == 0
    state = json.loads((run / "run_state.json").read_text())["init_from"]
    assert state["identity"] == spec
    assert state["weights_sha256"] == documented_hash(world.source)
    assert SAE.load(run).cfg.metadata.hook_name == HOOK


def test_resume_continues_a_fine_tuning_run_without_its_source(
    world: World, tmp_path: Path
) -> None:
    copy = shutil.copytree(world.source, tmp_path / "copy")
    run, straight = tmp_path / "run", tmp_path / "straight"
    assert main(["train", *world.flags(run, 3), "--init-from", str(copy)]) == 0
    shutil.rmtree(copy)  # the resumed run rebuilds its SAE from run_state.json
    assert main(["train", "--resume", str(run), "--tokens", str(6 * BATCH),
                 "--no-progress", "-q"]) == 0
    assert main(["train", *world.flags(straight, 6), "--init-from", str(world.source)]) == 0
    resumed, reference = SAE.load(run), SAE.load(straight)
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], tensor, rtol=0, atol=0)
    assert resumed.cfg.metadata.init_from["source"] == str(copy)
    saved = yaml.safe_load((run / "run_config.yaml").read_text())
    assert saved["sae"]["init_from"] == str(copy)
    # A resumed fine-tuning run still refuses to change what the SAE is.
    assert main(["train", "--resume", str(run), "--k", "4", "--no-progress", "-q"]) == 2


def test_an_empty_init_from_is_refused() -> None:
    with pytest.raises(ConfigError, match="init_from must name"):
        TrainConfig.from_dict({"sae": {"init_from": " "}})
