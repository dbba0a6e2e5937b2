"""Sequence models through fedconvert: token-id inputs, embeddings, attention, LayerNorm.

The reference is PyTorch (its autograd for the gradients): these tests skip without
torch. Models are tiny (a vocabulary of 12, windows of 40, width 16) so that each
converts and verifies in a few seconds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("onnxruntime", reason="the onnx extra is not installed")
pytest.importorskip("onnx", reason="the onnx extra is not installed")
pytest.importorskip("torch", reason="torch is not installed (fedconvert's PyTorch source)")

import onnxruntime

from fedclient._exceptions import InvalidInput
from fedclient.convert._convert import resolve
from fedclient.convert.cli import main as fedconvert
from fedclient.runtime import OnnxBackend, read_manifest, write_bundle
from fedclient.runtime._stepgraph import next_name, step_graph

CHARS = """
import torch
from torch import nn


class Net(nn.Module):
    \"\"\"Next-character prediction: embedding + learned positions, a causal transformer
    encoder, LayerNorm, and a linear head on the last position.\"\"\"

    def __init__(self, layers=2, activation="gelu", norm_first=True, window=40, vocab=12):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, 16)
        self.pos = nn.Parameter(torch.randn(window, 16) * 0.1)
        layer = nn.TransformerEncoderLayer(
            16, 2, 32, dropout=0.0, activation=activation, batch_first=True, norm_first=norm_first
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, vocab)
        mask = torch.triu(torch.full((window, window), float("-inf")), 1)
        self.register_buffer("mask", mask)
        with torch.no_grad():  # layers differ, and LayerNorm's affine part is not (1, 0)
            for p in self.encoder.parameters():
                p.add_(torch.randn_like(p) * 0.05)
            self.norm.weight.add_(torch.randn(16) * 0.1)

    def forward(self, ids):
        h = self.encoder(self.embed(ids) + self.pos, mask=self.mask)
        return self.head(self.norm(h[:, -1]))


def post_relu():
    return Net(layers=1, activation="relu", norm_first=False)


def pre_relu():
    return Net(layers=2, activation="relu", norm_first=True)


def post_gelu():
    return Net(layers=2, activation="gelu", norm_first=False)


class LastQuery(nn.Module):
    \"\"\"A pre-norm layer computed at the last position only (examples/shakespeare's
    charformer): its query attends over the window (nn.MultiheadAttention with the query
    apart from the keys and values: the in-projection split), then a GELU MLP.\"\"\"

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.embed = nn.Embedding(12, 16)
        self.pos = nn.Parameter(torch.randn(40, 16) * 0.1)
        self.norm1 = nn.LayerNorm(16)
        self.attention = nn.MultiheadAttention(16, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(16)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 12)

    def forward(self, ids):
        x = self.embed(ids) + self.pos
        normed = self.norm1(x)
        attended, _ = self.attention(normed[:, -1:], normed, normed, need_weights=False)
        h = x[:, -1] + attended[:, 0]
        return self.head(h + self.mlp(self.norm2(h)))


class Attention(nn.Module):
    \"\"\"nn.MultiheadAttention alone, with a padding mask (id 0: masked_fill, Where),
    a split (Split) and a slice of the last positions (Slice).\"\"\"

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.embed = nn.Embedding(12, 16)
        self.attention = nn.MultiheadAttention(16, 4, batch_first=True)
        self.head = nn.Linear(8, 12)

    def forward(self, ids):
        h = self.embed(ids)
        padded = (ids == 0).unsqueeze(-1)
        h = h.masked_fill(padded, 0.0) + 0.5 * h
        h, _ = self.attention(h, h, h, need_weights=False)
        left, right = torch.split(h, [8, 8], dim=-1)
        h = torch.tanh(left) * torch.sigmoid(right)
        return self.head(h[:, -4:].mean(1))
"""


@pytest.fixture
def chars_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The working folder, holding chars_for_fedconvert.py."""
    (tmp_path / "chars_for_fedconvert.py").write_text(CHARS)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _gradients(source: Any, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    """PyTorch autograd's gradient of the mean cross-entropy, by bundle parameter name."""
    lr = 1.0  # SGD at lr 1 moves each weight by its gradient
    initial = source.reference.initial_weights()
    stepped = source.reference.sgd_step(x, y, lr)
    return {name: (initial[name] - stepped[name]) / lr for name in initial}


def _step_graph_gradients(source: Any, x: np.ndarray, y: np.ndarray) -> dict[str, np.ndarray]:
    initial = source.reference.initial_weights()
    trainable = [n for n in initial if n not in source.frozen]
    session = onnxruntime.InferenceSession(
        step_graph(source.model, trainable).SerializeToString(), providers=["CPUExecutionProvider"]
    )
    feeds = {"input": x, "labels": y, "learning_rate": np.array(1.0, np.float32)}
    stepped = session.run(
        [next_name(n) for n in trainable], {**feeds, **{n: initial[n] for n in trainable}}
    )
    return {n: initial[n] - s for n, s in zip(trainable, stepped, strict=True)}


def _relative_errors(
    found: dict[str, np.ndarray], expected: dict[str, np.ndarray]
) -> dict[str, float]:
    """Each tensor's largest gradient error relative to its own largest gradient."""
    return {
        name: float(np.abs(found[name] - expected[name]).max() / np.abs(expected[name]).max())
        for name in expected
    }


@pytest.mark.parametrize("factory", ["Net", "post_relu", "pre_relu", "post_gelu", "LastQuery"])
def test_a_next_character_transformer_converts_with_token_ids_and_verifies_on_both_engines(
    factory: str, chars_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [f"chars_for_fedconvert:{factory}", "--input-shape", "40", "--input-dtype", "int64"]
    code = fedconvert([*argv, "-o", "bundle"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "note:" not in err  # no engine was left out
    assert "input  input Nx40 int64" in out and "LayerNormalization" in out
    assert "[step graph]" in out and "FAILED" not in out
    manifest = read_manifest(chars_folder / "bundle")
    assert manifest.engines == ["training", "plain"] and manifest.vocabulary == 12
    assert (chars_folder / "bundle" / "step.onnx").is_file()


@pytest.mark.parametrize("factory", ["Net", "post_relu", "Attention", "LastQuery"])
def test_the_step_graph_differentiates_attention_as_pytorch_does(
    factory: str, chars_folder: Path
) -> None:
    source = resolve(f"chars_for_fedconvert:{factory}", input_shape=[40], input_dtype="int64")
    ops = {n.op_type for n in source.model.graph.node}
    assert {"Gather", "MatMul", "Softmax", "Transpose"} <= ops
    if factory == "Attention":
        assert {"Where", "Split", "Slice"} <= ops
    else:
        assert "LayerNormalization" in ops
    rng = np.random.default_rng(0)
    x = rng.integers(0, 12, (8, 40))
    x[:, :3] = 1  # a token repeated within a window: Gather's gradient adds them up
    y = rng.integers(0, 12, 8)
    expected = _gradients(source, x, y)
    errors = _relative_errors(_step_graph_gradients(source, x, y), expected)
    assert max(errors.values()) < 1e-4, errors
    assert all(np.abs(g).max() > 0 for g in expected.values())


def test_a_wrong_layernorm_gradient_is_seen(
    chars_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The comparison above must be able to fail: LayerNorm's scale gradient 2% off.
    from fedclient.runtime._grad_sequence import SequenceRules

    source = resolve("chars_for_fedconvert:Net", input_shape=[40], input_dtype="int64")
    rule = SequenceRules._layernormalization

    def off(self: Any, index: int, node: Any, g: str, want: list[bool]) -> None:
        rule(self, index, node, g, want)
        if node.input[1] == "norm.weight":
            parts = self.grads["norm.weight"]
            parts[-1] = self.b.op("Mul", [parts[-1], self.b.const(1.02, np.float32)])

    monkeypatch.setattr(SequenceRules, "_layernormalization", off)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 12, (8, 40)), rng.integers(0, 12, 8)
    errors = _relative_errors(_step_graph_gradients(source, x, y), _gradients(source, x, y))
    assert errors["norm.weight"] > 0.01
    assert max(e for n, e in errors.items() if n != "norm.weight") < 1e-4


def test_token_ids_are_checked_on_the_device(chars_folder: Path) -> None:
    source = resolve("chars_for_fedconvert:post_relu", input_shape=[40], input_dtype="int64")
    write_bundle(source.model, chars_folder / "bundle", name="chars", frozen=source.frozen)
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 12, (16, 40)), rng.integers(0, 12, 16)
    for engine in ("training", "plain"):
        backend = OnnxBackend(chars_folder / "bundle", engine=engine)
        result = backend.train(
            x, y, epochs=2, batch_size=4, learning_rate=0.1, rng=np.random.default_rng(0)
        )
        assert result.steps == 8 and np.isfinite(result.loss)
        # Ids stored as floats (a data set of mixed columns) are the same ids.
        assert backend.evaluate(x.astype(np.float32), y).loss == backend.evaluate(x, y).loss
        with pytest.raises(InvalidInput, match=r"token ids must lie in \[0, 12\)"):
            backend.evaluate(np.full((2, 40), 12), np.zeros(2, np.int64))
        with pytest.raises(InvalidInput, match="whole numbers"):
            backend.evaluate(np.full((2, 40), 0.5), np.zeros(2, np.int64))


def test_an_op_onnx_runtime_cannot_differentiate_is_named_in_one_line(
    chars_folder: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # Found: LayerNormalization as torch exports it (no mean and deviation outputs) made
    # ONNX Runtime's gradient builder fail with a C++ assertion that named no op. With
    # the outputs added it trains; without them, the op is named.
    from fedclient.runtime import _artifacts

    monkeypatch.setattr(_artifacts, "with_layernorm_statistics", lambda model: model)
    argv = ["chars_for_fedconvert:post_relu", "--input-shape", "40", "--input-dtype", "int64"]
    code = fedconvert([*argv, "-o", "bundle"])
    out, err = capsys.readouterr()
    assert (code, out) == (2, "")
    assert "unsupported op 'LayerNormalization' (" in err
    assert len(err.strip().splitlines()) == 1 and "OutputDefs" not in err
