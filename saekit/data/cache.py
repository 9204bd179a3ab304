"""The on-disk activation cache: run the model once, train from the files many times.

A cache is a folder:

    metadata.json            what the activations are (model, hooks, d_in, dtype, dataset,
                             context size, tokenizer identity) and whether the write finished
    progress.json            one record per shard written (file, rows, crc32, byte size) and
                             the dataset position after it, so an interrupted write resumes
    shard_00000.safetensors  one tensor per hook, [rows, d_in], rows in dataset order

Readers (`CachedActivations`) shuffle across shards (random shard order) and within a
buffer, hold at most `buffer_size` rows plus one shard in memory, and check every shard's
size and CRC-32 before using it (`saekit.data.shards`).
"""

from __future__ import annotations

import json
import logging
import os
import weakref
import zlib
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saekit.config import DTYPES, dtype_name
from saekit.data.buffer import ShuffledRows, check_buffer_sizes
from saekit.data.shards import (
    CacheError,
    ShardLayout,
    check_progress_records,
    check_shard,
    check_shard_finite,
    map_shard,
    shard_path,
)
from saekit.data.store import ActivationStore
from saekit.data.tokens import TokenWindows
from saekit.errors import disk_full_error
from saekit.models.backend import ModelBackend
from saekit.progress import bar

logger = logging.getLogger(__name__)

CACHE_FORMAT = "saekit-activation-cache"
CACHE_VERSION = 1
METADATA_FILE = "metadata.json"
PROGRESS_FILE = "progress.json"
#: Metadata keys that must agree for a write to resume into an existing folder.
IDENTITY_KEYS = (
    "model", "hooks", "d_in", "dtype", "dataset", "context_size", "prepend_bos", "packing",
    "hook_head_index", "exclude_special_tokens", "tokenizer", "shard_rows", "heldout_documents",
)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except json.JSONDecodeError as err:
        raise CacheError(f"{path} is not valid JSON ({err}); the cache folder is damaged") from err


def tokenizer_identity(tokenizer: Any) -> dict[str, Any] | None:
    """What identifies a tokenizer: its name, vocabulary size and a hash of its vocabulary."""
    if tokenizer is None:
        return None
    vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
    digest = zlib.crc32(json.dumps(sorted(vocab.items())).encode())
    return {
        "name": getattr(tokenizer, "name_or_path", None) or None,
        "vocab_size": len(tokenizer),
        "vocab_crc32": f"{digest:08x}",
    }


def _tensor_to_list(state: dict[str, Any]) -> dict[str, Any]:
    """A TokenWindows state as JSON."""
    return {
        "rows_read": state["rows_read"],
        "pending": state["pending"].tolist(),
        "pending_docs": [d.tolist() for d in state["pending_docs"]],
        "windows": state["windows"],
        "context_size": state["context_size"],
    }


def _list_to_tensor(state: dict[str, Any]) -> dict[str, Any]:
    return {
        **state,
        "pending": torch.tensor(state["pending"], dtype=torch.long),
        "pending_docs": [torch.tensor(d, dtype=torch.long) for d in state["pending_docs"]],
    }


def _shard_name(index: int) -> str:
    return f"shard_{index:05d}.safetensors"


def write_activation_cache(
    model: ModelBackend,
    hooks: str | Sequence[str],
    dataset: Any,
    out_dir: str | Path,
    n_tokens: int,
    *,
    context_size: int = 128,
    model_batch_size: int = 8,
    shard_rows: int = 65536,
    dtype: torch.dtype | str = torch.float32,
    hook_head_index: int | None = None,
    exclude_special_tokens: bool = True,
    prepend_bos: bool = True,
    packing: bool = True,
    text_column: str | None = None,
    model_name: str | None = None,
    dataset_name: str | None = None,
    heldout_documents: int = 0,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Run the model over `dataset` and write `n_tokens` token rows of activations at
    `hooks` to `out_dir`; returns the final metadata.

    If `out_dir` holds an unfinished cache with the same metadata, the write continues
    after its last complete shard; if its metadata differs, a `CacheError` names the
    difference. A finished cache with the same metadata is left as it is.

    Args:
        model, hooks, dataset: as in `ActivationStore`.
        out_dir: the cache folder (created).
        n_tokens: token rows to write (fewer if the dataset runs out first).
        shard_rows: rows per shard file.
        dtype: stored dtype (float32, bfloat16, float16).
        model_name, dataset_name: how to record the model and dataset in the metadata
            (default: the backend's name and the dataset argument when it is a string).
        heldout_documents: how many held-out documents (`saekit.data.heldout`) the caller
            left out of `dataset`; recorded so that a run evaluates on exactly those.
        progress: show a bar of the token rows written (None: as `saekit.progress` is set).
        the rest: as in `ActivationStore`.
    """
    if not isinstance(n_tokens, int) or n_tokens <= 0:
        raise ValueError(f"n_tokens must be a positive integer, got {n_tokens!r}")
    if not isinstance(shard_rows, int) or shard_rows <= 0:
        raise ValueError(f"shard_rows must be a positive integer, got {shard_rows!r}")
    out = Path(out_dir)
    windows = dataset if isinstance(dataset, TokenWindows) else TokenWindows(
        dataset, model.tokenizer, context_size, text_column=text_column,
        prepend_bos=prepend_bos, packing=packing,
    )
    store = ActivationStore(
        model, hooks, windows, batch_size=1, buffer_size=1, model_batch_size=model_batch_size,
        hook_head_index=hook_head_index, exclude_special_tokens=exclude_special_tokens,
        shuffle=False, dtype=dtype,
    )
    d_in = store.d_in
    meta = {
        "format": CACHE_FORMAT,
        "version": CACHE_VERSION,
        "model": model_name or getattr(model, "name", None) or type(model).__name__,
        "hooks": list(store.hooks),
        "d_in": d_in if isinstance(d_in, dict) else {store.hooks[0]: d_in},
        "dtype": dtype_name(dtype),
        "dataset": dataset_name or (str(dataset) if isinstance(dataset, (str, Path)) else None),
        "context_size": windows.context_size,
        "prepend_bos": windows.prepend_bos,
        "framing": windows.framing,
        "heldout_documents": heldout_documents,
        "packing": windows.packing,
        "hook_head_index": hook_head_index,
        "exclude_special_tokens": exclude_special_tokens,
        "tokenizer": tokenizer_identity(model.tokenizer),
        "shard_rows": shard_rows,
        "n_tokens_requested": n_tokens,
        "n_tokens": 0,
        "complete": False,
    }
    out.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    if (out / METADATA_FILE).exists():
        old = _read_json(out / METADATA_FILE)
        _require_same(old, meta, out)
        if old["complete"]:
            logger.info("%s already holds a finished cache of %d tokens", out, old["n_tokens"])
            return old
        records = _verified_progress(out)
        if records:
            windows.load_state_dict(_list_to_tensor(records[-1]["position"]))
            logger.info("resuming %s after %d shards", out, len(records))
    else:
        leftovers = [p.name for p in out.iterdir()]
        if leftovers:
            raise CacheError(
                f"{out} is not empty and holds no cache metadata ({', '.join(leftovers[:5])}); "
                "pick an empty or new folder"
            )
    _write_json(out / METADATA_FILE, meta)
    written = sum(r["rows"] for r in records)
    pending: dict[str, list[Tensor]] = {h: [] for h in store.hooks}
    pending_rows = 0
    shown = bar(
        desc="caching activations", unit="tok", total=n_tokens, initial=written, progress=progress
    )
    while written < n_tokens:
        chunk = store._next_chunk()
        if chunk is not None:
            for hook in store.hooks:
                pending[hook].append(chunk[hook].to(device="cpu", dtype=store.dtype))
            rows_in = chunk[store.hooks[0]].shape[0]
            shown.update(min(rows_in, n_tokens - written - pending_rows))
            pending_rows += rows_in
        want = min(shard_rows, n_tokens - written)
        if pending_rows >= want or (chunk is None and pending_rows):
            # Write whole forward passes only, so the saved position is exact: the shard
            # may run a little past shard_rows but never splits a window.
            tensors = {h: torch.cat(pending[h])[: n_tokens - written] for h in store.hooks}
            rows = tensors[store.hooks[0]].shape[0]
            # Only the last record's dataset position is needed to resume, and a position
            # can hold a long document's pending tokens (1.3 MB of JSON per shard on the
            # bundled corpus, which every reader of the cache would parse).
            for record in records:
                record.pop("position", None)
            records.append(_write_shard(out, len(records), tensors, windows))
            _write_json(out / PROGRESS_FILE, records)
            written += rows
            pending = {h: [] for h in store.hooks}
            pending_rows = 0
        if chunk is None:
            break
    shown.close()
    if written < n_tokens:
        logger.warning("the dataset ran out after %d of %d tokens", written, n_tokens)
    meta["n_tokens"] = written
    meta["complete"] = True
    _write_json(out / METADATA_FILE, meta)
    return meta


def _write_shard(
    out: Path, index: int, tensors: dict[str, Tensor], windows: TokenWindows
) -> dict[str, Any]:
    from safetensors.torch import save

    data = save({h: t.contiguous() for h, t in tensors.items()})
    name = _shard_name(index)
    tmp = out / (name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as err:
        tmp.unlink(missing_ok=True)
        full = disk_full_error(
            err, "activation shard", out / name, len(data),
            f"the {index} shard(s) before it are intact; free some space and run the same "
            "`saekit cache` command again to continue from there",
        )
        if full is not None:
            raise full from err
        raise
    os.replace(tmp, out / name)
    return {
        "file": name,
        "rows": next(iter(tensors.values())).shape[0],
        "bytes": len(data),
        "crc32": f"{zlib.crc32(data):08x}",
        "position": _tensor_to_list(windows.state_dict()),
    }


def _require_same(old: dict[str, Any], new: dict[str, Any], out: Path) -> None:
    if not isinstance(old, dict) or old.get("format") != CACHE_FORMAT:
        raise CacheError(f"{out / METADATA_FILE} is not a saekit activation-cache metadata file")
    _check_metadata(old, out / METADATA_FILE)
    diffs = [
        f"{k}: cache has {old.get(k)!r}, this run has {new.get(k)!r}"
        for k in IDENTITY_KEYS if old.get(k) != new.get(k)
    ]
    if diffs:
        raise CacheError(
            f"the cache in {out} was written for a different run ({'; '.join(diffs)}); "
            "use another --out folder or delete this one"
        )


def _verified_progress(out: Path) -> list[dict[str, Any]]:
    """The progress records whose shard files are whole; later ones are dropped."""
    if not (out / PROGRESS_FILE).exists():
        return []
    progress = check_progress_records(out, _read_json(out / PROGRESS_FILE))
    good = []
    for record in progress:
        path = shard_path(out, record)
        if not path.exists() or path.stat().st_size != record["bytes"]:
            logger.warning("shard %s is missing or incomplete; rewriting from there", path)
            break
        good.append(record)
    return good


def read_cache_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a cache folder, refusing folders that are not caches."""
    folder = Path(path)
    meta_path = folder / METADATA_FILE
    if not meta_path.exists():
        raise FileNotFoundError(
            f"{folder} holds no activation cache ({METADATA_FILE} missing); write one with "
            "`saekit cache`"
        )
    meta = _read_json(meta_path)
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT:
        raise CacheError(f"{meta_path} is not a saekit activation-cache metadata file")
    if meta.get("version") != CACHE_VERSION:
        raise CacheError(f"{meta_path} has cache version {meta.get('version')}, expected 1")
    _check_metadata(meta, meta_path)
    return meta


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


#: Metadata keys a reader relies on: (what the value must be, the test).
_METADATA_FIELDS: dict[str, tuple[str, Any]] = {
    "model": ("a string", lambda v: isinstance(v, str)),
    "hooks": (
        "a non-empty list of hook names",
        lambda v: isinstance(v, list) and bool(v) and all(isinstance(h, str) for h in v),
    ),
    "d_in": (
        "a mapping of hook name to a positive width",
        lambda v: isinstance(v, dict) and all(_is_int(w) and w > 0 for w in v.values()),
    ),
    "dtype": (f"one of {', '.join(DTYPES)}", lambda v: isinstance(v, str) and v in DTYPES),
    "context_size": ("a positive integer", lambda v: _is_int(v) and v > 0),
    "n_tokens": ("a whole number", lambda v: _is_int(v) and v >= 0),
    "complete": ("true or false", lambda v: isinstance(v, bool)),
}


def _check_metadata(meta: dict[str, Any], meta_path: Path) -> None:
    """Refuse metadata missing a key a reader relies on, or holding a value of the wrong
    kind, naming the key: an edited or damaged file fails here, not deep in training."""
    for key, (expected, test) in _METADATA_FIELDS.items():
        if key not in meta:
            raise CacheError(
                f"{meta_path} has no {key!r} entry; the cache folder is damaged, write it again "
                "with `saekit cache`"
            )
        if not test(meta[key]):
            raise CacheError(
                f"{meta_path}: {key} is {meta[key]!r}, but it must be {expected}; the cache "
                "folder is damaged, write it again with `saekit cache`"
            )
    missing = [h for h in meta["hooks"] if h not in meta["d_in"]]
    if missing:
        raise CacheError(
            f"{meta_path}: d_in gives no width for hook(s) {missing}; the cache folder is "
            "damaged, write it again with `saekit cache`"
        )


def check_cache_matches(
    meta: dict[str, Any],
    *,
    model: str | None = None,
    hooks: Sequence[str] | None = None,
    d_in: int | dict[str, int] | None = None,
    context_size: int | None = None,
) -> None:
    """Refuse a cache whose metadata differs from what a run expects, naming the difference.

    Arguments left as None are not checked."""
    diffs = []
    if model is not None and meta["model"] != model:
        diffs.append(f"model: cache has {meta['model']!r}, the run uses {model!r}")
    if hooks is not None:
        missing = [h for h in hooks if h not in meta["hooks"]]
        if missing:
            diffs.append(f"hooks: the run needs {missing}, the cache holds {meta['hooks']}")
    if d_in is not None:
        wanted = d_in if isinstance(d_in, dict) else {h: d_in for h in (hooks or meta["hooks"])}
        for hook, width in wanted.items():
            if hook in meta["d_in"] and meta["d_in"][hook] != width:
                diffs.append(
                    f"d_in of {hook}: cache has {meta['d_in'][hook]}, the run uses {width}"
                )
    if context_size is not None and meta["context_size"] != context_size:
        diffs.append(
            f"context_size: cache has {meta['context_size']}, the run uses {context_size}"
        )
    if diffs:
        raise CacheError("the activation cache does not match this run: " + "; ".join(diffs))


class CachedActivations(ShuffledRows):
    """Training batches read from an activation cache: the same protocol as
    `ActivationStore` (iteration, `d_in`, `estimate_norm_scaling_factor`, `state_dict` /
    `load_state_dict`), no model needed.

    Shards are read in a random order (fixed by `seed`), their rows shuffled in a buffer of
    `buffer_size` rows; memory holds at most `buffer_size` rows plus one shard. Every shard's
    byte size and CRC-32 are checked (in a second thread, ahead of use) before its rows are
    served; a damaged shard raises `CacheError`. Rows are gathered from the shard files
    mapped into memory, so the page cache holds them, not a copy.
    One pass over the cache, then iteration stops (the last partial batch is dropped).

    Args:
        path: the cache folder.
        batch_size: rows per batch.
        buffer_size: rows in the shuffle buffer (at least `batch_size`).
        hooks: hooks to read (one name gives tensors, a list gives dicts); default all.
        shuffle: shuffle shard order and rows.
        seed: seed of the shuffling.
        dtype: dtype of the batches (default: the cache's).
        device: where batches go (default CPU).
        expect_model, expect_d_in, expect_context_size: refuse a cache whose metadata
            differs (see `check_cache_matches`).
        reuse_batches: gather batches into a ring of this many tensors allocated once
            (faster: no fresh pages per batch), so a batch's memory is overwritten that many
            batches later; for a consumer that is done with each batch by then (the
            trainer). 0 (default): every batch is new memory the caller may keep.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        batch_size: int = 4096,
        buffer_size: int = 262144,
        hooks: str | Sequence[str] | None = None,
        shuffle: bool = True,
        seed: int = 0,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str | None = None,
        expect_model: str | None = None,
        expect_d_in: int | dict[str, int] | None = None,
        expect_context_size: int | None = None,
        reuse_batches: int = 0,
    ) -> None:
        check_buffer_sizes(batch_size, buffer_size)
        self.path = Path(path)
        self.metadata = read_cache_metadata(self.path)
        if not self.metadata["complete"]:
            raise CacheError(
                f"the cache in {self.path} is unfinished ({self.metadata['n_tokens']} tokens "
                "recorded); run the same `saekit cache` command again to finish it"
            )
        if hooks is None:
            # A cache of one hook serves tensors, like ActivationStore with one hook name.
            hooks = self.metadata["hooks"]
            hooks = hooks[0] if len(hooks) == 1 else list(hooks)
        self.single = isinstance(hooks, str)
        self.hooks = [hooks] if isinstance(hooks, str) else list(hooks)
        check_cache_matches(
            self.metadata, model=expect_model, hooks=self.hooks, d_in=expect_d_in,
            context_size=expect_context_size,
        )
        self.shards = check_progress_records(self.path, _read_json(self.path / PROGRESS_FILE))
        total = sum(r["rows"] for r in self.shards)
        if total != self.metadata["n_tokens"]:
            raise CacheError(
                f"{self.path / PROGRESS_FILE} records {total} rows but the metadata says "
                f"{self.metadata['n_tokens']}; the cache is damaged, write it again"
            )
        self.batch_size = batch_size
        self.buffer_size = buffer_size
        self.shuffle = shuffle
        self.dtype = DTYPES[dtype_name(dtype or self.metadata["dtype"])]
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self._init_buffer(seed, reuse_batches)
        # Batches are gathered from the mapped shards where they lie; only a buffer on
        # another device is filled by copying.
        self._serves_in_place = self.device.type == "cpu"
        self._shard_sequence = self._shard_order()
        self._next_shard = 0
        # Shards are checked (read once, CRC-32) in a second thread, a buffer's worth ahead
        # of the reader, so a fill finds its shards checked.
        self._checker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="saekit-shards")
        self._checks: dict[int, Future[ShardLayout]] = {}
        weakref.finalize(self, self._checker.shutdown, wait=False, cancel_futures=True)

    @property
    def d_in(self) -> int | dict[str, int]:
        widths = {h: self.metadata["d_in"][h] for h in self.hooks}
        return widths[self.hooks[0]] if self.single else widths

    @property
    def n_tokens(self) -> int:
        return int(self.metadata["n_tokens"])

    def _shard_order(self) -> list[int]:
        if not self.shuffle:
            return list(range(len(self.shards)))
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randperm(len(self.shards), generator=generator).tolist()

    def read_shard(self, index: int) -> dict[str, Tensor]:
        """Shard `index`'s tensors for our hooks, in the cache's dtype, after checking its
        size, header and CRC-32: read-only views of the file mapped into memory."""
        pending = self._checks.pop(index, None)
        layout = pending.result() if pending is not None else self._check(index)
        return map_shard(layout)

    def _check(self, index: int) -> ShardLayout:
        record = self.shards[index]
        layout = check_shard(shard_path(self.path, record), record, self.hooks)
        # In the checker thread, ahead of use: a NaN row found here is named by shard and
        # row, where the trainer could only report a diverged loss.
        check_shard_finite(layout)
        return layout

    def _check_ahead(self) -> None:
        """Start the checks of the shards the next `buffer_size` rows will come from; drop
        any others (left over from before a change of position)."""
        upcoming, rows = [], 0
        for index in self._shard_sequence[self._next_shard:]:
            if rows >= self.buffer_size:
                break
            upcoming.append(index)
            rows += self.shards[index]["rows"]
        for index in list(self._checks):
            if index not in upcoming:
                self._checks.pop(index).cancel()
        for index in upcoming:
            if index not in self._checks:
                self._checks[index] = self._checker.submit(self._check, index)

    def _next_chunk(self) -> dict[str, Tensor] | None:
        if self._next_shard >= len(self._shard_sequence):
            return None
        chunk = self.read_shard(self._shard_sequence[self._next_shard])
        self._next_shard += 1
        self._check_ahead()
        return chunk

    def _source_state(self) -> int:
        return self._next_shard

    def _load_source_state(self, state: int) -> None:
        self._next_shard = int(state)
        self._check_ahead()

    def _config(self) -> dict[str, Any]:
        return {
            "cache_model": self.metadata["model"],
            "cache_tokens": self.metadata["n_tokens"],
            "hooks": list(self.hooks),
            "batch_size": self.batch_size,
            "buffer_size": self.buffer_size,
            "shuffle": self.shuffle,
            "seed": self.seed,
        }
