"""The trainer on synthetic sparse features: every architecture learns, SAEs train side by
side exactly as they would alone, dead latents are tracked, bad input is refused clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from training_helpers import make_sae, small_config

from saekit import SAE, architecture_class, list_architectures
from saekit.training import SAEJob, Trainer, TrainingSection
from saekit.training.synthetic import SparseFeatureStream


def explained_variance(sae: SAE, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        recon = sae(x)
    return float(1 - (recon - y).pow(2).sum() / (y - y.mean(0)).pow(2).sum())


@pytest.mark.parametrize(
    "architecture",
    [a for a in list_architectures() if not architecture_class(a).multi_site],  # CLTs: own tests
)
def test_every_architecture_learns(architecture: str, tmp_path: Path) -> None:
    transcoder = "transcoder" in architecture
    stream = SparseFeatureStream(16, 32, 256, offset=1.0, d_out=16 if transcoder else None)
    sae = make_sae(architecture)
    records: list[dict] = []
    cfg = small_config(150, sparsity_coefficient=0.3)
    result = Trainer(SAEJob(sae, cfg), stream, log_every=10, log_sinks=[records.append]).fit()
    assert result.tokens == 150 * 256
    assert records[-1]["mse_loss"] < 0.7 * records[0]["mse_loss"]
    held = stream.held_out(2048)
    x, y = held if transcoder else (held, held)
    trained = result.saes["sae"]
    assert explained_variance(trained, x, y) > 0.6
    # The saved form loads back to the same function.
    trained.save(tmp_path / "sae")
    loaded = SAE.load(tmp_path / "sae")
    assert loaded.architecture == trained.architecture  # batchtopk publishes as jumprelu
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained(x))


@pytest.mark.parametrize("architecture", ["topk", "standard"])
def test_ground_truth_features_are_recovered(architecture: str) -> None:
    stream = SparseFeatureStream(16, 24, 256, p_min=0.02, p_max=0.08, offset=1.0)
    sae = make_sae(architecture, d_sae=48, k=3 if architecture == "topk" else None)
    cfg = small_config(300, sparsity_coefficient=0.3)
    trained = Trainer(SAEJob(sae, cfg), stream).fit().saes["sae"]
    rows = trained.W_dec / trained.W_dec.norm(dim=1, keepdim=True)
    best_cosine = (stream.features @ rows.T).max(dim=1).values  # [n_features]
    assert (best_cosine > 0.9).float().mean() >= 0.9


def test_saes_side_by_side_train_exactly_as_alone() -> None:
    def jobs() -> list[SAEJob]:
        return [
            SAEJob(make_sae("topk", seed=1), small_config(30), name="a"),
            SAEJob(make_sae("standard", d_sae=32, seed=2),
                   small_config(30, sparsity_coefficient=0.1), name="b"),
        ]

    together = Trainer(jobs(), SparseFeatureStream(16, 32, 256)).fit()
    for job in jobs():
        alone = Trainer(job, SparseFeatureStream(16, 32, 256)).fit()
        for name, tensor in alone.saes[job.name].state_dict().items():
            assert torch.equal(tensor, together.saes[job.name].state_dict()[name]), name


def test_mapping_batches_feed_each_sae_its_hook() -> None:
    class TwoHooks:
        def __init__(self) -> None:
            self.stream = SparseFeatureStream(16, 32, 256, offset=1.0)

        def __iter__(self) -> TwoHooks:
            return self

        def __next__(self) -> dict[str, torch.Tensor]:
            x = next(self.stream)
            return {"small": x, "big": 10 * x}

    jobs = [
        SAEJob(make_sae("topk"), small_config(60, b_dec_init="mean"), name="s", hook="small"),
        SAEJob(make_sae("topk"), small_config(60, b_dec_init="mean"), name="b", hook="big"),
    ]
    result = Trainer(jobs, TwoHooks()).fit()
    held = SparseFeatureStream(16, 32, 256, offset=1.0).held_out(1024)
    assert explained_variance(result.saes["s"], held, held) > 0.6
    assert explained_variance(result.saes["b"], 10 * held, 10 * held) > 0.6
    ratio = result.saes["b"].b_dec.detach().norm() / result.saes["s"].b_dec.detach().norm()
    assert 5 < float(ratio) < 20


def test_norm_scale_is_folded_so_raw_activations_work() -> None:
    # Activations 100x larger than the synthetic default: trained on x * scale, saved for x.
    stream = SparseFeatureStream(16, 32, 256, offset=1.0)
    raw = (100 * x for x in stream)
    scale = 1 / 100
    sae = make_sae("jumprelu")
    job = SAEJob(sae, small_config(150, sparsity_coefficient=0.3), norm_scale=scale)
    trained = Trainer(job, raw).fit().saes["sae"]
    held = 100 * stream.held_out(2048)
    assert trained.cfg.normalize_activations == "none"
    assert explained_variance(trained, held, held) > 0.6


def test_dead_latents_are_tracked_and_auxk_switches_on() -> None:
    stream = SparseFeatureStream(16, 8, 256, p_min=0.05, p_max=0.1)
    records: list[dict] = []
    sae = make_sae("topk", d_sae=128, k=1)
    cfg = small_config(40, dead_after_tokens=256 * 5)
    Trainer(SAEJob(sae, cfg), stream, log_every=4, log_sinks=[records.append]).fit()
    assert records[0]["dead_fraction"] == 0.0  # nothing can be dead before 5 batches
    assert "aux_k_loss" not in records[0]
    assert records[-1]["dead_fraction"] > 0.3  # 8 features cannot keep 128 latents alive
    assert records[-1]["aux_k_loss"] > 0
    never = small_config(40, dead_after_tokens=10**9)
    quiet: list[dict] = []
    Trainer(SAEJob(make_sae("topk", d_sae=128, k=1), never), SparseFeatureStream(16, 8, 256),
            log_every=5, log_sinks=[quiet.append]).fit()
    assert all("aux_k_loss" not in r and r["dead_fraction"] == 0.0 for r in quiet)


def test_dead_window_defaults_to_a_tenth_of_the_run_up_to_a_million() -> None:
    assert TrainingSection(tokens=307_200).dead_window == 30_720
    assert TrainingSection(tokens=10**9).dead_window == 1_000_000
    assert TrainingSection(tokens=307_200, dead_after_tokens=5).dead_window == 5


def test_standard_sae_dead_latents_are_revived_by_the_pre_act_term() -> None:
    finals = {}
    for coefficient in (0.0, 0.01):
        records: list[dict] = []
        cfg = small_config(80, dead_after_tokens=256 * 5, quiet_after_tokens=256 * 5,
                           sparsity_coefficient=0.3, dead_pre_act_coefficient=coefficient,
                           lift_quiet_latents=False)  # the term alone
        stream = SparseFeatureStream(16, 8, 256, p_min=0.05, p_max=0.1)
        Trainer(SAEJob(make_sae("standard", d_sae=128), cfg), stream, log_every=8,
                log_sinks=[records.append]).fit()
        assert any("dead_pre_act_loss" in r for r in records) == (coefficient > 0)
        finals[coefficient] = records[-1]
    # Without the term the latents the penalty silenced stay silent.
    assert finals[0.0]["dead_fraction"] > 0.03
    assert finals[0.01]["dead_fraction"] < finals[0.0]["dead_fraction"] / 2
    assert finals[0.01]["mse_loss"] < 1.1 * finals[0.0]["mse_loss"]


def test_unit_norm_decoder_for_topk_and_free_for_standard() -> None:
    stream = SparseFeatureStream(16, 32, 256)
    topk = Trainer(SAEJob(make_sae("topk"), small_config(20)), stream).fit().saes["sae"]
    torch.testing.assert_close(topk.W_dec.norm(dim=1), torch.ones(64))
    # standard trains with free norms and has them folded to one at the end
    standard = Trainer(SAEJob(make_sae("standard"), small_config(20)), stream).fit().saes["sae"]
    torch.testing.assert_close(standard.W_dec.norm(dim=1), torch.ones(64))


def test_bad_inputs_are_refused_with_clear_messages() -> None:
    stream = SparseFeatureStream(16, 32, 256)
    with pytest.raises(ValueError, match="transcoder and needs"):
        Trainer(SAEJob(make_sae("transcoder"), small_config(2)), stream).fit()
    with pytest.raises(ValueError, match="share one stream and one token budget"):
        Trainer([SAEJob(make_sae("topk"), small_config(2), name="a"),
                 SAEJob(make_sae("topk"), small_config(3), name="b")], stream)
    with pytest.raises(ValueError, match="ran out after 512 tokens"):
        Trainer(SAEJob(make_sae("topk"), small_config(4)), iter([next(stream)] * 2)).fit()
    with pytest.raises(ValueError, match="target_l0 is k"):
        Trainer(SAEJob(make_sae("topk", k=4), small_config(2, target_l0=8)), stream)
    with pytest.raises(ValueError, match=r"width 16, but the stream yields shape \(256, 8\)"):
        Trainer(SAEJob(make_sae("topk"), small_config(2)), iter([torch.randn(256, 8)])).fit()
