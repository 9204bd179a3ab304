"""The on-disk activation cache: run the model once, train from the files many times.

A cache is a folder:

    metadata.json            what the activations are (model, hooks, d_in, dtype, dataset,
                             context size, tokenizer identity) and whether the write finished
    progress.json            one record per shard written (file, rows, crc32, byte size) and
                             the dataset position after it, so an interrupted write resumes
    shard_00000.safetensors  one tensor per hook, [rows, d_in], rows in dataset order

Rows are stored in corpus order, so readers (`CachedActivations`) must mix them: by default
every shuffle buffer gathers short blocks of consecutive rows from all over the cache
(`mix="blocks"`); the older mode reads whole shards in a random order (`mix="shards"`).
Readers check every shard's size and CRC-32 before using it (`saekit.data.shards`).
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


#: How `CachedActivations` mixes rows: "blocks" (blocks of consecutive rows drawn from the
#: whole cache into every buffer) or "shards" (whole shards in a random order).
MIX_MODES = ("blocks", "shards")
#: Consecutive rows per block in "blocks" mixing.
DEFAULT_BLOCK_ROWS = 128
#: Threads checking shards ahead of the reader.
CHECK_THREADS = max(1, min(4, (os.cpu_count() or 1) - 1))


class BlockOrder:
    """The cache's rows cut into blocks of at most `block_rows` consecutive rows (blocks
    never cross shards; a shard's last block may be shorter), in one order fixed by a seed.

    Block b of the order is addressed as (shard, first row in the shard, rows); only the
    order itself is stored, the rest is worked out from the shard sizes when asked."""

    def __init__(self, shard_rows: Sequence[int], block_rows: int, seed: int | None) -> None:
        self.block_rows = block_rows
        self.shard_rows = torch.tensor(list(shard_rows), dtype=torch.long)
        per_shard = -(-self.shard_rows // block_rows)  # ceil; 0 for an empty shard
        #: Block id at which each shard's blocks begin, and one past the last block.
        self.first_block = torch.cat([torch.zeros(1, dtype=torch.long), per_shard.cumsum(0)])
        self.n_blocks = int(self.first_block[-1])
        if seed is None:
            self.order = torch.arange(self.n_blocks)
        else:
            generator = torch.Generator().manual_seed(seed)
            self.order = torch.randperm(self.n_blocks, generator=generator)
        # The shortest block (some shard's last) bounds how many blocks a number of rows
        # can need.
        last = [r - (-(-r // block_rows) - 1) * block_rows for r in shard_rows if r]
        self._shortest = min(last) if last else block_rows

    def locate(self, blocks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(shard, first row within the shard, rows) of each block id in `blocks`."""
        shard = torch.bucketize(blocks, self.first_block[1:], right=True)
        start = (blocks - self.first_block[shard]) * self.block_rows
        rows = torch.clamp(self.shard_rows[shard] - start, max=self.block_rows)
        return shard, start, rows

    def take(self, position: int, rows: int) -> Tensor:
        """The block ids from `position` in the order up to the first at which they hold at
        least `rows` rows (all the rest if they hold fewer); empty at the end."""
        window = self.order[position:position + rows // self._shortest + 1]
        if not len(window):
            return window
        held = self.locate(window)[2].cumsum(0)
        enough = int(torch.searchsorted(held, rows))  # the first index with held >= rows
        return window[:enough + 1]


class CachedActivations(ShuffledRows):
    """Training batches read from an activation cache: the same protocol as
    `ActivationStore` (iteration, `d_in`, `estimate_norm_scaling_factor`, `state_dict` /
    `load_state_dict`), no model needed.

    The cache holds rows in corpus order, so how rows are mixed decides how i.i.d. the
    batches are. `mix="blocks"` (default) cuts the cache into blocks of `block_rows`
    consecutive rows and draws every buffer from blocks in one random order over the whole
    cache (fixed by `seed`): a buffer of 16,384 rows gathers 128 blocks from all over the
    corpus, and is then shuffled. `mix="shards"` reads whole shards in a random order, each
    into a buffer of `buffer_size` rows: many consecutive batches then come from one stretch
    of one document, which left far more latents dead in training (kept for comparison and
    for runs that began with it).

    Every shard's byte size and CRC-32 are checked (in other threads, ahead of use) before
    any of its rows are served; a damaged shard raises `CacheError` naming it. Shards are
    mapped into memory, not read into it: "shards" mixing gathers batches straight from the
    mapped files (memory holds at most `buffer_size` rows plus one shard); "blocks" mixing
    copies each buffer's rows out of the mapped files (memory holds about `buffer_size`
    rows; the mapped shards stay in the page cache, shared and droppable).
    One pass over the cache, then iteration stops (the last partial batch is dropped).

    Args:
        path: the cache folder.
        batch_size: rows per batch.
        buffer_size: rows in the shuffle buffer (at least `batch_size`).
        hooks: hooks to read (one name gives tensors, a list gives dicts); default all.
        shuffle: shuffle the block (or shard) order and the rows in each buffer; without
            it rows come in the cache's order.
        seed: seed of the shuffling.
        dtype: dtype of the batches (default: the cache's).
        device: where batches go (default CPU).
        expect_model, expect_d_in, expect_context_size: refuse a cache whose metadata
            differs (see `check_cache_matches`).
        reuse_batches: gather batches into a ring of this many tensors allocated once
            (faster: no fresh pages per batch), so a batch's memory is overwritten that many
            batches later; for a consumer that is done with each batch by then (the
            trainer). 0 (default): every batch is new memory the caller may keep.
        mix: "blocks" or "shards", as above. Part of the saved position: a position saved
            in one mode is refused by a reader in the other.
        block_rows: consecutive rows per block in "blocks" mixing (ignored for "shards").
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
        mix: str = "blocks",
        block_rows: int = DEFAULT_BLOCK_ROWS,
    ) -> None:
        check_buffer_sizes(batch_size, buffer_size)
        if mix not in MIX_MODES:
            raise ValueError(f"mix must be one of {', '.join(MIX_MODES)}, got {mix!r}")
        if not _is_int(block_rows) or block_rows <= 0:
            raise ValueError(
                f"block_rows must be a positive integer (rows per block), got {block_rows!r}"
            )
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
        self.block_rows = block_rows
        self._set_mix(mix)
        # Shards are checked (read once, CRC-32) in other threads, a buffer's worth ahead
        # of the reader, so a fill finds its shards checked. Several: with block mixing the
        # first fills need every shard they touch checked at once (reads and CRC release
        # the GIL).
        self._checker = ThreadPoolExecutor(
            max_workers=CHECK_THREADS, thread_name_prefix="saekit-shards"
        )
        self._checks: dict[int, Future[ShardLayout]] = {}
        weakref.finalize(self, self._checker.shutdown, wait=False, cancel_futures=True)

    def _set_mix(self, mix: str) -> None:
        """Set the mixing mode and start at the beginning of its order."""
        self.mix = mix
        # "shards": batches are gathered from the mapped shards where they lie; only a
        # buffer on another device is filled by copying. "blocks": every fill copies.
        self._serves_in_place = mix == "shards" and self.device.type == "cpu"
        self._shard_sequence = self._shard_order()
        self._next_shard = 0
        self._blocks: BlockOrder | None = None
        if mix == "blocks":
            self._blocks = BlockOrder(
                [r["rows"] for r in self.shards], self.block_rows,
                self.seed if self.shuffle else None,
            )
        self._next_block = 0
        #: Shards mapped so far ("blocks" mixing keeps them: any fill may need any shard).
        self._mapped: dict[int, dict[str, Tensor]] = {}

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

    def _upcoming_shards(self) -> list[int]:
        """The shards the next `buffer_size` rows come from (with block mixing, only those
        not mapped yet: a mapped shard was checked)."""
        if self._blocks is not None:
            blocks = self._blocks.take(self._next_block, self.buffer_size)
            shards = torch.unique(self._blocks.locate(blocks)[0]).tolist()
            return [s for s in shards if s not in self._mapped]
        upcoming, rows = [], 0
        for index in self._shard_sequence[self._next_shard:]:
            if rows >= self.buffer_size:
                break
            upcoming.append(index)
            rows += self.shards[index]["rows"]
        return upcoming

    def _check_ahead(self) -> None:
        """Start the checks of the shards the next `buffer_size` rows will come from; drop
        any others (left over from before a change of position)."""
        upcoming = self._upcoming_shards()
        for index in list(self._checks):
            if index not in upcoming:
                self._checks.pop(index).cancel()
        for index in upcoming:
            if index not in self._checks:
                self._checks[index] = self._checker.submit(self._check, index)

    def _next_chunk(self) -> dict[str, Tensor] | None:
        if self._blocks is not None:
            # The next buffer's worth of blocks, in the cache's dtype (the norm estimate).
            blocks = self._take_blocks(self.buffer_size)
            if blocks is None:
                return None
            out = self._gather_blocks(blocks, None)
            self._check_ahead()
            return out
        if self._next_shard >= len(self._shard_sequence):
            return None
        chunk = self.read_shard(self._shard_sequence[self._next_shard])
        self._next_shard += 1
        self._check_ahead()
        return chunk

    # "blocks" mixing

    def _take_blocks(self, rows: int) -> Tensor | None:
        """The next blocks of the order holding at least `rows` rows (fewer at the end of
        the pass; None after it), moving the position past them."""
        assert self._blocks is not None
        blocks = self._blocks.take(self._next_block, rows)
        if not len(blocks):
            return None
        self._next_block += len(blocks)
        return blocks

    def _mapped_shard(self, index: int) -> dict[str, Tensor]:
        """Shard `index` mapped, checked on its first use (by the checker thread when it
        got there first); kept mapped, since any later fill may need it again."""
        mapped = self._mapped.get(index)
        if mapped is None:
            mapped = self._mapped[index] = self.read_shard(index)
        return mapped

    def _gather_blocks(
        self, blocks: Tensor, out: dict[str, Tensor] | None
    ) -> dict[str, Tensor]:
        """Copy the rows of `blocks` into `out` ({hook: [rows, d]}, rows = the blocks' rows;
        None: new CPU tensors in the cache's dtype) and return it.

        Rows are laid out shard by shard (each shard's blocks in their order), so each shard
        takes one gather per hook; the buffer is shuffled afterwards, and without shuffling
        the blocks come in cache order and so do the rows."""
        assert self._blocks is not None
        shard, start, length = self._blocks.locate(blocks)
        by_shard = torch.argsort(shard, stable=True)
        shard, start, length = shard[by_shard], start[by_shard], length[by_shard]
        # The row index within its shard of every row, block after block.
        first = torch.cumsum(length, 0) - length
        rows = torch.repeat_interleave(start - first, length) + torch.arange(int(length.sum()))
        counts = torch.bincount(shard).tolist()
        needed = [s for s, n in enumerate(counts) if n]
        # Ask for every check this fill needs at once; while the checkers work from the
        # front, this thread (which would only wait) checks from the back the shards no
        # checker has started on.
        for index in needed:
            if index not in self._mapped and index not in self._checks:
                self._checks[index] = self._checker.submit(self._check, index)
        for index in reversed(needed):
            pending = self._checks.get(index)
            if pending is not None and pending.cancel():
                del self._checks[index]
                self._mapped[index] = map_shard(self._check(index))
        row_counts = torch.zeros(len(counts), dtype=torch.long).index_add_(0, shard, length)
        begin = 0
        for index in needed:
            n = int(row_counts[index])
            local = rows[begin:begin + n]
            mapped = self._mapped_shard(index)
            if out is None:
                out = {h: t.new_empty(len(rows), t.shape[1]) for h, t in mapped.items()}
            for hook, source in mapped.items():
                dest = out[hook][begin:begin + n]
                if dest.device == source.device and dest.dtype == source.dtype:
                    torch.index_select(source, 0, local, out=dest)
                else:
                    dest.copy_(source.index_select(0, local))
            begin += n
        assert out is not None
        return out

    def _read_chunk_into(self, start: int) -> int | None:
        """Fill the buffer from row `start` with the next blocks, up to `buffer_size` rows
        (the whole buffer in one call); the rows are copied out of the mapped shards."""
        if self._blocks is None:
            return super()._read_chunk_into(start)
        blocks = self._take_blocks(self.buffer_size - start)
        if blocks is None:
            return None
        rows = int(self._blocks.locate(blocks)[2].sum())
        widths = {h: int(self.metadata["d_in"][h]) for h in self.hooks}
        self._gather_blocks(blocks, self._reserve(start, rows, widths))
        self._check_ahead()
        return rows

    # position

    def _source_state(self) -> int:
        return self._next_block if self._blocks is not None else self._next_shard

    def _load_source_state(self, state: int) -> None:
        if self._blocks is not None:
            self._next_block = int(state)
        else:
            self._next_shard = int(state)
        self._check_ahead()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()`: the next batch is the one that would have come.

        A position saved before "blocks" mixing existed (its settings name no mode) was
        saved reading whole shards, so the reader switches to "shards" to continue it
        exactly."""
        saved = state.get("config")
        if isinstance(saved, dict) and "mix" not in saved:
            if self.mix != "shards":
                logger.warning(
                    "the saved data position comes from a reader that mixed whole shards (it "
                    "predates block mixing); continuing that run with mix='shards'"
                )
                self._set_mix("shards")
            state = {**state, "config": {**saved, "mix": "shards", "block_rows": None}}
        super().load_state_dict(state)

    def _config(self) -> dict[str, Any]:
        return {
            "cache_model": self.metadata["model"],
            "cache_tokens": self.metadata["n_tokens"],
            "hooks": list(self.hooks),
            "batch_size": self.batch_size,
            "buffer_size": self.buffer_size,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "mix": self.mix,
            "block_rows": self.block_rows if self.mix == "blocks" else None,
        }
