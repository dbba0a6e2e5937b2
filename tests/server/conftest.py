"""The server suite runs on both of the server's database engines."""

from __future__ import annotations

import pytest


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest) -> str:
    """Every server test that stores something runs on SQLite and on PostgreSQL."""
    return str(request.param)
