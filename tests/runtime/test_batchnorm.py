"""BatchNorm that learns: a fresh BatchNorm CNN converted with ``--batchnorm batch`` trains on
batch statistics on both engines, updates its running statistics as torch does, and
federated from scratch learns digits (issue 28)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("onnx", reason="the onnx extra is not installed")
torch = pytest.importorskip("torch", reason="converting a PyTorch module needs torch")

from fedclient import InvalidInput  # noqa: E402
from fedclient.convert._convert import resolve  # noqa: E402
from fedclient.convert._verify import verify_bundle  # noqa: E402
from fedclient.convert.cli import main as fedconvert  # noqa: E402
from fedclient.protocol import TrainSettings  # noqa: E402
from fedclient.runtime import OnnxBackend, TrainResult, bundle_weights, read_manifest  # noqa: E402
from fedclient.runtime._bundle import ENGINES  # noqa: E402
from fedclient.sim.cli import main as fedsim  # noqa: E402
from fedclient.trainers import LocalStatistics, TrainContext  # noqa: E402

#: A small MobileNet-style CNN for 8 x 8 digits, freshly initialised: every BatchNorm's
#: running mean 0 and variance 1, as nothing ever measured them.
FRESH = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
            nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.ReLU6(),
            nn.Conv2d(8, 16, 1), nn.BatchNorm2d(16), nn.Hardswish(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Linear(16, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10)
        )

    def forward(self, x):
        return self.head(self.features(x))
"""

PLAN = """
[job]
name = "digits"
rounds = 30
devices_per_round = 10
min_devices = 5
seed = 3
[train]
epochs = 2
batch_size = 8
learning_rate = 0.5
[model]
kind = "bundle"
bundle = "{bundle}"
"""


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A folder with the fresh network's module, importable as ``fresh_bn``; its bundles,
    converted with BatchNorm on batch statistics (``batch``) and as it is (``frozen``)."""
    root = tmp_path_factory.mktemp("batchnorm")
    (root / "fresh_bn.py").write_text(FRESH)
    sys.path.insert(0, str(root))
    try:
        for mode in ("batch", "frozen"):
            argv = ["fresh_bn:Net", "--input-shape", "1,8,8", "--batchnorm", mode]
            assert fedconvert([*argv, "-o", str(root / mode)]) == 0  # verified
        yield root
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("fresh_bn", None)


def _torch_net() -> Any:
    import fresh_bn  # type: ignore[import-not-found]

    return fresh_bn.Net()


def test_the_bundle_holds_the_running_statistics_and_sends_them_with_the_weights(
    folder: Path,
) -> None:
    manifest = read_manifest(folder / "batch")
    statistics = [f"features.{i}.running_{s}" for i in (1, 4, 7) for s in ("mean", "var")]
    statistics += ["head.1.running_mean", "head.1.running_var"]
    assert [t.name for t in manifest.statistics] == statistics
    assert [layer.mean for layer in manifest.batchnorm] == statistics[0::2]
    assert {layer.momentum for layer in manifest.batchnorm} == {0.9}  # torch's 0.1
    assert set(manifest.engines) == set(ENGINES)
    assert not {t.name for t in manifest.frozen} & set(statistics)
    # The server starts the job from the same tensors the device exchanges.
    weights = OnnxBackend(folder / "batch").get_weights()
    assert set(bundle_weights(folder / "batch")) == set(weights) >= set(statistics)
    assert not weights["features.1.running_mean"].any()


@pytest.mark.parametrize("engine", list(ENGINES))
def test_training_matches_torch_in_training_mode_with_its_running_statistics(
    folder: Path, engine: str
) -> None:
    rng = np.random.default_rng(1)
    x = rng.random((21, 1, 8, 8), dtype=np.float32)
    y = rng.integers(0, 10, 21)
    backend = OnnxBackend(folder / "batch", engine=engine)
    backend.train(x, y, epochs=2, batch_size=8, learning_rate=0.2, rng=np.random.default_rng(4))
    # torch, in training mode, on the same minibatches (8, 8 and the last 5, twice).
    net = _torch_net().train()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.2)
    order = np.random.default_rng(4)
    for _ in range(2):
        permutation = order.permutation(21)
        for start in range(0, 21, 8):
            idx = permutation[start : start + 8]
            loss = torch.nn.functional.cross_entropy(
                net(torch.from_numpy(x[idx])), torch.from_numpy(y[idx])
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    state = net.state_dict()
    found = backend.get_weights()
    for name, value in found.items():
        np.testing.assert_allclose(value, state[name].numpy(), atol=2e-5, err_msg=name)
    assert found["features.1.running_var"].min() != 1.0  # the statistics moved
    # Inference normalises by the running statistics, as torch's evaluation mode does.
    with torch.no_grad():
        expected = torch.softmax(net.eval()(torch.from_numpy(x)), dim=1).numpy()
    np.testing.assert_allclose(backend.predict(x), expected, atol=1e-5)


def test_verification_sees_a_wrong_running_statistics_update(folder: Path) -> None:
    # The manifest says how the device folds batch statistics in: a wrong momentum
    # leaves the loss and the gradients right and the statistics wrong.
    manifest = folder / "batch" / "manifest.json"
    original = manifest.read_text()
    reference = resolve("fresh_bn:Net", input_shape=(1, 8, 8), batchnorm="batch").reference
    try:
        data = json.loads(original)
        data["batchnorm"][2]["momentum"] = 0.8
        manifest.write_text(json.dumps(data))
        checks = {c.name: c for c in verify_bundle(folder / "batch", reference).checks}
    finally:
        manifest.write_text(original)
    assert checks["gradients"].passed and checks["loss"].passed
    assert not checks["training step"].passed
    assert not checks["training step [step graph]"].passed
    assert verify_bundle(folder / "batch", reference).passed


def test_a_variance_noised_below_zero_is_read_as_zero(folder: Path) -> None:
    # Local DP adds noise to the statistics' change like to any weight's: an average of
    # noised updates can hold a negative variance, whose square root is NaN.
    backend = OnnxBackend(folder / "batch")
    weights = backend.get_weights()
    weights["features.4.running_var"][:3] = -0.5
    backend.set_weights(weights)
    assert backend.get_weights()["features.4.running_var"].min() == 0.0
    x = np.random.default_rng(0).random((4, 64), dtype=np.float32)
    assert np.isfinite(backend.predict(x)).all()


def test_a_minibatch_of_one_value_per_channel_sits_out_or_is_refused(folder: Path) -> None:
    # Found: with a Dirichlet partition some device's last minibatch held one example,
    # where BatchNorm1d sees one value per channel (no variance), and the run stopped.
    backend = OnnxBackend(folder / "batch")
    x = np.random.default_rng(0).random((9, 64), dtype=np.float32)
    settings: dict[str, Any] = {"batch_size": 8, "learning_rate": 0.1}
    result = backend.train(x, np.arange(9), epochs=3, rng=np.random.default_rng(0), **settings)
    assert result.steps == 3  # the ninth example sits each epoch out
    with pytest.raises(InvalidInput, match="at least 2 values per channel"):
        backend.train(x[:1], np.arange(1), epochs=1, rng=np.random.default_rng(0), **settings)


def test_batch_statistics_need_a_pytorch_module_with_batchnorm(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = fedconvert(
        [
            f"{folder / 'fresh_bn.py'}:Net",
            "--input-shape",
            "1,8,8",
            "--batchnorm",
            "batch",
            "--freeze",
            "features.",
            "-o",
            str(tmp_path / "a"),
        ]
    )
    assert code == 2 and "do not freeze them" in capsys.readouterr().err
    net = Path(__file__).parents[1] / "tools" / "torch_net.py"
    code = fedconvert(
        [f"{net}:Net", "--input-shape", "1,8,8", "--batchnorm", "batch", "-o", str(tmp_path / "b")]
    )
    assert code == 2 and "no BatchNorm layer" in capsys.readouterr().err


@pytest.mark.parametrize("engine", list(ENGINES))
def test_a_fresh_batchnorm_cnn_federated_from_scratch_learns_digits(
    folder: Path, tmp_path: Path, engine: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found: a BatchNorm MobileNet federated from fresh initialisation stayed at chance
    # (0.0975) on both engines: BatchNorm trained in inference mode on statistics nothing
    # ever measured (mean 0, variance 1). On batch statistics, with the running ones
    # averaged by the server, the same network learns.
    monkeypatch.setenv("FEDCLIENT_ONNX_ENGINE", engine)
    accuracy = {}
    for mode in ("batch", "frozen") if engine == "training" else ("batch",):
        plan = tmp_path / f"{mode}.toml"
        plan.write_text(PLAN.format(bundle=folder / mode))
        report = tmp_path / f"{mode}.json"
        argv = ["run", "--plan", str(plan), "--runtime", "onnx", "--dataset", "digits"]
        argv += ["--devices", "30", "--quiet", "--no-plot", "--report", str(report)]
        assert fedsim(argv) == 0
        final = json.loads(report.read_text())["final"]
        assert final["rounds_completed"] == 30
        accuracy[mode] = final["accuracy"]
    assert accuracy["batch"] > 0.8  # 0.947 and 0.933 here (training API, step graph)
    if "frozen" in accuracy:
        assert accuracy["frozen"] < 0.2  # chance: 0.1


def test_local_statistics_stay_on_the_device_and_the_job_still_learns(
    folder: Path, tmp_path: Path, digits: Any
) -> None:
    model = OnnxBackend(folder / "batch")
    received = model.get_weights()
    kept = {name: received[name] + 5.0 for name in model.statistics}  # far from the fleet's
    settings = TrainSettings(epochs=1, batch_size=64, learning_rate=0.1)
    x, y = digits.x_train[:64], digits.y_train[:64]

    def trained(state: dict[str, np.ndarray]) -> TrainResult:
        model.set_weights(received)
        ctx = TrainContext(model, x, y, settings, 0.1, 1, np.random.default_rng(0), {}, state)
        return LocalStatistics().train(ctx)

    own, first = trained(kept), trained({})
    assert own.state is not None and first.state is not None
    after = model.get_weights()
    for name in model.statistics:  # one step: 0.9 of the statistics it started from
        np.testing.assert_allclose(first.state[name], after[name])
        assert np.all(own.state[name] - first.state[name] == pytest.approx(0.9 * 5.0, abs=1e-4))
    # Federated with the trainer: each device normalises by its own statistics, the server
    # averages them for its model, and the job learns as well.
    plan = tmp_path / "local.toml"
    text = PLAN.format(bundle=folder / "batch")
    plan.write_text(
        text.replace("[train]", '[train]\ntrainer = "fedclient.trainers:LocalStatistics"')
    )
    report = tmp_path / "local.json"
    argv = ["run", "--plan", str(plan), "--runtime", "onnx", "--dataset", "digits"]
    assert fedsim([*argv, "--devices", "30", "--quiet", "--no-plot", "--report", str(report)]) == 0
    assert json.loads(report.read_text())["final"]["accuracy"] > 0.8  # 0.936 here


def test_the_summary_lists_the_running_statistics(
    folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [f"{folder / 'fresh_bn.py'}:Net", "--input-shape", "1,8,8", "--batchnorm", "batch"]
    assert fedconvert([*argv, "--no-verify", "-o", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert "features.1.running_var (statistic)" in out
    assert "8 running statistics updated on the device travel with them" in out


def test_a_bundle_without_batch_statistics_keeps_the_manifest_older_fedclients_read(
    folder: Path,
) -> None:
    # The manifest's struct refuses unknown fields: a device on an older fedclient reads
    # a bundle without BatchNorm on batch statistics only if the new fields are absent.
    frozen = json.loads((folder / "frozen" / "manifest.json").read_text())
    assert "statistics" not in frozen and "batchnorm" not in frozen
    assert read_manifest(folder / "frozen").statistics == []
    assert len(json.loads((folder / "batch" / "manifest.json").read_text())["batchnorm"]) == 4
