"""Model backend for TransformerLens: `HookedTransformer` and `TransformerBridge`.

Hook names are TransformerLens's own (`blocks.8.hook_resid_pre`, `blocks.3.attn.hook_z`,
`blocks.3.hook_mlp_out`). Per-head hooks such as `hook_z` give [batch, pos, n_heads, d_head];
`saekit.models.select_head` / `replace_head` read or replace one head (`hook_head_index`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from saekit.models.backend import ModuleBackendBase, Replacement
from saekit.models.hooks import check_hooks


class _StopForward(Exception):
    """Raised inside a hook once every requested activation is captured."""


class TransformerLensBackend(ModuleBackendBase):
    """A `ModelBackend` over a TransformerLens `HookedTransformer` or `TransformerBridge`.

    Args:
        model: the model; it is put in eval mode. A `TransformerBridge` should have had
            `enable_compatibility_mode()` called when you want the classic hook names.
        name: how the model is named in metadata; defaults to `model.cfg.model_name`.
    """

    def __init__(self, model: nn.Module, name: str | None = None) -> None:
        if not hasattr(model, "hook_dict") or not hasattr(model, "hooks"):
            raise TypeError(
                f"{type(model).__name__} is not a TransformerLens model (no hook_dict); "
                "pass a HookedTransformer or a TransformerBridge"
            )
        self.model = model.eval()
        cfg = getattr(model, "cfg", None)
        self.name = name or getattr(cfg, "model_name", None) or type(model).__name__

    @property
    def tokenizer(self) -> Any:
        return getattr(self.model, "tokenizer", None)

    def hook_names(self) -> list[str]:
        return list(self.model.hook_dict)

    def _tokens(self, tokens: Tensor) -> Tensor:
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
        return tokens.to(device=self.device, dtype=torch.long)

    def _check(self, hooks: Sequence[str]) -> list[str]:
        return check_hooks(hooks, self.model.hook_dict, f"the {self.name} model")

    def activations(self, tokens: Tensor, hooks: Sequence[str]) -> dict[str, Tensor]:
        hooks = self._check(hooks)
        captured: dict[str, Tensor] = {}

        def make_hook(name: str):  # noqa: ANN202 - TransformerLens hook signature
            def hook_fn(act: Tensor, hook: Any) -> None:
                # A bridge in compatibility mode may call a hook once per alias: first wins.
                if name in captured:
                    return
                captured[name] = act.detach()
                if len(captured) == len(hooks):
                    raise _StopForward

            return hook_fn

        with torch.no_grad(), self.model.hooks(fwd_hooks=[(h, make_hook(h)) for h in hooks]):
            try:
                self.model(self._tokens(tokens), return_type=None)
            except _StopForward:
                pass
        missing = [h for h in hooks if h not in captured]
        if missing:
            raise RuntimeError(f"hooks {missing} never ran during the forward pass")
        return {hook: captured[hook] for hook in hooks}

    def logits(
        self, tokens: Tensor, replacements: Mapping[str, Replacement] | None = None
    ) -> Tensor:
        replacements = dict(replacements or {})
        if replacements:
            self._check(list(replacements))

        def make_hook(name: str, fn: Replacement):  # noqa: ANN202
            produced: list[Tensor] = []

            def hook_fn(act: Tensor, hook: Any) -> Tensor | None:
                # A bridge in compatibility mode may call a hook once per alias, passing our
                # own output along: replacing it again would apply `fn` twice.
                if produced and act is produced[-1]:
                    return None
                new = fn(act)
                if new.shape != act.shape:
                    raise ValueError(
                        f"the replacement for {name} returned shape {tuple(new.shape)} for an "
                        f"activation of shape {tuple(act.shape)}; it must keep the shape"
                    )
                new = new.to(act.dtype)
                produced[:] = [new]
                return new

            return hook_fn

        fwd_hooks = [(name, make_hook(name, fn)) for name, fn in replacements.items()]
        with self.model.hooks(fwd_hooks=fwd_hooks):
            return self.model(self._tokens(tokens), return_type="logits")

    def __repr__(self) -> str:
        return f"TransformerLensBackend({self.name!r}, device={self.device}, dtype={self.dtype})"
