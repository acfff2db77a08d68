"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from fedunlearn.data.movielens import DATA_DIR_ENV


@pytest.fixture
def ml100k_dir() -> Path:
    """The verified ML-100K copy: $FEDUNLEARN_DATA_DIR/ml-100k (as the loader reads it), else
    ../shared/datasets/ml-100k beside the repository; skips if neither holds one."""
    beside = Path(__file__).resolve().parents[2] / "shared" / "datasets"
    folders = [Path(os.environ[DATA_DIR_ENV]) / "ml-100k"] if os.environ.get(DATA_DIR_ENV) else []
    for folder in [*folders, beside / "ml-100k"]:
        if (folder / "u.data").is_file():
            return folder
    pytest.skip(f"no ML-100K copy in {', '.join(str(f) for f in [*folders, beside / 'ml-100k'])}")
