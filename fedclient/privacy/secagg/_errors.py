"""Errors of secure aggregation, under `fedclient.FedError`.

    FedError
    └── SecAggError               secure aggregation cannot go on as asked
        ├── InvalidShare          an encrypted share does not verify or is malformed
        ├── ProtocolViolation     the other side sent something the protocol forbids
        └── AggregationFailed     too many devices dropped: the sum cannot be unmasked

A bad *request* to the server role is rejected with `fedclient.InvalidRequest`
(malformed, wrong length, unknown device) or `fedclient.Conflict` (stage
closed, different resubmission), so the HTTP layer maps it like any other.
"""

from __future__ import annotations

from fedclient._exceptions import FedError

__all__ = ["AggregationFailed", "InvalidShare", "ProtocolViolation", "SecAggError"]


class SecAggError(FedError):
    """Secure aggregation cannot go on as asked."""


class InvalidShare(SecAggError):
    """An encrypted share failed authentication (AES-GCM) or has the wrong size.

    Its peer's keys were signed, so only a tampering server or a malicious peer
    sends one: the device that received it aborts before masking anything.
    """

    def __init__(self, sender: int, reason: str) -> None:
        super().__init__(f"share from device {sender} rejected: {reason}")
        self.sender = sender
        self.reason = reason


class ProtocolViolation(SecAggError):
    """A message contradicts the protocol (the device aborts this aggregation, revealing nothing).

    Raised on the device when the server's roster, bundle or unmask request is
    inconsistent with what came before, e.g. a request to reveal both secrets
    of the same peer.
    """


class AggregationFailed(SecAggError):
    """Too few devices remain to unmask the sum; the round fails and no input is revealed."""
