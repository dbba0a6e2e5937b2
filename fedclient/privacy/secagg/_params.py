"""What the server announces before an aggregation: participants, threshold, graph, encoding."""

from __future__ import annotations

import functools
import hashlib
import itertools
import os
from collections.abc import Iterable, Mapping, Sequence

import msgspec

from fedclient._exceptions import InvalidInput
from fedclient.privacy.secagg._choice import Tolerance, choose, safe_threshold, sparse_threshold
from fedclient.privacy.secagg._encoding import RotatedQuantization
from fedclient.privacy.secagg._messages import PeerKeys
from fedclient.privacy.secagg._quantize import Quantization
from fedclient.privacy.secagg.crypto import DOMAIN, roster_digest

__all__ = ["MAX_VECTOR_LENGTH", "SecAggParams", "roster_context"]

#: Keeps a mask under ChaCha20's 2^32-block stream limit with room to spare.
MAX_VECTOR_LENGTH = 2**28


class SecAggParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One secure aggregation, as the server announces it to every participant.

    - ``session``: 32 random bytes naming this aggregation; every derived key,
      associated data and commitment is bound to it.
    - ``participants``: sorted distinct device numbers in [1, 2^32); they are
      also the Shamir evaluation points. The driver maps its device ids to them.
    - ``neighbours``: ``None`` for SecAgg (every pair of devices shares a mask
      and every device holds shares of every other); an integer ``k`` for
      SecAgg+: each device talks only to its ``k`` neighbours in a Harary graph
      H(k, n) laid over a random permutation of the devices that advertised
      keys, derived from the agreed roster's digest (`graph_for`, `roster_digest`):
      public randomness no single party picks. If k is odd and n odd, one device
      has k + 1 neighbours.
    - ``threshold``: shares needed to recover a secret. A secret is shared among
      a device and its neighbours (all devices in SecAgg); ``threshold`` is at
      least 2 and at most the smallest such group. It must exceed what the
      colluders among a group can hold (`safe_threshold`; each device checks
      it against the share of colluders it assumes); it need not be a majority,
      since the consistency round keeps honest devices from revealing both
      secrets of any device.
    - ``min_contributors``: the floor of the aggregation: no contributor list
      shorter than this is unmasked. It is part of what devices agree on (the
      roster's digest), so every honest device enforces the same floor; each
      refuses a floor under what its own policy wants (its minimum beyond the
      colluders it assumes), so no device's input is unmasked in a smaller sum
      than it asked for, and distributed DP sizes each device's noise for it.
    - ``modulus_bits``: the sum is taken in Z_{2^modulus_bits}; a masked input
      travels as ``modulus_bits`` bits a value (`pack`).
    - ``rotation``: for a compressed or noised sum, the common grid every device
      encodes its update on (`RotatedQuantization`); None: ``quantization``.
    """

    session: bytes
    participants: list[int]
    threshold: int
    vector_length: int
    quantization: Quantization = msgspec.field(default_factory=Quantization)
    neighbours: int | None = None
    modulus_bits: int = 32
    rotation: RotatedQuantization | None = None
    min_contributors: int = 2

    def __post_init__(self) -> None:
        if not 2 <= self.modulus_bits <= 32:
            raise InvalidInput(f"modulus_bits must be in [2, 32], got {self.modulus_bits}")
        if self.rotation is not None and (
            self.rotation.modulus_bits != self.modulus_bits
            or self.rotation.vector_length != self.vector_length
        ):
            raise InvalidInput("the rotated encoding does not match the ring or the length")
        if len(self.session) != 32:
            raise InvalidInput("session must be 32 bytes")
        ids = self.participants
        if len(ids) < 2:
            raise InvalidInput("secure aggregation needs at least 2 participants")
        if any(not 1 <= d < 2**32 for d in ids) or any(a >= b for a, b in itertools.pairwise(ids)):
            raise InvalidInput("participants must be sorted, distinct and in [1, 2^32)")
        if len(ids) > self.quantization.max_devices:
            raise InvalidInput(
                f"{len(ids)} participants, but the encoding only avoids wrap-around up to "
                f"{self.quantization.max_devices}"
            )
        if not 1 <= self.vector_length <= MAX_VECTOR_LENGTH:
            raise InvalidInput(f"vector_length must be in [1, {MAX_VECTOR_LENGTH}]")
        if self.neighbours is not None and self.neighbours < 2:
            raise InvalidInput("neighbours must be at least 2")
        if not 2 <= self.min_contributors <= len(ids):
            raise InvalidInput(
                f"min_contributors must be in [2, {len(ids)}] (the participants), "
                f"got {self.min_contributors}"
            )
        smallest, _ = self.group_sizes
        if not 2 <= self.threshold <= smallest:
            raise InvalidInput(
                f"threshold must be at least 2 and at most the smallest share group "
                f"({smallest}); got {self.threshold}"
            )

    @classmethod
    def create(
        cls,
        participants: Sequence[int],
        vector_length: int,
        *,
        plus: bool = False,
        neighbours: int | None = None,
        threshold: int | None = None,
        quantization: Quantization | None = None,
        session: bytes | None = None,
        rotation: RotatedQuantization | None = None,
        tolerance: Tolerance | None = None,
        min_contributors: int = 2,
    ) -> SecAggParams:
        """Parameters for one aggregation over ``participants``.

        ``plus`` selects SecAgg+ with ``neighbours``; by default ``neighbours`` and
        ``threshold`` are the cheapest that meet ``tolerance`` (`choose`: Bell et
        al. 2020's bounds; the complete graph where no sparser one does), and a
        given ``neighbours`` gets the smallest safe threshold.
        ``session`` (32 bytes, public) defaults to fresh bytes from the OS CSPRNG;
        a session must never be reused for a second aggregation. With
        ``rotation`` the ring is its ``modulus_bits`` (``vector_length`` must be
        its ``vector_length``). ``min_contributors`` is the aggregation's floor.
        """
        ids = sorted(participants)
        tol = tolerance or Tolerance()
        k = None
        if plus:
            k = neighbours if neighbours is not None else choose(len(ids), tol)[0]
        if k is not None and k >= len(ids) - 1:
            k = None  # the graph is complete: plain SecAgg
        if threshold is None:
            threshold = (
                safe_threshold(len(ids), k, tol.colluding, tol.security_bits)
                if k is None
                else sparse_threshold(len(ids), k, tol)
            )
        return cls(
            session=session or os.urandom(32),
            participants=ids,
            threshold=threshold,
            vector_length=vector_length,
            quantization=quantization or Quantization(),
            neighbours=k,
            modulus_bits=rotation.modulus_bits if rotation else 32,
            rotation=rotation,
            min_contributors=min_contributors,
        )

    @property
    def group_sizes(self) -> tuple[int, int]:
        """Smallest and largest share group (a device and its neighbours)."""
        lo, hi = _degree_range(len(self.participants), self.neighbours)
        return lo + 1, hi + 1

    @property
    def modulus_mask(self) -> int:
        """``2^modulus_bits - 1``: a ring element's bits."""
        return int(2**self.modulus_bits - 1)

    def graph_for(self, members: Sequence[int], seed: bytes) -> Mapping[int, frozenset[int]]:
        """Every member's neighbours among ``members`` (the devices that advertised keys),
        laid out by ``seed`` (`roster_digest`); complete for SecAgg. Cached."""
        return _graph(tuple(sorted(members)), self.neighbours, seed)


def roster_context(params: SecAggParams, peers: Iterable[PeerKeys]) -> bytes:
    """The digest of one view of an aggregation, ``params`` and a roster's ``peers``
    (`fedclient.privacy.secagg.crypto.roster_digest`): what devices agree on, and the
    context of every key, commitment and signature after the roster."""
    return roster_digest(
        msgspec.msgpack.encode(params),
        [(p.device, p.c_public, p.s_public, p.identity_key, p.certificate) for p in peers],
    )


def _degree_range(n: int, k: int | None) -> tuple[int, int]:
    if k is None or k >= n - 1:
        return n - 1, n - 1
    if k % 2 == 1 and n % 2 == 1:
        return k, k + 1
    return k, k


@functools.lru_cache(maxsize=16)
def _graph(
    participants: tuple[int, ...], k: int | None, seed: bytes
) -> Mapping[int, frozenset[int]]:
    n = len(participants)
    if k is None or k >= n - 1:
        everyone = frozenset(participants)
        return {d: everyone - {d} for d in participants}
    # A permutation fixed by the seed alone (not by any library's RNG stream).
    ring = sorted(
        participants,
        key=lambda d: hashlib.sha256(DOMAIN + b"/graph" + seed + d.to_bytes(4, "big")).digest(),
    )
    adjacency: dict[int, set[int]] = {d: set() for d in participants}

    def link(i: int, j: int) -> None:
        a, b = ring[i % n], ring[j % n]
        adjacency[a].add(b)
        adjacency[b].add(a)

    for i in range(n):
        for step in range(1, k // 2 + 1):
            link(i, i + step)
    if k % 2 == 1:  # Harary H(k, n) for odd k: add "diameters"
        if n % 2 == 0:
            for i in range(n // 2):
                link(i, i + n // 2)
        else:
            for i in range((n - 1) // 2 + 1):
                link(i, i + (n - 1) // 2)
    return {d: frozenset(s) for d, s in adjacency.items()}
