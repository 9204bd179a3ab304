"""Top-k SAEs: per token (topk), per batch (batchtopk) and nested (matryoshka_batchtopk)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from saekit.config import SAEConfig
from saekit.kernels.sparse_topk import (
    SelectedLatents,
    batch_topk_pairs,
    dense_decode,
    scatter_latents,
    sparse_decode,
    topk_pairs,
)
from saekit.saes.base import (
    SAE,
    DeadLatentRemedy,
    LossSettings,
    squared_error,
    unexplained_share,
)
from saekit.saes.registry import register_architecture

#: Weight of the newest batch's smallest kept activation in the batchtopk threshold average.
THRESHOLD_EMA_RATE = 0.01


def keep_top_k(values: Tensor, k: int) -> Tensor:
    """Zero all but the k largest entries of the last dimension."""
    top = values.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(values).scatter_(-1, top.indices, top.values)


class TopKFamily(SAE):
    """What topk-style SAEs share: a required k, training through the sparse top-k kernel,
    and the AuxK loss for dead latents."""

    #: Unit-norm decoder rows with the encoder their transpose (Gao et al. 2024). With a
    #: small encoder (norm 0.1), the latents that fire first outgrow the rest within a few
    #: Adam steps and the others never win the top-k again: on the bundled demo, 42% of
    #: latents were dead on held-out text after 307k tokens, against 0.7% with this start.
    decoder_init_norm: ClassVar[float] = 1.0
    sparsity_control: ClassVar[str] = "k"
    unit_norm_decoder: ClassVar[bool] = True
    loss_coefficients: ClassVar[dict[str, str | None]] = {"aux_k": "aux_k_coefficient"}
    dead_latent_remedy: ClassVar[DeadLatentRemedy] = DeadLatentRemedy(losses=("aux_k",))
    #: Latents per token when neither k nor a target L0 is given.
    default_k: ClassVar[int] = 64

    @classmethod
    def config_defaults(
        cls, d_in: int, d_sae: int, target_l0: float | None = None
    ) -> dict[str, Any]:
        return {"k": int(target_l0) if target_l0 else min(cls.default_k, d_sae)}

    def validate_config(self, cfg: SAEConfig) -> None:
        super().validate_config(cfg)
        if cfg.k is None:
            raise ValueError(f"architecture {self.architecture!r} needs k (latents per token)")

    def select(self, scores: Tensor) -> tuple[Tensor, Tensor]:
        """(token, latent) pairs kept during training, from the pre-activations (ReLU'd or
        not: the pairs with positive scores are the same, and the rest have value 0)."""
        raise NotImplementedError

    def _sparse_path(self, settings: LossSettings) -> bool:
        return settings.use_sparse_kernel and not self.cfg.rescale_acts_by_decoder_norm

    def training_latents(self, hidden_pre: Tensor, settings: LossSettings) -> Tensor:
        scores = torch.relu(hidden_pre)
        token, latent = self.select(scores.detach())
        return scatter_latents(*scores.shape, token, latent, scores[token, latent])

    def training_pass(
        self, x: Tensor, centred: Tensor, settings: LossSettings, last_l0: float | None = None
    ) -> tuple[Tensor, Tensor | SelectedLatents, Tensor]:
        if not self._sparse_path(settings):
            return super().training_pass(x, centred, settings, last_l0)
        # Selecting on the pre-activations themselves saves a ReLU pass over [batch, d_sae]:
        # ReLU keeps the order of positive scores, and a pair picked below zero has value
        # ReLU(h) = 0, as a zero picked after the ReLU would.
        return self.sparse_training_pass(centred, self.select)

    @torch.no_grad()
    def competition_bar(self, centred: Tensor) -> Tensor:
        # The smallest kept score of each token (ReLU'd: a latent must also be positive).
        assert self.cfg.k is not None
        scores = torch.relu(self.pre_activations(centred))  # [batch, d_sae]
        return self.kept_bar(scores, self.cfg.k)

    @staticmethod
    def kept_bar(scores: Tensor, k: int) -> Tensor:
        """[batch, 1]: the k-th largest score of each row."""
        return scores.topk(min(k, scores.shape[1]), dim=1).values[:, -1:]

    def dead_latent_losses(
        self,
        centred: Tensor,
        hidden_pre: Tensor,
        residual: Tensor,
        dead_mask: Tensor,
        settings: LossSettings,
    ) -> dict[str, Tensor]:
        # AuxK (Gao et al. 2024): the dead latents alone try to explain what the live ones
        # missed, which gives them gradient again.
        dead = dead_mask.nonzero().squeeze(1)
        k_aux = min(settings.k_aux or self.cfg.d_in // 2, dead.numel())
        # Only the dead latents' columns compete: a search over a fraction of the width.
        top = hidden_pre.detach().index_select(1, dead).topk(k_aux, dim=1, sorted=False)
        # A row with fewer than k_aux firing dead latents keeps only those.
        firing = top.values > 0
        rows = torch.arange(hidden_pre.shape[0], device=hidden_pre.device)
        token = rows[:, None].expand_as(firing)[firing]
        latent = dead[top.indices[firing]]
        no_bias = torch.zeros_like(self.b_dec)  # b_dec is already in the main reconstruction
        decode = sparse_decode if self._sparse_path(settings) else dense_decode
        aux_recon, _ = decode(
            centred, self.W_enc, self.b_enc, self.W_dec, no_bias, hidden_pre, token, latent
        )
        aux = unexplained_share(aux_recon, residual.detach(), settings.replica_mean)
        return {"aux_k": settings.aux_k_coefficient * aux}


@register_architecture("topk")
class TopKSAE(TopKFamily):
    def pre_activations(self, x: Tensor, centre: Tensor | None = None) -> Tensor:
        hidden_pre = super().pre_activations(x, centre)
        if self.cfg.rescale_acts_by_decoder_norm:
            hidden_pre = hidden_pre * self.decoder_norms()
        return hidden_pre

    def activation(self, hidden_pre: Tensor) -> Tensor:
        assert self.cfg.k is not None
        return keep_top_k(torch.relu(hidden_pre), self.cfg.k)

    def select(self, scores: Tensor) -> tuple[Tensor, Tensor]:
        assert self.cfg.k is not None
        return topk_pairs(scores, self.cfg.k)

    def decode(self, latents: Tensor) -> Tensor:
        if self.cfg.rescale_acts_by_decoder_norm:
            latents = latents / self.decoder_norms()
        return super().decode(latents)

    def reconstruct(self, x: Tensor, latents: Tensor) -> Tensor:
        if self.cfg.rescale_acts_by_decoder_norm:
            latents = latents / self.decoder_norms()
        return super().reconstruct(x, latents)

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        norms = self.decoder_norms()
        # Scaling every latent by the same factor keeps the ranking, and rescale mode ranks by
        # h * ||W_dec[i]|| already; any other fold would change which latents win the top-k.
        uniform = torch.allclose(norms, norms.mean().expand_as(norms), rtol=1e-4)
        if not (uniform or self.cfg.rescale_acts_by_decoder_norm):
            raise ValueError(
                "folding decoder norms into a topk SAE would change which latents win the "
                "top-k; train with unit-norm decoder rows or set rescale_acts_by_decoder_norm"
            )
        norms = norms.clamp_min(1e-12)
        self.W_dec /= norms[:, None]
        self.W_enc *= norms
        self.b_enc *= norms


@register_architecture("batchtopk")
class BatchTopKSAE(TopKFamily):
    """Training picks the top k*B activations of a batch of B tokens; inference uses a global
    threshold (a running average of the smallest kept activation), so the SAE is published as
    a jumprelu SAE."""

    #: AuxK, and lifting quiet latents over the batch's bar (63% -> 39% dead on held-out
    #: text at k 32 on the bundled model; for per-token top-k it did not help).
    dead_latent_remedy: ClassVar[DeadLatentRemedy] = DeadLatentRemedy(
        losses=("aux_k",), lift_quiet=True
    )

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__(cfg)
        # Learned by a running average, not by gradient, hence a buffer.
        threshold = torch.zeros(cfg.d_sae, device=self.device, dtype=self.dtype)
        self.register_buffer("threshold", threshold)

    def activation(self, hidden_pre: Tensor) -> Tensor:
        return torch.relu(hidden_pre) * (hidden_pre > self.threshold)

    def select(self, scores: Tensor) -> tuple[Tensor, Tensor]:
        assert self.cfg.k is not None
        token, latent = batch_topk_pairs(scores, self.cfg.k)
        if self.training:
            self._update_threshold(scores[token, latent])
        return token, latent

    @torch.no_grad()
    def _update_threshold(self, kept: Tensor) -> None:
        kept = kept[kept > 0]
        if kept.numel() == 0:
            return
        smallest = kept.min().to(self.threshold.dtype)
        if bool((self.threshold == 0).all()):
            self.threshold.fill_(smallest)
        else:
            self.threshold.lerp_(smallest.expand_as(self.threshold), THRESHOLD_EMA_RATE)

    def per_latent_encoder_scales(self) -> tuple[str, ...]:
        return ("b_enc", "threshold")

    @staticmethod
    def kept_bar(scores: Tensor, k: int) -> Tensor:
        # One bar for the whole batch: its (k * batch)-th largest score.
        keep = min(k * scores.shape[0], scores.numel())
        bar = scores.flatten().topk(keep, sorted=False).values.min()
        return bar.expand(scores.shape[0], 1)

    def published(self) -> SAE:
        from saekit.saes.jumprelu import JumpReLUSAE

        cfg = self.cfg.replace(architecture="jumprelu", k=None, matryoshka_widths=None)
        return JumpReLUSAE.from_tensors(cfg, dict(self.state_dict()))


@register_architecture("matryoshka_batchtopk")
class MatryoshkaBatchTopKSAE(BatchTopKSAE):
    """BatchTopK whose nested prefixes of latents must each reconstruct the input alone."""

    loss_coefficients: ClassVar[dict[str, str | None]] = {
        **BatchTopKSAE.loss_coefficients, "matryoshka_mse": None,
    }

    @classmethod
    def config_defaults(
        cls, d_in: int, d_sae: int, target_l0: float | None = None
    ) -> dict[str, Any]:
        widths = sorted({max(1, d_sae // 4), max(1, d_sae // 2), d_sae})
        return {**super().config_defaults(d_in, d_sae, target_l0), "matryoshka_widths": widths}

    def validate_config(self, cfg: SAEConfig) -> None:
        super().validate_config(cfg)
        if cfg.matryoshka_widths is None:
            raise ValueError(
                "matryoshka_batchtopk needs matryoshka_widths, e.g. [d_sae // 4, d_sae // 2, d_sae]"
            )

    def sparsity_losses(
        self, x: Tensor, hidden_pre: Tensor, latents: Tensor | SelectedLatents,
        settings: LossSettings,
    ) -> dict[str, Tensor]:
        assert self.cfg.matryoshka_widths is not None
        if isinstance(latents, SelectedLatents):
            latents = latents.dense()
        inner = [
            squared_error(latents[:, :w] @ self.W_dec[:w] + self.b_dec, x)
            for w in self.cfg.matryoshka_widths[:-1]
        ]
        if not inner:
            return {}
        return {"matryoshka_mse": torch.stack(inner).sum()}
