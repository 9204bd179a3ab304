"""Results that must never be wrong: the norm factor against outliers, NaN and infinity in
activations named where they came from, and no finished run or saved SAE with
non-finite weights."""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from sae_factory import random_sae
from safetensors.torch import load_file, save, save_file
from training.training_helpers import make_sae, small_config

import saekit
from saekit import SAE
from saekit.cli import main
from saekit.data.buffer import robust_mean_norm
from saekit.data.cache import CachedActivations, write_activation_cache
from saekit.data.store import ActivationStore
from saekit.finite import NonFiniteActivations, NonFiniteWeights
from saekit.models import load_model
from saekit.models.tiny import TINY_TEXTS, tiny_gpt2, tiny_hooked_transformer, tiny_tokenizer
from saekit.training import SAEJob, Trainer, TrainingDiverged
from saekit.training import checkpoint as ckpt
from saekit.training.trainer import NonFiniteInput

HOOK = "blocks.1.hook_resid_pre"
TEXTS = [f"to be or not to be, that is the question number {i}. " * 12 for i in range(160)]
ROWS = 4096
SHARD_ROWS = 1024
BATCH = 256

pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module")
def model(tiny_tl_model: object) -> object:
    return tiny_tl_model


@pytest.fixture(scope="module")
def tokenizer(model: object) -> object:
    return model.tokenizer  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def clean_cache(tmp_path_factory: pytest.TempPathFactory, model: object) -> Path:
    """ROWS rows at HOOK (d_in 32) in shards of about SHARD_ROWS rows."""
    out = tmp_path_factory.mktemp("cache") / "acts"
    write_activation_cache(
        load_model(model), HOOK, TEXTS, out, ROWS, context_size=32, model_batch_size=16,
        shard_rows=SHARD_ROWS,
    )
    return out


def copy_cache(source: Path, dest: Path) -> Path:
    dest.mkdir(parents=True)
    for file in source.iterdir():
        (dest / file.name).write_bytes(file.read_bytes())
    return dest


def rewrite_shard(cache: Path, index: int, row: int, value: float) -> str:
    """Set one row of shard `index` to `value`, recording the new size and CRC-32 as the
    writer would (the file stays a well-formed shard); returns the shard's file name."""
    records = json.loads((cache / "progress.json").read_text())
    record = records[index]
    tensors = load_file(str(cache / record["file"]))
    tensors[HOOK][row] = value
    data = save(tensors)
    (cache / record["file"]).write_bytes(data)
    record["bytes"], record["crc32"] = len(data), f"{zlib.crc32(data):08x}"
    (cache / "progress.json").write_text(json.dumps(records))
    return record["file"]


def all_rows(cache: Path) -> torch.Tensor:
    records = json.loads((cache / "progress.json").read_text())
    return torch.cat([load_file(str(cache / r["file"]))[HOOK] for r in records]).double()


# ----- the norm scaling factor ---------------------------------------------------------------


def test_one_extreme_row_leaves_the_norm_factor_within_1_percent(
    clean_cache: Path, tmp_path: Path
) -> None:
    rows = all_rows(clean_cache)
    assert rows.shape == (ROWS, 32)
    clean_expected = math.sqrt(32) / rows.norm(dim=-1).mean().item()
    reader = CachedActivations(clean_cache, batch_size=BATCH, buffer_size=BATCH, shuffle=False)
    clean = reader.estimate_norm_scaling_factor(ROWS // BATCH)
    # On clean data the estimate is the definition sqrt(d_in) / E||x|| itself.
    assert clean == pytest.approx(clean_expected, rel=1e-9)

    cache = copy_cache(clean_cache, tmp_path / "outlier")
    rewrite_shard(cache, 1, 17, 1e30)
    reader = CachedActivations(cache, batch_size=BATCH, buffer_size=BATCH, shuffle=False)
    with_outlier = reader.estimate_norm_scaling_factor(ROWS // BATCH)
    assert with_outlier == pytest.approx(clean, rel=0.01)
    # A plain mean would have put the factor near 4096 / (1e30 * sqrt(32)).
    plain = math.sqrt(32) / all_rows(cache).norm(dim=-1).mean().item()
    assert plain < 1e-20


def test_robust_mean_norm_is_the_plain_mean_without_outliers() -> None:
    generator = torch.Generator().manual_seed(0)
    norms = torch.rand(1000, generator=generator, dtype=torch.float64) + 0.5
    norms[::128] *= 40  # genuinely large rows (a model's first positions) still count
    assert robust_mean_norm(norms) == pytest.approx(norms.mean().item(), rel=1e-12)
    poisoned = torch.cat([norms, torch.tensor([1e30], dtype=torch.float64)])
    assert robust_mean_norm(poisoned) == pytest.approx(norms.mean().item(), rel=1e-12)
    with pytest.raises(NonFiniteActivations, match="row 3"):
        robust_mean_norm(torch.tensor([1.0, 2.0, 3.0, math.nan], dtype=torch.float64), "h")
    with pytest.raises(ValueError, match="every activation row read at h is zero"):
        robust_mean_norm(torch.zeros(5, dtype=torch.float64), "h")


def test_a_run_on_a_cache_with_an_extreme_row_fails_clearly_and_saves_nothing(
    clean_cache: Path, model: object, tmp_path: Path
) -> None:
    cache = copy_cache(clean_cache, tmp_path / "outlier")
    rewrite_shard(cache, 2, 5, 1e30)
    out = tmp_path / "run"
    cfg = {
        "sae": {"architecture": "topk", "expansion_factor": 2, "k": 8},
        "data": {"context_size": 32, "eval_tokens": 0, "activations": str(cache)},
        "training": {"tokens": ROWS, "batch_size": BATCH, "lr": 1e-3},
        "run": {"out": str(out), "progress": False, "checkpoint_every": 512},
    }
    # The row holds 1e30 in each of its 32 features: norm 1e30 * sqrt(32).
    with pytest.raises(NonFiniteInput, match=r"has norm 5\.66e\+30, whose square overflows"):
        saekit.train(cfg, model=model, dataset=TEXTS)
    clean = math.sqrt(32) / all_rows(clean_cache).norm(dim=-1).mean().item()
    state = json.loads((out / "run_state.json").read_text())
    assert state["norm_scaling_factor"] == pytest.approx(clean, rel=0.01)
    assert not (out / "cfg.json").exists() and not (out / "metrics.json").exists()
    assert ckpt.latest_checkpoint(out) is not None


# ----- NaN and infinity in the activations ---------------------------------------------------


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_a_non_finite_cache_row_names_the_shard_and_row(
    clean_cache: Path, tmp_path: Path, value: float
) -> None:
    cache = copy_cache(clean_cache, tmp_path / "bad")
    name = rewrite_shard(cache, 2, 17, value)
    reader = CachedActivations(cache, batch_size=BATCH, buffer_size=BATCH, shuffle=False)
    with pytest.raises(NonFiniteActivations, match=rf"{name}.*{value} at row 17, feature 0"):
        list(reader)
    reader = CachedActivations(cache, batch_size=BATCH, buffer_size=BATCH, shuffle=False)
    with pytest.raises(NonFiniteActivations, match=rf"{name}.*row 17"):
        reader.estimate_norm_scaling_factor(ROWS // BATCH)


def test_nan_from_the_model_names_the_forward_pass_and_token() -> None:
    tok = tiny_tokenizer(300)
    poisoned = tiny_gpt2(300)
    with torch.no_grad():
        poisoned.transformer.wpe.weight[5] = math.nan  # every sequence's position 5
    # The embeddings (blocks.0.hook_resid_pre): attention would spread a NaN to every position.
    store = ActivationStore(
        load_model(poisoned, tokenizer=tok), "blocks.0.hook_resid_pre", list(TINY_TEXTS) * 2,
        context_size=16,
        batch_size=8, buffer_size=64, model_batch_size=3, exclude_special_tokens=False,
    )
    with pytest.raises(
        NonFiniteActivations,
        match=r"at blocks\.0\.hook_resid_pre are not finite: nan in model forward pass 1 "
        r"\(sequence 0 of 3, token position 5, feature 0; 96 non-finite values in 3 token rows",
    ):
        next(store)


def test_nan_in_a_model_stream_mid_run_stops_it_and_keeps_the_checkpoints(
    tokenizer: object, tmp_path: Path
) -> None:
    poisoned = tiny_hooked_transformer(tokenizer=tokenizer)
    calls = {"n": 0}

    def go_bad(module: object, args: object, output: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return output * math.nan if calls["n"] > 24 else output

    poisoned.embed.register_forward_hook(go_bad)
    out = tmp_path / "run"
    cfg = {
        "sae": {"architecture": "topk", "expansion_factor": 2, "k": 8},
        "data": {"context_size": 32, "eval_tokens": 0},
        "training": {"tokens": 65536, "batch_size": 512, "lr": 1e-3},
        "run": {"out": str(out), "progress": False, "checkpoint_every": 2048},
    }
    # The store runs 32 sequences per forward pass, and a shuffle buffer takes 16 of them:
    # the NaN comes in the second buffer, after several checkpoints.
    with pytest.raises(
        NonFiniteActivations, match=r"nan in model forward pass \d+ \(sequence 0 of 32, token"
    ):
        saekit.train(cfg, model=poisoned, dataset=TEXTS * 4)
    assert ckpt.latest_checkpoint(out) is not None
    assert not (out / "cfg.json").exists() and not (out / "metrics.json").exists()


def test_an_extreme_input_row_is_named_instead_of_blaming_the_learning_rate(
    tmp_path: Path,
) -> None:
    def stream() -> Iterator[torch.Tensor]:
        generator = torch.Generator().manual_seed(0)
        for step in range(10):
            batch = torch.randn(256, 16, generator=generator)
            if step == 3:
                batch[7] = 1e30
            yield batch

    job = SAEJob(make_sae("topk"), small_config(10))
    with pytest.raises(NonFiniteInput, match=r"step 4 .*row 7 of the batch's input .*norm 4e\+30,"):
        Trainer(job, stream(), tmp_path / "run", checkpoint_every=512).fit()


# ----- no finished run or saved SAE with non-finite weights ----------------------------------


def clean_stream(steps: int) -> Iterator[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    for _ in range(steps):
        yield torch.randn(256, 16, generator=generator)


def test_non_finite_final_weights_fail_the_run_and_keep_the_checkpoint(tmp_path: Path) -> None:
    # A norm factor of 1e-40 trains fine but cannot be folded: W_dec / 1e-40 overflows.
    job = SAEJob(make_sae("standard"), small_config(6), norm_scale=1e-40)
    run = tmp_path / "run"
    with pytest.raises(NonFiniteWeights, match=r"'W_dec' holds .*last good state stays in") as err:
        Trainer(job, clean_stream(6), run, checkpoint_every=512).fit()
    assert "norm scaling factor of 1e-40" in str(err.value)
    found = ckpt.latest_checkpoint(run)
    assert found is not None and found.name.endswith(f"{6 * 256:015d}")
    saved = ckpt.read_checkpoint(found)["jobs"]["sae"]["sae"]
    assert all(torch.isfinite(t).all() for t in saved.values())


def test_a_checkpoint_of_non_finite_weights_is_refused(tmp_path: Path) -> None:
    job = SAEJob(make_sae("topk"), small_config(4))
    run = tmp_path / "run"
    trainer = Trainer(job, clean_stream(4), run, checkpoint_every=512)
    trainer.fit()
    good = ckpt.latest_checkpoint(run)
    with torch.no_grad():
        job.sae.W_enc[0, 0] = math.inf
    with pytest.raises(TrainingDiverged, match=rf"'W_enc' holds inf.*stays in {good}"):
        trainer._checkpoint()
    assert ckpt.latest_checkpoint(run) == good


def test_norm_scale_must_be_positive_and_finite() -> None:
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="norm_scale"):
            SAEJob(make_sae("topk"), small_config(2), norm_scale=bad)


def test_save_refuses_non_finite_weights_and_writes_nothing(tmp_path: Path) -> None:
    sae = random_sae("jumprelu")
    with torch.no_grad():
        sae.W_dec[3, 1] = math.nan
    with pytest.raises(NonFiniteWeights, match=r"'W_dec' holds nan at index \[3, 1\]"):
        sae.save(tmp_path / "sae")
    assert not (tmp_path / "sae").exists()


def test_save_refuses_a_nan_sparsity(tmp_path: Path) -> None:
    sparsity = torch.full((32,), -2.0)
    sparsity[4] = math.nan
    with pytest.raises(NonFiniteWeights, match="latent 4"):
        random_sae("standard").save(tmp_path / "sae", sparsity=sparsity)
    assert not (tmp_path / "sae").exists()


def test_upload_refuses_a_folder_with_non_finite_weights(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = random_sae("standard").save(tmp_path / "sae")
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    tensors["W_enc"][0, 2] = math.inf
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    code = main(["upload", str(folder), "someone/some-sae"])
    assert code == 2
    err = capsys.readouterr().err
    assert "saekit: error:" in err and "'W_enc' holds inf" in err
    assert "sae_weights.safetensors" in err
    with pytest.raises(NonFiniteWeights):
        SAE.load(folder)
