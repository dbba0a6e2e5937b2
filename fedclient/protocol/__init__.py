"""The wire protocol, shared by the device SDK, the reference server and the simulator.

No I/O lives here: routes, message types, tensor encoding and error mapping.
"""

from fedclient.protocol._messages import (
    Admitted,
    CheckinRequest,
    CheckinResponse,
    EnrolRequest,
    EnrolResponse,
    ErrorBody,
    ErrorDetail,
    JobFinished,
    JobPlan,
    JobSettings,
    JobStatus,
    ModelSpec,
    RetryLater,
    RoundPlan,
    RoundSummary,
    TrainSettings,
    UploadReceipt,
)
from fedclient.protocol._routes import (
    CHECKIN,
    ENROL,
    HEALTH,
    JOB_STATUS,
    MODEL,
    OPENAPI,
    ROUND_STATUS,
    ROUTES,
    TENSOR_MEDIA_TYPE,
    UPLOAD,
    Route,
    openapi_document,
)
from fedclient.protocol._tensors import Weights, check_weights, decode_tensors, encode_tensors

#: Header carrying the device's idempotency key on uploads.
IDEMPOTENCY_HEADER = "Idempotency-Key"

__all__ = [
    "CHECKIN",
    "ENROL",
    "HEALTH",
    "IDEMPOTENCY_HEADER",
    "JOB_STATUS",
    "MODEL",
    "OPENAPI",
    "ROUND_STATUS",
    "ROUTES",
    "TENSOR_MEDIA_TYPE",
    "UPLOAD",
    "Admitted",
    "CheckinRequest",
    "CheckinResponse",
    "EnrolRequest",
    "EnrolResponse",
    "ErrorBody",
    "ErrorDetail",
    "JobFinished",
    "JobPlan",
    "JobSettings",
    "JobStatus",
    "ModelSpec",
    "RetryLater",
    "Route",
    "RoundPlan",
    "RoundSummary",
    "TrainSettings",
    "UploadReceipt",
    "Weights",
    "check_weights",
    "decode_tensors",
    "encode_tensors",
    "openapi_document",
]
