"""Acausal crosscoders (Lindsey et al. 2024, "Sparse Crosscoders for Cross-Layer Features and
Model Diffing").

A crosscoder reads several sites at once, the same token's activation at n_sites places (some
layers of one model, or the same hook of several models) and holds one latent space for all
of them; every latent has an encoder slice and a decoder slice per site:

    f = act(sum_s x_s @ W_enc[s] + b_enc)          x_s [d_in], f [d_sae]
    x^_s = f @ W_dec[:, s] + b_dec[s]              every site reconstructed from the same f

Tensors (row-vector convention, as every saekit SAE): `W_enc` [n_sites, d_in, d_sae],
`b_enc` [d_sae], `W_dec` [d_sae, n_sites, d_in], `b_dec` [n_sites, d_in], and `threshold`
[d_sae] for batchtopk (its inference rule). Inputs are stacked per site, x [..., n_sites,
d_in]; the number of sites is kept in the config's `n_layers`.

The rule is `cfg.activation_fn`: relu, trained with an L1 penalty in which each latent's
activation is weighed by the sum over sites of its decoder norms (sum_i f_i sum_s
||W_dec[i, s]||, as published: a latent pays for every site it writes to, which is what
pushes site-specific features onto site-specific latents), topk (k per token) or batchtopk
(the top k * batch of a batch; at inference a learned threshold). The MSE is summed over
sites.

For model diffing, `relative_decoder_norms` gives each latent's share of decoder norm at one
site against another (0.5: the latent writes equally to both; 0 or 1: to one only) and
`classify_latents` / `relative_norm_table` sort latents into shared and site-only ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from saekit.config import SAEConfig
from saekit.saes.base import (
    SAE,
    DeadLatentRemedy,
    LossSettings,
    TrainingOutput,
    unexplained_share,
)
from saekit.saes.clt import (
    HOOKS_IN_KEY,
    MultiSiteLatents,
    stacked_input,
    stacked_squared_error,
)
from saekit.saes.registry import register_architecture
from saekit.saes.topk import THRESHOLD_EMA_RATE, keep_top_k

#: The rules a crosscoder's latents may follow.
CROSSCODER_ACTIVATIONS = ("relu", "topk", "batchtopk")
_TOPK_LIKE = ("topk", "batchtopk")
#: Metadata key holding the model behind each site when the sites are several models.
MODELS_KEY = "model_names"
#: Metadata key holding the hook of each site (the same key a CLT records its inputs under).
SITE_HOOKS_KEY = HOOKS_IN_KEY

#: Class names of `classify_latents`.
SHARED, A_ONLY, B_ONLY, NEITHER = "shared", "a_only", "b_only", "neither"
#: Relative norms below this are "a_only", above 1 minus it "b_only" (Lindsey et al. read
#: their histogram the same way: exclusive latents sit in narrow spikes at 0 and 1).
EXCLUSIVE_BAND = 0.1


@register_architecture("crosscoder")
class Crosscoder(MultiSiteLatents):
    """An acausal crosscoder: `SAE.create("crosscoder", d_in, d_sae, n_layers=2,
    activation_fn="relu")` (n_layers is the number of sites; see the module docstring)."""

    kind = "crosscoders"
    multi_site = True
    #: The L1 term weighs decoder norms, which unit norms would void; for top-k rules the
    #: trainer's row-wise constraint cannot express a norm spread over sites either.
    unit_norm_decoder = False
    # The class declares its default rule's (relu) answers and every loss term any rule has;
    # each crosscoder sets its own rule's answers when built (`_declare_rule`).
    loss_coefficients: ClassVar[dict[str, str | None]] = {
        "l1": "sparsity_coefficient", "aux_k": "aux_k_coefficient",
    }
    dead_latent_remedy: ClassVar[DeadLatentRemedy] = DeadLatentRemedy(lift_quiet=True)
    default_lr: ClassVar[float] = 3e-3

    def __init__(self, cfg: SAEConfig) -> None:
        if cfg.activation_fn not in _TOPK_LIKE and cfg.k is not None:
            cfg = cfg.replace(k=None)  # a default k means nothing to a relu crosscoder
        super().__init__(cfg)
        self._declare_rule()
        if cfg.activation_fn == "batchtopk":
            # Learned by a running average, not by gradient, hence a buffer.
            self.register_buffer(
                "threshold", torch.zeros(cfg.d_sae, device=self.device, dtype=self.dtype)
            )

    def _declare_rule(self) -> None:
        rule = self.activation_fn
        topk_like = rule in _TOPK_LIKE
        self.sparsity_control = "k" if topk_like else "coefficient"  # type: ignore[misc]
        self.loss_coefficients = (  # type: ignore[misc]
            {"aux_k": "aux_k_coefficient"} if topk_like else {"l1": "sparsity_coefficient"}
        )
        self.dead_latent_remedy = (  # type: ignore[misc]
            DeadLatentRemedy(losses=("aux_k",), lift_quiet=rule == "batchtopk")
            if topk_like else DeadLatentRemedy(lift_quiet=True)
        )

    @property
    def activation_fn(self) -> str:
        assert self.cfg.activation_fn is not None
        return self.cfg.activation_fn

    @property
    def n_sites(self) -> int:
        assert self.cfg.n_layers is not None
        return self.cfg.n_layers

    @classmethod
    def config_defaults(
        cls, d_in: int, d_sae: int, target_l0: float | None = None
    ) -> dict[str, Any]:
        return {"apply_b_dec_to_input": False, "activation_fn": "relu", "n_layers": 2}

    def validate_config(self, cfg: SAEConfig) -> None:
        super().validate_config(cfg)
        if cfg.n_layers is None:
            raise ValueError("a crosscoder needs n_layers (the number of sites it reads)")
        if cfg.activation_fn not in CROSSCODER_ACTIVATIONS:
            raise ValueError(
                f"activation_fn {cfg.activation_fn!r} is not a crosscoder rule; use one of "
                f"{', '.join(CROSSCODER_ACTIVATIONS)}"
            )
        if cfg.activation_fn in _TOPK_LIKE and cfg.k is None:
            raise ValueError(f"a {cfg.activation_fn} crosscoder needs k (latents per token)")
        if cfg.normalize_activations != "none" or cfg.reshape_activations != "none":
            raise ValueError(
                "a crosscoder reads activations as they are: normalize_activations and "
                "reshape_activations must be 'none'"
            )
        if cfg.matryoshka_widths is not None or cfg.rescale_acts_by_decoder_norm:
            raise ValueError(
                "matryoshka_widths and rescale_acts_by_decoder_norm are not for crosscoders"
            )

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        c, n = self.cfg, self.n_sites
        return {
            "W_enc": (n, c.d_in, c.d_sae),
            "b_enc": (c.d_sae,),
            "W_dec": (c.d_sae, n, c.d_in),
            "b_dec": (n, c.d_in),
        }

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Decoders in random directions, each latent's joint norm over sites
        1 for top-k rules (as topk SAEs start) and `decoder_init_norm` (0.1) for relu; each
        site's encoder the transpose of its decoder; biases zero."""
        scale = 1.0 if self.activation_fn in _TOPK_LIKE else self.decoder_init_norm
        w = torch.randn(self.W_dec.shape, device=self.W_dec.device, dtype=torch.float32)
        w = scale * w / w.pow(2).sum(dim=(1, 2), keepdim=True).sqrt()
        self.W_dec.copy_(w)
        self.W_enc.copy_(w.permute(1, 2, 0))

    # ----- inputs ---------------------------------------------------------------------------

    def prepare_input(self, x: Tensor) -> Tensor:
        """Cast [..., n_sites, d_in] to the crosscoder's dtype, checking its shape."""
        checked = stacked_input(x, self.n_sites, self.cfg.d_in, "a crosscoder", "site")
        return checked.to(self.dtype)

    def restore_output(self, recon: Tensor) -> Tensor:
        return recon

    def center(self, x: Tensor) -> Tensor:
        return x - self.b_dec if self.cfg.apply_b_dec_to_input else x

    # ----- encoding and decoding ------------------------------------------------------------

    def pre_activations(self, x: Tensor, centre: Tensor | None = None) -> Tensor:
        """h [..., d_sae] = sum_s x_s @ W_enc[s] + b_enc for inputs [..., n_sites, d_in]."""
        if centre is not None:
            x = x - centre
        return torch.einsum("...sd,sdm->...m", x, self.W_enc) + self.b_enc

    def activation(self, hidden_pre: Tensor) -> Tensor:
        rule = self.activation_fn
        if rule == "relu":
            return torch.relu(hidden_pre)
        assert self.cfg.k is not None
        if rule == "topk":
            return keep_top_k(torch.relu(hidden_pre), min(self.cfg.k, self.cfg.d_sae))
        return torch.relu(hidden_pre) * (hidden_pre > self.threshold)

    def encoder_products(self, centred: Tensor) -> Tensor:
        return torch.einsum("bsd,sdm->bm", centred.to(self.dtype), self.W_enc)

    def decode(self, latents: Tensor) -> Tensor:
        """Every site's reconstruction [..., n_sites, d_in] from latents [..., d_sae]."""
        self._check_width(latents, self.cfg.d_sae, "latents")
        return self._decode(latents.to(self.dtype), self.b_dec)

    def _decode(self, latents: Tensor, bias: Tensor | None) -> Tensor:
        flat = latents @ self.W_dec.reshape(self.cfg.d_sae, -1)  # all sites in one matmul
        out = flat.reshape(*latents.shape[:-1], self.n_sites, self.cfg.d_in)
        return out if bias is None else out + bias

    def reconstruct(self, x: Tensor, latents: Tensor) -> Tensor:
        return self._decode(latents, self.b_dec)

    # ----- training -------------------------------------------------------------------------

    def training_forward(
        self,
        x: Tensor,
        target: Tensor | None = None,
        settings: LossSettings | None = None,
        dead_mask: Tensor | None = None,
        last_l0: float | None = None,
    ) -> TrainingOutput:
        """One training pass on x [batch, n_sites, d_in] (the target is x itself); the MSE
        sums the squared error over sites and features."""
        settings = settings or LossSettings()
        x = self.prepare_input(x)
        if target is not None and tuple(target.shape) != tuple(x.shape):
            raise ValueError(
                f"a crosscoder reconstructs its input; target {tuple(target.shape)} differs "
                f"from the input {tuple(x.shape)}"
            )
        target = x if target is None else target.to(self.dtype)
        centred = self.center(x)
        hidden_pre = self.pre_activations(centred)  # [batch, d_sae]
        latents = self.training_latents(hidden_pre, settings)
        recon = self._decode(latents, self.b_dec)
        losses = {"mse": stacked_squared_error(recon, target)}
        losses.update(self.sparsity_losses(x, hidden_pre, latents, settings))
        if dead_mask is not None and dead_mask.any():
            residual = target - recon
            losses.update(
                self.dead_latent_losses(centred, hidden_pre, residual, dead_mask, settings)
            )
        total = torch.stack(list(losses.values())).sum()
        return TrainingOutput(recon, latents, total, losses)

    def training_latents(self, hidden_pre: Tensor, settings: LossSettings) -> Tensor:
        if self.activation_fn != "batchtopk":
            return self.activation(hidden_pre)
        assert self.cfg.k is not None
        scores = torch.relu(hidden_pre)
        flat = scores.reshape(-1)
        keep = min(self.cfg.k * scores.shape[0], flat.numel())
        top = flat.topk(keep, sorted=False)
        if self.training:
            self._update_threshold(top.values.detach())
        return torch.zeros_like(flat).scatter(0, top.indices, top.values).reshape(scores.shape)

    @torch.no_grad()
    def _update_threshold(self, kept: Tensor) -> None:
        """Move the inference threshold towards the smallest positive value kept."""
        kept = kept[kept > 0]
        if kept.numel() == 0:
            return
        smallest = kept.min().to(self.threshold.dtype)
        if bool((self.threshold == 0).all()):
            self.threshold.fill_(smallest)
        else:
            self.threshold.lerp_(smallest.expand_as(self.threshold), THRESHOLD_EMA_RATE)

    def site_decoder_norms(self) -> Tensor:
        """[d_sae, n_sites]: the norm of each latent's decoder at each site."""
        return self.W_dec.norm(dim=-1)

    def decoder_norms(self) -> Tensor:
        """[d_sae]: each latent's decoder norms summed over sites (the L1 weight)."""
        return self.site_decoder_norms().sum(dim=1)

    def sparsity_losses(
        self, x: Tensor, hidden_pre: Tensor, latents: Tensor, settings: LossSettings
    ) -> dict[str, Tensor]:
        if self.activation_fn != "relu":
            return {}
        penalty = latents.sum(dim=0) @ self.decoder_norms() / latents.shape[0]
        return {"l1": settings.sparsity_coefficient * penalty}

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
        # AuxK: the top k_aux dead latents explain what the live ones missed at every site.
        k_aux = min(settings.k_aux or self.cfg.d_in // 2, int(dead_mask.sum()))
        masked = hidden_pre.detach().masked_fill(~dead_mask, float("-inf"))
        top = masked.topk(k_aux, dim=-1, sorted=False)
        values = torch.relu(hidden_pre).gather(-1, top.indices)
        values = torch.where(top.values > 0, values, torch.zeros_like(values))
        aux_latents = torch.zeros_like(hidden_pre).scatter(-1, top.indices, values)
        aux = unexplained_share(
            self._decode(aux_latents, None), residual.detach(), settings.replica_mean
        )
        return {"aux_k": settings.aux_k_coefficient * aux}

    # ----- dead-latent remedies -------------------------------------------------------------

    @torch.no_grad()
    def competition_bar(self, centred: Tensor) -> Tensor | None:
        if self.activation_fn not in _TOPK_LIKE:
            return None
        assert self.cfg.k is not None
        scores = torch.relu(self.pre_activations(centred.to(self.dtype)))  # [batch, d_sae]
        if self.activation_fn == "topk":
            return scores.topk(min(self.cfg.k, scores.shape[-1]), dim=-1).values[:, -1:]
        keep = min(self.cfg.k * scores.shape[0], scores.numel())
        bar = scores.flatten().topk(keep, sorted=False).values.min()
        return bar.expand(scores.shape[0], 1)

    # ----- folding --------------------------------------------------------------------------

    @torch.no_grad()
    def fold_W_dec_norm(self) -> None:
        """Scale each latent so its site decoder norms sum to 1, the function unchanged
        (refused for top-k rules, whose ranking a per-latent scale would change)."""
        if self.activation_fn != "relu":
            raise ValueError(
                f"folding decoder norms into a {self.activation_fn} crosscoder would change "
                "which latents are kept"
            )
        norms = self.decoder_norms().clamp_min(1e-12)
        self.W_dec /= norms[:, None, None]
        self.W_enc *= norms
        self.b_enc *= norms


def relative_decoder_norms(crosscoder: SAE, a: int = 0, b: int = 1) -> Tensor:
    """[d_sae]: ||W_dec[i, b]|| / (||W_dec[i, a]|| + ||W_dec[i, b]||) for every latent i.

    0.5 means the latent writes as strongly to site a as to site b (a shared feature); near 0
    it writes to a only, near 1 to b only. A latent with no decoder at either site gets NaN.
    """
    if not isinstance(crosscoder, Crosscoder):
        raise ValueError(
            f"relative decoder norms are for crosscoders, got a {crosscoder.cfg.architecture!r}"
        )
    return relative_norms(crosscoder.site_decoder_norms().detach().float(), a, b)


def relative_norms(site_norms: Tensor, a: int = 0, b: int = 1) -> Tensor:
    """`relative_decoder_norms` from the decoder norms themselves, site_norms [d_sae, n_sites]
    (as `Crosscoder.site_decoder_norms` gives them, or as feature statistics keep them)."""
    n = site_norms.shape[1]
    for name, site in (("a", a), ("b", b)):
        if not 0 <= site < n:
            raise ValueError(f"site {name}={site} is out of range for a crosscoder over {n} sites")
    if a == b:
        raise ValueError(f"sites a and b must differ, both are {a}")
    norm_a, norm_b = site_norms[:, a], site_norms[:, b]
    total = norm_a + norm_b
    return torch.where(total > 0, norm_b / total.clamp_min(1e-30), torch.nan)


def site_shares(site_norms: Tensor) -> Tensor:
    """[d_sae, n_sites]: each site's share of a latent's decoder norms summed over all sites
    (rows sum to 1; NaN for a latent with no decoder anywhere). With two sites the share of
    site 1 is the relative norm."""
    total = site_norms.sum(dim=1, keepdim=True)
    return torch.where(total > 0, site_norms / total.clamp_min(1e-30), torch.nan)


def site_names(crosscoder: SAE) -> list[str]:
    """A readable name per site from the metadata: the model names when the sites are several
    models (with the hook when the hooks differ too), else the hook names, else "site i"."""
    meta = crosscoder.cfg.metadata
    n = crosscoder.cfg.n_layers or 0
    hooks = _names_list(meta.extra.get(SITE_HOOKS_KEY), n)
    models = _names_list(meta.extra.get(MODELS_KEY), n)
    if models is not None and len(set(models)) == n:
        if hooks is not None and len(set(hooks)) > 1:
            return [f"{model} {hook}" for model, hook in zip(models, hooks, strict=True)]
        return models
    if hooks is not None and len(set(hooks)) == n:
        return hooks
    return [f"site {i}" for i in range(n)]


def _names_list(value: Any, n: int) -> list[str] | None:
    """`value` when it is n non-empty strings, else None."""
    if isinstance(value, (list, tuple)) and len(value) == n:
        if all(isinstance(v, str) and v for v in value):
            return [str(v) for v in value]
    return None


def classify_latents(relative: Tensor, band: float = EXCLUSIVE_BAND) -> list[str]:
    """A class per latent from its relative decoder norm (`relative_decoder_norms`):
    "a_only" below `band`, "b_only" above 1 - band, "shared" in between, "neither" for NaN
    (a latent with no decoder at either site)."""
    if not 0 < band < 0.5:
        raise ValueError(f"band must lie strictly between 0 and 0.5, got {band}")
    classes = []
    for value in relative.tolist():
        if value != value:  # NaN
            classes.append(NEITHER)
        elif value < band:
            classes.append(A_ONLY)
        elif value > 1 - band:
            classes.append(B_ONLY)
        else:
            classes.append(SHARED)
    return classes


def relative_norm_table(
    crosscoder: SAE, a: int = 0, b: int = 1, band: float = EXCLUSIVE_BAND
) -> list[dict[str, Any]]:
    """One row per latent: {"latent", "norm_a", "norm_b", "relative_norm", "class"}, for a
    report or a dashboard filter (classes as in `classify_latents`)."""
    relative = relative_decoder_norms(crosscoder, a, b)
    assert isinstance(crosscoder, Crosscoder)
    norms = crosscoder.site_decoder_norms().detach().float()
    classes = classify_latents(relative, band)
    return [
        {
            "latent": i, "norm_a": float(norms[i, a]), "norm_b": float(norms[i, b]),
            "relative_norm": float(relative[i]), "class": classes[i],
        }
        for i in range(relative.shape[0])
    ]


#: The classes in the order they are counted, listed and coded: a's side to b's, then none.
CLASS_ORDER = (A_ONLY, SHARED, B_ONLY, NEITHER)


def count_classes(classes: Iterable[str]) -> dict[str, int]:
    """How many latents fall in each class, given a class per latent (as `classify_latents`
    gives them), every class of `CLASS_ORDER` present, in that order. The one counter behind
    `class_counts`, `CrosscoderNorms.counts` and the counts a training run records."""
    counts = dict.fromkeys(CLASS_ORDER, 0)
    for name in classes:
        if name not in counts:
            raise ValueError(f"{name!r} is not a latent class; the classes are {CLASS_ORDER}")
        counts[name] += 1
    return counts


def class_counts(table: list[dict[str, Any]]) -> dict[str, int]:
    """How many latents of a `relative_norm_table` fall in each class (`count_classes`)."""
    return count_classes(row["class"] for row in table)


def crosscoder_sites(
    crosscoder: Crosscoder, models: Sequence[Any], hooks: str | Sequence[str] | None
) -> list[str]:
    """The hook of every site, checked against the crosscoder's n_sites: `hooks` as given (a
    single name means that hook in every model), else the ones its metadata records."""
    n = crosscoder.n_sites
    if len(models) not in (1, n):
        raise ValueError(
            f"a crosscoder over {n} sites reads one model at {n} hooks or {n} models, got "
            f"{len(models)} models"
        )
    if hooks is None:
        hooks = crosscoder.cfg.metadata.extra.get(SITE_HOOKS_KEY)
        if hooks is None:
            raise ValueError("no hooks given and the crosscoder records none; pass hooks")
    if isinstance(hooks, str):
        if len(models) == 1:
            raise ValueError(
                f"one model and one hook make one site, but the crosscoder reads {n}; pass "
                f"{n} hooks (layers) or {n} models"
            )
        hooks = [hooks] * len(models)
    hooks = list(hooks)
    if not all(isinstance(h, str) for h in hooks) or len(hooks) != n:
        raise ValueError(f"a crosscoder over {n} sites needs {n} hook names, got {hooks!r}")
    if len(models) == 1 and len(set(hooks)) != n:
        raise ValueError(f"the hooks of one model must differ, got {hooks!r}")
    return hooks
