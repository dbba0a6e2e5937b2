"""fedconvert, in-process: built-in, ONNX and PyTorch sources become verified device bundles."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from fedclient.convert._convert import builtin_source, convert  # noqa: E402
from fedclient.convert._references import NumpyReference  # noqa: E402
from fedclient.convert._verify import difference, max_difference, verify_bundle  # noqa: E402
from fedclient.convert.cli import main as fedconvert  # noqa: E402
from fedclient.runtime import NumpyModel, OnnxBackend, read_manifest, write_bundle  # noqa: E402
from fedclient.runtime._bundle import BUNDLE_FILES  # noqa: E402

HERE = Path(__file__).parent


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = fedconvert(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


#: Every check of a bundle that holds both engines' files, in order.
CHECKS = (
    "files",
    "initial weights",
    "inference",
    "gradients",
    "loss",
    "training step",
    "gradients [step graph]",
    "loss [step graph]",
    "training step [step graph]",
)


def _checks(out: str) -> dict[str, str]:
    """check name -> result column of the printed verification table."""
    rows = {}
    table = out.split("verification:", 1)[1].splitlines()[3:]
    for line in table:
        if not line.startswith("  ") or not line.strip():
            break
        rows[re.split(r"\s{2,}", line.strip())[0]] = line.split()[-1]
    return rows


def test_builtin_mlp_becomes_a_verified_bundle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "mlp"
    code, out, err = _run(
        capsys, "mlp", "--inputs", "64", "--hidden", "32", "--seed", "3", "-o", str(out_dir)
    )
    assert code == 0, err
    assert "GraphTransformer" not in out + err  # ONNX Runtime's INFO lines stay hidden
    for needle in (
        "fc1.weight  32x64  float32",
        "2,410 trainable parameters",
        "Gemm x2, Relu x1",
        "checkpoint",
        "inference.onnx",
        "bundle verified",
    ):
        assert needle in out, needle
    assert _checks(out) == dict.fromkeys(CHECKS, "ok")
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert [(p["name"], p["shape"], p["dtype"]) for p in manifest["parameters"]] == [
        (name, list(v.shape), "float32")
        for name, v in NumpyModel(read_manifest(out_dir).spec(), seed=3).get_weights().items()  # type: ignore[arg-type]
    ]
    assert manifest["input"] == {"name": "input", "shape": [None, 64], "dtype": "float32"}
    for role, info in manifest["files"].items():
        assert (out_dir / BUNDLE_FILES[role]).stat().st_size == info["bytes"]
        assert len(info["sha256"]) == 64
    # The bundle is what a device trains from.
    weights = OnnxBackend(out_dir).get_weights()
    np.testing.assert_array_equal(
        weights["fc2.weight"],
        NumpyModel(read_manifest(out_dir).spec(), seed=3).get_weights()["fc2.weight"],  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("side", [8, 28])
def test_builtin_cnn_becomes_a_verified_bundle(
    side: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = _run(capsys, "cnn", "--side", str(side), "-o", str(tmp_path / "cnn"))
    assert code == 0, err
    assert f"input Nx{side * side} float32" in out
    assert "Conv x2, Gemm x1, MaxPool x2, Relu x2, Reshape x2" in out
    assert set(_checks(out).values()) == {"ok"}


def test_json_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _run(
        capsys, "softmax", "--inputs", "16", "--classes", "3", "--json", "-o", str(tmp_path)
    )
    assert code == 0
    summary = json.loads(out)
    assert summary["verification"]["passed"] is True
    assert [c["name"] for c in summary["verification"]["checks"]] == list(CHECKS)
    assert summary["manifest"]["ops"] == {"Gemm": 1}
    assert summary["manifest"]["parameters"][0] == {
        "name": "fc1.weight",
        "shape": [3, 16],
        "dtype": "float32",
    }


def _onnx_file(path: Path, *nodes: Any, weights: dict[str, np.ndarray], x_shape: list[Any]) -> Path:
    graph = helper.make_graph(
        list(nodes),
        "net",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, x_shape)],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [x_shape[0], 5])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    onnx.save(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9), path
    )
    return path


def test_an_onnx_file_is_verified_against_the_reference_evaluator(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rng = np.random.default_rng(0)
    path = _onnx_file(
        tmp_path / "net.onnx",
        helper.make_node("Conv", ["pixels", "k", "kb"], ["c"], kernel_shape=[3, 3]),
        helper.make_node("Sigmoid", ["c"], ["s"]),
        helper.make_node("Flatten", ["s"], ["f"]),
        helper.make_node("Gemm", ["f", "w", "b"], ["scores"], transB=1),
        weights={
            "k": rng.normal(0, 0.5, (2, 1, 3, 3)).astype(np.float32),
            "kb": np.zeros(2, np.float32),
            "w": rng.normal(0, 0.3, (5, 2 * 4 * 4)).astype(np.float32),
            "b": np.zeros(5, np.float32),
        },
        x_shape=[1, 1, 6, 6],  # a fixed batch of 1, as exporters often write
    )
    code, out, err = _run(capsys, str(path), "-o", str(tmp_path / "bundle"))
    assert code == 0, err
    assert "onnx reference evaluator" in out and "gradient vs finite differences" in out
    assert set(_checks(out).values()) == {"ok"}
    backend = OnnxBackend(tmp_path / "bundle")
    assert backend.input_shape == (1, 6, 6) and backend.classes == 5
    result = backend.train(
        rng.random((10, 36)),
        np.arange(10) % 5,
        epochs=1,
        batch_size=4,
        learning_rate=0.1,
        rng=np.random.default_rng(0),
    )
    assert result.steps == 3  # the fixed batch of 1 was made symbolic


def _relu_conv_net(path: Path, seed: int = 0) -> Path:
    """A small correct conv net with kinks: conv, ReLU, a depthwise conv, ReLU, max-pool."""
    rng = np.random.default_rng(seed)
    return _onnx_file(
        path,
        helper.make_node("Conv", ["pixels", "k", "kb"], ["c"], kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Relu", ["c"], ["r"]),
        helper.make_node(
            "Conv", ["r", "dw", "dwb"], ["d"], kernel_shape=[3, 3], pads=[1] * 4, group=8
        ),
        helper.make_node("Relu", ["d"], ["s"]),
        helper.make_node("MaxPool", ["s"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "w", "b"], ["scores"], transB=1),
        weights={
            "k": rng.normal(0, 0.5, (8, 1, 3, 3)).astype(np.float32),
            "kb": rng.normal(0, 0.1, 8).astype(np.float32),
            "dw": rng.normal(0, 0.5, (8, 1, 3, 3)).astype(np.float32),
            "dwb": rng.normal(0, 0.1, 8).astype(np.float32),
            "w": rng.normal(0, 0.1, (5, 8 * 14 * 14)).astype(np.float32),
            "b": np.zeros(5, np.float32),
        },
        x_shape=[1, 1, 28, 28],
    )


def _scale_gradient(bundle: Path, parameter: str, factor: float) -> None:
    """Make the training graph's gradient of ``parameter`` ``factor`` times too large, and
    reseal the manifest: a bundle whose forward pass is right and whose training is not."""
    import hashlib

    import onnx

    model = onnx.load(bundle / "training_model.onnx")
    grad = f"{parameter}_grad"
    (producer,) = [n for n in model.graph.node if grad in n.output]
    producer.output[list(producer.output).index(grad)] = grad + ".right"
    model.graph.initializer.append(
        numpy_helper.from_array(np.array(factor, np.float32), "gradient_factor")
    )
    model.graph.node.append(helper.make_node("Mul", [grad + ".right", "gradient_factor"], [grad]))
    onnx.save(model, bundle / "training_model.onnx")
    manifest = json.loads((bundle / "manifest.json").read_text())
    body = (bundle / "training_model.onnx").read_bytes()
    manifest["files"]["training_model"] = {
        "bytes": len(body),
        "sha256": hashlib.sha256(body).hexdigest(),
    }
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_a_conv_net_with_relu_kinks_passes_and_a_wrong_gradient_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import onnx

    from fedclient.convert._references import OnnxReference

    net = _relu_conv_net(tmp_path / "net.onnx")
    code, out, err = _run(capsys, str(net), "-o", str(tmp_path / "bundle"))
    assert code == 0, err
    assert set(_checks(out).values()) == {"ok"}
    names = [p.name for p in read_manifest(tmp_path / "bundle").parameters]
    _scale_gradient(tmp_path / "bundle", "dw", 1.02)  # 2% off, on the depthwise kernel
    verification = verify_bundle(tmp_path / "bundle", OnnxReference(onnx.load(net), names))
    failed = [c for c in verification.checks if not c.passed]
    # The forward pass is still right, and so is the step graph (a gradient of its own).
    assert [c.name for c in failed] == ["training step"]
    assert 0.015 < failed[0].error < 0.025


def test_batchnorm_trains_in_inference_mode_with_its_statistics_frozen(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # ONNX Runtime's training graph would normalise with batch statistics (the loss was
    # 3.1 off the reference's); rewritten, it trains scale and shift on frozen statistics.
    rng = np.random.default_rng(0)
    net = _onnx_file(
        tmp_path / "bn.onnx",
        helper.make_node("Conv", ["pixels", "k", "kb"], ["c"], kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["n"]),
        helper.make_node("Relu", ["n"], ["r"]),
        helper.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Gemm", ["f", "w", "b"], ["scores"], transB=1),
        weights={
            "k": rng.normal(0, 0.5, (8, 1, 3, 3)).astype(np.float32),
            "kb": rng.normal(0, 0.1, 8).astype(np.float32),
            "gamma": (1 + 0.1 * rng.normal(size=8)).astype(np.float32),
            "beta": rng.normal(0, 0.1, 8).astype(np.float32),
            "mean": rng.normal(0, 0.1, 8).astype(np.float32),
            "var": (1 + rng.random(8)).astype(np.float32),
            "w": rng.normal(0, 0.1, (5, 8 * 14 * 14)).astype(np.float32),
            "b": np.zeros(5, np.float32),
        },
        x_shape=[1, 1, 28, 28],
    )
    code, out, err = _run(capsys, str(net), "-o", str(tmp_path / "bundle"))
    assert code == 0, err
    assert set(_checks(out).values()) == {"ok"}
    manifest = read_manifest(tmp_path / "bundle")
    assert {t.name for t in manifest.frozen} == {"mean", "var"}
    assert [p.name for p in manifest.parameters] == ["k", "kb", "gamma", "beta", "w", "b"]
    backend = OnnxBackend(tmp_path / "bundle")
    before = backend.get_weights()
    backend.train(
        rng.random((16, 784)).astype(np.float32),
        np.arange(16) % 5,
        epochs=1,
        batch_size=8,
        learning_rate=0.1,
        rng=np.random.default_rng(0),
    )
    after = backend.get_weights()
    assert set(after) == set(before) and "mean" not in after  # statistics never travel
    assert not np.array_equal(after["gamma"], before["gamma"])  # the affine part trains


def test_a_pytorch_module_is_verified_against_torch(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch = pytest.importorskip(
        "torch", reason="torch is not installed (fedconvert's PyTorch source is optional)"
    )
    code, out, err = _run(
        capsys, f"{HERE / 'torch_net.py'}:Net", "--input-shape", "1,8,8", "-o", str(tmp_path)
    )
    assert code == 0, err
    assert "vs PyTorch" in out
    assert set(_checks(out).values()) == {"ok"}
    from tests.tools.torch_net import Net

    state = Net().state_dict()
    weights = OnnxBackend(tmp_path).get_weights()
    assert list(weights) == [k for k in state if k in weights] and set(weights) == set(state)
    for name, value in weights.items():
        np.testing.assert_array_equal(value, state[name].numpy())
    assert torch.__version__


MOBILENET = """
import torch
from torch import nn


class Net(nn.Module):
    \"\"\"MobileNet-style: a strided conv, a depthwise-separable block, BatchNorm after each
    conv (with pre-trained running statistics), ReLU6 and Hardswish.\"\"\"

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
            nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6(),
            nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.Hardswish(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(16, 10)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)

    def forward(self, x):
        return self.head(self.features(x))
"""


@pytest.fixture
def mobilenet_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working folder, holding mobilenet_for_fedconvert.py (skips without torch)."""
    pytest.importorskip(
        "torch", reason="torch is not installed (fedconvert's PyTorch source is optional)"
    )
    (tmp_path / "mobilenet_for_fedconvert.py").write_text(MOBILENET)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_a_mobilenet_style_module_converts_from_its_own_folder_and_matches_torch(
    mobilenet_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Found: BatchNorm trained on batch statistics (one SGD step 0.257 off PyTorch's),
    # equal BatchNorm scales tied into one tensor by the exporter, and no gradient for
    # HardSwish. Now: statistics frozen, each layer its own tensor, HardSwish rewritten.
    tmp_path = mobilenet_folder
    code, out, err = _run(
        capsys, "mobilenet_for_fedconvert:Net", "--input-shape", "1,28,28", "-o", "bundle"
    )
    assert code == 0, err
    assert "rewritten to train: HardSwish x1" in out
    assert set(_checks(out).values()) == {"ok"}  # inference, loss and the step within 1e-5
    manifest = read_manifest(tmp_path / "bundle")
    assert {t.name for t in manifest.frozen} == {
        f"features.{i}.running_{s}" for i in (1, 4, 7) for s in ("mean", "var")
    }
    assert {"features.1.weight", "features.4.weight", "features.7.weight"} <= {
        p.name for p in manifest.parameters
    }


def test_a_frozen_backbone_trains_and_uploads_only_the_head(
    mobilenet_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tmp_path = mobilenet_folder
    argv = ["mobilenet_for_fedconvert:Net", "--input-shape", "1,28,28", "-o", "bundle"]
    code, out, err = _run(capsys, *argv, "--freeze", "features.")
    assert code == 0, err
    assert set(_checks(out).values()) == {"ok"}
    manifest = read_manifest(tmp_path / "bundle")
    assert [p.name for p in manifest.parameters] == ["head.weight", "head.bias"]
    backend = OnnxBackend(tmp_path / "bundle")
    before = backend.get_weights()
    backend.train(
        np.random.default_rng(0).random((16, 784)).astype(np.float32),
        np.arange(16) % 10,
        epochs=1,
        batch_size=8,
        learning_rate=0.1,
        rng=np.random.default_rng(0),
    )
    after = backend.get_weights()
    # What a device uploads: the head's 16 x 10 weights and 10 biases, nothing else.
    assert sum(v.nbytes for v in after.values()) == (16 * 10 + 10) * 4
    assert not np.array_equal(after["head.weight"], before["head.weight"])
    code, _, err = _run(capsys, *argv, "--freeze", "backbone.")
    assert code != 0 and "names no initialiser" in err


def test_a_pytorch_source_without_torch_is_a_clear_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("torch is installed here; this checks the message a machine without it gets")
    code, _, err = _run(capsys, "mypkg.models:Net", "--input-shape", "1,28,28")
    assert code == 2
    assert "needs torch installed" in err


def test_unsupported_models_fail_with_a_clear_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _onnx_file(
        tmp_path / "floor.onnx",
        helper.make_node("Gemm", ["pixels", "w", "b"], ["g"], transB=1),
        helper.make_node("Floor", ["g"], ["scores"]),
        weights={"w": np.ones((5, 4), np.float32), "b": np.zeros(5, np.float32)},
        x_shape=["n", 4],
    )
    code, out, err = _run(capsys, str(path), "-o", str(tmp_path / "bundle"))
    assert (code, out) == (2, "")
    assert "unsupported op 'Floor'" in err and "Traceback" not in err
    for argv, message in [
        (["resnet50"], "cannot tell what 'resnet50' is"),
        ([str(tmp_path / "missing.onnx")], "no such file"),
        (["cnn", "--side", "10"], "divisible by 4"),
        (["mlp", "--classes", "1"], "invalid mlp model"),
    ]:
        code, _, err = _run(capsys, *argv, "-o", str(tmp_path / "x"))
        assert code == 2 and message in err, (argv, err)


def test_a_failed_check_fails_the_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = _run(capsys, "mlp", "--tolerance", "0", "-o", str(tmp_path))
    assert code == 1
    assert _checks(out)["inference"] == "FAILED" and "FAILED verification" in out


def test_verification_catches_a_bundle_that_is_not_the_source(tmp_path: Path) -> None:
    convert(builtin_source("mlp", hidden=[8], seed=0), tmp_path)
    other = NumpyReference(NumpyModel(read_manifest(tmp_path).spec(), seed=1))  # type: ignore[arg-type]
    verification = verify_bundle(tmp_path, other)
    assert not verification.passed
    failed = {c.name for c in verification.checks if not c.passed}
    assert {"initial weights", "inference", "training step"} <= failed


def test_a_module_in_the_working_folder_loads_as_with_python_m(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found: `fedconvert mymodel:Net` run from the folder holding mymodel.py failed with
    # ModuleNotFoundError (the working folder was not on the import path).
    from fedclient.convert._convert import _load_object

    (tmp_path / "mymodel_for_fedconvert.py").write_text("class Net:\n    kind = 'mine'\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in sys.path if p not in ("", str(tmp_path))])
    assert _load_object("mymodel_for_fedconvert:Net").kind == "mine"


def test_differences_are_absolute_for_small_values_and_relative_for_large_ones() -> None:
    # Found: a trained model's logits reach 77 on noise images, where float32 rounding
    # alone (3e-5) failed an absolute 1e-5, while a wrong small value must still fail.
    assert difference(np.float32(77.00003), 77.0) < 1e-6
    assert difference(3e-5, 0.0) == pytest.approx(3e-5)
    assert difference(np.array([0.5, 77.0]), np.array([0.5, 77.0])) == 0.0
    assert max_difference({"w": np.ones(3)}, {"w": np.ones(2)}) == float("inf")


def test_relu6_at_exactly_zero_trains_as_in_pytorch_on_every_engine(tmp_path: Path) -> None:
    # Found: ONNX Runtime's training graph passed a Clip's gradient at its lower bound,
    # PyTorch and the step graph do not. A unit whose weights start at zero (zero-init
    # layers) is exactly 0 there. Rewritten as Relu then Clip(max), both engines agree.
    from onnx import TensorProto, helper, numpy_helper

    from fedclient.convert._rewrite import relu_clips

    rng = np.random.default_rng(0)
    w = rng.normal(size=(5, 4)).astype(np.float32)
    w[0] = 0.0  # hidden unit 0 is exactly 0 for every input
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["input", "w"], ["h"], transB=1),
            helper.make_node("Clip", ["h", "zero", "six"], ["a"]),
            helper.make_node("Gemm", ["a", "v", "b"], ["logits"], transB=1),
        ],
        "relu6",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(rng.normal(size=(3, 5)).astype(np.float32), "v"),
            numpy_helper.from_array(np.zeros(3, np.float32), "b"),
            numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
            numpy_helper.from_array(np.array(6.0, np.float32), "six"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    x = rng.random((4, 4)).astype(np.float32)
    y = np.array([0, 1, 2, 0])

    def steps(onnx_model: Any, out: Path) -> dict[str, dict[str, np.ndarray]]:
        write_bundle(onnx_model, out, name="relu6")
        found = {}
        for engine in ("training", "plain"):
            backend = OnnxBackend(out, engine=engine)
            backend.train(
                x, y, epochs=1, batch_size=4, learning_rate=0.5, rng=np.random.default_rng(0)
            )
            found[engine] = backend.get_weights()
        return found

    before = steps(model, tmp_path / "as-exported")
    assert np.abs(before["training"]["w"][0]).max() > 1e-3  # it moved: the old disagreement
    assert np.abs(before["plain"]["w"][0]).max() == 0.0  # PyTorch's: no gradient at 0
    rewritten = relu_clips(model)
    assert [n.op_type for n in rewritten.graph.node] == ["Gemm", "Relu", "Clip", "Gemm"]
    after = steps(rewritten, tmp_path / "rewritten")
    assert max_difference(after["training"], after["plain"]) < 1e-6
    np.testing.assert_allclose(after["plain"]["w"], before["plain"]["w"], atol=1e-7)


def test_a_batchnorm_model_with_fresh_statistics_is_told_it_will_not_learn(
    mobilenet_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Found: a BatchNorm MobileNet federated from fresh initialisation stayed at chance
    # (0.0975) on both engines with no warning: BatchNorm trains in inference mode, on
    # statistics (mean 0, variance 1) nothing ever measured.
    source = (mobilenet_folder / "mobilenet_for_fedconvert.py").read_text()
    fresh = source.replace("m.running_mean.uniform_(-0.2, 0.2)", "pass").replace(
        "m.running_var.uniform_(0.5, 1.5)", "pass"
    )
    (mobilenet_folder / "fresh_for_fedconvert.py").write_text(fresh)
    argv = ["--input-shape", "1,28,28", "-o"]
    code, _, err = _run(capsys, "fresh_for_fedconvert:Net", *argv, "fresh")
    assert code == 0  # it converts and verifies; it is told
    assert "note: 3 of 3 BatchNorm layers have statistics that were never measured" in err
    code, _, err = _run(capsys, "mobilenet_for_fedconvert:Net", *argv, "measured")
    assert code == 0 and "never measured" not in err
