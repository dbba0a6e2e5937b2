"""Large models: downloads resume with HTTP Range, uploads go in chunks and resume."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

import fedclient
from fedclient import FaultPlan, FaultyTransport, RetryPolicy
from fedclient.protocol import ModelSpec
from tests.conftest import Server

pytestmark = pytest.mark.anyio


async def _no_wait(delay: float) -> None:
    return None


async def test_range_requests_serve_the_right_bytes(server: Server) -> None:
    async with server.http() as http:
        auth = {
            "Authorization": "Bearer " + (await http.post("/v1/devices", json={})).json()["token"]
        }
        whole = await http.get("/v1/models/digits/0", headers=auth)
        etag = whole.headers["etag"]
        part = await http.get(
            "/v1/models/digits/0", headers={**auth, "Range": "bytes=100-", "If-Range": etag}
        )
        assert part.status_code == 206 and part.content == whole.content[100:]
        assert (
            part.headers["content-range"]
            == f"bytes 100-{len(whole.content) - 1}/{len(whole.content)}"
        )
        middle = await http.get("/v1/models/digits/0", headers={**auth, "Range": "bytes=5-9"})
        assert middle.content == whole.content[5:10]
        stale = await http.get(
            "/v1/models/digits/0", headers={**auth, "Range": "bytes=100-", "If-Range": '"old"'}
        )
        assert stale.status_code == 200 and stale.content == whole.content
        beyond = await http.get(
            "/v1/models/digits/0", headers={**auth, "Range": f"bytes={len(whole.content)}-"}
        )
        assert beyond.status_code == 416
        assert beyond.json()["error"]["code"] == "range_not_satisfiable"


async def test_a_20_mb_model_crosses_a_link_that_resets_every_2_mb(
    make_server: Any, digits: Any
) -> None:
    # 784 -> 6300 -> 10: about 20 MB of float32 weights, each way.
    server: Server = make_server(devices_per_round=1)
    spec = ModelSpec("mlp", 64, [78_000], 10)
    server.service.add_job(
        fedclient.protocol.JobPlan(
            fedclient.protocol.JobSettings(name="big", rounds=1, devices_per_round=1),
            spec,
            fedclient.protocol.TrainSettings(epochs=1, batch_size=50, learning_rate=0.01),
        )
    )
    link = FaultyTransport(server.transport(), FaultPlan(reset_every=2_000_000), seed=0)
    device = fedclient.Client(
        "http://fedserver.local",
        "big",
        (digits.x_train[:50], digits.y_train[:50]),
        transport=link,
        retry=RetryPolicy(max_attempts=50, seed=0),
        asleep=_no_wait,
    )
    outcome = await device.arun_once()
    assert outcome.status == "uploaded"
    model = server.store.model("big", 0)
    assert model is not None
    model_bytes = len(model[0])
    assert model_bytes > 20_000_000
    assert server.store.update_count(outcome.round_id) == 1  # type: ignore[arg-type]
    ideal = 2 * model_bytes  # the model down, an update of the same tensors up
    moved = link.counts.bytes_sent + link.counts.bytes_received
    extra = moved / ideal - 1
    assert link.counts.injected == dict.fromkeys(FaultPlan.KINDS, 0)
    assert device.stats.retries >= 15  # the link really broke, about every 2 MB
    assert device.stats.resumed_transfers >= 8  # downloads that went on from a Range
    assert extra <= 0.25, f"{extra:.1%} extra bytes"
    print(
        f"20 MB model: {moved:,} bytes moved for {ideal:,} ({extra:.1%} extra), "
        f"{device.stats.retries} resets"
    )


async def test_a_chunked_upload_resumes_after_its_answer_was_lost(
    make_server: Any, make_devices: Any
) -> None:
    server: Server = make_server()
    # Every third request's answer is lost: chunks arrive, their acknowledgements do not.
    link = FaultyTransport(server.transport(), FaultPlan(lost=0.34), seed=5)
    (device,) = make_devices(
        1,
        link,
        chunk_threshold=1000,
        chunk_bytes=1000,
        retry=RetryPolicy(max_attempts=30, seed=1),
        asleep=_no_wait,
    )
    assert (await device.arun_once()).status == "uploaded"
    (row,) = server.store.updates(1)
    assert device.stats.resumed_transfers > 0
    assert row.receipt_id == device.device_state.receipts("digits")[0].receipt_id
    assert server.store.session(row.device_id, row.idempotency_key) is None  # cleaned up
    assert server.store.update_count(1) == 1


async def test_chunk_protocol_rejects_bad_offsets_and_digests(server: Server) -> None:
    async with server.http() as http:
        auth = {
            "Authorization": "Bearer " + (await http.post("/v1/devices", json={})).json()["token"]
        }
        plan = (await http.post("/v1/jobs/digits/checkin", json={}, headers=auth)).json()["plan"]
        url = f"/v1/rounds/{plan['round_id']}/uploads"
        start = await http.post(
            url, json={"size": 10, "sha256": "0" * 64}, headers={**auth, "Idempotency-Key": "u1"}
        )
        assert start.status_code == 200 and start.json()["offset"] == 0
        wrong = await http.patch(
            f"{url}/u1", content=b"abc", headers={**auth, "Upload-Offset": "3"}
        )
        assert wrong.status_code == 409 and wrong.headers["upload-offset"] == "0"
        ok = await http.patch(f"{url}/u1", content=b"abc", headers={**auth, "Upload-Offset": "0"})
        assert ok.json()["offset"] == 3
        again = await http.post(
            url, json={"size": 10, "sha256": "0" * 64}, headers={**auth, "Idempotency-Key": "u1"}
        )
        assert again.json()["offset"] == 3  # resumable: the server says what it holds
        too_long = await http.patch(
            f"{url}/u1", content=b"x" * 20, headers={**auth, "Upload-Offset": "3"}
        )
        assert too_long.status_code == 400
        before = server.store.fingerprint()
        last = await http.patch(
            f"{url}/u1", content=b"y" * 7, headers={**auth, "Upload-Offset": "3"}
        )
        assert last.status_code == 400 and "SHA-256" in last.json()["error"]["message"]
        assert server.store.update_count(plan["round_id"]) == 0
        assert server.store.fingerprint() != before  # the broken session was dropped
        missing = await http.get(f"{url}/u1", headers=auth)
        assert missing.status_code == 404
    assert httpx
