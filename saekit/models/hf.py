"""Model backend for any Hugging Face `PreTrainedModel`.

Hook names are module paths with `.input` or `.output` (`transformer.h.3.output`,
`model.layers.5.mlp.input`), for every module the forward pass can call (not the ModuleLists
and ModuleDicts that only hold modules). For the families in `saekit.models.aliases` (GPT-2,
GPT-NeoX, GPT-J, OPT, Llama, Mistral, Qwen2, Qwen3, Gemma 1-3, Phi-3) the TransformerLens
names work too (`blocks.3.hook_resid_mid`, `blocks.3.attn.hook_z`, `ln_final.hook_normalized`),
with TransformerLens's values; for any other model with one stack of blocks,
`blocks.N.hook_resid_pre` / `blocks.N.hook_resid_post` are the input and output of block N.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from saekit.models.aliases import HookSite, transformer_lens_aliases
from saekit.models.backend import ModuleBackendBase, Replacement
from saekit.models.hooks import unknown_hook_error

# Keyword names under which blocks receive their hidden states.
_HIDDEN_KWARGS = ("hidden_states", "hidden_state", "x", "input")
# Modules that only hold other modules: never called, so their hooks could never fire.
_CONTAINERS = (nn.ModuleList, nn.ModuleDict)


class _StopForward(Exception):
    """Raised inside a hook once every requested activation is captured."""


def model_name(model: nn.Module) -> str:
    """How a model object is named in metadata: its `config._name_or_path` (absolute when it
    is a local folder), else its class name."""
    name = getattr(getattr(model, "config", None), "_name_or_path", None) or ""
    if name and Path(name).is_dir():
        return str(Path(name).resolve())
    return name or type(model).__name__


def is_causal_lm(model: nn.Module) -> bool:
    """Whether the model's forward returns next-token logits (a `*ForCausalLM`)."""
    name = type(model).__name__
    if name.endswith(("ForCausalLM", "LMHeadModel")):
        return True
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    for classes in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        if name in ((classes,) if isinstance(classes, str) else classes):
            return True
    return False


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


def _input_of(args: tuple, kwargs: dict) -> Tensor:
    if args and isinstance(args[0], Tensor):
        return args[0]
    for key in _HIDDEN_KWARGS:
        if isinstance(kwargs.get(key), Tensor):
            return kwargs[key]
    tensors = [value for value in kwargs.values() if isinstance(value, Tensor)]
    for value in tensors:
        if value.is_floating_point():
            return value
    if tensors:  # token ids, for modules that embed them
        return tensors[0]
    raise TypeError("cannot find the input tensor of this module call")


def _replace_input(args: tuple, kwargs: dict, new: Tensor) -> tuple[tuple, dict]:
    if args and isinstance(args[0], Tensor):
        return (new, *args[1:]), kwargs
    for key in _HIDDEN_KWARGS:
        if isinstance(kwargs.get(key), Tensor):
            return args, {**kwargs, key: new}
    for key, value in kwargs.items():
        if isinstance(value, Tensor) and value.is_floating_point():
            return args, {**kwargs, key: new}
    raise TypeError("cannot find the input tensor of this module call to replace")


def _normalize(module: nn.Module, site: HookSite, x: Tensor) -> Tensor:
    """The norm's input normalized, before its weight and bias (TransformerLens's
    hook_normalized)."""
    eps = getattr(module, "eps", None)
    if eps is None:
        eps = getattr(module, "variance_epsilon", 1e-6)
    if site.norm == "layer":
        return F.layer_norm(x, x.shape[-1:], eps=float(eps))
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _denormalize(
    module: nn.Module, site: HookSite, normalized: Tensor, dtype: torch.dtype
) -> Tensor:
    """The norm's output for a normalized value: its weight (+ offset) and bias applied."""
    weight = getattr(module, "weight", None)
    bias = getattr(module, "bias", None)
    out = normalized.float()
    if weight is not None:
        out = out * (weight.float() + site.norm_offset)
    if bias is not None:
        out = out + bias.float()
    return out.to(dtype)


class _View:
    """Between a module's tensor and a hook's activation: [batch * pos, d] tensors (OPT's MLP)
    become [batch, pos, d], [1, pos, d] ones (positional embeddings, broadcast over the
    batch) are expanded to [batch, pos, d], and per-head hooks split d into [n_heads, d_head]."""

    def __init__(self, site: HookSite, batch: int, pos: int) -> None:
        self.site = site
        self.batch = batch
        self.pos = pos

    def _broadcast(self, act: Tensor) -> bool:
        return act.ndim == 3 and act.shape[:2] == (1, self.pos) and self.batch > 1

    def to_hook(self, act: Tensor) -> Tensor:
        if act.ndim == 2 and act.shape[0] == self.batch * self.pos:
            act = act.reshape(self.batch, self.pos, act.shape[-1])  # [batch, pos, d]
        elif self._broadcast(act):
            act = act.expand(self.batch, -1, -1)  # [batch, pos, d]
        if self.site.n_heads is not None:
            act = act.reshape(*act.shape[:-1], self.site.n_heads, -1)  # [..., n_heads, d_head]
        return act

    def replace(self, fn: Replacement, act: Tensor) -> Tensor:
        """`fn` applied to the hook view of `act`, returned in `act`'s own shape (or
        [batch, pos, d] for a tensor that was broadcast over the batch: the model adds it to
        the [batch, pos, d] residual stream either way)."""
        view = self.to_hook(act)
        new = fn(view)
        if new.shape != view.shape:
            raise ValueError(
                f"a replacement returned shape {tuple(new.shape)} for an activation of shape "
                f"{tuple(view.shape)}; it must keep the shape"
            )
        if self._broadcast(act):
            return new.to(act.dtype).reshape(self.batch, self.pos, act.shape[-1])
        return new.to(act.dtype).reshape(act.shape)


class HFBackend(ModuleBackendBase):
    """A `ModelBackend` over a Hugging Face `PreTrainedModel`: causal LMs, and encoders
    (BERT-style, T5 encoders) for activations only.

    Args:
        model: the model; it is put in eval mode.
        tokenizer: its tokenizer, or None.
        name: how the model is named in metadata (Hub id, folder, "bundled"); defaults to
            `config._name_or_path`, else the class name.
        causal_lm: whether `logits` gives next-token logits; by default True for
            `*ForCausalLM` classes and False for base and encoder models.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any = None,
        name: str | None = None,
        causal_lm: bool | None = None,
    ) -> None:
        self.model = model.eval()
        self._tokenizer = tokenizer
        self.name = name or model_name(model)
        self._causal_lm = is_causal_lm(model) if causal_lm is None else causal_lm
        self._modules = {
            path: module
            for path, module in model.named_modules()
            if path and not isinstance(module, _CONTAINERS)
        }
        self._aliases = transformer_lens_aliases(model)
        self._sites: dict[str, HookSite] = dict(self._aliases.sites)
        for path in self._modules:
            for end in ("input", "output"):
                self._sites.setdefault(f"{path}.{end}", HookSite(path, end))

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def causal_lm(self) -> bool:
        """True when `logits` gives next-token logits of a causal LM."""
        return self._causal_lm

    def hook_names(self) -> list[str]:
        """TransformerLens names first (in forward order), then module paths."""
        return list(self._sites)

    def _desc(self) -> str:
        return f"the {self.name} model"

    def _site(self, hook: str) -> HookSite:
        site = self._sites.get(hook)
        if site is not None:
            return site
        reason = self._aliases.explain(hook)
        if reason is not None:
            raise ValueError(f"hook {hook!r} does not exist in {self._desc()}: {reason}")
        raise unknown_hook_error(hook, self._sites, self._desc())

    def _check(self, hooks: Sequence[str]) -> list[str]:
        hooks = [hooks] if isinstance(hooks, str) else list(hooks)
        if not hooks:
            raise ValueError("no hooks requested; pass at least one hook name")
        for hook in hooks:
            self._site(hook)
        if len(set(hooks)) != len(hooks):
            raise ValueError(f"hook names repeat in {hooks}; pass each hook once")
        return hooks

    def _tokens(self, tokens: Tensor) -> Tensor:
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, pos], got shape {tuple(tokens.shape)}")
        return tokens.to(device=self.device, dtype=torch.long)

    def _forward(self, tokens: Tensor) -> Any:
        if self._causal_lm:
            return self.model(input_ids=tokens, use_cache=False)
        # Encoders attend in both directions: an explicit all-ones mask says every position
        # is a real token (and keeps transformers from warning about padding).
        return self.model(input_ids=tokens, attention_mask=torch.ones_like(tokens))

    def _read(
        self,
        site: HookSite,
        view: _View,
        on_act: Callable[[Tensor], None],
        tolerant: bool = False,
    ) -> RemovableHandle:
        """Call `on_act` with the hook's activation whenever the site's module runs; with
        `tolerant`, skip calls whose input or output holds no tensor instead of failing."""
        module = self._modules[site.path]

        def extract(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> Tensor:
            if site.norm is not None:
                return view.to_hook(_normalize(m, site, _input_of(args, kwargs)))
            if site.end == "input":
                return view.to_hook(_input_of(args, kwargs))
            return view.to_hook(_first_tensor(out))

        def hook(m: nn.Module, args: tuple, kwargs: dict, out: Any = None) -> None:
            try:
                act = extract(m, args, kwargs, out)
            except TypeError:
                if tolerant:
                    return
                raise
            on_act(act)

        if site.end == "input" and site.norm is None:
            return module.register_forward_pre_hook(hook, with_kwargs=True)
        return module.register_forward_hook(hook, with_kwargs=True)

    def _write(self, site: HookSite, view: _View, fn: Replacement) -> list[RemovableHandle]:
        """Hooks that replace the site's activation by `fn(activation)` whenever its module
        runs."""
        module = self._modules[site.path]
        if site.via_residual is not None:
            block, adder = (self._modules[p] for p in site.via_residual)
            seen: dict[str, Tensor] = {}

            def replace_sum(_m: nn.Module, _args: tuple, out: Any) -> Any:
                # The block adds the adder's output to its input: to make the sum the
                # replacement, the adder outputs the replacement minus the block input.
                residual = seen["input"]
                new = view.replace(fn, residual + _first_tensor(out))
                return _with_first_tensor(out, new - residual)

            return [
                block.register_forward_pre_hook(
                    lambda _m, args, kwargs: seen.__setitem__("input", _input_of(args, kwargs)),
                    with_kwargs=True,
                ),
                adder.register_forward_hook(replace_sum),
            ]
        if site.norm is not None and site.write_to is not None:
            target = self._modules[site.write_to]
            norm_input: dict[str, Tensor] = {}

            def replace_target_input(_m: nn.Module, args: tuple, kwargs: dict) -> tuple:
                new = view.replace(fn, _normalize(module, site, norm_input["x"]))
                dtype = _input_of(args, kwargs).dtype
                return _replace_input(args, kwargs, _denormalize(module, site, new, dtype))

            return [
                module.register_forward_pre_hook(
                    lambda _m, args, kwargs: norm_input.__setitem__("x", _input_of(args, kwargs)),
                    with_kwargs=True,
                ),
                target.register_forward_pre_hook(replace_target_input, with_kwargs=True),
            ]
        if site.norm is not None:

            def replace_normalized(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
                normalized = _normalize(m, site, _input_of(args, kwargs))
                new = view.replace(fn, normalized)
                old = _first_tensor(out)
                return _with_first_tensor(out, _denormalize(m, site, new, old.dtype))

            return [module.register_forward_hook(replace_normalized, with_kwargs=True)]
        if site.end == "input":

            def replace_input(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
                return _replace_input(args, kwargs, view.replace(fn, _input_of(args, kwargs)))

            return [module.register_forward_pre_hook(replace_input, with_kwargs=True)]
        return [
            module.register_forward_hook(
                lambda _m, _args, out: _with_first_tensor(out, view.replace(fn, _first_tensor(out)))
            )
        ]

    def activations(self, tokens: Tensor, hooks: Sequence[str]) -> dict[str, Tensor]:
        hooks = self._check(hooks)
        tokens = self._tokens(tokens)
        batch, pos = tokens.shape
        captured: dict[str, Tensor] = {}

        def store(hook: str, act: Tensor) -> None:
            if hook in captured:  # a module called twice: the first call is the hook's
                return
            captured[hook] = act.detach()
            if len(captured) == len(hooks):
                raise _StopForward

        handles = []
        try:
            for hook in hooks:
                site = self._sites[hook]
                handles.append(
                    self._read(site, _View(site, batch, pos), lambda a, h=hook: store(h, a))
                )
            with torch.no_grad():
                try:
                    self._forward(tokens)
                except _StopForward:
                    pass
        finally:
            for handle in handles:
                handle.remove()
        missing = [h for h in hooks if h not in captured]
        if missing:
            raise RuntimeError(
                f"hooks {missing} never ran during the forward pass; they belong to modules "
                "this model does not call on its forward"
            )
        return {hook: captured[hook] for hook in hooks}

    def activation_shapes(self, tokens: Tensor) -> dict[str, tuple[int, ...] | None]:
        """{hook name: activation shape} for every hook, from one full forward pass on
        `tokens`; None for hooks that did not run."""
        tokens = self._tokens(tokens)
        batch, pos = tokens.shape
        shapes: dict[str, tuple[int, ...] | None] = dict.fromkeys(self._sites)

        def record(hook: str, act: Tensor) -> None:
            if shapes[hook] is None:
                shapes[hook] = tuple(act.shape)

        handles = []
        try:
            for hook, site in self._sites.items():
                handles.append(self._read(
                    site, _View(site, batch, pos), lambda a, h=hook: record(h, a), tolerant=True
                ))
            with torch.no_grad():
                self._forward(tokens)
        finally:
            for handle in handles:
                handle.remove()
        return shapes

    def logits(
        self, tokens: Tensor, replacements: Mapping[str, Replacement] | None = None
    ) -> Tensor:
        if not self._causal_lm:
            raise ValueError(
                f"{self._desc()} ({type(self.model).__name__}) has no next-token head: it is "
                "not a causal language model, so there are no logits to compute (nor CE/KL "
                "evaluations); read its activations instead, or load a *ForCausalLM model"
            )
        replacements = dict(replacements or {})
        if replacements:
            self._check(list(replacements))
        tokens = self._tokens(tokens)
        batch, pos = tokens.shape
        # Sites replaced through two hooks read the block input after every direct
        # replacement has run, so they are registered last.
        order = sorted(replacements, key=lambda h: self._sites[h].via_residual is not None)
        handles: list[RemovableHandle] = []
        try:
            for hook in order:
                site = self._sites[hook]
                handles += self._write(site, _View(site, batch, pos), replacements[hook])
            out = self._forward(tokens)
        finally:
            for handle in handles:
                handle.remove()
        return out.logits if hasattr(out, "logits") else _first_tensor(out)

    def __repr__(self) -> str:
        return f"HFBackend({self.name!r}, device={self.device}, dtype={self.dtype})"
