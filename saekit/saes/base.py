"""The SAE base class: input handling, decoding, saving and loading shared by every architecture.

An architecture subclass supplies only what differs: its parameters beyond the common four,
its encoder (pre-activations and activation), its extra training loss terms and, where the
community publishes it in another form, how it is published.
"""

from __future__ import annotations

import functools
import logging
import math
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from saekit.config import DTYPES, SAEConfig, dtype_name
from saekit.finite import check_finite_tensors
from saekit.kernels.affine import centred_affine
from saekit.kernels.sparse_topk import (
    SelectedLatents,
    encoder_pre_activations,
    sparse_decode,
)
from saekit.saes.registry import architecture_class
from saekit.saes.shapes import check_tensor_shapes, tensor_shapes, unallocated

log = logging.getLogger(__name__)


#: Weight of the standard SAE's dead-latent term. A dead latent's encoder gets no other
#: gradient, so Adam moves it at about lr per step whatever the weight; a small one leaves the
#: gradient-norm clipping of the live latents alone.
DEAD_PRE_ACT_DEFAULT = 0.01


@dataclass(frozen=True)
class LossSettings:
    """Coefficients of the training loss terms (section 2 of the reference)."""

    sparsity_coefficient: float = 0.0
    """lambda: weight of the sparsity penalty (L1, L0 or tanh, by architecture)."""
    aux_k_coefficient: float = 1 / 32
    """AuxK loss weight (Gao et al. 2024): top-k family, gated, CLTs, crosscoders."""
    k_aux: int | None = None
    """Dead latents used by AuxK; None means d_in // 2."""
    replica_mean: Callable[[Tensor], Tensor] | None = None
    """Under data parallelism, the mean of a per-rank value over the ranks' shards of one
    batch (for loss terms that are not means over tokens); None: one process."""
    use_sparse_kernel: bool = True
    """topk-style SAEs: decode through the sparse top-k kernel (same result, less work)."""
    threshold_bandwidth: float = 0.001
    """Width of the straight-through kernel for JumpReLU thresholds."""
    threshold_penalty: str = "step"
    """JumpReLU penalty: "step" (L0 via straight-through) or "tanh"."""
    ste_to_input: bool = False
    """Give the straight-through gradients to the pre-activations too, not only the
    thresholds (see `saekit.saes.jumprelu`)."""
    threshold_pre_act_coefficient: float = 0.0
    """c in c * sum_i ||W_dec[i]|| ReLU(theta_i - h_i), which pulls silent latents back up
    to their thresholds (decoder norms taken as constants); 0 turns it off."""
    dead_pre_act_coefficient: float = DEAD_PRE_ACT_DEFAULT
    """ReLU SAEs (standard, transcoder): c in c * mean over tokens of sum over dead latents
    of ||W_dec[i]|| ReLU(-h_i), which pushes latents the trainer counts as dead back up until
    they fire (decoder norms taken as constants); 0 turns it off."""
    tanh_scale: float = 4.0
    """c in tanh(c * f_i * ||W_dec[i]||) for the tanh penalty."""

    def __post_init__(self) -> None:
        if self.threshold_penalty not in ("step", "tanh"):
            raise ValueError(
                f"threshold_penalty must be 'step' or 'tanh', got {self.threshold_penalty!r}"
            )
        if self.threshold_bandwidth <= 0:
            raise ValueError(f"threshold_bandwidth must be > 0, got {self.threshold_bandwidth}")


@dataclass(frozen=True)
class DeadLatentRemedy:
    """What an architecture does for latents that stopped firing; the trainer applies it
    without knowing the architecture's name."""

    losses: tuple[str, ...] = ()
    """The loss terms of `dead_latent_losses` (keys of `loss_coefficients`) that give dead
    latents gradient again."""
    loss_on_quiet: bool = False
    """The loss acts on quiet latents (silent for TrainingSection.quiet_after_tokens, a
    short window) rather than dead ones: a penalty's equilibrium leaves many latents firing
    once in a long while, which a term that stops at their first firing leaves there."""
    lift_quiet: bool = False
    """Quiet latents keep their directions but have their firing points lowered (biases
    raised) until they fire on a share of the batch (see TrainingSection.lift_share)."""
    resample: bool = False
    """Dead latents are started afresh on poorly reconstructed examples (`resample_latents`)
    while training's first part lasts (see TrainingSection.resample_dead_latents)."""


class TrainingOutput:
    """What one training forward pass produces: `recon` [batch, d_out], `latents` [batch,
    d_sae], `loss` (the sum of `losses`) and `losses` (each term by name, e.g. {"mse": ...,
    "l1": ...}).

    A pass may hand over its latents as `SelectedLatents` (top-k pairs); the dense tensor is
    then built only if `latents` is read, and `fire_counts` needs no dense tensor at all."""

    def __init__(
        self,
        recon: Tensor,
        latents: Tensor | SelectedLatents,
        loss: Tensor,
        losses: dict[str, Tensor],
    ) -> None:
        self.recon, self.loss, self.losses = recon, loss, losses
        self._latents = latents

    @property
    def latents(self) -> Tensor:
        if isinstance(self._latents, SelectedLatents):
            self._latents = self._latents.dense()
        return self._latents

    def __iter__(self) -> Iterator[Any]:
        """Unpacks as `recon, latents, loss, losses`."""
        return iter((self.recon, self.latents, self.loss, self.losses))

    def fire_counts(self) -> Tensor:
        """[d_sae] tokens of the batch on which each latent is nonzero."""
        if isinstance(self._latents, SelectedLatents):
            return self._latents.fire_counts()
        return (self._latents != 0).sum(dim=0)


class PretrainedSAE(NamedTuple):
    """What `SAE.from_pretrained_with_cfg_and_sparsity` returns: `sae, cfg_dict, sparsity`."""

    sae: SAE
    cfg_dict: dict[str, Any]
    """The loaded SAE's config in the current cfg.json layout (after any folding)."""
    sparsity: Tensor | None
    """log10 firing frequency per latent [d_sae], or None when the release has none."""


class SavedSAE(NamedTuple):
    """What `SAE.save_model` returns (SAELens's order)."""

    weights_path: Path
    cfg_path: Path


class _Unpacks:
    """Mixed into a loaded pretrained SAE's class: the SAE unpacks as the classic
    `sae, cfg_dict, sparsity` and answers `.sae` with itself."""

    cfg_dict: dict[str, Any]
    sparsity: Tensor | None

    def __iter__(self) -> Iterator[Any]:
        return iter((self, self.cfg_dict, self.sparsity))

    @property
    def sae(self) -> Any:
        return self


@functools.cache
def _unpacking_class(cls: type) -> type:
    """`cls` with `_Unpacks` mixed in, under the same name (isinstance holds for both)."""
    return type(cls.__name__, (cls, _Unpacks), {"__module__": cls.__module__})


def _unpackable(sae: SAE, cfg_dict: dict[str, Any], sparsity: Tensor | None) -> SAE:
    sae.__class__ = _unpacking_class(type(sae))
    sae.cfg_dict, sae.sparsity = cfg_dict, sparsity
    return sae


class NormState(NamedTuple):
    """Per-token statistics removed from the input, restored on the output."""

    shift: Tensor | None  # [..., 1]
    scale: Tensor  # [..., 1]


class SAE(nn.Module):
    """A sparse autoencoder. Build one with `SAE.from_config(cfg)` or `SAE.load(folder)`.

    An architecture is a subclass registered with `@register_architecture("name")`. It must
    write `activation` (latents from pre-activations, the inference rule). It may override:
    `parameter_shapes` and `initialize_weights` (parameters beyond W_enc, b_enc, W_dec,
    b_dec), `pre_activations`, `training_latents` (a batch-level or straight-through training
    rule), `sparsity_losses` and `dead_latent_losses` (loss terms beyond the MSE),
    `post_optimizer_step` (constraints), `published` (the form it is saved in),
    `validate_config` and `config_defaults`. The class attributes below are what the trainer
    asks of it; the trainer never tests an architecture's name.
    """

    architecture: ClassVar[str] = ""
    #: Transcoders read at one hook and reconstruct another (d_out may differ from d_in).
    is_transcoder: ClassVar[bool] = False
    #: Reads one row per site, [..., n_layers, d_in] (cross-layer transcoders): the tools
    #: built for one hook (evaluate_saes, splicing at a hook) do not apply to it.
    multi_site: ClassVar[bool] = False
    #: Norm of the decoder rows (and so of the tied encoder columns) at initialisation.
    decoder_init_norm: ClassVar[float] = 0.1
    #: The sparsity coefficient weighs a count of active latents (L0), not their sizes.
    penalty_counts_latents: ClassVar[bool] = False
    #: How training sets its sparsity: "k" (latents kept per token, `cfg.k`; a target L0 is
    #: k itself) or "coefficient" (a penalty weight; a target L0 runs a controller on it).
    sparsity_control: ClassVar[str] = "coefficient"
    #: With decoder_norm "auto", decoder rows are kept at unit norm after every step (right
    #: for losses with no penalty weighed by decoder-row norms, which unit rows would void).
    unit_norm_decoder: ClassVar[bool] = False
    #: The loss terms beyond "mse" (the keys `sparsity_losses` and `dead_latent_losses`
    #: return), each with the `LossSettings` field that weighs it (None: unweighted).
    loss_coefficients: ClassVar[dict[str, str | None]] = {}
    #: What revives latents that stopped firing (a loss term, resampling, both or neither).
    dead_latent_remedy: ClassVar[DeadLatentRemedy] = DeadLatentRemedy()
    #: Whether `SAEConfig.skip_connection` may turn on a linear path from input to output.
    optional_skip_connection: ClassVar[bool] = False
    #: Adam's peak learning rate when the training config leaves it unset.
    default_lr: ClassVar[float] = 1e-3
    #: Norm of a resampled latent's encoder column, as a share of the live columns' mean
    #: (Anthropic's 2023 recipe): small, so the new latent starts as a weak detector.
    resample_encoder_share: ClassVar[float] = 0.2

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        if cfg.architecture != self.architecture:
            cfg = cfg.replace(architecture=self.architecture)
        self.cfg = cfg
        self.validate_config(cfg)
        factory = {"device": torch.device(cfg.device), "dtype": cfg.torch_dtype}
        for name, shape in self.parameter_shapes().items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape, **factory)))
        # Filled by encode for the normalisation modes whose inverse depends on the input.
        self._norm_state: NormState | None = None
        self._head_shape: tuple[int, int] | None = None
        self.initialize_weights()

    # ----- what subclasses provide ---------------------------------------------------------

    def validate_config(self, cfg: SAEConfig) -> None:
        """Raise ValueError for settings this architecture cannot honour."""
        if cfg.d_out is not None and cfg.d_out != cfg.d_in and not self.is_transcoder:
            raise ValueError(
                f"d_out={cfg.d_out} differs from d_in={cfg.d_in}, which only transcoders support; "
                "use architecture 'transcoder' or 'skip_transcoder'"
            )
        if cfg.skip_connection and not self.optional_skip_connection:
            raise ValueError(
                f"skip_connection is an option of cross-layer transcoders, not of "
                f"{cfg.architecture!r}; a per-layer transcoder with a skip path is "
                "'skip_transcoder' or 'jumprelu_skip_transcoder'"
            )

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        c = self.cfg
        return {
            "W_enc": (c.d_in, c.d_sae),
            "b_enc": (c.d_sae,),
            "W_dec": (c.d_sae, c.output_width),
            "b_dec": (c.output_width,),
        }

    def pre_activations(self, x: Tensor, centre: Tensor | None = None) -> Tensor:
        """h = x~ W_enc + b_enc for a prepared input [batch, d_in].

        x is already centred when `centre` is None; otherwise x~ = x - centre is formed here,
        so that the centre's gradient costs a vector-matrix product (see `centred_affine`).
        """
        if centre is None:
            return x @ self.W_enc + self.b_enc
        return centred_affine(x, centre, self.W_enc, self.b_enc)

    def activation(self, hidden_pre: Tensor) -> Tensor:
        """Latents from pre-activations (inference rule)."""
        raise NotImplementedError

    def encode_parts(
        self, x: Tensor, settings: LossSettings | None = None, centre: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(pre-activations, latents) for a prepared, centred input [batch, d_in] (or, with
        `centre`, a prepared input that x - centre centres).

        With `settings` the training rule is used (batch-level top-k, straight-through
        estimators); without, the inference rule.
        """
        hidden_pre = self.pre_activations(x, centre)
        if settings is None:
            return hidden_pre, self.activation(hidden_pre)
        return hidden_pre, self.training_latents(hidden_pre, settings)

    def sparsity_losses(
        self, x: Tensor, hidden_pre: Tensor, latents: Tensor, settings: LossSettings
    ) -> dict[str, Tensor]:
        """Loss terms beyond the MSE, by name."""
        return {}

    def training_latents(self, hidden_pre: Tensor, settings: LossSettings) -> Tensor:
        """Latents during training; differs from `activation` for batch-level rules and
        for straight-through estimators."""
        return self.activation(hidden_pre)

    def published(self) -> SAE:
        """The SAE in the form it is saved for inference (itself, unless overridden)."""
        return self

    @torch.no_grad()
    def post_optimizer_step(self) -> None:
        """Called by the trainer after each optimizer step to keep constraints (e.g. theta > 0)."""

    # ----- shared behaviour ----------------------------------------------------------------

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Decoder rows of norm `decoder_init_norm` in random directions, W_enc = W_dec^T,
        biases zero."""
        w_dec = torch.randn(self.W_dec.shape, device=self.W_dec.device, dtype=torch.float32)
        w_dec = self.decoder_init_norm * w_dec / w_dec.norm(dim=1, keepdim=True)
        self.W_dec.copy_(w_dec)
        if self.W_enc.shape == (self.cfg.d_in, self.cfg.d_sae) and self.cfg.d_in == w_dec.shape[1]:
            self.W_enc.copy_(w_dec.T)
        else:  # transcoder with d_out != d_in: the transpose has the wrong shape
            bound = 1 / math.sqrt(self.cfg.d_in)
            self.W_enc.uniform_(-bound, bound)

    @property
    def device(self) -> torch.device:
        return self.W_dec.device

    @property
    def dtype(self) -> torch.dtype:
        return self.W_dec.dtype

    def to(self, *args: Any, **kwargs: Any) -> SAE:  # type: ignore[override]
        """Move/cast like nn.Module.to, keeping `cfg.device` and `cfg.dtype` in step."""
        super().to(*args, **kwargs)
        self.cfg.device = str(self.W_dec.device)
        self.cfg.dtype = dtype_name(self.W_dec.dtype)
        return self

    def _check_width(self, x: Tensor, expected: int, what: str) -> None:
        if x.shape[-1] != expected:
            raise ValueError(
                f"{what} has last dimension {x.shape[-1]} but this SAE expects {expected} "
                f"(shape given: {tuple(x.shape)})"
            )

    def prepare_input(self, x: Tensor) -> Tensor:
        """Cast, flatten heads, normalise: [..., d_in] -> [..., d_in] in the SAE's dtype."""
        if self.cfg.reshape_activations == "hook_z":
            if x.ndim < 2 or x.shape[-2] * x.shape[-1] != self.cfg.d_in:
                raise ValueError(
                    f"reshape_activations='hook_z' expects input [..., n_heads, d_head] with "
                    f"n_heads * d_head = d_in = {self.cfg.d_in}, got shape {tuple(x.shape)}"
                )
            self._head_shape = (x.shape[-2], x.shape[-1])
            x = x.flatten(-2)  # [..., n_heads * d_head]
        self._check_width(x, self.cfg.d_in, "input")
        x = x.to(self.dtype)
        mode = self.cfg.normalize_activations
        if mode == "constant_norm_rescale":
            scale = math.sqrt(self.cfg.d_in) / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)
            self._norm_state = NormState(None, scale)
            x = x * scale
        elif mode == "layer_norm":
            mean = x.mean(dim=-1, keepdim=True)
            std = x.std(dim=-1, keepdim=True) + 1e-5
            self._norm_state = NormState(mean, 1 / std)
            x = (x - mean) / std
        return x

    def restore_output(self, recon: Tensor) -> Tensor:
        """Undo `prepare_input`'s normalisation and head flattening on a reconstruction."""
        state = self._norm_state
        if state is not None and self.cfg.normalize_activations != "none":
            recon = recon / state.scale
            if state.shift is not None:
                recon = recon + state.shift
        if self.cfg.reshape_activations == "hook_z" and self._head_shape is not None:
            recon = recon.unflatten(-1, self._head_shape)  # [..., n_heads, d_head]
        return recon

    def center(self, x: Tensor) -> Tensor:
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    def encode(self, x: Tensor) -> Tensor:
        """Latents for activations [..., d_in] (or [..., n_heads, d_head]) -> [..., d_sae]."""
        return self.encode_parts(self.center(self.prepare_input(x)))[1]

    def decode(self, latents: Tensor) -> Tensor:
        """Reconstruction from latents [..., d_sae] -> [..., d_out], in the input's scale."""
        self._check_width(latents, self.cfg.d_sae, "latents")
        recon = latents.to(self.dtype) @ self.W_dec + self.b_dec
        return self.restore_output(recon)

    def forward(self, x: Tensor) -> Tensor:
        """decode(encode(x)): the reconstruction, same shape as the input."""
        return self.decode(self.encode(x))

    def training_forward(
        self,
        x: Tensor,
        target: Tensor | None = None,
        settings: LossSettings | None = None,
        dead_mask: Tensor | None = None,
        last_l0: float | None = None,
    ) -> TrainingOutput:
        """One training forward pass on x [batch, d_in] (target [batch, d_out] for transcoders).

        `dead_mask` [d_sae] marks latents the trainer considers dead (for AuxK). `last_l0` is
        the trainer's latents per token in its previous step (None: unknown), by which an
        architecture may choose how it computes this step, never what it computes.
        The MSE is the mean over tokens of the squared error summed over features.
        """
        settings = settings or LossSettings()
        if self.cfg.normalize_activations in ("constant_norm_rescale", "layer_norm"):
            raise ValueError(
                "training runs on activations the data pipeline has already normalised; "
                f"normalize_activations={self.cfg.normalize_activations!r} is for inference"
            )
        if self.is_transcoder and target is None:
            raise ValueError("a transcoder needs `target`, the activation at its output hook")
        x = self.prepare_input(x)
        target = x if target is None else target.to(self.dtype)
        self._check_width(target, self.cfg.output_width, "target")
        centred = self.center(x)
        hidden_pre, latents, recon = self.training_pass(x, centred, settings, last_l0)
        losses = {"mse": squared_error(recon, target)}
        losses.update(self.sparsity_losses(x, hidden_pre, latents, settings))
        if dead_mask is not None and dead_mask.any():
            residual = target - recon
            losses.update(
                self.dead_latent_losses(centred, hidden_pre, residual, dead_mask, settings)
            )
        total = torch.stack(list(losses.values())).sum()
        return TrainingOutput(recon, latents, total, losses)

    def training_pass(
        self, x: Tensor, centred: Tensor, settings: LossSettings, last_l0: float | None = None
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(pre-activations, latents, reconstruction) for a prepared input x [batch, d_in];
        `centred` is `center(x)`; `last_l0` as in `training_forward`."""
        encoder_input, centre = self.encoder_input(x, centred)
        hidden_pre, latents = self.encode_parts(encoder_input, settings, centre)
        return hidden_pre, latents, self.reconstruct(x, latents)

    def sparse_training_pass(
        self, centred: Tensor, select: Callable[[Tensor], tuple[Tensor, Tensor]]
    ) -> tuple[Tensor, SelectedLatents, Tensor]:
        """`training_pass` through the sparse kernel: the encoder's matmul, then only the
        (token, latent) pairs `select` picks from the pre-activations are decoded and get
        gradients (a pair picked at or below zero has value ReLU(h) = 0)."""
        hidden_pre = self.pre_activations_without_graph(centred)
        token, latent = select(hidden_pre)
        recon, values = sparse_decode(
            centred, self.W_enc, self.b_enc, self.W_dec, self.b_dec, hidden_pre, token, latent
        )
        return hidden_pre, SelectedLatents(token, latent, values, hidden_pre.shape), recon

    def pre_activations_without_graph(self, centred: Tensor) -> Tensor:
        """centred @ W_enc + b_enc [batch, d_sae] for the sparse training paths, whose own
        backward stands in for the matmul's."""
        # An explicit output opts out of autocast, which would cost the low-precision matmul.
        autocast = torch.is_autocast_enabled(centred.device.type)
        memory = None if autocast else self._pre_activation_memory(centred)
        return encoder_pre_activations(centred, self.W_enc, self.b_enc, out=memory)

    def _pre_activation_memory(self, centred: Tensor) -> Tensor:
        """[batch, d_sae] memory for the pre-activations, kept from step to step.

        Nothing holds the pre-activations past the training pass (the values are gathered
        from them), and writing a fresh [batch, d_sae] tensor costs a page fault per page:
        the encoder matmul ran at 42 GFLOP/s into new memory against 56 into reused."""
        shape = (centred.shape[0], self.cfg.d_sae)
        held: Tensor | None = getattr(self, "_pre_activations", None)
        if (
            held is None or held.shape != shape or held.dtype != centred.dtype
            or held.device != centred.device
        ):
            held = self._pre_activations = centred.new_empty(shape)
        return held

    def encoder_input(self, x: Tensor, centred: Tensor) -> tuple[Tensor, Tensor | None]:
        """(input, centre) for `encode_parts` during training.

        Handing the encoder x and b_dec separately, rather than x - b_dec, spares the one big
        matmul of the backward pass that is not needed: the gradient of the centred input
        [batch, d_in], which only b_dec (broadcast over the batch) would consume.
        """
        if self.cfg.apply_b_dec_to_input:
            return x, self.b_dec
        return centred, None

    def reconstruct(self, x: Tensor, latents: Tensor) -> Tensor:
        """Reconstruction during training (transcoders with a skip path add it here)."""
        return latents @ self.W_dec + self.b_dec

    def dead_latent_losses(
        self,
        centred: Tensor,
        hidden_pre: Tensor,
        residual: Tensor,
        dead_mask: Tensor,
        settings: LossSettings,
    ) -> dict[str, Tensor]:
        """Auxiliary losses that revive dead latents (AuxK for topk-style SAEs)."""
        return {}

    def decoder_norms(self) -> Tensor:
        return self.W_dec.norm(dim=1)  # [d_sae]

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """Rescale so every decoder row has unit norm, keeping the SAE's function unchanged."""
        norms = self.decoder_norms().clamp_min(1e-12)
        self.W_dec /= norms[:, None]
        self.W_enc *= norms
        for name in self.per_latent_encoder_scales():
            getattr(self, name).mul_(norms)

    def per_latent_encoder_scales(self) -> tuple[str, ...]:
        """Per-latent encoder tensors that scale with W_enc's columns when folding norms."""
        return ("b_enc",)

    def latent_axes(self) -> dict[str, int]:
        """The parameters that hold one slice per latent, each with the axis it lies on:
        what resampling a latent starts afresh (weights and optimiser state)."""
        named = {"W_enc": 1, "W_dec": 0, **dict.fromkeys(self.per_latent_encoder_scales(), 0)}
        parameters = dict(self.named_parameters())
        return {name: axis for name, axis in named.items() if name in parameters}

    @torch.no_grad()
    def resample_latents(
        self, latents: Tensor, centred: Tensor, residual: Tensor, rows: Tensor,
        firing_rate: float,
    ) -> None:
        """Start `latents` [n] afresh, latent i on the poorly reconstructed example `rows[i]`
        of a training batch (`centred` [batch, d_in], the encoder's input; `residual`
        [batch, d_out], what the reconstruction missed).

        The decoder row points along the example's residual, at the live rows' mean norm; the
        encoder column along the same direction (along the example's input for a transcoder,
        whose input and output spaces differ), at `resample_encoder_share` of the live
        columns' mean norm; and the latent's bias or threshold is set so that it fires on
        `firing_rate` of the batch, the share a latent fires on at the run's L0 (a new latent
        firing on half the tokens would throw the L0 far off its target).
        """
        live = torch.ones(self.cfg.d_sae, dtype=torch.bool, device=latents.device)
        live[latents] = False
        if not bool(live.any()):
            live[:] = True
        decoder_dirs = _unit_rows(residual.index_select(0, rows))  # [n, d_out]
        same_space = not self.is_transcoder and decoder_dirs.shape[1] == centred.shape[1]
        encoder_dirs = decoder_dirs if same_space else _unit_rows(centred.index_select(0, rows))
        decoder_norm = self.decoder_norms()[live].mean()
        encoder_norm = self.W_enc.norm(dim=0)[live].mean() * self.resample_encoder_share
        self.W_dec[latents] = (decoder_dirs * decoder_norm).to(self.dtype)
        self.W_enc[:, latents] = (encoder_dirs * encoder_norm).T.to(self.dtype)
        products = centred.to(self.dtype) @ self.W_enc[:, latents]  # [batch, n]
        self.set_firing_point(latents, firing_points(products, firing_rate))

    @torch.no_grad()
    def set_firing_point(self, latents: Tensor, points: Tensor) -> None:
        """Make each of `latents` fire exactly where its encoder product x~ . W_enc[:, i]
        exceeds `points[i]` (biases and thresholds)."""
        self.b_enc[latents] = -points.to(self.dtype)

    def firing_point(self, latents: Tensor) -> Tensor:
        """The encoder product above which each of `latents` fires now."""
        return -self.b_enc[latents]

    @torch.no_grad()
    def lift_latents(self, latents: Tensor, centred: Tensor, rate: float) -> None:
        """Lower the firing points of `latents` (never raise them) so that each fires on at
        least `rate` of the batch `centred` [batch, d_in]; directions stay as they are."""
        centred = centred.to(self.dtype)
        products = self.latent_products(centred, latents)  # [batch, n]
        bar = self.competition_bar(centred)
        if bar is not None:  # firing also takes beating the token's bar (or the latent's)
            products = products - (bar if bar.shape[1] == 1 else bar.index_select(1, latents))
        lowered = torch.minimum(self.firing_point(latents), firing_points(products, rate))
        self.set_firing_point(latents, lowered)

    @property
    def latent_groups(self) -> int:
        """Groups of d_sae latents the SAE holds (1; a cross-layer transcoder has one per
        layer). The trainer tracks all of them, and its L0 is the mean over groups."""
        return 1

    def encoder_products(self, centred: Tensor) -> Tensor:
        """x~ . W_enc[:, i] for every latent [batch, latent_groups * d_sae]: what a latent's
        firing point is compared with, for a batch of encoder inputs."""
        return centred.to(self.dtype) @ self.W_enc

    def latent_products(self, centred: Tensor, latents: Tensor) -> Tensor:
        """`encoder_products` of `latents` only [batch, n] (one matmul of their columns)."""
        return centred.to(self.dtype) @ self.W_enc.index_select(1, latents)

    def competition_bar(self, centred: Tensor) -> Tensor | None:
        """For architectures where latents compete (top-k), what a latent's pre-activation
        must beat on each token of `centred` to fire ([batch, 1]); None where a latent fires
        on its own pre-activation alone."""
        return None

    @torch.no_grad()
    def fold_activation_norm_scaling_factor(self, scale: float) -> None:
        """Fold an input scaling x -> s*x into the weights, so raw activations can be fed.

        The SAE was trained on s*x and reconstructs s*x; afterwards it takes x and returns x.
        """
        self.W_enc *= scale
        self.W_dec /= scale
        self.b_dec /= scale

    # ----- construction, saving, loading ---------------------------------------------------

    @staticmethod
    def from_config(cfg: SAEConfig) -> SAE:
        """A freshly initialised SAE of the configured architecture."""
        return architecture_class(cfg.architecture)(cfg)

    @classmethod
    def config_defaults(
        cls, d_in: int, d_sae: int, target_l0: float | None = None
    ) -> dict[str, Any]:
        """Config fields this architecture needs beyond d_in and d_sae, with sensible values
        (the one place they default); `target_l0` is the latents per token asked for."""
        return {}

    @staticmethod
    def create(architecture: str, d_in: int, d_sae: int, **fields: Any) -> SAE:
        """A fresh SAE from just a name and sizes: `SAE.create("topk", 768, 24576, k=64)`."""
        cls = architecture_class(architecture)
        merged = {**cls.config_defaults(d_in, d_sae), **fields}
        return cls(SAEConfig(architecture=architecture, d_in=d_in, d_sae=d_sae, **merged))

    def save(self, path: str | Path, sparsity: Tensor | None = None) -> Path:
        """Write the SAE (in its published form) as a native folder, atomically.

        Raises NonFiniteWeights, writing nothing, when a weight is NaN or infinite: such a
        folder would load, evaluate to nulls and upload as if it were a trained SAE."""
        from saekit.io.native import check_sparsity, save_sae_folder

        # Checked before `published()`, which rebuilds some architectures from their tensors.
        check_finite_tensors(
            self.state_dict(), f"the SAE to be saved to {path}",
            "nothing was written; an SAE whose weights are not finite cannot be right",
        )
        publish = self.published()
        tensors = {name: t.detach() for name, t in publish.state_dict().items()}
        if sparsity is not None:
            check_sparsity(sparsity, publish.cfg.d_sae, f"the sparsity to be saved to {path}")
        return save_sae_folder(path, publish.cfg.to_dict(), tensors, sparsity)

    @staticmethod
    def load(
        path: str | Path, device: str | torch.device | None = None, dtype: str | None = None
    ) -> SAE:
        """Load a native folder (current or pre-6.0 flat cfg.json)."""
        from saekit.io.native import read_sae_folder

        folder = read_sae_folder(path, check_shapes=check_tensor_shapes)
        sae = SAE.from_tensors(folder.cfg, folder.tensors, source=str(folder.weights_path))
        return sae.to(device=device or "cpu", dtype=resolve_dtype(dtype))

    # SAELens's spellings (docs/coming-from-saelens.md).

    @classmethod
    def load_from_disk(
        cls, path: str | Path, device: str | torch.device = "cpu", dtype: str | None = None,
        fold_W_dec_norm: bool = False,
    ) -> SAE:
        """`SAE.load`, then `fold_W_dec_norm()` when asked."""
        sae = SAE.load(path, device=device, dtype=dtype)
        if fold_W_dec_norm:
            sae.fold_W_dec_norm()
        return sae

    def save_model(self, path: str | Path) -> SavedSAE:
        """`save`, returning the weights and cfg.json paths."""
        from saekit.io.native import CFG_FILE, WEIGHTS_FILE

        folder = self.save(path)
        return SavedSAE(folder / WEIGHTS_FILE, folder / CFG_FILE)

    def turn_on_forward_pass_hook_z_reshaping(self) -> None:
        """Take per-head input [..., n_heads, d_head] (cfg.reshape_activations "hook_z")."""
        hook = self.cfg.metadata.hook_name
        if hook is not None and not hook.endswith("_z"):
            raise ValueError(f"hook_z reshaping is for SAEs on hook_z hooks; this one reads {hook}")
        self.cfg.reshape_activations = "hook_z"

    def turn_off_forward_pass_hook_z_reshaping(self) -> None:
        """Take flat input [..., d_in] (cfg.reshape_activations "none")."""
        self.cfg.reshape_activations = "none"

    @staticmethod
    def from_pretrained(
        release: str,
        sae_id: str | None = None,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        *,
        fold_norm_scaling: bool = True,
        fold_W_dec_norm: bool = False,
        **fetch_options: Any,
    ) -> SAE:
        """Load a published SAE: a registry release name (`saekit pretrained list`), a Hub
        repo id `owner/name` (with `sae_id` the folder inside it) or a local folder.

        Returns the SAE (as SAELens 6 does), which also unpacks as the classic
        `sae, cfg_dict, sparsity` (cfg_dict: its config in the current cfg.json layout;
        sparsity: log10 firing frequency per latent, or None) and has `.cfg_dict`,
        `.sparsity` and `.sae` (itself) for code written for either;
        `from_pretrained_with_cfg_and_sparsity` returns that triple as a named tuple.

        `fetch_options` go to `saekit.io.pretrained.fetch_pretrained`: revision,
        force_download, token, cache_dir, endpoint, layout. A release's norm scaling factor
        is folded into the weights unless `fold_norm_scaling=False`; `fold_W_dec_norm=True`
        also rescales the decoder rows to unit norm (SAELens's argument).
        """
        from saekit.io.pretrained import fetch_pretrained

        parts = fetch_pretrained(
            release, sae_id, check_shapes=check_tensor_shapes, **fetch_options
        )
        target_dtype = resolve_dtype(dtype) or parts.cfg.torch_dtype
        # Build and fold in float32; cast and move once at the end.
        sae = SAE.from_tensors(parts.cfg.replace(dtype="float32"), parts.tensors, parts.source)
        if parts.norm_scaling_factor is not None and fold_norm_scaling:
            sae.fold_activation_norm_scaling_factor(parts.norm_scaling_factor)
            sae.cfg.normalize_activations = "none"
        elif sae.cfg.normalize_activations == "expected_average_only_in":
            log.warning(
                "%s expects inputs scaled to an average norm of sqrt(d_in) "
                "(normalize_activations='expected_average_only_in') and no scaling factor is "
                "known; scale activations yourself before encoding",
                parts.source,
            )
        if fold_W_dec_norm:
            sae.fold_W_dec_norm()
        sae.to(device=device, dtype=target_dtype)
        sparsity = None
        if parts.sparsity is not None:
            from saekit.io.native import check_sparsity

            check_sparsity(parts.sparsity, sae.cfg.d_sae, parts.source)
            sparsity = parts.sparsity.to(sae.device)
        return _unpackable(sae, sae.cfg.to_dict(), sparsity)

    @staticmethod
    def from_pretrained_with_cfg_and_sparsity(
        release: str, sae_id: str | None = None, device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None, **options: Any,
    ) -> PretrainedSAE:
        """`SAE.from_pretrained` as the triple `sae, cfg_dict, sparsity` (SAELens 6's name)."""
        sae = SAE.from_pretrained(release, sae_id, device, dtype, **options)
        return PretrainedSAE(sae, sae.cfg_dict, sae.sparsity)

    def push_to_hub(
        self,
        repo_id: str,
        sae_id: str | None = None,
        sparsity: Tensor | None = None,
        **upload_options: Any,
    ) -> str:
        """Upload to the Hugging Face Hub with a model card; `upload_options` (metrics,
        private, token, revision, commit_message, endpoint) go to `saekit.io.hub.push_to_hub`.
        Returns the commit URL."""
        from saekit.io.hub import push_to_hub

        with tempfile.TemporaryDirectory(prefix="saekit-push-") as tmp:
            folder = self.save(Path(tmp) / "sae", sparsity=sparsity)
            return push_to_hub(folder, repo_id, sae_id, **upload_options)

    @staticmethod
    def tensor_shapes(cfg: SAEConfig) -> dict[str, tuple[int, ...]]:
        """Every tensor an SAE of `cfg` holds, with its shape (`saekit.saes.shapes`)."""
        return tensor_shapes(cfg)

    @staticmethod
    def check_tensor_shapes(
        cfg: SAEConfig, shapes: dict[str, tuple[int, ...]], source: str = ""
    ) -> None:
        """Refuse tensors an SAE of `cfg` cannot take (`saekit.saes.shapes`)."""
        check_tensor_shapes(cfg, shapes, source)

    @classmethod
    def from_tensors(cls, cfg: SAEConfig, tensors: dict[str, Tensor], source: str = "") -> SAE:
        """Build an SAE from a config and a full set of named tensors.

        Every name, shape and value is checked (NaN and infinity are refused) before the
        SAE's memory is allocated, and it is not randomly initialised first: a cfg.json
        declaring a huge d_sae beside a small weights file fails at once."""
        SAE.check_tensor_shapes(cfg, {k: tuple(v.shape) for k, v in tensors.items()}, source)
        check_finite_tensors(
            tensors, source or "the tensors given",
            "the file is damaged, or the SAE was saved after its training diverged",
        )
        sae = unallocated(cfg)
        sae.to_empty(device=torch.device(cfg.device))
        # The built module carries a copy of cfg naming the meta device; hand back the
        # caller's config, as a normal construction does.
        if sae.cfg.architecture == cfg.architecture:
            sae.cfg = cfg
        else:
            sae.cfg.device = cfg.device
        with torch.no_grad():
            for name, target in sae.state_dict().items():
                target.copy_(tensors[name].to(target.dtype))
        return sae


def firing_points(products: Tensor, rate: float) -> Tensor:
    """Per column of `products` [batch, n], the value exceeded by `rate` of its rows (at
    least one row fires, and at most all)."""
    rows = products.shape[0]
    fire = min(max(round(rate * rows), 1), rows)
    if fire == rows:  # every row fires: just below the smallest
        return products.min(dim=0).values - 1e-6
    return products.kthvalue(rows - fire, dim=0).values


def _unit_rows(rows: Tensor) -> Tensor:
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)


def squared_error(recon: Tensor, target: Tensor) -> Tensor:
    """Mean over tokens of the squared error summed over features."""
    return (recon - target).pow(2).sum(dim=-1).mean()


def unexplained_share(
    recon: Tensor, target: Tensor, replica_mean: Callable[[Tensor], Tensor] | None = None
) -> Tensor:
    """The squared error of `recon` over the mean squared norm of `target` (per token).

    AuxK is measured this way (Gao et al. 2024): the residual it explains is a small share
    of the input once training is under way, and a plain squared error of it would give
    the dead latents gradients a hundredth of the live ones', which Adam, its moment
    estimates carrying the latents' live past, turns into steps far below the lr. Under
    data parallelism `replica_mean` averages the norm over the ranks' shards of the batch,
    so that the ranks together compute what one process would on the whole batch."""
    scale = target.detach().pow(2).sum(dim=-1).mean()
    if replica_mean is not None:
        scale = replica_mean(scale)
    return squared_error(recon, target) / scale.clamp_min(1e-12)


def auxiliary_reconstruction(
    values: Tensor, latents: Tensor, W_dec: Tensor, residual: Tensor, k_aux: int,
    replica_mean: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """AuxK's term (Gao et al. 2024) for `latents`, whose values on each token are `values`
    [batch, n] (built with their graph): every token keeps its k_aux largest positive values,
    which, decoded through those latents' rows of W_dec, must explain `residual` (what the
    live latents missed). Returns their `unexplained_share` of it."""
    top = values.detach().topk(min(k_aux, values.shape[1]), dim=1, sorted=False)
    kept = values.gather(1, top.indices) * (top.values > 0)
    chosen = torch.zeros_like(values).scatter(1, top.indices, kept)
    return unexplained_share(chosen @ W_dec.index_select(0, latents), residual, replica_mean)


def weighted_sum_mean(latents: Tensor, weights: Tensor) -> Tensor:
    """Mean over tokens of sum_i latents_i * weights_i, for latents [..., d_sae].

    Summed over tokens first, then dotted with the weights: the same value as
    `(latents * weights).sum(-1).mean()` without a [batch, d_sae] product, and its backward
    hands the latents a broadcast gradient instead of another [batch, d_sae] tensor.
    """
    flat = latents.reshape(-1, latents.shape[-1])
    return flat.sum(dim=0) @ weights / flat.shape[0]


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    return None if dtype is None else DTYPES[dtype_name(dtype)]
