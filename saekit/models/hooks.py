"""Hook-name checking and per-head helpers shared by every backend."""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

_TL_STYLE = re.compile(r"(^|\.)hook_|^blocks\.\d+\.|^ln_final\.")


def is_transformer_lens_name(name: str) -> bool:
    """Whether a hook name is in TransformerLens style (`blocks.3.hook_mlp_out`,
    `blocks.3.attn.hook_z`, `hook_embed`) rather than a module path (`model.layers.3.output`)."""
    return _TL_STYLE.search(name) is not None


def unknown_hook_error(name: str, valid: Iterable[str], model_desc: str) -> ValueError:
    """A ValueError naming the bad hook and the closest valid ones.

    Suggestions come in the naming style of `name`: TransformerLens names for a
    TransformerLens-style name, module paths for a module path (when the model has names of
    that style)."""
    valid = list(valid)
    style = is_transformer_lens_name(name)
    same_style = [v for v in valid if is_transformer_lens_name(v) == style]
    pool = same_style or valid
    close = difflib.get_close_matches(name, pool, n=5, cutoff=0.5)
    if not close:
        # Nothing close by spelling: show a few names so the user sees the naming scheme.
        close = pool[:5]
    return ValueError(
        f"hook {name!r} does not exist in {model_desc}; closest valid hook names: "
        f"{', '.join(close)} (backend.hook_names() lists all {len(valid)})"
    )


def check_hooks(hooks: Sequence[str], valid: Iterable[str], model_desc: str) -> list[str]:
    """The hooks as a list, after checking each one exists and none is repeated."""
    if isinstance(hooks, str):
        hooks = [hooks]
    hooks = list(hooks)
    if not hooks:
        raise ValueError("no hooks requested; pass at least one hook name")
    valid_set = set(valid) if not isinstance(valid, (set, frozenset, dict)) else valid
    for name in hooks:
        if name not in valid_set:
            raise unknown_hook_error(name, sorted(valid_set), model_desc)
    if len(set(hooks)) != len(hooks):
        raise ValueError(f"hook names repeat in {hooks}; pass each hook once")
    return hooks


def select_head(activation: Tensor, head_index: int | None) -> Tensor:
    """The slice of a per-head activation [batch, pos, n_heads, d_head] for one head
    ([batch, pos, d_head]); the activation unchanged when head_index is None."""
    if head_index is None:
        return activation
    if activation.ndim != 4:
        raise ValueError(
            f"hook_head_index={head_index} needs a per-head hook (activation "
            f"[batch, pos, n_heads, d_head]), but this hook's activation has shape "
            f"{tuple(activation.shape)}"
        )
    n_heads = activation.shape[2]
    if not 0 <= head_index < n_heads:
        raise ValueError(f"hook_head_index={head_index} is out of range for {n_heads} heads")
    return activation[:, :, head_index]


def replace_head(
    fn: Callable[[Tensor], Tensor], head_index: int | None
) -> Callable[[Tensor], Tensor]:
    """A replacement for a per-head hook that applies `fn` to one head only.

    `fn` receives [batch, pos, d_head] and returns the same shape; the other heads pass
    through unchanged. With head_index None, `fn` itself is returned."""
    if head_index is None:
        return fn

    def replaced(activation: Tensor) -> Tensor:
        head = select_head(activation, head_index)
        out = activation.clone()
        out[:, :, head_index] = fn(head).to(activation.dtype)
        return out

    return replaced


def hook_shapes(backend: Any, tokens: Tensor) -> dict[str, tuple[int, ...] | None]:
    """{hook name: activation shape} for every hook of `backend`, from one forward pass on
    `tokens` [batch, pos]; None for hooks that did not run on it."""
    names = list(backend.hook_names())
    if hasattr(backend, "activation_shapes"):  # HFBackend: every hook in one pass
        return backend.activation_shapes(tokens)
    model = getattr(backend, "model", None)
    if hasattr(model, "run_with_cache"):  # TransformerLens: the cache holds every hook
        with torch.no_grad():
            _, cache = model.run_with_cache(tokens.to(backend.device))
        return {n: tuple(cache[n].shape) if n in cache else None for n in names}
    acts = backend.activations(tokens, names)
    return {n: tuple(acts[n].shape) for n in names}
