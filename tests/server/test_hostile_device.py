"""A hostile device cannot break a job, crash the server or hold its resources (issue 19)."""

from __future__ import annotations

from typing import Any

import httpx
import msgspec
import numpy as np
import pytest

from fedclient.protocol import TENSOR_MEDIA_TYPE, decode_tensors, encode_tensors
from fedclient.server import FederationService, ServerStore
from tests.conftest import ManualClock, Server, enrol, make_plan

pytestmark = pytest.mark.anyio


async def _admitted(http: httpx.AsyncClient) -> tuple[dict[str, str], int]:
    auth = await enrol(http)
    answer = (await http.post("/v1/jobs/digits/checkin", json={}, headers=auth)).json()
    assert answer["status"] == "admitted"
    return auth, int(answer["plan"]["round_id"])


def _delta(server: Server, value: float) -> bytes:
    body, _ = server.store.model("digits", 0) or (b"", "")
    weights, _ = decode_tensors(body)
    delta = {k: np.full_like(v, value) for k, v in weights.items()}
    return encode_tensors(delta, {"num_examples": "1", "model_version": "0"})


async def _upload(http: httpx.AsyncClient, auth: dict[str, str], round_id: int, body: bytes) -> Any:
    return await http.post(
        f"/v1/rounds/{round_id}/updates",
        content=body,
        headers={**auth, "Idempotency-Key": "k", "Content-Type": TENSOR_MEDIA_TYPE},
    )


async def test_an_aggregate_that_overflows_is_never_published(db_url: Any) -> None:
    # Without a norm bound (a plan may lift it), finite updates of 3e38 under a server
    # learning rate of 4 overflow. The round fails, the model stays, and the next round
    # works: a non-finite model would stop every later round (devices discard it).
    plan = make_plan(devices_per_round=2, min_devices=2, max_update_norm=None)
    plan = msgspec.structs.replace(
        plan, strategy=msgspec.structs.replace(plan.strategy, server_learning_rate=4.0)
    )
    clock = ManualClock()
    service = FederationService(ServerStore(db_url()), clock=clock)
    service.add_job(plan)
    server = Server(service, clock)
    async with server.http() as http:
        for _ in range(2):
            auth, round_id = await _admitted(http)
            assert (await _upload(http, auth, round_id, _delta(server, 3e38))).status_code == 200
        status = (await http.get("/v1/jobs/digits")).json()
        assert status["model_version"] == 0 and status["rounds_failed"] == 1
        assert "not finite" in status["previous_round"]["reason"]
        for _ in range(2):
            auth, round_id = await _admitted(http)
            assert round_id == 2
            assert (await _upload(http, auth, round_id, _delta(server, 0.01))).status_code == 200
        status = (await http.get("/v1/jobs/digits")).json()
        assert status["model_version"] == 1 and status["rounds_completed"] == 1
    body, _ = server.store.model("digits", 1) or (b"", "")
    assert all(np.all(np.isfinite(v)) for v in decode_tensors(body)[0].values())


async def test_an_update_over_the_norm_bound_is_refused(make_server: Any) -> None:
    server = make_server(max_update_norm=5.0)
    async with server.http() as http:
        auth, round_id = await _admitted(http)
        before = server.store.fingerprint()
        refused = await _upload(http, auth, round_id, _delta(server, 1.0))  # norm ~35
        assert refused.status_code == 400 and "max_update_norm" in refused.text
        assert server.store.fingerprint() == before
        assert (await _upload(http, auth, round_id, _delta(server, 0.01))).status_code == 200


@pytest.mark.parametrize(
    "path",
    [
        "/v1/jobs/digits/rounds/%C2%B2",  # '²': a digit to str.isdigit
        "/v1/jobs/digits/rounds/%D9%A0",  # an Arabic-Indic zero
        "/v1/models/digits/9223372036854775808",  # one over SQLite's INTEGER
        "/v1/models/digits/99999999999999999999999",
        "/v1/rounds/%C2%B9/leave",
    ],
)
async def test_odd_path_ids_are_404_not_500(server: Server, path: str) -> None:
    async with server.http() as http:
        auth = await enrol(http)
        method = "POST" if path.endswith("leave") else "GET"
        response = await http.request(method, path, headers=auth)
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "not_found"


async def test_the_openapi_document_types_ids_as_integers(server: Server) -> None:
    async with server.http() as http:
        document = (await http.get("/openapi.json")).json()
    params = document["paths"]["/v1/models/{job}/{version}"]["get"]["parameters"]
    version = next(p for p in params if p["name"] == "version")
    assert version["schema"] == {"type": "integer", "minimum": 0, "maximum": 2**63 - 1}


async def test_a_checkin_enrolment_is_validated_like_an_enrolment(server: Server) -> None:
    before = server.store.fingerprint()
    async with server.http() as http:
        long_label = await http.post(
            "/v1/jobs/digits/checkin",
            json={"enrol_label": "x" * 300},
            headers={"Authorization": "Bearer " + "t" * 40},
        )
        assert long_label.status_code == 400
        short_token = await http.post(
            "/v1/jobs/digits/checkin",
            json={"enrol_label": ""},
            headers={"Authorization": "Bearer x"},
        )
        assert short_token.status_code == 400
        huge = await http.post(
            "/v1/jobs/digits/checkin",
            content=b'{"enrol_label": "' + b"x" * (1024 * 1024) + b'"}',
            headers={"Authorization": "Bearer " + "t" * 40, "Content-Type": "application/json"},
        )
        assert huge.status_code == 413
        huge_enrol = await http.post("/v1/devices", content=b"{" + b" " * (100 * 1024) + b"}")
        assert huge_enrol.status_code == 413
    assert server.store.fingerprint() == before


async def test_a_device_that_contributed_is_told_to_come_back_soon(make_server: Any) -> None:
    # After its upload a device asked at once again: told to wait until the deadline
    # (600 s here) although the round may close by quota a second later.
    server = make_server(devices_per_round=2, deadline_seconds=600.0)
    async with server.http() as http:
        auth, round_id = await _admitted(http)
        assert (await _upload(http, auth, round_id, _delta(server, 0.01))).status_code == 200
        again = (await http.post("/v1/jobs/digits/checkin", json={}, headers=auth)).json()
    assert again["status"] == "retry" and again["retry_after"] == 30.0


def test_fedserver_without_the_server_extra_says_so_in_one_line() -> None:
    # On a core install starlette is missing: fedserver printed a traceback.
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['starlette'] = None; sys.modules['uvicorn'] = None\n"
        "from fedclient.server.cli import main\n"
        "raise SystemExit(main(['--plan', 'x.toml']))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 2
    assert "pip install 'fedclient[server]'" in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


async def test_a_device_cannot_hold_many_chunked_uploads_open(server: Server) -> None:
    # Found: unlimited chunked-upload sessions per device (40 x 1 MB in a second).
    async with server.http() as http:
        auth, round_id = await _admitted(http)
        start = {"size": 1000, "sha256": "0" * 64}
        for key in ("a", "b"):
            opened = await http.post(
                f"/v1/rounds/{round_id}/uploads",
                json=start,
                headers={**auth, "Idempotency-Key": key},
            )
            assert opened.status_code == 200
        before = server.store.fingerprint()
        third = await http.post(
            f"/v1/rounds/{round_id}/uploads", json=start, headers={**auth, "Idempotency-Key": "c"}
        )
        assert third.status_code == 409 and "uploads open" in third.text
        again = await http.post(  # finding an open one again is fine
            f"/v1/rounds/{round_id}/uploads", json=start, headers={**auth, "Idempotency-Key": "a"}
        )
        assert again.status_code == 200
        assert server.store.fingerprint() == before


async def test_a_body_that_stops_arriving_is_refused_with_408(server: Server) -> None:
    # Found: idle half-sent connections never timed out, holding their buffers.
    import asyncio

    import httpx

    app = server.app_with(body_idle_seconds=0.2)
    never = asyncio.Event()

    async def half_a_body() -> Any:
        yield b'{"label": "'
        await never.wait()  # the rest never comes

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://fedserver.local"
    ) as http:
        before = server.store.fingerprint()
        answer = await http.post("/v1/devices", content=half_a_body())
        assert answer.status_code == 408 and answer.json()["error"]["code"] == "body_timeout"
        assert server.store.fingerprint() == before
