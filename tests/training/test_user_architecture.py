"""An architecture written by a user, in the user's own module, trains, saves, loads and
evaluates with no edit to saekit: through `saekit.train`, through `saekit train --import`,
and through an installed package's entry point."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import saekit
from saekit.cli import main
from saekit.saes import registry

# A ReLU SAE with its own penalty (the sum of squared latents) and a top-k subclass. Their
# names are unique to this file: the registry lives as long as the test process.
USER_MODULE = '''
import torch
from saekit import SAE, register_architecture
from saekit.saes.topk import TopKSAE


@register_architecture("user_relu_l2")
class ReluL2(SAE):
    loss_coefficients = {"l2": "sparsity_coefficient"}

    def activation(self, hidden_pre):
        return torch.relu(hidden_pre)

    def sparsity_losses(self, x, hidden_pre, latents, settings):
        return {"l2": settings.sparsity_coefficient * latents.pow(2).sum(-1).mean()}


@register_architecture("user_topk")
class UserTopK(TopKSAE):
    default_k = 12
'''

ENTRY_POINT_MODULE = '''
import torch
from saekit import SAE


class HalfReLU(SAE):
    """Registered by the entry point's name, not by a decorator."""

    loss_coefficients = {"l1": "sparsity_coefficient"}

    def activation(self, hidden_pre):
        return 0.5 * torch.relu(hidden_pre)

    def sparsity_losses(self, x, hidden_pre, latents, settings):
        return {"l1": settings.sparsity_coefficient * latents.abs().sum(-1).mean()}
'''


def budget(out: Path) -> list[str]:
    return [
        "--tokens", "1024", "--batch-size", "256", "--context-size", "32",
        "--eval-tokens", "256", "--expansion-factor", "2", "--l1-coefficient", "0.5",
        "--out", str(out), "--no-progress", "--no-report",
    ]


@pytest.fixture(scope="module")
def user_module(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("user") / "user_saes_for_tests.py"
    path.write_text(textwrap.dedent(USER_MODULE))
    return path


def test_a_users_architecture_trains_saves_loads_and_evaluates(
    user_module: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    code = main(["train", "--import", str(user_module), "--architecture", "user_relu_l2",
                 *budget(run)])
    assert code == 0
    sae = saekit.SAE.load(run)
    assert type(sae).__name__ == "ReluL2" and sae.architecture == "user_relu_l2"
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 < metrics["explained_variance"] <= 1
    # Its own loss term reached the log, weighted by the coefficient the class declared.
    from saekit.training.runlog import read_log

    assert "l2_loss" in read_log(run)[-1]
    later = saekit.evaluate(sae, dataset=["The king is dead. " * 40] * 4, tokens=128,
                            context_size=32, downstream=False)
    assert later.l0 > 0


def test_a_topk_subclass_takes_k_and_its_own_default(user_module: Path, tmp_path: Path) -> None:
    from saekit.saes.registry import import_modules

    import_modules([str(user_module)])
    cfg = {
        "sae": {"architecture": "User_TopK", "expansion_factor": 2},  # any case
        "data": {"context_size": 32, "eval_tokens": 256},
        "training": {"tokens": 1024, "batch_size": 256},
        "run": {"out": str(tmp_path / "default_k"), "progress": False, "report": False},
    }
    assert saekit.train(cfg).sae.cfg.k == 12  # the class's default, not saekit's
    cfg["sae"]["k"] = 5
    cfg["run"]["out"] = str(tmp_path / "k5")
    out = saekit.train(cfg)
    assert out.sae.cfg.k == 5 and out.metrics["l0"] == pytest.approx(5.0)


def test_an_installed_plugin_is_found_by_its_entry_point(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What `pip install` of a package declaring the entry point leaves on the path.
    (tmp_path / "half_relu_plugin.py").write_text(textwrap.dedent(ENTRY_POINT_MODULE))
    info = tmp_path / "half_relu_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: half-relu-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(
        f"[{registry.ENTRY_POINT_GROUP}]\nuser_half_relu = half_relu_plugin:HalfReLU\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    run = tmp_path / "run"
    assert main(["train", "--architecture", "user_half_relu", *budget(run)]) == 0
    # A new process with the package installed loads the folder with no import of its own.
    script = (
        f"import saekit, torch; sae = saekit.SAE.load(r'{run}'); "
        "print(type(sae).__name__, sae.architecture, bool(torch.isfinite(sae.W_enc).all()))"
    )
    env = {"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["HalfReLU", "user_half_relu", "True"]


def test_every_architecture_keeps_its_contract() -> None:
    """Each registered class declares what the trainer asks of it, truthfully: its training
    losses are "mse" and the terms it names, and its coefficients are real settings."""
    from dataclasses import fields

    from sae_factory import random_sae

    from saekit.saes.base import LossSettings

    settings = LossSettings(sparsity_coefficient=0.1)
    setting_names = {f.name for f in fields(LossSettings)}
    for name in saekit.list_architectures():
        cls = saekit.architecture_class(name)
        assert cls.sparsity_control in ("k", "coefficient"), name
        assert set(cls.loss_coefficients.values()) - {None} <= setting_names, name
        assert set(cls.dead_latent_remedy.losses) <= set(cls.loss_coefficients), name
        if cls.multi_site:  # stacked inputs: tests/saes/test_clt.py checks its contract
            continue
        sae = random_sae(name)
        x = torch.randn(64, sae.cfg.d_in)
        target = torch.randn(64, sae.cfg.output_width) if sae.is_transcoder else None
        dead = torch.ones(sae.cfg.d_sae, dtype=torch.bool)
        out = sae.training_forward(x, target, settings, dead)
        assert set(out.losses) <= {"mse", *cls.loss_coefficients}, (name, set(out.losses))
