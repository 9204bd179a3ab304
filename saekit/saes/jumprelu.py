"""JumpReLU SAE (Rajamanoharan et al. 2024): a learned per-latent threshold, trained through
straight-through estimators with a rectangular kernel of width `bandwidth`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from saekit.saes.base import SAE, LossSettings
from saekit.saes.registry import register_architecture


def _kernel(hidden_pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
    """rect((h - theta) / eps) / eps: the pseudo-derivative's window."""
    inside = ((hidden_pre - threshold) / bandwidth).abs() < 0.5
    return inside.to(hidden_pre.dtype) / bandwidth


def _sum_to_threshold(grad: Tensor) -> Tensor:
    return grad.reshape(-1, grad.shape[-1]).sum(dim=0)  # [d_sae]


class JumpReLUFunction(torch.autograd.Function):
    """f = h * 1[h > theta]; d f / d theta ~ -(theta / eps) rect((h - theta) / eps)."""

    @staticmethod
    def forward(ctx: Any, hidden_pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(hidden_pre, threshold)
        ctx.bandwidth = bandwidth
        return hidden_pre * (hidden_pre > threshold)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, Tensor, None]:
        hidden_pre, threshold = ctx.saved_tensors
        grad_h = grad_out * (hidden_pre > threshold)
        pseudo = -threshold * _kernel(hidden_pre, threshold, ctx.bandwidth)
        return grad_h, _sum_to_threshold(grad_out * pseudo), None


class StepFunction(torch.autograd.Function):
    """H(h - theta); d H / d theta ~ -(1 / eps) rect((h - theta) / eps); no gradient to h."""

    @staticmethod
    def forward(ctx: Any, hidden_pre: Tensor, threshold: Tensor, bandwidth: float) -> Tensor:
        ctx.save_for_backward(hidden_pre, threshold)
        ctx.bandwidth = bandwidth
        return (hidden_pre > threshold).to(hidden_pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[None, Tensor, None]:
        hidden_pre, threshold = ctx.saved_tensors
        pseudo = -_kernel(hidden_pre, threshold, ctx.bandwidth)
        return None, _sum_to_threshold(grad_out * pseudo), None


@register_architecture("jumprelu")
class JumpReLUSAE(SAE):
    #: Starting threshold for every latent (the value sae-lens also uses).
    initial_threshold = 0.001

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        return {**super().parameter_shapes(), "threshold": (self.cfg.d_sae,)}

    @torch.no_grad()
    def initialize_weights(self) -> None:
        super().initialize_weights()
        self.threshold.fill_(self.initial_threshold)

    def activation(self, hidden_pre: Tensor) -> Tensor:
        return torch.relu(hidden_pre) * (hidden_pre > self.threshold)

    def training_latents(self, hidden_pre: Tensor, settings: LossSettings) -> Tensor:
        bandwidth = settings.jumprelu_bandwidth
        return JumpReLUFunction.apply(torch.relu(hidden_pre), self.threshold, bandwidth)

    def sparsity_losses(
        self, x: Tensor, hidden_pre: Tensor, latents: Tensor, settings: LossSettings
    ) -> dict[str, Tensor]:
        if settings.jumprelu_sparsity == "tanh":
            scaled = settings.tanh_scale * latents * self.decoder_norms()
            penalty = torch.tanh(scaled).sum(dim=-1).mean()
        else:
            fired = StepFunction.apply(hidden_pre, self.threshold, settings.jumprelu_bandwidth)
            penalty = fired.sum(dim=-1).mean()
        return {"l0": settings.sparsity_coefficient * penalty}

    def per_latent_encoder_scales(self) -> tuple[str, ...]:
        return ("b_enc", "threshold")

    @torch.no_grad()
    def post_optimizer_step(self) -> None:
        self.threshold.clamp_(min=0.0)
