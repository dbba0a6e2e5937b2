"""Job plans from TOML: the same file runs in ``fedsim`` and in ``fedserver``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from fedclient._exceptions import InvalidInput
from fedclient.protocol import JobPlan

__all__ = ["load_plan", "plan_from_dict"]


def plan_from_dict(data: dict[str, Any]) -> JobPlan:
    """Validate a plan given as nested dicts (``job``, ``model``, ``train`` tables)."""
    try:
        return msgspec.convert(data, type=JobPlan)
    except (msgspec.ValidationError, ValueError) as exc:
        raise InvalidInput(f"invalid plan: {exc}") from exc


def load_plan(path: str | Path) -> JobPlan:
    """Read and validate a TOML plan file."""
    import tomllib  # here, not at the top: a simulation builds its plan without TOML

    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InvalidInput(f"cannot read plan {path}: {exc}") from exc
    return plan_from_dict(data)
