"""Update compression: unbiased quantisation, top-k with error feedback, a safe decoder."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedclient
from fedclient.compression import CompressionSpec, compress, decompress
from fedclient.protocol import decode_tensors, encode_tensors
from fedclient.sim.cli import main as fedsim
from tests.conftest import Server

pytestmark = pytest.mark.anyio


def _update(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "a.weight": rng.normal(0, 1, (20, 30)).astype(np.float32),
        "a.bias": rng.normal(0, 0.01, 30).astype(np.float32),
    }


@pytest.mark.parametrize("text", ["q8", "q4", "topk:0.1", "topk:0.25,q8", "topk:0.1,q4"])
def test_decoding_gives_what_was_sent_and_the_residual_the_rest(text: str) -> None:
    spec = CompressionSpec.parse(text)
    update = _update()
    tensors, residual = compress(update, spec, np.random.default_rng(1))
    body = encode_tensors(tensors, {"compression": str(spec)})
    decoded = decompress(decode_tensors(body)[0], spec, update)
    for name in update:
        assert decoded[name].shape == update[name].shape
        np.testing.assert_allclose(decoded[name] + residual[name], update[name], atol=1e-5)
    if spec.topk:
        kept = sum(int((v != 0).sum()) for v in decoded.values())
        assert kept <= round(spec.topk * 630) + 1


def test_stochastic_quantisation_is_unbiased() -> None:
    value = {"w": np.full(20_000, 0.3, np.float32), "b": np.array([0.0, 1.0], np.float32)}
    spec = CompressionSpec.parse("q4")
    tensors, _ = compress(value, spec, np.random.default_rng(0))
    decoded = decompress(tensors, spec, value)
    # 0.3 lies between grid points; rounding up with the right probability keeps the mean.
    assert abs(float(decoded["w"].mean()) - 0.3) < 2e-3
    assert len(np.unique(decoded["w"])) == 1 or len(np.unique(decoded["w"])) == 2


def test_error_feedback_delivers_everything_eventually() -> None:
    spec = CompressionSpec.parse("topk:0.05")
    update = _update(3)
    residual = None
    delivered = {k: np.zeros_like(v) for k, v in update.items()}
    for _ in range(40):  # the same update every round: all of it goes out over time
        tensors, residual = compress(update, spec, np.random.default_rng(0), residual)
        for k, v in decompress(tensors, spec, update).items():
            delivered[k] += v
    for k in update:
        np.testing.assert_allclose(delivered[k] + residual[k], 40 * update[k], rtol=1e-4, atol=1e-3)


def test_a_hostile_compressed_body_is_refused() -> None:
    spec = CompressionSpec.parse("topk:0.1,q8")
    update = _update()
    tensors, _ = compress(update, spec, np.random.default_rng(0))
    bad = [
        {k: v for k, v in tensors.items() if k != "mask"},
        {**tensors, "codes": tensors["codes"][:-1]},
        {**tensors, "scales": np.full((2, 2), np.nan, np.float32)},
        {**tensors, "mask": np.frombuffer(b"not deflate", np.uint8)},
        {**tensors, "mask": np.frombuffer(__import__("zlib").compress(b"\xff" * 10_000), np.uint8)},
    ]
    for case in bad:
        with pytest.raises(fedclient.InvalidRequest):
            decompress(case, spec, update)
    for text in ("q3", "topk:0", "topk:2", "zip"):
        with pytest.raises(fedclient.InvalidInput):
            CompressionSpec.parse(text)


async def test_the_server_decodes_compressed_updates_and_refuses_other_encodings(
    make_server: Any, make_devices: Any
) -> None:
    server: Server = make_server(compression="topk:0.2,q8", devices_per_round=2)
    devices = make_devices(2, server.transport())
    for device in devices:
        assert (await device.arun_once()).status == "uploaded"
    assert server.service.job_status("digits").model_version == 1
    residual = devices[0].device_state.residual("digits")
    assert residual is not None and decode_tensors(residual)[0]
    # A device that ignores the plan's compression is told so and changes nothing.
    async with server.http() as http:
        auth = {
            "Authorization": "Bearer " + (await http.post("/v1/devices", json={})).json()["token"]
        }
        plan = (await http.post("/v1/jobs/digits/checkin", json={}, headers=auth)).json()["plan"]
        body = server.store.model("digits", 1)
        assert body is not None
        dense = {k: np.zeros_like(v) for k, v in decode_tensors(body[0])[0].items()}
        before = server.store.fingerprint()
        answer = await http.post(
            f"/v1/rounds/{plan['round_id']}/updates",
            content=encode_tensors(dense, {"num_examples": "3", "model_version": "1"}),
            headers={**auth, "Idempotency-Key": "k"},
        )
        assert answer.status_code == 400 and "compression" in answer.json()["error"]["message"]
        assert server.store.fingerprint() == before


def test_fedsim_compression_cuts_upload_bytes(tmp_path: Path) -> None:
    common = [
        "run",
        "--dataset",
        "digits",
        "--devices",
        "20",
        "--devices-per-round",
        "5",
        "--rounds",
        "3",
        "--seed",
        "2",
        "--quiet",
    ]
    assert fedsim([*common, "--report", str(tmp_path / "dense.json")]) == 0
    assert fedsim([*common, "--compress", "topk:0.1,q8", "--report", str(tmp_path / "c.json")]) == 0
    dense = json.loads((tmp_path / "dense.json").read_text())["final"]
    small = json.loads((tmp_path / "c.json").read_text())["final"]
    assert dense["bytes_up"] / small["bytes_up"] > 8
    assert small["accuracy"] > 0.5
