"""One forward pass of a spliced model: hook functions, and each attached SAE's step.

`SplicedModel` (splice.py) decides which SAEs sit where; this module is what runs during the
forward pass: the user's hook functions applied at model hooks and SAE points, the cache
filled, and each SAE reading its input and writing its output.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from saekit.models.backend import Replacement
from saekit.saes.base import SAE
from saekit.sites import SAESite, sae_region

#: The points each attached SAE exposes, in the order they run.
SAE_POINTS = (
    "hook_sae_input",
    "hook_sae_acts_pre",
    "hook_sae_acts_post",
    "hook_sae_recons",
    "hook_sae_error",
    "hook_sae_output",
)

#: A hook function: receives the activation, returns a replacement of the same shape or None
#: to keep it. TransformerLens-style functions `fn(activation, hook)` are accepted too.
HookFn = Callable[..., "Tensor | None"]
#: Hooks as {name: fn} or [(name, fn), ...]; a name may be a predicate on hook names, as in
#: TransformerLens, when the caller knows the model's hook names.
HookSpec = Mapping[str, HookFn] | Sequence[tuple["str | Callable[[str], bool]", HookFn]]
#: Where `run_with_cache` puts activations, and which names it keeps.
CacheSpec = tuple[dict[str, Tensor], Callable[[str], bool]]


class HookInfo(NamedTuple):
    """What a TransformerLens-style hook function receives as `hook`: the hook's name."""

    name: str

    def layer(self) -> int:
        """The block index in the name (`blocks.3.hook_resid_pre` -> 3)."""
        parts = self.name.split(".")
        if len(parts) < 2 or parts[0] != "blocks" or not parts[1].isdigit():
            raise ValueError(f"hook {self.name!r} belongs to no block")
        return int(parts[1])


def _takes_hook(fn: Callable[..., Any]) -> bool:
    """Whether `fn` is a TransformerLens-style hook, `fn(activation, hook)`."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature take one argument
        return False
    if any(p.name == "hook" for p in params):
        return True
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    required = [p for p in params if p.kind in positional and p.default is p.empty]
    return len(required) >= 2


def as_hook_fn(name: str, fn: Callable[..., Any]) -> Callable[[Tensor], Tensor | None]:
    """`fn` as a one-argument hook; a TransformerLens-style `fn(activation, hook)` gets a
    `HookInfo` for `hook`, so hooks written for SAELens run unchanged."""
    if not callable(fn):
        raise TypeError(f"the hook for {name!r} is a {type(fn).__name__}, not a function")
    if not _takes_hook(fn):
        return fn
    info = HookInfo(name)
    return lambda act: fn(act, hook=info)


def hook_lists(
    fwd_hooks: HookSpec, names: Iterable[str] | None = None
) -> dict[str, list[Callable[[Tensor], Tensor | None]]]:
    """{hook name: [functions]} from a mapping or a list of pairs. A name given as a
    predicate (TransformerLens's name filters) stands for every name in `names` it accepts."""
    pairs = fwd_hooks.items() if isinstance(fwd_hooks, Mapping) else fwd_hooks
    out: dict[str, list[Callable[[Tensor], Tensor | None]]] = {}
    for name, fn in pairs:
        if callable(name):
            if names is None:
                raise TypeError("a hook name given as a function needs the model's hook names")
            matched = [n for n in names if name(n)]
        else:
            matched = [name]
        for one in matched:
            out.setdefault(one, []).append(as_hook_fn(one, fn))
    return out


def apply_hooks(name: str, value: Tensor, fns: Sequence[Callable[[Tensor], Any]]) -> Tensor:
    for fn in fns:
        new = fn(value)
        if new is None:
            continue
        if new.shape != value.shape:
            raise ValueError(
                f"the hook on {name} returned shape {tuple(new.shape)} for an activation of "
                f"shape {tuple(value.shape)}; it must keep the shape"
            )
        value = new
    return value


def model_hook(
    name: str, fns: Sequence[Callable[[Tensor], Any]], cache: CacheSpec | None
) -> Replacement:
    def fn(act: Tensor) -> Tensor:
        act = apply_hooks(name, act, fns)
        if cache is not None and cache[1](name):
            cache[0][name] = act.detach()
        return act

    return fn


def compose(fns: Sequence[Replacement]) -> Replacement:
    def fn(act: Tensor) -> Tensor:
        for f in fns:
            act = f(act)
        return act

    return fn


@dataclass
class AttachedSAE:
    """An SAE attached to a model: where it reads and writes and how it writes."""

    name: str
    sae: SAE
    site: SAESite
    use_error_term: bool

    def point(self, point: str) -> str:
        return f"{self.name}.{point}"


class SpliceStep:
    """One SAE on one forward pass: reads its input, writes its output, runs its points."""

    def __init__(
        self,
        att: AttachedSAE,
        hooks: Mapping[str, Sequence[Callable[[Tensor], Any]]],
        cache: CacheSpec | None,
    ) -> None:
        self.att = att
        self.hooks = hooks
        self.cache = cache
        self.x_in: Tensor | None = None

    def point(self, point: str, value: Tensor) -> Tensor:
        name = self.att.point(point)
        value = apply_hooks(name, value, self.hooks.get(name, ()))
        if self.cache is not None and self.cache[1](name):
            self.cache[0][name] = value.detach()
        return value

    def region(self, act: Tensor) -> Tensor:
        """The part of the hook's activation the SAE sees."""
        return sae_region(self.att.sae, act, self.att.site.head_index)

    def put(self, act: Tensor, new: Tensor) -> Tensor:
        """`act` with the SAE's region replaced by `new`."""
        head = self.att.site.head_index
        target = act if head is None else act[:, :, head]
        new = new.reshape(target.shape).to(device=act.device, dtype=act.dtype)
        if head is None:
            return new
        out = act.clone()
        out[:, :, head] = new
        return out

    def read(self, act: Tensor) -> Tensor:
        self.x_in = self.point("hook_sae_input", self.region(act))
        return act

    def write(self, act: Tensor) -> Tensor:
        if self.att.site.hook_in == self.att.site.hook_out:
            self.read(act)
        if self.x_in is None:
            raise RuntimeError(
                f"the transcoder {self.att.name!r} reached its output hook "
                f"{self.att.site.hook_out} before its input hook {self.att.site.hook_in}"
            )
        sae, x_in = self.att.sae, self.x_in
        target = self.region(act)
        x_sae = x_in.to(sae.device)
        hidden_pre, acts_clean = sae.encode_parts(sae.center(sae.prepare_input(x_sae)))
        self.point("hook_sae_acts_pre", hidden_pre)
        acts = self.point("hook_sae_acts_post", acts_clean)
        recon_raw = decode(sae, acts, x_sae)
        recon = self.point("hook_sae_recons", recon_raw)
        if self.att.use_error_term:
            with torch.no_grad():
                # The reconstruction the untouched latents give, for the error term.
                recon_clean = (
                    recon_raw.detach() if acts is acts_clean else decode(sae, acts_clean, x_sae)
                )
            target_d = target.detach().to(recon).reshape(recon.shape)
            clean_error = target_d - recon_clean
            error = self.point("hook_sae_error", clean_error)
            if error is clean_error:
                # activation + (edited - clean reconstruction): exactly the activation when
                # nothing was edited; gradients reach the latents through `recon`.
                out = target_d + (recon - recon_clean)
            else:
                out = recon + error
        else:
            out = recon
        out = self.point("hook_sae_output", out)
        return self.put(act, out)


def decode(sae: SAE, acts: Tensor, x_in: Tensor) -> Tensor:
    """The SAE's reconstruction from latents, with the skip path of skip transcoders."""
    recon = sae.decode(acts)
    skip = getattr(sae, "skip", None)
    if callable(skip):
        recon = recon + skip(x_in)
    return recon
