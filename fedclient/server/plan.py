"""Job plans from TOML: the same file runs in ``fedsim`` and in ``fedserver``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import msgspec

from fedclient._exceptions import InvalidInput
from fedclient.protocol import JobPlan, SelectionSettings, StrategySettings, TrainSettings
from fedclient.server.selection import selection_for
from fedclient.server.strategies import strategy_for

__all__ = ["load_plan", "plan_from_dict"]

#: Tables whose keys beyond their struct's fields are a plugin's own settings: (the
#: struct, the field that keeps them, the field naming the plugin). The settings are
#: handed to the plugin's class, which validates them; a table naming no plugin keeps
#: refusing keys it does not know.
_OPTION_TABLES: dict[str, tuple[type[msgspec.Struct], str, str]] = {
    "strategy": (StrategySettings, "options", "name"),
    "train": (TrainSettings, "trainer_options", "trainer"),
    "selection": (SelectionSettings, "options", "name"),
}


def plan_from_dict(data: dict[str, Any], base: str | Path = ".") -> JobPlan:
    """Validate a plan given as nested dicts (``job``, ``model``, ``train`` tables). A
    ``bundle`` model's directory is relative to ``base``, and so is a plugin's module
    (``[strategy] name = "module:Class"``: ``base`` and the current directory are on its
    import path). The strategy (and the selection) is built once here, so that it can
    refuse its settings when the plan is loaded."""
    data = _with_options(data)
    try:
        plan = msgspec.convert(data, type=JobPlan)
    except (msgspec.ValidationError, ValueError) as exc:
        raise InvalidInput(f"invalid plan: {exc}") from exc
    strategy_for(plan.strategy, where=[base])
    if plan.selection.name:
        selection_for(plan.selection, where=[base])
    return _with_bundle(plan, Path(base)) if plan.model.kind == "bundle" else plan


def _with_options(data: dict[str, Any]) -> dict[str, Any]:
    """The plan with each plugin table's own keys moved into its ``options``."""
    data = dict(data)
    for table, (struct, kept, plugin) in _OPTION_TABLES.items():
        settings = data.get(table)
        if not isinstance(settings, dict) or not settings.get(plugin):
            continue
        known = set(struct.__struct_fields__)
        options = dict(settings.get(kept) or {})
        options.update({k: v for k, v in settings.items() if k not in known})
        data[table] = {k: v for k, v in settings.items() if k in known and k != kept}
        if options:
            data[table][kept] = options
    return data


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
