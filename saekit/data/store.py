"""The activation store: a model's activations at one or more hooks, shuffled, in batches."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from saekit.config import DTYPES, dtype_name
from saekit.data.buffer import ShuffledRows, check_buffer_sizes
from saekit.data.tokens import TokenWindows, keep_mask
from saekit.data.window_pool import WindowPool
from saekit.finite import NonFiniteActivations, locate_non_finite
from saekit.models.backend import ModelBackend
from saekit.models.positions import check_context_size
from saekit.sites import activation_region


def flatten_activation(act: Tensor, head_index: int | None = None) -> Tensor:
    """[batch, pos, d] (or per-head [batch, pos, n_heads, d_head]) -> [batch, pos, width].

    Per-head activations are flattened to n_heads * d_head, or cut to one head."""
    act = activation_region(act, head_index)
    if act.ndim != 3:
        raise ValueError(f"expected an activation [batch, pos, d], got {tuple(act.shape)}")
    return act


class ActivationStore(ShuffledRows):
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
        reuse_batches: gather batches into a ring of this many tensors allocated once
            (faster: no fresh pages per batch), so a batch's memory is overwritten that many
            batches later; for a consumer that is done with each batch by then (the
            trainer). 0 (default): every batch is new memory the caller may keep.
        window_pool: draw the windows in a random order from a pool of this many (see
            `WindowPool`; the same `window_pool_seed` on every data-parallel rank keeps
            their shares disjoint); 0 (default): the dataset's order.
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
        reuse_batches: int = 0,
        window_pool: int = 0,
        window_pool_seed: int = 0,
    ) -> None:
        check_buffer_sizes(batch_size, buffer_size)
        if not isinstance(model_batch_size, int) or model_batch_size <= 0:
            raise ValueError(
                f"model_batch_size must be a positive integer, got {model_batch_size!r}"
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
        self.window_pool = window_pool
        if window_pool:
            self.windows = WindowPool(self.windows, window_pool, window_pool_seed)
        self.context_size = self.windows.context_size
        check_context_size(model, self.context_size, "context_size")
        self.batch_size = batch_size
        self.buffer_size = buffer_size
        self.model_batch_size = model_batch_size
        self.hook_head_index = hook_head_index
        self.exclude_special_tokens = exclude_special_tokens
        self.shuffle = shuffle
        self.dtype = DTYPES[dtype_name(dtype)]
        self.device = torch.device(device) if device is not None else model.device
        self._exclude = (
            torch.tensor(sorted(self.windows.special_ids), dtype=torch.long)
            if exclude_special_tokens and self.windows.special_ids else None
        )
        self._init_buffer(seed, reuse_batches)
        self._d_in: dict[str, int] | None = None
        #: Model forward passes made so far (named when activations are not finite).
        self._forwards = 0

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

    # the source of rows

    def _forward(self, tokens: Tensor) -> dict[str, Tensor]:
        """{hook: [rows, d]} for tokens [n, context_size], special tokens removed."""
        acts = self.model.activations(tokens, self.hooks)
        mask = None if self._exclude is None else keep_mask(tokens, self._exclude)
        self._forwards += 1
        out = {}
        for hook in self.hooks:
            act = flatten_activation(acts[hook], self.hook_head_index)
            out[hook] = act[mask.to(act.device)] if mask is not None else act.flatten(0, 1)
            self._check_finite(hook, out[hook], tokens, mask)
        if self._d_in is None:
            self._d_in = {h: out[h].shape[-1] for h in self.hooks}
        return out

    def _check_finite(
        self, hook: str, rows: Tensor, tokens: Tensor, mask: Tensor | None
    ) -> None:
        """Refuse NaN or infinite activations as they come from the model, saying where.

        A NaN row would otherwise surface many steps later as a diverged loss, blamed on
        the learning rate. The check is one reduction per forward pass."""
        found = locate_non_finite(rows)
        if found is None:
            return
        row, column = found.index
        if mask is not None:
            # The kept rows in order: mask.nonzero() is [kept rows, (sequence, position)].
            sequence, position = (int(i) for i in mask.nonzero()[row])
        else:
            sequence, position = divmod(row, tokens.shape[1])
        raise NonFiniteActivations(
            f"the model's activations at {hook} are not finite: {found.value} in model "
            f"forward pass {self._forwards} (sequence {sequence} of {tokens.shape[0]}, token "
            f"position {position}, feature {column}; {found.count} non-finite values in "
            f"{found.rows} token rows; {self.windows.windows_emitted} windows of "
            f"{self.context_size} tokens read from the dataset so far). The model produced "
            "them, not the SAE: a float16 model overflows above 65504 (load it in float32 or "
            "bfloat16), and a model with NaN weights gives NaN everywhere"
        )

    def _next_chunk(self) -> dict[str, Tensor] | None:
        tokens = self.windows.batch(self.model_batch_size)
        return None if tokens is None else self._forward(tokens)

    def _source_state(self) -> dict[str, Any]:
        return self.windows.state_dict()

    def _load_source_state(self, state: dict[str, Any]) -> None:
        self.windows.load_state_dict(state)

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
            # Whether windows come from a pool; its size is the saved pool's on resume.
            "window_pool": bool(self.window_pool),
        }
