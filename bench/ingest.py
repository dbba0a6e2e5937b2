"""How fast ``fedserver`` takes updates over real HTTP, on SQLite and PostgreSQL, with
one and two workers (issue 15).

    python bench/ingest.py                                 # every configuration, 10,000 uploads
    python bench/ingest.py --uploads 2000 --configs sqlite:1

For each configuration (``ENGINE:WORKERS``) a fresh database is made (``fedserver
init``; PostgreSQL: a throwaway server from Debian's package as the tests use, but
with fsync on, as deployed),
``fedserver --workers W --no-rate-limits`` starts as a real process, and
``--uploads`` devices enrol and check in to one round that holds them all
(``devices_per_round`` = uploads). Then each sends one update of 100,000 float32
(a 9,999-input softmax: 400 kB of safetensors, a valid update the server checks,
stores and folds into the round's running sum), ``--concurrency`` at a time, from
this process over loopback (httpx, asyncio). Timed: the upload phase only, from
the first upload sent to the last receipt; p99 is the client-side latency of one
upload. Server memory is the resident set of the server's processes (all its
workers; PostgreSQL's own not counted) after the first 1,000 uploads and after the
last: with streaming aggregation the round holds O(model), so the two should match.
Server CPU is the CPU time of those processes over the upload phase, per upload: it
hardly depends on what else the machine runs, where uploads per second do.

Held cluster-wide is what the server measures of the time it held anything every
worker waits for (issue 27): the advisory lock of the requests that still take it
(the deadline timer, status reads of secure jobs, the operator), and each round's
close, which holds the round's row from its claim to its commit. Each worker prints
its total when it stops; the sum over the workers, per upload, gives the ceiling no
number of workers passes: 1,000 / (held ms per upload) uploads a second. SQLite has
one process: everything it does is "cluster-wide", and the column says so.

The last line names the configuration with the most uploads per second:

    ingest uploads_per_s=<N> workers=<W> db=<kind> p99_ms=<X> server_rss_mb=<M>

The load generator shares the machine's cores with the server (and PostgreSQL).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedclient.protocol import (
    CHECKIN,
    ENROL,
    JOB_STATUS,
    encode_tensors,
)
from tests.postgres import PostgresCluster, find_binaries

INPUTS, CLASSES = 9_999, 10  # 9,999 x 10 weights + 10 biases = 100,000 float32

PLAN = """
[job]
name = "ingest"
rounds = 2
devices_per_round = {uploads}
min_devices = 1
over_selection = 1.0
deadline_seconds = 86400
seed = 1
[model]
kind = "softmax"
inputs = {inputs}
hidden = []
classes = {classes}
"""


@dataclass
class Result:
    engine: str
    workers: int
    uploads: int
    seconds: float
    p50_ms: float
    p99_ms: float
    rss_first_mb: float
    rss_last_mb: float
    cpu_ms: float = 0.0  # the server's CPU time (all its processes) per upload
    held_ms: float | None = None  # held cluster-wide per upload, as the server measured

    @property
    def ceiling(self) -> str:
        """Uploads a second that the time held cluster-wide allows at most."""
        if self.held_ms is None:
            return "one process"
        return f"{1000 / self.held_ms:,.0f}" if self.held_ms > 0 else "unbounded"

    @property
    def per_second(self) -> float:
        return self.uploads / self.seconds


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _tree(pid: int) -> list[int]:
    """A process and its descendants (the workers)."""
    found, todo = [], [pid]
    while todo:
        p = todo.pop()
        try:
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        found.append(p)
        todo.extend(int(c) for c in children)
    return found


def _tree_cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process and its descendants so far, in seconds:
    unlike uploads per second, it does not depend on what else the machine runs."""
    ticks = 0
    for p in _tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def _tree_rss_mb(pid: int) -> float:
    """Resident memory of a process and its descendants (the workers), in MB."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
        except OSError:
            continue
        total += next(
            int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS")
        )
        todo.extend(int(c) for c in children)
    return total / 1024


def _update_body(model_version: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    delta = {
        "fc1.weight": (rng.standard_normal((CLASSES, INPUTS)) * 1e-3).astype(np.float32),
        "fc1.bias": (rng.standard_normal(CLASSES) * 1e-3).astype(np.float32),
    }
    return encode_tensors(delta, {"num_examples": "10", "model_version": str(model_version)})


async def _enrol(url: str, devices: int, concurrency: int) -> list[tuple[str, int]]:
    """Enrol ``devices`` devices and admit each to the round: (token, round id) each."""
    # Idle connections go before uvicorn's 5 s keep-alive closes them: a request sent on one
    # the server is closing that moment fails (httpx.ReadError), as 2 workers on 10,000 did.
    limits = httpx.Limits(max_connections=concurrency, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as http:
        gate = asyncio.Semaphore(concurrency)

        async def join() -> tuple[str, int]:
            async with gate:
                enrolled = (await http.post(ENROL.url(), json={})).raise_for_status().json()
                auth = {"Authorization": f"Bearer {enrolled['token']}"}
                answer = await http.post(CHECKIN.url(job="ingest"), json={}, headers=auth)
                plan = answer.raise_for_status().json()
                assert plan["status"] == "admitted", plan
                return enrolled["token"], int(plan["plan"]["round_id"])

        return await asyncio.gather(*(join() for _ in range(devices)))


def _status(client: httpx.Client) -> dict[str, Any]:
    return client.get(JOB_STATUS.url(job="ingest")).json()  # type: ignore[no-any-return]


def _load(url: str, uploads: int, concurrency: int, server_pid: int, tmp: Path) -> Result:
    """Every device uploads once, through wrk; server memory is read after 1,000."""
    devices = asyncio.run(_enrol(url, uploads, concurrency))
    listing, body = tmp / "devices.txt", tmp / "update.safetensors"
    listing.write_text("".join(f"{token} {round_id}\n" for token, round_id in devices))
    body.write_bytes(_update_body(0, seed=1))
    threads = 2
    cpu_before = _tree_cpu_seconds(server_pid)
    wrk = subprocess.Popen(
        [
            "wrk",
            "-t",
            str(threads),
            "-c",
            str(concurrency),
            "-d",
            "3600s",
            "--timeout",
            "60s",
            "-s",
            str(Path(__file__).with_name("ingest.lua")),
            url,
            "--",
            str(listing),
            str(body),
            str(threads),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    rss_first = 0.0
    # wrk runs until told to stop: the bench watches the round (a light status poll, on
    # one kept connection: a new client each time cost the load generator a millisecond
    # of CPU an upload, a sixth of a core) and stops it once the last update closed the
    # round, reading memory on the way. wrk times the uploads itself, from the first sent
    # to the last receipt: how soon it is stopped changes no figure.
    watch = httpx.Client(base_url=url, timeout=30)
    while wrk.poll() is None:
        status = _status(watch)
        if status["model_version"] >= 1:
            break
        if not rss_first and (status.get("current_round") or {}).get("updates", 0) >= 1000:
            rss_first = _tree_rss_mb(server_pid)
        time.sleep(0.05)
    wrk.send_signal(signal.SIGINT)  # wrk then reports, as at the end of its duration
    out, _ = wrk.communicate()
    found = re.search(
        r"RESULT requests=(\d+) seconds=(\S+) p50_ms=(\S+) p99_ms=(\S+) errors=(\d+)", out
    )
    assert found is not None, out
    assert int(found[5]) == 0, f"wrk saw errors: {out}"
    status = _status(watch)
    watch.close()
    assert status["model_version"] == 1, status  # the round closed on the last upload
    rss_first = rss_first or _tree_rss_mb(server_pid)  # fewer than 1,000 uploads
    cpu_ms = (_tree_cpu_seconds(server_pid) - cpu_before) * 1000 / uploads
    assert status["previous_round"]["updates"] == uploads, status["previous_round"]
    return Result(
        "",
        0,
        uploads,
        float(found[2]),
        float(found[3]),
        float(found[4]),
        rss_first,
        _tree_rss_mb(server_pid),
        cpu_ms,
    )


def _held_ms(log: str) -> float:
    """The milliseconds every worker held cluster-wide, from the lines they print when
    they stop (`fedclient.server.app`)."""
    found = re.findall(r"held cluster-wide ([0-9.]+) ms", log)
    assert found, f"no worker said how long it held cluster-wide: {log[-2000:]}"
    return sum(float(ms) for ms in found)


def run(
    engine: str, workers: int, uploads: int, concurrency: int, cluster: PostgresCluster | None
) -> Result:
    with tempfile.TemporaryDirectory(prefix="ingest-") as tmp:
        plan = Path(tmp) / "plan.toml"
        plan.write_text(PLAN.format(uploads=uploads, inputs=INPUTS, classes=CLASSES))
        bodies: list[str] = []
        if engine.startswith("postgresql"):
            assert cluster is not None
            db = cluster.database()
            if engine == "postgresql":  # bodies in a folder the workers share
                bodies = ["--bodies", str(Path(tmp) / "bodies")]
        else:
            db = str(Path(tmp) / "server.sqlite")
        cli = [sys.executable, "-m", "fedclient.server.cli"]
        subprocess.run(
            [*cli, "init", "--plan", str(plan), "--db", db], check=True, capture_output=True
        )
        port = _free_port()
        server = subprocess.Popen(
            [
                *cli,
                "--plan",
                str(plan),
                "--db",
                db,
                "--port",
                str(port),
                "--workers",
                str(workers),
                "--no-rate-limits",
                "--public-status",
                *bodies,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:  # readiness probe, bounded
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"fedserver did not start: {server.stderr.read().decode()}")  # type: ignore[union-attr]
                try:
                    if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.1)
            result = _load(url, uploads, concurrency, server.pid, Path(tmp))
        finally:
            server.terminate()
            _, err = server.communicate(timeout=60)
            if cluster is not None and engine.startswith("postgresql"):
                cluster.drop([db.rsplit("/", 1)[1].split("?")[0]])
    result.engine, result.workers = engine, workers
    if engine.startswith("postgresql"):
        result.held_ms = _held_ms(err.decode(errors="replace")) / uploads
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uploads", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument(
        "--configs", default="sqlite:1,postgresql:1,postgresql:2", help="ENGINE:WORKERS,..."
    )
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        print("bench/ingest.py drives the uploads with wrk: apt-get install wrk")
        return 2
    configs = [(c.split(":")[0], int(c.split(":")[1])) for c in args.configs.split(",")]
    cluster = None
    if any(engine.startswith("postgresql") for engine, _ in configs):
        bin_dir = find_binaries()
        if bin_dir is None:
            print("PostgreSQL is not installed (apt-get install postgresql): skipping it")
            configs = [c for c in configs if not c[0].startswith("postgresql")]
        else:
            cluster = PostgresCluster(bin_dir, fsync=True)  # durable, as deployed
    results = []
    try:
        print(
            f"{args.uploads} uploads of 100,000 float32, {args.concurrency} at a time,"
            f" {os.cpu_count()} cores"
        )
        print(
            "| db | workers | uploads/s | p50 ms | p99 ms | server RSS after 1k / all (MB)"
            " | server CPU ms / upload | held cluster-wide ms / upload | ceiling uploads/s |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        for engine, workers in configs:
            r = run(engine, workers, args.uploads, args.concurrency, cluster)
            results.append(r)
            print(
                f"| {r.engine} | {r.workers} | {r.per_second:.0f} | {r.p50_ms:.1f} | {r.p99_ms:.1f}"
                f" | {r.rss_first_mb:.0f} / {r.rss_last_mb:.0f} | {r.cpu_ms:.2f}"
                f" | {'-' if r.held_ms is None else f'{r.held_ms:.4f}'} | {r.ceiling} |",
                flush=True,
            )
    finally:
        if cluster is not None:
            cluster.stop()
    best = max(results, key=lambda r: r.per_second)
    print(
        f"ingest uploads_per_s={best.per_second:.0f} workers={best.workers} db={best.engine}"
        f" p99_ms={best.p99_ms:.1f} server_rss_mb={best.rss_last_mb:.0f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
