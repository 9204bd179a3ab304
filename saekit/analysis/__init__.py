"""Analysis: SAEs spliced into models, latent edits, steering, attribution, feature statistics
(with a crosscoder's decoder norms per site) and dashboards."""

from saekit.analysis.attribution import AttributionResult, attribute, logit_diff
from saekit.analysis.collect import feature_statistics
from saekit.analysis.crosscoder_norms import CrosscoderNorms
from saekit.analysis.dashboard import write_dashboard
from saekit.analysis.interventions import (
    LatentEdit,
    ablate_latents,
    clamp_latents,
    scale_latents,
)
from saekit.analysis.splice import (
    SAE_POINTS,
    CacheResult,
    HookedSAETransformer,
    LogitsAndLoss,
    SplicedModel,
)
from saekit.analysis.stats import FeatureStats, logit_effects
from saekit.analysis.steering import Generation, generate, steering_hooks, steering_vector

__all__ = [
    "SAE_POINTS",
    "AttributionResult",
    "CacheResult",
    "CrosscoderNorms",
    "FeatureStats",
    "Generation",
    "HookedSAETransformer",
    "LatentEdit",
    "LogitsAndLoss",
    "SplicedModel",
    "ablate_latents",
    "attribute",
    "clamp_latents",
    "feature_statistics",
    "generate",
    "logit_diff",
    "logit_effects",
    "scale_latents",
    "steering_hooks",
    "steering_vector",
    "write_dashboard",
]
