"""Recovery of known features: SAEs trained on synthetic activations, scored against the truth.

`saekit.training.synthetic.run_synthetic(config)` draws a `FeatureSampler` from
`config.features`, trains one SAE per architecture side by side with the usual trainer (one
stream of synthetic batches, the trainer's target-L0 control, dead-latent remedies and norm
scaling), and scores each here with `recovery_scores` on held-out samples. What each score is:

- MCC: latents are matched one-to-one to true features by Hungarian matching on the absolute
  cosine between decoder rows and true directions (min(d_sae, n_features) pairs, scipy's
  `linear_sum_assignment`); MCC is the mean absolute cosine over the matched pairs (as
  SAELens and O'Neill et al. 2025 define it). 1 means every feature has its own latent.
- F1, precision, recall: for each matched pair, the latent's firing (value > 0) read as a
  detector of its feature's firing over the samples; the means over matched pairs (a pair
  whose F1 is undefined, neither firing, scores 0).
- uniqueness: distinct true features among the latents' best matches (argmax absolute
  cosine, every latent counted), divided by d_sae, as SAELens defines it; 1 when no two
  latents point at the same feature. duplicated_features: true features that are the best
  match of more than one latent.
- shrinkage (SAEBench's `l2_ratio`): mean over samples of ||x_hat|| / ||x||; below 1 the SAE
  shrinks its reconstructions. Samples with ||x|| <= 1e-6 (nothing fired, no noise) are left
  out of every score, as SAELens does.
- explained variance, L0, dead fraction: as `saekit eval` computes them, on these samples.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saekit.evals.accumulators import ReconstructionAccumulator, SparsityAccumulator
from saekit.evals.compare import hungarian, unit_rows
from saekit.evals.plots import png_figure
from saekit.evals.results import EvalResult
from saekit.evals.synthetic import FeatureSampler, SyntheticFeatures, _whole
from saekit.progress import bar
from saekit.saes import architecture_class
from saekit.saes.base import SAE

#: The eval_type_id of these results (SAEBench has no synthetic eval; this names ours).
EVAL_TYPE_ID = "synthetic_ground_truth"
#: The metrics a side-by-side table shows.
HEADLINE: tuple[str, ...] = (
    "recovery.mcc", "recovery.f1", "recovery.uniqueness", "shrinkage.l2_ratio",
)
#: Inputs with a norm at or below this are left out (their norm ratio is undefined).
MIN_INPUT_NORM = 1e-6
#: The oracle's encoder bias is minus this.
ORACLE_MARGIN = 1e-5
#: Samples scored per batch.
EVAL_BATCH = 4096


@dataclass
class RecoveryScores:
    """How well one SAE recovered the true features (see the module docstring)."""

    mcc: float
    f1: float
    precision: float
    recall: float
    uniqueness: float
    duplicated_features: int
    l2_ratio: float
    l2_norm_in: float
    l2_norm_out: float
    explained_variance: float
    mse: float
    l0: float
    l1: float
    true_l0: float
    frac_alive: float
    n_samples: int
    matched_latents: Tensor
    """[n_pairs] the latent matched to each feature in `matched_features`."""
    matched_features: Tensor
    """[n_pairs] true features, ascending."""
    matched_cosines: Tensor
    """[n_pairs] absolute cosine of each pair."""
    pair_f1: Tensor
    """[n_pairs] each pair's F1 (likewise pair_precision, pair_recall)."""
    pair_precision: Tensor
    pair_recall: Tensor
    feature_firing: Tensor = field(repr=False)
    """[n_pairs] the matched feature's firing rate on the samples."""

    def metrics(self) -> dict[str, dict[str, float | int]]:
        """The scores in SAEBench's layout: categories of flat metrics (the shrinkage,
        reconstruction and sparsity names are those of SAEBench's core eval)."""
        return {
            "recovery": {
                "mcc": self.mcc, "f1": self.f1, "precision": self.precision,
                "recall": self.recall, "uniqueness": self.uniqueness,
                "duplicated_features": self.duplicated_features,
            },
            "shrinkage": {
                "l2_norm_in": self.l2_norm_in, "l2_norm_out": self.l2_norm_out,
                "l2_ratio": self.l2_ratio,
            },
            "reconstruction_quality": {
                "explained_variance": self.explained_variance, "mse": self.mse,
            },
            "sparsity": {"l0": self.l0, "l1": self.l1, "true_l0": self.true_l0},
            "misc": {"frac_alive": self.frac_alive, "n_samples": self.n_samples},
        }

    def details(self) -> list[dict[str, Any]]:
        """One record per matched feature: its latent, cosine, F1, precision and recall."""
        columns = zip(
            self.matched_features.tolist(), self.matched_latents.tolist(),
            self.matched_cosines.tolist(), self.pair_f1.tolist(),
            self.pair_precision.tolist(), self.pair_recall.tolist(),
            self.feature_firing.tolist(), strict=True,
        )
        return [
            {"feature": f, "latent": lat, "cosine": c, "f1": f1, "precision": p, "recall": r,
             "feature_firing_rate": rate}
            for f, lat, c, f1, p, r, rate in columns
        ]


def absolute_cosines(latent_directions: Tensor, true_directions: Tensor) -> Tensor:
    """|cos| [n_latents, n_features] between decoder rows and true feature directions."""
    return (unit_rows(latent_directions) @ unit_rows(true_directions).T).abs()


def match_features(latent_directions: Tensor, true_directions: Tensor) -> tuple[Tensor, ...]:
    """Hungarian matching of latents to features on |cos|: (latents, features, cosines),
    min(n_latents, n_features) pairs, features ascending."""
    cosines = absolute_cosines(latent_directions, true_directions).T  # [n_features, n_latents]
    features, latents = hungarian(cosines)
    return latents, features, cosines[features, latents]


def mcc(latent_directions: Tensor, true_directions: Tensor) -> float:
    """Mean absolute cosine over the Hungarian-matched pairs of decoder rows [n_latents, d]
    and true directions [n_features, d]: 1 when each feature has a latent along it."""
    return float(match_features(latent_directions, true_directions)[2].mean())


def uniqueness(latent_directions: Tensor, true_directions: Tensor) -> tuple[float, int]:
    """(uniqueness, duplicated_features): the distinct features among the latents' best
    matches over n_latents, and the features that are the best match of several latents."""
    best = absolute_cosines(latent_directions, true_directions).argmax(dim=1)  # [n_latents]
    counts = torch.bincount(best, minlength=true_directions.shape[0])
    return float((counts > 0).sum()) / best.numel(), int((counts > 1).sum())


def detection_scores(latent_fires: Tensor, feature_fires: Tensor) -> tuple[Tensor, ...]:
    """(precision, recall, f1) per column, reading each column of `latent_fires` [n, m]
    (bool) as a detector of the same column of `feature_fires`; 0 where undefined."""
    tp = (latent_fires & feature_fires).sum(0).double()
    return _ratios(tp, latent_fires.sum(0).double(), feature_fires.sum(0).double())


def _ratios(tp: Tensor, predicted: Tensor, actual: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    precision = torch.where(predicted > 0, tp / predicted.clamp_min(1), 0.0)
    recall = torch.where(actual > 0, tp / actual.clamp_min(1), 0.0)
    total = precision + recall
    f1 = torch.where(total > 0, 2 * precision * recall / total.clamp_min(1e-12), 0.0)
    return precision, recall, f1


@torch.no_grad()
def recovery_scores(
    sae: SAE,
    sampler: FeatureSampler,
    n_samples: int = 20_000,
    seed: int = 1,
    progress: bool | None = None,
) -> RecoveryScores:
    """Score `sae` against the features `sampler` draws from, on `n_samples` samples drawn
    with `seed` (use one the SAE never trained on)."""
    _check_fits(sae, sampler)
    if n_samples < 1:
        raise ValueError(f"n_samples must be at least 1, got {n_samples}")
    latents_idx, features_idx, cosines = match_features(sae.W_dec, sampler.directions)
    unique, duplicated = uniqueness(sae.W_dec, sampler.directions)
    recon_acc = ReconstructionAccumulator()
    sparsity = SparsityAccumulator(sae.cfg.d_sae)
    n_pairs = latents_idx.numel()
    tp, predicted, actual = (torch.zeros(n_pairs, dtype=torch.float64) for _ in range(3))
    true_active = 0.0
    shown = bar(desc="scoring recovery", unit="sample", total=n_samples, progress=progress)
    with shown:
        for batch in sampler.batches(EVAL_BATCH, seed, n_samples):
            keep = batch.x.norm(dim=1) > MIN_INPUT_NORM
            x = batch.x[keep].to(sae.device, sae.dtype)
            truth = batch.features[keep].cpu()
            latents = sae.encode(x)  # [n, d_sae]
            recon_acc.update(x, sae.decode(latents))
            sparsity.update(latents)
            fires = (latents[:, latents_idx.to(latents.device)] > 0).cpu()
            true_fires = truth[:, features_idx] > 0
            tp += (fires & true_fires).sum(0)
            predicted += fires.sum(0)
            actual += true_fires.sum(0)
            true_active += float((truth > 0).sum())
            shown.update(batch.x.shape[0])
    recon, spars = recon_acc.result(), sparsity.result()
    precision, recall, f1 = _ratios(tp, predicted, actual)
    return RecoveryScores(
        mcc=float(cosines.mean()),
        f1=float(f1.mean()),
        precision=float(precision.mean()),
        recall=float(recall.mean()),
        uniqueness=unique,
        duplicated_features=duplicated,
        l2_ratio=recon.l2_ratio,
        l2_norm_in=recon.l2_norm_in,
        l2_norm_out=recon.l2_norm_out,
        explained_variance=recon.explained_variance,
        mse=recon.mse,
        l0=spars.l0,
        l1=spars.l1,
        true_l0=true_active / recon.n_tokens,
        frac_alive=1.0 - spars.dead_fraction,
        n_samples=recon.n_tokens,
        matched_latents=latents_idx,
        matched_features=features_idx,
        matched_cosines=cosines,
        pair_f1=f1,
        pair_precision=precision,
        pair_recall=recall,
        feature_firing=actual / recon.n_tokens,
    )


def oracle_sae(sampler: FeatureSampler, architecture: str = "standard") -> SAE:
    """An SAE whose decoder rows are the true directions and whose encoder reads them back
    (W_enc = directions^T, encoder bias -1e-5, no other biases): with orthogonal features
    and no noise its latents are the true feature activations less 1e-5. For tests, and as
    the benchmark's ceiling."""
    c = sampler.config
    fields: dict[str, Any] = {"apply_b_dec_to_input": False}
    if architecture_class(architecture).sparsity_control == "k":
        fields["k"] = max(1, min(c.n_features, math.ceil(sampler.expected_l0)))
    sae = SAE.create(architecture, c.d, c.n_features, **fields)
    with torch.no_grad():
        for tensor in sae.parameters():
            tensor.zero_()
        sae.W_dec.copy_(sampler.directions)
        sae.W_enc.copy_(sampler.directions.T)
        # Rounding leaves silent features at about +-1e-7: a hair of bias keeps them silent.
        sae.b_enc.fill_(-ORACLE_MARGIN)
    return sae


# ----- the benchmark run -------------------------------------------------------------------


@dataclass
class SyntheticConfig:
    """What `run_synthetic` trains and how it scores (`dataclasses.asdict` is the result's
    eval_config)."""

    features: SyntheticFeatures = field(default_factory=SyntheticFeatures)
    """The generative model of the activations."""
    architectures: list[str] = field(default_factory=lambda: ["topk"])
    """SAE architectures to train, one SAE each, side by side on the same batches."""
    d_sae: int | None = None
    """Latents per SAE (default: n_features, one per true feature)."""
    target_l0: float | None = None
    """Latents per sample: k for top-k SAEs, the controller's target for the others
    (default: the expected number of firing features, rounded, at least 1)."""
    training_tokens: int = 200_000
    """Synthetic samples each SAE trains on."""
    batch_size: int = 1024
    """Samples per optimisation step."""
    lr: float | None = None
    """Adam's learning rate (default: the architecture's)."""
    training: dict[str, Any] = field(default_factory=dict)
    """Other TrainingSection settings (e.g. {"lr_schedule": "cosine"})."""
    eval_samples: int = 20_000
    """Held-out samples each SAE is scored on."""
    seed: int = 0
    """Seed of the training and evaluation samples and of the SAEs' initialisation."""
    device: str = "cpu"
    """Device to train and score on."""

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not isinstance(self.features, SyntheticFeatures):
            problems.append("features must be a SyntheticFeatures")
        if isinstance(self.architectures, str):
            self.architectures = [self.architectures]
        if not self.architectures:
            problems.append("name at least one architecture to train")
        if len(set(self.architectures)) != len(self.architectures):
            problems.append(f"architectures repeat a name: {', '.join(self.architectures)}")
        for name in self.architectures:
            try:
                cls = architecture_class(name)
            except ValueError as err:
                problems.append(str(err))
                continue
            if cls.is_transcoder:
                problems.append(f"{name} is a transcoder; synthetic recovery scores SAEs")
        for name in ("training_tokens", "batch_size", "eval_samples"):
            if _whole(getattr(self, name)) < 1:
                problems.append(f"{name} must be a whole number of at least 1")
        if self.d_sae is not None and _whole(self.d_sae) < 1:
            problems.append(f"d_sae must be a whole number of at least 1, got {self.d_sae!r}")
        if self.target_l0 is not None and not (
            isinstance(self.target_l0, (int, float)) and 0 < self.target_l0 < math.inf
        ):
            problems.append(f"target_l0 must be a positive number, got {self.target_l0!r}")
        if not problems and self.batch_size > self.training_tokens:
            problems.append(
                f"batch_size={self.batch_size} is larger than training_tokens="
                f"{self.training_tokens}"
            )
        if problems:
            raise ValueError("; ".join(problems))

    def width(self) -> int:
        return self.d_sae or self.features.n_features

    def l0_target(self, sampler: FeatureSampler) -> float:
        if self.target_l0 is not None:
            return float(self.target_l0)
        return float(max(1, round(sampler.expected_l0)))


def score_saes(
    saes: Mapping[str, SAE], sampler: FeatureSampler, config: SyntheticConfig,
    progress: bool | None = None,
) -> dict[str, RecoveryScores]:
    """`recovery_scores` of each SAE on the config's held-out samples (the same for all)."""
    _, eval_seed = sample_seeds(config.seed)
    return {
        name: recovery_scores(sae, sampler, config.eval_samples, eval_seed, progress)
        for name, sae in saes.items()
    }


def synthetic_result(scores: RecoveryScores, config: SyntheticConfig) -> EvalResult:
    """One SAE's scores as an EvalResult."""
    return EvalResult(
        eval_type_id=EVAL_TYPE_ID,
        eval_config=dataclasses.asdict(config),
        metrics=scores.metrics(),
        details=scores.details(),
    )


def plot_synthetic(results: Mapping[str, EvalResult], path: str | Path) -> Path:
    """Bars of MCC, F1, uniqueness, shrinkage and explained variance per SAE (keys are the
    SAE labels), with dashed lines at 1, the score of a perfect recovery."""
    if not results:
        raise ValueError("no results to plot; pass at least one SAE's EvalResult")
    shown = [*HEADLINE, "reconstruction_quality.explained_variance"]
    labels = list(results)
    width = 0.8 / len(labels)
    with png_figure(path, figsize=(1.6 * len(shown) + 2, 4)) as (fig, ax):
        for i, label in enumerate(labels):
            values = [_number(results[label].metric(name)) for name in shown]
            positions = [m + (i - (len(labels) - 1) / 2) * width for m in range(len(shown))]
            ax.bar(positions, values, width=width, label=label)
        ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(shown)))
        ax.set_xticklabels([name.split(".", 1)[1] for name in shown])
        ax.set_ylim(0, 1.15)
        ax.set_title("recovery of known synthetic features (1 = perfect)")
        ax.legend(fontsize="small", ncol=min(len(labels), 4), loc="lower right")
    return Path(path)


def _number(value: Any) -> float:
    return float(value) if value is not None else float("nan")


def sample_seeds(seed: int) -> tuple[int, int]:
    """(training, evaluation) sample seeds: distinct, so scores are on unseen samples."""
    return 2 * seed, 2 * seed + 1


def _check_fits(sae: SAE, sampler: FeatureSampler) -> None:
    d = sampler.config.d
    if sae.is_transcoder:
        raise ValueError(f"{sae.architecture} is a transcoder; recovery scores need an SAE")
    if sae.cfg.d_in != d:
        raise ValueError(
            f"the SAE reads d_in={sae.cfg.d_in}, but the synthetic activations have d={d}; "
            "score SAEs trained on these features"
        )


__all__ = [
    "EVAL_TYPE_ID", "HEADLINE", "RecoveryScores", "SyntheticConfig",
    "absolute_cosines", "detection_scores", "match_features", "mcc", "oracle_sae",
    "plot_synthetic", "recovery_scores", "sample_seeds", "score_saes",
    "synthetic_result", "uniqueness",
]
