"""SAEs that read several sites at once (cross-layer transcoders, crosscoders) where one hook
per SAE is expected: the evaluation of one-hook SAEs (`evaluate_saes`, `evaluate`, the
trainer's evaluator, `saekit eval`) and splicing a crosscoder refuse them in one line, before
any work, naming the evaluation that takes them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from saekit import SAE, SAEMetadata
from saekit.analysis import SplicedModel
from saekit.cli import main
from saekit.evals import evaluate, evaluate_saes, make_evaluator, sae_site
from saekit.models import load_model
from saekit.models.tiny import tiny_gpt2, tiny_tokenizer
from saekit.saes.clt import layer_hooks, record_hooks
from saekit.saes.crosscoder import SITE_HOOKS_KEY

D_MODEL, VOCAB = 32, 300
HOOKS = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"]
#: A model no test can load: an evaluation that reached the model would fail on it instead.
MISSING_MODEL = "no/such/model/folder"


@pytest.fixture(autouse=True)
def _single_thread(one_thread: None) -> None:
    """Tiny matmuls run fastest on one thread."""


@pytest.fixture(scope="module")
def backend() -> Any:
    return load_model(tiny_gpt2(VOCAB, d_model=D_MODEL), tokenizer=tiny_tokenizer(VOCAB))


def layer_crosscoder() -> SAE:
    """A crosscoder over two layers of the tiny model, its sites in its metadata."""
    cc = SAE.create("crosscoder", D_MODEL, 16, n_layers=2,
                    metadata=SAEMetadata(model_name=MISSING_MODEL))
    cc.cfg.metadata.extra[SITE_HOOKS_KEY] = list(HOOKS)
    return cc


def diffing_crosscoder() -> SAE:
    """A model-diffing crosscoder: one hook of two models, so its metadata has a hook_name
    that a one-hook evaluation could take for its site."""
    cc = SAE.create("crosscoder", D_MODEL, 16, n_layers=2, metadata=SAEMetadata(
        model_name=MISSING_MODEL, hook_name=HOOKS[1]))
    cc.cfg.metadata.extra[SITE_HOOKS_KEY] = [HOOKS[1], HOOKS[1]]
    return cc


def clt() -> SAE:
    """A CLT over both layers of the tiny model, its hooks in its metadata."""
    made = SAE.create("clt", D_MODEL, 16, n_layers=2, activation_fn="relu",
                      metadata=SAEMetadata(model_name=MISSING_MODEL))
    record_hooks(made, layer_hooks(range(2), "ln2.hook_normalized"),  # type: ignore[arg-type]
                 layer_hooks(range(2), "hook_mlp_out"))
    return made


#: (maker, what the message names instead) for every kind of multi-site SAE.
MULTI_SITE = [
    pytest.param(layer_crosscoder, "saekit.evals.crosscoder.evaluate_crosscoder", id="layers"),
    pytest.param(diffing_crosscoder, "saekit.evals.crosscoder.evaluate_crosscoder",
                 id="diffing"),
    pytest.param(clt, "saekit.evals.crosslayer.evaluate_clt", id="clt"),
]


class Untouched:
    """Token batches that record whether anyone started reading them."""

    def __init__(self) -> None:
        self.read = False

    def __iter__(self) -> Iterator[torch.Tensor]:
        self.read = True
        yield torch.randint(3, VOCAB, (2, 8))


def one_line(err: pytest.ExceptionInfo[ValueError]) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize(("make", "use"), MULTI_SITE)
def test_evaluate_saes_refuses_before_reading_tokens(backend: Any, make: Any, use: str) -> None:
    batches = Untouched()
    with pytest.raises(ValueError, match="evaluate_saes takes SAEs that read one hook") as err:
        evaluate_saes(backend, [make()], batches)
    assert use in one_line(err)
    assert not batches.read
    # The same when the caller gives the site (the model-diffing crosscoder's hook would
    # otherwise fit it) and when it comes after an SAE that is fine.
    fine = SAE.create("topk", D_MODEL, 16, k=2, metadata=SAEMetadata(hook_name=HOOKS[0]))
    with pytest.raises(ValueError, match=use.split(".")[-1]):
        evaluate_saes(backend, [fine, make()], batches,
                      sites=[sae_site(fine), sae_site(fine)])
    assert not batches.read


@pytest.mark.parametrize(("make", "use"), MULTI_SITE)
def test_evaluate_refuses_before_loading_the_model(make: Any, use: str) -> None:
    # The metadata names a model that does not exist: had `evaluate` gone as far as loading
    # it, the error would be about that model.
    with pytest.raises(ValueError, match="evaluate and evaluate_many take SAEs") as err:
        evaluate(make(), tokens=64)
    assert use in one_line(err) and MISSING_MODEL not in str(err.value)
    with pytest.raises(ValueError, match=use.split(".")[-1]):
        evaluate(make(), tokens=64, suite="core")


@pytest.mark.parametrize(("make", "use"), MULTI_SITE)
def test_the_trainers_evaluator_and_sae_site_refuse(backend: Any, make: Any, use: str) -> None:
    evaluator = make_evaluator(backend, torch.randint(3, VOCAB, (2, 8)), downstream=False)
    with pytest.raises(ValueError, match="make_evaluator's evaluator takes") as err:
        evaluator(make())
    assert use in one_line(err) and evaluator.last is None
    with pytest.raises(ValueError, match="read all at once, not one hook") as err:
        sae_site(make())
    assert use in one_line(err)


@pytest.mark.parametrize("make", [layer_crosscoder, diffing_crosscoder])
def test_a_crosscoder_does_not_splice(backend: Any, make: Any) -> None:
    model = SplicedModel(backend)
    cc = make()
    for attach in (
        lambda: model.attach(cc),
        lambda: model.attach(cc, hook=HOOKS[1]),
        lambda: model.add_sae(cc),
        lambda: model.run_with_saes(torch.randint(3, VOCAB, (1, 5)), saes=[cc]),
    ):
        with pytest.raises(ValueError, match="SplicedModel attaches SAEs that read one hook") \
                as err:
            attach()
        assert "a crosscoder over 2 sites" in one_line(err)
        assert "evaluate_crosscoder" in str(err.value)
        assert model.attached == {}
    # A CLT still attaches as a whole.
    assert model.attach(clt()) == "clt" and len(model.attached) == 2


@pytest.mark.parametrize(("make", "use"), MULTI_SITE)
def test_saekit_eval_refuses_in_one_line(
    make: Any, use: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fine = tmp_path / "fine"
    SAE.create("topk", D_MODEL, 16, k=2, metadata=SAEMetadata(
        model_name=MISSING_MODEL, hook_name=HOOKS[0])).save(fine)
    multi = tmp_path / "multi"
    make().save(multi)
    out = tmp_path / "results"
    # The one-hook SAE first: nothing is evaluated, no model loaded, before the refusal.
    assert main(["eval", str(fine), str(multi), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("saekit: error: saekit eval takes SAEs that read one hook, but "
                          f"{multi} is a ")
    assert use in err and "metrics.json of the saekit train run" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert MISSING_MODEL not in err
    assert not out.exists()
