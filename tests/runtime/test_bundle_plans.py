"""Federate your own model: a plan names a fedconvert bundle of an ONNX file (issue 19)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx

import fedclient
from fedclient import InvalidInput
from fedclient.convert.cli import main as fedconvert
from fedclient.protocol import ModelSpec
from fedclient.runtime import OnnxBackend, bundle_weights, create_backend
from fedclient.runtime._graphs import builtin_graph, builtin_weights
from fedclient.server import FederationService, ServerStore, create_app, load_plan
from fedclient.sim.cli import main as fedsim

SPEC = ModelSpec("mlp", 64, [16], 10)
JOB = """
[job]
name = "digits"
rounds = 6
devices_per_round = 6
min_devices = 3
seed = 3
[train]
epochs = 2
batch_size = 8
learning_rate = 0.1
"""


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Someone's own model: an ONNX file (here the MLP, initialised as the plan's seed
    would), converted with fedconvert."""
    folder = tmp_path_factory.mktemp("own")
    onnx.save(builtin_graph(SPEC, seed=3), str(folder / "model.onnx"))
    assert fedconvert([str(folder / "model.onnx"), "-o", str(folder / "bundle")]) == 0
    return folder / "bundle"


def test_a_plan_names_a_bundle_and_takes_its_shape_and_weights(bundle: Path) -> None:
    plan_file = bundle.parent / "plan.toml"
    plan_file.write_text(JOB + '[model]\nkind = "bundle"\nbundle = "bundle"\n')
    plan = load_plan(plan_file)
    assert plan.model.bundle == str(bundle.resolve())  # relative to the plan file
    assert (plan.model.inputs, plan.model.classes) == (64, 10)
    assert len(plan.model.digest) == 64
    weights = bundle_weights(bundle)
    reference = builtin_weights(SPEC, seed=3)
    assert weights.keys() == reference.keys()
    for name, value in reference.items():
        assert (weights[name] == value).all()
    with pytest.raises(InvalidInput, match="ONNX Runtime"):
        create_backend(plan.model, "numpy")
    wrong = bundle.parent / "wrong.toml"
    wrong.write_text(JOB + '[model]\nkind = "bundle"\nbundle = "bundle"\ndigest = "00"\n')
    with pytest.raises(InvalidInput, match="digest"):
        load_plan(wrong)


def test_fedsim_federates_the_bundle_to_the_numpy_model_s_accuracy(
    bundle: Path, tmp_path: Path
) -> None:
    own = tmp_path / "own.toml"
    own.write_text(JOB + f'[model]\nkind = "bundle"\nbundle = "{bundle}"\n')
    builtin = tmp_path / "builtin.toml"
    builtin.write_text(JOB + '[model]\nkind = "mlp"\ninputs = 64\nhidden = [16]\nclasses = 10\n')
    common = ["--dataset", "digits", "--devices", "30", "--quiet", "--no-plot"]  # the plan: seed 3
    reports = {}
    for name, plan, runtime in (("own", own, "onnx"), ("numpy", builtin, "numpy")):
        out = tmp_path / f"{name}.json"
        assert (
            fedsim(
                ["run", "--plan", str(plan), "--runtime", runtime, *common, "--report", str(out)]
            )
            == 0
        )
        reports[name] = json.loads(out.read_text())["final"]
    assert reports["own"]["rounds_completed"] == 6
    assert abs(reports["own"]["accuracy"] - reports["numpy"]["accuracy"]) <= 0.01


def test_a_device_with_another_bundle_is_refused(bundle: Path, tmp_path: Path, digits: Any) -> None:
    plan_file = tmp_path / "p.toml"
    plan_file.write_text(JOB + f'[model]\nkind = "bundle"\nbundle = "{bundle}"\n')
    service = FederationService(ServerStore())
    service.add_job(load_plan(plan_file))
    onnx.save(builtin_graph(SPEC, seed=4), str(tmp_path / "other.onnx"))
    assert fedconvert([str(tmp_path / "other.onnx"), "-o", str(tmp_path / "other")]) == 0
    transport = httpx.ASGITransport(app=create_app(service))
    data = (digits.x_train[:50], digits.y_train[:50])

    def device(folder: Path) -> fedclient.Client:
        return fedclient.Client(
            "http://s", "digits", data, transport=transport, model=OnnxBackend(folder)
        )

    async def run() -> None:
        assert (await device(bundle).arun_once()).status == "uploaded"
        with pytest.raises(fedclient.ModelMismatch, match="bundle"):
            await device(tmp_path / "other").astep()  # same shapes, another bundle

    asyncio.run(run())
