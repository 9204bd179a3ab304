"""Several models run side by side on the same tokens, seen as one backend (a crosscoder
that compares models reads their activations of the same token stacked)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


class SideBySideModels:
    """Several models run on the same tokens, seen as one backend: hook `<i>/<hook>` is
    `hook` of model i. Each model makes one forward pass per batch of tokens, so an
    `ActivationStore` over such hooks serves every model's activation of the same token in
    the same row (a crosscoder for model diffing reads them stacked)."""

    causal_lm = False

    def __init__(self, models: Sequence[Any]) -> None:
        if len(models) < 2:
            raise ValueError("side-by-side models need at least two models")
        first = vocabulary(models[0].tokenizer)
        for i, model in enumerate(models[1:], start=1):
            if vocabulary(model.tokenizer) != first:
                raise ValueError(
                    f"model {i} tokenizes differently from model 0; a crosscoder compares "
                    "models on the same tokens, so they must share a tokenizer"
                )
        self.models = list(models)
        self.name = " | ".join(str(getattr(m, "name", None) or f"model {i}")
                               for i, m in enumerate(models))

    @staticmethod
    def site(model: int, hook: str) -> str:
        """The side-by-side name of `hook` in model `model`."""
        return f"{model}/{hook}"

    @property
    def tokenizer(self) -> Any:
        return self.models[0].tokenizer

    @property
    def device(self) -> torch.device:
        return self.models[0].device

    def hook_names(self) -> list[str]:
        return [self.site(i, h) for i, m in enumerate(self.models) for h in m.hook_names()]

    def activations(self, tokens: Tensor, hooks: Sequence[str]) -> dict[str, Tensor]:
        wanted: dict[int, list[str]] = {}
        for name in hooks:
            index, _, hook = name.partition("/")
            if not index.isdigit() or int(index) >= len(self.models):
                raise ValueError(f"{name!r} names no model; side-by-side hooks are <i>/<hook>")
            wanted.setdefault(int(index), []).append(hook)
        out: dict[str, Tensor] = {}
        for index, model_hooks in wanted.items():
            acts = self.models[index].activations(tokens, model_hooks)
            for hook in model_hooks:
                out[self.site(index, hook)] = acts[hook].to(self.device)
        return out

    def logits(self, tokens: Tensor, replacements: Any = None) -> Tensor:
        raise ValueError("side-by-side models have no single set of logits; ask each model")


def vocabulary(tokenizer: Any) -> Any:
    """What decides how a tokenizer splits text, compared to tell two tokenizers apart."""
    vocab = getattr(tokenizer, "get_vocab", None)
    return vocab() if vocab is not None else tokenizer
