"""SAEBench's first-letter feature absorption eval (`absorption_first_letter`).

Feature absorption: an SAE has a latent for a general feature ("starts with S") that stays
silent on some inputs where the feature holds, because a more specific latent (" short")
has absorbed the general direction into its decoder. Sparsity rewards this, and it makes the
general latent an unreliable classifier. The eval measures it on first letters, a feature
whose ground truth is known for every token: a probe on the model's activations finds each
letter's direction, k-sparse probing finds the SAE's main latents for the letter, and on
each word the probe gets right, absorption is the share of the probe projection that the
main latents miss and other aligned latents carry (`absorption_math` has the rules).

The words, prompts and probes depend only on the model and the hook, so they are built once
per `EvalData` and shared by every SAE evaluated on it.

Only meaningful for models that know how words are spelled: SAEBench advises against models
under 1B parameters, and the result notes when the model is smaller.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saekit.data.tokens import sequence_framing
from saekit.evals.absorption_data import LETTERS, SpellingPrompt, alpha_words, split_words
from saekit.evals.absorption_math import (
    AbsorptionThresholds,
    ClassAbsorption,
    LabelledActs,
    LinearProbes,
    class_absorption,
    fit_class_probes,
)
from saekit.evals.context import EvalData
from saekit.evals.plots import png_figure
from saekit.evals.results import EvalResult
from saekit.saes.base import SAE

logger = logging.getLogger(__name__)

EVAL_TYPE_ID = "absorption_first_letter"
HEADLINE: tuple[str, ...] = (
    "mean.mean_absorption_fraction_score",
    "mean.mean_full_absorption_score",
    "mean.mean_num_split_features",
)
#: Below this many parameters a model's spelling knowledge is too weak for the eval to mean
#: much (SAEBench's advice).
MIN_MEANINGFUL_PARAMETERS = 1_000_000_000
#: Least share of prompts whose read position must hold the word's own token.
MIN_WORD_AT_POSITION = 0.5


@dataclass
class AbsorptionConfig:
    """Settings of the absorption eval; names and defaults are SAEBench's
    (`AbsorptionEvalConfig`), and the thresholds of the scores are its fixed constants."""

    model_name: str = ""
    """The model's name, recorded in the result; empty: the backend's name."""
    random_seed: int = 42
    """Seed of the word split and of the examples drawn into each prompt."""
    f1_jump_threshold: float = 0.03
    """A letter's main latents grow from k to k + 1 only while F1 rises by more than this."""
    max_k_value: int = 10
    """Largest k of the k-sparse probes."""
    prompt_template: str = "{word} has the first letter:"
    """Each line of a prompt; {word} is replaced by the word."""
    prompt_token_pos: int = -6
    """Position read, counted from the prompt's end; must be the word's token (-6 for the
    default template: word, has, the, first, letter, colon)."""
    k_sparse_probe_l1_decay: float = 0.01
    """L1 strength of the probe that ranks latents for k-sparse probing."""
    min_GT_probe_f1: float = 0.6  # noqa: N815 - SAEBench's field name
    """A letter counts only when the probe on activations reaches this test F1."""
    min_feats_for_eval: int = 20
    """Fewest letters that must count for the eval to report scores."""

    def __post_init__(self) -> None:
        if "{word}" not in self.prompt_template:
            raise ValueError(
                f"prompt_template {self.prompt_template!r} has no {{word}} placeholder; "
                "write where the word goes, e.g. '{word} has the first letter:'"
            )
        if self.prompt_token_pos >= 0:
            raise ValueError(
                f"prompt_token_pos={self.prompt_token_pos} must be negative: it counts back "
                "from the end of the prompt to the word's token (-6 for the default template)"
            )
        if self.max_k_value < 1:
            raise ValueError(f"max_k_value={self.max_k_value} must be at least 1")
        if self.k_sparse_probe_l1_decay <= 0:
            raise ValueError(
                f"k_sparse_probe_l1_decay={self.k_sparse_probe_l1_decay} must be positive"
            )
        if self.f1_jump_threshold < 0:
            raise ValueError(f"f1_jump_threshold={self.f1_jump_threshold} must be >= 0")
        if not 0 <= self.min_GT_probe_f1 <= 1:
            raise ValueError(f"min_GT_probe_f1={self.min_GT_probe_f1} must be in [0, 1]")
        if not 1 <= self.min_feats_for_eval <= len(LETTERS):
            raise ValueError(
                f"min_feats_for_eval={self.min_feats_for_eval} must be between 1 and 26"
            )


@dataclass
class LetterProbing:
    """What every SAE on one model and hook shares: the prompts' activations and the probes."""

    train: LabelledActs
    test: LabelledActs
    absorption_acts: Tensor  # [n_test, d]: the test words in fresh prompts
    probes: LinearProbes
    n_words: int
    word_at_position: float  # share of prompts whose read token is the word


def run_absorption(
    saes: Sequence[SAE], data: EvalData, config: AbsorptionConfig | None = None
) -> list[EvalResult]:
    """The absorption eval of each SAE (all reading `data.site`), one `EvalResult` each, in
    SAEBench's `absorption_first_letter` layout: metrics `mean.*`, one detail per letter."""
    config = config or AbsorptionConfig()
    eval_config = asdict(config)
    eval_config["model_name"] = config.model_name or str(getattr(data.backend, "name", ""))
    n_params = model_parameters(data.backend)
    note = small_model_note(n_params)
    if note:
        logger.warning("absorption: %s", note)
    probing = data.memo(
        ("absorption", config.prompt_template, config.prompt_token_pos, config.random_seed),
        lambda: letter_probing(data, config),
    )
    results = []
    for sae in saes:
        encode = _encoder(sae)
        classes = class_absorption(
            encode,
            sae.W_dec.detach().float().cpu(),
            probing.probes,
            probing.train,
            probing.test,
            probing.absorption_acts,
            max_k=config.max_k_value,
            l1_decay=config.k_sparse_probe_l1_decay,
            f1_jump_threshold=config.f1_jump_threshold,
            thresholds=AbsorptionThresholds(),
            progress=data.progress,
        )
        results.append(_result(classes, config, eval_config, probing, n_params, note))
    return results


def _encoder(sae: SAE) -> Any:
    def encode(x: Tensor) -> Tensor:
        with torch.no_grad():
            return sae.encode(x.to(sae.device)).float().cpu()

    return encode


def letter_probing(data: EvalData, config: AbsorptionConfig) -> LetterProbing:
    """Build the words and prompts, read their activations, fit the letter probes."""
    tokenizer = data.backend.tokenizer
    if tokenizer is None:
        raise ValueError("the absorption eval needs the model's tokenizer; this model has none")
    words = alpha_words(tokenizer)
    if len(words) < 10:
        raise ValueError(
            f"the tokenizer has {len(words)} single-token alphabetic words; the absorption eval "
            "needs a vocabulary of real words"
        )
    split = split_words(words, config.prompt_template, config.random_seed)
    key = f"absorption prompts, seed {config.random_seed}, {config.prompt_template!r}"
    train_acts, hit_train = prompt_activations(data, f"{key}, train", split.train, config)
    test_acts, hit_test = prompt_activations(data, f"{key}, test", split.test, config)
    absorb_acts, hit_abs = prompt_activations(data, f"{key}, absorb", split.absorption, config)
    n_prompts = len(split.train) + len(split.test) + len(split.absorption)
    train = LabelledActs(train_acts, _labels(split.train))
    test = LabelledActs(test_acts, _labels(split.test))
    probes = fit_class_probes(train.acts, train.labels, len(LETTERS), progress=data.progress)
    return LetterProbing(
        train, test, absorb_acts, probes, len(words), (hit_train + hit_test + hit_abs) / n_prompts
    )


def _labels(prompts: Sequence[SpellingPrompt]) -> Tensor:
    return torch.tensor([LETTERS.index(p.letter) for p in prompts], dtype=torch.long)


def read_positions(
    tokenizer: Any, texts: Sequence[str], prepend_bos: bool | None, token_pos: int
) -> tuple[list[list[int]], list[int]]:
    """Each text's token ids (framed as `EvalData` frames them) and the absolute index of
    the position `token_pos` counted from the end of the text's own tokens."""
    _, prefix, suffix = sequence_framing(tokenizer, prepend_bos)
    encoded = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    rows, positions = [], []
    for text, ids in zip(texts, encoded, strict=True):
        if len(ids) + token_pos < 0:
            raise ValueError(
                f"prompt_token_pos={token_pos} is before the start of the prompt {text!r} "
                f"({len(ids)} tokens)"
            )
        rows.append([*prefix, *ids, *suffix])
        positions.append(len(prefix) + len(ids) + token_pos)
    return rows, positions


def prompt_activations(
    data: EvalData, key: str, prompts: Sequence[SpellingPrompt],
    config: AbsorptionConfig,
) -> tuple[Tensor, int]:
    """The activation [n, d] at each prompt's read position, and how many prompts have the
    word's own token there. Prompts of one length run together (no padding)."""
    tokenizer = data.backend.tokenizer
    texts = [p.text for p in prompts]
    rows, positions = read_positions(tokenizer, texts, data.prepend_bos, config.prompt_token_pos)
    hits = sum(
        tokenizer.decode([row[pos]]).strip() == p.word.strip()
        for row, pos, p in zip(rows, positions, prompts, strict=True)
    )
    if hits < MIN_WORD_AT_POSITION * len(prompts):
        example = rows[0][positions[0]]
        raise ValueError(
            f"prompt_token_pos={config.prompt_token_pos} reads the token "
            f"{tokenizer.decode([example])!r} of the prompt {texts[0]!r}, not the word "
            f"{prompts[0].word!r} (so in {len(prompts) - hits} of {len(prompts)} prompts); "
            "set prompt_token_pos to the word's position counted from the end of "
            "prompt_template"
        )
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (row, pos) in enumerate(zip(rows, positions, strict=True)):
        groups.setdefault((len(row), pos), []).append(i)
    out: Tensor | None = None
    for (length, pos), members in sorted(groups.items()):
        tokens = torch.tensor([rows[i] for i in members], dtype=torch.long)
        acts = data.token_activations(f"{key}, {length} tokens", tokens, position=pos)
        if out is None:
            out = torch.zeros(len(prompts), acts.shape[-1])
        out[torch.tensor(members)] = acts
    assert out is not None
    return out, hits


def model_parameters(backend: Any) -> int | None:
    """Parameters of the backend's torch module, or None when it has none to count."""
    model = getattr(backend, "model", None)
    if isinstance(model, torch.nn.Module):
        return sum(p.numel() for p in model.parameters())
    return None


def small_model_note(n_params: int | None) -> str | None:
    """A warning for models too small to know spelling, or None."""
    if n_params is None or n_params >= MIN_MEANINGFUL_PARAMETERS:
        return None
    return (
        f"the model has {n_params:,} parameters; first-letter absorption needs a "
        "model that knows spelling (SAEBench advises 1B parameters or more), so these figures "
        "show the mechanics of the eval, not the SAE's absorption"
    )


def _result(
    classes: Sequence[ClassAbsorption],
    config: AbsorptionConfig,
    eval_config: dict[str, Any],
    probing: LetterProbing,
    n_params: int | None,
    note: str | None,
) -> EvalResult:
    kept = [c for c in classes if c.probe_f1 > config.min_GT_probe_f1]
    details = [
        {
            "first_letter": LETTERS[c.label],
            "mean_absorption_fraction": c.mean_absorption_fraction,
            "full_absorption_rate": c.full_absorption_rate,
            "num_full_absorption": c.num_full_absorption,
            "num_probe_true_positives": c.num_probe_true_positives,
            "num_split_features": len(c.split_latents),
        }
        for c in kept
    ]
    enough = len(kept) >= config.min_feats_for_eval
    fractions = [d["mean_absorption_fraction"] for d in details]
    full = [d["full_absorption_rate"] for d in details]
    splits = [float(d["num_split_features"]) for d in details]
    metrics = {
        "mean": {
            "mean_absorption_fraction_score": _mean(fractions) if enough else None,
            "mean_full_absorption_score": _mean(full) if enough else None,
            "mean_num_split_features": _mean(splits) if enough else None,
            "std_dev_absorption_fraction_score": _stdev(fractions) if enough else None,
            "std_dev_full_absorption_score": _stdev(full) if enough else None,
            "std_dev_num_split_features": _stdev(splits) if enough else None,
        }
    }
    unstructured: dict[str, Any] = {
        "model_parameters": n_params,
        "note": note,
        "n_words": probing.n_words,
        "n_train_words": int(probing.train.labels.numel()),
        "n_test_words": int(probing.test.labels.numel()),
        "word_token_at_read_position": probing.word_at_position,
        "letters_evaluated": len(kept),
        "probe_f1": {LETTERS[c.label]: c.probe_f1 for c in classes},
        "split_latents": {LETTERS[c.label]: c.split_latents for c in kept},
        "k_sparse_f1": {LETTERS[c.label]: c.f1_by_k for c in kept},
    }
    if not enough:
        reason = (
            f"only {len(kept)} letters have a probe test F1 above min_GT_probe_f1="
            f"{config.min_GT_probe_f1} (min_feats_for_eval={config.min_feats_for_eval}): the "
            "model does not represent first letters well enough at this hook to measure "
            "absorption"
        )
        logger.warning("absorption: %s", reason)
        unstructured["not_evaluated"] = reason
    return EvalResult(EVAL_TYPE_ID, eval_config, metrics, details, unstructured)


def _mean(values: Sequence[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _stdev(values: Sequence[float]) -> float | None:
    return statistics.stdev(values) if len(values) > 1 else None


def plot_absorption(results: Mapping[str, EvalResult], path: str | Path) -> Path:
    """One PNG: each SAE's mean absorption fraction and full-absorption rate (bars, with the
    standard deviation over letters), and its absorption fraction per letter."""
    if not results:
        raise ValueError("plot_absorption needs at least one result")
    labels = list(results)
    with png_figure(path, 1, 2, figsize=(12, 4.5), width_ratios=[1, 2]) as (fig, (bars, letters)):
        width = 0.8 / len(labels)
        for i, label in enumerate(labels):
            mean = results[label].metrics["mean"]
            heights = [_num(mean["mean_absorption_fraction_score"]),
                       _num(mean["mean_full_absorption_score"])]
            errors = [mean["std_dev_absorption_fraction_score"] or 0.0,
                      mean["std_dev_full_absorption_score"] or 0.0]
            shown = label if mean["mean_absorption_fraction_score"] is not None else (
                f"{label} (not evaluated)")
            bars.bar([j + i * width for j in range(2)], heights, width, yerr=errors,
                     label=shown, capsize=3)
            by_letter = {d["first_letter"]: d["mean_absorption_fraction"]
                         for d in results[label].details}
            letters.plot(range(26), [_num(by_letter.get(ch)) for ch in LETTERS], "o-",
                         label=shown, markersize=4)
        bars.set_xticks([width * (len(labels) - 1) / 2 + j for j in range(2)])
        bars.set_xticklabels(["absorption fraction", "full absorption"])
        bars.set_ylabel("mean over letters (lower is better)")
        bars.set_ylim(bottom=0)
        letters.set_xticks(range(26))
        letters.set_xticklabels(list(LETTERS))
        letters.set_ylabel("mean absorption fraction")
        letters.set_title("per letter (gaps: letter not evaluated)")
        letters.legend(fontsize=8)
        fig.suptitle("first-letter feature absorption")
    return Path(path)


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)
