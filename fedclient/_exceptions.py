"""One exception tree for the device SDK, the reference server and the simulator.

    FedError
    ├── InvalidInput              bad arguments or data handed to the SDK (also a ValueError)
    ├── StateError                the device's SQLite state cannot be used
    ├── ModelMismatch             downloaded weights do not fit the local model
    ├── PrivacyBudgetExceeded     a release would spend more privacy than the job's budget
    ├── PrivacyPolicyViolation    a plan asks for less privacy than the device's policy allows
    ├── TransportError            the request never got an HTTP answer
    │   └── RequestTimeout
    └── ApiError                  the other side answered with an error (carries status + code)
        ├── InvalidRequest        400  malformed body, wrong tensors, NaN/Inf
        ├── Unauthorized          401  missing or wrong device token
        ├── Forbidden             403  device not admitted to the round
        │   └── IdentityRequired  403  a secure job needs the device's identity key first
        ├── NotFound              404  unknown job, round or model version
        ├── Conflict              409  e.g. a second upload for the same round
        │   ├── OffsetMismatch    409  a chunk sent at another offset than the server holds
        │   └── RoundClosed       409  the round already closed
        │       └── DeadlinePassed 410 the round's deadline passed
        ├── BodyTimeout           408  the request's body stalled: send it again
        ├── PayloadTooLarge       413
        ├── RangeNotSatisfiable   416
        ├── TooEarly              425  a secure-aggregation stage has not closed yet
        ├── TooManyRequests       429  over a rate limit: retry after Retry-After
        └── ServerError           5xx
            └── ServiceUnavailable 503  out of storage, or busy: retry after Retry-After

The server raises the same `ApiError` classes; its one exception handler turns
them into an HTTP status and a JSON body ``{"error": {"code", "message"}}``, and
`error_from_response` turns that body back into the same class on the device.
Each class's ``code`` is what travels on the wire, so the mapping is defined
here once.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "ApiError",
    "BodyTimeout",
    "Conflict",
    "DeadlinePassed",
    "FedError",
    "Forbidden",
    "IdentityRequired",
    "InvalidInput",
    "InvalidRequest",
    "ModelMismatch",
    "NotFound",
    "OffsetMismatch",
    "PayloadTooLarge",
    "RangeNotSatisfiable",
    "PrivacyBudgetExceeded",
    "PrivacyPolicyViolation",
    "RequestTimeout",
    "RoundClosed",
    "ServerError",
    "ServiceUnavailable",
    "StateError",
    "TooEarly",
    "TooManyRequests",
    "TransportError",
    "Unauthorized",
    "error_from_status",
]


class FedError(Exception):
    """Root of every error fedclient raises."""

    #: Process exit status used by the command-line tools for this error.
    exit_code: ClassVar[int] = 1


class InvalidInput(FedError, ValueError):
    """Arguments or data handed to the SDK are not usable (shape, dtype, label range...)."""

    exit_code = 2


class StateError(FedError):
    """The device's state store is unreadable or from an incompatible version."""


class ModelMismatch(FedError):
    """Weights from the server do not match the local model's names or shapes."""


class PrivacyBudgetExceeded(FedError):
    """A release would take the device past its privacy budget for a job; nothing was charged.

    ``epsilon`` is what the job would have spent with the release and ``budget``
    the job's epsilon limit, both at the budget's delta. The device must not
    train for, or upload to, the job until its budget is raised.
    """

    def __init__(self, job: str, *, epsilon: float, budget: float, scope: str = "job") -> None:
        what = f"privacy budget of job {job!r}" if scope == "job" else "the device's lifetime"
        super().__init__(
            f"{what} exceeded: the release would bring epsilon to "
            f"{epsilon:.4g}, over the budget of {budget:.4g}"
        )
        self.job = job
        self.epsilon = epsilon
        self.budget = budget
        #: "job" (the job's budget) or "lifetime" (every job of the device together).
        self.scope = scope


class PrivacyPolicyViolation(FedError):
    """A job's plan asks for less privacy than the device's `PrivacyPolicy` allows.

    Raised before the device trains or sends anything for the round; it leaves the
    round. ``reason`` says which limit the plan broke."""

    def __init__(self, job: str, reason: str) -> None:
        super().__init__(f"job {job!r} refused by the device's privacy policy: {reason}")
        self.job = job
        self.reason = reason


class TransportError(FedError):
    """The request did not get an HTTP response (connection refused, reset, ...)."""


class RequestTimeout(TransportError):
    """The request timed out."""


class ApiError(FedError):
    """The peer answered with an HTTP error. ``status`` and ``code`` travel on the wire."""

    status: ClassVar[int] = 400
    code: ClassVar[str] = "bad_request"
    _by_code: ClassVar[dict[str, type[ApiError]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "code" in cls.__dict__:
            ApiError._by_code[cls.code] = cls

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after
        self.headers = dict(headers or {})

    def to_json(self) -> dict[str, Any]:
        """The JSON error body the server sends for this error."""
        return {"error": {"code": self.code, "message": self.message}}


class InvalidRequest(ApiError):
    """400: the request body or its tensors are invalid."""

    status = 400
    code = "invalid_request"


class Unauthorized(ApiError):
    """401: missing or wrong bearer token."""

    status = 401
    code = "unauthorized"


class Forbidden(ApiError):
    """403: the device may not do this (e.g. it was not admitted to the round)."""

    status = 403
    code = "forbidden"


class IdentityRequired(Forbidden):
    """403: a secure-aggregation job admits only devices whose identity key the server
    holds; the device sends it with its next check-in (`fedclient.Client` does)."""

    code = "identity_required"


class NotFound(ApiError):
    """404: unknown job, round or model version."""

    status = 404
    code = "not_found"


class Conflict(ApiError):
    """409: the request conflicts with the stored state."""

    status = 409
    code = "conflict"


class OffsetMismatch(Conflict):
    """409: a chunk was sent for another offset; ``Upload-Offset`` holds the server's."""

    code = "offset_mismatch"


class RoundClosed(Conflict):
    """409: the round is closed; the update is stale and must be discarded."""

    code = "round_closed"


class DeadlinePassed(RoundClosed):
    """410: the round's deadline passed before the update arrived."""

    status = 410
    code = "deadline_passed"


class BodyTimeout(ApiError):
    """408: the request's body stopped arriving; nothing was taken, send it again."""

    status = 408
    code = "body_timeout"


class PayloadTooLarge(ApiError):
    """413: the body is over the server's limit."""

    status = 413
    code = "payload_too_large"


class RangeNotSatisfiable(ApiError):
    """416: the requested byte range lies outside the body."""

    status = 416
    code = "range_not_satisfiable"


class TooEarly(ApiError):
    """425: the answer is not ready (a secure-aggregation stage is still open)."""

    status = 425
    code = "too_early"


class TooManyRequests(ApiError):
    """429: over the server's rate limit; the device retries after Retry-After."""

    status = 429
    code = "too_many_requests"


class ServerError(ApiError):
    """5xx: the server failed."""

    status = 500
    code = "server_error"


class BadGateway(ServerError):
    """502: a proxy or load balancer in front of the server had no valid answer from it
    (the server restarting, say); the same request later will do."""

    status = 502
    code = "bad_gateway"


class GatewayTimeout(ServerError):
    """504: a proxy or load balancer in front of the server waited for it in vain; the
    request may or may not have been done (an upload's key makes its retry safe)."""

    status = 504
    code = "gateway_timeout"


class ServiceUnavailable(ServerError):
    """503: the server cannot take the request now (its storage is full, say); nothing
    was written, and the same request later will do (it says when: Retry-After)."""

    status = 503
    code = "unavailable"


_BY_STATUS: dict[int, type[ApiError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    408: BodyTimeout,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    410: DeadlinePassed,
    413: PayloadTooLarge,
    416: RangeNotSatisfiable,
    429: TooManyRequests,
    500: ServerError,
    # A proxy's, or a load balancer's, without our body.
    502: BadGateway,
    503: ServiceUnavailable,
    504: GatewayTimeout,
}


def error_from_status(status: int, code: str | None, message: str) -> ApiError:
    """Rebuild the typed error for an HTTP error answer (code first, then status)."""
    cls = ApiError._by_code.get(code or "") or _BY_STATUS.get(status)
    if cls is None:
        cls = ServerError if status >= 500 else ApiError
    return cls(message or f"HTTP {status}")
