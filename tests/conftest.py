"""Fixtures any test module may use."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny matmuls on a shared machine run far faster on one thread than on several."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bundled() -> object:
    """The bundled 4-layer model, loaded once per test module (a module may change it)."""
    from saekit.models import load_model

    return load_model("bundled")


@pytest.fixture(scope="session")
def tiny_tl_model() -> object:
    """A tiny random TransformerLens model with its tokenizer (saekit.models.tiny)."""
    from saekit.models.tiny import tiny_hooked_transformer, tiny_tokenizer

    return tiny_hooked_transformer(tokenizer=tiny_tokenizer())
