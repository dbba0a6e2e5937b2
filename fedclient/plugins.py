"""Plugins named by import path: a plan's ``"module:Class"``.

A plan names a strategy (``[strategy] name``), a selection (``[selection] name``)
or, in a simulation, a client trainer (``[train] trainer``) either by a built-in
name or by the import path of a class: ``"my_strategies:Krum"`` is class ``Krum``
of module ``my_strategies``. `load_plugin` imports it with the plan file's folder
and the current directory on the import path, so a file beside the plan needs
neither installing nor a wrapper script, and checks that it is a class of the kind
asked. The other settings of the plan's table are the class's own keyword
arguments (`construct`); the report records each plugin's file and digest
(`describe`), so a run can be told apart from one with an edited plugin.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from fedclient._exceptions import InvalidInput

__all__ = ["construct", "describe", "find_recorded", "is_import_path", "load_plugin"]

T = TypeVar("T")


def is_import_path(name: str) -> bool:
    """Whether a plan's name is an import path (``module:Class``), not a built-in name."""
    return ":" in name


def load_plugin(path: str, kind: type, *, where: Sequence[str | Path] = ()) -> type[Any]:
    """The class ``path`` (``package.module:Class``) names, a subclass of ``kind``.

    The module is imported with the folders ``where`` (a plan file's) and the current
    directory at the end of the import path (they stay there: a plugin may import its
    neighbours later). Anything wrong is an `InvalidInput` that names the path."""
    module_name, _, attribute = path.partition(":")
    if not all(part.isidentifier() for part in (*module_name.split("."), *attribute.split("."))):
        raise InvalidInput(f"{path!r} is not an import path: use package.module:Class")
    for folder in (*where, "."):
        resolved = str(Path(folder).resolve())
        if resolved not in sys.path:
            sys.path.append(resolved)
    try:
        found: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise InvalidInput(f"cannot import {module_name!r} (for {path!r}): {exc}") from exc
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise InvalidInput(f"{module_name!r} has no {attribute!r} (for {path!r})")
        found = getattr(found, part)
    if not (isinstance(found, type) and issubclass(found, kind)):
        raise InvalidInput(f"{path!r} is not a {kind.__name__} (a subclass of it)")
    return found


def construct(cls: type[T], what: str, *args: Any, options: Mapping[str, Any]) -> T:
    """``cls(*args, **options)``: a plugin built with its own settings from the plan.

    Options the class does not take, and the class's own refusals (a ValueError or
    TypeError from its constructor), are `InvalidInput` naming ``what``."""
    try:
        inspect.signature(cls).bind(*args, **options)
    except TypeError:
        accepted = [
            p.name
            for p in inspect.signature(cls).parameters.values()
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "settings"
        ]
        unknown = sorted(set(options) - set(accepted))
        raise InvalidInput(
            f"{what} takes no setting {', '.join(map(repr, unknown)) or '(positional)'}; "
            f"it takes: {', '.join(accepted) or 'none'}"
        ) from None
    try:
        return cls(*args, **options)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"{what}: {exc}") from exc


def find_recorded(entry: Mapping[str, str]) -> None:
    """Put the folder a report recorded a plugin in (`describe`) on the import path, so a
    replay finds it wherever it runs from (a sweep's run, whose plan is elsewhere)."""
    module = entry.get("name", "").partition(":")[0]
    source = entry.get("file", "")
    if not module or not source:
        return
    folder = Path(source).parent
    for _ in range(module.count(".") + (Path(source).name == "__init__.py")):
        folder = folder.parent
    if folder.is_dir() and str(folder) not in sys.path:
        sys.path.append(str(folder))


def describe(path: str, kind: type[Any], *, where: Sequence[str | Path] = ()) -> dict[str, str]:
    """What a report records of plugin ``path``: the path, its module's file and that
    file's SHA-256 (``fedsim replay`` warns when it changed)."""
    cls = load_plugin(path, kind, where=where)
    module = sys.modules[cls.__module__]
    source = getattr(module, "__file__", None)
    entry = {"name": path, "file": str(source or "")}
    if source:
        entry["sha256"] = hashlib.sha256(Path(source).read_bytes()).hexdigest()
    return entry
