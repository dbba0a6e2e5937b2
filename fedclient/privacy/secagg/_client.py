"""The device's role in secure aggregation: a sans-io state machine.

The driver moves one `SecAggClient` through six calls, sending what each
returns to the server and passing in what the server answers::

    client = SecAggClient(params, device, signer, trusted_authorities=[authority])
    send(client.advertise_keys())                    # stage 0
    send(client.agree(roster))                       # stage 1, roster: KeyRoster
    send(client.share_keys(agreement))               # stage 2, agreement: RosterAgreement
    send(client.masked_input(bundle, quantized))     # stage 3, bundle: ShareBundle
    send(client.consistency(survivors))              # stage 4, survivors: SurvivorList
    send(client.unmask(request))                     # stage 5, request: UnmaskRequest

The server writes the parameters, the roster, the dropout lists and every
relay, and may control up to the colluders the device assumes. The device
trusts it with nothing it can check itself (Bonawitz et al. 2017's actively
secure variant, with the roster agreed as in their malicious-server section):

- **Identities.** Every roster entry is a key advertisement signed with an
  identity key, which an identity authority the device pins must have
  certified; no identity, device or key appears twice. Without a pinned
  authority the identity keys come from the server, so signatures prove nothing
  about who is behind them: the device refuses unless told to trust the server's
  identities (``trust_server_identities``: an honest-but-curious server).
- **Cohort bounds, from the device's own policy.** It assumes ``c`` colluders:
  ``colluding_fraction`` of the announced participants, or ``colluding_devices``
  if more. The aggregation's floor (``params.min_contributors``, no contributor
  list below it is unmasked) must leave at least ``min_honest`` devices beyond
  them; the roster it is shown must reach the floor; and the threshold must be
  out of the colluders' reach among its neighbours *in that roster* (a roster
  small enough to make the SecAgg+ graph complete puts every colluder among them).
- **One roster, agreed before any share leaves.** The device signs the digest
  of the parameters and roster it was shown, and shares its secrets only when
  `signature_quorum` devices of that roster signed the same digest: more than
  half of the roster beyond the colluders, so no two disjoint groups of honest
  devices both proceed with views of one roster. The digest is the context of
  every share's key and authentication, every mask and every commitment after
  it: a share made for one view does not open under another, so a device's
  shares reach only devices that saw its roster.
- **The graph** of SecAgg+ comes from that digest, which the devices' fresh keys
  are in, not from the server.
- **Shares.** A relayed share that does not decrypt aborts the aggregation
  before the device masks anything (it would otherwise mask with a peer whose
  share of its secrets went to the server).
- **One contributor list.** It signs one contributor list per aggregation
  (bound to the roster's digest), and unmasks only for that list, signed by
  `signature_quorum` devices of the roster: two different lists would need a
  device beyond the colluders to sign both. It takes its own neighbours' status
  from that list, so honest devices agree on who dropped and never reveal both
  secrets of one device. The list must reach the floor.

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
from fedclient.privacy.secagg import crypto, shamir
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
    RosterAgreement,
    RosterSignature,
    ShareBundle,
    ShareKeys,
    SurvivorList,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskResponse,
    Vouch,
)
from fedclient.privacy.secagg._params import SecAggParams, roster_context

__all__ = ["ClientStage", "SecAggClient", "assumed_colluders", "signature_quorum"]


def assumed_colluders(
    participants: int, colluding_fraction: float, colluding_devices: int = 0
) -> int:
    """How many devices of an aggregation announced with ``participants`` a device assumes
    collude with the server: ``colluding_fraction`` of them, or ``colluding_devices`` if
    more (an absolute bound holds however small a cohort the server announces)."""
    return max(math.ceil(colluding_fraction * participants), colluding_devices)


def signature_quorum(roster: int, colluders: int) -> int:
    """Signatures (from devices of a ``roster``-device roster) a device wants over a
    statement before it acts on it: the roster's digest before it shares, the contributor
    list before it unmasks.

    At most ``colluders`` devices sign anything; honest ones sign one statement of each
    kind. Two different statements each signed by ``q`` devices of the roster need
    ``2q - roster`` devices that signed both, so ``q = floor((roster + colluders) / 2) + 1``
    leaves room for one only: more than half the roster beyond the colluders."""
    return (roster + colluders) // 2 + 1


class ClientStage(StrEnum):
    """The next call a `SecAggClient` expects."""

    ADVERTISE = "advertise"
    AGREE = "agree"
    SHARE = "share"
    MASK = "mask"
    CONSISTENCY = "consistency"
    UNMASK = "unmask"
    DONE = "done"


class SecAggClient:
    """One device (number ``device`` in ``params.participants``) in one secure aggregation.

    ``signer`` is the device's identity key. ``trusted_authorities``: identity
    authorities' public keys; every peer must hold a certificate from one. With none,
    ``trust_server_identities=True`` must say that the identity keys the server relays
    are taken as they come (else `fedclient.InvalidInput`): the server could then
    make up every peer. ``colluding_fraction`` and ``colluding_devices``: the
    colluders it assumes (`assumed_colluders`); ``min_honest``: the fewest contributors
    beyond them it lets its input be unmasked with. The parameters must be safe
    against those (the threshold out of the colluders' reach, a floor of at least
    ``min_honest`` + colluders), else `ProtocolViolation` here, before any key exists.
    ``security_bits``: the chance a SecAgg+ neighbourhood holds the threshold of
    colluders, as in `safe_threshold`. Its two X25519 key pairs and its self-mask seed
    are drawn from the OS CSPRNG when it is created; they never leave memory.
    """

    def __init__(
        self,
        params: SecAggParams,
        device: int,
        signer: SigningKey,
        *,
        trusted_authorities: Iterable[bytes] = (),
        trust_server_identities: bool = False,
        min_honest: int = 2,
        colluding_fraction: float = 0.2,
        colluding_devices: int = 0,
        security_bits: float = 40.0,
    ) -> None:
        if device not in params.participants:
            raise InvalidInput(f"device {device} is not a participant of this aggregation")
        if not 0 <= colluding_fraction < 1:
            raise InvalidInput(f"colluding_fraction must be in [0, 1), got {colluding_fraction}")
        if colluding_devices < 0 or min_honest < 1:
            raise InvalidInput("colluding_devices must be >= 0 and min_honest >= 1")
        self.trusted_authorities = tuple(trusted_authorities)
        if not self.trusted_authorities and not trust_server_identities:
            raise InvalidInput(
                "secure aggregation without a pinned identity authority takes every peer's "
                "identity from the server: pin one (trusted_authorities) or accept that "
                "(trust_server_identities=True)"
            )
        n = len(params.participants)
        self.colluders = assumed_colluders(n, colluding_fraction, colluding_devices)
        #: The fraction of the announced participants they are (Binomial draws in SecAgg+).
        self._colluding_share = max(colluding_fraction, colluding_devices / n)
        safe = safe_threshold(n, params.neighbours, self._colluding_share, security_bits)
        if params.neighbours is None:  # every colluder holds a share of every secret
            safe = max(safe, self.colluders + 1)
        if params.threshold < safe:
            raise ProtocolViolation(
                f"threshold {params.threshold} lets the {self.colluders} colluding devices "
                f"this device assumes rebuild a device's secrets; it wants at least {safe}"
            )
        floor = min_honest + self.colluders
        if params.min_contributors < floor:
            raise ProtocolViolation(
                f"the aggregation unmasks sums of {params.min_contributors} devices; this "
                f"device wants {min_honest} beyond the {self.colluders} colluders it "
                f"assumes: a floor of at least {floor}"
            )
        self.params = params
        self.device = device
        self.signer = signer
        self.min_honest = min_honest
        self.security_bits = security_bits
        self.stage = ClientStage.ADVERTISE
        self.neighbours: frozenset[int] = frozenset()
        #: The agreed roster's digest: the context of everything after the roster.
        self.context = b""
        self._c_key = X25519PrivateKey.generate()
        self._s_key = X25519PrivateKey.generate()
        self._seed = os.urandom(32)
        self._identities: dict[int, bytes] = {}  # every roster entry's identity key
        self._entries: dict[int, PeerKeys] = {}
        self._peers: dict[int, tuple[bytes, bytes]] = {}  # neighbours' (c, s) keys
        self._c_secrets: dict[int, bytes] = {}
        self._own_share = 0
        self._received: dict[int, tuple[int, int]] = {}
        self._maskers: list[int] = []
        self._contributors: list[int] | None = None
        self._sent: dict[ClientStage, tuple[object, object]] = {}

    @property
    def quorum(self) -> int:
        """Signatures of one statement this device wants, from devices of its roster."""
        return signature_quorum(len(self._identities), self.colluders)

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
        return crypto.public_bytes(self._c_key), crypto.public_bytes(self._s_key)

    def _count_signatures(
        self, vouches: Iterable[Vouch], statement: bytes, allowed: Iterable[int], what: str
    ) -> None:
        """Raise unless ``quorum`` distinct devices of ``allowed`` signed ``statement``
        (an invalid or unexpected signature aborts: only the server could have sent it)."""
        allowed_set = set(allowed)
        vouched: set[int] = set()
        for vouch in vouches:
            key = self._identities.get(vouch.device)
            if key is None or vouch.device not in allowed_set or vouch.device in vouched:
                raise ProtocolViolation(f"unexpected signature from device {vouch.device}")
            if not verify_signature(key, vouch.signature, statement):
                raise ProtocolViolation(f"device {vouch.device}'s signature does not verify")
            vouched.add(vouch.device)
        if len(vouched) < self.quorum:
            raise ProtocolViolation(
                f"{len(vouched)} devices signed {what}; {self.quorum} needed (more than half "
                f"of the roster's {len(self._identities)} beyond {self.colluders} colluders)"
            )

    # -- stage 0 ---------------------------------------------------------------------------
    def advertise_keys(self) -> KeyAdvertisement:
        """Stage 0: the two fresh public keys, signed with the identity key."""
        c_public, s_public = self._public_keys()
        statement = crypto.advertisement_message(
            self.params.session, self.device, c_public, s_public
        )
        message = KeyAdvertisement(c_public, s_public, self.signer.sign(statement))
        if self.stage == ClientStage.ADVERTISE:
            self._sent[ClientStage.ADVERTISE] = (None, message)
            self.stage = ClientStage.AGREE
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
            statement = crypto.advertisement_message(session, who, entry.c_public, entry.s_public)
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

    def _check_cohort(self, size: int) -> None:
        """The roster the device was shown, against its own bounds (module docstring)."""
        params, c = self.params, self.colluders
        if size < params.min_contributors:
            raise ProtocolViolation(
                f"a roster of {size} devices cannot reach the aggregation's floor of "
                f"{params.min_contributors} contributors"
            )
        k, t = params.neighbours, params.threshold
        if k is None or k >= size - 1:
            # Complete: every colluder in the roster is a neighbour of every device.
            if t <= min(c, size - 1):
                raise ProtocolViolation(
                    f"in a roster of {size} devices every one is a neighbour: the "
                    f"{min(c, size - 1)} colluders this device assumes could reach the "
                    f"threshold {t}"
                    + (" (a SecAgg+ graph this small is complete)" if k is not None else "")
                )
            return
        # Sparse: the colluders' share of the roster it was actually shown.
        share = min(1.0, max(self._colluding_share * len(params.participants) / size, 0.0))
        safe = safe_threshold(size, k, share, self.security_bits) if share < 1 else k + 2
        if t < safe:
            raise ProtocolViolation(
                f"in a roster of {size} devices the {c} colluders this device assumes are "
                f"{share:.0%} of it: threshold {t} is within their reach among {k} "
                f"neighbours (it wants {safe})"
            )

    def agree(self, roster: KeyRoster) -> RosterSignature:
        """Stage 1: check the roster and the cohort it makes, and sign its digest.

        Raises `ProtocolViolation` if any roster entry fails its checks, or the roster
        breaks the device's cohort bounds (see the module docstring). Nothing secret
        depends on the roster yet: the device can still walk away from it."""
        previous = self._replay(ClientStage.AGREE, roster)
        if previous is not None:
            assert isinstance(previous, RosterSignature)
            return previous
        self._check_roster(roster)
        self._check_cohort(len(roster.peers))
        entries = {e.device: e for e in roster.peers}
        context = roster_context(self.params, roster.peers)
        message = RosterSignature(self.signer.sign(crypto.roster_message(context)))
        self._identities = {d: e.identity_key for d, e in entries.items()}
        self._entries = entries
        self.context = context
        self._sent[ClientStage.AGREE] = (roster, message)
        self.stage = ClientStage.SHARE
        return message

    # -- stage 2 ---------------------------------------------------------------------------
    def share_keys(self, agreement: RosterAgreement) -> ShareKeys:
        """Stage 2: once `quorum` devices of the roster signed its digest, Shamir shares of
        the self-mask seed and of the mask key, encrypted per neighbour under the digest.

        Raises `ProtocolViolation` if the agreement falls short (nothing is shared);
        `AggregationFailed` if too few neighbours are left to reach the threshold.
        """
        previous = self._replay(ClientStage.SHARE, agreement)
        if previous is not None:
            assert isinstance(previous, ShareKeys)
            return previous
        params, context = self.params, self.context
        self._count_signatures(
            agreement.signatures,
            crypto.roster_message(context),
            self._identities,
            "the roster this device was shown",
        )
        entries = self._entries
        self.neighbours = params.graph_for(sorted(entries), context)[self.device]
        peers = {d: (entries[d].c_public, entries[d].s_public) for d in self.neighbours}
        if len(peers) + 1 < params.threshold:
            raise AggregationFailed(
                f"device {self.device} has {len(peers)} live neighbours; the threshold "
                f"{params.threshold} needs {params.threshold - 1}"
            )
        holders = [self.device, *sorted(peers)]
        seed_shares = shamir.split(int.from_bytes(self._seed, "big"), params.threshold, holders)
        s_secret = int.from_bytes(crypto.private_bytes(self._s_key), "big")
        key_shares = shamir.split(s_secret, params.threshold, holders)
        encrypted = []
        c_secrets: dict[int, bytes] = {}
        for peer, (c_public, _) in sorted(peers.items()):
            b_share = shamir.encode_element(seed_shares[peer])
            s_share = shamir.encode_element(key_shares[peer])
            try:
                secret = crypto.agree(self._c_key, c_public)
            except ValueError as exc:
                raise ProtocolViolation(f"unusable key for device {peer}: {exc}") from exc
            c_secrets[peer] = secret
            encrypted.append(
                EncryptedShare(
                    recipient=peer,
                    ciphertext=crypto.encrypt_share(
                        secret, context, self.device, peer, b_share + s_share
                    ),
                    self_mask_digest=crypto.share_digest(context, b"b", self.device, peer, b_share),
                    key_digest=crypto.share_digest(context, b"s", self.device, peer, s_share),
                )
            )
        self._peers = peers
        self._c_secrets = c_secrets
        self._own_share = seed_shares[self.device]
        own = shamir.encode_element(self._own_share)
        message = ShareKeys(
            seed_commitment=crypto.secret_digest(context, self.device, self._seed),
            own_share_digest=crypto.share_digest(context, b"b", self.device, self.device, own),
            shares=encrypted,
        )
        self._sent[ClientStage.SHARE] = (agreement, message)
        self.stage = ClientStage.MASK
        return message

    # -- stage 3 ---------------------------------------------------------------------------
    def _open(self, sender: int, ciphertext: bytes) -> tuple[int, int]:
        try:
            plaintext = crypto.decrypt_share(
                self._c_secrets[sender], self.context, sender, self.device, ciphertext
            )
            half = shamir.ELEMENT_BYTES
            return (
                shamir.decode_element(plaintext[:half]),
                shamir.decode_element(plaintext[half:]),
            )
        except ValueError as exc:
            raise InvalidShare(sender, str(exc)) from exc

    def masked_input(self, bundle: ShareBundle, vector: npt.NDArray[np.uint32]) -> MaskedInput:
        """Stage 3: ``vector`` (quantised, uint32) plus the self-mask and the pairwise masks,
        in Z_{2^modulus_bits}.

        Every relayed share must decrypt and decode under the agreed roster's digest; one
        that does not raises `InvalidShare` and nothing is masked or sent (its sender's
        keys were signed, so only tampering, or a sender shown another roster, explains
        it). The device masks with exactly the bundle's senders.
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
        expander = crypto.MaskExpander(params.vector_length)
        masked = values.astype("<u4", copy=True)
        expander.add(masked, crypto.self_mask_key(self._seed, self.context, self.device), +1)
        for peer in sorted(senders):
            try:
                secret = crypto.agree(self._s_key, self._peers[peer][1])
            except ValueError as exc:
                raise ProtocolViolation(f"unusable mask key for device {peer}: {exc}") from exc
            key = crypto.pairwise_mask_key(secret, self.context, self.device, peer)
            expander.add(masked, key, +1 if self.device < peer else -1)
        if params.modulus_bits < 32:  # the masks mod 2^b are the 32-bit masks' low bits
            np.bitwise_and(masked, np.uint32(params.modulus_mask), out=masked)
        message = MaskedInput(pack(masked, params.modulus_bits))
        self._received = received
        self._maskers = sorted(senders)
        self._sent[ClientStage.MASK] = ((bundle, values.tobytes()), message)
        self.stage = ClientStage.CONSISTENCY
        return message

    # -- stage 4 ---------------------------------------------------------------------------
    def consistency(self, survivors: SurvivorList) -> SurvivorSignature:
        """Stage 4: sign the contributor list, after checking it.

        It must be sorted and distinct, name this device and only devices of the
        roster, name every neighbour that masked with this device or explicitly
        leave it out as dropped (a neighbour in the list that did not share with this
        device is a contradiction), and reach the aggregation's floor and the
        threshold (else `AggregationFailed`). The device signs one list per
        aggregation, bound to the agreed roster."""
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
        needed = max(self.params.min_contributors, self.params.threshold)
        if len(listed) < needed:
            raise AggregationFailed(
                f"{len(listed)} contributors; device {self.device} unmasks sums of {needed} or more"
            )
        statement = crypto.survivors_message(self.context, listed)
        message = SurvivorSignature(self.signer.sign(statement))
        self._contributors = list(listed)
        self._sent[ClientStage.CONSISTENCY] = (survivors, message)
        self.stage = ClientStage.UNMASK
        return message

    # -- stage 5 ---------------------------------------------------------------------------
    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Stage 5: self-mask shares of the surviving neighbours, key shares of the
        dropped ones.

        The request must carry the very list this device signed, and valid signatures
        of it from at least `quorum` of its contributors (any invalid one aborts).
        Survivors and dropouts are read from that list, not from the server.
        """
        previous = self._replay(ClientStage.UNMASK, request)
        if previous is not None:
            assert isinstance(previous, UnmaskResponse)
            return previous
        listed = self._contributors
        assert listed is not None
        if request.contributors != listed:
            raise ProtocolViolation("the unmask request is for another contributor list")
        self._count_signatures(
            request.signatures,
            crypto.survivors_message(self.context, listed),
            listed,
            "the contributor list",
        )
        alive = set(listed)
        survivors = (set(self._maskers) & alive) | {self.device}
        dropped = set(self._maskers) - alive
        if len(survivors) < self.params.threshold:
            raise AggregationFailed(
                f"{len(survivors)} survivors around device {self.device}; threshold "
                f"{self.params.threshold}"
            )
        b_shares = [RevealedShare(self.device, shamir.encode_element(self._own_share))]
        b_shares += [
            RevealedShare(v, shamir.encode_element(self._received[v][0]))
            for v in sorted(survivors - {self.device})
        ]
        s_shares = [
            RevealedShare(v, shamir.encode_element(self._received[v][1])) for v in sorted(dropped)
        ]
        message = UnmaskResponse(self_mask_shares=b_shares, key_shares=s_shares)
        self._sent[ClientStage.UNMASK] = (request, message)
        self.stage = ClientStage.DONE
        return message
