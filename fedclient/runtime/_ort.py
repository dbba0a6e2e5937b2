"""Torch-free, lazy access to ONNX Runtime and its on-device training API.

The training build's ``import onnxruntime`` checks its build by importing
``onnxruntime.training.ortmodule``, and ``onnxruntime.training``'s package
``__init__`` imports ORTModule and its optimisers: both load torch wherever torch
is installed (344-445 MB and seconds of a device's start, for a PyTorch
front-end a device never uses). ``onnxruntime.tools`` imports torch too, for
``generate_artifacts``. So `ort` registers ``onnxruntime.training`` (and
``onnxruntime.tools``) as bare packages, their ``__init__`` never run, and hides
``onnxruntime.training.ortmodule`` while ``onnxruntime`` itself is imported; the
``api`` and ``artifacts`` submodules need none of it. A process that imported
onnxruntime before fedclient keeps what it loaded. Nothing here is imported until
a caller asks for an ONNX runtime, so ``import fedclient`` stays light.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import importlib.util
import os
import sys
import tempfile
import threading
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from fedclient._exceptions import InvalidInput

__all__ = [
    "INSTALL_HINT",
    "artifacts_api",
    "has_training_api",
    "quiet_native_stderr",
    "ort",
    "session_options",
    "training_api",
]

INSTALL_HINT = (
    "pip install 'fedclient[onnx]'  (onnxruntime-training-cpu==1.19.2, onnx==1.17.0; x86_64), "
    "or 'fedclient[onnxruntime]'  (plain onnxruntime: any platform, trains with step graphs)"
)

_lock = threading.RLock()


def ort() -> ModuleType:
    """The ``onnxruntime`` module (the training build or a plain one), imported without
    torch (see the module docstring)."""
    if "onnxruntime" not in sys.modules:
        with _lock:
            _import_without_torch()
    try:
        return importlib.import_module("onnxruntime")
    except ImportError as exc:
        raise InvalidInput(f"the onnx runtime is not installed: {INSTALL_HINT}") from exc


def _subpackage(name: str) -> Any:
    """The spec of ``onnxruntime.<name>``, found without importing ``onnxruntime``."""
    try:
        parent = importlib.util.find_spec("onnxruntime")
    except (ImportError, ValueError):
        return None
    if parent is None or not parent.submodule_search_locations:
        return None
    return importlib.machinery.PathFinder.find_spec(
        f"onnxruntime.{name}", list(parent.submodule_search_locations)
    )


def _register_bare(name: str) -> None:
    """``onnxruntime.<name>`` in ``sys.modules`` as a package whose ``__init__`` never runs
    (its submodules import as usual)."""
    full = f"onnxruntime.{name}"
    if full in sys.modules:
        return
    spec = _subpackage(name)
    if spec is not None and spec.submodule_search_locations:
        sys.modules[full] = importlib.util.module_from_spec(spec)  # created, never executed


def _import_without_torch() -> None:
    if "onnxruntime" in sys.modules or importlib.util.find_spec("onnxruntime") is None:
        return
    _register_bare("training")
    _register_bare("tools")
    hidden = "onnxruntime.training.ortmodule"
    if hidden in sys.modules or "onnxruntime.training" not in sys.modules:
        importlib.import_module("onnxruntime")
        return
    sys.modules[hidden] = None  # type: ignore[assignment]  # its import fails: no torch
    try:
        importlib.import_module("onnxruntime")
    finally:
        if hidden in sys.modules and sys.modules[hidden] is None:
            del sys.modules[hidden]  # the host application may still import it itself


def has_training_api() -> bool:
    """Whether the installed ONNX Runtime is the training build (a plain build, or none,
    trains bundles through their step graphs instead)."""
    if "onnxruntime.training" in sys.modules:
        return True
    return _subpackage("training") is not None


def _register_bare_training_package() -> None:
    name = "onnxruntime.training"
    if name in sys.modules:  # already imported (for real, where torch exists) or registered
        return
    ort()
    if name not in sys.modules:
        raise InvalidInput(
            "onnxruntime is installed without its training API (plain onnxruntime "
            f"overwrites the training build; reinstall it): {INSTALL_HINT}"
        )


def training_api() -> ModuleType:
    """``onnxruntime.training.api`` (CheckpointState, Module, Optimizer), without torch."""
    with _lock:
        _register_bare_training_package()
        try:
            return importlib.import_module("onnxruntime.training.api")
        except ImportError as exc:
            raise InvalidInput(
                f"cannot load onnxruntime's training API ({exc}); "
                f"is plain onnxruntime installed over the training build? {INSTALL_HINT}"
            ) from exc


def artifacts_api() -> ModuleType:
    """``onnxruntime.training.artifacts`` (generate_artifacts), without torch; needs ``onnx``."""
    with _lock:
        _register_bare_training_package()
        try:
            return importlib.import_module("onnxruntime.training.artifacts")
        except ImportError as exc:
            raise InvalidInput(
                f"building ONNX training artifacts needs onnx: {INSTALL_HINT}"
            ) from exc


def session_options(*, threads: int = 1) -> Any:
    """Session options for small on-device models: one thread, warnings off.

    Thread pools cost more than they give for models this size, and a simulator
    holds one session per virtual device.
    """
    options = ort().SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return options


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Hide what native code writes to file descriptor 2 (ORT's C++ logger).

    ``generate_artifacts`` logs ~20 INFO lines that no logger severity
    silences. If the wrapped block raises, the hidden text is attached to the
    exception as a note, so nothing useful is lost.
    """
    fd = 2  # native code writes to the descriptor, whatever sys.stderr is now
    with tempfile.TemporaryFile(mode="w+b") as sink:
        sys.stderr.flush()
        saved = os.dup(fd)
        os.dup2(sink.fileno(), fd)
        try:
            yield
        except BaseException as exc:
            os.dup2(saved, fd)
            sink.seek(0)
            text = sink.read().decode("utf-8", "replace").strip()
            if text:
                exc.add_note("onnxruntime log:\n" + text[-4000:])
            raise
        finally:
            os.dup2(saved, fd)
            os.close(saved)
