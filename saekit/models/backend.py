"""The one interface between saekit and a language model.

A backend turns token batches into activations at named hooks, and runs the model with a
hook's activation replaced (for CE/KL evaluation and analysis). Everything downstream (the
activation store, the evaluator, the analysis tools) talks to models only through this.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

#: A function applied to a hook's activation during a forward pass; returns the replacement.
Replacement = Callable[[Tensor], Tensor]


@runtime_checkable
class ModelBackend(Protocol):
    """What every model backend provides.

    Backends also say `causal_lm: bool`: True when `logits` returns the next-token logits of
    a causal LM (TransformerLens models, `*ForCausalLM`), False for encoders and base models,
    whose `logits` raises ValueError. It is not a protocol member, so that backends written
    before it still pass `isinstance(..., ModelBackend)`; read it as
    `getattr(backend, "causal_lm", True)`.
    """

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer (a transformers tokenizer), or None when there is none."""
        ...

    @property
    def device(self) -> torch.device:
        """Device the model runs on; token batches are moved there."""
        ...

    def hook_names(self) -> list[str]:
        """Every hook name `activations` and `logits` accept."""
        ...

    def activations(self, tokens: Tensor, hooks: Sequence[str]) -> dict[str, Tensor]:
        """{hook: activation} for tokens [batch, pos]; each activation is [batch, pos, d]
        ([batch, pos, n_heads, d_head] for per-head hooks such as hook_z). The forward pass
        stops after the last requested hook."""
        ...

    def logits(
        self, tokens: Tensor, replacements: Mapping[str, Replacement] | None = None
    ) -> Tensor:
        """Logits [batch, pos, vocab], with each hook in `replacements` replaced by the
        function's output during the forward pass."""
        ...


class ModuleBackendBase:
    """Device and dtype of a backend that wraps a torch module as `self.model`."""

    model: torch.nn.Module
    #: True when `logits` gives next-token logits of a causal LM (see `ModelBackend`).
    causal_lm: bool = True

    @property
    def device(self) -> torch.device:
        param = next(self.model.parameters(), None)
        return param.device if param is not None else torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        param = next(self.model.parameters(), None)
        return param.dtype if param is not None else torch.float32
