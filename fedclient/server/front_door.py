"""The check-in front door: a "not now" answered before the web framework (issue 27).

Nearly every check-in of a large fleet is turned away (the round is full, the job
paused or finished), and `FederationService.turned_away` answers those from a worker's
recent view of the job without touching the database. What was left was the web
framework around it: routing, middleware and request objects cost several times the
answer itself. This ASGI layer, outermost in `fedclient.server.app.create_app`,
recognises ``POST /v1/jobs/{job}/checkin`` by its path, reads the small body (a first
contact that enrols goes on), asks `FederationService.turned_away`, and sends the
answer itself; everything else (an admission, an error, a stalled or large body) goes
on to the app unchanged, with the body read so far handed on as it came. An error of
`FederationService.turned_away` (the database away: 503; a stranger where status is
private: 401) is answered here as the app would: the request is not sent on to wait
for the pool's connection a second time.

Rate limits and the request metrics count these answers as the app would.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec

from fedclient._exceptions import ApiError
from fedclient.protocol import CHECKIN, MSGPACK_MEDIA_TYPE, CheckinRequest, RetryLater
from fedclient.server.auth import bearer_token, hash_token
from fedclient.server.limits import RateLimiter
from fedclient.server.service import FederationService

__all__ = ["CheckinFrontDoor"]

_PREFIX, _SUFFIX = "/v1/jobs/", "/checkin"
assert CHECKIN.path == _PREFIX + "{job}" + _SUFFIX, CHECKIN.path


class CheckinFrontDoor:
    """ASGI middleware: answer turned-away check-ins without the app (see the module)."""

    def __init__(
        self,
        app: Any,
        service: FederationService,
        *,
        body_limit: int,
        body_idle_seconds: float | None,
        limiter: RateLimiter | None = None,
        render_error: Any = None,
    ) -> None:
        """``render_error``: an `ApiError` as the app's answer to it (an ASGI response)."""
        self.app = app
        self.service = service
        self.body_limit = body_limit
        self.body_idle_seconds = body_idle_seconds
        self.limiter = limiter
        self.render_error = render_error

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not (
            scope.get("method") == "POST" and path.startswith(_PREFIX) and path.endswith(_SUFFIX)
        ):
            await self.app(scope, receive, send)
            return
        job = path[len(_PREFIX) : -len(_SUFFIX)]
        first = await self._first_message(receive)
        if (
            first is not None
            and first["type"] == "http.request"
            and not first.get("more_body", False)
            and "/" not in job
        ):
            started = time.perf_counter()
            try:
                answer = await self._turned_away(scope, job, first.get("body", b""))
            except ApiError as exc:  # the database away (503), a stranger (401)
                if self.render_error is None:
                    raise
                await self.render_error(exc)(scope, receive, send)
                return
            if answer is not None:
                await self._send(scope, send, answer, started)
                return
        await self.app(scope, _replaying(first, receive), send)

    async def _first_message(self, receive: Any) -> dict[str, Any] | None:
        """The first body message, or None if it does not come within the body's idle
        time (the app then waits for it, and answers 408)."""
        if self.body_idle_seconds is None:
            return await receive()  # type: ignore[no-any-return]
        try:
            async with asyncio.timeout(self.body_idle_seconds):
                return await receive()  # type: ignore[no-any-return]
        except TimeoutError:
            return None

    async def _turned_away(self, scope: Any, job: str, body: bytes) -> RetryLater | Any | None:
        if len(body) > self.body_limit:
            return None
        try:
            request = msgspec.json.decode(body or b"{}", type=CheckinRequest)
            if request.enrol_label is not None:
                return None  # a first contact enrols: the app does it
            header = first_header(scope, b"authorization")
            token = bearer_token(header.decode("latin-1") if header is not None else None)
            if self.limiter is not None:
                client = scope.get("client")
                self.limiter.hit("checkin_per_address", client[0] if client else "unknown")
                self.limiter.hit("checkin_per_device", hash_token(token))
        except Exception:  # a bad body or token, a limit...
            return None  # ...the app answers it as it always has
        await self.service.store.db.settled()  # not while a group commit is in flight
        return self.service.turned_away(token, job)

    async def _send(self, scope: Any, send: Any, answer: Any, started: float) -> None:
        accept = first_header(scope, b"accept") or b""
        if MSGPACK_MEDIA_TYPE.encode() in accept:
            body, media = msgspec.msgpack.encode(answer), MSGPACK_MEDIA_TYPE
        else:
            body, media = msgspec.json.encode(answer), "application/json"
        headers = [(b"content-type", media.encode()), (b"content-length", b"%d" % len(body))]
        if isinstance(answer, RetryLater):
            headers.append((b"retry-after", b"%d" % max(1, round(answer.retry_after))))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        metrics = self.service.metrics
        if metrics is not None:
            metrics.requests.labels(CHECKIN.path, "200").inc()
            metrics.latency.labels(CHECKIN.path).observe(time.perf_counter() - started)


def first_header(scope: Any, name: bytes) -> bytes | None:
    """The first value of a request header (``name`` in lower case), or None."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return value  # type: ignore[no-any-return]
    return None


def _replaying(first: dict[str, Any] | None, receive: Any) -> Any:
    """``receive``, with ``first`` (a message already taken from it) handed out first."""
    if first is None:
        return receive
    pending = [first]

    async def replay() -> Any:
        if pending:
            return pending.pop()
        return await receive()

    return replay
