"""Dead-latent remedies: resampling revives latents a run without it leaves dead, recovers more
of the true features, keeps resume exact, and starts each latent as documented."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from training_helpers import make_sae, small_config

from saekit import SAE, architecture_class
from saekit.saes.base import DeadLatentRemedy
from saekit.training import SAEJob, Trainer
from saekit.training.resample import DeadLatentResampler, reset_optimizer_state
from saekit.training.synthetic import SparseFeatureStream

STEPS = 300


def stream() -> SparseFeatureStream:
    # 48 known features, most of them rare (1% to 20% of tokens), about 3 per token.
    return SparseFeatureStream(16, 48, 256, p_min=0.01, p_max=0.2, seed=1)


#: Every remedy off: no dead-latent term, no lifting or resampling, no start at the target.
NO_REMEDY = {"dead_pre_act_coefficient": 0.0, "aux_k_coefficient": 0.0,
             "resample_dead_latents": False,
             "lift_quiet_latents": False, "start_at_target": False}


def train(architecture: str, steps: int = STEPS, **settings: object) -> SAE:
    cfg = small_config(steps, target_l0=3, dead_after_tokens=256 * 20, **settings)
    return Trainer(SAEJob(make_sae(architecture), cfg), stream()).fit().saes["sae"]


def dead_fraction(sae: SAE, data: torch.Tensor) -> float:
    with torch.no_grad():
        fired = (sae.encode(data) != 0).any(dim=0)
    return 1 - float(fired.float().mean())


def recovered_features(sae: SAE, features: torch.Tensor, cosine: float = 0.9) -> int:
    """True features that some decoder row points along (cosine above `cosine`)."""
    rows = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    return int(((features @ rows.T).max(dim=1).values > cosine).sum())


@pytest.mark.parametrize("architecture", ["gated", "standard"])
def test_declared_remedies_revive_latents_and_recover_more_features(architecture: str) -> None:
    held_out = stream().held_out(8192)
    features = stream().features
    without = train(architecture, **NO_REMEDY)
    with_them = train(architecture)  # as the architecture declares
    assert dead_fraction(with_them, held_out) < dead_fraction(without, held_out) - 0.1
    assert recovered_features(with_them, features) > recovered_features(without, features)


def test_resampling_alone_revives_a_gated_sae() -> None:
    # A gated SAE at a low target L0 with no remedy silences most latents (0.875 of them
    # when this was written) and finds none of the true features; resampling keeps most
    # alive and finds many.
    held_out = stream().held_out(8192)
    features = stream().features
    without = train("gated", **NO_REMEDY)
    resampled = train("gated", **{**NO_REMEDY, "resample_dead_latents": True})
    assert dead_fraction(without, held_out) > 0.5
    assert dead_fraction(resampled, held_out) < 0.1
    assert recovered_features(resampled, features) >= recovered_features(without, features) + 10


def test_aux_k_alone_revives_a_gated_sae() -> None:
    # The same run with AuxK on the silent latents and nothing else: their directions and
    # decoder rows learn what the live latents missed (0.86 dead and 2 features found
    # without it, none dead and 15 found with it, when this was written).
    held_out = stream().held_out(8192)
    features = stream().features
    without = train("gated", **NO_REMEDY)
    with_aux = train("gated", **{**NO_REMEDY, "aux_k_coefficient": 1 / 32})
    assert dead_fraction(without, held_out) > 0.5
    assert dead_fraction(with_aux, held_out) < 0.1
    assert recovered_features(with_aux, features) >= recovered_features(without, features) + 8


def test_resume_with_resampling_is_bitwise_exact(tmp_path: Path) -> None:
    def job() -> SAEJob:
        cfg = small_config(
            120, target_l0=3, resample_dead_latents=True, dead_after_tokens=256 * 10
        )
        return SAEJob(make_sae("gated", seed=2), cfg)

    reference_trainer = Trainer(job(), stream())
    reference = reference_trainer.fit().saes["sae"]
    # Latents were resampled before the interruption and after it.
    run = tmp_path / "run"
    first = Trainer(job(), stream(), run, checkpoint_every=256 * 37)
    first.total_tokens = 256 * 37
    first.fit()
    resumed = Trainer(job(), stream(), run, checkpoint_every=256 * 37).fit(resume=True)
    for name, tensor in reference.state_dict().items():
        assert torch.equal(tensor, resumed.saes["sae"].state_dict()[name]), name


def test_resampling_events_fall_every_interval_until_the_cut_off() -> None:
    cfg = small_config(100, dead_after_tokens=256 * 10, resample_every_tokens=256 * 5,
                       resample_until=0.5)
    resampler = DeadLatentResampler(cfg)
    due = [step for step in range(100) if resampler.due(step * 256, (step + 1) * 256)]
    # Not before one dead window has passed (nothing can be dead), every 5 steps after, and
    # none after half of the run.
    assert due == [9, 14, 19, 24, 29, 34, 39, 44, 49]


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "gated", "topk"])
def test_a_resampled_latent_points_at_its_example_and_fires_at_the_given_rate(
    architecture: str,
) -> None:
    sae = make_sae(architecture, d_in=16, d_sae=32, seed=4)
    generator = torch.Generator().manual_seed(0)
    centred = torch.randn(2000, 16, generator=generator)
    residual = torch.randn(2000, 16, generator=generator)
    latents, rows = torch.tensor([3, 17]), torch.tensor([5, 1200])
    live_norm = sae.decoder_norms()[[i for i in range(32) if i not in (3, 17)]].mean()
    sae.resample_latents(latents, centred, residual, rows, firing_rate=0.05)
    for latent, row in zip(latents.tolist(), rows.tolist(), strict=True):
        direction = residual[row] / residual[row].norm()
        decoder = sae.W_dec[latent].detach()
        torch.testing.assert_close(decoder / decoder.norm(), direction)
        torch.testing.assert_close(decoder.norm(), live_norm)
        encoder = sae.W_enc[:, latent].detach()
        torch.testing.assert_close(encoder / encoder.norm(), direction)
    if sae.sparsity_control == "k":
        return  # whether a top-k latent fires depends on the others, not on its bias alone
    with torch.no_grad():
        hidden_pre, latent_values = sae.encode_parts(centred)
        rate = (latent_values[:, latents] != 0).float().mean(dim=0)
    torch.testing.assert_close(rate, torch.full((2,), 0.05), atol=0.002, rtol=0)


def test_reset_optimizer_state_touches_only_the_resampled_latents() -> None:
    sae = make_sae("jumprelu", d_in=8, d_sae=16)
    optimizer = torch.optim.Adam(sae.parameters(), lr=1e-3)
    out = sae.training_forward(torch.randn(64, 8))
    out.loss.backward()
    optimizer.step()
    before = {n: {k: v.clone() for k, v in optimizer.state[p].items()}
              for n, p in sae.named_parameters()}
    latents = torch.tensor([2, 9])
    reset_optimizer_state(optimizer, sae, latents)
    others = [i for i in range(16) if i not in (2, 9)]
    for name, axis in sae.latent_axes().items():
        state = optimizer.state[dict(sae.named_parameters())[name]]
        first = state["exp_avg"].movedim(axis, 0)
        second = state["exp_avg_sq"].movedim(axis, 0)
        old_first = before[name]["exp_avg"].movedim(axis, 0)
        old_second = before[name]["exp_avg_sq"].movedim(axis, 0)
        assert torch.equal(first[latents], torch.zeros_like(first[latents]))
        torch.testing.assert_close(second[latents], old_second[others].mean(0).expand_as(
            second[latents]))
        assert torch.equal(first[others], old_first[others])
        assert torch.equal(second[others], old_second[others])
    assert set(sae.latent_axes()) == {"W_enc", "W_dec", "b_enc", "threshold"}


def test_every_architecture_declares_a_remedy_the_trainer_can_apply() -> None:
    from saekit.saes.registry import list_architectures

    # saekit's own (other tests register architectures of their own in the same process)
    built_in = [n for n in list_architectures()
                if architecture_class(n).__module__.startswith("saekit.")]
    for name in built_in:
        remedy = architecture_class(name).dead_latent_remedy
        assert isinstance(remedy, DeadLatentRemedy), name
        assert set(remedy.losses) <= set(architecture_class(name).loss_coefficients), name
        assert remedy.losses or remedy.resample or remedy.lift_quiet, name


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "gated"])
def test_start_at_target_sets_every_latent_to_fire_at_the_target_rate(architecture: str) -> None:
    from saekit.training.init import start_firing_at

    sae = make_sae(architecture, d_in=16, d_sae=64, seed=5)
    batch = torch.randn(1600, 16, generator=torch.Generator().manual_seed(1)) + 2.0
    start_firing_at(sae, batch, l0=6)
    with torch.no_grad():
        _, latents = sae.encode_parts(batch)
    # Each latent fires on round(6 / 64 * 1600) = 150 rows of the batch it was set on.
    assert torch.equal((latents != 0).sum(dim=0), torch.full((64,), 150))


@pytest.mark.parametrize("architecture", ["standard", "jumprelu", "gated"])
def test_lifting_lowers_firing_points_only_until_the_latents_fire(architecture: str) -> None:
    sae = make_sae(architecture, d_in=16, d_sae=32, seed=6)
    batch = torch.randn(1000, 16, generator=torch.Generator().manual_seed(2))
    all_latents = torch.arange(32)
    # Latents 0-3 silent on this batch, 4-7 firing on most of it.
    silent, busy = all_latents[:4], all_latents[4:8]
    with torch.no_grad():
        products = batch @ sae.W_enc
    sae.set_firing_point(silent, products[:, silent].max(dim=0).values + 1.0)
    sae.set_firing_point(busy, products[:, busy].kthvalue(100, dim=0).values)
    busy_points = sae.firing_point(busy).clone()
    sae.lift_latents(torch.cat([silent, busy]), batch, rate=0.02)
    with torch.no_grad():
        _, latents = sae.encode_parts(batch)
    fires = (latents != 0).sum(dim=0)
    # 2% of 1,000 rows (give or take a tie of rounding between two matmul orders)
    assert ((fires[silent] - 20).abs() <= 1).all(), fires[silent]
    torch.testing.assert_close(sae.firing_point(busy), busy_points)  # already above 2%


@pytest.mark.parametrize(("architecture", "steps"), [("batchtopk", 1), ("gated", 2)])
def test_the_last_step_lifts_no_latent(architecture: str, steps: int) -> None:
    # A lift after the last step would save latents that no step has weighed; a batch top-k
    # SAE's inference threshold then let them all fire above its k.
    def trained(steps: int, lift: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        # 512 latents at L0 2 from the first step (k 2, or biases set to fire at L0 2): each
        # fires on one token of a 256-token batch on average, so many miss a batch.
        k = {"k": 2} if architecture_class(architecture).sparsity_control == "k" else {}
        sae = make_sae(architecture, d_sae=512, seed=3, **k)
        cfg = small_config(steps, target_l0=2, lift_quiet_latents=lift)
        return Trainer(SAEJob(sae, cfg), stream()).fit().saes["sae"].state_dict()

    def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
        return all(torch.equal(a[name], b[name]) for name in a)

    # Lifting is at work here: one step more, and it changes the result (a latent is quiet
    # once it missed a whole batch; a gated SAE set to fire at L0 2 misses none at first) ...
    assert not same(trained(steps + 1, lift=True), trained(steps + 1, lift=False))
    # ... but a run whose only lift would come after its last step has none.
    assert same(trained(steps, lift=True), trained(steps, lift=False))


def test_an_unset_learning_rate_is_the_architectures() -> None:
    from saekit.training import TrainingSection

    unset = TrainingSection(tokens=1024, batch_size=256)
    assert unset.lr is None
    standard = SAEJob(make_sae("standard"), unset)
    topk = SAEJob(make_sae("topk"), unset)
    assert standard.cfg.lr == 3e-3 and topk.cfg.lr == 1e-3
    assert SAEJob(make_sae("standard"), small_config(4, lr=5e-4)).cfg.lr == 5e-4
    trainer = Trainer(standard, stream())
    assert trainer.states[0].optimizer.param_groups[0]["lr"] == 3e-3
