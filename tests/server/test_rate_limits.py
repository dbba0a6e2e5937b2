"""Rate limits: a flood from one address gets 429 with Retry-After; the fleet goes on."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

import fedclient
from fedclient.server.limits import RateLimits
from tests.conftest import Server

pytestmark = pytest.mark.anyio

LIMITS = RateLimits(
    enrol="5/minute", checkin_per_address="20/minute", checkin_per_device="3/minute"
)


async def test_a_flood_of_enrolments_is_429_while_others_enrol(server: Server) -> None:
    app = server.app_with(rate_limits=LIMITS)
    flood = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, client=("10.0.0.66", 40000)),
        base_url="http://fedserver.local",
    )
    other = httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, client=("10.0.0.7", 40000)),
        base_url="http://fedserver.local",
    )
    async with flood, other:
        answers = [await flood.post("/v1/devices", json={}) for _ in range(8)]
        assert [a.status_code for a in answers] == [200] * 5 + [429] * 3
        refused = answers[-1]
        assert refused.json()["error"]["code"] == "too_many_requests"
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert (await other.post("/v1/devices", json={})).status_code == 200
    assert len(server.store.db.execute("SELECT * FROM devices").fetchall()) == 6


async def test_a_device_checking_in_too_often_is_429_and_others_keep_training(
    server: Server, make_devices: Any
) -> None:
    app = server.app_with(rate_limits=LIMITS)
    transport = httpx.ASGITransport(app=app, client=("10.0.0.9", 40000))
    async with httpx.AsyncClient(transport=transport, base_url="http://fedserver.local") as http:
        auth = {
            "Authorization": "Bearer " + (await http.post("/v1/devices", json={})).json()["token"]
        }
        codes = [
            (await http.post("/v1/jobs/digits/checkin", json={}, headers=auth)).status_code
            for _ in range(5)
        ]
    assert codes == [200, 200, 200, 429, 429]
    # Other devices (other addresses) train as usual; a client honours Retry-After.
    devices = make_devices(
        2,
        [httpx.ASGITransport(app=app, client=(f"10.1.0.{i}", 40000)) for i in range(2)],
    )
    for device in devices:
        assert (await device.arun_once()).status == "uploaded"
    assert fedclient.TooManyRequests.status == 429


def test_rate_limits_parse_and_refuse_nonsense() -> None:
    limits = RateLimits.parse("enrol=2/second, upload_per_device=10/hour")
    assert limits.enrol == "2/second" and limits.upload_per_device == "10/hour"
    assert limits.checkin_per_device == RateLimits().checkin_per_device
    with pytest.raises(fedclient.InvalidInput, match="unknown rate limit"):
        RateLimits.parse("everything=1/second")
    with pytest.raises(fedclient.InvalidInput, match="enrol"):
        RateLimits.parse("enrol=lots")
