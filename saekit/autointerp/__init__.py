"""Auto-interpretation: explain each latent with a language model and score how faithful the
explanation is (detection and fuzzing), resumably, from the statistics saekit gathers.

`autointerp(sae, out, explainer=...)` does it all for an SAE; `explain_latents(stats,
negatives, decode, out, explainer=...)` works from statistics already in hand. Results go to
`explanations.jsonl` (see `saekit.analysis.explanations`).
"""

from saekit.autointerp.clients import (
    CallableClient,
    ChatClient,
    EndpointError,
    OpenAIClient,
    TransformersClient,
    make_client,
)
from saekit.autointerp.config import PROMPT_VERSION, AutointerpConfig
from saekit.autointerp.contexts import Context, ContextSplit, split_contexts
from saekit.autointerp.negatives import NegativePool, negative_pool
from saekit.autointerp.pipeline import autointerp
from saekit.autointerp.prompts import TokenText, mapping_decoder
from saekit.autointerp.run import AutointerpResult, Plan, explain_latents
from saekit.autointerp.scoring import classification_scores
from saekit.autointerp.selection import LatentSelection, parse_latents

__all__ = [
    "PROMPT_VERSION",
    "AutointerpConfig",
    "AutointerpResult",
    "CallableClient",
    "ChatClient",
    "Context",
    "ContextSplit",
    "EndpointError",
    "LatentSelection",
    "NegativePool",
    "OpenAIClient",
    "Plan",
    "TokenText",
    "TransformersClient",
    "autointerp",
    "classification_scores",
    "explain_latents",
    "make_client",
    "mapping_decoder",
    "negative_pool",
    "parse_latents",
    "split_contexts",
]
