"""How many check-ins a second ``fedserver`` answers "not now" (the round is full),
beside a trivial ASGI app on the same server stack, in the same run (issue 27).

    python bench/checkin.py                                # 2 workers on PostgreSQL
    python bench/checkin.py --workers 1 --db sqlite --seconds 5

A fresh database (PostgreSQL: a throwaway server from Debian's package as the tests
use, fsync on, as deployed) holds one job whose round admits one device; that device
is admitted, then ``--devices`` others enrol. ``fedserver --workers W
--no-rate-limits`` serves it as a real process, and wrk (2 threads, ``--connections``
connections) sends those devices' check-ins in turn, for ``--seconds``: every one is
answered "the round is full". Then the same wrk load goes to a trivial ASGI app (it
reads the request and answers a fixed JSON body, nothing else) served by uvicorn with
the same HTTP protocol and the same number of worker processes: the floor of the
stack, measured on the same machine in the same minute. The servers take turns,
``--repeats`` runs each (the median is reported), and share the 2 cores with wrk.

fedserver runs twice: with ``--public-status`` (a "not now" then reads nothing of the
device: the headline figure) and without (private status, the default: the device's
token is read first, one indexed read).

The last line (per_s and raw_per_s are per worker; per_s and p99 are fedserver's with
public status):

    checkin per_s=<N> raw_per_s=<M> workers=<W> db=<kind> p99_ms=<X>
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedclient.protocol import CHECKIN, ENROL
from tests.postgres import PostgresCluster, find_binaries

PLAN = """
[job]
name = "checkin"
rounds = 2
devices_per_round = 1
min_devices = 1
over_selection = 1.0
deadline_seconds = 86400
seed = 1
[model]
kind = "softmax"
inputs = 64
hidden = []
classes = 10
"""

#: What the trivial app answers: a "not now" as fedserver's is, byte for byte in size.
_ANSWER = b'{"status":"retry","retry_after":64800.123456,"reason":"the round is full"}'


async def trivial_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """The floor: read the request, answer a fixed body."""
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": _ANSWER})


def _serve_trivial(port: int, workers: int) -> None:
    """Serve `trivial_app` as fedserver serves its app (uvicorn, its HTTP protocol)."""
    import uvicorn

    from fedclient.server.connections import protocol

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    uvicorn.run(
        "checkin:trivial_app",
        host="127.0.0.1",
        port=port,
        workers=workers,
        http=protocol(),
        log_level="warning",
        app_dir=str(Path(__file__).resolve().parent),
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_ready(url: str, process: subprocess.Popen[bytes], path: str) -> None:
    deadline = time.monotonic() + 60
    while True:  # readiness probe, bounded
        if process.poll() is not None or time.monotonic() > deadline:
            err = process.stderr.read().decode() if process.stderr else ""
            raise RuntimeError(f"the server did not start: {err}")
        try:
            httpx.post(url + path, timeout=1)
            return
        except httpx.TransportError:
            time.sleep(0.1)


def _wrk(url: str, path: str, tokens: Path, seconds: float, connections: int) -> dict[str, float]:
    out = subprocess.run(
        [
            "wrk",
            "-t",
            "2",
            "-c",
            str(connections),
            "-d",
            f"{max(1, round(seconds))}s",
            "--timeout",
            "10s",
            "-s",
            str(Path(__file__).with_name("checkin.lua")),
            url,
            "--",
            str(tokens),
            path,
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    found = re.search(
        r"RESULT requests=(\d+) seconds=(\S+) p50_ms=(\S+) p99_ms=(\S+) errors=(\d+)", out
    )
    assert found is not None, out
    assert int(found[5]) == 0, f"wrk saw errors: {out}"
    return {
        "per_s": int(found[1]) / float(found[2]),
        "p50_ms": float(found[3]),
        "p99_ms": float(found[4]),
    }


def _enrol(url: str, devices: int) -> list[str]:
    """One device admitted (the round is then full), then ``devices`` more enrolled."""
    path = CHECKIN.url(job="checkin")
    with httpx.Client(base_url=url, timeout=30) as http:
        tokens = []
        for _ in range(devices + 1):
            tokens.append(http.post(ENROL.url(), json={}).raise_for_status().json()["token"])
        auth = {"Authorization": f"Bearer {tokens[0]}"}
        first = http.post(path, json={}, headers=auth).raise_for_status().json()
        assert first["status"] == "admitted", first
        auth = {"Authorization": f"Bearer {tokens[1]}"}
        second = http.post(path, json={}, headers=auth).raise_for_status().json()
        assert second["status"] == "retry" and second["reason"] == "the round is full", second
    return tokens[1:]


def _measure(
    command: list[str], url: str, path: str, tokens: Path, args: argparse.Namespace
) -> dict[str, float]:
    """Start a server (``command``), warm it up, measure it with wrk, stop it."""
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _wait_ready(url, server, path)
        _wrk(url, path, tokens, 1.0, args.connections)  # warm up
        return _wrk(url, path, tokens, args.seconds, args.connections)
    finally:
        server.terminate()
        server.wait(timeout=30)


def run(args: argparse.Namespace, cluster: PostgresCluster | None) -> dict[str, dict[str, float]]:
    """Each server's figures: fedserver with public job status (a "not now" reads
    nothing), the trivial app, and fedserver with private status (the token is read)."""
    with tempfile.TemporaryDirectory(prefix="checkin-") as tmp:
        plan = Path(tmp) / "plan.toml"
        plan.write_text(PLAN)
        db = cluster.database() if cluster is not None else str(Path(tmp) / "server.sqlite")
        cli = [sys.executable, "-m", "fedclient.server.cli"]
        subprocess.run(
            [*cli, "init", "--plan", str(plan), "--db", db], check=True, capture_output=True
        )
        path = CHECKIN.url(job="checkin")
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        fedserver = [*cli, "--plan", str(plan), "--db", db, "--port", str(port)]
        fedserver += ["--workers", str(args.workers), "--no-rate-limits"]
        tokens = Path(tmp) / "tokens.txt"
        try:
            server = subprocess.Popen(fedserver, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                _wait_ready(url, server, "/healthz")
                tokens.write_text("".join(t + "\n" for t in _enrol(url, args.devices)))
            finally:
                server.terminate()
                server.wait(timeout=30)
            trivial = [sys.executable, __file__, "--serve-trivial", str(port)]
            trivial += [f"--workers={args.workers}"]
            servers = {
                "public": [*fedserver, "--public-status"],
                "trivial": trivial,
                "private": fedserver,
            }
            # In turns, ``--repeats`` times: the machine's load drifts, and each server
            # then sees the same drift; the median run of each is reported.
            runs: dict[str, list[dict[str, float]]] = {name: [] for name in servers}
            for _ in range(args.repeats):
                for name, command in servers.items():
                    runs[name].append(_measure(command, url, path, tokens, args))
            return {
                name: sorted(done, key=lambda r: r["per_s"])[len(done) // 2]
                for name, done in runs.items()
            }
        finally:
            if cluster is not None:
                cluster.drop([db.rsplit("/", 1)[1].split("?")[0]])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--db", choices=["postgresql", "sqlite"], default="postgresql")
    parser.add_argument("--devices", type=int, default=2000, help="distinct devices asking")
    parser.add_argument("--seconds", type=float, default=5.0, help="of each run")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each server, in turns")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--serve-trivial", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_trivial:
        _serve_trivial(args.serve_trivial, args.workers)
        return 0
    if shutil.which("wrk") is None:
        print("bench/checkin.py drives the check-ins with wrk: apt-get install wrk")
        return 2
    if args.db == "sqlite" and args.workers != 1:
        print("one process serves a SQLite file: --workers 1 with --db sqlite")
        return 2
    cluster = None
    if args.db == "postgresql":
        bin_dir = find_binaries()
        if bin_dir is None:
            print("PostgreSQL is not installed (apt-get install postgresql)")
            return 2
        cluster = PostgresCluster(bin_dir, fsync=True)  # durable, as deployed
    try:
        figures = run(args, cluster)
    finally:
        if cluster is not None:
            cluster.stop()
    w = args.workers
    print(
        f"{args.devices} devices asking, {args.connections} connections, {args.seconds:g} s"
        f" a run, median of {args.repeats} runs each in turns, {os.cpu_count()} cores"
    )
    print("| server | workers | answers/s | per worker | p50 ms | p99 ms |")
    print("|---|---|---|---|---|---|")
    names = {
        "public": "fedserver, round full, public job status",
        "private": "fedserver, round full, private job status (token read)",
        "trivial": "trivial ASGI app",
    }
    for key, name in names.items():
        r = figures[key]
        print(
            f"| {name} | {w} | {r['per_s']:.0f} | {r['per_s'] / w:.0f} | {r['p50_ms']:.1f}"
            f" | {r['p99_ms']:.1f} |"
        )
    ours, raw = figures["public"], figures["trivial"]
    print(
        f"checkin per_s={ours['per_s'] / w:.0f} raw_per_s={raw['per_s'] / w:.0f} workers={w}"
        f" db={args.db} p99_ms={ours['p99_ms']:.1f}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
