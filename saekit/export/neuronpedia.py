"""`export_neuronpedia`: an SAE's latents in the layout Neuronpedia imports.

The layout is the one SAEDashboard's Neuronpedia runner writes, and which Neuronpedia's
import tooling reads:

    OUT/run_settings.json        the settings the batches were made with
    OUT/skipped_indexes.json     latents left out (here: those that never fired), to be
                                 created as dead
    OUT/batch-0.json, ...        {model_id, layer, sae_set, sae_id_suffix, features: [...]},
                                 `features_per_batch` latents each
    OUT/explanations/batch-0.jsonl.gz, ...
                                 when explanations are given: one Neuronpedia explanation row
                                 per explained latent, batched as the features are

Every number comes from saekit's `FeatureStats` (computed here over held-out text, or given)
and from the weights (logit effects through the model's unembedding, decoder alignment).

A crosscoder writes to several sites, so it has no single decoder row to align or to read
through one unembedding: its records leave the logit and alignment fields empty, and carry
each site's share of the latent's summed decoder norms in `decoder_weights_dist`, the field
in which SAEDashboard gives each attention head's share of an hcat SAE's decoder norm (the
same quantity, per site instead of per head; with two sites the second share is the
relative decoder norm). Neuronpedia has no field for a class, so the class is not exported.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from torch import Tensor

from saekit.analysis.crosscoder_norms import crosscoder_norms
from saekit.analysis.explanations import Explanation, read_explanations
from saekit.analysis.stats import FeatureStats
from saekit.export.folder import check_export_folder, staged_folder
from saekit.export.neuronpedia_features import (
    DIGITS,
    LogitTables,
    TokenText,
    activation_examples,
    activation_histogram,
    example_rows,
    logit_tables,
    neuron_alignment,
    rounded,
)
from saekit.progress import bar
from saekit.saes.base import SAE

logger = logging.getLogger(__name__)

RUN_SETTINGS_FILE = "run_settings.json"
SKIPPED_FILE = "skipped_indexes.json"
EXPLANATIONS_DIR = "explanations"
#: Tokens read for the statistics when none are given (as `saekit dashboard`).
DEFAULT_TOKENS = 32_768


@dataclass(frozen=True)
class NeuronpediaIds:
    """Where the latents go on Neuronpedia: the source id is `{layer}-{sae_set}`."""

    model_id: str
    layer: int
    sae_set: str
    sae_id_suffix: str | None = None

    @property
    def source_id(self) -> str:
        base = f"{self.layer}-{self.sae_set}"
        return f"{base}__{self.sae_id_suffix}" if self.sae_id_suffix else base


def neuronpedia_ids(
    sae: SAE, model_id: str | None = None, sae_set: str | None = None, layer: int | None = None
) -> NeuronpediaIds:
    """Ids from the arguments, else from the SAE's metadata: `neuronpedia_id` ("model/L-set")
    when it has one, the model name and the hook's block number otherwise."""
    meta = sae.cfg.metadata
    known = re.fullmatch(r"([^/]+)/(\d+)-(.+)", meta.neuronpedia_id or "")
    hook = re.match(r"blocks\.(\d+)\.", meta.hook_name or "")
    model_id = model_id or (known.group(1) if known else meta.model_name)
    if not model_id:
        raise ValueError(
            "the SAE's metadata names no model; pass model_id= (--model-id), the id Neuronpedia "
            "knows the model by, e.g. gpt2-small"
        )
    if layer is None:
        layer = int(known.group(2)) if known else int(hook.group(1)) if hook else 0
    sae_set = sae_set or (known.group(3) if known else "saekit")
    for name, value in (("model_id", model_id), ("sae_set", sae_set)):
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"{name} {value!r} is not a Neuronpedia id; pass {name}= ({flag}) with "
                "letters, digits, '.', '_' and '-' only, e.g. gpt2-small"
            )
    if layer < 0:
        raise ValueError(f"layer must be >= 0, got {layer}")
    return NeuronpediaIds(model_id, layer, sae_set)


def export_neuronpedia(
    sae: SAE,
    out: str | Path,
    *,
    stats: FeatureStats | str | Path | None = None,
    model: Any = None,
    dataset: Any = None,
    n_tokens: int = DEFAULT_TOKENS,
    context_size: int | None = None,
    model_batch_size: int = 16,
    top_k: int = 20,
    explanations: str | Path | Mapping[int, Explanation] | None = None,
    model_id: str | None = None,
    sae_set: str | None = None,
    layer: int | None = None,
    features_per_batch: int = 128,
    n_intervals: int = 5,
    per_interval: int = 5,
    creator_id: str = "",
    backend: str = "auto",
    overwrite: bool = False,
    progress: bool | None = None,
) -> Path:
    """Write `sae`'s latents for Neuronpedia under `out`; returns `out`.

    Args:
        stats: the latents' statistics, or a folder `saekit dashboard` saved them in; None
            computes them over `n_tokens` of `dataset` (default: the bundled corpus's
            held-out works) with `top_k` top examples per latent.
        model: the model (backend, or anything `load_model` takes); default the one named in
            the SAE's metadata. Its tokenizer gives the token strings and its unembedding
            the logit tables.
        explanations: an explanations.jsonl file (or folder holding one), or {latent:
            Explanation}; written as Neuronpedia explanation rows.
        model_id, sae_set, layer: the Neuronpedia ids (see `neuronpedia_ids`).
        features_per_batch: latents per batch-N.json.
        n_intervals, per_interval: activation intervals and random examples per interval.
        creator_id: the Neuronpedia user id written as the explanations' author.
        overwrite: replace `out` if it holds files (otherwise refused).
        progress: show a bar of the latents written (None: as `saekit.progress` is set).
    """
    from saekit.analysis.collect import statistics_models

    for name, value in (("features_per_batch", features_per_batch),
                        ("n_intervals", n_intervals), ("per_interval", per_interval),
                        ("n_tokens", n_tokens), ("top_k", top_k)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}")
    check_export_folder(out, overwrite)
    ids = neuronpedia_ids(sae, model_id, sae_set, layer)
    notes = _explanations(explanations, sae.cfg.d_sae)
    if isinstance(stats, (str, Path)):
        stats = FeatureStats.load(stats)
    if stats is not None and stats.d_sae != sae.cfg.d_sae:
        raise ValueError(
            f"the statistics describe {stats.d_sae} latents but the SAE has {sae.cfg.d_sae}; "
            "pass the statistics of this SAE"
        )
    models = statistics_models(sae, model, backend)
    backend_ = models[0] if isinstance(models, list) else models
    context = context_size or sae.cfg.metadata.context_size or 128
    n_prompts = None
    if stats is None:
        stats, n_prompts = _statistics(
            sae, models, dataset, n_tokens, context, model_batch_size, top_k
        )
    W_U = _unembedding(sae, backend_)
    settings = {
        "sae_set": ids.sae_set,
        "np_sae_id_suffix": ids.sae_id_suffix,
        "model_id": ids.model_id,
        "layer": ids.layer,
        "huggingface_dataset_path": _dataset_name(dataset),
        "n_prompts_total": n_prompts or math.ceil(stats.n_tokens / context),
        "n_tokens_in_prompt": context,
        "n_features_at_a_time": features_per_batch,
        "n_quantiles": n_intervals,
        "top_acts_group_size": int(stats.top.keys.shape[1]),
        "quantile_group_size": per_interval,
        "hook_name": sae.cfg.metadata.hook_name,
        "n_tokens": stats.n_tokens,
    }
    live = (stats.fire_count > 0).nonzero().flatten().tolist()
    dead = (stats.fire_count == 0).nonzero().flatten().tolist()
    with staged_folder(out, overwrite) as folder:
        _write_json(folder / RUN_SETTINGS_FILE, settings, indent=2)
        _write_json(folder / SKIPPED_FILE, {
            "model_id": ids.model_id, "layer": str(ids.layer), "sae_set": ids.sae_set,
            # Latents below this log10 density were skipped: those that never fired.
            "log_sparsity": round(math.log10(1 / max(stats.n_tokens, 1)), DIGITS),
            "skipped_indexes": dead,
        })
        text = TokenText(backend_.tokenizer)
        shown = bar(total=len(live), desc="neuronpedia export", unit="latent",
                    progress=progress)
        with shown:
            for number, start in enumerate(range(0, len(live), features_per_batch)):
                latents = live[start:start + features_per_batch]
                features = _features(
                    sae, stats, latents, W_U, text, settings, n_intervals, per_interval
                )
                batch = {"model_id": ids.model_id, "layer": ids.layer, "sae_set": ids.sae_set,
                         "sae_id_suffix": ids.sae_id_suffix, "features": features}
                _write_json(folder / f"batch-{number}.json", batch)
                _write_explanations(folder, number, latents, notes, ids, creator_id)
                shown.update(len(latents))
    return Path(out).expanduser()


def _explanations(
    given: str | Path | Mapping[int, Explanation] | None, d_sae: int
) -> dict[int, Explanation]:
    if given is None:
        return {}
    if isinstance(given, (str, Path)):
        if not Path(given).expanduser().exists():
            raise FileNotFoundError(f"explanations {given} do not exist; pass an "
                                    "explanations.jsonl file or a folder holding one")
        found = read_explanations(Path(given).expanduser())
    else:
        found = dict(given)
    outside = sorted(k for k in found if not 0 <= k < d_sae)
    if outside:
        raise ValueError(
            f"explanations name latents {outside[:5]} but the SAE has latents 0..{d_sae - 1}; "
            "they belong to another SAE"
        )
    return found


def _statistics(
    sae: SAE, models: Any, dataset: Any, n_tokens: int, context: int, batch_size: int,
    top_k: int,
) -> tuple[FeatureStats, int]:
    """Statistics over held-out text, as `saekit dashboard` gathers them; and the number of
    sequences read. `models` is a backend, or a list of them for a crosscoder over models."""
    from saekit.analysis.collect import feature_statistics
    from saekit.evals.api import heldout_token_batches
    from saekit.models.positions import check_context_size

    listed = models if isinstance(models, list) else [models]
    for backend in listed:
        check_context_size(backend, context)
    batches = heldout_token_batches(
        listed[0].tokenizer, n_tokens, dataset=dataset, context_size=context,
        batch_size=batch_size, prepend_bos=sae.cfg.metadata.window_prepend_bos,
    )
    stats = feature_statistics(sae, models, batches, top_k=top_k)
    return stats, sum(int(b.shape[0]) for b in batches)


def _unembedding(sae: SAE, backend: Any) -> Tensor | None:
    from saekit.analysis.collect import unembedding

    W_U = None if sae.multi_site else unembedding(backend)
    if W_U is None or W_U.shape[0] != sae.cfg.output_width:
        logger.info("no logit tables: the SAE does not write to the unembedding's input")
        return None
    return W_U.detach().float().cpu()


def _dataset_name(dataset: Any) -> str:
    if dataset is None:
        return "saekit bundled corpus (held-out works)"
    return str(dataset) if isinstance(dataset, (str, Path)) else type(dataset).__name__


def _features(
    sae: SAE,
    stats: FeatureStats,
    latents: list[int],
    W_U: Tensor | None,
    text: TokenText,
    settings: dict[str, Any],
    n_intervals: int,
    per_interval: int,
) -> list[dict[str, Any]]:
    """The records of a batch of latents."""
    norms = crosscoder_norms(sae)
    shares = None if norms is None else norms.shares[latents]  # [n, n_sites]
    W_dec = sae.W_dec.detach()[latents].float().cpu()  # [n, d_out] ([n, n_sites, d_in])
    tables: LogitTables | None = logit_tables(W_dec, W_U) if W_U is not None else None
    alignment = neuron_alignment(W_dec) if W_dec.ndim == 2 else None
    density = stats.density[latents].tolist()
    max_act = stats.max_act[latents].tolist()
    counts = stats.hist_counts[latents].tolist()
    hist_range = stats.hist_range[latents].tolist()
    tops = example_rows(stats.top, latents)
    samples = example_rows(stats.sample, latents)
    records = []
    for row, latent in enumerate(latents):
        freq_values, freq_heights = activation_histogram(counts[row], hist_range[row])
        record: dict[str, Any] = {
            "feature_index": latent,
            "neuron_alignment_indices": [], "neuron_alignment_values": [],
            "neuron_alignment_l1": [],
            "correlated_neurons_indices": [], "correlated_neurons_l1": [],
            "correlated_neurons_pearson": [], "correlated_features_indices": [],
            "correlated_features_l1": [], "correlated_features_pearson": [],
            "neg_str": [], "neg_values": [], "pos_str": [], "pos_values": [],
            "frac_nonzero": density[row],
            "freq_hist_data_bar_values": freq_values,
            "freq_hist_data_bar_heights": freq_heights,
            "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [],
            "n_prompts_total": settings["n_prompts_total"],
            "n_tokens_in_prompt": settings["n_tokens_in_prompt"],
            "dataset": settings["huggingface_dataset_path"],
            # A site share is NaN only without any decoder; JSON has no NaN, so 0 stands in.
            "decoder_weights_dist": [] if shares is None else rounded(
                shares[row].nan_to_num(0.0).tolist()),
            "activations": activation_examples(
                tops[row], samples[row], max_act[row], density[row], stats.left, text,
                n_intervals, per_interval,
            ),
            "vector": [],
        }
        if alignment is not None:
            record["neuron_alignment_indices"] = alignment[0][row].tolist()
            record["neuron_alignment_values"] = rounded(alignment[1][row].tolist())
            record["neuron_alignment_l1"] = rounded(alignment[2][row].tolist())
        if tables is not None:
            record["pos_str"] = [text(t) for t in tables.pos_ids[row].tolist()]
            record["pos_values"] = rounded(tables.pos_values[row].tolist())
            record["neg_str"] = [text(t) for t in tables.neg_ids[row].tolist()]
            record["neg_values"] = rounded(tables.neg_values[row].tolist())
            record["logits_hist_data_bar_heights"] = tables.hist_heights[row].tolist()
            record["logits_hist_data_bar_values"] = rounded(tables.hist_values[row].tolist())
        records.append(record)
    return records


def _write_explanations(
    folder: Path, number: int, latents: list[int], notes: dict[int, Explanation],
    ids: NeuronpediaIds, creator_id: str,
) -> None:
    """Neuronpedia explanation rows (one JSON line each, gzipped) for the batch's latents."""
    rows = [_explanation_row(notes[latent], ids, creator_id) for latent in latents
            if latent in notes]
    if not rows:
        return
    (folder / EXPLANATIONS_DIR).mkdir(exist_ok=True)
    body = "".join(json.dumps(row, allow_nan=False) + "\n" for row in rows)
    (folder / EXPLANATIONS_DIR / f"batch-{number}.jsonl.gz").write_bytes(
        gzip.compress(body.encode("utf-8"), compresslevel=5, mtime=0)
    )


def _explanation_row(item: Explanation, ids: NeuronpediaIds, creator_id: str) -> dict[str, Any]:
    # A stable id per (model, source, latent): exporting again gives the same rows.
    key = f"{ids.model_id}/{ids.source_id}/{item.latent}".encode()
    scores = "; ".join(f"{scorer}.{metric}={value:.4g}" for scorer, metrics in
                       sorted(item.scores.items()) for metric, value in sorted(metrics.items())
                       if math.isfinite(value))
    return {
        "id": "c" + hashlib.sha1(key).hexdigest()[:24],
        "modelId": ids.model_id,
        "layer": ids.source_id,
        "index": str(item.latent),
        "description": item.explanation,
        "authorId": creator_id,
        "typeName": item.prompt_version or None,
        "explanationModelName": item.explainer_model or None,
        "notes": scores or None,
        "createdAt": datetime.now(timezone.utc).isoformat(),
    }


def _write_json(path: Path, data: Any, indent: int | None = None) -> None:
    # allow_nan=False: NaN is not JSON, and the importer would fail on it far from here.
    path.write_text(json.dumps(data, allow_nan=False, indent=indent) + "\n", encoding="utf-8")

