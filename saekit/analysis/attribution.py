"""Attribution of a scalar target (such as a logit difference) to latents: gradient x activation.

For latent i at position p, attribution = f_ip * d(target)/d(f_ip): the first-order change in
the target when the latent is scaled from 0 to its value. Run it with `use_error_term=True`
so the target is the model's own (the SAE's error is carried along unchanged).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from saekit.analysis.splice import HookSpec, SplicedModel
from saekit.analysis.splice_step import hook_lists

#: A target: logits [batch, pos, vocab] -> a scalar tensor.
Metric = Callable[[Tensor], Tensor]


class LatentAttribution(NamedTuple):
    """Per attached SAE: latents, their gradients and gradient x activation."""

    activations: Tensor
    """Latents [batch, pos, d_sae]."""
    gradients: Tensor
    """d(target)/d(latent) [batch, pos, d_sae]."""
    attribution: Tensor
    """activations * gradients [batch, pos, d_sae]."""


class AttributionResult(NamedTuple):
    """What `attribute` returns."""

    target: float
    """The target's value on the (unedited) run."""
    saes: dict[str, LatentAttribution]
    """By attached SAE name."""


def logit_diff(token: int, other: int | None = None, position: int = -1) -> Metric:
    """Target: logit[token] - logit[other] (or just logit[token]) at `position`, summed over
    the batch."""

    def metric(logits: Tensor) -> Tensor:
        at = logits[:, position]  # [batch, vocab]
        value = at[:, token]
        if other is not None:
            value = value - at[:, other]
        return value.sum()

    return metric


def attribute(
    model: SplicedModel, tokens: Tensor, metric: Metric, fwd_hooks: HookSpec = ()
) -> AttributionResult:
    """Gradient x activation of `metric(logits)` for every latent of every attached SAE."""
    if not model.attached:
        raise ValueError("attach at least one SAE to the model before attributing to latents")
    latents: dict[str, Tensor] = {}
    hooks = hook_lists(fwd_hooks, model.hook_names())

    def grab(name: str):  # noqa: ANN202 - a hook function
        def fn(acts: Tensor) -> Tensor:
            if not acts.requires_grad:  # a frozen model: make the latents the leaves
                acts = acts.detach().requires_grad_(True)
            latents[name] = acts
            return acts

        return fn

    for name, att in model.attached.items():
        # Last, so the gradient is taken at the latents other hooks have edited.
        hooks.setdefault(att.point("hook_sae_acts_post"), []).append(grab(name))
    with torch.enable_grad():
        logits = model._forward(tokens, hooks, None)
        target = metric(logits)
        if target.ndim != 0:
            raise ValueError(f"the metric must return a scalar, got shape {tuple(target.shape)}")
        names = list(latents)
        grads = torch.autograd.grad(target, [latents[n] for n in names], allow_unused=True)
    result = {}
    for name, grad in zip(names, grads, strict=True):
        acts = latents[name].detach()
        grad = torch.zeros_like(acts) if grad is None else grad.detach()
        result[name] = LatentAttribution(acts, grad, acts * grad)
    return AttributionResult(float(target.detach()), result)
