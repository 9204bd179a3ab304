"""Hook-name checking and per-head helpers shared by every backend."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Sequence

from torch import Tensor


def unknown_hook_error(name: str, valid: Iterable[str], model_desc: str) -> ValueError:
    """A ValueError naming the bad hook and the closest valid ones."""
    valid = list(valid)
    close = difflib.get_close_matches(name, valid, n=5, cutoff=0.5)
    if not close:
        # Nothing close by spelling: show a few names so the user sees the naming scheme.
        close = valid[:5]
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
