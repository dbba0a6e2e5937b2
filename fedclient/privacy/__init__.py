"""Privacy for federated updates: local differential privacy and secure aggregation.

- `fedclient.privacy.dp`: clipping, the Gaussian mechanism, an RDP accountant
  and the persisted `PrivacyLedger`.
- `fedclient.privacy.secagg`: the device's role in secure aggregation
  (SecAgg, Bonawitz et al. 2017; SecAgg+, Bell et al. 2020) as a sans-io
  state machine; the server's role is `fedclient.server.secagg`.
"""

import importlib
from types import ModuleType

from fedclient.privacy import dp

__all__ = ["dp", "secagg"]


def __getattr__(name: str) -> ModuleType:
    # secagg brings in `cryptography`: loaded on first use, not with the SDK.
    if name == "secagg":
        return importlib.import_module("fedclient.privacy.secagg")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
