"""The check-in front door: a "not now" answered before the web framework (issue 27).

Nearly every check-in of a large fleet is turned away (the round is full, the job
paused or finished), and `FederationService.turned_away` answers those from a worker's
recent view of the job without touching the database. What was left was the web
framework around it: routing, middleware and request objects cost several times the
answer itself. This ASGI layer, outermost in `fedclient.server.app.create_app` (before
even Starlette's error middleware), recognises ``POST /v1/jobs/{job}/checkin`` by its
path, reads the small body (a first contact that enrols goes on), asks
`FederationService.turned_away`, and sends the answer itself; everything else (an
admission, an error, a stalled or large body) goes on to the app unchanged, with the
body read so far handed on as it came. An `ApiError` of
`FederationService.turned_away` (the database away: 503; a stranger where status is
private: 401) is answered here as the app would: the request is not sent on to wait
for the pool's connection a second time. Any other error sends the request on: the app
answers it as it answers every check-in (a SQLite file that is busy: 503).

What an answer costs here is what the answer needs (the token's hash, the job's
snapshot, the spread, one encoding) and two ASGI messages: the body that came with
the headers is taken without a timer, the headers of the answer are built once, and
the metrics' labelled series are looked up once.

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

#: Bodies of a check-in that ask nothing but a place (what devices send nearly always).
_PLAIN_BODIES = (b"{}", b"")
_MSGPACK = MSGPACK_MEDIA_TYPE.encode()
_JSON_TYPE = (b"content-type", b"application/json")
_MSGPACK_TYPE = (b"content-type", _MSGPACK)


class CheckinFrontDoor:
    """ASGI app: answer turned-away check-ins without ``app`` (see the module)."""

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
        #: A SQLite file's group commit may be in flight (`Database.settled`); a shared
        #: database commits each request by itself.
        self.settles = not service.store.db.shared
        self._counted: Any = None  # the `Metrics` whose series `_series` holds
        self._series: tuple[Any, Any] | None = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not (path.endswith(_SUFFIX) and path.startswith(_PREFIX) and scope["method"] == "POST"):
            await self.app(scope, receive, send)
            return
        job = path[len(_PREFIX) : -len(_SUFFIX)]
        # A check-in's body nearly always comes with its headers: then it is taken at
        # once, without a timer (`_step`). Else the attempt, which now waits for it,
        # goes on waiting within the body's idle time (resumed, not dropped: a receive
        # that was given up may have taken part of the body with it).
        arrived, first = _step(receive())
        if not arrived:
            first = await self._first_message(first)
        if (
            first is not None
            and first["type"] == "http.request"
            and not first.get("more_body", False)
            and "/" not in job
        ):
            started = time.perf_counter()
            if self.settles:  # not while a group commit is in flight
                await self.service.store.db.settled()
            try:
                answer = self._turned_away(scope, job, first.get("body", b""))
            except ApiError as exc:  # the database away (503), a stranger (401)
                if self.render_error is None:
                    raise
                await self.render_error(exc)(scope, receive, send)
                return
            if answer is not None:
                await self._send(answer, send, started)
                return
        await self.app(scope, _replaying(first, receive), send)

    async def _first_message(self, attempt: Any) -> dict[str, Any] | None:
        """The first body message (``attempt``: the receive that waits for it), or None
        if it does not come within the body's idle time (the app then waits for it, and
        answers 408)."""
        if self.body_idle_seconds is None:
            return await attempt  # type: ignore[no-any-return]
        try:
            async with asyncio.timeout(self.body_idle_seconds):
                return await attempt  # type: ignore[no-any-return]
        except TimeoutError:
            return None

    def _turned_away(self, scope: Any, job: str, body: bytes) -> Any:
        """(answer, packed) for a check-in turned away; None to send it on."""
        if len(body) > self.body_limit:
            return None
        try:
            if body not in _PLAIN_BODIES:
                request = msgspec.json.decode(body, type=CheckinRequest)
                if request.enrol_label is not None:
                    return None  # a first contact enrols: the app does it
            header = accept = None  # the first of each, as the app reads them
            for key, value in scope["headers"]:
                if key == b"authorization":
                    if header is None:
                        header = value
                elif key == b"accept" and accept is None:
                    accept = value
            token = bearer_token(header.decode("latin-1") if header is not None else None)
            if self.limiter is not None:
                client = scope.get("client")
                self.limiter.hit("checkin_per_address", client[0] if client else "unknown")
                self.limiter.hit("checkin_per_device", hash_token(token))
        except Exception:  # a bad body or token, a limit...
            return None  # ...the app answers it as it always has
        try:
            answer = self.service.turned_away(token, job)
        except ApiError:
            raise
        except Exception:  # e.g. a SQLite file busy: the app answers it as it does
            return None
        return None if answer is None else (answer, accept is not None and _MSGPACK in accept)

    async def _send(self, turned_away: Any, send: Any, started: float) -> None:
        answer, packed = turned_away
        if packed:
            body, media = msgspec.msgpack.encode(answer), _MSGPACK_TYPE
        else:
            body, media = msgspec.json.encode(answer), _JSON_TYPE
        headers = [media, (b"content-length", b"%d" % len(body))]
        if isinstance(answer, RetryLater):
            headers.append((b"retry-after", b"%d" % max(1, round(answer.retry_after))))
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        metrics = self.service.metrics
        if metrics is not None:
            if metrics is not self._counted:  # each labelled series looked up once
                self._counted = metrics
                self._series = (
                    metrics.requests.labels(CHECKIN.path, "200"),
                    metrics.latency.labels(CHECKIN.path),
                )
            assert self._series is not None
            requests, latency = self._series
            requests.inc()
            latency.observe(time.perf_counter() - started)


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


def _step(attempt: Any) -> tuple[bool, Any]:
    """Run ``attempt`` (what a receive returned) until it would wait: (True, its result)
    if it did not have to, else (False, an awaitable that goes on from there)."""
    if not hasattr(attempt, "send"):  # not a coroutine: awaited as it is
        return False, attempt
    try:
        waiting_on = attempt.send(None)
    except StopIteration as arrived:
        return True, arrived.value
    return False, _Resumed(attempt, waiting_on)


class _Resumed:
    """A coroutine stepped by hand until it waited on ``waiting_on``, awaited again:
    the task waits on what it waits on and drives the rest, as ``await`` would have
    (a cancellation goes into it)."""

    def __init__(self, coroutine: Any, waiting_on: Any) -> None:
        self.coroutine = coroutine
        self.waiting_on = waiting_on

    def __await__(self) -> Any:
        coroutine, waiting_on = self.coroutine, self.waiting_on
        while True:
            try:
                yield waiting_on
            except BaseException as exc:  # thrown into the task: into the coroutine
                try:
                    waiting_on = coroutine.throw(exc)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    waiting_on = coroutine.send(None)
                except StopIteration as done:
                    return done.value
