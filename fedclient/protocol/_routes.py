"""Every route of the HTTP API, defined once; the server mounts them, the client formats them.

The OpenAPI document the server serves is built from this table and the
message types, so the documentation cannot drift from the code.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import msgspec

import fedclient.protocol._messages as m
from fedclient._exceptions import InvalidInput

__all__ = [
    "ADMIN_CODES",
    "ADMIN_CREATE_JOB",
    "ADMIN_DEVICES",
    "ADMIN_JOB_ACTION",
    "ADMIN_REVOKE",
    "ADMIN_ROUNDS",
    "BROADCAST",
    "CHECKIN",
    "ENROL",
    "EVALUATION",
    "HEALTH",
    "JOB_ACTIONS",
    "JOB_STATUS",
    "LEAVE",
    "MAX_ID",
    "METRICS",
    "MODEL",
    "OPENAPI",
    "ROUND_STATUS",
    "READY",
    "ROUTES",
    "SECAGG_FETCH",
    "SECAGG_POST",
    "MSGPACK_MEDIA_TYPE",
    "TENSOR_MEDIA_TYPE",
    "UPLOAD",
    "UPLOAD_CHUNK",
    "UPLOAD_START",
    "UPLOAD_STATUS",
    "Route",
    "openapi_document",
    "parse_id",
    "split_job_url",
]

#: Media type of a tensor body (safetensors: a JSON header, then raw little-endian data).
TENSOR_MEDIA_TYPE = "application/vnd.fedclient.safetensors"

#: Media type of a msgpack body (a check-in answer that carries a model's raw bytes).
MSGPACK_MEDIA_TYPE = "application/msgpack"


@dataclass(frozen=True)
class Route:
    """One endpoint: method, path template, and what travels each way."""

    name: str
    method: str
    path: str
    summary: str
    request: type | None = None  # a JSON message type, or None
    response: Any = None  # a JSON message type, TENSOR_MEDIA_TYPE, or None
    request_tensors: bool = False
    headers: tuple[str, ...] = ()  # request headers the route requires
    auth: bool = True
    errors: tuple[int, ...] = ()
    msgpack: bool = False  # the answer also comes in msgpack, on Accept: application/msgpack

    def url(self, **params: object) -> str:
        """The concrete path, e.g. ``MODEL.url(job="digits", version=3)``."""
        return self.path.format(**params)


ENROL = Route(
    "enrol",
    "POST",
    "/v1/devices",
    "Enrol a device; returns its id and bearer token.",
    request=m.EnrolRequest,
    response=m.EnrolResponse,
    auth=False,
    errors=(400, 403, 409, 413, 429),
)
CHECKIN = Route(
    "checkin",
    "POST",
    "/v1/jobs/{job}/checkin",
    "Offer to work on a job: admitted with a round plan, told to retry later, or finished. "
    "With Accept: application/msgpack the answer is msgpack, and an admission carries the "
    "round's model when the request's inline_model_max allows it. A request with "
    "enrol_label enrols its bearer token first; the answer's Device-Id header names it.",
    request=m.CheckinRequest,
    response=m.CheckinResponse,
    errors=(400, 401, 403, 404, 409, 413, 429),
    msgpack=True,
)
MODEL = Route(
    "model",
    "GET",
    "/v1/models/{job}/{version}",
    "Download one model version (immutable; ETag and If-None-Match supported). A Range "
    "header (bytes=N-) with If-Range resumes a broken download: 206 Partial Content.",
    response=TENSOR_MEDIA_TYPE,
    errors=(401, 404, 416),
)
BROADCAST = Route(
    "broadcast",
    "GET",
    "/v1/models/{job}/{version}/broadcast",
    "The tensors the job's strategy sends its devices beside the current model version "
    "(e.g. SCAFFOLD's server control variate): for a device whose plan names a client "
    "trainer. An older version's are gone: 409.",
    response=TENSOR_MEDIA_TYPE,
    errors=(401, 404, 409),
)
UPLOAD = Route(
    "upload",
    "POST",
    "/v1/rounds/{round_id}/updates",
    "Upload a model update (safetensors body, metadata in its header). Requires an "
    "Idempotency-Key header: a retry with the same key returns the original receipt.",
    response=m.UploadReceipt,
    request_tensors=True,
    headers=("Idempotency-Key",),
    errors=(400, 401, 403, 404, 409, 410, 413, 429),
)
UPLOAD_START = Route(
    "upload_start",
    "POST",
    "/v1/rounds/{round_id}/uploads",
    "Open a chunked upload for a large update, or find it again to resume: the answer "
    "says how many bytes the server holds. Requires an Idempotency-Key header, which "
    "becomes the upload id.",
    request=m.UploadStart,
    response=m.UploadSession,
    headers=("Idempotency-Key",),
    errors=(400, 401, 403, 404, 409, 410, 413, 429),
)
UPLOAD_CHUNK = Route(
    "upload_chunk",
    "PATCH",
    "/v1/rounds/{round_id}/uploads/{upload_id}",
    "Append the bytes of the body at the Upload-Offset header's position. The chunk that "
    "completes the upload returns the receipt. A wrong offset is a 409 whose Upload-Offset "
    "header gives the server's.",
    response=m.UploadSession,
    request_tensors=True,
    headers=("Upload-Offset",),
    errors=(400, 401, 404, 409, 410),
)
UPLOAD_STATUS = Route(
    "upload_status",
    "GET",
    "/v1/rounds/{round_id}/uploads/{upload_id}",
    "Where a chunked upload stands.",
    response=m.UploadSession,
    errors=(401, 404),
)
EVALUATION = Route(
    "evaluation",
    "POST",
    "/v1/rounds/{round_id}/evaluation",
    "A device asked to evaluate the round's model, whose update did not count (the round "
    "closed first), reports its evaluation on its own; once per device and round.",
    request=m.EvaluationReport,
    errors=(400, 401, 403, 404, 408, 413, 429, 503),
)
LEAVE = Route(
    "leave",
    "POST",
    "/v1/rounds/{round_id}/leave",
    "An admitted device that cannot finish in time gives its place back.",
    errors=(401, 404),
)
SECAGG_POST = Route(
    "secagg_post",
    "POST",
    "/v1/rounds/{round_id}/secagg/{stage}",
    "Secure aggregation: a device's message of a stage (keys, agree, shares, masked, "
    "consistency, unmask), msgpack-encoded. The masked input's answer is the device's "
    "receipt.",
    errors=(400, 401, 403, 404, 409, 425),
)
SECAGG_FETCH = Route(
    "secagg_fetch",
    "GET",
    "/v1/rounds/{round_id}/secagg/{stage}",
    "Secure aggregation: the server's message of a stage for this device (params, keys, "
    "agree, shares, masked, consistency), msgpack-encoded; 425 until the stage closed.",
    errors=(401, 403, 404, 425),
)
JOB_STATUS = Route(
    "job_status",
    "GET",
    "/v1/jobs/{job}",
    "The job's status, plan and current round. Needs a device's or the admin's token, "
    "unless the operator made status public.",
    response=m.JobStatus,
    errors=(401, 404),
)
ROUND_STATUS = Route(
    "round_status",
    "GET",
    "/v1/jobs/{job}/rounds/{number}",
    "One round of a job, by number (the same access as the job's status).",
    response=m.RoundSummary,
    errors=(401, 404),
)
ADMIN_CREATE_JOB = Route(
    "admin_create_job",
    "POST",
    "/v1/admin/jobs",
    "Admin: create a job from a plan (JSON); the same plan again is a no-op.",
    request=m.JobPlan,
    response=m.JobStatus,
    errors=(400, 401, 409, 413),
)
ADMIN_JOB_ACTION = Route(
    "admin_job_action",
    "POST",
    "/v1/admin/jobs/{job}/{action}",
    "Admin: pause (no admissions until resumed), resume, or stop (for good) a job.",
    response=m.JobStatus,
    errors=(401, 404, 409),
)
ADMIN_ROUNDS = Route(
    "admin_rounds",
    "GET",
    "/v1/admin/jobs/{job}/rounds",
    "Admin: every round of a job, newest first.",
    response=list[m.RoundSummary],
    errors=(401, 404),
)
ADMIN_DEVICES = Route(
    "admin_devices",
    "GET",
    "/v1/admin/jobs/{job}/devices",
    "Admin: every device that took part in a job, and how.",
    response=list[m.DeviceParticipation],
    errors=(401, 404),
)
ADMIN_REVOKE = Route(
    "admin_revoke",
    "POST",
    "/v1/admin/devices/{device}/revoke",
    "Admin: revoke a device; its token stops working at once (401).",
    errors=(401, 404),
)
ADMIN_CODES = Route(
    "admin_codes",
    "POST",
    "/v1/admin/enrolment-codes",
    "Admin: issue single-use enrolment codes (shown once).",
    request=m.IssueCodes,
    response=m.EnrolmentCodes,
    errors=(400, 401, 413),
)
HEALTH = Route(
    "health",
    "GET",
    "/healthz",
    "Liveness: the process answers (restarting it helps nothing else).",
    auth=False,
)
READY = Route(
    "ready",
    "GET",
    "/readyz",
    "Readiness: 200 while the server can serve (its database answers), else 503 with "
    "Retry-After; the server recovers by itself.",
    auth=False,
    errors=(503,),
)
OPENAPI = Route("openapi", "GET", "/openapi.json", "This document.", auth=False)

METRICS = Route(
    "metrics",
    "GET",
    "/metrics",
    "Prometheus text: requests by route and status, latency, rounds, updates, enrolments "
    "and refusals. Needs the metrics token or the admin token unless the operator made "
    "metrics public.",
    errors=(401,),
)

ROUTES = (
    ENROL,
    CHECKIN,
    MODEL,
    BROADCAST,
    UPLOAD,
    UPLOAD_START,
    UPLOAD_CHUNK,
    UPLOAD_STATUS,
    LEAVE,
    EVALUATION,
    SECAGG_POST,
    SECAGG_FETCH,
    JOB_STATUS,
    ROUND_STATUS,
    HEALTH,
    READY,
    OPENAPI,
    METRICS,
    ADMIN_CREATE_JOB,
    ADMIN_JOB_ACTION,
    ADMIN_ROUNDS,
    ADMIN_DEVICES,
    ADMIN_REVOKE,
    ADMIN_CODES,
)

_REASONS = {
    400: "Invalid request",
    401: "Missing or wrong device token",
    403: "Not allowed",
    404: "Unknown job, round, upload or model",
    416: "Range outside the body",
    425: "Too early: the stage has not closed",
    409: "Conflicts with stored state (e.g. round closed)",
    408: "The body stalled: send it again",
    410: "Deadline passed",
    413: "Body over the limit",
    429: "Over a rate limit: retry after Retry-After",
    503: "Unavailable now (storage full, database away): retry after Retry-After",
}


#: Path ids are integers: ASCII digits, at most 2^63 - 1 (what the store keeps).
MAX_ID = 2**63 - 1
_STRING: dict[str, Any] = {"type": "string"}
_ID: dict[str, Any] = {"type": "integer", "minimum": 0, "maximum": MAX_ID}
#: What an operator may do to a job (`ADMIN_JOB_ACTION`).
JOB_ACTIONS = ("pause", "resume", "stop")
_PATH_SCHEMAS = {
    "version": _ID,
    "round_id": _ID,
    "number": _ID,
    "action": {"type": "string", "enum": list(JOB_ACTIONS)},
}


def parse_id(text: str) -> int | None:
    """A path id: ASCII digits only (superscripts and other scripts' digits are digits
    to `str.isdigit`), at most `MAX_ID`; else None."""
    if not (0 < len(text) <= 19 and text.isascii() and text.isdigit()):
        return None
    value = int(text)
    return value if value <= MAX_ID else None


def openapi_document(version: str) -> dict[str, Any]:
    """Build the OpenAPI 3.1 document for `ROUTES`."""
    types: list[Any] = [m.ErrorBody]
    for route in ROUTES:
        types += [t for t in (route.request, route.response) if t not in (None, TENSOR_MEDIA_TYPE)]
    schemas, components = msgspec.json.schema_components(
        types, ref_template="#/components/schemas/{name}"
    )
    by_type = dict(zip(types, schemas, strict=True))
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        op: dict[str, Any] = {"operationId": route.name, "summary": route.summary}
        params = [
            {"name": p, "in": "path", "required": True, "schema": _PATH_SCHEMAS.get(p, _STRING)}
            for p in _path_params(route.path)
        ]
        params += [
            {"name": h, "in": "header", "required": True, "schema": {"type": "string"}}
            for h in route.headers
        ]
        if route.request_tensors:
            op["requestBody"] = {"content": {TENSOR_MEDIA_TYPE: {"schema": {}}}, "required": True}
        elif route.request is not None:
            op["requestBody"] = {
                "content": {"application/json": {"schema": by_type[route.request]}},
                # An empty body reads as {} on these two; every other JSON route needs one.
                "required": route not in (CHECKIN, ADMIN_CODES),
            }
        if params:
            op["parameters"] = params
        if route.path.startswith("/v1/admin/"):
            op["security"] = [{"admin_token": []}]
        elif route is METRICS:
            op["security"] = [{"metrics_token": []}, {"admin_token": []}]
        elif route.auth:
            op["security"] = [{"device_token": []}]
        if route.response == TENSOR_MEDIA_TYPE:
            ok: dict[str, Any] = {"description": "OK", "content": {TENSOR_MEDIA_TYPE: {}}}
        elif route.response is not None:
            schema = {"schema": by_type[route.response]}
            content = {"application/json": schema}
            if route.msgpack:
                content[MSGPACK_MEDIA_TYPE] = schema
            ok = {"description": "OK", "content": content}
        else:
            ok = {"description": "OK"}
        responses: dict[str, Any] = {"200": ok}
        error = {"content": {"application/json": {"schema": by_type[m.ErrorBody]}}}
        for status in sorted({*route.errors, *_answered_by_all(route)}):
            responses[str(status)] = {"description": _REASONS[status], **error}
        op["responses"] = responses
        paths.setdefault(route.path, {})[route.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": "fedclient reference server", "version": version},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {
                "device_token": {"type": "http", "scheme": "bearer"},
                "admin_token": {"type": "http", "scheme": "bearer"},
                "metrics_token": {"type": "http", "scheme": "bearer"},
            },
        },
    }


def _answered_by_all(route: Route) -> tuple[int, ...]:
    """What any route that reads a body (408) or the store (503) may answer."""
    statuses: tuple[int, ...] = (408,) if route.request is not None or route.request_tensors else ()
    if route not in (HEALTH, OPENAPI, METRICS):
        statuses += (503,)
    return statuses


def _path_params(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]


@functools.lru_cache(maxsize=256)  # a simulator makes a client per device and round
def split_job_url(url: str) -> tuple[str, str | None]:
    """The one convention for where a device finds a job: ``(server root, job)`` of a
    job's URL (``https://host[:port][/prefix]/v1/jobs/NAME``, as `JOB_STATUS` serves
    it, or ``.../jobs/NAME``), or ``(url, None)`` for a server's root URL. Anything
    but an http(s) URL is an `InvalidInput` saying what is expected."""
    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
        raise InvalidInput(
            f"expected the server's URL (https://host[:port]) or a job's URL "
            f"(https://host[:port]/v1/jobs/NAME or .../jobs/NAME), got {url!r}"
        )
    segments = [s for s in parts.path.split("/") if s]
    job = None
    if len(segments) >= 2 and segments[-2] == "jobs":
        job, segments = segments[-1], segments[:-2]
        if segments[-1:] == ["v1"]:  # the API's own path names the job too
            segments = segments[:-1]
    elif segments[-1:] == ["jobs"] or segments[-2:-1] == ["jobs"]:
        raise InvalidInput(f"a job's URL ends in /jobs/NAME, got {url!r}")
    root = f"{parts.scheme}://{parts.netloc}" + "".join(f"/{s}" for s in segments)
    return root, job
