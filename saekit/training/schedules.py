"""Learning-rate and sparsity-coefficient schedules, and the target-L0 controller.

Schedules are pure functions of the token count, so a resumed run needs only the count to be
exactly where it was; the controller carries state and saves it with the checkpoint.
"""

from __future__ import annotations

import math
from typing import Any

from saekit.training.config import TrainingSection


def lr_at(cfg: TrainingSection, tokens_seen: int) -> float:
    """Learning rate for the step that starts after `tokens_seen` tokens."""
    total = cfg.tokens
    if cfg.lr_warmup_tokens > 0 and tokens_seen < cfg.lr_warmup_tokens:
        # Linear warm-up; the first step gets a small non-zero rate, not zero.
        return cfg.lr * (tokens_seen + cfg.batch_size) / (cfg.lr_warmup_tokens + cfg.batch_size)
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "cosine":
        span = max(total - cfg.lr_warmup_tokens, 1)
        progress = min(max(tokens_seen - cfg.lr_warmup_tokens, 0) / span, 1.0)
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    # linear: flat, then straight down to zero over the last lr_decay_fraction of the run.
    decay_start = total * (1 - cfg.lr_decay_fraction)
    if tokens_seen < decay_start:
        return cfg.lr
    return cfg.lr * max(total - tokens_seen, 0) / max(total - decay_start, 1)


def sparsity_warmup_factor(cfg: TrainingSection, tokens_seen: int) -> float:
    """Multiplier in [0, 1] on lambda: rises linearly over sparsity_warmup_tokens."""
    if cfg.sparsity_warmup_tokens <= 0:
        return 1.0
    return min((tokens_seen + cfg.batch_size) / cfg.sparsity_warmup_tokens, 1.0)


class L0Controller:
    """Moves lambda so the measured L0 approaches a target: an integral controller on log
    lambda driven by the log of L0 over target, which makes the response scale-free (the
    same gain works whether lambda is 1e-3 or 10, L0 is 8 or 800).

    The measured L0 is smoothed by an exponential average, and each step's change of
    log lambda is bounded, so a noisy batch cannot throw lambda far.
    """

    #: Largest change of log(lambda) in one step.
    max_step = 0.05
    #: Weight of the newest batch in the smoothed L0.
    smoothing = 0.1
    #: Steps ahead at which the L0 error is predicted from its current trend.
    horizon = 100
    #: Steps over which the trend is measured.
    trend_steps = 3
    #: Above this multiple of the target, lambda is not lowered.
    far_above = 2.0
    #: Above this ratio of the sparsity terms to the reconstruction loss, lambda is not
    #: raised: Adam's steps are then already all sparsity, and a larger lambda would change
    #: nothing but wind up (a learned-threshold SAE on the bundled model, whose L0 falls as fast as
    #: its thresholds can move, took lambda from 5 to 3e16).
    max_sparsity_share = 100.0

    def __init__(
        self, target: float, initial: float, gain: float, ramp_steps: int = 0,
        balance_start: bool = False,
    ) -> None:
        if initial <= 0:
            raise ValueError(
                "the target-L0 controller needs a positive starting sparsity_coefficient, "
                f"got {initial}"
            )
        self.target = target
        self.gain = gain
        self.ramp_steps = ramp_steps
        #: After the first step, rescale lambda so the sparsity terms equal the
        #: reconstruction loss (see `update`).
        self.balance_start = balance_start
        self.log_coefficient = math.log(initial)
        self.smoothed_l0: float | None = None
        #: The smoothed L0 of the last `trend_steps` updates, oldest first.
        self.recent_l0: list[float] = []
        self.start_l0: float | None = None
        self.steps = 0

    def reference(self) -> float:
        """The L0 aimed at now: from the first measured L0 down (log-linearly) to the target
        over ramp_steps, so the SAE is never asked to sparsify faster than it can, which
        would wind lambda far past its balance point."""
        if self.start_l0 is None or self.steps >= self.ramp_steps:
            return self.target
        fraction = self.steps / self.ramp_steps
        log_ref = (1 - fraction) * math.log(self.start_l0 + 1) + fraction * math.log(
            self.target + 1
        )
        return math.exp(log_ref) - 1

    @property
    def coefficient(self) -> float:
        return math.exp(self.log_coefficient)

    def update(self, l0: float, sparsity_share: float | None = None) -> float:
        """Feed the L0 of the latest batch (and, optionally, its sparsity loss terms over its
        reconstruction loss); returns the coefficient for the next step."""
        previous = self.smoothed_l0
        if previous is None:
            self.smoothed_l0 = previous = self.start_l0 = l0
            if self.balance_start and sparsity_share:
                # A penalty that counts latents (an L0 count) has no natural scale next to
                # the default sparsity_coefficient, which is for L1 sizes: 5 was 70x the balance
                # point on the bundled model and silenced most latents before the controller
                # could take it back. Starting balanced, the controller only has to fine-tune.
                self.log_coefficient -= math.log(sparsity_share)
        else:
            self.smoothed_l0 += self.smoothing * (l0 - previous)
        self.steps += 1
        # +1 keeps the logarithm finite when every latent is silent.
        error = math.log(self.smoothed_l0 + 1) - math.log(self.reference() + 1)
        # The trend per step over the last `trend_steps` steps. With latents lifted after
        # every step the L0 of a batch swings by a fifth around its mean, with upward
        # spikes; a one-step difference, times the horizon, threw most steps to their bound,
        # which cut the spikes and not their slow decay, and lambda wandered down while the
        # L0 sat above the target (a gated SAE ended at 46 for 32).
        earlier = self.recent_l0[0] if self.recent_l0 else previous
        steps = max(len(self.recent_l0), 1)
        trend = (math.log(self.smoothed_l0 + 1) - math.log(earlier + 1)) / steps
        self.recent_l0 = [*self.recent_l0, self.smoothed_l0][-self.trend_steps :]
        # Act on the error expected `horizon` steps ahead: the weights answer a change of
        # lambda with a lag, and acting on the present error alone winds lambda up (or down)
        # far past its balance point while the L0 is already on its way.
        predicted = error + self.horizon * trend
        step = max(-self.max_step, min(self.max_step, self.gain * predicted))
        # Far above the target, lambda may rise or hold but not fall. A fresh SAE sheds
        # latents fast as it first learns to reconstruct, faster than the ramp; lowering
        # lambda then (it went from 5 to 0.33 in 140 steps on the bundled model) only
        # lengthens a descent that Adam's bounded step size already makes slow.
        if self.smoothed_l0 > self.far_above * self.target:
            step = max(step, 0.0)
        if sparsity_share is not None and sparsity_share > self.max_sparsity_share:
            step = min(step, 0.0)
        self.log_coefficient += step
        return self.coefficient

    def state_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "gain": self.gain,
            "ramp_steps": self.ramp_steps,
            "balance_start": self.balance_start,
            "log_coefficient": self.log_coefficient,
            "smoothed_l0": self.smoothed_l0,
            "recent_l0": list(self.recent_l0),
            "start_l0": self.start_l0,
            "steps": self.steps,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.target = float(state["target"])
        self.gain = float(state["gain"])
        self.log_coefficient = float(state["log_coefficient"])
        self.ramp_steps = int(state["ramp_steps"])
        self.balance_start = bool(state.get("balance_start", False))
        self.steps = int(state["steps"])
        self.recent_l0 = [float(v) for v in state.get("recent_l0", [])]
        for name in ("smoothed_l0", "start_l0"):
            value = state[name]
            setattr(self, name, None if value is None else float(value))
