"""Device bundles from arbitrary ONNX models: what is accepted, and clear refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed")

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import fedclient  # noqa: E402
from fedclient.runtime import OnnxBackend, read_manifest, write_bundle  # noqa: E402


def _model(
    nodes: list[onnx.NodeProto],
    *,
    x_shape: list[int | str] | None = None,
    out_shape: list[int | str] | None = None,
    outputs: tuple[str, ...] = ("logits",),
    ir_version: int = 10,
    opset: int = 17,
    weight_type: int = TensorProto.FLOAT,
) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    dtype = {TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64}[weight_type]
    weight = numpy_helper.from_array(rng.normal(0, 0.3, (4, 3)).astype(dtype), "w")
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape or ["n", 4])],
        [
            helper.make_tensor_value_info(o, TensorProto.FLOAT, out_shape or ["n", 3])
            for o in outputs
        ],
        [weight],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version
    )


MATMUL = helper.make_node("MatMul", ["x", "w"], ["logits"])


def test_an_onnx_model_with_a_fixed_batch_becomes_a_trainable_bundle(tmp_path: Path) -> None:
    # Exporters often fix the batch at 1; the bundle makes it symbolic (the last batch is smaller).
    model = _model(
        [
            helper.make_node("MatMul", ["x", "w"], ["h"]),
            helper.make_node("Tanh", ["h"], ["logits"]),
        ],
        x_shape=[1, 4],
        out_shape=[1, 3],
    )
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    manifest = write_bundle(path, tmp_path / "bundle", name="tiny", source=str(path))
    assert manifest.input.shape == [None, 4] and manifest.output.shape == [None, 3]
    assert [(p.name, p.shape) for p in manifest.parameters] == [("w", [4, 3])]
    assert manifest.ops == {"MatMul": 1, "Tanh": 1}
    on_disk = json.loads((tmp_path / "bundle/manifest.json").read_text())
    assert (
        on_disk["files"]["checkpoint"]["bytes"] == (tmp_path / "bundle/checkpoint").stat().st_size
    )
    backend = OnnxBackend(tmp_path / "bundle")
    x = np.random.default_rng(1).normal(size=(7, 4)).astype(np.float32)
    y = np.array([0, 1, 2, 0, 1, 2, 0])
    w0 = backend.get_weights()["w"]
    result = backend.train(
        x, y, epochs=1, batch_size=3, learning_rate=0.5, rng=np.random.default_rng(0)
    )
    assert result.steps == 3  # batches of 3, 3 and 1
    # One hand-computed epoch of SGD on softmax(tanh(x @ w)) gives the same weights.
    w = w0.astype(np.float64)
    order = np.random.default_rng(0).permutation(7)
    for start in range(0, 7, 3):
        idx = order[start : start + 3]
        h = np.tanh(x[idx] @ w)
        p = np.exp(h) / np.exp(h).sum(axis=1, keepdims=True)
        p[np.arange(len(idx)), y[idx]] -= 1
        w -= 0.5 * x[idx].T @ (p / len(idx) * (1 - h**2))
    np.testing.assert_allclose(backend.get_weights()["w"], w, atol=1e-5)


def test_image_shaped_inputs_take_flat_or_shaped_examples(tmp_path: Path) -> None:
    flat = helper.make_node("Flatten", ["x"], ["flat"], axis=1)
    matmul = helper.make_node("MatMul", ["flat", "w"], ["logits"])
    write_bundle(_model([flat, matmul], x_shape=["n", 1, 2, 2]), tmp_path, name="image")
    backend = OnnxBackend(tmp_path)
    assert backend.input_shape == (1, 2, 2) and backend.inputs == 4
    x = np.arange(8, dtype=np.float32).reshape(2, 4) / 8
    np.testing.assert_array_equal(backend.predict(x), backend.predict(x.reshape(2, 1, 2, 2)))
    with pytest.raises(fedclient.InvalidInput, match=r"\(n, 1, 2, 2\)"):
        backend.predict(x.reshape(2, 2, 2))


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (
            _model(
                [
                    helper.make_node("MatMul", ["x", "w"], ["h"]),
                    helper.make_node("Floor", ["h"], ["logits"]),
                ]
            ),
            "unsupported op 'Floor'",
        ),
        (
            _model([helper.make_node("Custom", ["x", "w"], ["logits"], domain="my.ops")]),
            "my.ops::Custom",
        ),
        (
            _model(
                [MATMUL, helper.make_node("Relu", ["logits"], ["extra"])],
                outputs=("logits", "extra"),
            ),
            "exactly one input and one output",
        ),
        (_model([MATMUL], ir_version=11), "IR version 11"),
        (_model([MATMUL], opset=23), "opset is 23"),
        (_model([MATMUL], weight_type=TensorProto.DOUBLE), "only float32"),
        (_model([MATMUL], out_shape=["n"]), r"logits of shape \(batch, classes\)"),
    ],
    ids=["no-gradient", "custom-domain", "two-outputs", "ir", "opset", "float64", "not-logits"],
)
def test_models_that_cannot_train_on_device_are_refused_clearly(
    model: onnx.ModelProto, match: str, tmp_path: Path
) -> None:
    with pytest.raises(fedclient.InvalidInput, match=match):
        write_bundle(model, tmp_path, name="bad")


def test_an_unreadable_file_is_an_invalid_input(tmp_path: Path) -> None:
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"not a protobuf")
    with pytest.raises(fedclient.InvalidInput, match="cannot read"):
        write_bundle(path, tmp_path / "out", name="broken")


def test_a_tampered_bundle_is_refused(tmp_path: Path) -> None:
    write_bundle(_model([MATMUL]), tmp_path, name="tiny")
    model = tmp_path / "training_model.onnx"
    model.write_bytes(model.read_bytes() + b"\0")
    with pytest.raises(fedclient.InvalidInput, match="checksum"):
        OnnxBackend(tmp_path)
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(fedclient.InvalidInput, match=r"no manifest\.json"):
        read_manifest(tmp_path)


@pytest.mark.parametrize("training", [True, False], ids=["checkpoint", "weights.bin"])
def test_each_weight_is_stored_once_and_the_bundle_moves_as_a_folder(
    training: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found: a 6.1 MB MobileNetV3 made a 19.2 MB bundle (the checkpoint, inference.onnx and
    # forward.onnx each held every weight; step.onnx the frozen ones again).
    from fedclient.runtime import _ort

    if not training:  # a machine with plain onnxruntime: no checkpoint to share
        monkeypatch.setattr(_ort, "has_training_api", lambda: False)
    rng = np.random.default_rng(0)
    big = numpy_helper.from_array(rng.normal(0, 0.1, (64, 32)).astype(np.float32), "big")
    frozen = numpy_helper.from_array(rng.normal(0, 0.1, (32, 64)).astype(np.float32), "frozen")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "frozen"], ["h"]),
            helper.make_node("Relu", ["h"], ["r"]),
            helper.make_node("MatMul", ["r", "big"], ["z"]),
            helper.make_node("MatMul", ["z", "w"], ["logits"]),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 3])],
        [big, frozen, numpy_helper.from_array(rng.normal(0, 0.3, (32, 3)).astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    manifest = write_bundle(model, tmp_path / "made", name="net", frozen=["frozen"])
    store = "checkpoint" if training else "weights.bin"
    assert ("checkpoint" in manifest.files) is training and (
        "weights" in manifest.files
    ) is not training
    for file in ("inference.onnx", "forward.onnx", "step.onnx"):
        loaded = onnx.load(tmp_path / "made" / file, load_external_data=False)
        located = {
            t.name: {e.key: e.value for e in t.external_data}.get("location")
            for t in loaded.graph.initializer
            if t.name in ("big", "frozen")
        }
        assert set(located.values()) == {store}, (file, located)
    weights = 4 * (64 * 32 + 32 * 64 + 32 * 3)
    total = sum(info.bytes for info in manifest.files.values())
    assert total < weights * (2.5 if training else 1.5), total  # the graphs themselves are small
    (tmp_path / "made").rename(tmp_path / "moved")
    x, y = rng.random((8, 32)).astype(np.float32), np.arange(8) % 3
    engines = ["training", "plain"] if training else ["plain"]
    for engine in engines:
        backend = OnnxBackend(tmp_path / "moved", engine=engine)
        before = backend.get_weights()
        np.testing.assert_array_equal(before["big"], numpy_helper.to_array(big))
        backend.train(x, y, epochs=1, batch_size=4, learning_rate=0.1, rng=np.random.default_rng(0))
        assert not np.array_equal(backend.get_weights()["big"], before["big"])
        exported = backend.export_inference_model(tmp_path / engine / "model.onnx")
        assert onnx.load(exported).graph.initializer  # self-contained: the weights came along
