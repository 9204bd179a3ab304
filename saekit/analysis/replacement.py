"""The replacement model: a cross-layer transcoder standing in for every MLP at once.

During one forward pass, each layer's input hook hands its activation to the CLT's encoder
for that layer (the activation itself passes on unchanged), and each layer's MLP-output hook
is replaced by the CLT's output there, built from the latents of that layer and every earlier
one. Because the replaced outputs feed the later layers, the CLT reads inputs that its own
earlier writes shaped, as in Ameisen et al. (2025).

With `error_terms=True` each replaced output becomes recon + (mlp_out - recon).detach(): the
same value as the model's own output (logits unchanged), with gradients flowing through the
CLT's latents, as attribution needs.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from saekit.models.backend import ModelBackend, Replacement
from saekit.saes.clt import CrossLayerTranscoder


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
    latents: list[Tensor | None] = [None] * clt.n_layers

    def read(layer: int) -> Replacement:
        def fn(act: Tensor) -> Tensor:
            latents[layer] = clt.encode_layer(act.to(clt.device), layer)
            return act

        return fn

    def write(layer: int) -> Replacement:
        def fn(act: Tensor) -> Tensor:
            missing = [i for i in range(layer + 1) if latents[i] is None]
            if missing:
                raise ValueError(
                    f"layer {layer}'s output hook {hooks_out[layer]!r} ran before the input "
                    f"hooks of layer(s) {missing}; each input hook must come before its "
                    "layer's output hook in the forward pass"
                )
            recon = clt.decode_layer(latents, layer).to(act.device, act.dtype)  # type: ignore[arg-type]
            if error_terms:
                recon = recon + (act - recon).detach()
            if layer == clt.n_layers - 1:
                latents[:] = [None] * clt.n_layers  # the next forward pass starts afresh
            if keep is None:
                return recon
            return torch.where(keep.to(act.device)[..., None], recon, act)

        return fn

    out: dict[str, Replacement] = {}
    for layer in range(clt.n_layers):
        out[hooks_in[layer]] = read(layer)
        out[hooks_out[layer]] = write(layer)
    return out


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
