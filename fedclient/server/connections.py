"""Connections that cannot starve the server: a deadline for request headers and a cap on
open connections, added to uvicorn's HTTP protocol.

uvicorn closes a connection only while it idles between requests (``timeout_keep_alive``),
and the first byte of a request cancels that timer: headers that trickle in, or never
end, hold the connection and its file descriptor for good. Behind a 256-descriptor
limit, 300 such connections made every other request fail, and SQLite could no longer
open a file. Its ``limit_concurrency`` does not help: it answers 503 once headers are
complete, which stalled ones never are. So each connection here has

    a header deadline   its request headers must be complete `header_seconds` after it
                        opened, or after its previous response ended (bytes that trickle
                        in do not move it); else it is closed
    a place under a cap at most `max_connections` are open: one more closes the
                        connection that has waited longest for its headers (a stalled one
                        goes before any honest request, which is being served), or itself
                        when every other one is being served

A request's body is bounded by the app (`fedclient.server.app`: 408 after 30 s without a
byte); a TLS handshake by asyncio (60 s). `configure` sets both limits, in the server
process and in each worker (`fedclient.server.cli`); uvicorn is told to use `protocol()`.
"""

from __future__ import annotations

import asyncio
import logging
import resource
from dataclasses import dataclass
from typing import Any

__all__ = [
    "HEADER_SECONDS",
    "ConnectionLimits",
    "configure",
    "default_max_connections",
    "protocol",
]

#: Seconds a connection has to send complete request headers (nginx: 60; hyper: 30).
HEADER_SECONDS = 30.0

#: Descriptors kept for the server's own files (database, WAL, update bodies, logs).
RESERVED_DESCRIPTORS = 64

logger = logging.getLogger("fedserver")


def default_max_connections() -> int:
    """Half of the descriptors the process may open beyond `RESERVED_DESCRIPTORS` (at
    least 16): the other half absorbs a burst of connections accepted at once, before
    the cap closes the surplus, so the server's own files can always be opened."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 16
    return max(16, (soft - RESERVED_DESCRIPTORS) // 2)


@dataclass(frozen=True)
class ConnectionLimits:
    """The header deadline and the connection cap (see the module docstring)."""

    header_seconds: float = HEADER_SECONDS
    max_connections: int = 0  # 0: `default_max_connections`

    def cap(self) -> int:
        """The cap in force (`max_connections`, or the default for this process)."""
        return self.max_connections or default_max_connections()


_limits = ConnectionLimits()


def configure(limits: ConnectionLimits) -> None:
    """Use ``limits`` for the connections this process accepts from now on."""
    global _limits
    _limits = limits


class _Guard:
    """The deadline and the cap, on top of one of uvicorn's HTTP protocols (its
    ``cycle``, the request being served, changes when a request's headers are complete;
    ``on_response_complete`` runs when its answer is sent)."""

    transport: asyncio.Transport
    connections: set[Any]
    cycle: Any
    loop: asyncio.AbstractEventLoop

    def _arm(self) -> None:
        """Wait for the next request's headers, for `header_seconds` at most."""
        self._disarm()
        self.waiting_since: float | None = self.loop.time()
        self._deadline: asyncio.TimerHandle | None = self.loop.call_later(
            _limits.header_seconds, self._stalled
        )

    def _disarm(self) -> None:
        self.waiting_since = None
        deadline = getattr(self, "_deadline", None)
        if deadline is not None:
            deadline.cancel()
            self._deadline = None

    def _stalled(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.close()

    def _admit(self) -> None:
        """Over the cap: close whoever has waited longest for its headers (maybe this
        new connection itself)."""
        if len(self.connections) <= _limits.cap():
            return
        waiting = [c for c in self.connections if getattr(c, "waiting_since", None) is not None]
        victim = min(waiting, key=lambda c: c.waiting_since, default=self)
        victim._disarm()
        victim.transport.close()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._arm()
        self._admit()

    def data_received(self, data: bytes) -> None:
        before = self.cycle
        super().data_received(data)  # type: ignore[misc]
        if self.cycle is not before:  # a request's headers are complete: it is served
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        served = self.cycle is not None and not self.cycle.response_complete
        if not self.transport.is_closing() and not served:
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)  # type: ignore[misc]


def protocol() -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol (httptools where installed, else h11), guarded."""
    try:
        import httptools  # noqa: F401
    except ImportError:  # pragma: no cover - the server extra installs httptools
        return GuardedH11
    return GuardedHttpTools


try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class GuardedHttpTools(_Guard, HttpToolsProtocol):
        """uvicorn's httptools protocol with a header deadline and a connection cap."""

except ImportError:  # pragma: no cover - without httptools
    pass

from uvicorn.protocols.http.h11_impl import H11Protocol  # noqa: E402


class GuardedH11(_Guard, H11Protocol):
    """uvicorn's h11 protocol with a header deadline and a connection cap."""
