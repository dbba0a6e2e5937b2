"""Runtime tests build bundles in a private cache, never in the user's."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def bundle_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """``FEDCLIENT_CACHE_DIR`` for the whole session, so built-in bundles are built once."""
    root = tmp_path_factory.mktemp("fedclient-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FEDCLIENT_CACHE_DIR", str(root))
        yield root
