"""/metrics: Prometheus text a scraper parses, with what happened in it."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Server

pytestmark = pytest.mark.anyio


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


async def test_metrics_count_requests_rounds_updates_enrolments_and_refusals(
    make_server: Any, make_devices: Any
) -> None:
    server: Server = make_server(devices_per_round=2, min_devices=2)
    transport = server.transport()  # one app: its metrics count all that follows
    devices = make_devices(2, transport)
    for device in devices:
        assert (await device.arun_once()).status == "uploaded"
    async with httpx.AsyncClient(transport=transport, base_url="http://fedserver.local") as http:
        assert (await http.get("/v1/models/digits/0")).status_code == 401
        scraped = await http.get("/metrics")
    assert scraped.status_code == 200
    assert scraped.headers["content-type"].startswith("text/plain")
    got = _samples(scraped.text)
    checkin = (("route", "/v1/jobs/{job}/checkin"), ("status", "200"))
    assert got[("fedserver_requests_total", checkin)] >= 2
    assert got[("fedserver_rounds_total", (("job", "digits"), ("outcome", "closed")))] == 1
    assert got[("fedserver_updates_total", (("job", "digits"),))] == 2
    assert got[("fedserver_enrolments_total", ())] == 2
    assert got[("fedserver_refusals_total", (("code", "unauthorized"),))] == 1
    upload = (("route", "/v1/rounds/{round_id}/updates"),)
    assert got[("fedserver_request_seconds_count", upload)] == 2
    # No series per raw path: ids never become labels.
    assert not any("/1/" in dict(labels).get("route", "") for _, labels in got)


async def test_metrics_need_a_token_unless_made_public(make_server: Any) -> None:
    # fedserver's default: the metrics token or the admin token, never a device's.
    admin, reader = "a" * 40, "m" * 40
    options = {"admin_token": admin, "metrics_token": reader, "public_metrics": False}
    server: Server = make_server(service_options=options)
    async with server.http() as http:
        device = (await http.post("/v1/devices", json={"label": "d"})).json()["token"]
        for token, status in [(None, 401), (device, 401), (reader, 200), (admin, 200)]:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            answer = await http.get("/metrics", headers=headers)
            assert answer.status_code == status, token
            if status == 401:
                assert answer.json()["error"]["code"] == "unauthorized"
