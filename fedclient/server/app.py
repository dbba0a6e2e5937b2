"""The ASGI app: thin routes that decode, call a `FederationService` handler, and encode.

Errors are mapped to HTTP in one place (`_api_error`): every `ApiError` carries
its status and code, and the body is always ``{"error": {"code", "message"}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from starlette.applications import Starlette
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from fedclient import __version__
from fedclient._exceptions import (
    ApiError,
    BodyTimeout,
    InvalidRequest,
    NotFound,
    PayloadTooLarge,
    RangeNotSatisfiable,
    ServiceUnavailable,
)
from fedclient.protocol import (
    ADMIN_CODES,
    ADMIN_CREATE_JOB,
    ADMIN_DEVICES,
    ADMIN_JOB_ACTION,
    ADMIN_REVOKE,
    ADMIN_ROUNDS,
    BROADCAST,
    CHECKIN,
    DEVICE_ID_HEADER,
    ENROL,
    EVALUATION,
    HEALTH,
    IDEMPOTENCY_HEADER,
    JOB_ACTIONS,
    JOB_STATUS,
    LEAVE,
    MAX_ID,
    METRICS,
    MODEL,
    MSGPACK_MEDIA_TYPE,
    OPENAPI,
    READY,
    ROUND_STATUS,
    SECAGG_FETCH,
    SECAGG_POST,
    TENSOR_MEDIA_TYPE,
    UPLOAD,
    UPLOAD_CHUNK,
    UPLOAD_START,
    UPLOAD_STATUS,
    CheckinRequest,
    EnrolmentCodes,
    EnrolRequest,
    EvaluationReport,
    IssueCodes,
    JobPlan,
    RetryLater,
    UploadStart,
    openapi_document,
    parse_id,
)
from fedclient.protocol import Route as ApiRoute
from fedclient.server.auth import bearer_token, hash_token
from fedclient.server.front_door import CheckinFrontDoor
from fedclient.server.limits import RateLimiter, RateLimits
from fedclient.server.service import FederationService

__all__ = ["JSON_LIMIT", "create_app"]

#: A request body that stalls this long (no byte arrives) is refused with 408.
BODY_IDLE_SECONDS = 30.0

#: The largest JSON body a route reads (enrolment, check-in, upload start): they are a
#: few hundred bytes; anything larger is refused before it is held in memory.
JSON_LIMIT = 64 * 1024

T = TypeVar("T")
logger = logging.getLogger("fedserver")
Endpoint = Callable[[Request], Awaitable[Response]]


def create_app(
    service: FederationService,
    *,
    tick_seconds: float | None = None,
    metrics: bool = True,
    rate_limits: RateLimits | None = None,
    body_idle_seconds: float | None = BODY_IDLE_SECONDS,
) -> Starlette:
    """The server as an ASGI app. ``tick_seconds`` starts a timer that closes rounds at
    their deadlines; leave it None when something else calls ``service.tick()``
    (the simulator, on its simulated clock). ``metrics`` serves Prometheus text at
    ``/metrics`` and counts every request (`fedclient.server.metrics`); a simulation,
    which measures itself, turns it off. ``rate_limits`` answers floods of
    enrolments, check-ins and uploads with 429 (`fedclient.server.limits`).
    ``body_idle_seconds``: a body that stalls this long is a 408 (None: never, for an
    in-process server, whose bodies cannot stall)."""
    limiter = RateLimiter(rate_limits) if rate_limits is not None else None

    def limit(request: Request, kind: str, token: str | None = None) -> None:
        if limiter is None:
            return
        address = request.client.host if request.client else "unknown"
        if kind == "enrol":
            limiter.hit("enrol", address)
            return
        limiter.hit(f"{kind}_per_address", address)
        if token is not None:  # counted by the token's hash: no raw token kept around
            limiter.hit(f"{kind}_per_device", hash_token(token))

    async def enrol(request: Request) -> Response:
        limit(request, "enrol")
        body = _decode(await _read_limited(request, JSON_LIMIT), EnrolRequest)
        return _json(service.enrol(body))

    async def checkin(request: Request) -> Response:
        token = bearer_token(request.headers.get("authorization"))
        limit(request, "checkin", token)
        body = _decode(await _read_limited(request, JSON_LIMIT) or b"{}", CheckinRequest)
        headers = {}
        if body.enrol_label is not None:  # a first contact: enrol the proposed token
            limit(request, "enrol")
            # Validated as a POST /v1/devices body is (label length, token form).
            request_ = _convert(
                {
                    "label": body.enrol_label,
                    "token": token,
                    "credential": body.enrol_credential,
                    "identity_key": body.identity_key,
                    "identity_certificate": body.identity_certificate,
                },
                EnrolRequest,
            )
            enrolled = service.enrol(request_)
            headers[DEVICE_ID_HEADER] = enrolled.device_id
        packed = MSGPACK_MEDIA_TYPE in request.headers.get("accept", "")
        answer = service.checkin(token, request.path_params["job"], body, inline=packed)
        if isinstance(answer, RetryLater):  # for proxies and plain HTTP clients too
            headers["Retry-After"] = str(max(1, round(answer.retry_after)))
        if packed:
            encoded = msgspec.msgpack.encode(answer)
            return Response(encoded, media_type=MSGPACK_MEDIA_TYPE, headers=headers)
        return _json(answer, headers)

    async def model(request: Request) -> Response:
        token = bearer_token(request.headers.get("authorization"))
        version = _int_param(request, "version")
        body, etag = service.model(token, request.path_params["job"], version)
        headers = {
            "ETag": etag,
            "Cache-Control": "private, max-age=31536000, immutable",
            "Accept-Ranges": "bytes",
        }
        if _none_match(request.headers.get("if-none-match"), etag):
            return Response(status_code=304, headers=headers)
        wanted = request.headers.get("range")
        if wanted and request.headers.get("if-range", etag) == etag:
            start, end = _byte_range(wanted, len(body))
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(body)}"
            return Response(
                body[start:end], status_code=206, media_type=TENSOR_MEDIA_TYPE, headers=headers
            )
        return Response(body, media_type=TENSOR_MEDIA_TYPE, headers=headers)

    async def broadcast(request: Request) -> Response:
        token = bearer_token(request.headers.get("authorization"))
        version = _int_param(request, "version")
        body = service.broadcast(token, request.path_params["job"], version)
        return Response(body, media_type=TENSOR_MEDIA_TYPE)

    async def upload(request: Request) -> Response:
        token = bearer_token(request.headers.get("authorization"))
        limit(request, "upload", token)
        round_id = _int_param(request, "round_id")
        key = request.headers.get(IDEMPOTENCY_HEADER)
        # Strangers are refused before their body is read (with the round's state, in
        # the same read on a shared database).
        device_id, state = service.uploads.before_body(token, round_id, key)
        body = await _read_limited(request, service.uploads.upload_limit(round_id))
        await database.settled()  # a commit may have begun while it arrived
        receipt = service.uploads.upload(
            token, round_id, key, body, device_id=device_id, state=state
        )
        recount = service.uploads.recount()
        if recount:  # near its quota, taken in a group: counted again once committed
            await database.flush()
            for taken_in in recount:
                service.uploads.quota_after_commit(taken_in)
        return _json(receipt)

    async def upload_start(request: Request) -> Response:
        token = bearer_token(request.headers.get("authorization"))
        limit(request, "upload", token)
        round_id = _int_param(request, "round_id")
        body = _decode(await _read_limited(request, JSON_LIMIT), UploadStart)
        key = request.headers.get(IDEMPOTENCY_HEADER)
        return _json(service.uploads.start_upload(token, round_id, key, body))

    async def upload_chunk(request: Request) -> Response:
        token = bearer_token(request.headers.get("authorization"))
        round_id = _int_param(request, "round_id")
        service.authenticate(token)  # reject strangers before reading their body
        chunk = await _read_limited(request, service.uploads.upload_limit(round_id))
        await database.settled()  # a commit may have begun while it arrived
        session = service.uploads.upload_chunk(
            token,
            round_id,
            request.path_params["upload_id"],
            request.headers.get("upload-offset"),
            chunk,
        )
        return _json(session)

    async def upload_status(request: Request) -> Response:
        token = bearer_token(request.headers.get("authorization"))
        round_id = _int_param(request, "round_id")
        return _json(
            service.uploads.upload_status(token, round_id, request.path_params["upload_id"])
        )

    async def leave(request: Request) -> Response:
        token = bearer_token(request.headers.get("authorization"))
        left = service.leave(token, _int_param(request, "round_id"))
        return JSONResponse({"left": left})

    async def evaluation(request: Request) -> Response:
        token = bearer_token(request.headers.get("authorization"))
        limit(request, "upload", token)
        report = _decode(await _read_limited(request, JSON_LIMIT), EvaluationReport)
        service.report_evaluation(token, _int_param(request, "round_id"), report)
        return JSONResponse({"accepted": True})

    async def secagg_post(request: Request) -> Response:
        token = bearer_token(request.headers.get("authorization"))
        round_id = _int_param(request, "round_id")
        service.authenticate(token)
        body = await _read_limited(request, service.uploads.upload_limit(round_id))
        await database.settled()  # a commit may have begun while it arrived
        receipt = service.secagg_post(token, round_id, request.path_params["stage"], body)
        return _json(receipt) if receipt is not None else JSONResponse({"accepted": True})

    async def secagg_fetch(request: Request) -> Response:
        token = bearer_token(request.headers.get("authorization"))
        round_id = _int_param(request, "round_id")
        body = service.secagg_fetch(token, round_id, request.path_params["stage"])
        return Response(body, media_type="application/msgpack")

    def reader(request: Request) -> None:
        header = request.headers.get("authorization")
        service.operator.authenticate_reader(bearer_token(header) if header else None)

    async def job_status(request: Request) -> Response:
        reader(request)
        return _json(service.job_status(request.path_params["job"]))

    async def round_status(request: Request) -> Response:
        reader(request)
        number = _int_param(request, "number")
        return _json(service.round_status(request.path_params["job"], number))

    def admin(request: Request) -> None:
        service.operator.authenticate_admin(bearer_token(request.headers.get("authorization")))

    async def admin_create_job(request: Request) -> Response:
        admin(request)
        plan = _decode(await _read_limited(request, JSON_LIMIT), JobPlan)
        return _json(service.operator.create_job(plan))

    async def admin_job_action(request: Request) -> Response:
        admin(request)
        params = request.path_params
        return _json(service.operator.set_job_status(params["job"], params["action"]))

    async def admin_rounds(request: Request) -> Response:
        admin(request)
        return _json(service.operator.round_history(request.path_params["job"]))

    async def admin_devices(request: Request) -> Response:
        admin(request)
        return _json(service.operator.participation(request.path_params["job"]))

    async def admin_revoke(request: Request) -> Response:
        admin(request)
        service.operator.revoke(request.path_params["device"])
        return JSONResponse({"revoked": request.path_params["device"]})

    async def admin_codes(request: Request) -> Response:
        admin(request)
        body = _decode(await _read_limited(request, JSON_LIMIT) or b"{}", IssueCodes)
        return _json(EnrolmentCodes(service.operator.issue_codes(body.count)))

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "version": __version__})

    async def ready(request: Request) -> Response:
        if not service.store.db.ready():
            raise ServiceUnavailable(
                "the database does not answer; the server reconnects by itself",
                retry_after=READY_RETRY_SECONDS,
            )
        return JSONResponse({"status": "ready"})

    document: dict[str, Any] = {}  # built by the first request for it (~4 ms of schemas)

    async def openapi(request: Request) -> Response:
        if not document:
            document.update(openapi_document(__version__))
        return JSONResponse(document)

    # Starlette tries the routes in order: the two every device-round takes come first.
    handlers: dict[ApiRoute, Endpoint] = {
        CHECKIN: checkin,
        UPLOAD: upload,
        ENROL: enrol,
        MODEL: model,
        BROADCAST: broadcast,
        UPLOAD_START: upload_start,
        UPLOAD_CHUNK: upload_chunk,
        UPLOAD_STATUS: upload_status,
        LEAVE: leave,
        EVALUATION: evaluation,
        SECAGG_POST: secagg_post,
        SECAGG_FETCH: secagg_fetch,
        JOB_STATUS: job_status,
        ROUND_STATUS: round_status,
        HEALTH: health,
        READY: ready,
        OPENAPI: openapi,
        ADMIN_CREATE_JOB: admin_create_job,
        ADMIN_JOB_ACTION: admin_job_action,
        ADMIN_ROUNDS: admin_rounds,
        ADMIN_DEVICES: admin_devices,
        ADMIN_REVOKE: admin_revoke,
        ADMIN_CODES: admin_codes,
    }

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        timer = asyncio.create_task(_tick_forever(service, tick_seconds)) if tick_seconds else None
        try:
            yield
        finally:
            if timer is not None:
                timer.cancel()
            await database.flush()
            if database.shared:  # what bench/ingest.py reads, and an operator may
                print(
                    f"fedserver: worker {os.getpid()} held cluster-wide"
                    f" {database.held_seconds * 1000:.3f} ms ({database.holds} times)",
                    file=sys.stderr,
                    flush=True,
                )

    # Many requests' writes commit at once (a SQLite file: every request's; PostgreSQL:
    # the uploads'); a request is answered only once what it wrote is committed
    # (`Database.group_commits`).
    database = service.store.db
    database.group_commits()
    # Bodies in files synced with each group: beside a SQLite file; under `fedserver
    # --bodies` for PostgreSQL (done by then), else in its rows.
    service.store.spool_bodies()

    def durable(endpoint: Endpoint) -> Endpoint:
        async def answer(request: Request) -> Response:
            await database.settled()  # not while a group commit is in flight
            try:
                return await endpoint(request)
            finally:
                await database.flush()

        return answer

    routes = [Route(_starlette_path(r), durable(handlers[r]), methods=[r.method]) for r in handlers]
    middleware = []
    if metrics:
        from starlette.middleware import Middleware

        from fedclient.server.metrics import CONTENT_TYPE, Metrics, RequestMetrics

        counters = service.metrics = Metrics()
        service.rounds.on_close = lambda job, outcome: counters.rounds.labels(job, outcome).inc()

        async def prometheus(request: Request) -> Response:
            header = request.headers.get("authorization")
            service.operator.authenticate_metrics(bearer_token(header) if header else None)
            return Response(counters.text(), media_type=CONTENT_TYPE)

        routes.append(Route(METRICS.path, prometheus, methods=[METRICS.method]))
        middleware.append(Middleware(RequestMetrics, metrics=counters, routes=routes))
    app = _Server(
        routes=routes,
        middleware=middleware,
        exception_handlers={
            ApiError: _api_error,
            HTTPException: _http_error,
            sqlite3.OperationalError: _storage_error,
            Exception: _server_error,
        },
        lifespan=lifespan,
    )
    app.state.metrics = service.metrics if metrics else None
    app.state.body_idle_seconds = body_idle_seconds
    # Outermost: most check-ins are turned away, answered before Starlette and its
    # middleware (error pages included: whatever the front door cannot answer goes on).
    app.front_door = CheckinFrontDoor(
        app.serve,
        service,
        body_limit=JSON_LIMIT,
        body_idle_seconds=body_idle_seconds,
        limiter=limiter,
        render_error=lambda exc: _error_response(exc, service.metrics),
    )
    return app


class _Server(Starlette):
    """Starlette behind the check-in front door (`fedclient.server.front_door`)."""

    front_door: CheckinFrontDoor

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.front_door(scope, receive, send)

    async def serve(self, scope: Any, receive: Any, send: Any) -> None:
        """The request as Starlette serves it (what the front door sends on)."""
        await super().__call__(scope, receive, send)


class _JobAction(Convertor[str]):
    """A job action in a path: only those that exist, so that ``/v1/admin/jobs/{job}/rounds``
    (GET) is not also ``/v1/admin/jobs/{job}/{action}`` (POST) to the router."""

    regex = "|".join(JOB_ACTIONS)

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("job_action", _JobAction())


def _starlette_path(route: ApiRoute) -> str:
    return route.path.replace("{action}", "{action:job_action}")


async def _tick_forever(service: FederationService, seconds: float) -> None:
    while True:
        await asyncio.sleep(seconds)
        try:
            service.tick()
            await service.store.db.flush()
        except (sqlite3.OperationalError, ServiceUnavailable) as exc:
            # Full, busy or away (PostgreSQL restarting): the next tick tries again.
            logger.warning("storage: %s (deadlines are checked again in %s s)", exc, seconds)


def _decode(body: bytes, type_: type[T]) -> T:
    try:
        return msgspec.json.decode(body, type=type_)
    except (msgspec.DecodeError, ValueError) as exc:  # ValueError: a Struct's own checks
        raise InvalidRequest(f"invalid JSON body: {exc}") from exc


def _convert(fields: dict[str, Any], type_: type[T]) -> T:
    """``type_`` built from ``fields`` with its constraints checked, as decoding does."""
    try:
        return msgspec.convert(fields, type=type_)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(f"invalid request: {exc}") from exc


def _json(message: Any, headers: dict[str, str] | None = None) -> Response:
    return Response(msgspec.json.encode(message), media_type="application/json", headers=headers)


def _none_match(header: str | None, etag: str) -> bool:
    """Whether an ``If-None-Match`` header names ``etag``: "*", or a list of tags
    compared weakly (RFC 9110 13.1.2), as caches and proxies send it."""
    if header is None:
        return False
    tags = [tag.strip().removeprefix("W/") for tag in header.split(",")]
    return "*" in tags or etag.removeprefix("W/") in tags


def _byte_range(header: str, size: int) -> tuple[int, int]:
    """[start, end) of a single ``bytes=`` range (RFC 9110), or `RangeNotSatisfiable`."""
    unit, _, spec = header.partition("=")
    first, _, last = spec.strip().partition("-")
    if unit.strip() != "bytes" or "," in spec or not (first.isdigit() or last.isdigit()):
        raise RangeNotSatisfiable(
            f"unsupported Range {header!r}; use bytes=START-[END]",
            headers={"Content-Range": f"bytes */{size}"},
        )
    if first.isdigit():
        start, end = int(first), (int(last) + 1 if last.isdigit() else size)
    else:  # a suffix: the last N bytes
        start, end = max(0, size - int(last)), size
    end = min(end, size)
    if start >= end:
        raise RangeNotSatisfiable(
            f"range {header!r} is outside the {size}-byte body",
            headers={"Content-Range": f"bytes */{size}"},
        )
    return start, end


def _int_param(request: Request, name: str) -> int:
    value = request.path_params[name]
    parsed = parse_id(value)
    if parsed is None:
        raise NotFound(f"{name} must be an integer from 0 to {MAX_ID}, got {value[:40]!r}")
    return parsed


async def _read_limited(request: Request, limit: int) -> bytes:
    """The body, refused past ``limit`` bytes (413) or when it stalls for `BODY_IDLE_SECONDS`
    (408): a half-sent body must not hold a connection and its buffer for ever."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"body of {declared} bytes is over the {limit}-byte limit")
    idle = request.app.state.body_idle_seconds
    chunks, size = [], 0
    if idle is None:  # an in-process server (a simulation): no socket to stall
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise PayloadTooLarge(f"body is over the {limit}-byte limit")
            chunks.append(chunk)
        return b"".join(chunks)
    try:
        # One deadline, moved on as bytes arrive (no task per chunk, as wait_for makes).
        async with asyncio.timeout(idle) as deadline:
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise PayloadTooLarge(f"body is over the {limit}-byte limit")
                chunks.append(chunk)
                deadline.reschedule(asyncio.get_running_loop().time() + idle)
    except TimeoutError:
        raise BodyTimeout(f"no byte of the body for {idle:g} s; send it again") from None
    return b"".join(chunks)


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return _error_response(exc, getattr(request.app.state, "metrics", None))


def _error_response(exc: ApiError, counters: Any) -> Response:
    """An `ApiError` as its HTTP answer (refusals counted, if there are ``counters``)."""
    if counters is not None and exc.status < 500:
        counters.refusals.labels(exc.code).inc()
    headers = dict(exc.headers)
    if exc.retry_after:
        headers["Retry-After"] = str(int(exc.retry_after))
    return JSONResponse(exc.to_json(), status_code=exc.status, headers=headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
    message = str(exc.detail)
    if exc.status_code == 404:  # a path no route has: most often a wrong base URL
        message = (
            f"no route {request.method} {request.url.path} here: the API's routes start "
            "with /v1 at the server's root (GET /openapi.json lists them)"
        )
    headers = dict(exc.headers or {})
    if exc.status_code == 405:  # Allow: every route of the path, not only the first one
        headers["Allow"] = ", ".join(_allowed(request))
    return JSONResponse(
        {"error": {"code": code, "message": message}},
        status_code=exc.status_code,
        headers=headers,
    )


def _allowed(request: Request) -> list[str]:
    """The methods of every route whose path matches the request's (Starlette's 405 names
    only the first route's: one path served by two routes, GET and PATCH, said PATCH)."""
    path = request.scope["path"]
    methods: set[str] = set()
    for route in request.app.routes:
        if isinstance(route, Route) and route.methods and route.path_regex.match(path):
            methods |= route.methods
    return sorted(methods)


#: Retry-After of a readiness probe while the database does not answer.
READY_RETRY_SECONDS = 5

#: How long a device waits before retrying when the server's storage is full.
STORAGE_RETRY_SECONDS = 30


async def _storage_error(request: Request, exc: Exception) -> Response:
    """SQLite could not write: full disk (or database size limit), or busy. The request's
    transaction rolled back, so nothing was written; the device retries after a while and
    the server recovers by itself when space returns."""
    text = str(exc)
    if "full" in text or "locked" in text or "busy" in text:
        logger.warning("storage: %s (answered 503)", text)
        busy = ServiceUnavailable(
            f"the server cannot store anything now ({text}); retry later",
            retry_after=STORAGE_RETRY_SECONDS,
        )
        return await _api_error(request, busy)
    return await _server_error(request, exc)


async def _server_error(request: Request, exc: Exception) -> Response:
    return JSONResponse(
        {"error": {"code": "server_error", "message": "internal error"}}, status_code=500
    )
