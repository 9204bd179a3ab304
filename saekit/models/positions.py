"""How many positions a model reads in one sequence, and the check that a context size fits
(made before any text is tokenized: a longer one fails deep in the forward pass)."""

from __future__ import annotations

from typing import Any

from saekit.errors import SaekitError


def max_positions(backend: Any) -> int | None:
    """The most positions a model reads in one sequence: TransformerLens's `cfg.n_ctx`, or
    a Hugging Face config's `n_positions` / `max_position_embeddings`; None when the model
    states no limit (relative positions, an unknown backend)."""
    model = getattr(backend, "model", backend)
    tl_cfg = getattr(model, "cfg", None)
    value = getattr(tl_cfg, "n_ctx", None)
    if isinstance(value, int) and value > 0:
        return value
    config = getattr(model, "config", None)
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_context_size(backend: Any, context_size: int, flag: str = "--context-size") -> None:
    """Refuse a context size longer than the model's position limit (the forward pass would
    fail, or read positions the model never learned), before any text is tokenized."""
    limit = max_positions(backend)
    if limit is not None and context_size > limit:
        name = getattr(backend, "name", None) or type(getattr(backend, "model", backend)).__name__
        raise SaekitError(
            f"{flag} {context_size} is longer than the model {name} reads: it has "
            f"{limit} positions. Use {flag} {limit} or less"
        )
