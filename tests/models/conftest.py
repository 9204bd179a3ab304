"""Fixtures shared by the model tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from families import FAMILIES, build_family


@pytest.fixture(scope="session")
def family_folder(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """`family_folder(family)`: the family's tiny model folder, built once per session."""
    # Folder names carry no family name: TransformerLens picks Gemma and Llama configs by
    # substrings of the model name.
    root = tmp_path_factory.mktemp("families")
    built: dict[str, Path] = {}

    def folder(family: str) -> Path:
        if family not in built:
            built[family] = build_family(family, root / f"m{FAMILIES.index(family)}")
        return built[family]

    return folder
