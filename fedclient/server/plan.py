"""Job plans from TOML: the same file runs in ``fedsim`` and in ``fedserver``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from fedclient._exceptions import InvalidInput
from fedclient.protocol import JobPlan

__all__ = ["load_plan", "plan_from_dict"]


def plan_from_dict(data: dict[str, Any], base: str | Path = ".") -> JobPlan:
    """Validate a plan given as nested dicts (``job``, ``model``, ``train`` tables). A
    ``bundle`` model's directory is relative to ``base``."""
    try:
        plan = msgspec.convert(data, type=JobPlan)
    except (msgspec.ValidationError, ValueError) as exc:
        raise InvalidInput(f"invalid plan: {exc}") from exc
    return _with_bundle(plan, Path(base)) if plan.model.kind == "bundle" else plan


def load_plan(path: str | Path) -> JobPlan:
    """Read and validate a TOML plan file (a bundle's path is relative to the file)."""
    import tomllib  # here, not at the top: a simulation builds its plan without TOML

    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise InvalidInput(f"cannot read plan {path}: {exc}") from exc
    return plan_from_dict(data, Path(path).parent)


def _with_bundle(plan: JobPlan, base: Path) -> JobPlan:
    """The plan with its bundle's absolute path, and the inputs, classes and digest of the
    bundle's (checked) manifest."""
    from fedclient.runtime import manifest_digest, read_manifest

    if not plan.model.bundle:
        raise InvalidInput("a bundle model needs [model] bundle = DIRECTORY")
    where = (base / plan.model.bundle).resolve()
    manifest = read_manifest(where)
    digest = manifest_digest(where)
    if plan.model.digest and plan.model.digest != digest:
        raise InvalidInput(f"the bundle in {where} is not the one the plan names (digest)")
    inputs = 1
    for dim in manifest.input_shape:
        inputs *= dim
    model = msgspec.structs.replace(
        plan.model,
        bundle=str(where),
        inputs=inputs,
        classes=manifest.classes,
        hidden=[],
        digest=digest,
    )
    return msgspec.structs.replace(plan, model=model)
