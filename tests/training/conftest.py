"""Fixtures for the training tests."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def single_thread(one_thread: None) -> None:
    """Every training test runs on one thread (see tests/conftest.py)."""
