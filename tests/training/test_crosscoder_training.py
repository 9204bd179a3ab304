"""Training crosscoders: on two layers of the bundled model from one forward pass, and on
the same hook of the bundled model and a perturbed copy (model diffing), each model run once
per batch on the same tokens."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

from saekit import SAE
from saekit.data.tokens import TokenWindows, window_batches
from saekit.models import load_model
from saekit.models.side_by_side import SideBySideModels
from saekit.models.tiny import TINY_TEXTS, tiny_hooked_transformer, tiny_tokenizer
from saekit.saes.crosscoder import MODELS_KEY, SITE_HOOKS_KEY, Crosscoder
from saekit.training import SAEJob, Trainer, TrainingSection
from saekit.training.multisite import (
    StackedBatches,
    multisite_store,
    train_crosscoder,
)

HOOKS = ["blocks.1.hook_resid_pre", "blocks.2.hook_resid_pre"]


@pytest.fixture(autouse=True)
def _single_thread(one_thread: None) -> None:
    """Small matmuls run fastest on one thread."""


@pytest.fixture(scope="module")
def perturbed() -> Any:
    """The bundled model with block 1's MLP output weights tripled: the same up to block
    1's MLP, different after it."""
    model = load_model("bundled")
    with torch.no_grad():
        model.model.transformer.h[1].mlp.c_proj.weight.mul_(3.0)
    model.name = "bundled-mlp1x3"
    return model


def stacked_heldout(models: list[Any], hooks: list[str]) -> Tensor:
    """[tokens, sites, d]: site i is hooks[i] of models[i] (or of the one model) on the
    same held-out windows, every position kept."""
    tokenizer = models[0].tokenizer
    batches = window_batches(TokenWindows("bundled", tokenizer, 32, split="test"), 512)
    rows = []
    for tokens in batches:
        sites = []
        for i, hook in enumerate(hooks):
            model = models[i] if len(models) > 1 else models[0]
            sites.append(model.activations(tokens, [hook])[hook].flatten(0, 1))
        rows.append(torch.stack(sites, dim=1))
    return torch.cat(rows)


def fvu_per_site(cc: Crosscoder, x: Tensor) -> list[float]:
    """Squared error over total variance, per site."""
    with torch.no_grad():
        recon = cc(x)
    error = (recon - x).pow(2).sum(dim=(0, 2))
    variance = (x - x.mean(dim=0)).pow(2).sum(dim=(0, 2))
    return (error / variance).tolist()


def test_two_layers_of_one_model_from_one_pass(bundled: Any, tmp_path: Path) -> None:
    torch.manual_seed(0)
    cc = SAE.create("crosscoder", 256, 256, n_layers=2, activation_fn="batchtopk", k=16)
    assert isinstance(cc, Crosscoder)
    heldout = stacked_heldout([bundled], HOOKS)
    before = fvu_per_site(cc, heldout)
    cfg = TrainingSection(tokens=8 * 256, batch_size=256, lr=3e-3)
    result = train_crosscoder(cc, bundled, "bundled", cfg, hooks=HOOKS, context_size=32,
        buffer_size=2048,
    )
    trained = result.saes["crosscoder"]
    assert isinstance(trained, Crosscoder) and result.tokens == cfg.tokens
    after = fvu_per_site(trained, heldout)
    for site, (old, new) in enumerate(zip(before, after, strict=True)):
        # Below 0.8: far more than the mean (b_dec alone, FVU 1) is explained.
        assert new < min(old, 0.8), (site, old, new)
    assert trained.cfg.metadata.extra[SITE_HOOKS_KEY] == HOOKS
    assert trained.cfg.metadata.model_name == "bundled"
    assert result.sparsity["crosscoder"].shape == (256,)
    folder = trained.save(tmp_path / "cc", sparsity=result.sparsity["crosscoder"])
    assert fvu_per_site(SAE.load(folder), heldout) == pytest.approx(after)


def test_side_by_side_rows_are_each_models_activations_of_the_same_tokens(
    bundled: Any, perturbed: Any
) -> None:
    pair = SideBySideModels([bundled, perturbed])
    keys = [pair.site(0, "blocks.3.hook_resid_pre"), pair.site(1, "blocks.3.hook_resid_pre")]
    cfg = TrainingSection(tokens=64, batch_size=64)
    store = multisite_store(pair, keys, TINY_TEXTS * 4, cfg, context_size=16)
    store.shuffle = False
    x = next(StackedBatches(store, keys))
    assert x.shape == (64, 2, 256)
    tokens = TokenWindows(TINY_TEXTS * 4, bundled.tokenizer, 16).batch(1)
    hook = "blocks.3.hook_resid_pre"
    # The first rows are the first window's tokens after BOS, in order, from each model.
    torch.testing.assert_close(x[:5, 0], bundled.activations(tokens, [hook])[hook][0, 1:6])
    torch.testing.assert_close(x[:5, 1], perturbed.activations(tokens, [hook])[hook][0, 1:6])
    assert not torch.allclose(x[:, 0], x[:, 1])
    # Before the perturbed MLP the two models agree exactly.
    early = [pair.site(0, "blocks.1.hook_resid_pre"), pair.site(1, "blocks.1.hook_resid_pre")]
    acts = pair.activations(tokens, early)
    torch.testing.assert_close(acts[early[0]], acts[early[1]])


def test_model_diffing_trains_on_a_model_and_its_perturbed_copy(
    bundled: Any, perturbed: Any
) -> None:
    torch.manual_seed(1)
    hook = "blocks.3.hook_resid_pre"
    cc = SAE.create("crosscoder", 256, 256, n_layers=2, activation_fn="relu")
    assert isinstance(cc, Crosscoder)
    heldout = stacked_heldout([bundled, perturbed], [hook, hook])
    before = fvu_per_site(cc, heldout)
    cfg = TrainingSection(tokens=8 * 256, batch_size=256, target_l0=32)
    result = train_crosscoder(
        cc, [bundled, perturbed], "bundled", cfg, hooks=hook, context_size=32, buffer_size=2048,
    )
    trained = result.saes["crosscoder"]
    after = fvu_per_site(trained, heldout)
    for site, (old, new) in enumerate(zip(before, after, strict=True)):
        assert new < min(old, 0.8), (site, old, new)
    meta = trained.cfg.metadata
    assert meta.extra[MODELS_KEY] == ["bundled", "bundled-mlp1x3"]
    assert meta.extra[SITE_HOOKS_KEY] == [hook, hook] and meta.hook_name == hook


def test_bad_sites_are_refused_before_training(bundled: Any) -> None:
    cc = SAE.create("crosscoder", 256, 64, n_layers=2)
    cfg = TrainingSection(tokens=512, batch_size=256)
    with pytest.raises(ValueError, match="needs 2 hook names"):
        train_crosscoder(cc, bundled, "bundled", cfg, hooks=HOOKS[:1] * 3)
    with pytest.raises(ValueError, match="one model and one hook"):
        train_crosscoder(cc, bundled, "bundled", cfg, hooks=HOOKS[0])
    with pytest.raises(ValueError, match="must differ"):
        train_crosscoder(cc, bundled, "bundled", cfg, hooks=[HOOKS[0], HOOKS[0]])
    with pytest.raises(ValueError, match="3 models"):
        train_crosscoder(cc, [bundled] * 3, "bundled", cfg, hooks=HOOKS[0])
    with pytest.raises(ValueError, match="other widths"):
        narrow = SAE.create("crosscoder", 128, 64, n_layers=2)
        train_crosscoder(narrow, bundled, "bundled", cfg, hooks=HOOKS)
    with pytest.raises(ValueError, match="trains a crosscoder"):
        train_crosscoder(SAE.create("topk", 256, 64), bundled, "bundled", cfg, hooks=HOOKS)
    tiny = load_model(tiny_hooked_transformer(300, n_layers=2, d_model=16,
                                              tokenizer=tiny_tokenizer(300)))
    with pytest.raises(ValueError, match="share a tokenizer"):
        SideBySideModels([bundled, tiny])


class SignalAt:
    """Passes batches through, sending SIGINT to this process at batch `at`."""

    def __init__(self, inner: StackedBatches, at: int) -> None:
        self.inner, self.at, self.count = inner, at, 0

    def __iter__(self) -> SignalAt:
        return self

    def __next__(self) -> Any:
        self.count += 1
        if self.count == self.at:
            os.kill(os.getpid(), signal.SIGINT)
        return next(self.inner)

    def state_dict(self) -> Any:
        return self.inner.state_dict()

    def load_state_dict(self, state: Any) -> None:
        self.inner.load_state_dict(state)


def test_model_diffing_resumes_bitwise_from_a_checkpoint(tmp_path: Path) -> None:
    tok = tiny_tokenizer(300)
    models = [
        load_model(tiny_hooked_transformer(300, n_layers=2, d_model=16, seed=s, tokenizer=tok))
        for s in (0, 1)
    ]
    pair = SideBySideModels(models)
    keys = [pair.site(i, "blocks.1.hook_resid_pre") for i in range(2)]
    cfg = TrainingSection(tokens=10 * 64, batch_size=64, lr=3e-3, target_l0=3,
                          dead_after_tokens=256)

    def run(stop_at: int | None, run_dir: Path | None, resume: bool = False) -> Any:
        torch.manual_seed(2)
        cc = SAE.create("crosscoder", 16, 32, n_layers=2)
        store = multisite_store(pair, keys, TINY_TEXTS * 40, cfg, context_size=16, seed=3,
                                buffer_size=256)
        data: Any = StackedBatches(store, keys)
        if stop_at is not None:
            data = SignalAt(data, stop_at)
        trainer = Trainer(SAEJob(cc, cfg, name="crosscoder"), data, run_dir,
                          checkpoint_every=10**9 if run_dir else None)
        return trainer.fit(resume=resume)

    reference = run(None, None)
    stopped = run(4, tmp_path / "run")
    assert stopped.interrupted == signal.SIGINT and stopped.tokens == 4 * 64
    resumed = run(None, tmp_path / "run", resume=True)
    assert resumed.tokens == reference.tokens
    for name, tensor in reference.saes["crosscoder"].state_dict().items():
        assert torch.equal(tensor, resumed.saes["crosscoder"].state_dict()[name]), name
