"""Slow-loris against a ``fedserver`` process under a 256-descriptor limit: 300 real
connections send unfinished request headers (some trickling a byte at a time) and hold
them, while honest devices keep being served; every stalled connection is closed by
the server within its header deadline (`fedclient.server.connections`).

The deadline is 30 s by default; this test sets ``--header-timeout 8`` to run in less
time: the same code path, a shorter timer (the Done-when bound is 60 s)."""

from __future__ import annotations

import contextlib
import select
import socket
import threading
import time
from pathlib import Path
from typing import Any

import fedclient
from tests.integration.test_fedserver_process import FedServerProcess

STALLED, TRICKLING, DESCRIPTORS, HEADER_SECONDS = 300, 10, 256, 8.0
STALL = b"POST /v1/jobs/digits/checkin HTTP/1.1\r\nHost: fl.example.com\r\nContent-Type: app"


def _open(port: int) -> socket.socket | None:
    """A connection with an unfinished request head, or None if the server refused it."""
    try:
        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        sock.sendall(STALL)
    except OSError:
        return None
    sock.setblocking(False)
    return sock


def _closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` (end of stream or reset; never an answer)."""
    try:
        data = sock.recv(4096)
    except BlockingIOError:
        return False
    except OSError:
        return True
    assert data == b"", data[:200]  # a stalled request gets no answer, only a close
    return True


def test_stalled_headers_cannot_starve_honest_devices(tmp_path: Path, digits: Any) -> None:
    server = FedServerProcess(
        tmp_path,
        rounds=2,
        per_round=3,
        options=("--header-timeout", str(HEADER_SECONDS)),
        descriptors=DESCRIPTORS,
    )
    server.start()
    # The honest fleet's devices exist before the attack (their state is their own).
    devices = [
        fedclient.Client(
            server.url,
            "digits",
            (digits.x_train[i * 100 : (i + 1) * 100], digits.y_train[i * 100 : (i + 1) * 100]),
            seed=i,
        )
        for i in range(3)
    ]
    opened: list[tuple[socket.socket, float]] = []
    try:
        started = time.monotonic()
        opened += [(s, time.monotonic()) for s in map(_open, [server.port] * STALLED) if s]
        stalled = [s for s, _ in opened]
        stop = threading.Event()

        def trickle() -> None:  # a byte every half second: the deadline does not move
            while not stop.wait(0.5):
                for sock in stalled[:TRICKLING]:
                    with contextlib.suppress(OSError):
                        sock.send(b"x")

        trickler = threading.Thread(target=trickle)
        trickler.start()
        # Honest devices are served while the stalled connections are still open: each
        # new connection takes the place of the one that waited longest for headers.
        served = []
        for device in devices:
            outcome = device.run_once()
            served.append((outcome.status, time.monotonic() - started))
        assert [status for status, _ in served] == ["uploaded"] * 3
        assert served[0][1] < HEADER_SECONDS, served  # before any deadline passed

        # Every stalled connection is closed, none later than its deadline (plus slack).
        closed_at: dict[int, float] = {}
        while len(closed_at) < len(opened):
            assert time.monotonic() - started < 60, f"{len(opened) - len(closed_at)} still open"
            readable, _, _ = select.select(
                [s for s, _ in opened if s.fileno() not in closed_at], [], [], 0.1
            )
            for sock in readable:
                if _closed_by_server(sock):
                    closed_at[sock.fileno()] = time.monotonic()
        stop.set()
        trickler.join()
        waited = max(closed_at[s.fileno()] - at for s, at in opened)
        assert waited <= HEADER_SECONDS + 2.0, waited

        # The server is whole: the next round completes, nothing failed to open.
        for device in devices:
            assert device.run_once().status == "uploaded"
        assert server.status()["status"] == "finished"
        output = server.output()
        assert "unable to open" not in output and "Traceback" not in output, output[-2000:]
        print(
            f"{len(opened)} stalled connections under {DESCRIPTORS} descriptors: honest upload"
            f" after {served[0][1]:.2f} s, every stalled one closed within {waited:.1f} s"
        )
    finally:
        for sock, _ in opened:
            sock.close()
        for device in devices:
            device.close()
        assert server.proc is not None
        server.proc.terminate()
        server.proc.wait(timeout=10)
