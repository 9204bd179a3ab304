"""Training cross-layer transcoders from one forward pass per batch: every layer learns on
the bundled model, checkpoints resume bitwise, and the stacked batches are the model's own
activations."""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from saekit import SAE
from saekit.data.tokens import TokenWindows, window_batches
from saekit.evals.crosslayer import evaluate_clt
from saekit.models import load_model
from saekit.models.tiny import TINY_TEXTS, tiny_hooked_transformer, tiny_tokenizer
from saekit.saes.clt import clt_hooks, record_hooks
from saekit.training import SAEJob, Trainer, TrainingSection
from saekit.training.multisite import StackedBatches, multisite_store, train_clt

TEXTS = list(TINY_TEXTS) * 40


@pytest.fixture(scope="module")
def tiny_model() -> Any:
    tok = tiny_tokenizer(300)
    return load_model(tiny_hooked_transformer(300, n_layers=3, d_model=16, tokenizer=tok))


def tiny_clt(activation: str = "jumprelu") -> Any:
    torch.manual_seed(5)
    fields = {"k": 4} if activation in ("topk", "batchtopk") else {}
    return SAE.create("clt", 16, 32, n_layers=3, activation_fn=activation, **fields)


def test_stacked_batches_are_the_models_activations(tiny_model: Any) -> None:
    clt = tiny_clt()
    hooks_in, hooks_out = clt_hooks(clt)
    cfg = TrainingSection(tokens=64, batch_size=32)
    store = multisite_store(tiny_model, hooks_in + hooks_out, TEXTS, cfg, context_size=16)
    store.shuffle = False
    x, y = next(StackedBatches(store, hooks_in, hooks_out))
    assert x.shape == (32, 3, 16) and y.shape == (32, 3, 16)
    # The first rows are the first window's tokens after BOS, in order.
    windows = TokenWindows(TEXTS, tiny_model.tokenizer, 16)
    tokens = windows.batch(1)
    acts = tiny_model.activations(tokens, hooks_in + hooks_out)
    for layer in range(3):
        torch.testing.assert_close(x[:5, layer], acts[hooks_in[layer]][0, 1:6])
        torch.testing.assert_close(y[:5, layer], acts[hooks_out[layer]][0, 1:6])


class SignalAt:
    """Passes stacked batches through, sending SIGINT to this process at batch `at`."""

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


def test_resume_is_bitwise_exact(tiny_model: Any, tmp_path: Path) -> None:
    # A target-L0 controller and quiet-latent lifting: their states must survive too.
    cfg = TrainingSection(tokens=12 * 64, batch_size=64, lr=3e-3, target_l0=3,
                          sparsity_coefficient=0.1, dead_after_tokens=256)

    def run(stop_at: int | None, run_dir: Path | None, resume: bool = False) -> Any:
        clt = tiny_clt()
        hooks_in, hooks_out = clt_hooks(clt)
        store = multisite_store(
            tiny_model, hooks_in + hooks_out, TEXTS, cfg, context_size=16, seed=3
        )
        data: Any = StackedBatches(store, hooks_in, hooks_out)
        if stop_at is not None:
            data = SignalAt(data, stop_at)
        trainer = Trainer(SAEJob(clt, cfg, name="clt"), data, run_dir,
                          checkpoint_every=10**9 if run_dir else None)
        return trainer.fit(resume=resume)

    reference = run(None, None)
    stopped = run(5, tmp_path / "run")
    assert stopped.interrupted == signal.SIGINT and stopped.tokens == 5 * 64
    resumed = run(None, tmp_path / "run", resume=True)
    assert resumed.tokens == reference.tokens
    for name, tensor in reference.saes["clt"].state_dict().items():
        assert torch.equal(tensor, resumed.saes["clt"].state_dict()[name]), name


@pytest.mark.parametrize("activation", ["topk", "batchtopk", "jumprelu", "relu"])
def test_every_rule_trains_on_a_tiny_model(tiny_model: Any, activation: str) -> None:
    cfg = TrainingSection(tokens=6 * 64, batch_size=64, lr=3e-3,
                          target_l0=None if activation in ("topk", "batchtopk") else 4)
    result = train_clt(tiny_clt(activation), tiny_model, TEXTS, cfg, context_size=16)
    trained = result.saes["clt"]
    assert result.tokens == cfg.tokens
    assert trained.cfg.activation_fn == ("jumprelu" if activation == "batchtopk" else activation)
    assert result.sparsity["clt"].shape == (3 * 32,)
    assert trained.cfg.metadata.extra["hook_names"][1] == "blocks.1.ln2.hook_normalized"


def test_training_on_the_bundled_model_lowers_every_layers_fvu(tmp_path: Path) -> None:
    model = load_model("bundled")
    torch.manual_seed(0)
    clt = SAE.create("clt", 256, 256, n_layers=4, activation_fn="topk", k=16)
    record_hooks(clt, *clt_hooks(clt))
    heldout = window_batches(TokenWindows("bundled", model.tokenizer, 32, split="test"), 512)
    before = evaluate_clt(clt, model, heldout, downstream=False)
    cfg = TrainingSection(tokens=16 * 512, batch_size=512, lr=3e-3)
    result = train_clt(clt, model, "bundled", cfg, context_size=32)
    trained = result.saes["clt"]
    after = evaluate_clt(trained, model, heldout, downstream=False)
    for layer, (old, new) in enumerate(zip(before.fvu, after.fvu, strict=True)):
        # Below 0.9: more than the mean (which b_dec alone would give, FVU 1) explains.
        assert new < min(old, 0.9), (layer, old, new)
    # k per token and layer (fewer only where under k pre-activations are positive).
    assert 15.5 < after.l0 <= 16.0
    folder = trained.save(tmp_path / "clt", sparsity=result.sparsity["clt"])
    reloaded = evaluate_clt(SAE.load(folder), model, heldout, downstream=False)
    assert reloaded.fvu == pytest.approx(after.fvu)
