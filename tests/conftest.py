"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def ml100k_dir() -> Path:
    """The verified ML-100K copy next to the repository (../shared/datasets/ml-100k); skips if absent."""
    folder = Path(__file__).resolve().parents[2] / "shared" / "datasets" / "ml-100k"
    if not (folder / "u.data").is_file():
        pytest.skip(f"no ML-100K copy at {folder}")
    return folder
