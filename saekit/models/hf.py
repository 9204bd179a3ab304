"""Model backend for any Hugging Face `PreTrainedModel`.

Hook names are module paths with `.input` or `.output` (`transformer.h.3.output`,
`model.layers.5.mlp.input`). When the model has exactly one stack of decoder blocks, the
TransformerLens names `blocks.N.hook_resid_pre` / `blocks.N.hook_resid_post` are accepted
too: they are the input and the output of block N.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from saekit.models.backend import ModuleBackendBase, Replacement
from saekit.models.hooks import check_hooks, unknown_hook_error

_ALIAS = re.compile(r"^blocks\.(\d+)\.hook_resid_(pre|post)$")
# Keyword names under which decoder blocks receive their hidden states.
_HIDDEN_KWARGS = ("hidden_states", "hidden_state", "x", "input")


class _StopForward(Exception):
    """Raised inside a hook once every requested activation is captured."""


def _find_block_stack(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The one ModuleList holding the decoder blocks, or None when it is ambiguous."""
    n_layers = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    stacks = [
        (path, module)
        for path, module in model.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0
        and (n_layers is None or len(module) == n_layers)
    ]
    if n_layers is None:
        return None
    return stacks[0] if len(stacks) == 1 else None


def _first_tensor(value: Any) -> Tensor:
    if isinstance(value, Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], Tensor):
        return value[0]
    if hasattr(value, "last_hidden_state"):  # ModelOutput from a nested base model
        return value.last_hidden_state
    raise TypeError(f"cannot find the activation tensor in a {type(value).__name__}")


def _with_first_tensor(value: Any, new: Tensor) -> Any:
    if isinstance(value, Tensor):
        return new
    if isinstance(value, tuple):
        return (new, *value[1:])
    if isinstance(value, list):
        return [new, *value[1:]]
    raise TypeError(f"cannot replace the activation inside a {type(value).__name__}")


class HFBackend(ModuleBackendBase):
    """A `ModelBackend` over a Hugging Face `PreTrainedModel` (causal LMs first).

    Args:
        model: the model; it is put in eval mode.
        tokenizer: its tokenizer, or None.
        name: how the model is named in metadata (Hub id, folder, "bundled").
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, name: str | None = None) -> None:
        self.model = model.eval()
        self._tokenizer = tokenizer
        self.name = name or getattr(getattr(model, "config", None), "_name_or_path", None) or (
            type(model).__name__
        )
        self._modules = dict(model.named_modules())
        self._modules.pop("", None)
        self._aliases: dict[str, str] = {}
        stack = _find_block_stack(model)
        if stack is not None:
            path, blocks = stack
            for i in range(len(blocks)):
                self._aliases[f"blocks.{i}.hook_resid_pre"] = f"{path}.{i}.input"
                self._aliases[f"blocks.{i}.hook_resid_post"] = f"{path}.{i}.output"
        self._order = {path: i for i, path in enumerate(self._modules)}

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def hook_names(self) -> list[str]:
        names = [f"{path}.{end}" for path in self._modules for end in ("input", "output")]
        return names + list(self._aliases)

    def _resolve(self, hook: str) -> tuple[str, str]:
        """(module path, "input" | "output") for a hook name or alias."""
        target = self._aliases.get(hook, hook)
        path, _, end = target.rpartition(".")
        if end not in ("input", "output") or path not in self._modules:
            if _ALIAS.match(hook) and not self._aliases:
                raise ValueError(
                    f"hook {hook!r} is a TransformerLens name, but this {self.name} model has "
                    "no single stack of decoder blocks to map it to; name the module instead, "
                    "e.g. 'model.layers.3.input'"
                )
            raise unknown_hook_error(hook, self.hook_names(), f"the {self.name} model")
        return path, end

    def _tokens(self, tokens: Tensor) -> Tensor:
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
        return tokens.to(device=self.device, dtype=torch.long)

    def activations(self, tokens: Tensor, hooks: Sequence[str]) -> dict[str, Tensor]:
        hooks = check_hooks(hooks, set(self.hook_names()), f"the {self.name} model")
        wanted: dict[tuple[str, str], list[str]] = {}
        for hook in hooks:
            wanted.setdefault(self._resolve(hook), []).append(hook)
        captured: dict[str, Tensor] = {}
        handles = []

        def store(key: tuple[str, str], value: Any) -> None:
            act = _first_tensor(value).detach()
            for hook in wanted[key]:
                captured[hook] = act
            if len(captured) == len(hooks):
                raise _StopForward

        try:
            for key in wanted:
                module = self._modules[key[0]]
                if key[1] == "input":
                    handles.append(
                        module.register_forward_pre_hook(
                            lambda _m, args, kwargs, key=key: store(key, _input_of(args, kwargs)),
                            with_kwargs=True,
                        )
                    )
                else:
                    handles.append(
                        module.register_forward_hook(
                            lambda _m, _args, out, key=key: store(key, out)
                        )
                    )
            with torch.no_grad():
                try:
                    self.model(input_ids=self._tokens(tokens))
                except _StopForward:
                    pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [h for h in hooks if h not in captured]
        if missing:
            raise RuntimeError(
                f"hooks {missing} never ran during the forward pass; they belong to modules "
                "this model does not call on its causal-LM forward"
            )
        return {hook: captured[hook] for hook in hooks}

    def logits(
        self, tokens: Tensor, replacements: Mapping[str, Replacement] | None = None
    ) -> Tensor:
        replacements = dict(replacements or {})
        if replacements:
            check_hooks(list(replacements), set(self.hook_names()), f"the {self.name} model")
        handles = []
        try:
            for hook, fn in replacements.items():
                path, end = self._resolve(hook)
                module = self._modules[path]
                if end == "input":
                    handles.append(
                        module.register_forward_pre_hook(
                            lambda _m, args, kwargs, fn=fn: _replace_input(args, kwargs, fn),
                            with_kwargs=True,
                        )
                    )
                else:
                    handles.append(
                        module.register_forward_hook(
                            lambda _m, _args, out, fn=fn: _with_first_tensor(
                                out, _apply(fn, _first_tensor(out))
                            )
                        )
                    )
            out = self.model(input_ids=self._tokens(tokens))
        finally:
            for handle in handles:
                handle.remove()
        return out.logits if hasattr(out, "logits") else _first_tensor(out)

    def __repr__(self) -> str:
        return f"HFBackend({self.name!r}, device={self.device}, dtype={self.dtype})"


def _input_of(args: tuple, kwargs: dict) -> Tensor:
    if args and isinstance(args[0], Tensor):
        return args[0]
    for key in _HIDDEN_KWARGS:
        if isinstance(kwargs.get(key), Tensor):
            return kwargs[key]
    for value in kwargs.values():
        if isinstance(value, Tensor) and value.is_floating_point():
            return value
    raise TypeError("cannot find the input tensor of this module call")


def _apply(fn: Replacement, act: Tensor) -> Tensor:
    new = fn(act)
    if new.shape != act.shape:
        raise ValueError(
            f"a replacement returned shape {tuple(new.shape)} for an activation of shape "
            f"{tuple(act.shape)}; it must keep the shape"
        )
    return new.to(act.dtype)


def _replace_input(
    args: tuple, kwargs: dict, fn: Replacement
) -> tuple[tuple, dict]:
    if args and isinstance(args[0], Tensor):
        return (_apply(fn, args[0]), *args[1:]), kwargs
    for key in _HIDDEN_KWARGS:
        if isinstance(kwargs.get(key), Tensor):
            return args, {**kwargs, key: _apply(fn, kwargs[key])}
    for key, value in kwargs.items():
        if isinstance(value, Tensor) and value.is_floating_point():
            return args, {**kwargs, key: _apply(fn, value)}
    raise TypeError("cannot find the input tensor of this module call to replace")
