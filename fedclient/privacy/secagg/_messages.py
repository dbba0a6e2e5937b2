"""The messages of secure aggregation, stage by stage (frozen msgspec Structs, bytes fields).

Device -> server messages do not name their sender: the transport
authenticates the device and passes its number to the server role. Server ->
device messages name the peers they concern. What a device signs, it signs
with its identity key (`fedclient.identity`): its advertised keys, the digest
of the roster it was shown, and the list of contributors it agrees to unmask.

====================  =======================  =========================================
stage                 device -> server         server -> device
====================  =======================  =========================================
0 advertise keys      `KeyAdvertisement`       `KeyRoster` (everyone's signed keys)
1 agree on roster     `RosterSignature`        `RosterAgreement` (the roster's signers)
2 share keys          `ShareKeys`              `ShareBundle` (shares addressed to it)
3 masked input        `MaskedInput`            `SurvivorList` (who sent a masked input)
4 consistency         `SurvivorSignature`      `UnmaskRequest` (the list, signed by many)
5 unmask              `UnmaskResponse`         (the server computes the sum)
====================  =======================  =========================================

`encode` / `decode` give the compact MessagePack form used for byte counts: each
Struct travels as an array of its fields in order (no field names: a device
sends hundreds of shares a round), and decoding checks the length and types.
"""

from __future__ import annotations

from typing import TypeVar

import msgspec

from fedclient._exceptions import InvalidRequest

__all__ = [
    "EncryptedShare",
    "KeyAdvertisement",
    "KeyRoster",
    "MaskedInput",
    "PeerKeys",
    "RelayedShare",
    "RevealedShare",
    "RosterAgreement",
    "RosterSignature",
    "SecAggMessage",
    "ShareBundle",
    "ShareKeys",
    "SurvivorList",
    "SurvivorSignature",
    "UnmaskRequest",
    "UnmaskResponse",
    "Vouch",
    "decode",
    "encode",
]


class KeyAdvertisement(msgspec.Struct, frozen=True, array_like=True):
    """Stage 0, device -> server: fresh X25519 public keys (c: encryption, s: masks),
    signed with the device's identity key (`advertisement_message`)."""

    c_public: bytes
    s_public: bytes
    signature: bytes


class PeerKeys(msgspec.Struct, frozen=True, array_like=True):
    """One device's signed advertisement, with its identity key and the certificate
    of it (empty without one), as the device enrolled them."""

    device: int
    c_public: bytes
    s_public: bytes
    signature: bytes
    identity_key: bytes
    certificate: bytes = b""


class KeyRoster(msgspec.Struct, frozen=True, array_like=True):
    """Stage 0, server -> device: every device that advertised in time (itself included).

    The same for every device: each checks every entry, and derives the SecAgg+
    neighbour graph from the whole roster (`roster_digest`), so the server cannot
    choose the graph alone."""

    peers: list[PeerKeys]


class Vouch(msgspec.Struct, frozen=True, array_like=True):
    """One device's signature of a roster or a contributor list."""

    device: int
    signature: bytes


class RosterSignature(msgspec.Struct, frozen=True, array_like=True):
    """Stage 1, device -> server: its signature of the digest of the roster it was shown
    (`fedclient.privacy.secagg.crypto.roster_message`)."""

    signature: bytes


class RosterAgreement(msgspec.Struct, frozen=True, array_like=True):
    """Stage 1, server -> device: the signatures of the roster's digest.

    A device shares its secrets only once enough devices of its roster signed the
    very roster it signed (`SecAggClient.share_keys`): a server that shows devices
    different rosters gets no shares from a device it cannot show a quorum."""

    signatures: list[Vouch]


class EncryptedShare(msgspec.Struct, frozen=True, array_like=True):
    """A share pair (self-mask seed, key) for ``recipient``, AES-GCM encrypted to it.

    ``self_mask_digest`` and ``key_digest`` commit to the two shares, so the
    server can check them when the recipient reveals one.
    """

    recipient: int
    ciphertext: bytes
    self_mask_digest: bytes
    key_digest: bytes


class ShareKeys(msgspec.Struct, frozen=True, array_like=True):
    """Stage 2, device -> server: one encrypted share pair per roster peer.

    ``seed_commitment`` commits to the self-mask seed and ``own_share_digest``
    to the share of it the device keeps for itself.
    """

    seed_commitment: bytes
    own_share_digest: bytes
    shares: list[EncryptedShare]


class RelayedShare(msgspec.Struct, frozen=True, array_like=True):
    """An encrypted share pair from ``sender``, relayed as received."""

    sender: int
    ciphertext: bytes


class ShareBundle(msgspec.Struct, frozen=True, array_like=True):
    """Stage 2, server -> device: the shares its neighbours that shared in time sent it.

    The device masks its input with exactly these senders.
    """

    shares: list[RelayedShare]


class MaskedInput(msgspec.Struct, frozen=True, array_like=True):
    """Stage 3, device -> server: the masked input, little-endian uint32 words."""

    vector: bytes


class SurvivorList(msgspec.Struct, frozen=True, array_like=True):
    """Stage 3, server -> device: every device whose masked input is in the sum."""

    contributors: list[int]


class SurvivorSignature(msgspec.Struct, frozen=True, array_like=True):
    """Stage 4, device -> server: its signature of the contributor list it was shown."""

    signature: bytes


class UnmaskRequest(msgspec.Struct, frozen=True, array_like=True):
    """Stage 4, server -> device: the contributor list and the signatures of it.

    A device unmasks only for the list it signed itself, vouched for by more
    devices than could be shown a different list (Bonawitz et al. 2017's
    consistency check): so every honest device takes the same devices for
    dropped, and none reveals both secrets of one device."""

    contributors: list[int]
    signatures: list[Vouch]


class RevealedShare(msgspec.Struct, frozen=True, array_like=True):
    """A share of ``owner``'s secret, in the clear (33 bytes)."""

    owner: int
    value: bytes


class UnmaskResponse(msgspec.Struct, frozen=True, array_like=True):
    """Stage 5, device -> server: self-mask shares of survivors, key shares of dropped devices."""

    self_mask_shares: list[RevealedShare]
    key_shares: list[RevealedShare]


SecAggMessage = (
    KeyAdvertisement
    | KeyRoster
    | RosterSignature
    | RosterAgreement
    | ShareKeys
    | ShareBundle
    | MaskedInput
    | SurvivorList
    | SurvivorSignature
    | UnmaskRequest
    | UnmaskResponse
)

M = TypeVar("M")

_encoder = msgspec.msgpack.Encoder()


def encode(message: msgspec.Struct) -> bytes:
    """The MessagePack bytes of a message."""
    return _encoder.encode(message)


def decode(data: bytes, kind: type[M]) -> M:
    """A message of type ``kind`` from MessagePack; `fedclient.InvalidRequest` if malformed."""
    try:
        return msgspec.msgpack.decode(data, type=kind)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise InvalidRequest(f"malformed {getattr(kind, '__name__', kind)}: {exc}") from exc
