"""Transcoders: read the activation at one hook, reconstruct the activation at another.

The math is the underlying SAE's; only the output width (d_out) and, for the skip variant, a
linear path from input to output (W_skip [d_out, d_in]) differ.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from saekit.config import SAEConfig
from saekit.saes.base import SAE
from saekit.saes.jumprelu import JumpReLUSAE
from saekit.saes.registry import register_architecture
from saekit.saes.standard import StandardSAE


class TranscoderMixin(SAE):
    is_transcoder = True

    @classmethod
    def config_defaults(
        cls, d_in: int, d_sae: int, target_l0: float | None = None
    ) -> dict[str, Any]:
        # b_dec lives in the output space, so it cannot be subtracted from the input.
        defaults = super().config_defaults(d_in, d_sae, target_l0)
        return {**defaults, "apply_b_dec_to_input": False}

    def validate_config(self, cfg: SAEConfig) -> None:
        super().validate_config(cfg)
        if cfg.apply_b_dec_to_input and cfg.output_width != cfg.d_in:
            raise ValueError(
                f"apply_b_dec_to_input needs b_dec [{cfg.output_width}] to match the input "
                f"width d_in={cfg.d_in}; set apply_b_dec_to_input=False for this transcoder"
            )


@register_architecture("transcoder")
class Transcoder(TranscoderMixin, StandardSAE):
    pass


@register_architecture("jumprelu_transcoder")
class JumpReLUTranscoder(TranscoderMixin, JumpReLUSAE):
    pass


class SkipPathMixin(TranscoderMixin):
    """Adds a linear path from input to output: out = decode(encode(x)) + x @ W_skip.T."""

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        return {**super().parameter_shapes(), "W_skip": (self.cfg.output_width, self.cfg.d_in)}

    def skip(self, x: Tensor) -> Tensor:
        return x.to(self.dtype) @ self.W_skip.T

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x)) + self.skip(x)

    def reconstruct(self, x: Tensor, latents: Tensor) -> Tensor:
        return super().reconstruct(x, latents) + self.skip(x)


@register_architecture("skip_transcoder")
class SkipTranscoder(SkipPathMixin, Transcoder):
    pass


@register_architecture("jumprelu_skip_transcoder")
class JumpReLUSkipTranscoder(SkipPathMixin, JumpReLUTranscoder):
    pass
