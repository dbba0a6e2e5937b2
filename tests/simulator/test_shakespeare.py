"""Shakespeare by role: windows, the held-out split per device, and a federated transformer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedclient import InvalidInput
from fedclient.sim.cli import main as fedsim
from fedclient.sim.datasets import load_dataset, partition
from fedclient.sim.fleet import keep_at_most
from fedclient.sim.shakespeare import ALPHABET, WINDOW, speakers
from tests.conftest import SHARED_DATA

HAS_DATA = (SHARED_DATA / "shakespeare").is_dir()
NO_DATA = f"Shakespeare file not found in {SHARED_DATA}/shakespeare (set FEDCLIENT_DATA)"


def _speech(play: str, role: str, text: str) -> str:
    return json.dumps({"play": play, "role": role, "text": text})


def _decode(ids: np.ndarray) -> str:
    return "".join(ALPHABET[i] for i in ids)


def test_windows_are_cut_per_role_and_each_role_holds_out_its_last_fifth() -> None:
    hamlet = "To be, or not to be, that is the question: " * 5  # 215 characters
    lines = [
        _speech("hamlet", "HAMLET", hamlet[:100]),
        _speech("hamlet", "OPHELIA", "Good my lord, how does your honour for this many a day?"),
        _speech("hamlet", "HAMLET", hamlet[100:] + "$"),  # '$' is not one of LEAF's characters
    ]
    found = speakers(lines, seed=0)
    # Ophelia's 56 characters make no 81-character example: she takes no part.
    assert found.roles == [("hamlet", "HAMLET")]
    text = hamlet[:100] + " " + hamlet[100:] + " "  # speeches joined by a space, '$' a space
    windows = len(text) - WINDOW
    held = windows // 5
    assert len(found.train_starts) == windows - held and len(found.test_starts) == held
    first = found.windows.take(found.train_starts[:1])[0]
    assert _decode(first) == text[:WINDOW] and ALPHABET[found.train_targets[0]] == text[WINDOW]
    # Every held-out target comes after every training target of the role.
    assert found.test_starts.min() > found.train_starts.max()
    last = found.test_starts.max()
    assert (
        _decode(found.windows.take(np.array([last]))[0]) + ALPHABET[found.test_targets[-1]]
        == text[-WINDOW - 1 :]
    )
    assert set(found.train_devices.tolist()) == {0}


def test_the_test_sample_is_drawn_with_the_seed() -> None:
    lines = [_speech("p", f"R{i}", "abcdefghij " * 20) for i in range(30)]
    a, b = speakers(lines, seed=3, test_windows=50), speakers(lines, seed=3, test_windows=50)
    c = speakers(lines, seed=4, test_windows=50)
    assert np.array_equal(a.test_starts, b.test_starts) and len(a.test_starts) == 50
    assert not np.array_equal(a.test_starts, c.test_starts)
    with pytest.raises(InvalidInput, match="line 1 is not a speech record"):
        speakers(['{"play": "p"}'], seed=0)


@pytest.mark.skipif(not HAS_DATA, reason=NO_DATA)
def test_the_staged_file_gives_one_device_per_role() -> None:
    data = load_dataset("shakespeare", SHARED_DATA, seed=1)
    assert (data.inputs, data.classes) == (WINDOW, 80)
    assert data.users is not None
    devices = partition(data.y_train, 0, "natural", np.random.default_rng(0), data.users)
    # 1,426 (play, role) clients; those with at least one training window take part.
    assert len(devices) == 1198
    x, y = data.device_data(devices[0][:3])
    assert x.shape == (3, WINDOW) and x.dtype == np.int32 and y.shape == (3,)
    assert data.x_test.shape == (5000, WINDOW) and data.y_test.max() < 80
    kept = keep_at_most(devices, 50, seed=1)
    assert max(len(k) for k in kept) == 50
    assert all(np.isin(k, d).all() for k, d in zip(kept[:100], devices, strict=False))


@pytest.mark.skipif(not HAS_DATA, reason=NO_DATA)
def test_fedsim_asks_for_a_sequence_model(capsys: pytest.CaptureFixture[str]) -> None:
    code = fedsim(["run", "--dataset", "shakespeare", "--data-dir", str(SHARED_DATA), "--quiet"])
    assert code == 2
    assert "trains a sequence model: give --plan" in capsys.readouterr().err


TINY = """
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(80, 8)
        self.pos = nn.Parameter(torch.randn(80, 8) * 0.1)
        self.encoder = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.head = nn.Linear(8, 80)

    def forward(self, ids):
        return self.head(self.encoder(self.embed(ids) + self.pos)[:, -1])
"""


@pytest.mark.skipif(not HAS_DATA, reason=NO_DATA)
def test_a_transformer_bundle_federates_by_role_through_onnx_runtime(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytest.importorskip("torch", reason="torch is not installed (converting the transformer)")
    pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
    from fedclient.convert.cli import main as fedconvert

    (tmp_path / "tiny_chars.py").write_text(TINY)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("fedclient.sim.shakespeare.TEST_WINDOWS", 500)  # a quicker evaluation
    argv = ["tiny_chars:Net", "--input-shape", "80", "--input-dtype", "int64", "-o", "bundle"]
    assert fedconvert(argv) == 0
    (tmp_path / "plan.toml").write_text(
        '[job]\nname = "shakespeare"\nrounds = 2\ndevices_per_round = 3\nmin_devices = 1\n'
        'over_selection = 1.0\nseed = 1\n[model]\nkind = "bundle"\nbundle = "bundle"\n'
        "[train]\nepochs = 2\nbatch_size = 8\nlearning_rate = 0.5\n"
    )
    report: dict[str, Any] = {}
    for engine in ("training", "plain"):
        monkeypatch.setenv("FEDCLIENT_ONNX_ENGINE", engine)
        out = tmp_path / f"{engine}.json"
        argv = ["run", "--dataset", "shakespeare", "--data-dir", str(SHARED_DATA)]
        argv += ["--plan", "plan.toml", "--runtime", "onnx", "--max-examples", "20"]
        argv += ["--seed", "1", "--quiet", "--no-plot", "--report", str(out)]
        assert fedsim(argv) == 0
        report[engine] = json.loads(out.read_text())
    rounds = report["plain"]["rounds"]
    assert report["plain"]["config"]["partition"] == "natural"
    assert [r["updates"] for r in rounds] == [3, 3]
    # Each update counts its device's windows (at most 20), twice (2 epochs).
    assert all(0 < r["examples"] <= 3 * 20 * 2 for r in rounds)
    assert report["plain"]["final"]["examples"] == sum(r["examples"] for r in rounds)
    assert rounds[-1]["accuracy"] > 1 / 80  # better than chance over 80 characters
    # Both engines take the same steps: the same devices, the same model to float rounding.
    for a, b in zip(rounds, report["training"]["rounds"], strict=True):
        assert a["examples"] == b["examples"]
        assert abs(a["accuracy"] - b["accuracy"]) <= 2 / 500
