"""fedclient: the device SDK for cross-device federated learning.

    import fedclient
    model = fedclient.models.mlp(inputs=64, hidden=64, classes=10)
    fedclient.fit(model, (x, y), epochs=5)                                  # standalone
    fedclient.fit(model, (x, y), federated="https://host/jobs/digits")     # federated

Importing this package loads no server, plotting or edge-runtime library.
"""

from fedclient import models, protocol, transport
from fedclient._client import Client, StepOutcome, TrainTask, TransferStats
from fedclient._examples import ExampleStore
from fedclient._exceptions import (
    ApiError,
    Conflict,
    DeadlinePassed,
    FedError,
    Forbidden,
    IdentityRequired,
    InvalidInput,
    InvalidRequest,
    ModelMismatch,
    NotFound,
    PayloadTooLarge,
    PrivacyBudgetExceeded,
    PrivacyPolicyViolation,
    RequestTimeout,
    RoundClosed,
    ServerError,
    ServiceUnavailable,
    StateError,
    TooEarly,
    TooManyRequests,
    TransportError,
    Unauthorized,
)
from fedclient._fit import FitResult, fit
from fedclient._personalize import Personalization
from fedclient._state import DeviceState, Phase
from fedclient.conditions import Conditions
from fedclient.identity import IdentityAuthority
from fedclient.privacy.policy import PrivacyPolicy
from fedclient.runtime import EvalResult, TrainingBackend, TrainResult, create_backend
from fedclient.transport import FaultPlan, FaultyTransport, RetryPolicy

__version__ = "0.1.0"

__all__ = [
    "ApiError",
    "Client",
    "Conditions",
    "Conflict",
    "DeadlinePassed",
    "DeviceState",
    "EvalResult",
    "ExampleStore",
    "FaultPlan",
    "FaultyTransport",
    "FedError",
    "FitResult",
    "Forbidden",
    "IdentityAuthority",
    "IdentityRequired",
    "InvalidInput",
    "InvalidRequest",
    "ModelMismatch",
    "NotFound",
    "PayloadTooLarge",
    "Personalization",
    "Phase",
    "PrivacyBudgetExceeded",
    "PrivacyPolicy",
    "PrivacyPolicyViolation",
    "RequestTimeout",
    "RetryPolicy",
    "RoundClosed",
    "ServerError",
    "ServiceUnavailable",
    "StateError",
    "StepOutcome",
    "TooEarly",
    "TooManyRequests",
    "TrainResult",
    "TrainTask",
    "TrainingBackend",
    "TransferStats",
    "TransportError",
    "Unauthorized",
    "__version__",
    "create_backend",
    "fit",
    "models",
    "protocol",
    "transport",
]
