"""Shared fixtures for the analysis tests: tiny random-weight models and random SAEs."""

from __future__ import annotations

import pytest
import torch
from analysis_helpers import D_MODEL, VOCAB

from saekit.models import load_model
from saekit.models.tiny import tiny_gpt2, tiny_hooked_transformer, tiny_tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return tiny_tokenizer(VOCAB)


@pytest.fixture(scope="session")
def hf_backend(tokenizer):
    return load_model(tiny_gpt2(VOCAB, d_model=D_MODEL), tokenizer=tokenizer)


@pytest.fixture(scope="session")
def tl_backend(tokenizer):
    return load_model(tiny_hooked_transformer(VOCAB, d_model=D_MODEL, tokenizer=tokenizer))


@pytest.fixture(params=["hf", "tl"])
def backend(request, hf_backend, tl_backend):
    return hf_backend if request.param == "hf" else tl_backend


@pytest.fixture(scope="session")
def tokens() -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def browser(tmp_path_factory, monkeypatch_module):
    """A headless Chromium for the dashboard tests, one per test module (skips where
    Chromium or selenium is missing: `test_dashboard._driver`)."""
    from test_dashboard import _driver

    # Selenium would otherwise try to report usage statistics over the network.
    monkeypatch_module.setenv("SE_AVOID_STATS", "true")
    driver = _driver(tmp_path_factory.mktemp("chromium-profile"))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def monkeypatch_module():
    """`monkeypatch` for module-scoped fixtures."""
    with pytest.MonkeyPatch.context() as mp:
        yield mp
