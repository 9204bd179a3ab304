"""SAEs spliced into a model, with hook points of their own.

`SplicedModel` wraps any model backend (TransformerLens or Hugging Face) and runs it with
SAEs attached at their hooks: the activation at the SAE's hook is replaced by the SAE's
reconstruction. Each attached SAE exposes named points, prefixed by its name (by default
its input hook), that hooks can read and edit and `run_with_cache` returns:

    blocks.1.hook_resid_pre.hook_sae_input      the activation the SAE reads
    blocks.1.hook_resid_pre.hook_sae_acts_pre   its pre-activations (read only)
    blocks.1.hook_resid_pre.hook_sae_acts_post  its latents (edit these to intervene)
    blocks.1.hook_resid_pre.hook_sae_recons     its reconstruction
    blocks.1.hook_resid_pre.hook_sae_error      activation - clean reconstruction (error term only)
    blocks.1.hook_resid_pre.hook_sae_output     what is written back into the model

With `use_error_term=True` the written value is the model's own activation plus the change
the edits made to the reconstruction, so with no edits the model's output is exactly what it
is without the SAE, while edits to latents still propagate. Transcoders read at their input
hook and write at their output hook.

A hook on a model hook name (`blocks.1.hook_resid_pre`) sees the model's own activation
before any SAE there reads it; the cache holds that activation too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from saekit.models.backend import ModelBackend, Replacement
from saekit.models.hooks import unknown_hook_error
from saekit.saes.base import SAE
from saekit.sites import SAESite, sae_region, sae_site

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
#: to keep it.
HookFn = Callable[[Tensor], "Tensor | None"]
HookSpec = Mapping[str, HookFn] | Sequence[tuple[str, HookFn]]


class CacheResult(NamedTuple):
    """What `SplicedModel.run_with_cache` returns."""

    logits: Tensor
    """Logits [batch, pos, vocab]."""
    cache: dict[str, Tensor]
    """{hook name: activation}, detached; model hooks and SAE points."""


@dataclass
class AttachedSAE:
    """An SAE attached to a model: where it reads and writes and how it writes."""

    name: str
    sae: SAE
    site: SAESite
    use_error_term: bool

    def point(self, point: str) -> str:
        return f"{self.name}.{point}"


class SplicedModel:
    """A model with SAEs spliced in at their hooks.

    Args:
        model: a `ModelBackend`, or anything `saekit.models.load_model` accepts (a
            `HookedTransformer`, a `PreTrainedModel`, "bundled", a model name).
        saes: SAEs to attach right away (at the hooks their metadata names).
        use_error_term: the default for SAEs attached without saying.
        tokenizer: the tokenizer, for a `PreTrainedModel` object.
    """

    def __init__(
        self,
        model: Any,
        saes: Iterable[SAE] = (),
        *,
        use_error_term: bool = False,
        tokenizer: Any = None,
    ) -> None:
        from saekit.models import load_model

        self.backend: ModelBackend = (
            model if isinstance(model, ModelBackend) and not isinstance(model, torch.nn.Module)
            else load_model(model, tokenizer=tokenizer)
        )
        self.use_error_term = use_error_term
        self._attached: dict[str, AttachedSAE] = {}
        for sae in saes:
            self.attach(sae)

    # ----- attaching -------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self.backend.tokenizer

    @property
    def attached(self) -> dict[str, AttachedSAE]:
        """The attached SAEs by name, in the order they were attached."""
        return dict(self._attached)

    def attach(
        self,
        sae: SAE,
        *,
        hook: str | None = None,
        hook_out: str | None = None,
        use_error_term: bool | None = None,
        name: str | None = None,
    ) -> str:
        """Attach `sae` and return its name (the prefix of its hook points).

        `hook` / `hook_out` override the hooks in the SAE's metadata; `name` defaults to the
        input hook.
        """
        site = sae_site(sae, hook, hook_out)
        valid = set(self.backend.hook_names())
        for h in {site.hook_in, site.hook_out}:
            if h not in valid:
                raise unknown_hook_error(h, sorted(valid), f"the model {self.backend!r}")
        name = name or site.hook_in
        if name in self._attached:
            raise ValueError(
                f"an SAE is already attached as {name!r}; detach it first or pass name=..."
            )
        error_term = self.use_error_term if use_error_term is None else use_error_term
        self._attached[name] = AttachedSAE(name, sae, site, error_term)
        return name

    def detach(self, which: str | SAE | None = None) -> None:
        """Detach one SAE (by name or object), or all of them when `which` is None."""
        if which is None:
            self._attached.clear()
            return
        names = [n for n, a in self._attached.items() if n == which or a.sae is which]
        if not names:
            raise ValueError(
                f"no SAE attached as {which if isinstance(which, str) else 'that object'}; "
                f"attached: {list(self._attached) or 'none'}"
            )
        for name in names:
            del self._attached[name]

    @contextmanager
    def saes(
        self, *saes: SAE, use_error_term: bool | None = None
    ) -> Iterator[SplicedModel]:
        """Attach `saes` for the duration of a `with` block, then detach them."""
        names: list[str] = []
        try:
            for sae in saes:
                names.append(self.attach(sae, use_error_term=use_error_term))
            yield self
        finally:
            for name in names:
                self._attached.pop(name, None)

    def hook_names(self) -> list[str]:
        """Model hook names and the attached SAEs' points."""
        points = [a.point(p) for a in self._attached.values() for p in SAE_POINTS]
        return self.backend.hook_names() + points

    # ----- running ---------------------------------------------------------------------------

    def __call__(self, tokens: Tensor) -> Tensor:
        return self.run_with_hooks(tokens)

    def run_with_hooks(self, tokens: Tensor, fwd_hooks: HookSpec = ()) -> Tensor:
        """Logits [batch, pos, vocab] with the SAEs spliced in and `fwd_hooks` applied.

        `fwd_hooks` maps hook names (model hooks or SAE points) to functions that return a
        replacement or None. Gradients flow unless the caller disables them.
        """
        return self._forward(tokens, _hook_lists(fwd_hooks), None)

    def run_with_cache(
        self,
        tokens: Tensor,
        names_filter: Iterable[str] | Callable[[str], bool] | None = None,
        fwd_hooks: HookSpec = (),
    ) -> CacheResult:
        """Logits and a cache of every SAE point (and the model hooks in `names_filter`).

        `names_filter` is a list of names or a predicate; None caches every SAE point and
        the hooks the SAEs sit at.
        """
        if names_filter is None:
            wanted = {a.point(p) for a in self._attached.values() for p in SAE_POINTS}
            wanted |= {h for a in self._attached.values() for h in (a.site.hook_in,
                                                                      a.site.hook_out)}
            keep: Callable[[str], bool] = wanted.__contains__
        elif callable(names_filter):
            keep = names_filter
        else:
            names = list(names_filter)
            self._check_names(names)
            keep = set(names).__contains__
        cache: dict[str, Tensor] = {}
        with torch.no_grad():
            logits = self._forward(tokens, _hook_lists(fwd_hooks), (cache, keep))
        return CacheResult(logits, cache)

    def _check_names(self, names: Iterable[str]) -> None:
        valid = set(self.hook_names())
        for name in names:
            if name not in valid:
                raise unknown_hook_error(name, sorted(valid), "this spliced model")

    def _forward(
        self,
        tokens: Tensor,
        hooks: dict[str, list[HookFn]],
        cache: tuple[dict[str, Tensor], Callable[[str], bool]] | None,
    ) -> Tensor:
        self._check_names(hooks)
        for att in self._attached.values():
            if hooks.get(att.point("hook_sae_acts_pre")):
                raise ValueError(
                    f"{att.point('hook_sae_acts_pre')} can be read but not edited; edit "
                    f"{att.point('hook_sae_acts_post')} instead"
                )
        model_hooks = set(self.backend.hook_names())
        steps: dict[str, list[Replacement]] = {}
        wanted_model = [h for h in model_hooks if cache is not None and cache[1](h)]
        for name in {*(h for h in hooks if h in model_hooks), *wanted_model}:
            steps.setdefault(name, []).append(_model_hook(name, hooks.get(name, []), cache))
        for att in self._attached.values():
            run = _SpliceStep(att, hooks, cache)
            if att.site.hook_in != att.site.hook_out:
                steps.setdefault(att.site.hook_in, []).append(run.read)
            steps.setdefault(att.site.hook_out, []).append(run.write)
        return self.backend.logits(tokens, {h: _compose(fns) for h, fns in steps.items()})


def _hook_lists(fwd_hooks: HookSpec) -> dict[str, list[HookFn]]:
    pairs = fwd_hooks.items() if isinstance(fwd_hooks, Mapping) else fwd_hooks
    out: dict[str, list[HookFn]] = {}
    for name, fn in pairs:
        if not callable(fn):
            raise TypeError(f"the hook for {name!r} is a {type(fn).__name__}, not a function")
        out.setdefault(name, []).append(fn)
    return out


def _apply_hooks(name: str, value: Tensor, fns: Sequence[HookFn]) -> Tensor:
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


def _model_hook(
    name: str,
    fns: Sequence[HookFn],
    cache: tuple[dict[str, Tensor], Callable[[str], bool]] | None,
) -> Replacement:
    def fn(act: Tensor) -> Tensor:
        act = _apply_hooks(name, act, fns)
        if cache is not None and cache[1](name):
            cache[0][name] = act.detach()
        return act

    return fn


def _compose(fns: Sequence[Replacement]) -> Replacement:
    def fn(act: Tensor) -> Tensor:
        for f in fns:
            act = f(act)
        return act

    return fn


class _SpliceStep:
    """One SAE on one forward pass: reads its input, writes its output, runs its points."""

    def __init__(
        self,
        att: AttachedSAE,
        hooks: Mapping[str, Sequence[HookFn]],
        cache: tuple[dict[str, Tensor], Callable[[str], bool]] | None,
    ) -> None:
        self.att = att
        self.hooks = hooks
        self.cache = cache
        self.x_in: Tensor | None = None

    def point(self, point: str, value: Tensor) -> Tensor:
        name = self.att.point(point)
        value = _apply_hooks(name, value, self.hooks.get(name, ()))
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
        recon_raw = _decode(sae, acts, x_sae)
        recon = self.point("hook_sae_recons", recon_raw)
        if self.att.use_error_term:
            with torch.no_grad():
                # The reconstruction the untouched latents give, for the error term.
                recon_clean = (
                    recon_raw.detach() if acts is acts_clean else _decode(sae, acts_clean, x_sae)
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


def _decode(sae: SAE, acts: Tensor, x_in: Tensor) -> Tensor:
    """The SAE's reconstruction from latents, with the skip path of skip transcoders."""
    recon = sae.decode(acts)
    skip = getattr(sae, "skip", None)
    if callable(skip):
        recon = recon + skip(x_in)
    return recon
