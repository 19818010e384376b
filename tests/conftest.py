"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture
def shared_dir() -> Path:
    """The read-only shared folder next to the repository (skips the test when absent)."""
    path = Path(__file__).resolve().parents[2] / "shared"
    if not path.is_dir():
        pytest.skip(f"shared folder not found: {path}")
    return path
