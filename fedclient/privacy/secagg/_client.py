"""The device's role in secure aggregation: a sans-io state machine.

The driver moves one `SecAggClient` through five calls, sending what each
returns to the server and passing in what the server answers::

    client = SecAggClient(params, device, signer)
    send(client.advertise_keys())                    # stage 0
    send(client.share_keys(roster))                  # stage 1, roster: KeyRoster
    send(client.masked_input(bundle, quantized))     # stage 2, bundle: ShareBundle
    send(client.consistency(survivors))              # stage 3, survivors: SurvivorList
    send(client.unmask(request))                     # stage 4, request: UnmaskRequest

The device trusts the server with nothing it can check itself (Bonawitz et al.
2017's actively secure variant):

- every roster entry is a key advertisement signed with an identity key, which
  an identity authority the device pins must have certified (when it pins one);
  no identity, device or key appears twice;
- the SecAgg+ graph comes from a hash of the whole roster, not from the server;
- a relayed share that does not decrypt aborts the aggregation before the
  device masks anything (it would otherwise mask with a peer whose share of
  its secrets went to the server);
- it signs one contributor list per aggregation, and unmasks only for that
  list, signed by more devices than a server colluding with the tolerated
  share of them could get to sign two different lists; it takes its own
  neighbours' status from that list, so honest devices agree on who dropped
  and never reveal both secrets of one device;
- the list must be at least ``min_contributors`` long (a small sum says too
  much about each input; distributed DP's noise needs that many shares).

Each call may be repeated with the same argument (a retried request gets the
same message back); a call with a different argument for a stage already done
raises `ProtocolViolation`. Secrets (X25519 keys, the self-mask seed, the
Shamir coefficients, the AES-GCM nonces) come from the OS CSPRNG and live only
in memory: a device that restarts mid-aggregation has simply dropped out,
which the protocol tolerates, and can never send a second, different masked
input.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from enum import StrEnum

import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedclient._exceptions import InvalidInput
from fedclient.identity import SigningKey, verify_certificate, verify_signature
from fedclient.privacy.secagg import _crypto, _shamir
from fedclient.privacy.secagg._choice import safe_threshold
from fedclient.privacy.secagg._encoding import pack
from fedclient.privacy.secagg._errors import AggregationFailed, InvalidShare, ProtocolViolation
from fedclient.privacy.secagg._messages import (
    EncryptedShare,
    KeyAdvertisement,
    KeyRoster,
    MaskedInput,
    PeerKeys,
    RevealedShare,
    ShareBundle,
    ShareKeys,
    SurvivorList,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskResponse,
)
from fedclient.privacy.secagg._params import SecAggParams

__all__ = ["ClientStage", "SecAggClient", "signature_quorum"]


def signature_quorum(advertised: int, colluding_fraction: float) -> int:
    """Signatures of one contributor list a device wants before it unmasks.

    Of ``advertised`` devices at most ``c = ceil(colluding_fraction * advertised)``
    collude with the server and sign anything; honest ones sign one list. Two
    different lists each signed by ``q`` devices need ``2q - advertised`` devices
    that signed both, so ``q = floor((advertised + c) / 2) + 1`` leaves room for
    one list only."""
    colluding = math.ceil(colluding_fraction * advertised)
    return (advertised + colluding) // 2 + 1


class ClientStage(StrEnum):
    """The next call a `SecAggClient` expects."""

    ADVERTISE = "advertise"
    SHARE = "share"
    MASK = "mask"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"
    DONE = "done"


class SecAggClient:
    """One device (number ``device`` in ``params.participants``) in one secure aggregation.

    ``signer`` is the device's identity key. ``trusted_authorities``: identity
    authorities' public keys; if any, every peer must hold a certificate from one.
    ``min_contributors``: the fewest contributors it unmasks a sum of.
    ``colluding_fraction``: the share of devices it assumes may collude with the
    server: the threshold must be safe against them (`safe_threshold`, checked
    here, raising `ProtocolViolation`) and so must the signatures it wants before
    unmasking (`signature_quorum`). Its two X25519 key pairs and its self-mask seed
    are drawn from the OS CSPRNG when it is created; they never leave memory.
    """

    def __init__(
        self,
        params: SecAggParams,
        device: int,
        signer: SigningKey,
        *,
        trusted_authorities: Iterable[bytes] = (),
        min_contributors: int = 2,
        colluding_fraction: float = 0.2,
    ) -> None:
        if device not in params.participants:
            raise InvalidInput(f"device {device} is not a participant of this aggregation")
        if not 0 <= colluding_fraction < 1:
            raise InvalidInput(f"colluding_fraction must be in [0, 1), got {colluding_fraction}")
        safe = safe_threshold(len(params.participants), params.neighbours, colluding_fraction)
        if params.threshold < safe:
            raise ProtocolViolation(
                f"threshold {params.threshold} lets {colluding_fraction:.0%} colluding devices "
                f"rebuild a device's secrets; this device wants at least {safe}"
            )
        self.params = params
        self.device = device
        self.signer = signer
        self.trusted_authorities = tuple(trusted_authorities)
        self.min_contributors = max(2, min_contributors)
        self.colluding_fraction = colluding_fraction
        self.stage = ClientStage.ADVERTISE
        self.neighbours: frozenset[int] = frozenset()
        self._c_key = X25519PrivateKey.generate()
        self._s_key = X25519PrivateKey.generate()
        self._seed = os.urandom(32)
        self._identities: dict[int, bytes] = {}  # every advertiser's identity key
        self._peers: dict[int, tuple[bytes, bytes]] = {}  # neighbours' (c, s) keys
        self._c_secrets: dict[int, bytes] = {}
        self._own_share = 0
        self._received: dict[int, tuple[int, int]] = {}
        self._maskers: list[int] = []
        self._contributors: list[int] | None = None
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

    def _public_keys(self) -> tuple[bytes, bytes]:
        return _crypto.public_bytes(self._c_key), _crypto.public_bytes(self._s_key)

    # -- stage 0 ---------------------------------------------------------------------------
    def advertise_keys(self) -> KeyAdvertisement:
        """Stage 0: the two fresh public keys, signed with the identity key."""
        c_public, s_public = self._public_keys()
        statement = _crypto.advertisement_message(
            self.params.session, self.device, c_public, s_public
        )
        message = KeyAdvertisement(c_public, s_public, self.signer.sign(statement))
        if self.stage == ClientStage.ADVERTISE:
            self._sent[ClientStage.ADVERTISE] = (None, message)
            self.stage = ClientStage.SHARE
        return message

    # -- stage 1 ---------------------------------------------------------------------------
    def _check_roster(self, roster: KeyRoster) -> None:
        """Every entry signed by a distinct (certified) identity, this device's as sent."""
        params, session = self.params, self.params.session
        mine = self._sent[ClientStage.ADVERTISE][1]
        assert isinstance(mine, KeyAdvertisement)
        identities: dict[int, bytes] = {}
        seen_keys: set[bytes] = set()
        for entry in roster.peers:
            who = entry.device
            if who not in params.participants or who in identities:
                raise ProtocolViolation(f"roster names device {who} unexpectedly")
            if entry.identity_key in identities.values():
                raise ProtocolViolation(f"roster repeats an identity key (device {who})")
            for key in (entry.c_public, entry.s_public):
                if key in seen_keys:
                    raise ProtocolViolation(f"roster repeats a public key (device {who})")
                seen_keys.add(key)
            if self.trusted_authorities and not verify_certificate(
                self.trusted_authorities, entry.identity_key, entry.certificate
            ):
                raise ProtocolViolation(
                    f"device {who}'s identity is not certified by a trusted authority"
                )
            statement = _crypto.advertisement_message(session, who, entry.c_public, entry.s_public)
            if not verify_signature(entry.identity_key, entry.signature, statement):
                raise ProtocolViolation(f"device {who}'s keys are not signed by its identity")
            if who == self.device and (
                entry.identity_key != self.signer.public
                or (entry.c_public, entry.s_public) != (mine.c_public, mine.s_public)
            ):
                raise ProtocolViolation("the roster does not carry this device's own keys")
            identities[who] = entry.identity_key
        if self.device not in identities:
            raise ProtocolViolation("the roster leaves this device out")
        self._identities = identities

    def share_keys(self, roster: KeyRoster) -> ShareKeys:
        """Stage 1: Shamir shares of the self-mask seed and of the mask key, encrypted per
        neighbour.

        Raises `ProtocolViolation` if any roster entry fails its checks (see the module
        docstring) or holds an unusable key; `AggregationFailed` if too few devices are
        left to reach the threshold.
        """
        previous = self._replay(ClientStage.SHARE, roster)
        if previous is not None:
            assert isinstance(previous, ShareKeys)
            return previous
        params = self.params
        self._check_roster(roster)
        entries: dict[int, PeerKeys] = {e.device: e for e in roster.peers}
        seed = _crypto.roster_seed(
            params.session,
            [(e.device, e.c_public, e.s_public, e.identity_key) for e in roster.peers],
        )
        self.neighbours = params.graph_for(sorted(entries), seed)[self.device]
        peers = {d: (entries[d].c_public, entries[d].s_public) for d in self.neighbours}
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

        Every relayed share must decrypt and decode; one that does not raises
        `InvalidShare` and nothing is masked or sent (its sender's keys were signed,
        so only tampering explains it). The device masks with exactly the bundle's
        senders.
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
        received = {
            share.sender: self._open(share.sender, share.ciphertext) for share in bundle.shares
        }
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
        self._maskers = sorted(senders)
        self._sent[ClientStage.MASK] = ((bundle, values.tobytes()), message)
        self.stage = ClientStage.CONSISTENCY
        return message

    # -- stage 3 ---------------------------------------------------------------------------
    def consistency(self, survivors: SurvivorList) -> SurvivorSignature:
        """Stage 3: sign the contributor list, after checking it.

        It must be sorted and distinct, name this device and only devices of the
        roster, name every neighbour that masked with this device or explicitly
        leave it out as dropped (a neighbour in the list that did not share with this
        device is a contradiction), and be at least ``min_contributors`` and the
        threshold long (else `AggregationFailed`). The device signs one list per
        aggregation."""
        previous = self._replay(ClientStage.CONSISTENCY, survivors)
        if previous is not None:
            assert isinstance(previous, SurvivorSignature)
            return previous
        listed = survivors.contributors
        if listed != sorted(set(listed)):
            raise ProtocolViolation("the contributor list is not sorted and distinct")
        if self.device not in listed:
            raise ProtocolViolation("the contributor list leaves this device out")
        if not set(listed) <= self._identities.keys():
            raise ProtocolViolation("the contributor list names a device that never advertised")
        if set(listed) & self.neighbours - set(self._maskers):
            raise ProtocolViolation("the contributor list names a neighbour that never shared")
        needed = max(self.min_contributors, self.params.threshold)
        if len(listed) < needed:
            raise AggregationFailed(
                f"{len(listed)} contributors; device {self.device} unmasks sums of {needed} or more"
            )
        statement = _crypto.survivors_message(self.params.session, listed)
        message = SurvivorSignature(self.signer.sign(statement))
        self._contributors = list(listed)
        self._sent[ClientStage.CONSISTENCY] = (survivors, message)
        self.stage = ClientStage.UNMASK
        return message

    # -- stage 4 ---------------------------------------------------------------------------
    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Stage 4: self-mask shares of the surviving neighbours, key shares of the
        dropped ones.

        The request must carry the very list this device signed, and valid signatures
        of it from at least `signature_quorum` devices of the roster (any invalid one
        aborts). Survivors and dropouts are read from that list, not from the server.
        """
        previous = self._replay(ClientStage.UNMASK, request)
        if previous is not None:
            assert isinstance(previous, UnmaskResponse)
            return previous
        listed = self._contributors
        assert listed is not None
        if request.contributors != listed:
            raise ProtocolViolation("the unmask request is for another contributor list")
        statement = _crypto.survivors_message(self.params.session, listed)
        vouched: set[int] = set()
        for vouch in request.signatures:
            key = self._identities.get(vouch.device)
            if key is None or vouch.device not in listed or vouch.device in vouched:
                raise ProtocolViolation(f"unexpected signature from device {vouch.device}")
            if not verify_signature(key, vouch.signature, statement):
                raise ProtocolViolation(f"device {vouch.device}'s signature does not verify")
            vouched.add(vouch.device)
        quorum = signature_quorum(len(self._identities), self.colluding_fraction)
        if len(vouched) < quorum:
            raise ProtocolViolation(
                f"{len(vouched)} devices signed the contributor list; {quorum} needed"
            )
        alive = set(listed)
        survivors = (set(self._maskers) & alive) | {self.device}
        dropped = set(self._maskers) - alive
        if len(survivors) < self.params.threshold:
            raise AggregationFailed(
                f"{len(survivors)} survivors around device {self.device}; threshold "
                f"{self.params.threshold}"
            )
        b_shares = [RevealedShare(self.device, _shamir.encode_element(self._own_share))]
        b_shares += [
            RevealedShare(v, _shamir.encode_element(self._received[v][0]))
            for v in sorted(survivors - {self.device})
        ]
        s_shares = [
            RevealedShare(v, _shamir.encode_element(self._received[v][1])) for v in sorted(dropped)
        ]
        message = UnmaskResponse(self_mask_shares=b_shares, key_shares=s_shares)
        self._sent[ClientStage.UNMASK] = (request, message)
        self.stage = ClientStage.DONE
        return message
