"""The write-ahead log of a served SQLite file stays bounded: checkpointed and emptied by
the committer once it passes `WAL_LIMIT` (it grew for good before: 35 MB in this job)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedclient
from fedclient.server import FederationService, ServerStore, create_app, plan_from_dict
from fedclient.server.database import WAL_LIMIT

pytestmark = pytest.mark.anyio

ROUNDS, DEVICES = 30, 20


async def test_the_wal_stays_under_its_bound_through_a_30_round_job(
    tmp_path: Path, digits: Any
) -> None:
    import httpx

    db = tmp_path / "served.sqlite"
    plan = plan_from_dict(
        {
            "job": {
                "name": "digits",
                "rounds": ROUNDS,
                "devices_per_round": DEVICES,
                "min_devices": DEVICES,
                "seed": 1,
            },
            "model": {"kind": "softmax", "inputs": 64, "classes": 10},
            "train": {"epochs": 1, "batch_size": 8, "learning_rate": 0.1},
        }
    )
    service = FederationService(ServerStore(db))
    service.add_job(plan)
    transport = httpx.ASGITransport(app=create_app(service, metrics=False))
    wal, peak, done = Path(f"{db}-wal"), [0], threading.Event()

    def watch() -> None:  # the file's size, as the disk sees it, every 2 ms
        while not done.wait(0.002):
            if wal.exists():
                peak[0] = max(peak[0], wal.stat().st_size)

    watcher = threading.Thread(target=watch)
    watcher.start()
    parts = np.array_split(np.arange(len(digits.y_train)), DEVICES)
    devices = [
        fedclient.Client(
            "http://fedserver.local",
            "digits",
            (digits.x_train[p], digits.y_train[p]),
            transport=transport,
            seed=i,
        )
        for i, p in enumerate(parts)
    ]

    async def run(device: fedclient.Client) -> None:
        for _ in range(ROUNDS * 6):
            if (await device.astep()).status == "finished":
                return
        raise AssertionError("the job did not finish")

    import asyncio

    try:
        await asyncio.gather(*(run(d) for d in devices))
    finally:
        done.set()
        watcher.join()
    status = service.job_status("digits")
    assert status.status == "finished" and status.rounds_completed == ROUNDS
    # The bound: WAL_LIMIT (8 MiB), plus one group commit's pages written past it.
    assert 0 < peak[0] <= WAL_LIMIT + 2 * 1024 * 1024, peak[0]
    for device in devices:
        device.close()
    service.store.close()
