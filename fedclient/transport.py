"""The network path: a seeded retry policy, and a fault-injecting httpx transport.

`RetryPolicy` decides *whether* and *when* to retry; the client's drivers
sleep (or, in the simulator, schedule) accordingly. Only failures that can
succeed on a second try are retried: connect errors, read timeouts, a
connection dropped mid-exchange, and HTTP 408, 429, 502, 503, 504. Everything else
is raised at once as a typed error.

Why not tenacity or stamina: their jitter draws from the global `random`
module, so a simulation could not be reproduced from its seed, and the
simulator must *schedule* retries on its simulated clock rather than sleep.
The policy itself is a dozen lines.

`raise_for_error` turns an error answer into the typed `fedclient.ApiError` its body
names (the one mapping of the SDK), and `ssl_context` what a device's ``verify``
setting means to httpx.

`FaultyTransport` wraps any httpx transport (sync or async) and, from a seed,
injects the faults real phones see: requests dropped before or after the
server handled them, 5xx answers, timeouts, connections reset part-way through
a body, and duplicated requests. Tests and ``fedsim --faults`` use it.
"""

from __future__ import annotations

import random
import ssl
from collections.abc import AsyncIterator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import msgspec

from fedclient._exceptions import InvalidInput, error_from_status
from fedclient.protocol import ErrorBody

__all__ = [
    "FaultCounts",
    "FaultPlan",
    "FaultyTransport",
    "RetryPolicy",
    "error_code",
    "is_retriable_status",
    "raise_for_error",
    "retry_after",
    "ssl_context",
]

RETRIABLE_STATUS = frozenset({408, 429, 502, 503, 504})


def is_retriable_status(status: int) -> bool:
    """Whether an HTTP status is worth retrying."""
    return status in RETRIABLE_STATUS


@dataclass
class RetryPolicy:
    """Exponential backoff with full jitter, bounded in attempts and in total time.

    The n-th retry waits ``uniform(0, min(cap, base * 2**n))`` seconds, or the
    server's ``Retry-After`` if that is longer. ``seed`` makes the jitter
    reproducible; leave it None on real devices (a fleet must not retry in step).
    """

    max_attempts: int = 6
    base_seconds: float = 0.5
    cap_seconds: float = 30.0
    max_total_seconds: float = 120.0
    seed: int | None = None
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.base_seconds < 0 or self.cap_seconds < 0:
            raise InvalidInput("retry policy needs max_attempts >= 1 and non-negative waits")
        self._rng = random.Random(self.seed)

    def delay(self, attempt: int, waited: float, retry_after: float | None = None) -> float | None:
        """Seconds to wait before attempt ``attempt + 1`` (attempts count from 1), or None
        to give up. ``waited`` is the backoff already spent on this request."""
        if attempt >= self.max_attempts:
            return None
        wait = self._rng.uniform(0.0, min(self.cap_seconds, self.base_seconds * 2 ** (attempt - 1)))
        if retry_after is not None:
            wait = max(wait, retry_after)
        if waited + wait > self.max_total_seconds:
            return None
        return wait


@dataclass(frozen=True)
class FaultPlan:
    """Probabilities of each fault per request (their sum must not exceed 1).

    ``drop``      connection fails before the server sees the request
    ``lost``      the server handles the request, the answer never arrives
    ``error``     a proxy answers 502/503 without reaching the server
    ``timeout``   the server handles the request, the client times out waiting
    ``reset``     the connection resets part-way through the request or answer body
    ``duplicate`` the request reaches the server twice (a retrying middlebox)
    ``reset_every`` reset the link each time this many body bytes crossed it (0: never)
    """

    drop: float = 0.0
    lost: float = 0.0
    error: float = 0.0
    timeout: float = 0.0
    reset: float = 0.0
    duplicate: float = 0.0
    reset_every: int = 0

    KINDS = ("drop", "lost", "error", "timeout", "reset", "duplicate")

    @classmethod
    def parse(cls, text: str) -> FaultPlan:
        """``"drop=0.3,reset=0.05"``; ``"drop=0.3"`` alone spreads 0.3 over every kind."""
        values: dict[str, float] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, _, raw = item.partition("=")
            if name not in (*cls.KINDS, "reset_every", "all"):
                raise InvalidInput(
                    f"unknown fault {name!r}; use {', '.join(cls.KINDS)}, reset_every or all"
                )
            try:
                values[name] = float(raw)
            except ValueError:
                raise InvalidInput(f"fault {name!r} needs a number, got {raw!r}") from None
        if set(values) in ({"drop"}, {"all"}):
            # One figure for "requests that fail": every way of failing, in equal parts.
            share = values.pop("drop", values.pop("all", 0.0)) / len(cls.KINDS)
            values = dict.fromkeys(cls.KINDS, share)
        reset_every = int(values.pop("reset_every", 0))
        plan = cls(**values, reset_every=reset_every)
        if sum(getattr(plan, k) for k in cls.KINDS) > 1.0 or any(
            getattr(plan, k) < 0 for k in cls.KINDS
        ):
            raise InvalidInput("fault probabilities must be >= 0 and add up to at most 1")
        return plan

    def as_dict(self) -> dict[str, float]:
        """The plan as plain data (for reports)."""
        return {k: getattr(self, k) for k in (*self.KINDS, "reset_every")}


@dataclass
class FaultCounts:
    """What a `FaultyTransport` did, and the bytes it wasted."""

    requests: int = 0
    injected: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FaultPlan.KINDS, 0))
    wasted_bytes: int = 0
    bytes_sent: int = 0  # request body bytes that crossed the link, whole or cut
    bytes_received: int = 0  # response body bytes that crossed the link, whole or cut


class FaultyTransport(httpx.BaseTransport, httpx.AsyncBaseTransport):
    """Wrap ``inner`` (sync or async) and inject faults drawn from ``seed``."""

    def __init__(
        self,
        inner: httpx.BaseTransport | httpx.AsyncBaseTransport,
        plan: FaultPlan,
        *,
        seed: int | None = None,
    ) -> None:
        self.inner = inner
        self.plan = plan
        self.counts = FaultCounts()
        self._rng = random.Random(seed)
        self._link_bytes = 0  # body bytes since the last periodic reset

    # -- the decision, shared by both I/O paths --------------------------------
    def _pick(self) -> str | None:
        self.counts.requests += 1
        roll = self._rng.random()
        for kind in FaultPlan.KINDS:
            p = getattr(self.plan, kind)
            if roll < p:
                self.counts.injected[kind] += 1
                return kind
            roll -= p
        return None

    def _cut(self, size: int) -> int | None:
        """Where a body of ``size`` bytes is cut by the periodic reset, if it is."""
        if not self.plan.reset_every:
            return None
        room = self.plan.reset_every - self._link_bytes
        if size < room:
            self._link_bytes += size
            return None
        self._link_bytes = 0
        return room

    def _request_fault(self, request: httpx.Request, kind: str | None) -> None:
        body = len(request.content)
        if kind == "drop":
            raise httpx.ConnectError("injected: connection refused", request=request)
        cut = self._cut(body)
        if kind == "reset" and body and self._rng.random() < 0.5:
            cut = self._rng.randrange(body)
        if cut is not None:
            self.counts.wasted_bytes += cut
            self.counts.bytes_sent += cut
            raise httpx.WriteError("injected: connection reset while sending", request=request)
        self.counts.bytes_sent += body

    def _error_response(self, request: httpx.Request) -> httpx.Response:
        status = self._rng.choice([502, 503])
        return httpx.Response(
            status,
            json={"error": {"code": "server_error", "message": "injected: bad gateway"}},
            request=request,
        )

    def _after(
        self,
        request: httpx.Request,
        kind: str | None,
        content: bytes,
        status: int,
        headers: Mapping[str, str],
    ) -> httpx.Response:
        if kind == "lost":
            self.counts.wasted_bytes += len(content)
            self.counts.bytes_received += len(content)
            raise httpx.ReadError("injected: connection lost before the answer", request=request)
        if kind == "timeout":
            raise httpx.ReadTimeout("injected: timed out waiting for the answer", request=request)
        cut = self._cut(len(content))
        if kind == "reset" and content:
            cut = self._rng.randrange(len(content))
        if cut is not None:
            self.counts.bytes_received += cut
            return httpx.Response(
                status,
                headers=headers,
                request=request,
                stream=_BrokenStream(content[:cut], self.counts),
            )
        self.counts.bytes_received += len(content)
        return httpx.Response(status, headers=headers, content=content, request=request)

    # -- I/O -------------------------------------------------------------------
    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(self.inner, httpx.BaseTransport), "inner transport is async-only"
        kind = self._pick()
        request.read()
        self._request_fault(request, kind)
        if kind == "error":
            return self._error_response(request)
        if kind == "duplicate":
            self.inner.handle_request(request).read()
        response = self.inner.handle_request(request)
        content = response.read()
        return self._after(request, kind, content, response.status_code, response.headers)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(self.inner, httpx.AsyncBaseTransport), "inner transport is sync-only"
        kind = self._pick()
        await request.aread()
        self._request_fault(request, kind)
        if kind == "error":
            return self._error_response(request)
        if kind == "duplicate":
            await (await self.inner.handle_async_request(request)).aread()
        response = await self.inner.handle_async_request(request)
        content = await response.aread()
        return self._after(request, kind, content, response.status_code, response.headers)

    def close(self) -> None:
        if isinstance(self.inner, httpx.BaseTransport):
            self.inner.close()

    async def aclose(self) -> None:
        if isinstance(self.inner, httpx.AsyncBaseTransport):
            await self.inner.aclose()


class _BrokenStream(httpx.SyncByteStream, httpx.AsyncByteStream):
    """A response body that delivers a prefix, then fails like a reset connection."""

    def __init__(self, prefix: bytes, counts: FaultCounts) -> None:
        self.prefix = prefix
        self.counts = counts

    def __iter__(self) -> Iterator[bytes]:
        self.counts.wasted_bytes += len(self.prefix)  # unless a resuming client keeps it
        if self.prefix:
            yield self.prefix
        raise httpx.RemoteProtocolError("injected: connection reset while receiving")

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.counts.wasted_bytes += len(self.prefix)
        if self.prefix:
            yield self.prefix
        raise httpx.RemoteProtocolError("injected: connection reset while receiving")


def ssl_context(verify: str | Path | bool | ssl.SSLContext) -> bool | ssl.SSLContext:
    """What httpx takes for ``verify``: a CA bundle's path (a file, or a folder of
    hashed certificates) becomes a context trusting it."""
    if isinstance(verify, (str, Path)):
        where = Path(verify)
        if where.is_dir():
            return ssl.create_default_context(capath=str(where))
        if not where.is_file():
            raise InvalidInput(f"verify: no CA bundle at {where}")
        return ssl.create_default_context(cafile=str(where))
    return verify


def error_code(response: httpx.Response) -> str | None:
    """The ``code`` of an error answer's JSON body, if it has one."""
    try:
        return msgspec.json.decode(response.content, type=ErrorBody).error.code
    except msgspec.DecodeError:
        return None


def raise_for_error(response: httpx.Response) -> None:
    """Turn an HTTP error answer into the `ApiError` subclass its JSON body names."""
    if response.status_code < 400:
        return
    code, message = None, response.text[:200]
    try:
        body = msgspec.json.decode(response.content, type=ErrorBody)
        code, message = body.error.code, body.error.message
    except msgspec.DecodeError:
        pass
    if response.status_code == 404 and (code is None or message.startswith("no route")):
        # No route at that path (a proxy's 404, or fedserver's): the URL is wrong.
        try:
            where = f"{response.request.method} {response.request.url}: "
        except RuntimeError:  # a response made by hand, without its request
            where = ""
        message = (
            f"{where}{message or 'Not Found'}; give fedclient the server's root URL "
            "(https://host[:port]) and the job's name, or the job's URL "
            "(https://host[:port]/v1/jobs/NAME)"
        )
    error = error_from_status(response.status_code, code, message)
    error.retry_after = retry_after(response)
    raise error


def retry_after(response: httpx.Response) -> float | None:
    """The seconds a ``Retry-After`` header asks for, if it gives a number of them."""
    header = response.headers.get("Retry-After", "")
    return float(header) if header.replace(".", "", 1).isdigit() else None
