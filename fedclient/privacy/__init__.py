"""Privacy for federated updates: local differential privacy and secure aggregation.

- `fedclient.privacy.dp`: clipping, the Gaussian mechanism, an RDP accountant
  and the persisted `PrivacyLedger`.
- `fedclient.privacy.secagg`: the device's role in secure aggregation
  (SecAgg, Bonawitz et al. 2017; SecAgg+, Bell et al. 2020) as a sans-io
  state machine; the server's role is `fedserver_ref.secagg`.
"""

from fedclient.privacy import dp, secagg

__all__ = ["dp", "secagg"]
