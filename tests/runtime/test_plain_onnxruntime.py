"""fedclient[onnxruntime] in a venv of its own: plain onnxruntime, no training packages.

What an aarch64 board or a Python 3.13 device installs. The test builds the venv
(once; it is kept in ``.cache/venvs`` beside the repository) with the package
installed editable from this checkout, then, in that venv, builds a CNN bundle
(no ``onnxruntime-training`` to make training artifacts: the bundle holds the
step graph only), trains it, and compares every weight with the numpy backend
trained on the same batches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedclient.sim.datasets import Dataset

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".cache" / "venvs" / "plain-onnxruntime"
READY = VENV / "fedclient-ready"

SCRIPT = """
import importlib.util, json, sys
import numpy as np

assert importlib.util.find_spec("onnxruntime.training") is None, "the training build is here"
import onnxruntime
from fedclient.protocol import ModelSpec
from fedclient.runtime import CnnShape, NumpyCnn, create_backend

data = np.load(sys.argv[1])
x, y = data["x"], data["y"]
spec = ModelSpec("cnn", 64, [4, 8], 10)
device = create_backend(spec, "onnx", seed=2)  # builds the bundle here, from the graph
reference = NumpyCnn(CnnShape.for_spec(spec), seed=2)
losses = [
    model.train(x, y, epochs=2, batch_size=16, learning_rate=0.1, rng=np.random.default_rng(7)).loss
    for model in (device, reference)
]
mine, theirs = device.get_weights(), reference.get_weights()
print(json.dumps({
    "onnxruntime": onnxruntime.__version__,
    "engine": device.engine,
    "engines": device.manifest.engines,
    "losses": losses,
    "max_diff": max(float(np.abs(mine[k] - theirs[k]).max()) for k in theirs),
    "accuracy": [m.evaluate(x, y).accuracy for m in (device, reference)],
}))
"""


def _venv_python() -> Path:
    """The venv's python, built on first use; skips (with pip's words) where PyPI is out
    of reach."""
    python = VENV / "bin" / "python"
    if READY.is_file():
        return python
    steps = [
        [sys.executable, "-m", "venv", "--clear", str(VENV)],
        [str(python), "-m", "pip", "install", "-q", "-e", f"{ROOT}[onnxruntime]"],
    ]
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            pytest.skip(f"cannot build the plain-onnxruntime venv: {done.stderr.strip()[-500:]}")
    READY.write_text("ok\n")
    return python


def test_plain_onnxruntime_trains_a_bundle_like_numpy(tmp_path: Path, digits: Dataset) -> None:
    python = _venv_python()
    data = tmp_path / "digits.npz"
    np.savez(data, x=digits.x_train[:200], y=digits.y_train[:200])
    env = {**os.environ, "FEDCLIENT_CACHE_DIR": str(tmp_path / "cache")}
    env.pop("PYTHONPATH", None)
    done = subprocess.run(
        [str(python), "-c", SCRIPT, str(data)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["engine"] == "plain" and result["engines"] == ["plain"]
    assert result["max_diff"] < 1e-5
    assert abs(result["losses"][0] - result["losses"][1]) < 1e-5
    assert result["accuracy"][0] == result["accuracy"][1] > 0.2  # chance is 0.1
