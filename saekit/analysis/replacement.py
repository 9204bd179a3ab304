"""The replacement model: a cross-layer transcoder standing in for every MLP at once.

During one forward pass, each layer's input hook hands its activation to the CLT's encoder
for that layer (the activation itself passes on unchanged), and each layer's MLP-output hook
is replaced by the CLT's output there, built from the latents of that layer and every earlier
one (plus the layer's skip path, for a CLT with a skip connection). Because the replaced
outputs feed the later layers, the CLT reads inputs that its own earlier writes shaped, as in
Ameisen et al. (2025).

With `error_terms=True` each replaced output becomes mlp_out + (recon - clean recon): exactly
the model's own output while the latents are untouched (logits unchanged), with gradients
flowing through the CLT's latents, as attribution needs; latents edited on the way (see
`ReplacementPass`'s points) change the output by exactly what they change the CLT's.

`ReplacementPass` is that forward pass, one object per pass; `SplicedModel` runs it with its
hook points (`<layer's input hook>.hook_sae_acts_post`, ...) and `clt_replacements` without.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from saekit.models.backend import ModelBackend, Replacement
from saekit.saes.clt import CrossLayerTranscoder

#: A point along one layer's computation, given (layer, point name, value): returns the value
#: to go on with (edited or not). The names are `SplicedModel`'s: hook_sae_input,
#: hook_sae_acts_pre, hook_sae_acts_post, hook_sae_recons, hook_sae_error, hook_sae_output.
PointFn = Callable[[int, str, Tensor], Tensor]


def _no_point(layer: int, point: str, value: Tensor) -> Tensor:
    return value


def replacement_hooks(
    clt: CrossLayerTranscoder, hooks: tuple[Sequence[str], Sequence[str]] | None
) -> tuple[list[str], list[str]]:
    """(input hooks, output hooks) of the CLT's layers: `hooks` if given, else its
    metadata's; each layer's two must differ from every other hook."""
    if hooks is not None:
        hooks_in, hooks_out = list(hooks[0]), list(hooks[1])
    else:
        from saekit.saes.clt import clt_hooks

        hooks_in, hooks_out = clt_hooks(clt)
    if len(hooks_in) != clt.n_layers or len(hooks_out) != clt.n_layers:
        raise ValueError(
            f"a CLT over {clt.n_layers} layers needs {clt.n_layers} input and output hooks, "
            f"got {len(hooks_in)} and {len(hooks_out)}"
        )
    shared = set(hooks_in) & set(hooks_out)
    if shared or len(set(hooks_in + hooks_out)) != 2 * clt.n_layers:
        raise ValueError(
            f"every layer needs its own input and output hook; {sorted(shared) or 'some'} "
            "repeat"
        )
    return hooks_in, hooks_out


class ReplacementPass:
    """The CLT in place of every MLP for forward passes of a model: `read(layer)` goes at
    the layer's input hook, `write(layer)` at its output hook (`replacements()` gives both
    for every layer). After the last layer's write the pass starts afresh.

    Args:
        clt: the cross-layer transcoder.
        hooks_in, hooks_out: the input and output hook of each layer, in layer order.
        error_terms: keep the model's outputs' values, adding the CLT's error to its output.
        keep: [batch, pos] bool, the positions replaced; elsewhere every output is the
            model's own. None: every position.
        point: called at each point of each layer (see `PointFn`), to read or edit it.
    """

    def __init__(
        self,
        clt: CrossLayerTranscoder,
        hooks_in: Sequence[str],
        hooks_out: Sequence[str],
        *,
        error_terms: bool = False,
        keep: Tensor | None = None,
        point: PointFn | None = None,
    ) -> None:
        self.clt = clt
        self.hooks_in, self.hooks_out = list(hooks_in), list(hooks_out)
        self.error_terms = error_terms
        self.keep = keep
        self.point = point or _no_point
        self._reset()

    def _reset(self) -> None:
        n = self.clt.n_layers
        #: Per layer: its input (for the skip path), its latents as edited by the points, and
        #: as the encoder gave them (for the error term).
        self.inputs: list[Tensor | None] = [None] * n
        self.latents: list[Tensor | None] = [None] * n
        self.clean: list[Tensor | None] = [None] * n

    def read(self, layer: int) -> Replacement:
        """The function for layer `layer`'s input hook: encodes, passes the activation on."""

        def fn(act: Tensor) -> Tensor:
            clt = self.clt
            x = self.point(layer, "hook_sae_input", act.to(clt.device))
            hidden_pre, clean = clt.encode_layer_parts(x, layer)
            self.point(layer, "hook_sae_acts_pre", hidden_pre)
            self.inputs[layer], self.clean[layer] = x, clean
            self.latents[layer] = self.point(layer, "hook_sae_acts_post", clean)
            return act

        return fn

    def write(self, layer: int) -> Replacement:
        """The function for layer `layer`'s output hook: returns the CLT's output there."""

        def fn(act: Tensor) -> Tensor:
            missing = [i for i in range(layer + 1) if self.latents[i] is None]
            if missing:
                raise ValueError(
                    f"layer {layer}'s output hook {self.hooks_out[layer]!r} ran before the "
                    f"input hooks of layer(s) {missing}; each input hook must come before its "
                    "layer's output hook in the forward pass"
                )
            recon_raw = self._output(self.latents, layer)
            recon = self.point(layer, "hook_sae_recons", recon_raw)
            if self.error_terms:
                out = self._with_error(act, layer, recon, recon_raw)
            else:
                out = recon
            out = self.point(layer, "hook_sae_output", out).to(act.device, act.dtype)
            if layer == self.clt.n_layers - 1:
                self._reset()  # the next forward pass starts afresh
            if self.keep is None:
                return out
            return torch.where(self.keep.to(act.device)[..., None], out, act)

        return fn

    def _output(self, latents: list[Tensor | None], layer: int) -> Tensor:
        """The CLT's whole output at `layer` from the given latents of layers 0..layer."""
        clt = self.clt
        out = clt.decode_layer(latents, layer)  # type: ignore[arg-type]
        if clt.has_skip:
            x = self.inputs[layer]
            assert x is not None
            out = out + clt.layer_skip(x, layer)
        return out

    def _with_error(self, act: Tensor, layer: int, recon: Tensor, recon_raw: Tensor) -> Tensor:
        """activation + (reconstruction - clean reconstruction): exactly the activation when
        nothing was edited; gradients reach the latents through `recon`."""
        unedited = all(self.latents[i] is self.clean[i] for i in range(layer + 1))
        with torch.no_grad():
            recon_clean = recon_raw.detach() if unedited else self._output(self.clean, layer)
        target = act.detach().to(recon.device, recon.dtype)
        clean_error = target - recon_clean
        error = self.point(layer, "hook_sae_error", clean_error)
        if error is clean_error:
            return target + (recon - recon_clean)
        return recon + error

    def replacements(self) -> dict[str, Replacement]:
        """`{hook: function}` for `ModelBackend.logits`: every layer's read and write."""
        out: dict[str, Replacement] = {}
        for layer in range(self.clt.n_layers):
            out[self.hooks_in[layer]] = self.read(layer)
            out[self.hooks_out[layer]] = self.write(layer)
        return out


def clt_replacements(
    clt: CrossLayerTranscoder,
    *,
    error_terms: bool = False,
    keep: Tensor | None = None,
    hooks: tuple[Sequence[str], Sequence[str]] | None = None,
) -> dict[str, Replacement]:
    """`{hook: function}` for `ModelBackend.logits` that run the model with the CLT in place
    of every MLP (see the module docstring).

    Args:
        clt: the cross-layer transcoder.
        error_terms: keep the model's outputs' values, adding the CLT's error to its output.
        keep: [batch, pos] bool, the positions replaced; elsewhere (special tokens, which
            evaluations leave out) every output is the model's own. None: every position.
        hooks: (input hooks, output hooks), one per layer; default: the CLT's metadata.
    """
    hooks_in, hooks_out = replacement_hooks(clt, hooks)
    run = ReplacementPass(clt, hooks_in, hooks_out, error_terms=error_terms, keep=keep)
    return run.replacements()


def replacement_logits(
    clt: CrossLayerTranscoder,
    model: ModelBackend,
    tokens: Tensor,
    *,
    error_terms: bool = False,
    keep: Tensor | None = None,
    hooks: tuple[Sequence[str], Sequence[str]] | None = None,
) -> Tensor:
    """Logits [batch, pos, vocab] of the replacement model (`clt_replacements`) on tokens
    [batch, pos]."""
    return model.logits(
        tokens, clt_replacements(clt, error_terms=error_terms, keep=keep, hooks=hooks)
    )
