"""The real public data in the project's sibling folder shared/data (users may not have it)."""

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"


def shared_file(relative: str) -> Path:
    path = SHARED_DATA / relative
    if not path.exists():
        pytest.skip(f"real data not available: {relative} (looked in {SHARED_DATA})")
    return path
