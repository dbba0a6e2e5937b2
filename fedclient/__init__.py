"""fedclient: the device SDK for cross-device federated learning.

    import fedclient
    model = fedclient.models.mlp(inputs=64, hidden=64, classes=10)
    fedclient.fit(model, (x, y), epochs=5)                                  # standalone
    fedclient.fit(model, (x, y), federated="https://host/jobs/digits")     # federated

Importing this package loads no server, plotting or edge-runtime library; its
parts load when first used.
"""

import importlib
import typing

from fedclient._exceptions import (
    ApiError,
    BadGateway,
    Conflict,
    DeadlinePassed,
    FedError,
    Forbidden,
    GatewayTimeout,
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

if typing.TYPE_CHECKING:  # what the names below are, for type checkers and readers
    from fedclient import models, protocol, transport
    from fedclient._app import Backoff, RoundEvent, RunResult
    from fedclient._client import Client
    from fedclient._effects import StepOutcome, TrainTask, TransferStats
    from fedclient._examples import ExampleStore, Forgotten
    from fedclient._fit import FitResult, fit
    from fedclient._personalize import Personalization
    from fedclient._state import DeviceState, Phase
    from fedclient.conditions import Conditions
    from fedclient.identity import IdentityAuthority
    from fedclient.privacy.policy import PrivacyPolicy
    from fedclient.runtime import EvalResult, TrainingBackend, TrainResult, create_backend
    from fedclient.transport import FaultPlan, FaultyTransport, RetryPolicy

#: Where each public name lives: imported on first use, so an app that imports
#: fedclient at start-up pays for numpy, httpx and SQLite only when it federates
#: (python -X importtime -c "import fedclient": bench/import_time.py).
_LAZY: dict[str, str] = {
    "Backoff": "fedclient._app",
    "Client": "fedclient._client",
    "Conditions": "fedclient.conditions",
    "create_backend": "fedclient.runtime",
    "DeviceState": "fedclient._state",
    "EvalResult": "fedclient.runtime",
    "ExampleStore": "fedclient._examples",
    "FaultPlan": "fedclient.transport",
    "FaultyTransport": "fedclient.transport",
    "fit": "fedclient._fit",
    "FitResult": "fedclient._fit",
    "Forgotten": "fedclient._examples",
    "IdentityAuthority": "fedclient.identity",
    "models": "fedclient.models",
    "Personalization": "fedclient._personalize",
    "Phase": "fedclient._state",
    "PrivacyPolicy": "fedclient.privacy.policy",
    "protocol": "fedclient.protocol",
    "RetryPolicy": "fedclient.transport",
    "RoundEvent": "fedclient._app",
    "RunResult": "fedclient._app",
    "StepOutcome": "fedclient._effects",
    "TrainingBackend": "fedclient.runtime",
    "TrainResult": "fedclient.runtime",
    "TrainTask": "fedclient._effects",
    "TransferStats": "fedclient._effects",
    "transport": "fedclient.transport",
}


__version__ = "0.1.0"

__all__ = [
    "ApiError",
    "Backoff",
    "BadGateway",
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
    "Forgotten",
    "GatewayTimeout",
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
    "RoundEvent",
    "RunResult",
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


def __getattr__(name: str) -> typing.Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    loaded = importlib.import_module(module)
    value = loaded if module == f"{__name__}.{name}" else getattr(loaded, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
