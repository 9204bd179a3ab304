"""A static dashboard site over feature statistics: it opens from file:// with no server.

Layout of the output folder:

    index.html                    every latent: sortable, searchable, shown a page at a time
    latent.html#N                 latent N: explanation, top examples, quantile bands,
                                  histogram, logit effects (for a crosscoder: its decoder
                                  norm at every site and its class)
    assets/                       style.css, common.js, index.js, latent.js
    data/site.js                  SAEKIT_SITE: title, SAE, model, hook, sizes
    data/index.js                 SAEKIT_INDEX: the index's packed per-latent columns
                                  (a crosscoder's add relative_norm and norm_class, the
                                  index of each latent's class in site.js's classes)
    data/vocab.js                 SAEKIT_VOCAB: the text of every token id the pages show
    data/explanations/NNNNNN.js   SAEKIT_EXPLANATIONS: one shard's explanations (if any)
    feature_stats.js, feature_stats/NNNNNN.js
                                  the statistics themselves, as `FeatureStats.save` writes them

A page opened from file:// may not fetch(), so data files are scripts. A latent page adds the
<script> of the one statistics shard that holds its latent when it opens: the site reads the
saved statistics directly instead of a second copy, and opening a latent costs one shard.
"""

from __future__ import annotations

import math
import re
import shutil
from collections.abc import Iterable, Mapping
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from saekit.analysis.crosscoder_norms import CLASS_ORDER
from saekit.analysis.explanations import Explanation
from saekit.analysis.stats_files import (
    SHARD_SIZE,
    FeatureStats,
    pack_arrays,
    uint_code,
    write_script,
    write_stats,
)

ASSET_FILES = ("index.html", "latent.html", "style.css", "common.js", "index.js", "latent.js")
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def write_dashboard(
    stats: FeatureStats,
    tokenizer: Any,
    out: str | Path,
    *,
    title: str | None = None,
    sae_name: str = "",
    model_name: str = "",
    hook_name: str = "",
    explanations: Mapping[int, Explanation] | None = None,
    n_bands: int = 4,
    per_band: int = 5,
    shard_size: int = SHARD_SIZE,
    progress: bool | None = None,
) -> Path:
    """Write the site for `stats` (and the statistics it reads) under `out`; returns the path
    of index.html.

    `sae_name`, `model_name` and `hook_name` are named on every page; `title` defaults to
    them. `explanations` ({latent: Explanation}, e.g. from `read_explanations`) are shown on
    the pages, and their scores become sort orders of the index. `n_bands` x `per_band`
    random examples are shown by activation quantile. `progress` shows a bar of the latents
    written (None: as `saekit.progress` is set).

    Statistics of a crosscoder (`stats.crosscoder`) add each latent's relative decoder norm
    and class to the index (a filter by class, a sort by relative norm) and its norm at every
    site to its page.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a folder; pass a folder to write into")
    if n_bands < 1 or per_band < 1:
        raise ValueError(f"n_bands and per_band must be >= 1, got {n_bands} and {per_band}")
    explanations = dict(explanations or {})
    check_explanations(explanations, stats.d_sae)
    title = title or " · ".join(
        part for part in (model_name, hook_name, f"{stats.d_sae} latents") if part
    )
    (out / "assets").mkdir(parents=True, exist_ok=True)
    (out / "data").mkdir(exist_ok=True)
    site = resources.files("saekit.analysis") / "site"
    for name in ASSET_FILES:
        target = out / name if name.endswith(".html") else out / "assets" / name
        with resources.as_file(site / name) as src:
            shutil.copyfile(src, target)

    write_stats(stats, out, shard_size=shard_size, progress=progress, desc="dashboard")
    fires_on = firing_tokens(stats)
    promotes = None if stats.logit_top is None else stats.logit_top[0].numpy()
    score_columns = sorted({
        f"{scorer}.{metric}" for item in explanations.values()
        for scorer, metrics in item.scores.items() for metric in metrics
    })
    columns = _index_columns(stats, fires_on, promotes, explanations, score_columns)
    write_script(out / "data" / "index.js", "SAEKIT_INDEX", pack_arrays(columns))
    vocab = token_strings(tokenizer, _used_tokens(stats, fires_on))
    write_script(out / "data" / "vocab.js", "SAEKIT_VOCAB", {str(k): v for k, v in vocab.items()})
    explained = _write_explanations(out, explanations, shard_size)
    window = stats.top.tokens.shape[2]
    write_script(out / "data" / "site.js", "SAEKIT_SITE", {
        "title": title, "sae": sae_name, "model": model_name, "hook": hook_name,
        "d_sae": stats.d_sae, "n_tokens": stats.n_tokens, "left": stats.left,
        "right": window - 1 - stats.left, "top_k": stats.top.keys.shape[1],
        "shard_size": shard_size, "n_bands": n_bands, "per_band": per_band,
        "score_columns": score_columns, "explained_shards": explained,
        "crosscoder": _crosscoder_info(stats),
    })
    return out / "index.html"


def _crosscoder_info(stats: FeatureStats) -> dict[str, Any] | None:
    """What the pages need to name a crosscoder's sites and classes (None for other SAEs)."""
    norms = stats.crosscoder
    if norms is None:
        return None
    labels = norms.class_labels()
    return {
        "site_names": list(norms.site_names), "a": norms.a, "b": norms.b, "band": norms.band,
        "classes": list(CLASS_ORDER), "labels": [labels[c] for c in CLASS_ORDER],
        "counts": [norms.counts()[c] for c in CLASS_ORDER],
    }


def check_explanations(explanations: Mapping[int, Explanation], d_sae: int) -> None:
    """Refuse explanations of latents the SAE does not have: a file of another SAE."""
    wrong = [latent for latent in explanations if not 0 <= latent < d_sae]
    if wrong:
        raise ValueError(
            f"explanations name latent {min(wrong, key=abs)} ({len(wrong)} out of range in all) "
            f"but the SAE has {d_sae} latents; are they the explanations of another SAE?"
        )


def firing_tokens(stats: FeatureStats) -> np.ndarray:
    """[d_sae, n] the distinct tokens each latent fires on in its top examples, most often
    first (ties: in the order of the examples), -1 padded; what the index shows and searches."""
    top = stats.top
    k = top.keys.shape[1]
    kept = ((top.keys >= 0) & (top.values > 0)).numpy()
    center = np.where(kept, top.tokens[:, :, stats.left].numpy(), -1)  # [d_sae, k]
    tokens = np.full_like(center, -1)
    width = 1
    for start in range(0, stats.d_sae, 16_384):  # in pieces: [piece, k, k] stays small
        rows = center[start:start + 16_384]
        same = rows[:, :, None] == rows[:, None, :]  # [piece, k, k]
        first = (rows >= 0) & ~np.tril(same, -1).any(2)
        rank = np.where(first, -same.sum(2) * (k + 1) + np.arange(k), np.iinfo(np.int64).max)
        order = np.argsort(rank, axis=1, kind="stable")
        tokens[start:start + 16_384] = np.take_along_axis(np.where(first, rows, -1), order, 1)
        width = max(width, int(first.sum(1).max(initial=0)))
    return tokens[:, :width]


def token_strings(tokenizer: Any, ids: Iterable[int]) -> dict[int, str]:
    """{id: the text of that one token}. A token that is only part of a character (a
    byte-fallback or byte-level piece, which decodes to U+FFFD) shows its bytes as `\\xNN`.
    Without a tokenizer ids show as `<id>`."""
    if tokenizer is None:
        return {i: f"<{i}>" for i in ids}
    return {i: token_text(tokenizer, i) for i in sorted(ids)}


def token_text(tokenizer: Any, token: int) -> str:
    """The text of one token, its undecodable bytes as `\\xNN` escapes."""
    text = tokenizer.decode([token])
    if "\ufffd" not in text:
        return text
    raw = token_bytes(tokenizer, token)
    return text if raw is None else raw.decode("utf-8", errors="backslashreplace")


def token_bytes(tokenizer: Any, token: int) -> bytes | None:
    """The bytes a token stands for, when its vocabulary entry spells them: a byte-fallback
    piece `<0xNN>` or a byte-level BPE piece; None for anything else."""
    convert = getattr(tokenizer, "convert_ids_to_tokens", None)
    piece = convert(token) if callable(convert) else None
    if not isinstance(piece, str):
        return None
    match = _BYTE_PIECE.fullmatch(piece)
    if match:
        return bytes([int(match.group(1), 16)])
    table = _byte_level_alphabet()
    if piece and all(c in table for c in piece):
        return bytes(table[c] for c in piece)
    return None


@cache
def _byte_level_alphabet() -> dict[str, int]:
    """{character: byte} of byte-level BPE vocabularies (GPT-2 and its kin), which write each
    byte as a printable character: printable Latin-1 bytes stand for themselves, and the rest
    take the characters from U+0100 on, in byte order."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in table.values()]
    table.update({chr(0x100 + n): b for n, b in enumerate(others)})
    return table


def _index_columns(
    stats: FeatureStats,
    fires_on: np.ndarray,
    promotes: np.ndarray | None,
    explanations: Mapping[int, Explanation],
    score_columns: list[str],
) -> list[tuple[str, np.ndarray]]:
    largest = max(int(fires_on.max(initial=-1)) + 1,
                  0 if promotes is None else int(promotes.max(initial=0)) + 1)
    token_dtype = np.dtype(f"<{uint_code(largest)}")
    count_dtype = np.dtype(f"<{uint_code(int(stats.fire_count.max()))}")
    columns = [
        ("fire_count", stats.fire_count.numpy().astype(count_dtype)),
        ("max_act", stats.max_act.numpy().astype("<f4")),
        ("mean_act", stats.mean_act.numpy().astype("<f4")),
        ("fires_on", (fires_on + 1).astype(token_dtype)),  # + 1: 0 is "none"
    ]
    if promotes is not None:
        columns.append(("promotes", (promotes + 1).astype(token_dtype)))
    for column in score_columns:
        scorer, metric = column.split(".", 1)
        values = np.full(stats.d_sae, np.nan, dtype="<f4")
        for latent, item in explanations.items():
            values[latent] = item.score(scorer, metric)
        columns.append((f"score:{column}", values))
    if stats.crosscoder is not None:
        columns.append(("relative_norm", stats.crosscoder.relative.numpy().astype("<f4")))
        columns.append(("norm_class", stats.crosscoder.class_codes.numpy().astype("<u1")))
    return columns


def _used_tokens(stats: FeatureStats, fires_on: np.ndarray) -> list[int]:
    """Every token id a page can show: in kept examples, logit effects, the index."""
    largest = max(int(stats.top.tokens.max()), int(stats.sample.tokens.max()), 0)
    for pair in (stats.logit_top, stats.logit_bottom):
        if pair is not None and pair[0].numel():
            largest = max(largest, int(pair[0].max()))
    used = np.zeros(largest + 2, dtype=bool)  # index id + 1, so that -1 lands on slot 0
    for examples in (stats.top, stats.sample):
        for start in range(0, stats.d_sae, 4096):  # in pieces: bounded temporary memory
            used[examples.tokens[start:start + 4096].numpy().ravel() + 1] = True
    for pair in (stats.logit_top, stats.logit_bottom):
        if pair is not None:
            used[pair[0].numpy().ravel() + 1] = True
    used[fires_on.ravel() + 1] = True
    return (np.flatnonzero(used[1:])).tolist()


def _write_explanations(
    out: Path, explanations: Mapping[int, Explanation], shard_size: int
) -> list[int]:
    """One script per shard that has explanations; returns those shards' numbers."""
    by_shard: dict[int, dict[str, Any]] = {}
    for latent in sorted(explanations):
        item = explanations[latent]
        by_shard.setdefault(latent // shard_size, {})[str(latent)] = {
            "explanation": item.explanation,
            # JSON has no NaN: a score that is not a number is shown as missing.
            "scores": {scorer: {m: v if math.isfinite(v) else None for m, v in metrics.items()}
                       for scorer, metrics in item.scores.items()},
            "explainer_model": item.explainer_model, "scorer_model": item.scorer_model,
        }
    if by_shard:
        (out / "data" / "explanations").mkdir(exist_ok=True)
    for shard, items in by_shard.items():
        path = out / "data" / "explanations" / f"{shard:06d}.js"
        write_script(path, "SAEKIT_EXPLANATIONS", {"shard": shard, "items": items})
    return sorted(by_shard)
