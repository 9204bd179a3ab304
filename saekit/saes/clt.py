"""Cross-layer transcoders (CLTs; Ameisen et al. 2025, "Circuit Tracing").

A CLT spans `n_layers` layers. Layer i has an encoder reading that layer's MLP input (or
residual stream) x_i [d_in] into d_sae latents f_i, and one decoder into the MLP output of
layer i and of every later layer; layer j's output is rebuilt from the latents of layers 0..j:

    y^_j = sum_{i <= j} f_i @ W_dec_i[:, j - i] + b_dec[j]

Tensors (row-vector convention, as every saekit SAE): `W_enc` [n_layers, d_in, d_sae],
`b_enc` [n_layers, d_sae], `W_dec_<i>` [d_sae, n_layers - i, d_out] (layer i's decoders into
layers i, i + 1, ...: a decoder into an earlier layer has no slot to live in), `b_dec`
[n_layers, d_out], and `threshold` [n_layers, d_sae] for jumprelu. Inputs and targets are
stacked per layer: x [..., n_layers, d_in], y [..., n_layers, d_out].

With `cfg.skip_connection` each layer also has a linear path from its own input to its
output, `W_skip` [n_layers, d_out, d_in] (each layer's as a skip transcoder's W_skip):

    y^_j = sum_{i <= j} f_i @ W_dec_i[:, j - i] + b_dec[j] + x_j @ W_skip[j].T

as Gemma Scope 2's affine CLTs and circuit-tracer compute it. It starts at zero and trains
with the rest; `decode` gives the decoders' part alone, `reconstruct(x, latents)` and the
forward pass the whole output.

The latents' rule is `cfg.activation_fn`: relu (L1 penalty weighed by each latent's joint
decoder norm), jumprelu (L0 through straight-through thresholds), topk (k per token and
layer) or batchtopk (the top k * batch of each layer; published as jumprelu with the learned
per-layer threshold). For the trainer a CLT holds n_layers * d_sae latents (`latent_groups`),
flattened layer-major, and its L0 is latents per token per layer, averaged over layers.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from saekit.config import SAEConfig, dtype_name
from saekit.kernels.jumprelu import JumpReLUFunction, StepFunction, TanhPenalty
from saekit.saes.base import (
    SAE,
    DeadLatentRemedy,
    LossSettings,
    TrainingOutput,
    unexplained_share,
)
from saekit.saes.registry import register_architecture
from saekit.saes.topk import THRESHOLD_EMA_RATE, keep_top_k

#: The rules a CLT's latents may follow.
CLT_ACTIVATIONS = ("relu", "jumprelu", "topk", "batchtopk")
_TOPK_LIKE = ("topk", "batchtopk")
#: Metadata keys holding the input and output hook of every layer, in order.
HOOKS_IN_KEY = "hook_names"
HOOKS_OUT_KEY = "hook_names_out"


def stacked_squared_error(recon: Tensor, target: Tensor) -> Tensor:
    """Mean over tokens of the squared error summed over layers and features."""
    return (recon - target).pow(2).sum(dim=(-1, -2)).mean()


class MultiSiteLatents(SAE):
    """What SAEs reading several sites at once share about their latents: a latent's encoder
    product is one column of `encoder_products` (its weights span the sites), and dead latents
    are lifted and trained by AuxK, not resampled."""

    #: How the architecture is called in messages.
    kind: ClassVar[str] = "multi-site SAEs"

    def latent_products(self, centred: Tensor, latents: Tensor) -> Tensor:
        return self.encoder_products(centred).index_select(1, latents)

    def resample_latents(self, *args: Any, **kwargs: Any) -> None:
        raise ValueError(
            f"resampling dead latents is not implemented for {self.kind}; turn "
            "resample_dead_latents off (lifting quiet latents and AuxK are available)"
        )


@register_architecture("clt")
class CrossLayerTranscoder(MultiSiteLatents):
    """A cross-layer transcoder: `SAE.create("clt", d_in, d_sae, n_layers=4,
    activation_fn="topk", k=32)` (d_sae latents per layer; see the module docstring)."""

    kind = "cross-layer transcoders"
    is_transcoder = True
    multi_site = True
    #: Unit norm would be the joint norm over a latent's decoders, which the trainer's
    #: row-wise constraint cannot express; top-k CLTs train without it.
    unit_norm_decoder = False
    # The class declares what its default rule (topk) needs, and every loss term any rule
    # has; each CLT sets its own rule's answers when it is built (`_declare_rule`).
    sparsity_control: ClassVar[str] = "k"
    loss_coefficients: ClassVar[dict[str, str | None]] = {
        "aux_k": "aux_k_coefficient", "l1": "sparsity_coefficient",
        "l0": "sparsity_coefficient", "pre_act": "threshold_pre_act_coefficient",
    }
    dead_latent_remedy: ClassVar[DeadLatentRemedy] = DeadLatentRemedy(losses=("aux_k",))
    optional_skip_connection: ClassVar[bool] = True

    def __init__(self, cfg: SAEConfig) -> None:
        if cfg.activation_fn not in _TOPK_LIKE and cfg.k is not None:
            # A default k from `config_defaults` means nothing to a thresholded CLT.
            cfg = cfg.replace(k=None)
        super().__init__(cfg)
        self._declare_rule()
        if cfg.activation_fn == "batchtopk":
            # Learned by a running average, not by gradient, hence a buffer.
            shape = (self.n_layers, cfg.d_sae)
            self.register_buffer(
                "threshold", torch.zeros(shape, device=self.device, dtype=self.dtype)
            )

    # ----- what the trainer asks ------------------------------------------------------------

    def _declare_rule(self) -> None:
        """This CLT's answers to the trainer, by its rule (instance attributes)."""
        rule = self.cfg.activation_fn
        self.sparsity_control = "k" if rule in _TOPK_LIKE else "coefficient"  # type: ignore[misc]
        self.penalty_counts_latents = rule == "jumprelu"  # type: ignore[misc]
        self.loss_coefficients = {  # type: ignore[misc]
            "relu": {"l1": "sparsity_coefficient"},
            "jumprelu": {"l0": "sparsity_coefficient", "pre_act": "threshold_pre_act_coefficient"},
        }.get(rule, {"aux_k": "aux_k_coefficient"})
        if rule in _TOPK_LIKE:
            remedy = DeadLatentRemedy(losses=("aux_k",), lift_quiet=rule == "batchtopk")
        elif rule == "jumprelu":
            remedy = DeadLatentRemedy(losses=("pre_act",), lift_quiet=True)
        else:
            remedy = DeadLatentRemedy(lift_quiet=True)
        self.dead_latent_remedy = remedy  # type: ignore[misc]

    @property
    def activation_fn(self) -> str:
        assert self.cfg.activation_fn is not None
        return self.cfg.activation_fn

    @property
    def n_layers(self) -> int:
        assert self.cfg.n_layers is not None
        return self.cfg.n_layers

    @property
    def latent_groups(self) -> int:
        return self.n_layers

    @classmethod
    def config_defaults(
        cls, d_in: int, d_sae: int, target_l0: float | None = None
    ) -> dict[str, Any]:
        k = int(target_l0) if target_l0 else min(64, d_sae)
        # b_dec lives in the output space, so it cannot be subtracted from the input.
        return {"apply_b_dec_to_input": False, "activation_fn": "topk", "k": k, "n_layers": 1}

    def validate_config(self, cfg: SAEConfig) -> None:
        super().validate_config(cfg)
        if cfg.n_layers is None:
            raise ValueError("a cross-layer transcoder needs n_layers (the layers it spans)")
        if cfg.activation_fn not in CLT_ACTIVATIONS:
            raise ValueError(
                f"activation_fn {cfg.activation_fn!r} is not a CLT rule; use one of "
                f"{', '.join(CLT_ACTIVATIONS)}"
            )
        if cfg.activation_fn in _TOPK_LIKE and cfg.k is None:
            raise ValueError(f"a {cfg.activation_fn} CLT needs k (latents per token and layer)")
        if cfg.apply_b_dec_to_input:
            raise ValueError(
                "a cross-layer transcoder's b_dec is in the output space; set "
                "apply_b_dec_to_input=False"
            )
        if cfg.normalize_activations != "none" or cfg.reshape_activations != "none":
            raise ValueError(
                "a cross-layer transcoder reads activations as they are: normalize_activations "
                "and reshape_activations must be 'none'"
            )
        if cfg.matryoshka_widths is not None or cfg.rescale_acts_by_decoder_norm:
            raise ValueError("matryoshka_widths and rescale_acts_by_decoder_norm are not for CLTs")

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        c, n = self.cfg, self.n_layers
        shapes: dict[str, tuple[int, ...]] = {
            "W_enc": (n, c.d_in, c.d_sae),
            "b_enc": (n, c.d_sae),
        }
        for i in range(n):
            shapes[f"W_dec_{i}"] = (c.d_sae, n - i, c.output_width)
        shapes["b_dec"] = (n, c.output_width)
        if self.activation_fn == "jumprelu":
            shapes["threshold"] = (n, c.d_sae)
        if c.skip_connection:
            shapes["W_skip"] = (n, c.output_width, c.d_in)
        return shapes

    @property
    def has_skip(self) -> bool:
        """Whether each layer has a linear path from its input to its output (`W_skip`)."""
        return self.cfg.skip_connection

    def decoders(self) -> list[Tensor]:
        """`W_dec_<i>` for every source layer i, [d_sae, n_layers - i, d_out] each."""
        return [getattr(self, f"W_dec_{i}") for i in range(self.n_layers)]

    @property
    def device(self) -> torch.device:
        return self.b_dec.device

    @property
    def dtype(self) -> torch.dtype:
        return self.b_dec.dtype

    def to(self, *args: Any, **kwargs: Any) -> CrossLayerTranscoder:  # type: ignore[override]
        torch.nn.Module.to(self, *args, **kwargs)
        self.cfg.device, self.cfg.dtype = str(self.device), dtype_name(self.dtype)
        return self

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Each latent's decoders start in random directions with a joint norm of
        `decoder_init_norm`; encoders uniform in +-1/sqrt(d_in) (input and output spaces
        differ, so no transpose is tied); biases zero, thresholds at jumprelu's start; the
        skip path, if any, at zero (the latents explain what they can before it takes over)."""
        c = self.cfg
        bound = 1 / c.d_in**0.5
        self.W_enc.uniform_(-bound, bound)
        decoders = [torch.randn(w.shape, device=w.device) for w in self.decoders()]
        norms = torch.stack([d.pow(2).sum(dim=(1, 2)) for d in decoders]).sqrt()  # [n, d_sae]
        for i, (w, d) in enumerate(zip(self.decoders(), decoders, strict=True)):
            w.copy_(self.decoder_init_norm * d / norms[i][:, None, None])
        if self.activation_fn == "jumprelu":
            from saekit.saes.jumprelu import JumpReLUSAE

            self.threshold.fill_(JumpReLUSAE.initial_threshold)

    # ----- inputs ---------------------------------------------------------------------------

    def prepare_input(self, x: Tensor) -> Tensor:
        """Cast [..., n_layers, d_in] to the CLT's dtype, checking its shape."""
        return stacked_input(x, self.n_layers, self.cfg.d_in, "a CLT", "layer").to(self.dtype)

    def restore_output(self, recon: Tensor) -> Tensor:
        return recon

    def center(self, x: Tensor) -> Tensor:
        return x

    # ----- encoding -------------------------------------------------------------------------

    def pre_activations(self, x: Tensor, centre: Tensor | None = None) -> Tensor:
        """h [..., n_layers, d_sae] for inputs [..., n_layers, d_in], each layer through its
        own encoder."""
        return torch.einsum("...ld,ldm->...lm", x, self.W_enc) + self.b_enc

    def layer_pre_activations(self, x: Tensor, layer: int) -> Tensor:
        """h [..., d_sae] of one layer's latents for that layer's input x [..., d_in]."""
        self._check_layer(layer)
        return x.to(self.dtype) @ self.W_enc[layer] + self.b_enc[layer]

    def activation(self, hidden_pre: Tensor) -> Tensor:
        """Latents from pre-activations [..., n_layers, d_sae] (the inference rule)."""
        rule = self.activation_fn
        if rule == "relu":
            return torch.relu(hidden_pre)
        if rule == "topk":
            assert self.cfg.k is not None
            return keep_top_k(torch.relu(hidden_pre), self.cfg.k)
        return torch.relu(hidden_pre) * (hidden_pre > self.threshold)

    def encode_layer(self, x: Tensor, layer: int) -> Tensor:
        """Layer `layer`'s latents [..., d_sae] from its input x [..., d_in]."""
        return self.encode_layer_parts(x, layer)[1]

    def encode_layer_parts(self, x: Tensor, layer: int) -> tuple[Tensor, Tensor]:
        """(pre-activations, latents) [..., d_sae] of layer `layer` for its input x [..., d_in]
        (the inference rule)."""
        hidden_pre = self.layer_pre_activations(x, layer)
        rule = self.activation_fn
        if rule == "relu":
            return hidden_pre, torch.relu(hidden_pre)
        if rule == "topk":
            assert self.cfg.k is not None
            return hidden_pre, keep_top_k(torch.relu(hidden_pre), self.cfg.k)
        return hidden_pre, torch.relu(hidden_pre) * (hidden_pre > self.threshold[layer])

    def encoder_products(self, centred: Tensor) -> Tensor:
        products = torch.einsum("bld,ldm->blm", centred.to(self.dtype), self.W_enc)
        return products.flatten(1)  # [batch, n_layers * d_sae]

    # ----- decoding -------------------------------------------------------------------------

    def decode(self, latents: Tensor) -> Tensor:
        """Every layer's output [..., n_layers, d_out] from latents [..., n_layers, d_sae]:
        the decoders' part (with a skip connection, `reconstruct` adds the skip path)."""
        self._check_latents(latents)
        return self._decode(latents.to(self.dtype), self.b_dec)

    def _decode(self, latents: Tensor, bias: Tensor | None) -> Tensor:
        n, d_out = self.n_layers, self.cfg.output_width
        lead = latents.shape[:-2]
        out = latents.new_zeros(*lead, n, d_out) if bias is None else bias.expand(*lead, n, d_out)
        out = out.clone()
        for i, w in enumerate(self.decoders()):
            # [..., d_sae] @ [d_sae, (n - i) * d_out]: every write of layer i in one matmul.
            writes = latents[..., i, :] @ w.reshape(w.shape[0], -1)
            out[..., i:, :] += writes.reshape(*lead, n - i, d_out)
        return out

    def decode_layer(self, latents: list[Tensor], layer: int) -> Tensor:
        """Layer `layer`'s output [..., d_out] from the latents of layers 0..layer
        (`latents[i]` [..., d_sae]; later entries, if given, are not read): the decoders'
        part (with a skip connection, add `layer_skip` of the layer's input)."""
        self._check_layer(layer)
        if len(latents) <= layer:
            raise ValueError(
                f"layer {layer}'s output needs the latents of layers 0..{layer}, got "
                f"{len(latents)} layer(s)"
            )
        out = self.b_dec[layer]
        for i in range(layer + 1):
            out = out + latents[i].to(self.dtype) @ getattr(self, f"W_dec_{i}")[:, layer - i]
        return out

    def skip(self, x: Tensor) -> Tensor:
        """The skip path of every layer [..., n_layers, d_out] for inputs [..., n_layers,
        d_in]: x_l @ W_skip[l].T."""
        if not self.has_skip:
            raise ValueError("this CLT has no skip connection (cfg.skip_connection is false)")
        return torch.einsum("...ld,lod->...lo", x.to(self.dtype), self.W_skip)

    def layer_skip(self, x: Tensor, layer: int) -> Tensor:
        """Layer `layer`'s skip path [..., d_out] for its input x [..., d_in]."""
        self._check_layer(layer)
        if not self.has_skip:
            raise ValueError("this CLT has no skip connection (cfg.skip_connection is false)")
        return x.to(self.dtype) @ self.W_skip[layer].T

    def forward(self, x: Tensor) -> Tensor:
        x = self.prepare_input(x)
        return self.reconstruct(x, self.encode(x))

    def reconstruct(self, x: Tensor, latents: Tensor) -> Tensor:
        """Every layer's whole output [..., n_layers, d_out] from inputs x [..., n_layers,
        d_in] and their latents [..., n_layers, d_sae]: the decoders and, with a skip
        connection, the skip path."""
        self._check_latents(latents)
        out = self._decode(latents.to(self.dtype), self.b_dec)
        return out + self.skip(x) if self.has_skip else out

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layers:
            raise ValueError(f"layer {layer} is out of range for a CLT over {self.n_layers}")

    def _check_latents(self, latents: Tensor) -> None:
        if latents.ndim < 2 or tuple(latents.shape[-2:]) != (self.n_layers, self.cfg.d_sae):
            raise ValueError(
                f"latents must be [..., {self.n_layers}, {self.cfg.d_sae}], got "
                f"{tuple(latents.shape)}"
            )

    # ----- training -------------------------------------------------------------------------

    def training_forward(
        self,
        x: Tensor,
        target: Tensor | None = None,
        settings: LossSettings | None = None,
        dead_mask: Tensor | None = None,
        last_l0: float | None = None,
    ) -> TrainingOutput:
        """One training pass on x [batch, n_layers, d_in] and target [batch, n_layers,
        d_out]; the MSE sums the squared error over layers and features."""
        settings = settings or LossSettings()
        if target is None:
            raise ValueError("a CLT needs `target`, the MLP outputs of every layer")
        x = self.prepare_input(x)
        target = target.to(self.dtype)
        if tuple(target.shape) != (*x.shape[:-1], self.cfg.output_width):
            raise ValueError(
                f"target must be [batch, {self.n_layers}, {self.cfg.output_width}] like the "
                f"input's rows, got {tuple(target.shape)}"
            )
        hidden_pre = self.pre_activations(x)  # [batch, n_layers, d_sae]
        latents = self.training_latents(hidden_pre, settings)
        recon = self.reconstruct(x, latents)
        losses = {"mse": stacked_squared_error(recon, target)}
        losses.update(self.sparsity_losses(x, hidden_pre, latents, settings))
        if dead_mask is not None and dead_mask.any():
            residual = target - recon
            losses.update(self.dead_latent_losses(x, hidden_pre, residual, dead_mask, settings))
        total = torch.stack(list(losses.values())).sum()
        return TrainingOutput(recon, latents.flatten(-2), total, losses)

    def training_latents(self, hidden_pre: Tensor, settings: LossSettings) -> Tensor:
        rule = self.activation_fn
        if rule == "jumprelu":
            flat = torch.relu(hidden_pre).flatten(-2)  # [batch, n_layers * d_sae]
            out = JumpReLUFunction.apply(
                flat, self.threshold.reshape(-1), settings.threshold_bandwidth,
                settings.ste_to_input,
            )
            return out.reshape(hidden_pre.shape)
        if rule == "batchtopk":
            return self._batch_top_k(torch.relu(hidden_pre))
        return self.activation(hidden_pre)

    def _batch_top_k(self, scores: Tensor) -> Tensor:
        """Keep the k * batch largest scores of each layer over the whole batch."""
        assert self.cfg.k is not None
        batch, n, d_sae = scores.shape
        per_layer = scores.transpose(0, 1).reshape(n, batch * d_sae)  # [n_layers, batch*d_sae]
        keep = min(self.cfg.k * batch, batch * d_sae)
        top = per_layer.topk(keep, dim=1, sorted=False)
        kept = torch.zeros_like(per_layer).scatter(1, top.indices, top.values)
        if self.training:
            self._update_threshold(top.values.detach())
        return kept.reshape(n, batch, d_sae).transpose(0, 1)

    @torch.no_grad()
    def _update_threshold(self, kept: Tensor) -> None:
        """Move each layer's threshold towards the smallest positive value it kept."""
        positive = torch.where(kept > 0, kept, torch.full_like(kept, float("inf")))
        smallest = positive.min(dim=1).values  # [n_layers]
        for layer, value in enumerate(smallest.tolist()):
            if value == float("inf"):
                continue
            row = self.threshold[layer]
            if bool((row == 0).all()):
                row.fill_(value)
            else:
                row.lerp_(torch.full_like(row, value), THRESHOLD_EMA_RATE)

    def joint_decoder_norms(self) -> Tensor:
        """[n_layers, d_sae]: each latent's norm over all its decoders together."""
        return torch.stack([w.pow(2).sum(dim=(1, 2)) for w in self.decoders()]).sqrt()

    def decoder_norms(self) -> Tensor:
        return self.joint_decoder_norms().reshape(-1)  # [n_layers * d_sae]

    def sparsity_losses(
        self, x: Tensor, hidden_pre: Tensor, latents: Tensor, settings: LossSettings
    ) -> dict[str, Tensor]:
        rule = self.activation_fn
        flat = latents.flatten(-2)  # [batch, n_layers * d_sae]
        if rule == "relu":
            penalty = (flat.sum(dim=0) @ self.decoder_norms()) / flat.shape[0]
            return {"l1": settings.sparsity_coefficient * penalty}
        if rule != "jumprelu":
            return {}
        h = hidden_pre.flatten(-2)
        threshold = self.threshold.reshape(-1)
        if settings.threshold_penalty == "tanh":
            penalty = TanhPenalty.apply(flat, self.decoder_norms(), settings.tanh_scale)
        else:
            fired = StepFunction.apply(
                h, threshold, settings.threshold_bandwidth, settings.ste_to_input
            )
            penalty = fired.sum(dim=-1).mean()
        losses = {"l0": settings.sparsity_coefficient * penalty}
        coefficient = settings.threshold_pre_act_coefficient
        if coefficient:
            weights = coefficient * self.decoder_norms().detach()
            below = torch.relu(threshold.clamp_min(0) - h)
            losses["pre_act"] = (below * weights).sum(dim=-1).mean()
        return losses

    def dead_latent_losses(
        self,
        centred: Tensor,
        hidden_pre: Tensor,
        residual: Tensor,
        dead_mask: Tensor,
        settings: LossSettings,
    ) -> dict[str, Tensor]:
        if self.activation_fn not in _TOPK_LIKE:
            return {}
        # AuxK, per layer: the top k_aux dead latents of each layer explain what the live
        # ones missed at every layer they write to.
        dead = dead_mask.reshape(self.n_layers, self.cfg.d_sae)
        k_aux = min(settings.k_aux or self.cfg.d_in // 2, int(dead.sum(dim=1).max()))
        masked = hidden_pre.detach().masked_fill(~dead, float("-inf"))
        top = masked.topk(k_aux, dim=-1, sorted=False)
        values = torch.relu(hidden_pre).gather(-1, top.indices)
        values = torch.where(top.values > 0, values, torch.zeros_like(values))
        aux_latents = torch.zeros_like(hidden_pre).scatter(-1, top.indices, values)
        aux = unexplained_share(
            self._decode(aux_latents, None), residual.detach(), settings.replica_mean
        )
        return {"aux_k": settings.aux_k_coefficient * aux}

    # ----- dead-latent remedies and starting points -----------------------------------------

    def _flat(self, name: str) -> Tensor:
        return getattr(self, name).view(-1)

    @torch.no_grad()
    def set_firing_point(self, latents: Tensor, points: Tensor) -> None:
        points = points.to(self.dtype)
        if self.activation_fn == "jumprelu":
            threshold = points.clamp_min(0)
            self._flat("threshold")[latents] = threshold
            self._flat("b_enc")[latents] = threshold - points
        else:
            self._flat("b_enc")[latents] = -points

    def firing_point(self, latents: Tensor) -> Tensor:
        if self.activation_fn == "jumprelu":
            return self._flat("threshold")[latents] - self._flat("b_enc")[latents]
        return -self._flat("b_enc")[latents]

    @torch.no_grad()
    def competition_bar(self, centred: Tensor) -> Tensor | None:
        if self.activation_fn not in _TOPK_LIKE:
            return None
        assert self.cfg.k is not None
        scores = torch.relu(self.pre_activations(centred.to(self.dtype)))  # [batch, n, d_sae]
        k = min(self.cfg.k, scores.shape[-1])
        if self.activation_fn == "topk":
            bar = scores.topk(k, dim=-1).values[..., -1]  # [batch, n_layers]
        else:  # one bar per layer over the whole batch
            per_layer = scores.transpose(0, 1).flatten(1)
            keep = min(k * scores.shape[0], per_layer.shape[1])
            bar = per_layer.topk(keep, dim=1).values[:, -1].expand(scores.shape[0], -1)
        # [batch, n_layers * d_sae]: each latent's bar is its layer's
        return bar.repeat_interleave(self.cfg.d_sae, dim=1)

    # ----- folding and publishing -----------------------------------------------------------

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scale: float) -> None:
        # The skip path is linear from x to y, both scaled by s: W_skip stays as it is.
        self.W_enc *= scale
        for w in self.decoders():
            w /= scale
        self.b_dec /= scale

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """Scale each latent so its decoders have a joint norm of 1, the function unchanged
        (refused for topk, whose ranking a per-latent scale would change)."""
        norms = self.joint_decoder_norms().clamp_min(1e-12)  # [n_layers, d_sae]
        if self.activation_fn == "topk" and not torch.allclose(
            norms, norms.mean().expand_as(norms), rtol=1e-4
        ):
            raise ValueError(
                "folding decoder norms into a topk CLT would change which latents win the top-k"
            )
        for i, w in enumerate(self.decoders()):
            w /= norms[i][:, None, None]
        self.W_enc *= norms[:, None, :]
        self.b_enc *= norms
        if hasattr(self, "threshold"):
            self.threshold *= norms

    def published(self) -> SAE:
        if self.activation_fn != "batchtopk":
            return self
        cfg = self.cfg.replace(activation_fn="jumprelu", k=None)
        return CrossLayerTranscoder.from_tensors(cfg, dict(self.state_dict()))

    def save(self, path: str | Path, sparsity: Tensor | None = None) -> Path:
        """Write the CLT as a native folder, atomically; `sparsity` is log10 firing frequency
        per latent, [n_layers * d_sae] or [n_layers, d_sae] (stored flat, layer-major)."""
        from saekit.finite import check_finite_tensors
        from saekit.io.native import check_sparsity, save_sae_folder

        check_finite_tensors(
            self.state_dict(), f"the CLT to be saved to {path}",
            "nothing was written; a CLT whose weights are not finite cannot be right",
        )
        flat = None
        if sparsity is not None:
            flat = sparsity.reshape(-1)
            where = f"the sparsity to be saved to {path}"
            check_sparsity(flat, self.n_layers * self.cfg.d_sae, where)
        publish = self.published()
        tensors = {name: t.detach() for name, t in publish.state_dict().items()}
        return save_sae_folder(path, publish.cfg.to_dict(), tensors, flat)


#: Per-layer transcoder architectures a CLT can stand for: (latents' rule, skip path).
_TRANSCODER_RULES = {
    "transcoder": ("relu", False), "jumprelu_transcoder": ("jumprelu", False),
    "skip_transcoder": ("relu", True), "jumprelu_skip_transcoder": ("jumprelu", True),
}


def clt_from_transcoders(transcoders: list[SAE]) -> CrossLayerTranscoder:
    """Per-layer transcoders (ReLU or JumpReLU, with or without a skip path; layer n's at
    index n) as one CLT whose cross-layer decoders are zero: the same function, so a set of
    transcoders splices and evaluates as a replacement model like a CLT does."""
    if not transcoders:
        raise ValueError("no transcoders given; pass one per layer")
    first = transcoders[0].cfg
    for n, tc in enumerate(transcoders):
        c = tc.cfg
        if c.architecture not in _TRANSCODER_RULES or c.architecture != first.architecture:
            raise ValueError(
                f"transcoder {n} is {c.architecture!r}; a CLT is built from transcoders that "
                f"all have one of the architectures {', '.join(_TRANSCODER_RULES)}"
            )
        if (c.d_in, c.d_sae, c.output_width) != (first.d_in, first.d_sae, first.output_width):
            raise ValueError(f"transcoder {n} has other sizes than transcoder 0")
        if c.apply_b_dec_to_input:
            raise ValueError(f"transcoder {n} subtracts b_dec from its input, which CLTs do not")
    n_layers = len(transcoders)
    rule, skip = _TRANSCODER_RULES[first.architecture]
    cfg = SAEConfig(
        architecture="clt", d_in=first.d_in, d_sae=first.d_sae, d_out=first.d_out,
        dtype=first.dtype, apply_b_dec_to_input=False, n_layers=n_layers,
        activation_fn=rule, skip_connection=skip,
    )
    tensors = {
        "W_enc": torch.stack([tc.W_enc.detach() for tc in transcoders]),
        "b_enc": torch.stack([tc.b_enc.detach() for tc in transcoders]),
        "b_dec": torch.stack([tc.b_dec.detach() for tc in transcoders]),
    }
    for n, tc in enumerate(transcoders):
        decoders = torch.zeros(first.d_sae, n_layers - n, first.output_width, dtype=tc.dtype)
        decoders[:, 0] = tc.W_dec.detach().cpu()
        tensors[f"W_dec_{n}"] = decoders
    if cfg.activation_fn == "jumprelu":
        tensors["threshold"] = torch.stack([tc.threshold.detach() for tc in transcoders])
    if skip:  # both [d_out, d_in] per layer
        tensors["W_skip"] = torch.stack([tc.W_skip.detach() for tc in transcoders])
    tensors = {k: v.cpu() for k, v in tensors.items()}
    clt = CrossLayerTranscoder.from_tensors(cfg, tensors)
    meta = [tc.cfg.metadata for tc in transcoders]
    if all(m.hook_name and m.hook_name_out for m in meta):
        clt.cfg.metadata.extra[HOOKS_IN_KEY] = [m.hook_name for m in meta]
        clt.cfg.metadata.extra[HOOKS_OUT_KEY] = [m.hook_name_out for m in meta]
    clt.cfg.metadata.model_name = first.metadata.model_name
    return clt


def stack_layers(acts: dict[str, Tensor], hooks: list[str]) -> Tensor:
    """[..., n_layers, d] from per-hook activations [..., d], in the order of `hooks`."""
    missing = [h for h in hooks if h not in acts]
    if missing:
        raise ValueError(f"activations for hooks {missing} are missing (have {sorted(acts)})")
    return torch.stack([acts[h] for h in hooks], dim=-2)


#: Where a CLT reads each layer by default: the MLP's input (`mlp.hook_in` in
#: circuit-tracer's names), as the Gemma Scope 2 CLTs and mntss's configs do; the residual
#: stream before it (`hook_resid_mid`, circuit-tracer's own default) also works.
CLT_INPUT_HOOK = "ln2.hook_normalized"
#: What a CLT reconstructs at each layer: the MLP's output.
CLT_OUTPUT_HOOK = "hook_mlp_out"


def layer_hooks(layers: Sequence[int], name: str) -> list[str]:
    """`blocks.<layer>.<name>` for each layer, in order."""
    return [f"blocks.{layer}.{name}" for layer in layers]


def clt_hooks(
    clt: CrossLayerTranscoder,
    layers: Sequence[int] | None = None,
    hook_in: str = CLT_INPUT_HOOK,
    hook_out: str = CLT_OUTPUT_HOOK,
) -> tuple[list[str], list[str]]:
    """(input hooks, output hooks) of the CLT, one per layer: those its metadata records,
    else `blocks.<l>.<hook_in>` / `blocks.<l>.<hook_out>` for `layers` (default
    0..n_layers-1)."""
    extra = clt.cfg.metadata.extra
    if layers is None and HOOKS_IN_KEY in extra and HOOKS_OUT_KEY in extra:
        hooks_in, hooks_out = list(extra[HOOKS_IN_KEY]), list(extra[HOOKS_OUT_KEY])
    else:
        chosen = list(range(clt.n_layers)) if layers is None else list(layers)
        hooks_in, hooks_out = layer_hooks(chosen, hook_in), layer_hooks(chosen, hook_out)
    for what, hooks in (("input", hooks_in), ("output", hooks_out)):
        if len(hooks) != clt.n_layers or not all(isinstance(h, str) for h in hooks):
            raise ValueError(
                f"a CLT over {clt.n_layers} layers needs {clt.n_layers} {what} hook names, "
                f"got {hooks!r}; pass one layer per CLT layer"
            )
    return hooks_in, hooks_out


def record_hooks(clt: CrossLayerTranscoder, hooks_in: list[str], hooks_out: list[str]) -> None:
    """Write the per-layer hooks into the CLT's metadata (saved with it in cfg.json)."""
    clt.cfg.metadata.extra[HOOKS_IN_KEY] = list(hooks_in)
    clt.cfg.metadata.extra[HOOKS_OUT_KEY] = list(hooks_out)


def stacked_input(x: Tensor, n: int, d_in: int, what: str, row: str) -> Tensor:
    """`x` itself, once checked to be [..., n, d_in]: one row per `row` (layer, site) of a
    multi-site SAE (`what`, e.g. "a CLT")."""
    if x.ndim < 2 or x.shape[-2] != n or x.shape[-1] != d_in:
        raise ValueError(
            f"{what} over {n} {row}s of width {d_in} takes inputs [..., {n}, {d_in}] (one row "
            f"per {row}), got {tuple(x.shape)}"
        )
    return x
