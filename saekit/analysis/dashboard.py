"""A static dashboard site from feature statistics: opens from file:// with no server.

Layout of the output folder:

    index.html            table of latents: sortable by density / max / mean, searchable
    latent.html#N         one latent: top examples, quantile bands, histogram, logit effects
    assets/style.css, assets/index.js, assets/latent.js
    data/index.js         the table's data, as a script (browsers refuse fetch on file://)
    data/vocab.js         the strings of every token id the pages show
    data/latents/N.js     one latent's data, loaded by a script tag when its page opens
"""

from __future__ import annotations

import json
import math
import shutil
from collections import Counter
from importlib import resources
from pathlib import Path
from typing import Any

from saekit.analysis.stats import FeatureStats
from saekit.progress import bar

ASSET_FILES = ("index.html", "latent.html", "style.css", "index.js", "latent.js")


def _round(x: float, digits: int = 4) -> float:
    """Round to `digits` significant figures: the data files stay small."""
    if x == 0 or not math.isfinite(x):
        return 0.0
    return round(x, digits - 1 - int(math.floor(math.log10(abs(x)))))


def _example(value: float, tokens: list[int], acts: list[float]) -> list[Any]:
    return [_round(value), tokens, [_round(a, 3) for a in acts]]


def token_strings(tokenizer: Any, ids: set[int]) -> dict[int, str]:
    """{id: the text of that one token}; ids without a tokenizer show as `<id>`."""
    if tokenizer is None:
        return {i: f"<{i}>" for i in ids}
    return {i: tokenizer.decode([i]) for i in sorted(ids)}


def write_dashboard(
    stats: FeatureStats,
    tokenizer: Any,
    out: str | Path,
    *,
    title: str = "SAE latents",
    n_bands: int = 4,
    per_band: int = 5,
    progress: bool | None = None,
) -> Path:
    """Write the site for `stats` under `out`; returns the path of index.html.

    `progress` shows a bar of the latent pages written (None: as `saekit.progress` is set).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"--out {out} exists and is not a folder")
    (out / "data" / "latents").mkdir(parents=True, exist_ok=True)
    (out / "assets").mkdir(exist_ok=True)
    site = resources.files("saekit.analysis") / "site"
    for name in ASSET_FILES:
        target = out / name if name.endswith(".html") else out / "assets" / name
        with resources.as_file(site / name) as src:
            shutil.copyfile(src, target)

    d_sae = stats.d_sae
    density = stats.density.tolist()
    max_act = stats.max_act.tolist()
    mean_act = stats.mean_act.tolist()
    counts = stats.hist_counts.tolist()
    hist_range = stats.hist_range.tolist()
    logits = {}
    for key in ("logit_top", "logit_bottom"):
        pair = getattr(stats, key)
        logits[key] = None if pair is None else (pair[0].tolist(), pair[1].tolist())
    used: set[int] = set()
    rows = []
    for i in bar(range(d_sae), desc="dashboard", unit="latent", progress=progress):
        top = [_example(*e) for e in stats.top_examples(i)]
        bands = [
            [_example(*e) for e in band]
            for band in stats.quantile_samples(i, n_bands=n_bands, per_band=per_band)
        ]
        latent: dict[str, Any] = {
            "id": i, "density": density[i], "max": _round(max_act[i]),
            "mean": _round(mean_act[i]), "center": stats.left, "top": top, "bands": bands,
            "hist": {"range": hist_range[i], "counts": counts[i]},
        }
        for key, name in (("logit_top", "promoted"), ("logit_bottom", "suppressed")):
            if logits[key] is not None:
                ids, values = logits[key]
                latent[name] = [[t, _round(v)] for t, v in zip(ids[i], values[i], strict=True)]
                used.update(ids[i])
        for example in top + [e for band in bands for e in band]:
            used.update(t for t in example[1] if t >= 0)
        # Tokens the latent fires on most among its top examples: what the index searches.
        common = Counter(e[1][stats.left] for e in top).most_common(5)
        rows.append([i, density[i], _round(max_act[i]), _round(mean_act[i]),
                     [t for t, _ in common], [t for t, _ in latent.get("promoted", [])[:5]]])
        _write_js(out / "data" / "latents" / f"{i}.js", "SAEKIT_LATENT", latent)
    _write_js(out / "data" / "vocab.js", "SAEKIT_VOCAB", token_strings(tokenizer, used),
              assign=True)
    index = {"title": title, "n_tokens": stats.n_tokens, "d_sae": d_sae, "rows": rows}
    _write_js(out / "data" / "index.js", "SAEKIT_INDEX", index, assign=True)
    return out / "index.html"


def _write_js(path: Path, name: str, data: Any, assign: bool = False) -> None:
    # allow_nan=False: a NaN would be a JavaScript syntax error, so fail here instead.
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False)
    text = f"window.{name}={payload};\n" if assign else f"window.{name}({payload});\n"
    path.write_text(text, encoding="utf-8")
