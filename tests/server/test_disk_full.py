"""Out of storage: devices get 503 with Retry-After, nothing is half-written, and the
server carries on by itself once space returns (issue 16)."""

from __future__ import annotations

from typing import Any

import pytest

import fedclient
from tests.conftest import Server, step_until

pytestmark = pytest.mark.anyio


def _fill(server: Server) -> None:
    """No page more: SQLite answers every write that needs one with SQLITE_FULL."""
    pages = server.store.db.execute("PRAGMA page_count").fetchone()[0]
    server.store.db.execute(f"PRAGMA max_page_count = {pages}")


def _free(server: Server) -> None:
    server.store.db.execute("PRAGMA max_page_count = 1073741823")


async def test_a_full_disk_answers_503_and_the_round_completes_when_space_returns(
    engine: str, make_server: Any, make_devices: Any
) -> None:
    if engine != "sqlite":
        pytest.skip("fills the disk through SQLite's max_page_count")
    server: Server = make_server(devices_per_round=2, min_devices=2)
    devices = make_devices(2, server.transport())
    for device in devices:
        await step_until(device, fedclient.Phase.TRAINED)
    held = devices[0].device_state.progress("digits")
    assert held.update is not None and held.idempotency_key is not None
    _fill(server)
    before = server.store.fingerprint()
    async with server.http() as http:
        enrolled = devices[0].device_state.identity(devices[0].server)
        assert enrolled is not None
        answer = await http.post(
            "/v1/rounds/1/updates",
            content=held.update,
            headers={
                "Authorization": f"Bearer {enrolled.token}",
                "Idempotency-Key": held.idempotency_key,
                "Content-Type": fedclient.protocol.TENSOR_MEDIA_TYPE,
            },
        )
    assert answer.status_code == 503 and answer.headers["Retry-After"] == "30"
    assert answer.json()["error"]["code"] == "unavailable"
    assert server.store.fingerprint() == before  # nothing half-written
    # The device itself: it retries after Retry-After; space returns while it waits.
    waits: list[float] = []

    async def wait(seconds: float) -> None:
        waits.append(seconds)
        _free(server)

    for device in devices:
        device.asleep = wait
        assert (await device.astep()).status == "uploaded"
    assert waits == [30.0]  # the first device waited once, as told; the second never
    status = server.service.job_status("digits")
    assert status.model_version == 1 and status.rounds_completed == 1
