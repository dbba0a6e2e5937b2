"""The step graph: one SGD step in standard ONNX ops, trained by a plain InferenceSession.

The references are the numpy backend (built-in models) and PyTorch's autograd
(convolutions of every stride, padding, dilation and group, pooling and the
activations mobile models use). Where torch is absent those tests skip.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("onnx", reason="the onnx extra is not installed")

import onnx
import onnxruntime
from onnx import TensorProto, helper, numpy_helper

from fedclient._exceptions import InvalidInput
from fedclient.protocol import ModelSpec
from fedclient.runtime import CnnShape, NumpyCnn, NumpyModel, OnnxBackend, write_bundle
from fedclient.runtime._bundle import BundleWarning, builtin_bundle
from fedclient.runtime._graphs import builtin_graph
from fedclient.runtime._onnx import ENGINE_VARIABLE
from fedclient.runtime._stepgraph import NoGradientRule, grad_name, next_name, step_graph
from fedclient.sim.datasets import Dataset

MLP = ModelSpec("mlp", 64, [24, 16], 10)
CNN = ModelSpec("cnn", 64, [4, 8], 10)  # 8x8 digits, two conv + max-pool blocks


def _reference(spec: ModelSpec, seed: int) -> NumpyModel | NumpyCnn:
    if spec.kind == "cnn":
        return NumpyCnn(CnnShape.for_spec(spec), seed=seed)
    return NumpyModel(spec, seed=seed)


@pytest.mark.parametrize("spec", [MLP, CNN], ids=["mlp", "cnn"])
def test_the_step_graph_trains_like_numpy(spec: ModelSpec, digits: Dataset) -> None:
    # 200 examples in batches of 16, two epochs: every epoch ends with a batch of 8.
    x, y = digits.x_train[:200], digits.y_train[:200]
    plain = OnnxBackend(builtin_bundle(spec, seed=4), engine="plain")
    assert plain.engine == "plain"
    reference = _reference(spec, seed=4)
    results = [
        model.train(x, y, epochs=2, batch_size=16, learning_rate=0.05, rng=np.random.default_rng(9))
        for model in (plain, reference)
    ]
    assert results[0].steps == results[1].steps == 26
    assert abs(results[0].loss - results[1].loss) < 1e-5
    mine, theirs = plain.get_weights(), reference.get_weights()
    assert list(mine) == list(theirs)
    for name in theirs:
        np.testing.assert_allclose(mine[name], theirs[name], atol=1e-5, err_msg=name)
    assert not np.allclose(mine["fc1.weight"], _reference(spec, seed=4).get_weights()["fc1.weight"])
    evaluated = plain.evaluate(digits.x_test, digits.y_test)
    expected = reference.evaluate(digits.x_test, digits.y_test)
    assert abs(evaluated.loss - expected.loss) < 1e-4
    assert evaluated.accuracy == expected.accuracy


def test_both_engines_take_the_same_step_on_one_bundle(digits: Dataset) -> None:
    bundle = builtin_bundle(CNN, seed=1)
    engines = {e: OnnxBackend(bundle, engine=e) for e in ("training", "plain")}
    for backend in engines.values():
        backend.train(
            digits.x_train[:64],
            digits.y_train[:64],
            epochs=1,
            batch_size=32,
            learning_rate=0.1,
            rng=np.random.default_rng(0),
        )
    a, b = (engines[e].get_weights() for e in ("training", "plain"))
    for name in a:
        np.testing.assert_allclose(a[name], b[name], atol=1e-6, err_msg=name)
    # Weights set from outside (the server's model) are what the next step starts from.
    engines["plain"].set_weights(a)
    np.testing.assert_array_equal(engines["plain"].get_weights()["conv1.weight"], a["conv1.weight"])


def test_the_engine_is_chosen_by_argument_or_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bundle = builtin_bundle(MLP, seed=0)
    assert OnnxBackend(bundle).engine == "training"  # installed here: the faster one
    monkeypatch.setenv(ENGINE_VARIABLE, "plain")
    assert OnnxBackend(bundle).engine == "plain"
    assert OnnxBackend(bundle, engine="training").engine == "training"
    with pytest.raises(InvalidInput, match="unknown ONNX engine 'gpu'"):
        OnnxBackend(bundle, engine="gpu")


def _tiny(op: str) -> onnx.ModelProto:
    """input (batch, 4) -> Gemm(w) -> op -> Gemm(v) -> logits."""
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Gemm", ["input", "w"], ["h"], transB=1),
        helper.make_node(op, ["h"], ["a"]),
        helper.make_node("Gemm", ["a", "v"], ["logits"], transB=1),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [
            numpy_helper.from_array(rng.normal(size=(5, 4)).astype(np.float32), "w"),
            numpy_helper.from_array(rng.normal(size=(3, 5)).astype(np.float32), "v"),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


def test_an_op_without_a_rule_is_named_and_the_bundle_keeps_the_training_api(
    tmp_path: Path,
) -> None:
    model = _tiny("Sin")  # ONNX Runtime's training build has its gradient
    with pytest.raises(NoGradientRule, match="'Sin'"):
        step_graph(model, ["w", "v"])
    with pytest.warns(BundleWarning, match="no step graph for plain onnxruntime.*'Sin'"):
        manifest = write_bundle(model, tmp_path, name="tiny")
    assert manifest.engines == ["training"]
    assert not (tmp_path / "step.onnx").exists()
    assert OnnxBackend(tmp_path).engine == "training"
    with pytest.raises(InvalidInput, match="no files for the 'plain' engine"):
        OnnxBackend(tmp_path, engine="plain")
    # Freezing what lies before the op leaves it off every trainable path: now it steps.
    with warnings.catch_warnings():
        warnings.simplefilter("error", BundleWarning)
        frozen = write_bundle(model, tmp_path / "frozen", name="tiny", frozen=["w"])
    assert frozen.engines == ["training", "plain"]


def test_the_step_graph_uses_only_default_domain_ops() -> None:
    step = step_graph(builtin_graph(CNN), ["conv1.weight", "conv1.bias", "fc1.weight"])
    assert {n.domain for n in step.graph.node} <= {"", "ai.onnx"}
    assert [o.name for o in step.graph.output] == [
        "loss",
        *(next_name(n) for n in ("conv1.weight", "conv1.bias", "fc1.weight")),
        *(grad_name(n) for n in ("conv1.weight", "conv1.bias", "fc1.weight")),
    ]
    # Untrained parameters are constants of the step graph, not inputs.
    assert "conv2.weight" in {t.name for t in step.graph.initializer}
    session = onnxruntime.InferenceSession(
        step.SerializeToString(), providers=["CPUExecutionProvider"]
    )
    assert {i.name for i in session.get_inputs()} == {
        "input",
        "labels",
        "learning_rate",
        "conv1.weight",
        "conv1.bias",
        "fc1.weight",
    }


VARIANTS = """
import torch
from torch import nn


class Net(nn.Module):
    \"\"\"Convolutions of every kind the step graph differentiates, and the activations.\"\"\"

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.c1 = nn.Conv2d(2, 6, 3, stride=2, padding=(1, 0))
        self.c2 = nn.Conv2d(6, 6, 3, stride=3, padding=2, dilation=2, groups=3)
        self.c3 = nn.Conv2d(6, 12, 2, groups=6)
        self.bn = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 16)
        self.fc2 = nn.Linear(12, 8)
        self.head = nn.Linear(24, 5)
        self.bn.running_mean.uniform_(-0.2, 0.2)
        self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        x = torch.sigmoid(self.c1(x)) * 2 - 0.5
        x = torch.tanh(self.c2(x))
        x = nn.functional.leaky_relu(self.bn(self.c3(x)), 0.1)
        x = nn.functional.hardswish(nn.functional.avg_pool2d(x, 2)).flatten(1)
        h = nn.functional.relu6(self.fc(x) * 3)
        g = nn.functional.gelu(self.fc2(x))
        z = torch.cat([h, g.abs()], 1)
        z = z * torch.log(1.5 + torch.softmax(z, 1))
        return self.head(z / (1.0 + z.mean(1, keepdim=True)))
"""


@pytest.mark.parametrize("frozen", [[], ["c1."]], ids=["all", "c1-frozen"])
def test_the_step_graph_matches_pytorch_autograd(
    frozen: list[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("torch", reason="torch is not installed (the PyTorch reference)")
    from fedclient.convert._convert import resolve

    (tmp_path / "variants_for_step.py").write_text(VARIANTS)
    monkeypatch.chdir(tmp_path)
    source = resolve("variants_for_step:Net", input_shape=[2, 23, 21], frozen=frozen)
    ops = {n.op_type for n in source.model.graph.node}
    assert {"Conv", "AveragePool", "Sigmoid", "Tanh", "LeakyRelu", "ReduceMean", "Clip"} <= ops
    assert {"Erf", "Concat", "Abs", "Softmax", "Log", "Div"} <= ops
    initial = source.reference.initial_weights()
    trainable = [n for n in initial if n not in source.frozen]
    session = onnxruntime.InferenceSession(
        step_graph(source.model, trainable).SerializeToString(),
        providers=["CPUExecutionProvider"],
    )
    rng = np.random.default_rng(0)
    x = rng.random((8, 2, 23, 21), dtype=np.float32)
    y = rng.integers(0, 5, 8)
    feeds = {"labels": y, "learning_rate": np.array(0.5, np.float32)}
    feeds.update({n: initial[n] for n in trainable})
    outputs = ["loss", *(next_name(n) for n in trainable)]
    loss, *stepped = session.run(outputs, {source.model.graph.input[0].name: x, **feeds})
    assert abs(float(loss) - source.reference.loss(initial, x, y)) < 1e-5
    expected = source.reference.sgd_step(x, y, 0.5)
    assert expected is not None
    for name, value in zip(trainable, stepped, strict=True):
        assert np.abs(value - expected[name]).max() < 1e-5, name
        assert np.abs(value - initial[name]).max() > 1e-5, f"{name} did not move"
