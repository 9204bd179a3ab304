"""SCR and TPP, as SAEBench defines them: can ablating a few SAE latents remove one concept
from the model's activations and leave the others alone?

Both train logistic probes on the model's activations (mean-pooled over each text's own
tokens), pick latents by their effect on a probe, ablate them (their part of the SAE's
reconstruction taken out of every token, the SAE's error term kept) and re-test the probes.

SCR (spurious correlation removal) reads a dataset with two binary label columns, A and B,
e.g. form and author. A "biased" probe is trained where they agree perfectly (A's first
class always with B's first class, e.g. all drama by Shakespeare, all poems by Milton), so it
leans on both. Latents for one attribute are those with the largest |(mean latent on its positive
texts - on its negative texts) x (the latent's decoder row . that attribute's probe)|, found
with a probe trained on a balanced set for that attribute. Ablating B's latents and testing the
biased probe on A's balanced test set gives `scr_dir1_threshold_n`; the roles swapped give
`scr_dir2_threshold_n`; each is S_SHIFT = (ablated - biased) / (skyline - biased), where
biased is the biased probe's accuracy before ablation and skyline the accuracy of a probe
trained for that attribute on balanced data (0 when skyline - biased < 0.001).
`scr_metric_threshold_n` is the direction whose ablated attribute the biased probe leaned on
more (the one it tells apart worse is the target).

TPP (targeted probe perturbation) reads one label column of three or more classes and trains
a one-vs-rest probe per class. Per class, latents are ranked by max(mean on its texts - mean
on the others, 0) x (decoder row . its probe); ablating the top n, the drop of its own probe's
accuracy minus the mean drop of the other classes' probes is `tpp_threshold_n_total_metric`
(also reported: `_intended_diff_only`, `_unintended_diff_only`).

Deviations from SAEBench, all on purpose: probes are scikit-learn logistic regressions with an
L1 penalty (`probe_l1_c`), fitted to convergence (SAEBench trains a PyTorch probe with Adam
for 20 epochs, batch 16, an L1 penalty, keeping the best test epoch); pooling covers only each
text's own tokens in the ablated activations too (SAEBench's ablation also averages in padding
positions); thresholds
n larger than the SAE's width are reported as None (SAEBench refuses them); and the built-in
datasets are far smaller than SAEBench's (hundreds of texts instead of thousands), so the
figures are noisier.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from saekit.evals.context import EvalData
from saekit.evals.plots import png_figure
from saekit.evals.probe_data import ProbeDataset, ProbeTask, resolve_probe_datasets
from saekit.evals.probes import (
    Ablator,
    effective_decoder,
    fit_probe,
    pooled_latents,
    probe_accuracy,
    probe_direction,
)
from saekit.evals.probing import recorded_config
from saekit.evals.results import EvalResult
from saekit.progress import bar
from saekit.saes.base import SAE

SCR_EVAL_TYPE = "scr"
TPP_EVAL_TYPE = "tpp"

#: What a side-by-side table shows for SCR and for TPP (SAEBench's displayed thresholds).
SCR_HEADLINE: tuple[str, ...] = (
    "scr_metrics.scr_metric_threshold_10",
    "scr_metrics.scr_metric_threshold_20",
)
TPP_HEADLINE: tuple[str, ...] = (
    "tpp_metrics.tpp_threshold_10_total_metric",
    "tpp_metrics.tpp_threshold_20_total_metric",
)

#: The thresholds of SAEBench's schemas: results carry metrics for each (None when not run).
SCHEMA_N_VALUES: tuple[int, ...] = (2, 5, 10, 20, 50, 100, 500)

#: Below this gap between the skyline and the biased probe, SCR scores 0 (SAEBench's rule).
MIN_SCR_GAP = 0.001
#: Fewest texts per quadrant (per combination of the two labels) SCR accepts per split.
MIN_SCR_QUADRANT = 2


@dataclass
class ScrAndTppConfig:
    """Settings shared by SCR and TPP, with SAEBench's names."""

    random_seed: int = 42
    """Seed of the sampling of the probes' texts."""
    dataset_names: list[str] = field(default_factory=lambda: ["author_form"])
    """Built-in dataset names or paths / Hub names of labelled datasets (SCR: two binary
    label columns; TPP: one label column of three or more classes)."""
    perform_scr: bool = True
    """True: SCR; False: TPP."""
    train_set_size: int = 4000
    """Most training texts of one probe (SCR: a quarter of it per quadrant)."""
    test_set_size: int = 1000
    """Most test texts of one probe."""
    context_length: int | None = None
    """Tokens per text; None: the EvalData's context size (recorded as such)."""
    sae_batch_size: int = 125
    """Texts encoded by the SAE at once."""
    model_name: str = ""
    """The model's name, for the record; "": the backend's name."""
    probe_l1_c: float = 1.0
    """Inverse strength of the probes' L1 penalty (scikit-learn's C). SAEBench's probes have
    an L1 penalty and stop after 20 epochs, so they are strongly regularised; C = 1 behaves
    alike: with weak regularisation the biased probe spreads over many directions, and
    any ablation mostly shifts its bias."""
    n_values: list[int] = field(default_factory=lambda: [2, 5, 10, 20, 50, 100, 500])
    """The numbers of latents ablated."""
    column1_vals_lookup: dict[str, list[list[str]]] = field(default_factory=dict)
    """SCR: per dataset, the pairs of classes of its first label column to run (each a run
    of its own, averaged); a dataset not listed runs its first column's two classes."""
    text_column: str | None = None
    """Text column of user datasets (default: found by name)."""
    label_columns: list[str] | None = None
    """Label columns of user datasets (SCR: two; TPP: one)."""

    def __post_init__(self) -> None:
        if not self.n_values or any(int(n) < 1 for n in self.n_values):
            raise ValueError(f"n_values must be positive integers, got {self.n_values}")
        if not self.dataset_names:
            raise ValueError("dataset_names is empty; name at least one probe dataset")
        for name in ("train_set_size", "test_set_size"):
            if getattr(self, name) < 4 * MIN_SCR_QUADRANT:
                raise ValueError(
                    f"{name} must be at least {4 * MIN_SCR_QUADRANT}, got {getattr(self, name)}"
                )
        if self.probe_l1_c <= 0:
            raise ValueError(f"probe_l1_c must be positive, got {self.probe_l1_c}")
        if self.sae_batch_size < 1:
            raise ValueError(f"sae_batch_size must be positive, got {self.sae_batch_size}")


@dataclass
class ScrConfig(ScrAndTppConfig):
    """SCR's settings (see `ScrAndTppConfig`)."""

    perform_scr: bool = True


@dataclass
class TppConfig(ScrAndTppConfig):
    """TPP's settings (see `ScrAndTppConfig`)."""

    dataset_names: list[str] = field(default_factory=lambda: ["folio"])
    perform_scr: bool = False


# The metrics' arithmetic


def scr_score(skyline: float, biased: float, ablated: float) -> float:
    """S_SHIFT: the share of the gap between the biased probe's accuracy and the skyline's
    that ablation closes (0 when the gap is under `MIN_SCR_GAP`)."""
    if skyline - biased < MIN_SCR_GAP:
        return 0.0
    return (ablated - biased) / (skyline - biased)


def tpp_scores(
    clean: Mapping[str, float], ablated: Mapping[str, float], target: str
) -> tuple[float, float, float]:
    """(total, intended, unintended) for ablating `target`'s latents: clean / ablated map each
    class to its probe's accuracy before / after. intended is the target probe's drop,
    unintended the mean drop of the others, total their difference."""
    intended = clean[target] - ablated[target]
    others = [clean[c] - ablated[c] for c in clean if c != target]
    unintended = sum(others) / len(others)
    return intended - unintended, intended, unintended


def select_top_latents(effects: np.ndarray, n: int) -> np.ndarray:
    """The n latents of largest effect among those whose effect is not zero (fewer when fewer
    are non-zero), largest first; ties go to the lower index."""
    nonzero = np.flatnonzero(effects != 0)
    order = nonzero[np.argsort(-effects[nonzero], kind="stable")]
    return order[: min(n, len(order))]


def latent_effects(
    latents: np.ndarray, labels: np.ndarray, direction: np.ndarray, decoder: np.ndarray,
    scr: bool,
) -> np.ndarray:
    """Each latent's effect on a probe: (mean pooled latent on positives - on negatives) x
    (its decoder row . the probe's direction); SCR takes the absolute value, TPP keeps only
    latents more active on the positives (a negative mean difference counts as 0)."""
    diff = latents[labels == 1].mean(0) - latents[labels == 0].mean(0)  # [d_sae]
    if not scr:
        diff = np.maximum(diff, 0.0)
    effects = diff * (decoder @ direction)
    return np.abs(effects) if scr else effects


# SCR


@dataclass(frozen=True)
class ScrSets:
    """The three probing sets of one SCR run: `a` and `b` balanced for the other attribute,
    `biased` with the attributes in perfect agreement."""

    a: ProbeTask
    b: ProbeTask
    biased: ProbeTask


def scr_sets(
    dataset: ProbeDataset, pair: Sequence[str], seed: int, train_size: int, test_size: int
) -> ScrSets:
    """SCR's sets from a dataset with label columns (A, B): for A's classes `pair` = (a+, a-)
    and B's two classes (b+, b-), b+ being the class of B that goes with a+ more often in the
    training split (B's first class on a tie), n texts per quadrant (n = the smallest of
    size // 4, the off-diagonal quadrants and half the diagonal ones (a+, b+) and (a-, b-)):
    a = (a+ | a-, n of each b per class), b = (b+ | b-, n of each a per class),
    biased = (a+ b+ | a- b-, 2n each), per split."""
    col_a, col_b = _scr_columns(dataset)
    a_pos, a_neg = pair
    b_pos, b_neg = dataset.classes[col_b]

    def count(a: str, b: str) -> int:
        return len(dataset.indices("train", **{col_a: a, col_b: b}))

    # The biased set pairs classes the way the data mostly does (its larger diagonal).
    if min(count(a_pos, b_neg), count(a_neg, b_pos)) > min(count(a_pos, b_pos),
                                                          count(a_neg, b_neg)):
        b_pos, b_neg = b_neg, b_pos
    rng = np.random.default_rng(seed)
    parts: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {"a": {}, "b": {}, "biased": {}}
    for split, size in (("train", train_size), ("test", test_size)):
        q = {
            (a, b): rng.permutation(dataset.indices(split, **{col_a: a, col_b: b}))
            for a in (a_pos, a_neg)
            for b in (b_pos, b_neg)
        }
        n = min(
            size // 4,
            len(q[a_pos, b_neg]),
            len(q[a_neg, b_pos]),
            len(q[a_pos, b_pos]) // 2,
            len(q[a_neg, b_neg]) // 2,
        )
        if n < MIN_SCR_QUADRANT:
            counts = ", ".join(f"{a}/{b}: {len(v)}" for (a, b), v in q.items())
            raise ValueError(
                f"{dataset.name}: SCR needs at least {MIN_SCR_QUADRANT} {split} texts in each "
                f"off-diagonal quadrant of ({col_a}, {col_b}) and twice that in "
                f"{a_pos}/{b_pos} and {a_neg}/{b_neg}; it has {counts}. Add texts or raise "
                f"{split}_set_size"
            )
        parts["a"][split] = _two_sides(
            [q[a_pos, b_pos][:n], q[a_pos, b_neg][:n]], [q[a_neg, b_pos][:n], q[a_neg, b_neg][:n]],
            rng,
        )
        parts["b"][split] = _two_sides(
            [q[a_pos, b_pos][:n], q[a_neg, b_pos][:n]], [q[a_pos, b_neg][:n], q[a_neg, b_neg][:n]],
            rng,
        )
        parts["biased"][split] = _two_sides([q[a_pos, b_pos][: 2 * n]],
                                            [q[a_neg, b_neg][: 2 * n]], rng)
    names = {
        "a": (f"{a_pos} / {a_neg}", col_a, a_pos),
        "b": (f"{b_pos} / {b_neg}", col_b, b_pos),
        "biased": (f"{a_pos}_{b_pos} / {a_neg}_{b_neg}", f"{col_a}_{col_b}", f"{a_pos}_{b_pos}"),
    }
    tasks = {
        key: ProbeTask(*names[key], *parts[key]["train"], *parts[key]["test"]) for key in parts
    }
    return ScrSets(**tasks)


def _two_sides(pos: list[np.ndarray], neg: list[np.ndarray], rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
    p, n = np.concatenate(pos), np.concatenate(neg)
    rows = np.concatenate([p, n])
    labels = np.concatenate([np.ones(len(p), np.int64), np.zeros(len(n), np.int64)])
    order = rng.permutation(len(rows))
    return rows[order], labels[order]


def _scr_columns(dataset: ProbeDataset) -> tuple[str, str]:
    if len(dataset.label_columns) != 2:
        raise ValueError(
            f"SCR needs a dataset with two label columns (the target and the spurious "
            f"attribute); {dataset.name} has {list(dataset.label_columns)}. Use a built-in one "
            "such as genre_period or pass label_columns=[col1, col2]"
        )
    col_a, col_b = dataset.label_columns
    if len(dataset.classes[col_b]) != 2:
        raise ValueError(
            f"SCR needs two classes in the second label column {col_b!r} of {dataset.name}; it "
            f"has {len(dataset.classes[col_b])} ({', '.join(dataset.classes[col_b])}). Map it "
            "to two classes first"
        )
    return col_a, col_b


def _scr_pairs(dataset: ProbeDataset, lookup: Mapping[str, Sequence[Sequence[str]]]
               ) -> list[tuple[str, str]]:
    col_a, _ = _scr_columns(dataset)
    classes = dataset.classes[col_a]
    if dataset.name in lookup:
        pairs = [tuple(p) for p in lookup[dataset.name]]
    elif len(classes) == 2:
        pairs = [(classes[0], classes[1])]
    else:
        raise ValueError(
            f"the first label column {col_a!r} of {dataset.name} has {len(classes)} classes; "
            f"name the pairs SCR should run in column1_vals_lookup, e.g. "
            f"{{{dataset.name!r}: [[{classes[0]!r}, {classes[1]!r}]]}}"
        )
    for pair in pairs:
        if len(pair) != 2 or pair[0] == pair[1] or not set(pair) <= set(classes):
            raise ValueError(
                f"column1_vals_lookup[{dataset.name!r}] holds {list(pair)}; each entry is two "
                f"different classes of {col_a!r}: {', '.join(classes)}"
            )
    return pairs  # type: ignore[return-value]


@dataclass
class _ScrBaseline:
    """One SCR run's probes on the model's activations and their clean accuracies."""

    sets: ScrSets
    probes: dict[str, Any]
    accuracy: dict[str, float]


def _scr_baseline(pooled: np.ndarray, sets: ScrSets, l1_c: float) -> _ScrBaseline:
    probes = {}
    for key in ("a", "b", "biased"):
        task = getattr(sets, key)
        probes[key] = fit_probe(pooled[task.train_idx], task.train_y, l1_c)

    def acc(probe: str, on: str) -> float:
        task = getattr(sets, on)
        return probe_accuracy(probes[probe], pooled[task.test_idx], task.test_y)

    accuracy = {
        "skyline_a": acc("a", "a"),  # a probe for A, tested on A
        "skyline_b": acc("b", "b"),
        "biased": acc("biased", "biased"),
        "biased_on_a": acc("biased", "a"),  # the biased probe, tested on A
        "biased_on_b": acc("biased", "b"),
    }
    return _ScrBaseline(sets, probes, accuracy)


def run_scr(
    saes: Sequence[SAE], data: EvalData, config: ScrAndTppConfig | None = None
) -> list[EvalResult]:
    """SCR of each SAE on `data`'s hook; one result per SAE, in order."""
    config = config or ScrConfig()
    if not config.perform_scr:
        raise ValueError("run_scr got a config with perform_scr=False; use run_tpp for TPP")
    datasets = resolve_probe_datasets(
        config.dataset_names, config.text_column, config.label_columns
    )
    runs = []
    for dataset in datasets:
        for pair in _scr_pairs(dataset, config.column1_vals_lookup):
            runs.append((dataset, pair))
    eval_config = recorded_config(asdict(config), data)
    per_sae: list[dict[str, dict[str, float | None]]] = [{} for _ in saes]
    raw: list[dict[str, Any]] = [{} for _ in saes]
    shown = bar(desc="scr", unit="run", total=len(runs) * len(saes), progress=data.progress)
    with shown:
        for dataset, pair in runs:
            acts = data.text_activations(dataset.memo_key, dataset.texts)
            baseline = data.memo(
                ("scr_baseline", dataset.memo_key, tuple(pair), config.random_seed,
                 config.train_set_size, config.test_set_size, config.probe_l1_c),
                lambda d=dataset, p=pair, a=acts: _scr_baseline(
                    a.mean_pooled().numpy(),
                    scr_sets(d, p, config.random_seed, config.train_set_size,
                             config.test_set_size),
                    config.probe_l1_c,
                ),
            )
            run_name = f"{dataset.name}_scr_{pair[0]}_{pair[1]}"
            for i, sae in enumerate(saes):
                scores, ablated = _scr_one_sae(sae, acts, baseline, config, data.progress)
                per_sae[i][run_name] = scores
                raw[i][run_name] = {"clean": baseline.accuracy, "ablated": ablated}
                shown.update(1)
    names = [f"scr_{m}_threshold_{n}" for n in _all_n(config.n_values)
             for m in ("dir1", "metric", "dir2")]
    return [
        _result(SCR_EVAL_TYPE, "scr_metrics", eval_config, per_run, unstructured, names)
        for per_run, unstructured in zip(per_sae, raw, strict=True)
    ]


def _all_n(n_values: Sequence[int]) -> list[int]:
    """The schema's thresholds, then any other one that was run."""
    return [*SCHEMA_N_VALUES, *sorted({int(n) for n in n_values} - set(SCHEMA_N_VALUES))]


def _pooled_latents_and_decoder(
    sae: SAE, acts: Any, config: ScrAndTppConfig, progress: bool | None
) -> tuple[np.ndarray, np.ndarray]:
    """The SAE's latents pooled per text, and its decoder in the activations' space."""
    _require_same_space(sae)
    latents = pooled_latents(sae, acts, batch_size=config.sae_batch_size, progress=progress)
    return latents, effective_decoder(sae).astype(np.float64)


def _scr_one_sae(
    sae: SAE, acts: Any, baseline: _ScrBaseline, config: ScrAndTppConfig,
    progress: bool | None = False,
) -> tuple[dict[str, float | None], dict[str, dict[int, float | None]]]:
    sets, probes, clean = baseline.sets, baseline.probes, baseline.accuracy
    latents, decoder = _pooled_latents_and_decoder(sae, acts, config, progress)
    effects = {
        key: latent_effects(
            latents[task.train_idx], task.train_y, probe_direction(probes[key]), decoder, True
        )
        for key, task in (("a", sets.a), ("b", sets.b))
    }
    rows = np.union1d(sets.a.test_idx, sets.b.test_idx)
    ablator = Ablator(sae, acts, rows, config.sae_batch_size, latents=latents[rows])
    where = {key: np.searchsorted(rows, getattr(sets, key).test_idx) for key in ("a", "b")}
    scores: dict[str, float | None] = {}
    ablated: dict[str, dict[int, float | None]] = {"dir1": {}, "dir2": {}}
    # dir1: B's latents ablated, the biased probe tested on A; dir2: the reverse.
    directions = {1: ("b", "a", "skyline_a", "biased_on_a"),
                  2: ("a", "b", "skyline_b", "biased_on_b")}
    for n in config.n_values:
        n = int(n)
        for d, (ablate, on, skyline, biased) in directions.items():
            if n > sae.cfg.d_sae:
                ablated[f"dir{d}"][n] = scores[f"scr_dir{d}_threshold_{n}"] = None
                continue
            pooled = ablator.ablated(select_top_latents(effects[ablate], n))
            task = getattr(sets, on)
            acc = probe_accuracy(probes["biased"], pooled[where[on]], task.test_y)
            ablated[f"dir{d}"][n] = acc
            scores[f"scr_dir{d}_threshold_{n}"] = scr_score(clean[skyline], clean[biased], acc)
        # The target is the attribute the biased probe tells apart worse; the other one is
        # the spurious one, whose ablation should help.
        if clean["biased_on_a"] < clean["biased_on_b"]:
            chosen: float | None = scores[f"scr_dir1_threshold_{n}"]
        elif clean["biased_on_a"] > clean["biased_on_b"]:
            chosen = scores[f"scr_dir2_threshold_{n}"]
        else:
            chosen = None
        scores[f"scr_metric_threshold_{n}"] = chosen
    order = [f"scr_{m}_threshold_{n}" for n in config.n_values for m in ("dir1", "metric",
                                                                          "dir2")]
    return {k: scores[k] for k in order}, ablated


def _require_same_space(sae: SAE) -> None:
    if sae.is_transcoder:
        raise ValueError(
            f"SCR and TPP ablate latents in the activation the SAE reads and reconstructs; "
            f"this {sae.architecture} reconstructs another hook. Evaluate SAEs, not transcoders"
        )


# TPP


@dataclass
class _TppBaseline:
    """One TPP dataset's one-vs-rest probes and their clean accuracies."""

    tasks: list[ProbeTask]
    probes: dict[str, Any]
    accuracy: dict[str, float]


def _tpp_baseline(pooled: np.ndarray, tasks: list[ProbeTask], l1_c: float) -> _TppBaseline:
    probes = {t.name: fit_probe(pooled[t.train_idx], t.train_y, l1_c) for t in tasks}
    accuracy = {
        t.name: probe_accuracy(probes[t.name], pooled[t.test_idx], t.test_y) for t in tasks
    }
    return _TppBaseline(tasks, probes, accuracy)


def _tpp_tasks(dataset: ProbeDataset, config: ScrAndTppConfig) -> list[ProbeTask]:
    column = dataset.label_columns[0]
    classes = dataset.classes[column]
    if len(classes) < 3:
        raise ValueError(
            f"TPP needs a label column with at least three classes (one probe per class, each "
            f"against the rest); {column!r} of {dataset.name} has {len(classes)}: "
            f"{', '.join(classes)}. Use a built-in one such as folio or another column"
        )
    return dataset.binary_tasks(column, config.random_seed, config.train_set_size,
                                config.test_set_size)


def run_tpp(
    saes: Sequence[SAE], data: EvalData, config: ScrAndTppConfig | None = None
) -> list[EvalResult]:
    """TPP of each SAE on `data`'s hook; one result per SAE, in order."""
    config = config or TppConfig()
    if config.perform_scr:
        raise ValueError("run_tpp got a config with perform_scr=True; use run_scr for SCR")
    datasets = resolve_probe_datasets(
        config.dataset_names, config.text_column, config.label_columns
    )
    eval_config = recorded_config(asdict(config), data)
    per_sae: list[dict[str, dict[str, float | None]]] = [{} for _ in saes]
    per_class: list[dict[str, Any]] = [{} for _ in saes]
    shown = bar(desc="tpp", unit="run", total=len(datasets) * len(saes), progress=data.progress)
    with shown:
        for dataset in datasets:
            tasks = _tpp_tasks(dataset, config)
            acts = data.text_activations(dataset.memo_key, dataset.texts)
            baseline = data.memo(
                ("tpp_baseline", dataset.memo_key, config.random_seed, config.train_set_size,
                 config.test_set_size, config.probe_l1_c),
                lambda a=acts, t=tasks: _tpp_baseline(a.mean_pooled().numpy(), t,
                                                      config.probe_l1_c),
            )
            for i, sae in enumerate(saes):
                means, classes = _tpp_one_sae(sae, acts, baseline, config, data.progress)
                per_sae[i][f"{dataset.name}_tpp"] = means
                per_class[i][dataset.name] = classes
                shown.update(1)
    names = [f"tpp_threshold_{n}_{m}" for n in _all_n(config.n_values)
             for m in ("total_metric", "intended_diff_only", "unintended_diff_only")]
    return [
        _result(TPP_EVAL_TYPE, "tpp_metrics", eval_config, per_run, unstructured, names)
        for per_run, unstructured in zip(per_sae, per_class, strict=True)
    ]


def _tpp_one_sae(
    sae: SAE, acts: Any, baseline: _TppBaseline, config: ScrAndTppConfig,
    progress: bool | None = False,
) -> tuple[dict[str, float | None], dict[str, dict[str, float | None]]]:
    tasks, probes, clean = baseline.tasks, baseline.probes, baseline.accuracy
    latents, decoder = _pooled_latents_and_decoder(sae, acts, config, progress)
    rows = np.unique(np.concatenate([t.test_idx for t in tasks]))
    ablator = Ablator(sae, acts, rows, config.sae_batch_size, latents=latents[rows])
    where = {t.name: np.searchsorted(rows, t.test_idx) for t in tasks}
    per_class: dict[str, dict[str, float | None]] = {}
    for target in tasks:
        effects = latent_effects(
            latents[target.train_idx], target.train_y, probe_direction(probes[target.name]),
            decoder, False,
        )
        metrics: dict[str, float | None] = {}
        for n in config.n_values:
            n = int(n)
            names = [f"tpp_threshold_{n}_{m}" for m in
                     ("total_metric", "intended_diff_only", "unintended_diff_only")]
            if n > sae.cfg.d_sae:
                metrics.update(dict.fromkeys(names))
                continue
            pooled = ablator.ablated(select_top_latents(effects, n))
            after = {
                t.name: probe_accuracy(probes[t.name], pooled[where[t.name]], t.test_y)
                for t in tasks
            }
            metrics.update(zip(names, tpp_scores(clean, after, target.name), strict=True))
        per_class[target.name] = metrics
    names = list(next(iter(per_class.values())))
    means = {m: _mean([c[m] for c in per_class.values()]) for m in names}
    return means, per_class


# Results and plots


def _mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return float(sum(kept) / len(kept)) if kept else None


def _result(
    eval_type: str, category: str, eval_config: dict[str, Any],
    per_run: dict[str, dict[str, float | None]], unstructured: Any, names: list[str],
) -> EvalResult:
    """SAEBench's layout: one detail per run (`<run>_results`), metrics averaged over runs;
    `names` in order, None where not run."""
    details = [
        {"dataset_name": f"{run}_results", **{m: scores.get(m) for m in names}}
        for run, scores in per_run.items()
    ]
    metrics = {category: {m: _mean([s.get(m) for s in per_run.values()]) for m in names}}
    return EvalResult(eval_type, eval_config, metrics, details, unstructured)


def plot_scr(results: Mapping[str, EvalResult], path: str | Path) -> Path:
    """SCR's metric against the number of ablated latents, one line per SAE: one PNG."""
    return _plot_thresholds(results, path, "scr_metrics", "scr_metric_threshold_{n}",
                            "SCR (S_SHIFT of the chosen direction)", "SCR")


def plot_tpp(results: Mapping[str, EvalResult], path: str | Path) -> Path:
    """TPP's metric against the number of ablated latents, one line per SAE: one PNG."""
    return _plot_thresholds(results, path, "tpp_metrics", "tpp_threshold_{n}_total_metric",
                            "TPP (intended - unintended accuracy drop)", "TPP")


def _plot_thresholds(results: Mapping[str, EvalResult], path: str | Path, category: str,
                     pattern: str, ylabel: str, title: str) -> Path:
    with png_figure(path, figsize=(6.5, 4.2)) as (fig, ax):
        drawn = False
        for label, result in results.items():
            ns = [int(n) for n in result.eval_config.get("n_values", [])]
            points = [(n, result.metrics[category].get(pattern.format(n=n))) for n in ns]
            points = [(n, v) for n, v in points if v is not None and not math.isnan(v)]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o", label=label)
                drawn = True
        ax.axhline(0.0, color="grey", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("latents ablated")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no values to plot", ha="center", transform=ax.transAxes)
    return Path(path)
