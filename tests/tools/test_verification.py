"""Verification sees every gradient: each tensor against its own scale, on both engines.

Found: the training-step check compared weights after one SGD step, and in a freshly
initialised MobileNetV3 133 of 142 tensors move less than its 1e-5 tolerance, so a
wrong gradient there passed. The gradient check measures each tensor's error against
that tensor's own largest gradient.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed")
pytest.importorskip("torch", reason="torch is not installed (the PyTorch reference)")

from onnx import helper, numpy_helper  # noqa: E402

from fedclient.convert._convert import convert, resolve  # noqa: E402
from fedclient.convert._verify import gradient_error, verify_bundle  # noqa: E402
from fedclient.runtime._bundle import BundleWarning  # noqa: E402
from fedclient.runtime._stepgraph import grad_name  # noqa: E402

HERE = Path(__file__).parent
#: A depthwise kernel of the first block: the gradient backpropagation reaches last.
DEEP = "features.1.block.0.0.weight"


def _reseal(bundle: Path, role: str, file: str) -> None:
    manifest = json.loads((bundle / "manifest.json").read_text())
    body = (bundle / file).read_bytes()
    manifest["files"][role] = {"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()}
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def _scale(bundle: Path, file: str, role: str, gradient: str, factor: float) -> None:
    """Make ``gradient`` (a tensor of ``file``) ``factor`` times too large, and reseal."""
    model = onnx.load(bundle / file, load_external_data=False)
    (producer,) = [n for n in model.graph.node if gradient in n.output]
    producer.output[list(producer.output).index(gradient)] = gradient + ".right"
    model.graph.initializer.append(
        numpy_helper.from_array(np.array(factor, np.float32), "gradient_factor")
    )
    model.graph.node.append(
        helper.make_node("Mul", [gradient + ".right", "gradient_factor"], [gradient])
    )
    onnx.save(model, bundle / file)
    _reseal(bundle, role, file)


@pytest.fixture(scope="module")
def mobilenet(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    """A fresh MobileNetV3-small (10 classes, 3 x 16 x 16 images) as a bundle, and its source."""
    source = resolve(f"{HERE / 'mobilenetv3.py'}:mobilenet_v3_small", input_shape=[3, 16, 16])
    bundle = tmp_path_factory.mktemp("mobilenetv3")
    # Fresh BatchNorm statistics: the conversion says the model will not learn as it is.
    with pytest.warns(BundleWarning, match="34 of 34 BatchNorm layers have statistics that"):
        convert(source, bundle)
    return bundle, source


def test_mobilenetv3_verifies_with_every_gradient_checked(mobilenet: tuple[Path, object]) -> None:
    bundle, source = mobilenet
    verification = verify_bundle(bundle, source.reference)  # type: ignore[attr-defined]
    checks = {c.name: c for c in verification.checks}
    assert verification.passed, [c for c in verification.checks if not c.passed]
    for tag in ("", " [step graph]"):
        assert checks[f"gradients{tag}"].detail.startswith("142 tensors")
        assert checks[f"gradients{tag}"].error < 1e-4  # float32 rounding, each at its scale


@pytest.mark.parametrize(
    ("file", "role", "gradient", "failed"),
    [
        ("training_model.onnx", "training_model", f"{DEEP}_grad", "gradients"),
        ("step.onnx", "step_model", grad_name(DEEP), "gradients [step graph]"),
    ],
    ids=["training-api", "step-graph"],
)
def test_a_two_percent_error_in_one_deep_gradient_fails(
    mobilenet: tuple[Path, object],
    tmp_path: Path,
    file: str,
    role: str,
    gradient: str,
    failed: str,
) -> None:
    import shutil

    original, source = mobilenet
    bundle = tmp_path / "bundle"
    shutil.copytree(original, bundle)
    _scale(bundle, file, role, gradient, 1.02)
    verification = verify_bundle(bundle, source.reference)  # type: ignore[attr-defined]
    wrong = [c for c in verification.checks if not c.passed]
    assert [c.name for c in wrong] == [failed]
    assert DEEP in wrong[0].detail and 0.015 < wrong[0].error < 0.025
    # The step itself moved that tensor by less than the step check's tolerance.
    step = failed.replace("gradients", "training step")
    assert next(c for c in verification.checks if c.name == step).passed


def test_gradient_error_measures_each_tensor_against_its_own_scale() -> None:
    expected = {"big": np.array([100.0, -50.0]), "small": np.array([1e-6, 2e-6])}
    assert gradient_error(expected, expected) == (0.0, "big")
    off = {"big": expected["big"], "small": expected["small"] * 1.02}
    error, name = gradient_error(off, expected)
    assert name == "small" and error == pytest.approx(0.02)
    # Float noise where the reference is zero is no error; a real gradient there is.
    zero = {"big": expected["big"], "small": np.zeros(2)}
    assert gradient_error({**zero, "small": np.array([1e-16, 0.0])}, zero)[0] < 1e-3
    assert gradient_error({**zero, "small": np.array([1e-3, 0.0])}, zero)[0] > 1.0


def test_a_frozen_backbone_mobilenetv3_bundle_stays_near_the_model_size(tmp_path: Path) -> None:
    # Found: 22.2 MB for a 6.1 MB MobileNetV3-small with --freeze features. (the backbone
    # in the checkpoint, inference.onnx, forward.onnx, and again as step.onnx's constants).
    source = resolve(
        f"{HERE / 'mobilenetv3.py'}:mobilenet_v3_small",
        input_shape=[3, 16, 16],
        frozen=["features."],
    )
    with pytest.warns(BundleWarning, match="never measured"):
        manifest = convert(source, tmp_path)
    weights = sum(
        4 * int(np.prod([d or 1 for d in t.shape]))
        for t in [*manifest.parameters, *manifest.frozen]
    )
    on_disk = sum(f.stat().st_size for f in tmp_path.iterdir())  # the manifest too
    assert manifest.engines == ["training", "plain"]
    assert weights > 6_000_000 and on_disk < 1.2 * weights, (on_disk, weights)
    assert verify_bundle(tmp_path, source.reference).passed
