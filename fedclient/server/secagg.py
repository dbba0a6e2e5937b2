"""The server's role in secure aggregation (SecAgg / SecAgg+): a sans-io state machine.

The driver announces `SecAggParams` to the participants, then for each stage
feeds in what devices send and, when every expected device has answered
(`SecAggServer.waiting_for` is empty) or the stage's deadline passed, closes
the stage and sends each device its answer::

    server = SecAggServer(params, identities)
    server.receive_keys(device, KeyAdvertisement)        # stage 0, any order
    rosters = server.close_advertise()                   # {device: KeyRoster}
    server.receive_agreement(device, RosterSignature)    # stage 1
    agreements = server.close_agreement()                # {device: RosterAgreement}
    server.receive_shares(device, ShareKeys)             # stage 2
    bundles = server.close_sharing()                     # {device: ShareBundle}
    server.receive_masked_input(device, MaskedInput)     # stage 3
    lists = server.close_masking()                       # {device: SurvivorList}
    server.receive_consistency(device, SurvivorSignature)  # stage 4
    requests = server.close_consistency()                # {device: UnmaskRequest}
    server.receive_unmask(device, UnmaskResponse)        # stage 5
    result = server.finish()                             # SecAggResult

``device`` is the participant number the transport authenticated, and
``identities`` maps each participant to the identity key (and certificate) it
enrolled with: a key advertisement, a roster signature or a signed contributor
list must verify under it. Everything after the roster is bound to its digest
(`roster_context`), as the devices bind it. A rejected message raises
`fedclient.InvalidRequest` (malformed, wrong length, bad key or signature,
unknown device, share that does not match its commitment) or
`fedclient.Conflict` (its stage is not open, its device dropped out earlier, or
it differs from what the device already sent) and changes nothing, so it cannot
poison the round; an identical resend is accepted as a no-op. When too few
devices remain, the closing call or `finish` raises `AggregationFailed`
*before* anything is reconstructed: no device's input is revealed. The
reconstructed secrets are checked against the devices' commitments (the self-
mask seed's digest, the mask key's public key), so the sum is exact or the
aggregation fails; it is never silently wrong.

This role is what an honest server does; the devices (`SecAggClient`) check
everything it relays, so a server that deviates from it makes the round abort
rather than learn an input.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

import msgspec
import numpy as np
import numpy.typing as npt
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from fedclient._exceptions import Conflict, InvalidInput, InvalidRequest
from fedclient.identity import verify_signature
from fedclient.privacy.secagg import (
    AggregationFailed,
    EncryptedShare,
    KeyAdvertisement,
    KeyRoster,
    MaskedInput,
    PeerKeys,
    RelayedShare,
    RevealedShare,
    RosterAgreement,
    RosterSignature,
    SecAggParams,
    ShareBundle,
    ShareKeys,
    SurvivorList,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskResponse,
    Vouch,
    crypto,
    dequantize,
    roster_context,
    shamir,
    unpack,
)

__all__ = ["SecAggResult", "SecAggServer", "ServerStage"]


class ServerStage(StrEnum):
    """The stage a `SecAggServer` is collecting messages for."""

    ADVERTISE = "advertise"
    AGREE = "agree"
    SHARE = "share"
    MASK = "mask"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class SecAggResult:
    """The outcome of one aggregation.

    ``ring_sum`` is the exact sum in Z_{2^32} of the quantised inputs of the
    ``contributors`` (the devices whose masked input arrived in time) and
    ``total`` the same sum de-quantised to floats (divide by the number of
    contributors for a mean). ``dropped`` lists the devices that shared keys
    but sent no masked input: their masks were removed, their inputs are not in
    the sum.
    """

    ring_sum: npt.NDArray[np.uint32]
    total: npt.NDArray[np.float64]
    contributors: tuple[int, ...]
    dropped: tuple[int, ...]


def _digest(message: msgspec.Struct) -> bytes:
    return hashlib.sha256(msgspec.msgpack.encode(message)).digest()


class SecAggServer:
    """One secure aggregation, server side. See the module docstring for the call order."""

    def __init__(
        self, params: SecAggParams, identities: Mapping[int, tuple[bytes, bytes | None]]
    ) -> None:
        if set(identities) != set(params.participants):
            raise InvalidInput("every participant needs an identity key, and only they")
        self.params = params
        self.identities = dict(identities)
        self.graph: Mapping[int, frozenset[int]] = {}  # fixed by the roster (close_advertise)
        self.context = b""  # the roster's digest (close_advertise)
        self.stage = ServerStage.ADVERTISE
        self._participants = frozenset(params.participants)
        self._digests: dict[ServerStage, dict[int, bytes]] = {
            stage: {}
            for stage in (
                ServerStage.ADVERTISE,
                ServerStage.AGREE,
                ServerStage.SHARE,
                ServerStage.MASK,
                ServerStage.CONSISTENCY,
                ServerStage.UNMASK,
            )
        }
        self._keys: dict[int, KeyAdvertisement] = {}
        self._key_owner: dict[bytes, int] = {}
        self._u1: frozenset[int] = frozenset()
        self._agreements: dict[int, bytes] = {}
        self._agreed: frozenset[int] = frozenset()
        self._shares: dict[int, ShareKeys] = {}
        self._share_index: dict[int, dict[int, EncryptedShare]] = {}
        self._u2: frozenset[int] = frozenset()
        self._sum = np.zeros(params.vector_length, dtype="<u4")
        self._u3: frozenset[int] = frozenset()
        self._vouches: dict[int, bytes] = {}
        self._u4: frozenset[int] = frozenset()
        self._b_shares: dict[int, dict[int, int]] = {}
        self._s_shares: dict[int, dict[int, int]] = {}
        self._result: SecAggResult | None = None
        self._failure: AggregationFailed | None = None

    # -- bookkeeping -----------------------------------------------------------------------
    @property
    def waiting_for(self) -> frozenset[int]:
        """Devices the current stage still expects a message from."""
        if self.stage not in self._digests:
            return frozenset()
        return frozenset(self._expected(self.stage) - self._digests[self.stage].keys())

    def _expected(self, stage: ServerStage) -> frozenset[int]:
        return {
            ServerStage.ADVERTISE: self._participants,
            ServerStage.AGREE: self._u1,
            ServerStage.SHARE: self._agreed,
            ServerStage.MASK: self._u2,
            ServerStage.CONSISTENCY: self._u3,
            ServerStage.UNMASK: self._u4,
        }[stage]

    def _admit(self, device: int, stage: ServerStage, digest: bytes) -> bool:
        """Check ``device`` may send for ``stage``; False if this exact message was accepted."""
        if device not in self._participants:
            raise InvalidRequest(f"device {device} is not a participant of this aggregation")
        seen = self._digests[stage]
        if device in seen:
            if seen[device] == digest:
                return False  # a resend of what was accepted: nothing to do
            raise Conflict(f"device {device} already sent a different {stage.value} message")
        self._expect_open(stage)
        if device not in self._expected(stage):
            raise Conflict(f"device {device} dropped out of this aggregation at an earlier stage")
        return True

    def _fail(self, reason: str) -> AggregationFailed:
        self.stage = ServerStage.FAILED
        self._failure = AggregationFailed(reason)
        return self._failure

    def _prune(self, alive: Iterable[int]) -> frozenset[int]:
        """Drop devices with fewer than ``threshold`` live share-holders, until none is left."""
        t = self.params.threshold
        live = set(alive)
        changed = True
        while changed:
            changed = False
            for device in sorted(live):
                if len(self.graph[device] & live) + 1 < t:
                    live.discard(device)
                    changed = True
        return frozenset(live)

    # -- stage 0: advertise keys -----------------------------------------------------------
    def receive_keys(self, device: int, message: KeyAdvertisement) -> None:
        """Accept a device's two public keys (32 bytes each, usable, never seen before)."""
        digest = _digest(message)
        if not self._admit(device, ServerStage.ADVERTISE, digest):
            return
        keys = (message.c_public, message.s_public)
        if keys[0] == keys[1]:
            raise InvalidRequest("the encryption and mask keys must differ")
        statement = crypto.advertisement_message(
            self.params.session, device, message.c_public, message.s_public
        )
        if not verify_signature(self.identities[device][0], message.signature, statement):
            raise InvalidRequest("the key advertisement is not signed by the device's identity")
        for key in keys:
            try:
                crypto.check_public_key(key)
            except ValueError as exc:
                raise InvalidRequest(f"unusable X25519 public key: {exc}") from exc
            if key in self._key_owner:
                raise InvalidRequest("public key already advertised by another device")
        self._keys[device] = message
        self._digests[ServerStage.ADVERTISE][device] = digest
        for key in keys:
            self._key_owner[key] = device

    def close_advertise(self) -> dict[int, KeyRoster]:
        """End stage 0: every advertiser gets the same roster of every advertisement.

        The neighbour graph is laid over the advertisers from the roster's digest, as
        each device will lay it. Raises `AggregationFailed` if fewer than the
        threshold, or the floor, advertised.
        """
        self._expect_open(ServerStage.ADVERTISE)
        advertisers = sorted(self._keys)
        needed = max(self.params.threshold, self.params.min_contributors)
        if len(advertisers) < needed:
            raise self._fail(
                f"{len(advertisers)} devices advertised keys; the threshold "
                f"{self.params.threshold} and the floor {self.params.min_contributors} "
                f"need {needed}"
            )
        peers = []
        for device in advertisers:
            keys = self._keys[device]
            identity, certificate = self.identities[device]
            peers.append(
                PeerKeys(
                    device,
                    keys.c_public,
                    keys.s_public,
                    keys.signature,
                    identity,
                    certificate or b"",
                )
            )
        self.context = roster_context(self.params, peers)
        self.graph = self.params.graph_for(advertisers, self.context)
        self._u1 = frozenset(advertisers)
        roster = KeyRoster(peers)
        self.stage = ServerStage.AGREE
        return {device: roster for device in advertisers}

    def _expect_open(self, stage: ServerStage) -> None:
        if self.stage == ServerStage.FAILED and self._failure is not None:
            raise Conflict(f"the aggregation failed: {self._failure}")
        if self.stage != stage:
            raise Conflict(f"the {stage.value} stage is not open ({self.stage.value})")

    # -- stage 1: agree on the roster -------------------------------------------------------
    def receive_agreement(self, device: int, message: RosterSignature) -> None:
        """Accept a device's signature of the roster's digest."""
        digest = hashlib.sha256(message.signature).digest()
        if not self._admit(device, ServerStage.AGREE, digest):
            return
        statement = crypto.roster_message(self.context)
        if not verify_signature(self.identities[device][0], message.signature, statement):
            raise InvalidRequest("the roster signature does not verify under the device's identity")
        self._agreements[device] = message.signature
        self._digests[ServerStage.AGREE][device] = digest

    def close_agreement(self) -> dict[int, RosterAgreement]:
        """End stage 1: every signer gets every signature of the roster.

        Each device decides for itself whether they are enough (`SecAggClient.share_keys`);
        raises `AggregationFailed` if fewer than the threshold, or the floor, signed."""
        self._expect_open(ServerStage.AGREE)
        signers = sorted(self._agreements)
        needed = max(self.params.threshold, self.params.min_contributors)
        if len(signers) < needed:
            raise self._fail(f"{len(signers)} devices agreed on the roster; {needed} needed")
        self._agreed = frozenset(signers)
        agreement = RosterAgreement([Vouch(d, self._agreements[d]) for d in signers])
        self.stage = ServerStage.SHARE
        return {device: agreement for device in signers}

    # -- stage 2: share keys ---------------------------------------------------------------
    def receive_shares(self, device: int, message: ShareKeys) -> None:
        """Accept a device's encrypted shares: one per live neighbour, each well-formed."""
        digest = _digest(message)
        if not self._admit(device, ServerStage.SHARE, digest):
            return
        if len(message.seed_commitment) != 32:
            raise InvalidRequest("seed_commitment must be 32 bytes")
        if len(message.own_share_digest) != crypto.DIGEST_BYTES:
            raise InvalidRequest(f"own_share_digest must be {crypto.DIGEST_BYTES} bytes")
        expected = self.graph[device] & self._u1
        index: dict[int, EncryptedShare] = {}
        for share in message.shares:
            if share.recipient not in expected or share.recipient in index:
                raise InvalidRequest(f"unexpected or repeated share recipient {share.recipient}")
            if len(share.ciphertext) != crypto.SHARE_CIPHERTEXT_BYTES:
                raise InvalidRequest(
                    f"share ciphertext for {share.recipient} is {len(share.ciphertext)} bytes, "
                    f"not {crypto.SHARE_CIPHERTEXT_BYTES}"
                )
            if (
                len(share.self_mask_digest) != crypto.DIGEST_BYTES
                or len(share.key_digest) != crypto.DIGEST_BYTES
            ):
                raise InvalidRequest(f"share digests must be {crypto.DIGEST_BYTES} bytes")
            index[share.recipient] = share
        if index.keys() != expected:
            missing = sorted(expected - index.keys())
            raise InvalidRequest(f"shares missing for live neighbours {missing[:10]}")
        self._shares[device] = message
        self._share_index[device] = index
        self._digests[ServerStage.SHARE][device] = digest

    def close_sharing(self) -> dict[int, ShareBundle]:
        """End stage 2: each device's bundle of the shares addressed to it.

        A device whose live share-holders fell under the threshold is dropped,
        and its neighbours will not mask with it. Raises `AggregationFailed` if
        nobody is left.
        """
        self._expect_open(ServerStage.SHARE)
        self._u2 = self._prune(self._shares)
        if not self._u2:
            raise self._fail(
                f"{len(self._shares)} devices shared keys; too few for threshold "
                f"{self.params.threshold}"
            )
        bundles = {}
        for device in sorted(self._u2):
            relayed = [
                RelayedShare(sender, self._share_index[sender][device].ciphertext)
                for sender in sorted(self.graph[device] & self._u2)
            ]
            bundles[device] = ShareBundle(relayed)
        self.stage = ServerStage.MASK
        return bundles

    # -- stage 3: masked input -------------------------------------------------------------
    def receive_masked_input(self, device: int, message: MaskedInput) -> None:
        """Accept a masked input of exactly ``vector_length`` values of ``modulus_bits`` bits
        and add it to the sum."""
        digest = hashlib.sha256(message.vector).digest()
        if not self._admit(device, ServerStage.MASK, digest):
            return
        params = self.params
        try:
            vector = unpack(message.vector, params.modulus_bits, params.vector_length)
        except InvalidInput as exc:
            raise InvalidRequest(f"masked input: {exc}") from None
        if params.modulus_bits < 32 and int(vector.max(initial=0)) > params.modulus_mask:
            raise InvalidRequest("masked input values exceed the modulus")
        np.add(self._sum, vector, out=self._sum)
        self._digests[ServerStage.MASK][device] = digest

    def close_masking(self) -> dict[int, SurvivorList]:
        """End stage 3: show each contributor the contributor list, to sign.

        Raises `AggregationFailed` (and shows nothing) if some contributor's
        self-mask or some dropped device's mask key could not reach the
        threshold of shares from the contributors.
        """
        self._expect_open(ServerStage.MASK)
        u3 = frozenset(self._digests[ServerStage.MASK])
        self._check_recoverable(u3, "sent a masked input")
        self._u3 = u3
        listed = SurvivorList(sorted(u3))
        self.stage = ServerStage.CONSISTENCY
        return {device: listed for device in sorted(u3)}

    def _check_recoverable(self, holders: frozenset[int], what: str) -> None:
        """Fail unless ``holders`` hold the threshold of shares of every contributor's
        self-mask seed and every dropped device's mask key."""
        t = self.params.threshold
        u3 = self._u3 or holders
        short = [
            d for d in sorted(u3) if len((self.graph[d] & self._u2 & holders) | ({d} & holders)) < t
        ]
        short += [
            d
            for d in sorted(self._u2 - u3)
            if self.graph[d] & u3 and len(self.graph[d] & holders) < t
        ]
        if not holders or short:
            raise self._fail(
                f"{len(holders)} of {len(self._u2)} devices {what}; devices "
                f"{short[:10]} cannot reach the threshold {t} of surviving share-holders"
            )

    # -- stage 4: consistency --------------------------------------------------------------
    def receive_consistency(self, device: int, message: SurvivorSignature) -> None:
        """Accept a contributor's signature of the contributor list."""
        digest = hashlib.sha256(message.signature).digest()
        if not self._admit(device, ServerStage.CONSISTENCY, digest):
            return
        statement = crypto.survivors_message(self.context, sorted(self._u3))
        if not verify_signature(self.identities[device][0], message.signature, statement):
            raise InvalidRequest("the contributor list is not signed by the device's identity")
        self._vouches[device] = message.signature
        self._digests[ServerStage.CONSISTENCY][device] = digest

    def close_consistency(self) -> dict[int, UnmaskRequest]:
        """End stage 4: every signer gets the list and all the signatures of it.

        Raises `AggregationFailed` if the signers could not unmask the sum."""
        self._expect_open(ServerStage.CONSISTENCY)
        u4 = frozenset(self._vouches)
        self._check_recoverable(u4, "signed the contributor list")
        self._u4 = u4
        request = UnmaskRequest(sorted(self._u3), [Vouch(d, self._vouches[d]) for d in sorted(u4)])
        self.stage = ServerStage.UNMASK
        return {device: request for device in sorted(u4)}

    # -- stage 5: unmask -------------------------------------------------------------------
    def receive_unmask(self, device: int, message: UnmaskResponse) -> None:
        """Accept a device's revealed shares; each must match its owner's commitment."""
        digest = _digest(message)
        if not self._admit(device, ServerStage.UNMASK, digest):
            return
        maskers = self.graph[device] & self._u2
        survivors = sorted((maskers & self._u3) | {device})
        dropped = sorted(maskers - self._u3)
        b_new = self._check_revealed(device, message.self_mask_shares, survivors, b"b")
        s_new = self._check_revealed(device, message.key_shares, dropped, b"s")
        for owner, value in b_new.items():
            self._b_shares.setdefault(owner, {})[device] = value
        for owner, value in s_new.items():
            self._s_shares.setdefault(owner, {})[device] = value
        self._digests[ServerStage.UNMASK][device] = digest

    def _check_revealed(
        self, holder: int, revealed: Iterable[RevealedShare], allowed: list[int], kind: bytes
    ) -> dict[int, int]:
        context = self.context
        allowed_set = set(allowed)
        values: dict[int, int] = {}
        for item in revealed:
            owner = item.owner
            if owner not in allowed_set or owner in values:
                raise InvalidRequest(f"unexpected or repeated share of device {owner}")
            try:
                value = shamir.decode_element(item.value)
            except ValueError as exc:
                raise InvalidRequest(f"share of device {owner}: {exc}") from exc
            if kind == b"b" and owner == holder:
                expected = self._shares[owner].own_share_digest
            else:
                dealt = self._share_index[owner][holder]
                expected = dealt.self_mask_digest if kind == b"b" else dealt.key_digest
            if crypto.share_digest(context, kind, owner, holder, item.value) != expected:
                raise InvalidRequest(f"share of device {owner} does not match its commitment")
            values[owner] = value
        return values

    def finish(self) -> SecAggResult:
        """End stage 5: reconstruct, remove every mask, and return the exact sum.

        Raises `AggregationFailed` if a contributor's self-mask seed or a
        dropped device's mask key has fewer than ``threshold`` shares, checked
        before anything is reconstructed, or if a reconstructed secret does not
        match its commitment.
        """
        if self._result is not None:
            return self._result
        self._expect_open(ServerStage.UNMASK)
        params, t = self.params, self.params.threshold
        dropped = sorted(d for d in self._u2 - self._u3 if self.graph[d] & self._u3)
        short = [d for d in sorted(self._u3) if len(self._b_shares.get(d, {})) < t]
        short += [d for d in dropped if len(self._s_shares.get(d, {})) < t]
        if short:
            raise self._fail(
                f"{len(self._digests[ServerStage.UNMASK])} of {len(self._u4)} signers "
                f"answered the unmask request; devices {short[:10]} have fewer than {t} shares"
            )
        context = self.context
        seeds: dict[int, bytes] = {}
        for device in sorted(self._u3):
            secret = shamir.reconstruct(self._b_shares[device], t)
            seed = secret.to_bytes(shamir.ELEMENT_BYTES, "big")[-32:]
            if (
                secret >= 2**256
                or crypto.secret_digest(context, device, seed)
                != self._shares[device].seed_commitment
            ):
                raise self._fail(f"device {device}'s self-mask seed does not match its commitment")
            seeds[device] = seed
        mask_keys: dict[int, X25519PrivateKey] = {}
        for device in dropped:
            secret = shamir.reconstruct(self._s_shares[device], t)
            key = X25519PrivateKey.from_private_bytes(
                secret.to_bytes(shamir.ELEMENT_BYTES, "big")[-32:]
            )
            if secret >= 2**256 or crypto.public_bytes(key) != self._keys[device].s_public:
                raise self._fail(f"device {device}'s mask key does not match its public key")
            mask_keys[device] = key
        expander = crypto.MaskExpander(params.vector_length)
        total = self._sum.copy()
        for device, seed in seeds.items():
            expander.add(total, crypto.self_mask_key(seed, context, device), -1)
        for device, key in mask_keys.items():
            for survivor in sorted(self.graph[device] & self._u3):
                agreed = crypto.agree(key, self._keys[survivor].s_public)
                pair_key = crypto.pairwise_mask_key(agreed, context, survivor, device)
                # The survivor added +mask if its number is the smaller one.
                expander.add(total, pair_key, -1 if survivor < device else +1)
        ring_sum = (total & np.uint32(params.modulus_mask)).astype(np.uint32)
        self._result = SecAggResult(
            ring_sum=ring_sum,
            total=dequantize(ring_sum, params.quantization),
            contributors=tuple(sorted(self._u3)),
            dropped=tuple(sorted(self._u2 - self._u3)),
        )
        self.stage = ServerStage.DONE
        return self._result
