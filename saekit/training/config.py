"""Training-run configuration: four small sections (sae, data, training, run) in one TrainConfig.

Each field is documented once, by the string under it; that text is also the field's `--help`.
Validation collects every problem in every section and reports them together, so a user fixes
a config in one pass rather than one error at a time.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from saekit.config import DTYPES
from saekit.saes import DEFAULT_ARCHITECTURE
from saekit.saes.base import DEAD_PRE_ACT_DEFAULT, DeadLatentRemedy
from saekit.training.fields import (
    NON_NEGATIVE,
    POSITIVE,
    Bounds,
    ConfigError,
    check_problems,
    coerce_fields,
    field_problems,
    fits_type,
    read_config_file,
    suggest,
)

LR_SCHEDULES = ("constant", "cosine", "linear")
B_DEC_INITS = ("zeros", "mean", "geometric_median")
DECODER_NORMS = ("auto", "unit", "free")
MODEL_BACKENDS = ("auto", "hf", "transformer_lens")
PARALLEL_MODES = ("data", "sae")
#: The pre-activation loss weight of learned-threshold SAEs whose straight-through
#: gradients reach the encoder (see TrainingSection.threshold_pre_act_coefficient).
THRESHOLD_PRE_ACT_DEFAULT = 1e-3
#: The longest default dead-latent window, in tokens (TrainingSection.dead_after_tokens).
DEAD_WINDOW_LIMIT = 1_000_000
#: The file in a run folder that holds its TrainConfig (`--config` can re-run it).
RUN_CONFIG_FILE = "run_config.yaml"


@dataclass
class SAESection:
    """The SAE to train."""

    architecture: str = DEFAULT_ARCHITECTURE
    """SAE architecture: a registered name, in any case (`saekit train --help` lists them;
    `--import MODULE` or an installed plug-in adds your own)."""
    d_sae: int | None = None
    """Number of latents; overrides expansion_factor when given."""
    expansion_factor: int = 16
    """Latents per input dimension (d_sae = expansion_factor * d_in) when d_sae is not given."""
    k: int | None = None
    """Latents kept per token, for architectures whose sparsity is k (default: target_l0
    when given, else the architecture's default, 64 for the built-in ones)."""
    matryoshka_widths: list[int] | None = None
    """Nested prefix widths ending at d_sae, for architectures that take them (default: the
    architecture's, d_sae/4, d_sae/2, d_sae for the built-in one)."""
    apply_b_dec_to_input: bool = True
    """Subtract b_dec from the input before encoding (forced off for transcoders whose
    output width differs from their input width)."""
    norm_scaling: bool = True
    """Scale activations by sqrt(d_in) / E||x|| during training (estimated from the data);
    the factor is folded into the weights at the end, so the saved SAE takes raw activations
    (unlike an SAE config's normalize_activations, a mode the SAE applies at inference)."""
    activation_fn: str | None = None
    """The latents' rule, for architectures that take one: clt (topk, batchtopk, jumprelu,
    relu; default topk) and crosscoder (relu, topk, batchtopk; default relu). The topk rules
    keep k per token (k, or target_l0); the others set their sparsity with
    sparsity_coefficient or target_l0 (docs/crosslayer.md)."""
    init_from: str | None = None
    """Fine-tune: start from this saved or published SAE instead of fresh weights (a saved
    SAE or finished run folder, RELEASE/SAE_ID from `saekit pretrained list`, or a Hub repo
    owner/name[/folder]). Its architecture, width, k and hook(s) become the run's; settings
    given that contradict them are refused before any work (docs/pretrained.md)."""

    def problems(self) -> list[str]:
        # Every field is checked for its type (NaN and infinity are no setting's value);
        # these are the ranges of the numeric ones.
        bounds = {
            "d_sae": POSITIVE, "expansion_factor": POSITIVE, "k": POSITIVE,
            "matryoshka_widths": POSITIVE,
        }
        out = field_problems(self, bounds)
        from saekit.saes import list_architectures

        if isinstance(self.architecture, str) and not self.known:
            out.append(
                f"architecture {self.architecture!r} is not known; use one of "
                f"{', '.join(list_architectures())}"
            )
        out.extend(self._rule_problems())
        if self.k is not None and self.known and not self.sets_k:
            if self.activation_fn is not None or self._rules:
                out.append(
                    f"k applies to the topk and batchtopk rules, not to a "
                    f"{self.activation_fn or self._default_rule} {self.architecture!r}; give "
                    "activation_fn topk (or batchtopk) with k, or set its sparsity with "
                    "target_l0 or sparsity_coefficient"
                )
            else:
                out.append(
                    "k applies to architectures whose sparsity is k "
                    f"({', '.join(k_architectures())}), not {self.architecture!r}; use "
                    "target_l0 or sparsity_coefficient to set its sparsity"
                )
        if isinstance(self.init_from, str) and not self.init_from.strip():
            out.append(
                "init_from must name a saved SAE folder, RELEASE/SAE_ID or a Hub repo, got an "
                "empty string"
            )
        return out

    @property
    def known(self) -> bool:
        from saekit.saes import architecture_class

        try:
            architecture_class(self.architecture)
        except ValueError:
            return False
        return True

    @property
    def sets_k(self) -> bool:
        """Whether the architecture's sparsity is k (latents kept per token); for one that
        takes a rule (clt, crosscoder), whether its activation_fn does."""
        from saekit.saes import architecture_class

        if self._rules:
            from saekit.training.multisite_plan import sets_k

            return sets_k(self.architecture, self.activation_fn)
        return architecture_class(self.architecture).sparsity_control == "k"

    @property
    def _rules(self) -> tuple[str, ...]:
        """The rules the architecture takes as activation_fn (() when it takes none)."""
        from saekit.training.multisite_plan import rules_of

        return rules_of(self.architecture) if self.known else ()

    @property
    def _default_rule(self) -> str | None:
        from saekit.training.multisite_plan import default_rule

        return default_rule(self.architecture)

    def _rule_problems(self) -> list[str]:
        if not isinstance(self.activation_fn, str) or not self.known:
            return []
        rules = self._rules
        if not rules:
            return [
                f"activation_fn chooses the latents' rule of architectures that take one "
                f"(clt, crosscoder); {self.architecture!r} has its rule in its name, so leave "
                "activation_fn out (or pick another architecture)"
            ]
        if self.activation_fn not in rules:
            return [
                f"activation_fn {self.activation_fn!r} is not a rule of "
                f"{self.architecture!r}; use one of {', '.join(rules)}"
            ]
        return []

    def __post_init__(self) -> None:
        check_problems(self.problems())
        from saekit.saes.registry import canonical_architecture

        self.architecture = canonical_architecture(self.architecture)  # the registered case


@dataclass
class DataSection:
    """Where the activations come from."""

    model: str = "bundled"
    """Model to read: "bundled" (the demo model), a local Hugging Face folder, a Hub id or a
    TransformerLens model name."""
    backend: str = "auto"
    """Library that runs the model: hf (Hugging Face transformers; hooks are module paths,
    with TransformerLens names as aliases), transformer_lens, or auto: TransformerLens for
    official TransformerLens model names, Hugging Face for everything else."""
    hook_name: str | list[str] | None = None
    """Hook the SAE reads, e.g. blocks.2.hook_resid_pre or a module path (default: the
    residual stream before the middle layer, or the cache's hook when activations names a
    one-hook cache). Several names, or glob patterns such as blocks.*.hook_resid_pre, train
    one SAE per hook from one model pass, each in its own sub-folder (docs/training.md:
    all layers and sweeps); a crosscoder reads them all as its sites. A clt reads, at each
    of its layers, this template (blocks.{layer}.hook_resid_mid, or one layer's name; default
    blocks.{layer}.ln2.hook_normalized, the MLP input). Also --hook."""
    hook_name_out: str | None = None
    """Transcoders: the hook whose activation is reconstructed (default: the mlp output
    of the layer read by hook_name); for a clt, a template like hook_name (default
    blocks.{layer}.hook_mlp_out). Also --hook-out."""
    layers: str | None = None
    """Train one SAE per layer: hook_name with {layer} replaced by each of these layers, or,
    without {layer}, with its one layer number replaced (default hook:
    blocks.{layer}.hook_resid_pre). Ranges and lists: 0-11 (both ends), 0-11:2 (every second),
    0,3,5-7. For a clt: the layers it spans (default: every layer); for a crosscoder: its
    sites, one per layer."""
    model_b: str | None = None
    """Model diffing: a crosscoder reads the same hook in model (site a) and in this second
    model (site b), both on the same tokens, so the two must share a tokenizer; named like
    model, loaded with the same backend and devices (docs/crosslayer.md)."""
    dataset: str = "bundled"
    """Text dataset: "bundled" (the demo corpus), a local file or folder, or a Hub id."""
    activations: str | None = None
    """A folder written by `saekit cache`: training reads activations from it instead of
    running the model (the cache must match model, hook(s), width and context_size, and
    hold at least tokens rows). The model is still loaded for the final held-out
    evaluation, which needs it for the CE loss."""
    context_size: int = 128
    """Tokens per sequence fed to the model."""
    shuffle_tokens: int = 1_048_576
    """Training reads its windows of text in a random order from a pool of about this many
    tokens (context_size-token windows), so a batch mixes passages from all over that
    stretch of the dataset rather than one passage (saekit.data.window_pool); 0 reads the
    dataset in its order. Not used with activations (the cache reader mixes its rows)."""
    prepend_bos: bool | None = None
    """Start every sequence with the BOS token (true) or with no special token (false).
    Default: what the tokenizer does (BOS when it has one; BERT-style tokenizers frame each
    sequence with their own [CLS] ... [SEP]; Qwen-style ones add nothing). Special tokens'
    activations are never trained on."""
    eval_tokens: int = 102_400
    """Held-out tokens for the final evaluation (metrics.json); 0 skips it. They come from
    eval_dataset when given, else the dataset's test or validation split, else whole
    documents of the dataset that training never reads (every 10th from the first, as many
    as the evaluation needs)."""
    eval_dataset: str | None = None
    """Held-out text for the final evaluation, report and dashboard (a local file or folder
    or a Hub id); default: see eval_tokens."""
    eval_split: str | None = None
    """Split of eval_dataset (default: its test, then validation split, else all of it), or,
    without eval_dataset, a held-out split of dataset."""
    device_map: str | None = None
    """Hugging Face models: shard the model over the visible devices (e.g. auto, which needs
    accelerate) for models larger than one device; model_device is then ignored."""

    def problems(self) -> list[str]:
        # Every field is checked for its type (NaN and infinity are no setting's value);
        # these are the ranges of the numeric ones.
        bounds = {
            "context_size": POSITIVE, "eval_tokens": NON_NEGATIVE, "shuffle_tokens": NON_NEGATIVE,
        }
        out = field_problems(self, bounds)
        if self.backend not in MODEL_BACKENDS:
            out.append(f"backend {self.backend!r} is not one of {', '.join(MODEL_BACKENDS)}")
        if isinstance(self.activations, str) and not self.activations.strip():
            out.append("activations must name a cache folder, got an empty string")
        if isinstance(self.hook_name, list) and not self.hook_name:
            out.append("hook_name must name at least one hook, got an empty list")
        if isinstance(self.layers, str):
            from saekit.training.sweeps import parse_layers

            try:
                parse_layers(self.layers)
            except ValueError as err:
                out.append(str(err))
        return out

    def __post_init__(self) -> None:
        if isinstance(self.hook_name, list) and len(self.hook_name) == 1:
            self.hook_name = self.hook_name[0]  # `--hook-name X`: one hook, as before
        check_problems(self.problems())


@dataclass
class TrainingSection:
    """How one SAE is optimised. The trainer reads only this section."""

    tokens: int = 307_200
    """Training tokens in total (the default suits the bundled demo model: about two minutes
    on a laptop CPU)."""
    batch_size: int = 4096
    """Tokens per optimisation step."""
    lr: float | None = None
    """Peak learning rate of Adam (beta1 0.9, beta2 0.999); None: the architecture's
    (SAE.default_lr: 3e-3 for standard SAEs and transcoders, 1e-3 for the others; figures:
    benchmarks/README.md)."""
    lr_schedule: str = "constant"
    """constant | cosine (to zero at the end) | linear (decays to zero over the last
    lr_decay_fraction of training)."""
    lr_warmup_tokens: int = 0
    """Tokens of linear learning-rate warm-up from zero."""
    lr_decay_fraction: float = 0.2
    """linear schedule: fraction of training, at the end, over which lr decays to zero."""
    sparsity_coefficient: float = 5.0
    """Sparsity coefficient lambda, the weight of the architecture's sparsity penalty (an L1
    of latents, or an L0 count for learned-threshold SAEs); the starting value when
    target_l0 is set (a penalty that counts latents then starts after one step where it
    equals the reconstruction loss); unused by architectures whose sparsity is k."""
    sparsity_warmup_tokens: int = 0
    """Tokens over which lambda rises linearly from zero (not used with target_l0)."""
    target_l0: float | None = None
    """Wanted latents per token: sets k where the architecture's sparsity is k; for the
    others a controller adjusts lambda during training so the final L0 lands near it."""
    start_at_target: bool = True
    """With target_l0 and a sparsity coefficient: every latent's bias (or threshold) starts
    where it fires on target_l0 / d_sae of the first batch, so training starts at the
    target L0 rather than far above it (figures: benchmarks/README.md)."""
    l0_controller_gain: float = 0.03
    """How fast the target-L0 controller moves log(lambda) per step, per unit of log-L0 error."""
    aux_k_coefficient: float = 1 / 32
    """AuxK loss weight (revives dead latents; top-k family, gated, CLTs and crosscoders): the
    silent latents' reconstruction of what the live ones missed, measured as a share of that
    residual's variance (Gao et al. 2024); 0 turns it off."""
    dead_after_tokens: int | None = None
    """A latent is dead once it has not fired for this many training tokens. None: a tenth
    of the run, at most 1,000,000, so a short run revives its dead latents too."""
    dead_pre_act_coefficient: float = DEAD_PRE_ACT_DEFAULT
    """ReLU SAEs with an L1 penalty: weight of c * sum over dead latents of ||W_dec[i]||
    ReLU(-h_i) (mean over tokens), which pushes dead latents back up until they fire;
    0 turns it off (figures: benchmarks/README.md)."""
    quiet_after_tokens: int | None = None
    """A latent is quiet once it has not fired for this many tokens: quiet latents are
    lifted, and get the dead-latent term of architectures whose term acts on quiet latents
    (standard, gated, transcoder). None: one step (batch_size tokens), so every latent that
    did not fire in the last batch is lifted back to its edge; with longer windows latents
    cycled between a lift and a fall, and a quarter of them sat fallen when training ended
    (figures: benchmarks/README.md)."""
    lift_quiet_latents: bool | None = None
    """Lower the firing points (raise the biases) of quiet latents, keeping their directions,
    until each fires on lift_share of an average latent's share of the batch; never after
    the last step, so the saved SAE is the one training made. None: as the architecture
    declares (SAE.dead_latent_remedy; figures: benchmarks/README.md)."""
    lift_share: float = 0.125
    """Quiet latents are lifted to fire on this share of the average latent's rate."""
    resample_dead_latents: bool | None = None
    """Start latents that stopped firing afresh, each on a poorly reconstructed example of
    the batch, with their optimiser state reset (Anthropic 2023), every resample_every_tokens
    until resample_until of training. None: as the architecture declares
    (SAE.dead_latent_remedy; figures: benchmarks/README.md)."""
    resample_every_tokens: int | None = None
    """Tokens between resampling events; None: a quarter of the dead-latent window."""
    resample_until: float = 0.5
    """Fraction of training after which no latent is resampled, so the last ones settle."""
    grad_clip: float = 1.0
    """Clip the gradient's global norm to this (0 disables clipping)."""
    b_dec_init: str = "geometric_median"
    """Initial decoder bias: zeros | mean | geometric_median (of the first batch)."""
    decoder_norm: str = "auto"
    """unit: decoder rows kept at unit norm, gradient parallel to them removed; free: no
    constraint; auto: as the architecture declares (SAE.unit_norm_decoder: unit where the
    loss has no penalty weighed by decoder-row norms)."""
    threshold_bandwidth: float = 0.001
    """Learned-threshold SAEs: width of the straight-through kernel for the thresholds."""
    threshold_penalty: str = "step"
    """Learned-threshold SAEs: the penalty, step (L0 through a straight-through estimator)
    or tanh."""
    ste_to_input: bool | None = None
    """Learned-threshold SAEs: the straight-through gradients reach the encoder too, not the
    thresholds alone (Anthropic, January 2025). L0 then follows the sparsity coefficient within a
    few hundred steps instead of at the pace Adam moves thresholds (about lr per step), but
    a fixed coefficient silences many more latents. None: on with target_l0 (the
    controller sets the coefficient), off without; false is Rajamanoharan et al. 2024."""
    threshold_pre_act_coefficient: float | None = None
    """Learned-threshold SAEs: weight of c * sum_i ||W_dec[i]|| ReLU(theta_i - h_i)
    (Anthropic, January 2025), which pulls silent latents back up to their thresholds.
    None: 1e-3 when the
    straight-through gradients reach the encoder (which silences many latents), else 0
    (figures: benchmarks/README.md)."""

    @property
    def dead_window(self) -> int:
        """`dead_after_tokens` with its default resolved."""
        if self.dead_after_tokens is None:
            return min(DEAD_WINDOW_LIMIT, self.tokens // 10)
        return self.dead_after_tokens

    @property
    def quiet_window(self) -> int:
        """`quiet_after_tokens` with its default (one step) resolved."""
        return self.batch_size if self.quiet_after_tokens is None else self.quiet_after_tokens

    @property
    def resample_every(self) -> int:
        """`resample_every_tokens` with its default resolved."""
        if self.resample_every_tokens is None:
            return max(self.dead_window // 4, self.batch_size)
        return self.resample_every_tokens

    def remedies(self, remedy: DeadLatentRemedy) -> tuple[bool, bool]:
        """(lift quiet latents, resample dead ones) for an architecture declaring `remedy`:
        the settings where given, else the declaration."""
        lift, resample = self.lift_quiet_latents, self.resample_dead_latents
        return (
            remedy.lift_quiet if lift is None else lift,
            remedy.resample if resample is None else resample,
        )

    @property
    def threshold_pre_act(self) -> float:
        """`threshold_pre_act_coefficient` with its default resolved."""
        if self.threshold_pre_act_coefficient is None:
            return THRESHOLD_PRE_ACT_DEFAULT if self.ste_reaches_input else 0.0
        return self.threshold_pre_act_coefficient

    @property
    def ste_reaches_input(self) -> bool:
        """`ste_to_input` with its default resolved."""
        if self.ste_to_input is None:
            return self.target_l0 is not None
        return self.ste_to_input

    def problems(self) -> list[str]:
        # Every field is checked for its type (NaN and infinity are no setting's value);
        # these are the ranges of the numeric ones.
        bounds = {
            "tokens": POSITIVE, "batch_size": POSITIVE, "lr": POSITIVE,
            "lr_warmup_tokens": NON_NEGATIVE, "lr_decay_fraction": Bounds(0, False, 1, True),
            "sparsity_coefficient": NON_NEGATIVE, "sparsity_warmup_tokens": NON_NEGATIVE,
            "target_l0": POSITIVE, "l0_controller_gain": POSITIVE,
            "aux_k_coefficient": NON_NEGATIVE, "dead_after_tokens": NON_NEGATIVE,
            "dead_pre_act_coefficient": NON_NEGATIVE, "grad_clip": NON_NEGATIVE,
            "resample_every_tokens": NON_NEGATIVE, "quiet_after_tokens": POSITIVE,
            "resample_until": Bounds(0, True, 1, True), "lift_share": Bounds(0, False, 1, True),
            "threshold_bandwidth": POSITIVE, "threshold_pre_act_coefficient": NON_NEGATIVE,
        }
        out = field_problems(self, bounds)
        sizes_ok = all(fits_type(getattr(self, n), int) for n in ("tokens", "batch_size"))
        if sizes_ok and self.tokens > 0 and self.batch_size > self.tokens:
            out.append(f"batch_size={self.batch_size} is larger than tokens={self.tokens}")
        if self.lr_schedule not in LR_SCHEDULES:
            out.append(f"lr_schedule {self.lr_schedule!r} is not one of {', '.join(LR_SCHEDULES)}")
        if self.b_dec_init not in B_DEC_INITS:
            out.append(f"b_dec_init {self.b_dec_init!r} is not one of {', '.join(B_DEC_INITS)}")
        if self.decoder_norm not in DECODER_NORMS:
            out.append(
                f"decoder_norm {self.decoder_norm!r} is not one of {', '.join(DECODER_NORMS)}"
            )
        if self.threshold_penalty not in ("step", "tanh"):
            out.append(f"threshold_penalty must be step or tanh, got {self.threshold_penalty!r}")
        return out

    def __post_init__(self) -> None:
        check_problems(self.problems())


@dataclass
class RunSection:
    """Where results go and how the run behaves."""

    out: str = "runs/demo"
    """Run folder: the final SAE, metrics.json, log.jsonl, run_config.yaml, checkpoints/."""
    seed: int = 0
    """Seed for weights and data order."""
    device: str | None = None
    """Device the SAEs train on (default: the first accelerator if there is one, else cpu).
    Under torchrun an accelerator type gets each process's LOCAL_RANK index."""
    model_device: str | None = None
    """Device the model runs on (default: device); activations are moved to device."""
    prefetch: bool = True
    """Make the next activation batch in a background thread while the SAE step runs (on
    accelerators only: on the CPU the two would share the same cores)."""
    dtype: str = "float32"
    """SAE parameter dtype: float32, float64, float16 or bfloat16."""
    checkpoint_every: int | None = None
    """Write a checkpoint every this many tokens (default: about ten per run)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk; older ones are deleted."""
    log_every: int = 20
    """Steps between lines of log.jsonl."""
    wandb: bool = False
    """Also log to Weights & Biases (set WANDB_MODE=offline to log without a network)."""
    wandb_project: str = "saekit"
    """Weights & Biases project name."""
    progress: bool = True
    """Show progress on stderr (model load, norm estimate, training, evaluation, report);
    --no-progress hides every bar."""
    report: bool = True
    """After training, print five latents with their held-out text and write a dashboard
    of every latent into the run folder (--no-report skips both, and the time they take)."""
    imports: list[str] | None = None
    """Python modules (dotted names or .py files) imported first, e.g. one that registers
    your own architecture with saekit.register_architecture (--import MODULE)."""
    seeds: list[int] | None = None
    """Train one SAE per seed (their initial weights; every SAE reads the same data, in the
    order seed gives), side by side from one model pass (docs/training.md)."""
    parallel: str = "data"
    """Under torchrun: data (every rank trains every SAE on its share of each batch) or sae
    (the SAEs of a run with several are dealt out across ranks, each trained on the whole
    batch, with no gradient traffic)."""
    eval_every: int | None = None
    """Evaluate every SAE on a fixed held-out sample every this many training tokens (L0,
    explained variance, CE and KL), into log.jsonl ("eval" records), the progress bar and
    Weights & Biases."""
    eval_every_tokens: int = 8192
    """Held-out tokens of each periodic evaluation (eval_every): the first this many of the
    held-out text, the same sample every time."""
    resume: str | None = None
    """Continue the run in this folder from its last checkpoint."""
    overwrite: bool = False
    """Delete an existing run folder at `out` and start afresh."""

    def problems(self) -> list[str]:
        # Every field is checked for its type (NaN and infinity are no setting's value);
        # these are the ranges of the numeric ones.
        # numpy takes seeds in [0, 2**32).
        bounds = {
            "seed": Bounds(0, True, 2**32, False), "checkpoint_every": POSITIVE,
            "keep_checkpoints": Bounds(1, low_included=True), "log_every": POSITIVE,
            "seeds": Bounds(0, True, 2**32, False), "eval_every": POSITIVE,
            "eval_every_tokens": POSITIVE,
        }
        out = field_problems(self, bounds)
        if self.parallel not in PARALLEL_MODES:
            out.append(f"parallel {self.parallel!r} is not one of {', '.join(PARALLEL_MODES)}")
        if isinstance(self.seeds, list) and len(set(self.seeds)) != len(self.seeds):
            out.append(f"seeds repeat in {self.seeds}; give each seed once")
        if self.dtype not in DTYPES:
            out.append(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if self.resume is not None and self.overwrite:
            out.append("resume and overwrite cannot both be given; pick one")
        return out

    def __post_init__(self) -> None:
        check_problems(self.problems())


def k_architectures() -> list[str]:
    """The registered architectures whose sparsity is k."""
    from saekit.saes import architecture_class, list_architectures

    return [a for a in list_architectures() if architecture_class(a).sparsity_control == "k"]


#: Other names of settings, accepted in config files and as flags: saekit's earlier
#: spellings, and SAELens's (LanguageModelSAERunnerConfig) where they mean the same thing.
SETTING_ALIASES: dict[str, tuple[str, ...]] = {
    "data.hook_name": ("hook",),
    "training.sparsity_coefficient": ("l1_coefficient",),
    "sae.norm_scaling": ("normalize_activations",),
    "data.hook_name_out": ("hook_out",),
    "training.threshold_bandwidth": ("jumprelu_bandwidth",),
    "training.threshold_penalty": ("jumprelu_sparsity_loss_mode", "jumprelu_sparsity"),
    "training.ste_to_input": ("jumprelu_ste_to_input",),
    "training.threshold_pre_act_coefficient": ("jumprelu_pre_act_coefficient",),
    "training.tokens": ("training_tokens",),
    "training.batch_size": ("train_batch_size_tokens",),
}


def _canonical_names(section: str, values: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """`values` with aliases renamed to their setting, and a problem for each clash."""
    renamed = dict(values)
    problems = []
    for setting, aliases in SETTING_ALIASES.items():
        where, name = setting.split(".")
        if where != section:
            continue
        for alias in aliases:
            if alias not in renamed:
                continue
            if name in renamed:
                problems.append(
                    f"{section}: {alias!r} and {name!r} name the same setting; give one"
                )
            renamed[name] = renamed.pop(alias)
    return renamed, problems


#: The name the training section had before: still importable.
TrainingConfig = TrainingSection

#: Section name -> class, in the order they appear in files and in --help.
SECTIONS: dict[str, type] = {
    "sae": SAESection,
    "data": DataSection,
    "training": TrainingSection,
    "run": RunSection,
}
#: Run fields that are actions on a folder, not part of what the run is; not saved.
ACTION_FIELDS = ("resume", "overwrite")
#: Top-level keys of a config besides the sections: the SAEs of a run of several.
EXTRA_KEYS = ("sweep", "saes")


@dataclass
class TrainConfig:
    """A whole training run. Build with `TrainConfig.from_dict` to get every problem at once."""

    #: The sections by name, and other names of settings (read by the sweep planner).
    sections: ClassVar[dict[str, type]] = SECTIONS
    setting_aliases: ClassVar[dict[str, tuple[str, ...]]] = SETTING_ALIASES

    sae: SAESection = field(default_factory=SAESection)
    data: DataSection = field(default_factory=DataSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    run: RunSection = field(default_factory=RunSection)
    sweep: dict[str, list[Any]] = field(default_factory=dict)
    """Several SAEs from one model pass: {field: [values]} over sae and training fields
    (`--sweep k=32,64 expansion_factor=8,16`), crossed with the hooks and seeds."""
    saes: list[dict[str, Any]] = field(default_factory=list)
    """Per-SAE overrides (config files only): each entry, a mapping of sae and training
    fields (and hook_name, hook_name_out, seed, name), is one SAE, crossed with the rest."""

    def __post_init__(self) -> None:
        check_problems(self.cross_problems())

    @property
    def many(self) -> bool:
        """Whether the run trains several SAEs (hooks, layers, a sweep, seeds or a saes list),
        each in a sub-folder of the run folder."""
        from saekit.training.multisite_plan import is_multisite
        from saekit.training.sweeps import is_many

        # A clt or crosscoder reads its hooks and layers as the sites of one SAE.
        return not is_multisite(self.sae.architecture) and is_many(self)

    @property
    def multisite(self) -> bool:
        """Whether the run trains one clt or crosscoder over several sites."""
        from saekit.training.multisite_plan import is_multisite

        return is_multisite(self.sae.architecture)

    def cross_problems(self) -> list[str]:
        out = []
        if self.run.eval_every is not None and self.data.eval_tokens == 0:
            out.append(
                "eval_every evaluates on held-out text, but eval_tokens is 0 (no held-out "
                "text); give eval_tokens a positive value or leave eval_every out"
            )
        if self.sweep or self.saes:
            from saekit.training.sweeps import variant_problems

            out.extend(variant_problems(self))
        from saekit.training.multisite_plan import multisite_problems

        out.extend(multisite_problems(self))
        sae, training = self.sae, self.training
        if sae.k is not None and training.target_l0 is not None and sae.k != training.target_l0:
            out.append(
                f"k={sae.k} and target_l0={training.target_l0} disagree; for "
                f"{sae.architecture!r} target_l0 sets k, so give only one"
            )
        if sae.known and sae.sets_k and training.target_l0 is not None:
            if training.target_l0 != int(training.target_l0):
                out.append(f"target_l0 must be a whole number for {sae.architecture!r}")
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from {"sae": {...}, "data": {...}, ...}, reporting every problem together."""
        problems: list[str] = []
        if not isinstance(data, dict):
            raise ConfigError([f"a training config must be a mapping, got {type(data).__name__}"])
        unknown = sorted(set(data) - set(SECTIONS) - set(EXTRA_KEYS))
        for name in unknown:
            problems.append(f"unknown section {name!r}{suggest(name, SECTIONS)}")
        # Modules that register architectures come first: the sae section names them.
        run = data.get("run")
        imports = run.get("imports") if isinstance(run, dict) else None
        if imports:
            from saekit.saes.registry import import_modules

            try:
                import_modules([imports] if isinstance(imports, str) else list(imports))
            except ValueError as err:
                problems.append(f"run.imports: {err}")
        sections: dict[str, Any] = {}
        for name, section_cls in SECTIONS.items():
            values = data.get(name) or {}
            if not isinstance(values, dict):
                problems.append(f"section {name!r} must be a mapping, got {values!r}")
                continue
            values, clashes = _canonical_names(name, values)
            problems.extend(clashes)
            kwargs, found = coerce_fields(section_cls, values, name)
            problems.extend(found)
            try:
                sections[name] = section_cls(**kwargs)
            except ConfigError as err:
                problems.extend(f"{name}.{p}" for p in err.problems)
            except (TypeError, ValueError) as err:
                problems.append(f"{name}: {err}")
        from saekit.training.sweeps import read_saes, read_sweep

        extras: dict[str, Any] = {}
        for key, reader in (("sweep", read_sweep), ("saes", read_saes)):
            if data.get(key) is not None:
                try:
                    extras[key] = reader(data[key])
                except ValueError as err:
                    problems.append(f"{key}: {err}")
        if problems:
            raise ConfigError(problems)
        return cls(**sections, **extras)

    def to_dict(self, include_actions: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {
            name: dataclasses.asdict(getattr(self, name)) for name in SECTIONS
        }
        if not include_actions:
            for name in ACTION_FIELDS:
                out["run"].pop(name)
        # Only a run of several SAEs has these (a one-SAE run's file stays as it was).
        if self.sweep:
            out["sweep"] = {k: list(v) for k, v in self.sweep.items()}
        if self.saes:
            out["saes"] = [dict(entry) for entry in self.saes]
        return out

    @classmethod
    def load(cls, path: str | Path) -> TrainConfig:
        """Read a YAML or JSON config file."""
        return cls.from_dict(read_config_file(path))

    def save(self, path: str | Path) -> None:
        """Write as YAML (action fields such as resume are left out)."""
        import yaml

        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


#: Settings a resumed run may change: how it runs, not what it computes; and
#: training.tokens, which may grow to extend an interrupted or finished run.
RESUME_CHANGEABLE = frozenset({
    "training.tokens", "run.progress", "run.report", "run.log_every", "run.keep_checkpoints",
    "run.checkpoint_every", "run.device", "run.model_device", "run.prefetch", "run.wandb",
    "run.wandb_project", "run.eval_every",
})


def resumed_config(
    saved: TrainConfig, requested: TrainConfig, given: typing.Iterable[str] | None = None
) -> TrainConfig:
    """The saved config of a run being resumed, with the requested changes that can apply.

    `given` names the settings the user set ("training.lr"); None means every setting of
    `requested` that differs from its default. A given setting that differs from the saved
    one is applied when it is in RESUME_CHANGEABLE (tokens may only grow); any other is a
    ConfigError that lists them all."""
    defaults = TrainConfig()
    if given is None:
        given = [
            f"{section}.{f.name}"
            for section in SECTIONS
            for f in dataclasses.fields(SECTIONS[section])
            if getattr(getattr(requested, section), f.name)
            != getattr(getattr(defaults, section), f.name)
        ]
    out = TrainConfig.from_dict(saved.to_dict())
    conflicts: list[str] = []
    for key in EXTRA_KEYS:
        new, old = getattr(requested, key), getattr(saved, key)
        if new and new != old:  # left out on resume means "as saved"
            conflicts.append(f"{key} {new} (the run has {old or 'none'})")
    for name in sorted(set(given)):
        section, key = name.split(".", 1)
        if key in ACTION_FIELDS or name == "run.out":
            continue
        new, old = getattr(getattr(requested, section), key), getattr(getattr(saved, section), key)
        if new == old:
            continue
        flag = "--" + key.replace("_", "-")
        if name not in RESUME_CHANGEABLE:
            conflicts.append(f"{flag} {new} (the run has {old})")
        elif name == "training.tokens" and new < old:
            conflicts.append(f"{flag} {new} (the run has {old}; a resumed run can only grow)")
        else:
            setattr(getattr(out, section), key, new)
    if conflicts:
        raise ConfigError([
            "--resume continues a run with the settings it was started with; these differ "
            f"and cannot change mid-run: {'; '.join(conflicts)}. Leave them out, or start a "
            "new run with --out"
        ])
    out.run.resume = requested.run.resume
    return out
