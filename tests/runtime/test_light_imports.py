"""The device runtime loads ONNX Runtime without torch, even where torch is installed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")

CHILD = """
import json, sys
import numpy as np
from fedclient.protocol import ModelSpec
from fedclient.runtime import OnnxBackend

spec = ModelSpec("mlp", 8, [4], 3)
for engine in ("training", "plain"):
    backend = OnnxBackend.for_spec(spec)  # builds the bundle: generate_artifacts too
    backend = OnnxBackend(backend.bundle, engine=engine)
    backend.train(np.ones((6, 8)), np.arange(6) % 3, epochs=1, batch_size=3,
                  learning_rate=0.1, rng=np.random.default_rng(0))
import onnxruntime
print(json.dumps({"torch": "torch" in sys.modules, "version": onnxruntime.__version__,
                  "ortmodule": "onnxruntime.training.ortmodule" in sys.modules}))
"""


def test_the_runtime_trains_without_importing_torch(tmp_path: Path) -> None:
    # Found: the training build's `import onnxruntime` imported ORTModule, and with it
    # torch wherever torch was installed (344-445 MB, 4.5-14 s of a device's start).
    try:
        import torch  # noqa: F401
    except ImportError:
        has_torch = False
    else:
        has_torch = True
    env = {"FEDCLIENT_CACHE_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, env=env, timeout=300
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen == {"torch": False, "version": onnxruntime_version(), "ortmodule": False}
    assert has_torch or not seen["torch"]


def onnxruntime_version() -> str:
    import importlib.metadata

    for name in ("onnxruntime-training-cpu", "onnxruntime-training", "onnxruntime"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    raise AssertionError("no onnxruntime distribution")
