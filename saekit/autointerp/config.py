"""`AutointerpConfig`: how many contexts each latent is explained and scored on, and how."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass

#: Recorded with every explanation; changes whenever the prompts or the scoring rules change,
#: so explanations made under different rules are never mixed up.
PROMPT_VERSION = "saekit-autointerp-1"

FUZZ_MODES = ("inactive", "active")


@dataclass(frozen=True)
class AutointerpConfig:
    """Settings of one auto-interpretation run (each one is a flag of `saekit autointerp`)."""

    n_top: int = 10
    """Top activating contexts shown to the explainer."""
    n_bands: int = 4
    """Activation quantile bands the explainer also sees samples from."""
    per_band: int = 3
    """Contexts shown to the explainer from each quantile band."""
    n_test: int = 10
    """Activating contexts each scorer is tested on (never shown to the explainer)."""
    n_negatives: int = 10
    """Non-activating contexts mixed in for detection (and for fuzzing in `inactive` mode)."""
    examples_per_prompt: int = 5
    """Contexts per scorer call; more is cheaper but gives the scorer hints across contexts."""
    mark_threshold: float = 0.3
    """A token is marked `<<like this>>` when its activation is at least this fraction of
    the largest activation in its context."""
    fuzz_mode: str = "inactive"
    """What the wrongly marked contexts in fuzzing are: `inactive`, non-activating contexts
    with random tokens marked (the usual form); `active`, activating contexts with tokens
    that do not fire marked (harder: it tests which tokens, not which contexts)."""
    min_examples: int = 10
    """Latents with fewer distinct activating contexts than this are not explained."""
    max_explanation_tokens: int = 60
    """Completion tokens allowed for an explanation."""
    max_label_tokens: int = 40
    """Completion tokens allowed for a scorer's list of labels."""
    temperature: float = 0.0
    """Sampling temperature of the explainer and the scorer (0: their most likely answer)."""
    seed: int = 0
    """Seeds which contexts are tested on, their order and the random marks."""

    def __post_init__(self) -> None:
        positive = ("n_top", "n_bands", "per_band", "n_test", "n_negatives",
                    "examples_per_prompt", "min_examples", "max_explanation_tokens",
                    "max_label_tokens")
        bad = [f"{name}={getattr(self, name)}" for name in positive if getattr(self, name) < 1]
        if bad:
            raise ValueError(f"these settings must be at least 1: {', '.join(bad)}")
        if not 0.0 < self.mark_threshold <= 1.0:
            raise ValueError(
                f"mark_threshold must be in (0, 1], got {self.mark_threshold}: it is a fraction "
                "of the largest activation in a context"
            )
        if self.fuzz_mode not in FUZZ_MODES:
            raise ValueError(f"fuzz_mode must be one of {FUZZ_MODES}, got {self.fuzz_mode!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")

    def to_json(self) -> str:
        return json.dumps({"prompt_version": PROMPT_VERSION, **asdict(self)}, sort_keys=True)
