"""Fixtures shared across the suite."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real DCASE/MIMII clips beside the checkout (see ../shared/data/README.md)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real audio samples not found at {SHARED_DATA}")
    return SHARED_DATA
