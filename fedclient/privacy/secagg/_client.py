"""The device's role in secure aggregation: a sans-io state machine.

The driver moves one `SecAggClient` through four calls, sending what each
returns to the server and passing in what the server answers::

    client = SecAggClient(params, device)
    send(client.advertise_keys())                    # stage 0
    send(client.share_keys(roster))                  # stage 1, roster: KeyRoster
    send(client.masked_input(bundle, quantized))     # stage 2, bundle: ShareBundle
    send(client.unmask(request))                     # stage 3, request: UnmaskRequest

Each call may be repeated with the same argument (a retried request gets the
same message back); a call with a different argument for a stage already done
raises `ProtocolViolation`. Secrets (X25519 keys, the self-mask seed, the
Shamir coefficients, the AES-GCM nonces) come from the OS CSPRNG and live only
in memory: a device that restarts mid-aggregation has simply dropped out, which
the protocol tolerates. Keeping them out of the state file also means a
restarted device can never send a second, different masked input.
"""

from __future__ import annotations

import os
from enum import StrEnum

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedclient._exceptions import InvalidInput
from fedclient.privacy.secagg import _crypto, _shamir
from fedclient.privacy.secagg._encoding import pack
from fedclient.privacy.secagg._errors import AggregationFailed, InvalidShare, ProtocolViolation
from fedclient.privacy.secagg._messages import (
    EncryptedShare,
    KeyAdvertisement,
    KeyRoster,
    MaskedInput,
    RevealedShare,
    ShareBundle,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
)
from fedclient.privacy.secagg._params import SecAggParams

__all__ = ["ClientStage", "SecAggClient"]


class ClientStage(StrEnum):
    """The next call a `SecAggClient` expects."""

    ADVERTISE = "advertise"
    SHARE = "share"
    MASK = "mask"
    UNMASK = "unmask"
    DONE = "done"


class SecAggClient:
    """One device (number ``device`` in ``params.participants``) in one secure aggregation.

    Its two X25519 key pairs and its self-mask seed are drawn from the OS
    CSPRNG when it is created; they never leave memory.
    """

    def __init__(self, params: SecAggParams, device: int) -> None:
        if device not in params.participants:
            raise InvalidInput(f"device {device} is not a participant of this aggregation")
        self.params = params
        self.device = device
        self.neighbours = params.neighbourhood(device)
        self.stage = ClientStage.ADVERTISE
        #: Senders whose relayed share failed to verify, with the reason; this
        #: device cannot help unmask them.
        self.rejected_shares: dict[int, InvalidShare] = {}
        self._c_key = X25519PrivateKey.generate()
        self._s_key = X25519PrivateKey.generate()
        self._seed = os.urandom(32)
        self._peers: dict[int, tuple[bytes, bytes]] = {}
        self._c_secrets: dict[int, bytes] = {}
        self._own_share = 0
        self._received: dict[int, tuple[int, int]] = {}
        self._maskers: list[int] = []
        self._sent: dict[ClientStage, tuple[object, object]] = {}

    # -- helpers ---------------------------------------------------------------------------
    def _replay(self, stage: ClientStage, argument: object) -> object | None:
        """The message already sent for ``stage`` if the argument is the same; else raise."""
        if stage not in self._sent:
            if self.stage != stage:
                raise ProtocolViolation(
                    f"device {self.device} expects stage {self.stage.value!r}, not {stage.value!r}"
                )
            return None
        previous_argument, message = self._sent[stage]
        if previous_argument != argument:
            raise ProtocolViolation(
                f"stage {stage.value!r} was already answered for a different request"
            )
        return message

    # -- stage 0 ---------------------------------------------------------------------------
    def advertise_keys(self) -> KeyAdvertisement:
        """Stage 0: the two fresh public keys to send to the server."""
        message = KeyAdvertisement(
            _crypto.public_bytes(self._c_key), _crypto.public_bytes(self._s_key)
        )
        if self.stage == ClientStage.ADVERTISE:
            self._sent[ClientStage.ADVERTISE] = (None, message)
            self.stage = ClientStage.SHARE
        return message

    # -- stage 1 ---------------------------------------------------------------------------
    def share_keys(self, roster: KeyRoster) -> ShareKeys:
        """Stage 1: Shamir shares of the self-mask seed and of the mask key, encrypted per peer.

        Raises `ProtocolViolation` if the roster names a non-neighbour, repeats a
        device or key, or holds an unusable key; `AggregationFailed` if too few
        neighbours are left to reach the threshold.
        """
        previous = self._replay(ClientStage.SHARE, roster)
        if previous is not None:
            assert isinstance(previous, ShareKeys)
            return previous
        params = self.params
        peers: dict[int, tuple[bytes, bytes]] = {}
        seen_keys = {
            _crypto.public_bytes(self._c_key),
            _crypto.public_bytes(self._s_key),
        }
        for entry in roster.peers:
            if entry.device not in self.neighbours or entry.device in peers:
                raise ProtocolViolation(f"roster names device {entry.device} unexpectedly")
            for key in (entry.c_public, entry.s_public):
                if key in seen_keys:
                    raise ProtocolViolation(f"roster repeats a public key (device {entry.device})")
                seen_keys.add(key)
            peers[entry.device] = (entry.c_public, entry.s_public)
        if len(peers) + 1 < params.threshold:
            raise AggregationFailed(
                f"device {self.device} has {len(peers)} live neighbours; the threshold "
                f"{params.threshold} needs {params.threshold - 1}"
            )
        holders = [self.device, *sorted(peers)]
        seed_shares = _shamir.split(int.from_bytes(self._seed, "big"), params.threshold, holders)
        s_secret = int.from_bytes(_crypto.private_bytes(self._s_key), "big")
        key_shares = _shamir.split(s_secret, params.threshold, holders)
        session = params.session
        encrypted = []
        c_secrets: dict[int, bytes] = {}
        for peer, (c_public, _) in sorted(peers.items()):
            b_share = _shamir.encode_element(seed_shares[peer])
            s_share = _shamir.encode_element(key_shares[peer])
            try:
                secret = _crypto.agree(self._c_key, c_public)
            except ValueError as exc:
                raise ProtocolViolation(f"unusable key for device {peer}: {exc}") from exc
            c_secrets[peer] = secret
            encrypted.append(
                EncryptedShare(
                    recipient=peer,
                    ciphertext=_crypto.encrypt_share(
                        secret, session, self.device, peer, b_share + s_share
                    ),
                    self_mask_digest=_crypto.share_digest(
                        session, b"b", self.device, peer, b_share
                    ),
                    key_digest=_crypto.share_digest(session, b"s", self.device, peer, s_share),
                )
            )
        self._peers = peers
        self._c_secrets = c_secrets
        self._own_share = seed_shares[self.device]
        own = _shamir.encode_element(self._own_share)
        message = ShareKeys(
            seed_commitment=_crypto.secret_digest(session, self.device, self._seed),
            own_share_digest=_crypto.share_digest(session, b"b", self.device, self.device, own),
            shares=encrypted,
        )
        self._sent[ClientStage.SHARE] = (roster, message)
        self.stage = ClientStage.MASK
        return message

    # -- stage 2 ---------------------------------------------------------------------------
    def _open(self, sender: int, ciphertext: bytes) -> tuple[int, int]:
        try:
            plaintext = _crypto.decrypt_share(
                self._c_secrets[sender], self.params.session, sender, self.device, ciphertext
            )
            half = _shamir.ELEMENT_BYTES
            return (
                _shamir.decode_element(plaintext[:half]),
                _shamir.decode_element(plaintext[half:]),
            )
        except ValueError as exc:
            raise InvalidShare(sender, str(exc)) from exc

    def masked_input(self, bundle: ShareBundle, vector: npt.NDArray[np.uint32]) -> MaskedInput:
        """Stage 2: ``vector`` (quantised, uint32) plus the self-mask and the pairwise masks,
        in Z_{2^modulus_bits}.

        Each relayed share is decrypted and checked; one that fails is recorded
        in `rejected_shares` (the sender still counts as a peer, so the pairwise
        masks cancel). The device masks with exactly the bundle's senders.
        """
        params = self.params
        values = np.asarray(vector)
        if values.dtype != np.uint32 or values.shape != (params.vector_length,):
            raise InvalidInput(
                f"masked_input wants a uint32 vector of length {params.vector_length}, "
                f"got {values.dtype} {values.shape}"
            )
        previous = self._replay(ClientStage.MASK, (bundle, values.tobytes()))
        if previous is not None:
            assert isinstance(previous, MaskedInput)
            return previous
        senders = [share.sender for share in bundle.shares]
        if len(set(senders)) != len(senders) or not set(senders) <= self._peers.keys():
            raise ProtocolViolation("the share bundle names a sender twice or a non-peer")
        if len(senders) + 1 < params.threshold:
            raise AggregationFailed(
                f"only {len(senders)} neighbours of device {self.device} shared keys; "
                f"threshold {params.threshold}"
            )
        received: dict[int, tuple[int, int]] = {}
        rejected: dict[int, InvalidShare] = {}
        for share in bundle.shares:
            try:
                received[share.sender] = self._open(share.sender, share.ciphertext)
            except InvalidShare as exc:
                rejected[share.sender] = exc
        expander = _crypto.MaskExpander(params.vector_length)
        masked = values.astype("<u4", copy=True)
        expander.add(masked, _crypto.self_mask_key(self._seed, params.session, self.device), +1)
        for peer in sorted(senders):
            try:
                secret = _crypto.agree(self._s_key, self._peers[peer][1])
            except ValueError as exc:
                raise ProtocolViolation(f"unusable mask key for device {peer}: {exc}") from exc
            key = _crypto.pairwise_mask_key(secret, params.session, self.device, peer)
            expander.add(masked, key, +1 if self.device < peer else -1)
        if params.modulus_bits < 32:  # the masks mod 2^b are the 32-bit masks' low bits
            np.bitwise_and(masked, np.uint32(params.modulus_mask), out=masked)
        message = MaskedInput(pack(masked, params.modulus_bits))
        self._received = received
        self.rejected_shares = rejected
        self._maskers = sorted(senders)
        self._sent[ClientStage.MASK] = ((bundle, values.tobytes()), message)
        self.stage = ClientStage.UNMASK
        return message

    # -- stage 3 ---------------------------------------------------------------------------
    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Stage 3: self-mask shares of the survivors, key shares of the dropped peers.

        The device checks that the request splits exactly the peers it masked
        with (and itself, a survivor) into two disjoint sets, with at least the
        threshold of survivors, and answers only one request per aggregation, so
        it never reveals both secrets of any device.
        """
        previous = self._replay(ClientStage.UNMASK, request)
        if previous is not None:
            assert isinstance(previous, UnmaskResponse)
            return previous
        survivors, dropped = set(request.survivors), set(request.dropped)
        if len(survivors) != len(request.survivors) or len(dropped) != len(request.dropped):
            raise ProtocolViolation("the unmask request repeats a device")
        if survivors & dropped:
            raise ProtocolViolation("the unmask request calls a device both survivor and dropped")
        if self.device not in survivors:
            raise ProtocolViolation("the unmask request does not count this device as a survivor")
        if survivors | dropped != {self.device, *self._maskers}:
            raise ProtocolViolation("the unmask request does not match the peers masked with")
        if len(survivors) < self.params.threshold:
            raise AggregationFailed(
                f"{len(survivors)} survivors around device {self.device}; threshold "
                f"{self.params.threshold}"
            )
        b_shares = [RevealedShare(self.device, _shamir.encode_element(self._own_share))]
        b_shares += [
            RevealedShare(v, _shamir.encode_element(self._received[v][0]))
            for v in sorted(survivors - {self.device})
            if v in self._received
        ]
        s_shares = [
            RevealedShare(v, _shamir.encode_element(self._received[v][1]))
            for v in sorted(dropped)
            if v in self._received
        ]
        message = UnmaskResponse(self_mask_shares=b_shares, key_shares=s_shares)
        self._sent[ClientStage.UNMASK] = (request, message)
        self.stage = ClientStage.DONE
        return message
