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

A cross-layer transcoder attaches as a whole (`model.attach(clt)`, default name "clt"): it
replaces every MLP output it covers at once, each layer written from the latents of that
layer and all earlier ones (`saekit.analysis.replacement`). Its points are named per layer
by the layer's input hook, as a per-layer transcoder's would be
(`blocks.1.ln2.hook_normalized.hook_sae_acts_post` holds layer 1's latents), and
`attached` lists one entry per layer; detaching any of them, or the CLT by name or object,
detaches the whole CLT. A crosscoder, which reads several sites (or models) at once, does not
splice: attaching one is refused (`evaluate_crosscoder` evaluates it).

A hook on a model hook name (`blocks.1.hook_resid_pre`) sees the model's own activation
before any SAE there reads it; the cache holds that activation too.

It is also SAELens's `HookedSAETransformer` (saekit exports it under that name): text or
token inputs, `run_with_saes`, `run_with_cache_with_saes`, `run_with_hooks_with_saes`,
`add_sae`, `reset_saes`, `saes(saes=[...])`, `hooks(fwd_hooks=[...])`, `to_tokens`,
`to_string`, `generate`, and hook functions written as `fn(activation, hook)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import Tensor

from saekit.analysis import text as text_io
from saekit.analysis.generation import sample
from saekit.analysis.replacement import ReplacementPass, replacement_hooks
from saekit.analysis.splice_step import (
    SAE_POINTS,
    AttachedSAE,
    CacheSpec,
    HookFn,
    HookSpec,
    SpliceStep,
    apply_hooks,
    compose,
    hook_lists,
    model_hook,
)
from saekit.models.backend import ModelBackend, Replacement
from saekit.models.hooks import unknown_hook_error
from saekit.saes.base import SAE
from saekit.saes.clt import CrossLayerTranscoder
from saekit.sites import SAESite, check_one_site, sae_site

__all__ = [
    "SAE_POINTS",
    "ActivationCache",
    "AttachedCLTLayer",
    "AttachedSAE",
    "CacheResult",
    "HookFn",
    "HookSpec",
    "HookedSAETransformer",
    "LogitsAndLoss",
    "SplicedModel",
]

#: What the forward methods take: text, a list of texts, or token ids [batch, pos] / [pos].
ModelInput = str | Sequence[str] | Tensor
#: SAEs given to `saes`, `run_with_saes` and the like: one SAE or several.
SAEsArg = SAE | Iterable[SAE] | None
RETURN_TYPES = ("logits", "loss", "both", None)
#: The name a cross-layer transcoder is attached under unless told otherwise.
CLT_NAME = "clt"


@dataclass
class AttachedCLTLayer(AttachedSAE):
    """One layer of an attached cross-layer transcoder (`sae`): named, like a per-layer
    transcoder, by the layer's input hook; `clt_name` is the whole CLT's name."""

    clt_name: str = CLT_NAME
    layer: int = 0


class CacheResult(NamedTuple):
    """What `SplicedModel.run_with_cache` returns."""

    logits: Tensor
    """Logits [batch, pos, vocab]."""
    cache: dict[str, Tensor]
    """{hook name: activation}, detached; model hooks and SAE points."""


class LogitsAndLoss(NamedTuple):
    """What the forward methods return with `return_type="both"`."""

    logits: Tensor
    loss: Tensor


class ActivationCache(dict):
    """{hook name: activation}; asking for a name that was not cached says how to cache it
    (only the attached SAEs' points and the hooks they sit at are cached unless asked)."""

    def __missing__(self, key: str) -> Tensor:
        raise KeyError(
            f"{key!r} was not cached; run_with_cache caches the attached SAEs' points and the "
            f"hooks they sit at unless names_filter names more (names_filter=[{key!r}, ...] "
            "or a predicate)"
        )


def _sae_list(positional: tuple[Any, ...], saes: SAEsArg) -> list[SAE]:
    """SAEs given positionally (one by one, or as one list) and as `saes=`."""
    out: list[SAE] = []
    for item in (*positional, saes):
        if item is None:
            continue
        if isinstance(item, SAE):
            out.append(item)
        else:
            out.extend(item)
    bad = [type(s).__name__ for s in out if not isinstance(s, SAE)]
    if bad:
        raise TypeError(f"expected SAEs, got {', '.join(bad)}")
    return out


def next_token_loss(logits: Tensor, tokens: Tensor, per_token: bool = False) -> Tensor:
    """Cross-entropy of each next token: [batch, pos - 1] with `per_token`, else the mean."""
    logprobs = logits[:, :-1].float().log_softmax(dim=-1)
    target = tokens[:, 1:].to(logits.device)[..., None]
    loss = -logprobs.gather(-1, target).squeeze(-1)  # [batch, pos - 1]
    return loss if per_token else loss.mean()


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
        #: Hooks applied on every forward pass (`add_hook`, `hooks`), as (name, fn) pairs.
        self._hooks: list[tuple[Any, HookFn]] = []
        for sae in saes:
            self.attach(sae)

    @classmethod
    def from_pretrained(
        cls,
        model_name: str,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        *,
        backend: str = "auto",
        use_error_term: bool = False,
        **load_options: Any,
    ) -> SplicedModel:
        """Load a model by name, as `HookedSAETransformer.from_pretrained` does: "bundled",
        a TransformerLens model name, a Hugging Face folder or Hub id (`load_model` decides
        the backend unless `backend` says; `load_options` go to it)."""
        from saekit.models import load_model

        loaded = load_model(model_name, backend, device, dtype, **load_options)
        return cls(loaded, use_error_term=use_error_term)

    @classmethod
    def from_pretrained_no_processing(
        cls,
        model_name: str,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        *,
        backend: str = "auto",
        **load_options: Any,
    ) -> SplicedModel:
        """`from_pretrained` with TransformerLens's weight processing (LayerNorm folding,
        centring) turned off, so activations are the original model's. Hugging Face and the
        bundled model are never processed, so for them this is `from_pretrained`."""
        from saekit.models.loading import _is_tl_official_name

        tl = backend == "transformer_lens" or (
            backend == "auto" and model_name != "bundled" and _is_tl_official_name(model_name)
        )
        if not tl:
            return cls.from_pretrained(model_name, device, dtype, backend=backend,
                                       **load_options)
        from transformer_lens import HookedTransformer

        from saekit.models import load_model
        from saekit.models.loading import _torch_dtype

        kwargs: dict[str, Any] = {"device": device, **load_options}
        if dtype is not None:
            kwargs["dtype"] = _torch_dtype(dtype)
        model = HookedTransformer.from_pretrained_no_processing(model_name, **kwargs)
        return cls(load_model(model))

    # ----- attaching -------------------------------------------------------------------------

    @property
    def tokenizer(self) -> Any:
        return self.backend.tokenizer

    @property
    def attached(self) -> dict[str, AttachedSAE]:
        """The attached SAEs by name, in the order they were attached."""
        return dict(self._attached)

    @property
    def acts_to_saes(self) -> dict[str, SAE]:
        """{name (the input hook unless named otherwise): SAE} of the attached SAEs."""
        return {name: att.sae for name, att in self._attached.items()}

    def _attachments(
        self,
        sae: SAE,
        hook: str | None,
        hook_out: str | None,
        use_error_term: bool | None,
        name: str | None,
    ) -> list[AttachedSAE]:
        """What attaching `sae` adds: one entry, or one per layer of a CLT."""
        error_term = self.use_error_term if use_error_term is None else use_error_term
        if isinstance(sae, CrossLayerTranscoder):
            if hook is not None or hook_out is not None:
                raise ValueError(
                    "a cross-layer transcoder reads and writes one pair of hooks per layer, "
                    "the ones its metadata records; set them with saekit.saes.clt."
                    "record_hooks(clt, hooks_in, hooks_out) instead of hook=/hook_out="
                )
            hooks_in, hooks_out = replacement_hooks(sae, None)
            self._check_model_hooks(hooks_in + hooks_out)
            return [
                AttachedCLTLayer(h_in, sae, SAESite(h_in, h_out), error_term,
                                 clt_name=name or CLT_NAME, layer=layer)
                for layer, (h_in, h_out) in enumerate(zip(hooks_in, hooks_out, strict=True))
            ]
        # A crosscoder reads several sites (or models) at once and has no one hook to write.
        check_one_site(sae, "SplicedModel attaches SAEs that read one hook, and CLTs")
        site = sae_site(sae, hook, hook_out)
        self._check_model_hooks([site.hook_in, site.hook_out])
        return [AttachedSAE(name or site.hook_in, sae, site, error_term)]

    def _check_model_hooks(self, hooks: Iterable[str]) -> None:
        valid = set(self.backend.hook_names())
        for h in dict.fromkeys(hooks):
            if h not in valid:
                raise unknown_hook_error(h, sorted(valid), f"the model {self.backend!r}")

    def _names_with_groups(self, names: Iterable[str]) -> list[str]:
        """`names` of attached entries, each CLT layer's joined by the rest of its CLT (a
        CLT only ever leaves whole)."""
        wanted = set(names)
        groups = {
            a.clt_name for n, a in self._attached.items()
            if n in wanted and isinstance(a, AttachedCLTLayer)
        }
        return [
            n for n, a in self._attached.items()
            if n in wanted or (isinstance(a, AttachedCLTLayer) and a.clt_name in groups)
        ]

    def _place(self, atts: list[AttachedSAE]) -> list[tuple[str, AttachedSAE | None]]:
        """Put `atts` in, taking out whatever sits under their names (a CLT whole, and a CLT
        of the same name); returns (name, what was there) pairs that undo it in reverse."""
        new = {a.name for a in atts}
        groups = {a.clt_name for a in atts if isinstance(a, AttachedCLTLayer)}
        clashing = [
            n for n, a in self._attached.items()
            if n in new or (isinstance(a, AttachedCLTLayer) and a.clt_name in groups)
        ]
        undo: list[tuple[str, AttachedSAE | None]] = []
        for n in self._names_with_groups(clashing):
            undo.append((n, self._attached.pop(n)))
        for att in atts:
            if att.name not in {n for n, _ in undo}:
                undo.append((att.name, None))
            self._attached[att.name] = att
        return undo

    def _undo(self, undo: list[tuple[str, AttachedSAE | None]]) -> None:
        """Take out what `_place` put in and put back what it took out."""
        for name, _ in undo:
            self._attached.pop(name, None)
        for name, before in undo:
            if before is not None:
                self._attached[name] = before

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
        input hook. An SAE already attached under that name is an error (`add_sae` replaces
        it instead). A cross-layer transcoder attaches at every layer its metadata records
        (see the module docstring); its name (default "clt") names the whole CLT.
        """
        atts = self._attachments(sae, hook, hook_out, use_error_term, name)
        taken = [a.name for a in atts if a.name in self._attached]
        if taken:
            raise ValueError(
                f"an SAE is already attached as {taken[0]!r}; detach it first, pass name=... "
                "or replace it with add_sae"
            )
        group = _clt_name(atts)
        if group is not None and group in self._clt_names():
            raise ValueError(
                f"a cross-layer transcoder is already attached as {group!r}; detach it first "
                "or pass name=..."
            )
        for att in atts:
            self._attached[att.name] = att
        return group if group is not None else atts[0].name

    def _clt_names(self) -> set[str]:
        return {a.clt_name for a in self._attached.values() if isinstance(a, AttachedCLTLayer)}

    def add_sae(self, sae: SAE, use_error_term: bool | None = None) -> str:
        """Attach `sae` at the hook its metadata names, replacing any SAE attached there
        (SAELens's `add_sae`; a CLT at every layer it covers); returns its name. It stays
        until `reset_saes`."""
        atts = self._attachments(sae, None, None, use_error_term, None)
        self._place(atts)
        group = _clt_name(atts)
        return group if group is not None else atts[0].name

    def detach(self, which: str | SAE | None = None) -> None:
        """Detach one SAE (by name or object), or all of them when `which` is None. A CLT
        leaves whole, whether named by its name, one of its layers' names or itself."""
        if which is None:
            self._attached.clear()
            return
        names = [
            n for n, a in self._attached.items()
            if n == which or a.sae is which
            or (isinstance(a, AttachedCLTLayer) and a.clt_name == which)
        ]
        if not names:
            raise ValueError(
                f"no SAE attached as {which if isinstance(which, str) else 'that object'}; "
                f"attached: {list(self._attached) or 'none'}"
            )
        for name in self._names_with_groups(names):
            del self._attached[name]

    def reset_saes(self, act_names: str | Sequence[str] | None = None) -> None:
        """Detach the SAEs attached at `act_names` (one name or several), or all of them
        (SAELens's `reset_saes`)."""
        if act_names is None:
            self._attached.clear()
            return
        for name in [act_names] if isinstance(act_names, str) else act_names:
            self.detach(name)

    @contextmanager
    def saes(
        self,
        *sae_args: SAE | Iterable[SAE],
        saes: SAEsArg = None,
        reset_saes_end: bool = True,
        use_error_term: bool | None = None,
    ) -> Iterator[SplicedModel]:
        """Attach SAEs for the duration of a `with` block: `model.saes(sae1, sae2)` or, as in
        SAELens, `model.saes(saes=[sae1, sae2])`. An SAE already attached at the same hook is
        replaced for the block. On leaving the block (an exception included) the model is as
        it was, unless `reset_saes_end=False` leaves these SAEs attached."""
        undo: list[list[tuple[str, AttachedSAE | None]]] = []
        try:
            for sae in _sae_list(sae_args, saes):
                undo.append(self._place(self._attachments(sae, None, None, use_error_term, None)))
            yield self
        finally:
            if reset_saes_end:
                for step in reversed(undo):
                    self._undo(step)

    def add_hook(self, name: str | Callable[[str], bool], hook: HookFn) -> None:
        """Apply `hook` at `name` (or at every name the predicate accepts) on every forward
        pass until `reset_hooks` (TransformerLens's `add_hook`)."""
        self._hooks.append((name, hook))

    def reset_hooks(self) -> None:
        """Remove the hooks `add_hook` added."""
        self._hooks.clear()

    @contextmanager
    def hooks(
        self, fwd_hooks: HookSpec = (), reset_hooks_end: bool = True
    ) -> Iterator[SplicedModel]:
        """Apply `fwd_hooks` on every forward pass inside a `with` block, `generate`
        included (TransformerLens's `hooks`)."""
        added = list(fwd_hooks.items() if isinstance(fwd_hooks, Mapping) else fwd_hooks)
        self._hooks.extend(added)
        try:
            yield self
        finally:
            if reset_hooks_end:
                for pair in added:
                    self._hooks.remove(pair)

    def hook_names(self) -> list[str]:
        """Model hook names and the attached SAEs' points."""
        points = [a.point(p) for a in self._attached.values() for p in SAE_POINTS]
        return self.backend.hook_names() + points

    # ----- text ------------------------------------------------------------------------------

    def _prepend_bos(self, prepend_bos: bool | None) -> bool | None:
        recorded = (a.sae.cfg.metadata.window_prepend_bos for a in self._attached.values())
        return text_io.framing_for(prepend_bos, recorded)

    def to_tokens(
        self,
        text: str | Sequence[str],
        prepend_bos: bool | None = None,
        padding_side: str | None = "right",
        move_to_device: bool = True,
    ) -> Tensor:
        """Token ids [batch, pos] of a text or a list of texts (shorter rows padded).

        `prepend_bos` None frames text as the attached SAEs were trained (their metadata),
        else as the tokenizer does: BOS first where it has one (`sequence_framing`)."""
        tokens = text_io.to_tokens(
            self.tokenizer, text, self._prepend_bos(prepend_bos), padding_side
        )
        return tokens.to(self.backend.device) if move_to_device else tokens

    def to_string(self, tokens: Tensor | Sequence[int] | Sequence[Sequence[int]]) -> Any:
        """Decoded text: a string for ids [pos], a list of strings for [batch, pos]."""
        return text_io.to_string(self.tokenizer, tokens)

    def to_str_tokens(self, input: ModelInput, prepend_bos: bool | None = None) -> Any:
        """Each token of a text (framed as `to_tokens` does) or of ids, decoded alone."""
        if isinstance(input, str):
            input = self.to_tokens(input, prepend_bos, move_to_device=False)[0]
        return text_io.to_str_tokens(self.tokenizer, input)

    def _tokens(self, input: ModelInput, prepend_bos: bool | None = None) -> Tensor:
        if isinstance(input, Tensor):
            return input if input.ndim == 2 else input.reshape(1, -1)
        return self.to_tokens(input, prepend_bos, move_to_device=False)

    # ----- running ---------------------------------------------------------------------------

    def __call__(
        self,
        input: ModelInput,
        return_type: str | None = "logits",
        *,
        prepend_bos: bool | None = None,
        loss_per_token: bool = False,
        fwd_hooks: HookSpec = (),
    ) -> Any:
        """Logits [batch, pos, vocab] of text or tokens with the SAEs spliced in, or, as
        `return_type` says: "loss" (mean next-token cross-entropy; [batch, pos - 1] with
        `loss_per_token`), "both" (`LogitsAndLoss`) or None (run for the hooks' sake)."""
        return self.run_with_hooks(
            input, fwd_hooks, return_type=return_type, prepend_bos=prepend_bos,
            loss_per_token=loss_per_token,
        )

    forward = __call__

    def run_with_hooks(
        self,
        input: ModelInput,
        fwd_hooks: HookSpec = (),
        *,
        return_type: str | None = "logits",
        prepend_bos: bool | None = None,
        loss_per_token: bool = False,
    ) -> Any:
        """Logits [batch, pos, vocab] with the SAEs spliced in and `fwd_hooks` applied
        (`return_type` as for calling the model).

        `fwd_hooks` maps hook names (model hooks or SAE points) to functions that return a
        replacement or None; a list of (name, fn) pairs works too, as do TransformerLens
        hook functions `fn(activation, hook)` and names given as predicates. Gradients flow
        unless the caller disables them.
        """
        if return_type not in RETURN_TYPES:
            raise ValueError(f"return_type must be one of {RETURN_TYPES}, got {return_type!r}")
        tokens = self._tokens(input, prepend_bos)
        logits = self._forward(tokens, hook_lists(fwd_hooks, self.hook_names()), None)
        if return_type == "logits":
            return logits
        if return_type is None:
            return None
        loss = next_token_loss(logits, tokens, loss_per_token)
        return loss if return_type == "loss" else LogitsAndLoss(logits, loss)

    def run_with_cache(
        self,
        input: ModelInput,
        names_filter: Iterable[str] | Callable[[str], bool] | str | None = None,
        fwd_hooks: HookSpec = (),
        *,
        prepend_bos: bool | None = None,
        remove_batch_dim: bool = False,
    ) -> CacheResult:
        """Logits and a cache of every SAE point (and the model hooks in `names_filter`).

        `names_filter` is a name, a list of names or a predicate; None caches every SAE
        point and the hooks the SAEs sit at. `remove_batch_dim` drops the batch dimension
        of a one-row batch from the cached tensors.
        """
        if names_filter is None:
            wanted = {a.point(p) for a in self._attached.values() for p in SAE_POINTS}
            wanted |= {h for a in self._attached.values() for h in (a.site.hook_in,
                                                                      a.site.hook_out)}
            keep: Callable[[str], bool] = wanted.__contains__
        elif callable(names_filter):
            keep = names_filter
        else:
            names = [names_filter] if isinstance(names_filter, str) else list(names_filter)
            self._check_names(names)
            keep = set(names).__contains__
        tokens = self._tokens(input, prepend_bos)
        cache: dict[str, Tensor] = ActivationCache()
        with torch.no_grad():
            hooks = hook_lists(fwd_hooks, self.hook_names())
            logits = self._forward(tokens, hooks, (cache, keep))
        if remove_batch_dim:
            if tokens.shape[0] != 1:
                raise ValueError(
                    f"remove_batch_dim needs a batch of one, got {tokens.shape[0]} rows"
                )
            for name in list(cache):
                cache[name] = cache[name][0]
        return CacheResult(logits, cache)

    # ----- SAELens's spellings: run with SAEs attached for one call --------------------------

    def run_with_saes(
        self,
        input: ModelInput,
        *,
        saes: SAEsArg = None,
        reset_saes_end: bool = True,
        use_error_term: bool | None = None,
        **forward_options: Any,
    ) -> Any:
        """The forward pass with `saes` attached for this call (and the SAEs already
        attached); `forward_options` as for calling the model (return_type, prepend_bos,
        loss_per_token, fwd_hooks)."""
        with self.saes(saes=saes, reset_saes_end=reset_saes_end, use_error_term=use_error_term):
            return self(input, **forward_options)

    def run_with_cache_with_saes(
        self,
        input: ModelInput,
        *,
        saes: SAEsArg = None,
        reset_saes_end: bool = True,
        use_error_term: bool | None = None,
        return_cache_object: bool = True,
        **cache_options: Any,
    ) -> CacheResult:
        """`run_with_cache` with `saes` attached for this call: logits and a cache holding
        each SAE's points (`<hook>.hook_sae_acts_post`, ...). `return_cache_object` is
        accepted for SAELens code: the cache is a dict either way."""
        with self.saes(saes=saes, reset_saes_end=reset_saes_end, use_error_term=use_error_term):
            return self.run_with_cache(input, **cache_options)

    def run_with_hooks_with_saes(
        self,
        input: ModelInput,
        *,
        saes: SAEsArg = None,
        fwd_hooks: HookSpec = (),
        reset_saes_end: bool = True,
        use_error_term: bool | None = None,
        **forward_options: Any,
    ) -> Any:
        """`run_with_hooks` with `saes` attached for this call."""
        with self.saes(saes=saes, reset_saes_end=reset_saes_end, use_error_term=use_error_term):
            return self.run_with_hooks(input, fwd_hooks, **forward_options)

    def generate(
        self,
        input: ModelInput,
        max_new_tokens: int = 10,
        stop_at_eos: bool = True,
        eos_token_id: int | None = None,
        do_sample: bool = True,
        top_k: int | None = None,
        top_p: float | None = None,
        temperature: float = 1.0,
        prepend_bos: bool | None = None,
        return_type: str = "input",
        *,
        seed: int | None = None,
        fwd_hooks: HookSpec = (),
        verbose: bool = False,
        use_past_kv_cache: bool = True,
    ) -> Any:
        """Continue text or tokens with the attached SAEs spliced in and `fwd_hooks` applied,
        with TransformerLens's arguments and defaults: sampling at temperature 1 unless
        `do_sample=False` (greedy), stopping once every row has produced EOS.

        `return_type` "input" gives what the input was (a string for a string: prompt and
        continuation, without the special tokens framing it), "str" or "tokens" [batch, pos]
        (prompt included); a list of prompts gives a list, one result per prompt. `seed`
        makes sampling repeatable; `verbose` and `use_past_kv_cache` are accepted for
        TransformerLens code (each step re-runs the whole sequence, which is exact with any
        hooks)."""
        if return_type not in ("input", "str", "tokens"):
            raise ValueError(f"return_type must be input, str or tokens, got {return_type!r}")
        options = dict(
            max_new_tokens=max_new_tokens, stop_at_eos=stop_at_eos, eos_token_id=eos_token_id,
            do_sample=do_sample, top_k=top_k, top_p=top_p, temperature=temperature,
            prepend_bos=prepend_bos, return_type=return_type, seed=seed, fwd_hooks=fwd_hooks,
        )
        if not isinstance(input, (str, Tensor)):
            # Prompts of different lengths, one at a time: no padding inside a prompt.
            return [self.generate(prompt, **options) for prompt in input]
        tokens = self._tokens(input, prepend_bos)
        eos = eos_token_id if eos_token_id is not None else getattr(
            self.tokenizer, "eos_token_id", None
        )
        hooks = hook_lists(fwd_hooks, self.hook_names())
        out = sample(
            lambda t: self._forward(t, hooks, None), tokens, max_new_tokens,
            do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
            eos_token_id=eos if stop_at_eos else None, seed=seed,
        )
        wants_text = return_type == "str" or (return_type == "input" and not isinstance(
            input, Tensor
        ))
        if not wants_text:
            return out
        prefix = 0 if isinstance(input, Tensor) else self._framing_length(prepend_bos)
        texts = [self.to_string(row[prefix:]) for row in out]
        return texts[0] if isinstance(input, str) else texts

    def _framing_length(self, prepend_bos: bool | None) -> int:
        from saekit.data.tokens import sequence_framing

        _, prefix, _ = sequence_framing(self.tokenizer, self._prepend_bos(prepend_bos))
        return len(prefix)

    # ----- the forward pass ------------------------------------------------------------------

    def _check_names(self, names: Iterable[str]) -> None:
        valid = set(self.hook_names())
        for name in names:
            if name not in valid:
                raise unknown_hook_error(name, sorted(valid), "this spliced model")

    def _forward(
        self,
        tokens: Tensor,
        hooks: dict[str, list[Callable[[Tensor], Any]]],
        cache: CacheSpec | None,
    ) -> Tensor:
        if self._hooks:  # the lasting hooks run before the call's own
            lasting = hook_lists(self._hooks, self.hook_names())
            hooks = {n: [*lasting.get(n, []), *hooks.get(n, [])] for n in {*lasting, *hooks}}
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
            steps.setdefault(name, []).append(model_hook(name, hooks.get(name, []), cache))
        clt_passes: dict[str, ReplacementPass] = {}
        for att in self._attached.values():
            if isinstance(att, AttachedCLTLayer):
                if att.clt_name not in clt_passes:
                    clt_passes[att.clt_name] = self._clt_pass(att.clt_name, hooks, cache)
                clt_pass = clt_passes[att.clt_name]
                steps.setdefault(att.site.hook_in, []).append(clt_pass.read(att.layer))
                steps.setdefault(att.site.hook_out, []).append(clt_pass.write(att.layer))
                continue
            run = SpliceStep(att, hooks, cache)
            if att.site.hook_in != att.site.hook_out:
                steps.setdefault(att.site.hook_in, []).append(run.read)
            steps.setdefault(att.site.hook_out, []).append(run.write)
        return self.backend.logits(tokens, {h: compose(fns) for h, fns in steps.items()})

    def _clt_pass(
        self,
        clt_name: str,
        hooks: Mapping[str, Sequence[Callable[[Tensor], Any]]],
        cache: CacheSpec | None,
    ) -> ReplacementPass:
        """One forward pass of the CLT attached as `clt_name`, its points run through the
        call's hooks and cache under each layer's name."""
        layers = sorted(
            (a for a in self._attached.values()
             if isinstance(a, AttachedCLTLayer) and a.clt_name == clt_name),
            key=lambda a: a.layer,
        )

        def point(layer: int, point: str, value: Tensor) -> Tensor:
            name = layers[layer].point(point)
            value = apply_hooks(name, value, hooks.get(name, ()))
            if cache is not None and cache[1](name):
                cache[0][name] = value.detach()
            return value

        first = layers[0]
        return ReplacementPass(
            first.sae,  # type: ignore[arg-type]
            [a.site.hook_in for a in layers], [a.site.hook_out for a in layers],
            error_terms=first.use_error_term, point=point,
        )


def _clt_name(atts: Sequence[AttachedSAE]) -> str | None:
    """The CLT's name when `atts` are a CLT's layers, else None."""
    first = atts[0] if atts else None
    return first.clt_name if isinstance(first, AttachedCLTLayer) else None


#: SAELens's name for a model with SAEs spliced in: the same class.
HookedSAETransformer = SplicedModel
