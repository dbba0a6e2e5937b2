"""Torch-free, lazy access to ONNX Runtime's on-device training API.

``import onnxruntime.training`` runs a package ``__init__`` that imports torch
(for ORTModule), which a device does not have. Its ``api`` and ``artifacts``
submodules need no torch, so the package is registered as a bare module (its
``__init__`` never runs) before they are imported. Nothing here is imported
until a caller asks for an ONNX runtime, so ``import fedclient`` stays light.
"""

from __future__ import annotations

import contextlib
import importlib
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

_lock = threading.Lock()


def ort() -> ModuleType:
    """The ``onnxruntime`` module (the training build or a plain one)."""
    try:
        return importlib.import_module("onnxruntime")
    except ImportError as exc:
        raise InvalidInput(f"the onnx runtime is not installed: {INSTALL_HINT}") from exc


def has_training_api() -> bool:
    """Whether the installed ONNX Runtime is the training build (a plain build, or none,
    trains bundles through their step graphs instead)."""
    try:
        return importlib.util.find_spec("onnxruntime.training") is not None
    except ImportError:  # no onnxruntime at all
        return False


def _register_bare_training_package() -> None:
    name = "onnxruntime.training"
    if name in sys.modules:  # already imported (for real, where torch exists) or registered
        return
    ort()
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise InvalidInput(
            "onnxruntime is installed without its training API (plain onnxruntime "
            f"overwrites the training build; reinstall it): {INSTALL_HINT}"
        )
    sys.modules[name] = importlib.util.module_from_spec(spec)  # created, never executed


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
