"""The per-latent statistics record (`FeatureStats`) and its files: compact script files that
Python and a browser both read.

A page opened from file:// may not fetch() files, but it may run `<script src>` files; so each
data file is one JavaScript call, `window.NAME({...});`, whose argument is JSON. Arrays travel
inside it packed: their little-endian bytes, each padded to a multiple of 8, concatenated,
deflated (zlib) and base64-encoded, listed as [name, dtype, shape]. A browser unpacks them with
atob and DecompressionStream; Python with base64 and zlib. The dashboard site reads the very
files written here: the statistics are stored once.

    feature_stats.js          SAEKIT_STATS(header): format, version, d_sae, n_tokens, left,
                              right, top_k, n_samples, n_bins, n_logits, shard_size, n_shards
    feature_stats/000000.js   SAEKIT_SHARD({shard, first, count, arrays, data}): the latents
                              first .. first + count - 1

Arrays of a shard, one row per latent:

    fire_count, hist_counts [count, n_bins]     u4 (f8 once a count passes 2**32 - 1)
    act_sum f8, max_act f4, hist_range f4
    n_top, n_sample                             u2 (u4): kept examples, the first slots of each
    act_scale f4                                largest |activation| in the latent's windows
    tokens [count, top_k + n_samples, window]   token id + 1, 0 outside the sequence (u2 or u4)
    acts [count, top_k + n_samples, window]     f2: activation / act_scale
    logit_top.ids, logit_bottom.ids [count, n_logits] (u2 or u4), *.values f4 (if n_logits)
    site_norms [count, n_sites] f4              crosscoders only: each latent's decoder norm
                                                at each site

A crosscoder's header also holds `crosscoder`: {site_names, a, b, band} (see
`saekit.analysis.crosscoder_norms`); relative norms and classes are derived from the stored
norms when read. Files without it (every SAE but a crosscoder, and files written before it
existed) read as before, and readers that do not know it skip it, so the version stays 2.

A latent's top examples come first in its rows, then its random sample, so that deflate finds
the windows the two groups share.
"""

from __future__ import annotations

import base64
import json
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from saekit.analysis.crosscoder_norms import CrosscoderNorms
from saekit.progress import bar

FORMAT = "saekit-feature-stats"
VERSION = 2
HEADER_FILE = "feature_stats.js"
SHARD_DIR = "feature_stats"
OLD_TENSORS = "feature_stats.safetensors"
OLD_INFO = "feature_stats.json"

#: The dtypes a packed array may have, by the short code written in the file.
DTYPES = {
    "u1": np.dtype("<u1"), "u2": np.dtype("<u2"), "u4": np.dtype("<u4"), "i4": np.dtype("<i4"),
    "f2": np.dtype("<f2"), "f4": np.dtype("<f4"), "f8": np.dtype("<f8"),
}
_CODES = {dtype: code for code, dtype in DTYPES.items()}



#: Latents per data file: one file is what a dashboard page loads for one latent.
SHARD_SIZE = 128


@dataclass
class Examples:
    """Kept examples per latent: [d_sae, k] scores and [d_sae, k, window] contexts."""

    keys: Tensor
    """What the examples are ranked by: activation (top) or a random key (sample); -1 empty."""
    values: Tensor
    """The latent's activation at the example's token [d_sae, k]."""
    tokens: Tensor
    """Token ids of the context window [d_sae, k, window]; -1 beyond the sequence."""
    acts: Tensor
    """The latent's activation at each token of the window [d_sae, k, window]."""


@dataclass
class FeatureStats:
    """What `feature_statistics` returns; see the module docstring for the meaning."""

    n_tokens: int
    """Tokens seen (special tokens excluded)."""
    left: int
    """Context tokens kept before the example's token (its index in every window)."""
    fire_count: Tensor
    """[d_sae] tokens on which each latent fired."""
    act_sum: Tensor
    """[d_sae] sum of each latent's activations (float64)."""
    max_act: Tensor
    """[d_sae] largest activation seen (0 for latents that never fired)."""
    top: Examples
    """The top activating examples, best first."""
    sample: Examples
    """A uniform random sample of firing examples."""
    hist_counts: Tensor
    """[d_sae, n_bins] activation histogram of firing tokens."""
    hist_range: Tensor
    """[d_sae] upper edge R of each histogram (bins are R / n_bins wide); 0 if never fired."""
    logit_top: tuple[Tensor, Tensor] | None = None
    """(token ids, values) [d_sae, n] of the most promoted tokens (W_dec @ W_U), or None."""
    logit_bottom: tuple[Tensor, Tensor] | None = None
    """(token ids, values) [d_sae, n] of the most suppressed tokens, or None."""
    crosscoder: CrosscoderNorms | None = None
    """A crosscoder's decoder norms per latent and site (relative norms, classes), or None."""

    @property
    def d_sae(self) -> int:
        return self.fire_count.shape[0]

    @property
    def relative_norm(self) -> Tensor | None:
        """[d_sae] a crosscoder's relative decoder norm between its sites a and b (0: writes
        to a only, 0.5: to both alike, 1: to b only; NaN: to neither); None for other SAEs."""
        return None if self.crosscoder is None else self.crosscoder.relative

    @property
    def norm_classes(self) -> list[str] | None:
        """A crosscoder's class per latent ("a_only", "shared", "b_only", "neither"); None
        for other SAEs."""
        return None if self.crosscoder is None else self.crosscoder.classes

    @property
    def density(self) -> Tensor:
        """[d_sae] fraction of tokens on which each latent fired."""
        return self.fire_count.double() / max(self.n_tokens, 1)

    @property
    def mean_act(self) -> Tensor:
        """[d_sae] mean activation when firing (0 for latents that never fired)."""
        return self.act_sum / self.fire_count.clamp_min(1).double()

    def top_examples(self, latent: int) -> list[tuple[float, list[int], list[float]]]:
        """(activation, window tokens, window activations) of the top examples, best first."""
        return examples_of(self.top, latent)

    def quantile_samples(
        self, latent: int, n_bands: int = 4, per_band: int = 5
    ) -> list[list[tuple[float, list[int], list[float]]]]:
        """The random sample split into `n_bands` bands by activation quantile (lowest first),
        up to `per_band` examples each, highest in band first."""
        examples = sorted(examples_of(self.sample, latent), key=lambda e: e[0])
        if not examples:
            return []
        bands = []
        for b in range(n_bands):
            lo, hi = len(examples) * b // n_bands, len(examples) * (b + 1) // n_bands
            band = examples[lo:hi]
            # Evenly spaced picks so a band shows its whole range, not just its top.
            step = max(1, len(band) // per_band)
            bands.append(list(reversed(band[::step][:per_band])))
        return bands

    def save(
        self, folder: str | Path, *, shard_size: int = SHARD_SIZE, progress: bool | None = False
    ) -> Path:
        """Write the statistics under `folder` as script files a browser can load from
        file:// (the dashboard site reads these very files; see `saekit.analysis.stats_files`
        for the layout). Returns `folder`. Read them back with `FeatureStats.load`.

        Activations are kept as float16 relative to each latent's largest kept activation
        (about 3 significant digits); counts, sums, maxima and token ids are exact. The
        ranking keys are not kept: a loaded top example's key is its activation and a loaded
        random sample's keys are descending ranks, so the kept examples and their order come
        back, but a loaded reservoir cannot be merged with further data.
        """
        write_stats(self, folder, shard_size=shard_size, progress=progress)
        return Path(folder)

    @staticmethod
    def load(folder: str | Path) -> FeatureStats:
        """Statistics written by `save`, or by the older format (`feature_stats.safetensors`
        + `feature_stats.json`), which is still read."""
        return read_stats(folder)


def examples_of(ex: Examples, latent: int) -> list[tuple[float, list[int], list[float]]]:
    keep = ex.keys[latent] >= 0
    keep &= ex.values[latent] > 0
    return [
        (float(ex.values[latent, j]), ex.tokens[latent, j].tolist(), ex.acts[latent, j].tolist())
        for j in keep.nonzero().flatten().tolist()
    ]


def write_script(path: Path, name: str, payload: Any) -> None:
    """Write `window.NAME(payload);` with `payload` as compact JSON."""
    # allow_nan=False: a NaN would be a JavaScript syntax error, so fail here instead.
    text = json.dumps(payload, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    path.write_text(f"window.{name}({text});\n", encoding="utf-8")


def read_script(path: Path, name: str) -> Any:
    """The JSON argument of a file written by `write_script`."""
    text = path.read_text(encoding="utf-8").strip()
    head = f"window.{name}("
    if not (text.startswith(head) and text.endswith(");")):
        raise ValueError(f"{path} is not a {name} data file; rewrite it with FeatureStats.save")
    return json.loads(text[len(head):-2])


def pack_arrays(arrays: Sequence[tuple[str, np.ndarray]], level: int = 6) -> dict[str, Any]:
    """{"arrays": [[name, dtype, shape], ...], "data": base64(deflate(bytes))}."""
    specs, chunks = [], []
    for name, array in arrays:
        code = _CODES.get(array.dtype.newbyteorder("<"))
        if code is None:
            raise TypeError(f"cannot pack {name} of dtype {array.dtype}")
        raw = np.ascontiguousarray(array, dtype=DTYPES[code]).tobytes()
        chunks.append(raw + bytes(-len(raw) % 8))  # 8-byte aligned: typed arrays need it
        specs.append([name, code, list(array.shape)])
    data = zlib.compress(b"".join(chunks), level)
    return {"arrays": specs, "data": base64.b64encode(data).decode("ascii")}


def unpack_arrays(packed: dict[str, Any], where: Path) -> dict[str, np.ndarray]:
    """The arrays of `pack_arrays`' output (`where` names the file in errors)."""
    try:
        raw = zlib.decompress(base64.b64decode(packed["data"], validate=True))
        out, offset = {}, 0
        for name, code, shape in packed["arrays"]:
            dtype = DTYPES[code]
            n = math.prod(shape)
            out[name] = np.frombuffer(raw, dtype, n, offset).reshape(shape)
            offset += n * dtype.itemsize
            offset += -offset % 8
    except (KeyError, ValueError, TypeError, zlib.error) as err:
        raise ValueError(
            f"{where} is damaged ({type(err).__name__}: {err}); write it again"
        ) from err
    return out


def uint_code(largest: int) -> str:
    """The smallest packed dtype that holds 0..largest exactly."""
    if largest < 2**16:
        return "u2"
    return "u4" if largest < 2**32 else "f8"


def shard_path(folder: Path, shard: int) -> Path:
    return folder / SHARD_DIR / f"{shard:06d}.js"


def write_stats(
    stats: FeatureStats,
    folder: str | Path,
    *,
    shard_size: int,
    progress: bool | None = False,
    desc: str = "saving statistics",
) -> None:
    """Write `stats` under `folder` in the layout of the module docstring."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} exists and is not a folder")
    (folder / SHARD_DIR).mkdir(parents=True, exist_ok=True)
    # No header until every shard is written: an interrupted save is not read as whole.
    (folder / HEADER_FILE).unlink(missing_ok=True)
    d_sae, window = stats.d_sae, stats.top.tokens.shape[2]
    if stats.crosscoder is not None and stats.crosscoder.d_sae != d_sae:
        raise ValueError(
            f"the crosscoder norms describe {stats.crosscoder.d_sae} latents but the statistics "
            f"{d_sae}; attach the norms of the SAE the statistics are of"
        )
    top_k, n_samples = stats.top.keys.shape[1], stats.sample.keys.shape[1]
    n_logits = 0 if stats.logit_top is None else stats.logit_top[0].shape[1]
    largest_id = max(int(stats.top.tokens.max()), int(stats.sample.tokens.max()), 0) + 1
    for pair in (stats.logit_top, stats.logit_bottom):
        if pair is not None and pair[0].numel():
            largest_id = max(largest_id, int(pair[0].max()))
    token_code = uint_code(largest_id)
    count_code = uint_code(int(stats.fire_count.max()))  # no histogram bin holds more
    slot_code = uint_code(max(top_k, n_samples))
    n_shards = math.ceil(d_sae / shard_size)
    for stale in (folder / SHARD_DIR).glob("[0-9]" * 6 + ".js"):  # from a larger earlier save
        if int(stale.stem) >= n_shards:
            stale.unlink()
    with bar(desc=desc, unit="latent", total=d_sae, progress=progress) as shown:
        for shard in range(n_shards):
            first = shard * shard_size
            rows = slice(first, min(d_sae, first + shard_size))
            arrays = _shard_arrays(stats, rows, token_code, count_code, slot_code)
            payload = {"shard": shard, "first": first, "count": rows.stop - first}
            write_script(shard_path(folder, shard), "SAEKIT_SHARD", payload | pack_arrays(arrays))
            shown.update(rows.stop - first)
    header = {
        "format": FORMAT, "version": VERSION, "d_sae": d_sae, "n_tokens": stats.n_tokens,
        "left": stats.left, "right": window - 1 - stats.left, "top_k": top_k,
        "n_samples": n_samples, "n_bins": stats.hist_counts.shape[1], "n_logits": n_logits,
        "shard_size": shard_size, "n_shards": n_shards,
    }
    if stats.crosscoder is not None:
        norms = stats.crosscoder
        header["crosscoder"] = {
            "site_names": list(norms.site_names), "a": norms.a, "b": norms.b,
            "band": norms.band,
        }
    write_script(folder / HEADER_FILE, "SAEKIT_STATS", header)


def _shard_arrays(
    stats: FeatureStats, rows: slice, token_code: str, count_code: str, slot_code: str
) -> list[tuple[str, np.ndarray]]:
    # numpy, not torch: these small per-shard steps are memory-bound, and torch's thread pool
    # made them many times slower on a busy machine.
    top, sample = stats.top, stats.sample
    top_k = top.keys.shape[1]
    n_top = (_np(top.keys[rows]) >= 0).sum(1)  # kept examples sort first: a prefix of the slots
    n_sample = (_np(sample.keys[rows]) >= 0).sum(1)
    slot = np.arange(top_k + sample.keys.shape[1])
    kept = slot < np.where(slot < top_k, n_top[:, None], top_k + n_sample[:, None])  # [rows, k]
    tokens = np.concatenate([_np(top.tokens[rows]), _np(sample.tokens[rows])], 1)
    tokens = np.where(kept[:, :, None], tokens.astype(np.int64) + 1, 0)  # [rows, k, window]
    acts = np.concatenate([_np(top.acts[rows]), _np(sample.acts[rows])], 1)
    acts = np.where(kept[:, :, None], acts, np.float32(0))
    scale = np.abs(acts).max((1, 2), initial=0)
    scale = np.where(scale > 0, scale, 1).astype(np.float32)
    arrays = [
        ("fire_count", _np(stats.fire_count[rows], count_code)),
        ("act_sum", _np(stats.act_sum[rows], "f8")),
        ("max_act", _np(stats.max_act[rows], "f4")),
        ("hist_range", _np(stats.hist_range[rows], "f4")),
        ("hist_counts", _np(stats.hist_counts[rows], count_code)),
        ("n_top", n_top.astype(DTYPES[slot_code])),
        ("n_sample", n_sample.astype(DTYPES[slot_code])),
        ("act_scale", scale),
        ("tokens", tokens.astype(DTYPES[token_code])),
        ("acts", (acts / scale[:, None, None]).astype(DTYPES["f2"])),
    ]
    for group in ("logit_top", "logit_bottom"):
        pair = getattr(stats, group)
        if pair is not None:
            arrays.append((f"{group}.ids", _np(pair[0][rows], token_code)))
            arrays.append((f"{group}.values", _np(pair[1][rows], "f4")))
    if stats.crosscoder is not None:
        arrays.append(("site_norms", _np(stats.crosscoder.site_norms[rows], "f4")))
    return arrays


def _np(tensor: Tensor, code: str | None = None) -> np.ndarray:
    array = tensor.detach().cpu().numpy()
    return array if code is None else array.astype(DTYPES[code], copy=False)


def read_stats(folder: str | Path) -> FeatureStats:
    """`FeatureStats` from `write_stats`' files, or from the older safetensors + json pair."""
    folder = Path(folder)
    if (folder / HEADER_FILE).is_file():
        return _read_scripts(folder)
    if (folder / OLD_TENSORS).is_file() and (folder / OLD_INFO).is_file():
        return _read_old(folder)
    raise FileNotFoundError(
        f"{folder} holds no feature statistics ({HEADER_FILE} is missing); write them with "
        "FeatureStats.save or `saekit dashboard`"
    )


def _read_scripts(folder: Path) -> FeatureStats:
    header = read_script(folder / HEADER_FILE, "SAEKIT_STATS")
    if header.get("format") != FORMAT or not isinstance(header.get("version"), int):
        raise ValueError(f"{folder / HEADER_FILE} is not a feature statistics header")
    if header["version"] > VERSION:
        raise ValueError(
            f"{folder / HEADER_FILE} has format version {header['version']}, newer than this "
            f"saekit reads ({VERSION}); upgrade saekit"
        )
    d_sae, top_k, n_samples = header["d_sae"], header["top_k"], header["n_samples"]
    left = header["left"]
    k = top_k + n_samples
    parts: dict[str, list[np.ndarray]] = {}
    expected = 0
    for shard in range(header["n_shards"]):
        path = shard_path(folder, shard)
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: the statistics in {folder} are partial")
        payload = read_script(path, "SAEKIT_SHARD")
        if payload.get("first") != expected:
            raise ValueError(f"{path} starts at latent {payload.get('first')}, not {expected}")
        for name, array in unpack_arrays(payload, path).items():
            parts.setdefault(name, []).append(array)
        expected += payload["count"]
    if expected != d_sae:
        raise ValueError(f"the shards in {folder / SHARD_DIR} hold {expected} latents, not {d_sae}")

    def whole(name: str) -> Tensor:
        return torch.from_numpy(np.concatenate(parts[name]).astype(_wide(parts[name][0].dtype)))

    scale = whole("act_scale")
    acts = whole("acts") * scale[:, None, None]  # [d_sae, k, window]
    tokens = (whole("tokens") - 1).to(torch.int32)
    values = acts[:, :, left].clone()
    slot = torch.arange(k)
    n_top, n_sample = whole("n_top").long(), whole("n_sample").long()
    # Ranking keys are not stored: top examples rank by activation, the sample by its order.
    top_keys = torch.where(slot[:top_k] < n_top[:, None], values[:, :top_k], -1.0)
    ranks = 1.0 - slot[: n_samples].float() / n_samples
    sample_keys = torch.where(slot[:n_samples] < n_sample[:, None], ranks, -1.0)
    top = Examples(top_keys, values[:, :top_k].contiguous(), tokens[:, :top_k].contiguous(),
                   acts[:, :top_k].contiguous())
    sample = Examples(sample_keys, values[:, top_k:].contiguous(),
                      tokens[:, top_k:].contiguous(), acts[:, top_k:].contiguous())

    def pair(group: str) -> tuple[Tensor, Tensor] | None:
        if f"{group}.ids" not in parts:
            return None
        return whole(f"{group}.ids").long(), whole(f"{group}.values").float()

    return FeatureStats(
        header["n_tokens"], left, whole("fire_count").long(), whole("act_sum").double(),
        whole("max_act").float(), top, sample, whole("hist_counts").long(),
        whole("hist_range").float(), pair("logit_top"), pair("logit_bottom"),
        _crosscoder_norms(header, parts, folder),
    )


def _crosscoder_norms(
    header: dict[str, Any], parts: dict[str, list[np.ndarray]], folder: Path
) -> CrosscoderNorms | None:
    """The crosscoder section of a header and its shards' site norms, when present."""
    info = header.get("crosscoder")
    if info is None:
        return None
    if "site_norms" not in parts:
        raise ValueError(
            f"{folder / HEADER_FILE} describes a crosscoder but its shards hold no site_norms; "
            "write the statistics again"
        )
    try:
        norms = np.concatenate(parts["site_norms"]).astype(np.float32)
        return CrosscoderNorms(
            torch.from_numpy(norms), [str(n) for n in info["site_names"]], int(info["a"]),
            int(info["b"]), float(info["band"]),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(
            f"{folder / HEADER_FILE} has a damaged crosscoder section ({err}); write the "
            "statistics again"
        ) from err


def _wide(dtype: np.dtype) -> np.dtype:
    """A dtype torch can hold that keeps every value of `dtype` (torch lacks uint16/32)."""
    if dtype.kind == "u":
        return np.dtype(np.int64)
    return np.dtype(np.float32) if dtype == np.float16 else dtype.newbyteorder("=")


def _read_old(folder: Path) -> FeatureStats:
    """The format before the script files: one safetensors file and a small json."""
    from dataclasses import fields

    from safetensors.torch import load_file

    t = load_file(str(folder / OLD_TENSORS))
    info = json.loads((folder / OLD_INFO).read_text())
    if "top.tokens" not in t or "n_tokens" not in info:
        raise ValueError(
            f"{folder / OLD_TENSORS} holds no examples (`saekit eval` writes a file of this name "
            "with firing rates only); write feature statistics with FeatureStats.save or "
            "`saekit dashboard`"
        )

    def examples(group: str) -> Examples:
        return Examples(*(t[f"{group}.{f.name}"] for f in fields(Examples)))

    def pair(group: str) -> tuple[Tensor, Tensor] | None:
        return (t[f"{group}.ids"], t[f"{group}.values"]) if f"{group}.ids" in t else None

    return FeatureStats(
        info["n_tokens"], info["left"], t["fire_count"], t["act_sum"], t["max_act"],
        examples("top"), examples("sample"), t["hist_counts"], t["hist_range"],
        pair("logit_top"), pair("logit_bottom"),
    )
