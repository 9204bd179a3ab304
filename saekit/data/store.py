"""The activation store: a model's activations at one or more hooks, shuffled, in batches."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from saekit.config import DTYPES, dtype_name
from saekit.data.tokens import TokenWindows, keep_mask
from saekit.models.backend import ModelBackend
from saekit.models.hooks import select_head

logger = logging.getLogger(__name__)

STATE_VERSION = 1


def flatten_activation(act: Tensor, head_index: int | None = None) -> Tensor:
    """[batch, pos, d] (or per-head [batch, pos, n_heads, d_head]) -> [batch, pos, width].

    Per-head activations are flattened to n_heads * d_head, or cut to one head."""
    act = select_head(act, head_index)
    if act.ndim == 4:
        act = act.flatten(2)  # [batch, pos, n_heads * d_head]
    if act.ndim != 3:
        raise ValueError(f"expected an activation [batch, pos, d], got {tuple(act.shape)}")
    return act


class ActivationStore:
    """Batches of activations for training: `[batch_size, d_in]` tensors for one hook, or
    `{hook: [batch_size, d_in]}` for several hooks read from the same forward pass (the
    same tokens, in the same order, in every tensor).

    Token windows from the dataset go through the model `model_batch_size` sequences at a
    time; their activations (special tokens removed unless `exclude_special_tokens=False`)
    fill a buffer of `buffer_size` token rows, which is shuffled and then served in batches.
    The rows left over when a buffer is used up (fewer than a batch) join the next buffer.
    Memory: at most `buffer_size + model_batch_size * context_size` rows per hook, on
    `device`. Iteration stops when the data runs out (the last partial batch is dropped).

    Args:
        model: a `ModelBackend` (see `saekit.models.load_model`).
        hooks: one hook name, or several (then each batch is a dict).
        dataset: anything `TokenWindows` reads (path, Hub name, Dataset, iterable of texts),
            or a `TokenWindows` (then the text options below are ignored).
        context_size: tokens per sequence fed to the model.
        batch_size: token rows per batch yielded.
        buffer_size: token rows in the shuffle buffer; must be at least `batch_size`. Larger
            mixes tokens from more sequences into each batch.
        model_batch_size: sequences per forward pass.
        hook_head_index: read one attention head of a per-head hook (e.g. `hook_z`);
            per-head activations are otherwise flattened to n_heads * d_head.
        exclude_special_tokens: drop rows at BOS / EOS / pad (and other special) tokens.
        text_column, prepend_bos, packing: as in `TokenWindows`.
        shuffle: shuffle the buffer (turn off only to debug).
        seed: seed of the shuffling; together with `state_dict()` it fixes the order.
        dtype: dtype of the rows served (float32, bfloat16, float16).
        device: where the buffer and batches live; defaults to the model's device.
    """

    def __init__(
        self,
        model: ModelBackend,
        hooks: str | Sequence[str],
        dataset: Any,
        *,
        context_size: int = 128,
        batch_size: int = 4096,
        buffer_size: int = 65536,
        model_batch_size: int = 8,
        hook_head_index: int | None = None,
        exclude_special_tokens: bool = True,
        text_column: str | None = None,
        prepend_bos: bool = True,
        packing: bool = True,
        shuffle: bool = True,
        seed: int = 0,
        dtype: torch.dtype | str = torch.float32,
        device: torch.device | str | None = None,
    ) -> None:
        for name, value in (
            ("batch_size", batch_size),
            ("buffer_size", buffer_size),
            ("model_batch_size", model_batch_size),
        ):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if buffer_size < batch_size:
            raise ValueError(
                f"buffer_size={buffer_size} cannot hold one batch of batch_size={batch_size}; "
                f"make buffer_size at least {batch_size} (several times larger mixes better)"
            )
        self.model = model
        self.single = isinstance(hooks, str)
        self.hooks = [hooks] if isinstance(hooks, str) else list(hooks)
        if not self.hooks:
            raise ValueError("no hooks given; pass at least one hook name")
        missing = [h for h in self.hooks if h not in set(model.hook_names())]
        if missing:
            # The backend's own check names the closest valid hooks.
            from saekit.models.hooks import check_hooks

            check_hooks(missing, model.hook_names(), f"the {getattr(model, 'name', 'model')}")
        if isinstance(dataset, TokenWindows):
            self.windows = dataset
        else:
            self.windows = TokenWindows(
                dataset, model.tokenizer, context_size, text_column=text_column,
                prepend_bos=prepend_bos, packing=packing,
            )
        self.context_size = self.windows.context_size
        self.batch_size = batch_size
        self.buffer_size = buffer_size
        self.model_batch_size = model_batch_size
        self.hook_head_index = hook_head_index
        self.exclude_special_tokens = exclude_special_tokens
        self.shuffle = shuffle
        self.seed = seed
        self.dtype = DTYPES[dtype_name(dtype)]
        self.device = torch.device(device) if device is not None else model.device
        self._exclude = (
            torch.tensor(sorted(self.windows.special_ids), dtype=torch.long)
            if exclude_special_tokens and self.windows.special_ids else None
        )
        self._rng = torch.Generator().manual_seed(seed)
        self._buffer: dict[str, Tensor] | None = None
        self._cursor = 0
        self._cycle: dict[str, Any] | None = None
        self._batches = 0
        self._d_in: dict[str, int] | None = None

    # sizes

    @property
    def d_in(self) -> int | dict[str, int]:
        """Width of each hook's rows (an int for one hook, a dict for several)."""
        if self._d_in is None:
            probe = torch.full((1, 2), self._probe_token(), dtype=torch.long)
            acts = self.model.activations(probe, self.hooks)
            self._d_in = {
                h: flatten_activation(acts[h], self.hook_head_index).shape[-1] for h in self.hooks
            }
        return self._d_in[self.hooks[0]] if self.single else dict(self._d_in)

    def _probe_token(self) -> int:
        for value in (self.windows.bos_id, self.windows.pad_id):
            if value is not None:
                return int(value)
        return 0

    @property
    def batches_served(self) -> int:
        return self._batches

    # activations

    def _forward(self, tokens: Tensor) -> dict[str, Tensor]:
        """{hook: [rows, d]} for tokens [n, context_size], special tokens removed."""
        acts = self.model.activations(tokens, self.hooks)
        mask = None if self._exclude is None else keep_mask(tokens, self._exclude)
        out = {}
        for hook in self.hooks:
            act = flatten_activation(acts[hook], self.hook_head_index)
            rows = act[mask.to(act.device)] if mask is not None else act.flatten(0, 1)
            out[hook] = rows.to(device=self.device, dtype=self.dtype)
        if self._d_in is None:
            self._d_in = {h: out[h].shape[-1] for h in self.hooks}
        return out

    def _fill(self, carry: dict[str, Tensor] | None) -> None:
        """A new buffer: the carried rows plus fresh activations, shuffled."""
        self._cycle = {
            "tokens": self.windows.state_dict(),
            "rng": self._rng.get_state(),
            "carry": None if carry is None else {h: t.cpu() for h, t in carry.items()},
        }
        chunks: dict[str, list[Tensor]] = {
            h: [] if carry is None else [carry[h]] for h in self.hooks
        }
        rows = 0 if carry is None else carry[self.hooks[0]].shape[0]
        while rows < self.buffer_size:
            tokens = self.windows.batch(self.model_batch_size)
            if tokens is None:
                break
            for hook, act in self._forward(tokens).items():
                chunks[hook].append(act)
            rows += chunks[self.hooks[0]][-1].shape[0]
        if rows == 0:
            self._buffer = None
            return
        buffer = {h: torch.cat(chunks[h]) for h in self.hooks}
        if self.shuffle:
            order = torch.randperm(rows, generator=self._rng).to(self.device)
            buffer = {h: t[order] for h, t in buffer.items()}
        self._buffer = buffer
        self._cursor = 0

    def _rows_left(self) -> int:
        return 0 if self._buffer is None else self._buffer[self.hooks[0]].shape[0] - self._cursor

    def __iter__(self) -> ActivationStore:
        return self

    def __next__(self) -> Tensor | dict[str, Tensor]:
        if self._rows_left() < self.batch_size:
            carry = None
            if self._buffer is not None:
                carry = {h: t[self._cursor :] for h, t in self._buffer.items()}
            self._fill(carry)
            if self._rows_left() < self.batch_size:
                self._buffer = None
                raise StopIteration
        start, self._cursor = self._cursor, self._cursor + self.batch_size
        self._batches += 1
        batch = {h: t[start : self._cursor] for h, t in self._buffer.items()}
        return batch[self.hooks[0]] if self.single else batch

    # norm scaling

    def estimate_norm_scaling_factor(self, n_batches: int = 100) -> float | dict[str, float]:
        """s = sqrt(d_in) / E||x|| over about `n_batches * batch_size` token rows read from
        the current data position (the position itself is left unchanged).

        Multiplying activations by s gives them an average norm of sqrt(d_in) (the
        `expected_average_only_in` normalisation). A float for one hook, a dict for several.
        """
        if n_batches <= 0:
            raise ValueError(f"n_batches must be positive, got {n_batches}")
        saved = self.windows.state_dict()
        sums = dict.fromkeys(self.hooks, 0.0)
        rows = 0
        width: dict[str, int] = {}
        try:
            while rows < n_batches * self.batch_size:
                tokens = self.windows.batch(self.model_batch_size)
                if tokens is None:
                    break
                for hook, act in self._forward(tokens).items():
                    sums[hook] += act.double().norm(dim=-1).sum().item()
                    width[hook] = act.shape[-1]
                rows += act.shape[0]
        finally:
            self.windows.load_state_dict(saved)
        if rows == 0:
            raise ValueError("the dataset gave no tokens to estimate the norm scaling factor")
        if rows < n_batches * self.batch_size:
            logger.warning(
                "estimated the norm scaling factor on %d rows, fewer than the %d asked for "
                "(the dataset ran out)", rows, n_batches * self.batch_size,
            )
        factors = {h: math.sqrt(width[h]) / (sums[h] / rows) for h in self.hooks}
        return factors[self.hooks[0]] if self.single else factors

    # checkpointing

    def _config(self) -> dict[str, Any]:
        return {
            "hooks": list(self.hooks),
            "context_size": self.context_size,
            "batch_size": self.batch_size,
            "buffer_size": self.buffer_size,
            "model_batch_size": self.model_batch_size,
            "hook_head_index": self.hook_head_index,
            "exclude_special_tokens": self.exclude_special_tokens,
            "shuffle": self.shuffle,
        }

    def state_dict(self) -> dict[str, Any]:
        """The exact data position and shuffling state, for a training checkpoint.

        Small: the token position at the start of the current buffer, the RNG state then,
        the rows carried into it (fewer than one batch) and how far into it we are.
        Restoring re-runs the model over that one buffer."""
        return {
            "version": STATE_VERSION,
            "config": self._config(),
            "cycle": self._cycle,
            "cursor": self._cursor,
            "batches": self._batches,
            "tokens_now": self.windows.state_dict(),
            "rng_now": self._rng.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a `state_dict()`: the next batch is the one that would have come."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"activation store state version {state.get('version')} is not known")
        mine = self._config()
        diffs = [
            f"{k}: saved {state['config'].get(k)!r}, now {v!r}"
            for k, v in mine.items() if state["config"].get(k) != v
        ]
        if diffs:
            raise ValueError(
                "the saved activation-store position belongs to a different configuration ("
                + "; ".join(diffs) + "); restore with the same settings"
            )
        self._batches = int(state["batches"])
        cycle = state["cycle"]
        if cycle is None:
            self.windows.load_state_dict(state["tokens_now"])
            self._rng.set_state(state["rng_now"])
            self._buffer, self._cursor, self._cycle = None, 0, None
            return
        self.windows.load_state_dict(cycle["tokens"])
        self._rng.set_state(cycle["rng"])
        carry = cycle["carry"]
        if carry is not None:
            carry = {h: t.to(device=self.device, dtype=self.dtype) for h, t in carry.items()}
        self._fill(carry)
        self._cursor = int(state["cursor"])
