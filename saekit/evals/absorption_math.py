"""Feature absorption on any labelled activations: probes, k-sparse probing, absorption scores.

Nothing here knows about letters, words or models: classes are integers, activations are
tensors. `absorption.py` feeds it first-letter prompts; tests feed it planted hierarchies.

The measurement (David Chanin's absorption metric with Demian Till's absorption fraction, as
SAEBench computes them):

1. A one-vs-rest logistic-regression probe per class on the model's activations gives each
   class's ground-truth direction.
2. An L1-regularised probe per class on the SAE's latents ranks latents; logistic regressions
   on its top k latents, k = 1 .. max_k, are scored by F1 on the test split. A class's main
   (split) latents are the top k for the largest k reached while each step raised F1 by more
   than `f1_jump_threshold`.
3. On each test input the probe calls right (a true positive), the probe projection of the
   activation is split between the main latents and other latents aligned with the probe:
   - the absorption fraction is the share of the projection the main latents miss and up to
     3 other aligned latents make up;
   - full absorption is when no main latent fires and a single other latent carries at least
     40% of the projection.
   A latent's projection is its activation times the cosine of its decoder row with the probe
   direction (SAEBench's convention: exact for unit-norm decoder rows).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from scipy import sparse
from torch import Tensor

from saekit.progress import bar

#: Below this a main latent counts as not firing (SAEBench's EPS).
FIRING_EPS = 1e-8


@dataclass(frozen=True)
class AbsorptionThresholds:
    """SAEBench's fixed thresholds of the absorption scores."""

    full_absorption_probe_cos_sim_threshold: float = 0.025
    """Full absorption: least cosine between the top projecting latent and the probe."""
    absorption_fraction_probe_cos_sim_threshold: float = 0.1
    """Absorption fraction: least cosine between a candidate absorbing latent and the probe."""
    probe_projection_proportion_threshold: float = 0.4
    """Both scores: least share of the probe projection the absorbing latent(s) must carry."""
    absorption_fraction_max_absorbing_latents: int = 3
    """Absorption fraction: most latents that together make up for the main latents."""


# ----- probes on the model's activations ----------------------------------------------------


@dataclass
class LinearProbes:
    """One binary linear probe per class: scores = x @ weight.T + bias, positive means yes."""

    weight: Tensor  # [n_classes, d]
    bias: Tensor  # [n_classes]

    def scores(self, x: Tensor) -> Tensor:
        """Probe logits [n, n_classes] for activations [n, d]."""
        return x.float() @ self.weight.T + self.bias


def _binary_weights(y: np.ndarray) -> dict[int, float]:
    """Positives weighted by negatives / positives, as SAEBench's `pos_weight` does."""
    n_pos = int(y.sum())
    return {0: 1.0, 1: (len(y) - n_pos) / max(n_pos, 1)}


def fit_class_probes(
    acts: Tensor,
    labels: Tensor,
    n_classes: int,
    progress: bool | None = None,
) -> LinearProbes:
    """A one-vs-rest logistic-regression probe per class on activations [n, d].

    The fit runs on centred activations divided by one overall scale (raw residual streams,
    far from the origin, stall the solver), which keeps their geometry; the probe is mapped
    back, so `weight` is a direction in the activations' own space. A class absent from
    `labels` gets a zero probe with bias -1 (it never says yes)."""
    from sklearn.linear_model import LogisticRegression

    x = acts.double().numpy()
    mean = x.mean(0)
    scale = float(x.std()) or 1.0
    x = (x - mean) / scale
    y_all = labels.numpy()
    weight = torch.zeros(n_classes, x.shape[1])
    bias = torch.full((n_classes,), -1.0)
    with _one_thread():
        for c in bar(range(n_classes), desc="probes on activations", unit="probe",
                     progress=progress):
            y = (y_all == c).astype(np.int64)
            if y.sum() == 0 or y.sum() == len(y):
                continue
            model = LogisticRegression(max_iter=1000, class_weight=_binary_weights(y))
            model.fit(x, y)
            w = model.coef_[0] / scale
            weight[c] = torch.from_numpy(w).float()
            bias[c] = float(model.intercept_[0] - w @ mean)
    return LinearProbes(weight, bias)


def _one_thread() -> Any:
    """BLAS on one thread: these fits are small, and on a shared machine threaded BLAS spends
    more time waiting for cores than computing (about 9x slower on 2 busy cores)."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1)


def f1(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Binary F1 (0.0 when there is neither a true nor a predicted positive)."""
    from sklearn.metrics import f1_score

    return float(f1_score(truth, predicted, zero_division=0.0))


# ----- k-sparse probing on SAE latents ------------------------------------------------------


def encode_sparse(
    encode: Callable[[Tensor], Tensor], acts: Tensor, batch_size: int = 1024
) -> sparse.csr_matrix:
    """The latents of activations [n, d] as a sparse matrix [n, d_sae] (float32), encoded in
    batches so that a wide SAE never holds a dense [n, d_sae] block."""
    blocks = []
    with torch.no_grad():
        for start in range(0, acts.shape[0], batch_size):
            latents = encode(acts[start : start + batch_size]).float().cpu().numpy()
            blocks.append(sparse.csr_matrix(latents))
    return sparse.vstack(blocks, format="csr")


@dataclass
class KSparseResult:
    """One class's k-sparse probing: the top latents of its L1 probe and, per k, the test F1
    of a logistic regression on the top k of them."""

    ranked_latents: list[int]  # best first; the top max_k
    f1_by_k: list[float]  # f1_by_k[k - 1] is the F1 with the top k latents
    split_latents: list[int] = field(default_factory=list)


def l1_latent_ranking(
    latents: sparse.csr_matrix, y: np.ndarray, l1_decay: float, top: int
) -> list[int]:
    """The `top` latents with the largest weights of an L1-regularised logistic regression
    of `y` on `latents` (largest signed weight: latents that predict the class by firing).

    SAEBench's objective per class is mean(weighted BCE) + l1_decay * |w|_1; liblinear's is
    |w|_1 + C * sum(weighted loss), the same minimum for C = 1 / (l1_decay * n)."""
    from sklearn.linear_model import LogisticRegression

    c = 1.0 / (l1_decay * latents.shape[0])
    model = LogisticRegression(
        l1_ratio=1.0, solver="liblinear", C=c, class_weight=_binary_weights(y), max_iter=1000,
        intercept_scaling=10.0,  # liblinear penalises its intercept; a large scale frees it
    )
    model.fit(latents, y)
    weights = model.coef_[0]
    order = np.argsort(-weights, kind="stable")  # ties (zeros) in latent order
    return [int(i) for i in order[:top]]


def k_sparse_f1(
    train: sparse.csr_matrix,
    y_train: np.ndarray,
    test: sparse.csr_matrix,
    y_test: np.ndarray,
    latents: Sequence[int],
) -> float:
    """Test F1 of a class-balanced logistic regression on the given latents only."""
    from sklearn.linear_model import LogisticRegression

    cols = list(latents)
    x_train = train[:, cols].toarray()
    if y_train.min() == y_train.max():
        return 0.0
    model = LogisticRegression(max_iter=500, class_weight="balanced").fit(x_train, y_train)
    predicted = model.decision_function(test[:, cols].toarray()) > 0.0
    return f1(y_test, predicted)


def split_latents(
    ranked_latents: Sequence[int], f1_by_k: Sequence[float], f1_jump_threshold: float
) -> list[int]:
    """A class's main latents: the top k, for the largest k such that F1 rose by more than
    `f1_jump_threshold` at every step from 1 to k (k = 1 always counts)."""
    best = -np.inf
    k_kept = 0
    for k, score in enumerate(f1_by_k, start=1):
        if score > best + f1_jump_threshold:
            best, k_kept = score, k
        else:
            break
    return list(ranked_latents[:k_kept])


def k_sparse_probing(
    train_latents: sparse.csr_matrix,
    train_labels: np.ndarray,
    test_latents: sparse.csr_matrix,
    test_labels: np.ndarray,
    classes: Sequence[int],
    max_k: int,
    l1_decay: float,
    f1_jump_threshold: float,
    progress: bool | None = None,
) -> dict[int, KSparseResult]:
    """`KSparseResult` (with split latents) for each class."""
    out: dict[int, KSparseResult] = {}
    top = min(max_k, train_latents.shape[1])
    with _one_thread():
        for c in bar(classes, desc="k-sparse probes", unit="class", progress=progress):
            out[c] = _class_k_sparse(train_latents, train_labels, test_latents, test_labels, c,
                                     top, l1_decay, f1_jump_threshold)
    return out


def _class_k_sparse(
    train_latents: sparse.csr_matrix,
    train_labels: np.ndarray,
    test_latents: sparse.csr_matrix,
    test_labels: np.ndarray,
    c: int,
    top: int,
    l1_decay: float,
    f1_jump_threshold: float,
) -> KSparseResult:
    """One class's k-sparse probing (see `k_sparse_probing`)."""
    y_train = (train_labels == c).astype(np.int64)
    y_test = (test_labels == c).astype(np.int64)
    if y_train.min() == y_train.max():
        return KSparseResult([], [])
    ranked = l1_latent_ranking(train_latents, y_train, l1_decay, top)
    scores = [
        k_sparse_f1(train_latents, y_train, test_latents, y_test, ranked[:k])
        for k in range(1, top + 1)
    ]
    return KSparseResult(ranked, scores, split_latents(ranked, scores, f1_jump_threshold))


# ----- absorption of one class on its true positives ----------------------------------------


@dataclass
class WordAbsorption:
    """Absorption scores of each input of one class (one row per input)."""

    probe_projection: Tensor  # [n] activation . unit probe direction
    main_projection: Tensor  # [n] summed projection of the main latents
    absorption_fraction: Tensor  # [n] in [0, 1]
    is_full_absorption: Tensor  # [n] bool
    top_latent: Tensor  # [n] the latent with the largest projection
    top_latent_projection: Tensor  # [n]


def probe_cosines(probe_direction: Tensor, decoder: Tensor) -> Tensor:
    """Cosine of each decoder row [d_sae, d] with the probe direction [d] -> [d_sae]."""
    return torch.nn.functional.cosine_similarity(
        probe_direction.float().unsqueeze(0), decoder.float(), dim=-1
    )


def word_absorption(
    acts: Tensor,
    latent_acts: Tensor,
    decoder: Tensor,
    probe_direction: Tensor,
    main_latents: Sequence[int],
    thresholds: AbsorptionThresholds | None = None,
) -> WordAbsorption:
    """Absorption scores of inputs [n, d] with SAE latents [n, d_sae] against one class's
    probe direction [d] and main latents (SAEBench's rules, see the module docstring).

    Inputs whose probe projection is not positive score no absorption."""
    t = thresholds or AbsorptionThresholds()
    if probe_direction.ndim != 1:
        raise ValueError(
            f"probe_direction must be one vector [d], got {tuple(probe_direction.shape)}"
        )
    if latent_acts.shape[0] == 0:
        empty = torch.zeros(0)
        return WordAbsorption(empty, empty, empty, empty.bool(), empty.long(), empty)
    direction = probe_direction.float() / probe_direction.float().norm()
    cos = probe_cosines(direction, decoder)  # [d_sae]
    total = acts.float() @ direction  # [n]
    projections = latent_acts.float() * cos  # [n, d_sae]
    main = torch.zeros(cos.shape[0], dtype=torch.bool)
    main[list(main_latents)] = True
    main_proj = projections[:, main].sum(1)  # [n]

    # Absorption fraction: the best few aligned non-main latents fill in what the main miss.
    candidates = (~main & (cos >= t.absorption_fraction_probe_cos_sim_threshold)) & (
        projections > 0
    )
    candidate_proj = torch.where(candidates, projections, torch.zeros(()))
    n_top = min(t.absorption_fraction_max_absorbing_latents, cos.shape[0])
    absorbers = candidate_proj.topk(n_top, dim=1).values.sum(1)  # [n]
    positive = total > 0
    share = torch.where(positive, absorbers / torch.where(positive, total, 1.0), 0.0)
    absorbed = torch.minimum(absorbers, total - main_proj)
    partial = (absorbed / (absorbed + main_proj)).clamp(0.0, 1.0)
    fraction = torch.where(main_proj <= 0, 1.0, partial)
    no_absorption = (
        ~positive | (main_proj >= total) | (share < t.probe_projection_proportion_threshold)
    )
    fraction = torch.where(no_absorption, 0.0, fraction)

    # Full absorption: the main latents are silent and one aligned latent carries the class.
    top_proj, top_latent = projections.max(dim=1)
    silent = (latent_acts[:, main].float() < FIRING_EPS).all(1)
    aligned = cos[top_latent] >= t.full_absorption_probe_cos_sim_threshold
    top_share = torch.where(positive, top_proj / torch.where(positive, total, 1.0), 0.0)
    full = silent & aligned & positive & (top_share >= t.probe_projection_proportion_threshold)
    return WordAbsorption(total, main_proj, fraction, full, top_latent, top_proj)


@dataclass
class ClassAbsorption:
    """One class's absorption summary (SAEBench's per-letter record, plus what led to it)."""

    label: int
    probe_f1: float
    num_probe_true_positives: int
    split_latents: list[int]
    f1_by_k: list[float]
    mean_absorption_fraction: float
    num_full_absorption: int

    @property
    def full_absorption_rate(self) -> float:
        return self.num_full_absorption / max(self.num_probe_true_positives, 1)


@dataclass
class LabelledActs:
    """Activations [n, d] with an integer class per row [n]."""

    acts: Tensor
    labels: Tensor

    def __post_init__(self) -> None:
        if self.acts.ndim != 2 or self.labels.shape != (self.acts.shape[0],):
            raise ValueError(
                f"activations must be [n, d] with labels [n]; got {tuple(self.acts.shape)} "
                f"and {tuple(self.labels.shape)}"
            )


def class_absorption(
    encode: Callable[[Tensor], Tensor],
    decoder: Tensor,
    probes: LinearProbes,
    train: LabelledActs,
    test: LabelledActs,
    absorption_acts: Tensor | None = None,
    *,
    max_k: int = 10,
    l1_decay: float = 0.01,
    f1_jump_threshold: float = 0.03,
    thresholds: AbsorptionThresholds | None = None,
    batch_size: int = 1024,
    progress: bool | None = None,
) -> list[ClassAbsorption]:
    """Absorption of each class present in `test`, for one SAE (`encode`, `decoder`).

    `probes` are the ground-truth probes (fit on `train`); `absorption_acts` [n_test, d] are
    the test inputs on which absorption is measured (default: `test.acts`; SAEBench uses the
    same words in freshly drawn prompts). A class's true positives are its test rows whose
    probe score is positive."""
    absorption_acts = test.acts if absorption_acts is None else absorption_acts
    if absorption_acts.shape != test.acts.shape:
        raise ValueError(
            f"absorption_acts {tuple(absorption_acts.shape)} must match the test activations "
            f"{tuple(test.acts.shape)} row for row"
        )
    train_latents = encode_sparse(encode, train.acts, batch_size)
    test_latents = encode_sparse(encode, test.acts, batch_size)
    y_train, y_test = train.labels.numpy(), test.labels.numpy()
    classes = sorted(int(c) for c in np.unique(y_test))
    sparse_probes = k_sparse_probing(
        train_latents, y_train, test_latents, y_test, classes, max_k, l1_decay,
        f1_jump_threshold, progress,
    )
    scores = probes.scores(test.acts)  # [n_test, n_classes]
    out: list[ClassAbsorption] = []
    for c in classes:
        said_yes = (scores[:, c] > 0).numpy()
        truth = y_test == c
        hits = np.flatnonzero(truth & said_yes)
        split = sparse_probes[c].split_latents
        mean_fraction, n_full = 0.0, 0
        if len(hits) and split:
            rows = absorption_acts[torch.from_numpy(hits)]
            with torch.no_grad():
                latents = encode(rows).float().cpu()
            words = word_absorption(rows, latents, decoder, probes.weight[c], split, thresholds)
            mean_fraction = float(words.absorption_fraction.mean())
            n_full = int(words.is_full_absorption.sum())
        out.append(ClassAbsorption(
            label=c,
            probe_f1=f1(truth, said_yes),
            num_probe_true_positives=len(hits),
            split_latents=split,
            f1_by_k=sparse_probes[c].f1_by_k,
            mean_absorption_fraction=mean_fraction,
            num_full_absorption=n_full,
        ))
    return out
