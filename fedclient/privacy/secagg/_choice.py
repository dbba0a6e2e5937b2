"""How many neighbours and what threshold: chosen from the tolerances, after Bell et al. 2020.

A device's secrets are Shamir-shared among it and its ``k`` neighbours with
threshold ``t``. Two things must hold for every device, except with probability
``2^-security_bits`` and ``2^-correctness_bits`` over the whole aggregation
(a union bound over the ``n`` devices):

- **Security**: fewer than ``t`` of a device's neighbours collude with the
  server, or they could rebuild both of its secrets between them. With at most
  a fraction ``colluding`` of the devices colluding and neighbours drawn at
  random (the graph comes from the agreed roster, `roster_digest`), the colluders
  among ``k`` neighbours are Binomial(k, colluding) or fewer. With every pair
  connected (SecAgg) the count is fixed: ``t > ceil(colluding * n)``.
- **Correctness**: at least ``t`` of a device's neighbours survive to unmask,
  with at most a fraction ``dropout`` dropping after they advertised keys:
  Binomial(k, 1 - dropout) >= t. (Colluders that refuse to unmask can always
  make a round fail; that is a denial of service, not a leak.)
- **A roster that shrinks.** Devices that never advertise keys (they failed to
  train, or went offline) leave the roster smaller, and the colluders, who never
  drop, a larger share of it. A device checks the threshold against the roster
  it was shown (`fedclient.privacy.secagg.SecAggClient`): so the sparse graph's
  threshold is chosen for a roster of ``1 - roster_dropout`` of the devices with
  all the colluders in it, and rounds go on when up to that share never
  advertised. (The complete graph's threshold counts colluders, not shares: any
  roster that reaches the floor keeps it.)

The consistency round (signed contributor lists, `signature_quorum`) makes
honest devices agree on who dropped, so the server cannot collect both secrets
of a device from *honest* neighbours: ``t`` need not be a majority of the group.

`choose` takes the smallest ``k`` for which a ``t`` meets both, or the complete
graph when none does (below a few hundred devices at the defaults: a 20%
colluding, 30% dropout world leaves too little room between the two tails).
"""

from __future__ import annotations

import functools
import math

from fedclient._exceptions import InvalidInput

__all__ = ["Tolerance", "choose", "safe_threshold", "sparse_threshold"]


class Tolerance:
    """What one secure aggregation must withstand (see the module docstring)."""

    def __init__(
        self,
        colluding: float = 0.2,
        dropout: float = 0.3,
        security_bits: float = 40.0,
        correctness_bits: float = 40.0,
        roster_dropout: float = 0.1,
    ) -> None:
        if not 0 <= colluding < 1 or not 0 <= dropout < 1:
            raise InvalidInput("colluding and dropout fractions must be in [0, 1)")
        if not 0 <= roster_dropout < 1 or colluding / (1 - roster_dropout) >= 1:
            raise InvalidInput(
                "roster_dropout must be in [0, 1) and leave the colluders a minority"
            )
        if security_bits <= 0 or correctness_bits <= 0:
            raise InvalidInput("security and correctness bits must be positive")
        self.colluding = colluding
        self.dropout = dropout
        self.security_bits = security_bits
        self.correctness_bits = correctness_bits
        self.roster_dropout = roster_dropout

    def __repr__(self) -> str:
        return (
            f"Tolerance(colluding={self.colluding}, dropout={self.dropout}, "
            f"security_bits={self.security_bits}, correctness_bits={self.correctness_bits}, "
            f"roster_dropout={self.roster_dropout})"
        )


@functools.lru_cache(maxsize=4096)
def _log_tail_at_least(k: int, p: float) -> tuple[float, ...]:
    """log P[Binomial(k, p) >= t] for t = 0..k+1 (log-space, exact to float rounding)."""
    if p <= 0.0:
        return (0.0,) + (-math.inf,) * (k + 1)
    if p >= 1.0:
        return (0.0,) * (k + 1) + (-math.inf,)
    lp, lq = math.log(p), math.log1p(-p)
    log_pmf = [
        math.lgamma(k + 1) - math.lgamma(i + 1) - math.lgamma(k - i + 1) + i * lp + (k - i) * lq
        for i in range(k + 1)
    ]
    tails = [-math.inf] * (k + 2)
    running = -math.inf
    for i in range(k, -1, -1):
        top = max(running, log_pmf[i])
        running = top + math.log(math.exp(running - top) + math.exp(log_pmf[i] - top))
        tails[i] = running
    return tuple(tails)


def _complete(n: int, k: int | None) -> bool:
    return k is None or k >= n - 1


def safe_threshold(n: int, k: int | None, colluding: float, security_bits: float = 40.0) -> int:
    """The smallest threshold at which ``n`` devices with ``k`` neighbours each (None: all)
    keep every device's secrets from a ``colluding`` fraction of them."""
    if n < 2:
        raise InvalidInput("an aggregation needs at least 2 devices")
    if _complete(n, k):
        return max(2, math.ceil(colluding * n) + 1)
    assert k is not None
    budget = -security_bits * math.log(2) - math.log(n)
    tails = _log_tail_at_least(k, colluding)
    # t = k + 1 (every share of the group) is always safe: k neighbours hold only k.
    return next(t for t in range(2, k + 2) if tails[t] <= budget)


def _fails_correctness(n: int, k: int, t: int, tolerance: Tolerance) -> bool:
    budget = -tolerance.correctness_bits * math.log(2) - math.log(n)
    # P[Bin(k, 1 - dropout) < t] = P[Bin(k, dropout) >= k - t + 1]
    return _log_tail_at_least(k, tolerance.dropout)[k - t + 1] > budget


def choose(n: int, tolerance: Tolerance | None = None) -> tuple[int | None, int]:
    """``(k, t)`` for ``n`` devices: the fewest neighbours (None: everyone, SecAgg) and
    the threshold that meet ``tolerance`` (default `Tolerance()`).

    Raises `fedclient.InvalidInput` if even the complete graph cannot: too many
    dropouts for that many colluders."""
    tol = tolerance or Tolerance()
    return _choose(
        n, tol.colluding, tol.dropout, tol.security_bits, tol.correctness_bits, tol.roster_dropout
    )


def sparse_threshold(n: int, k: int, tolerance: Tolerance) -> int:
    """The threshold a SecAgg+ graph of ``k`` neighbours needs for ``n`` announced devices:
    safe in every roster the tolerance lets them shrink to (`Tolerance`), where all the
    colluders may remain. Their share peaks in the smallest roster that is still sparse;
    a roster of ``k + 1`` or fewer is complete, and needs more than the colluders."""
    colluders = tolerance.colluding * n
    smallest = max(2, math.floor((1 - tolerance.roster_dropout) * n))
    need = 2
    if smallest <= k + 1:  # some rosters are complete: every colluder a neighbour
        need = max(need, math.ceil(colluders) + 1)
    sparse = max(smallest, k + 2)
    if sparse <= n:
        share = colluders / sparse
        need = max(need, safe_threshold(sparse, k, share, tolerance.security_bits))
    return need


@functools.lru_cache(maxsize=256)
def _choose(
    n: int,
    colluding: float,
    dropout: float,
    security_bits: float,
    correctness_bits: float,
    roster_dropout: float,
) -> tuple[int | None, int]:
    tol = Tolerance(colluding, dropout, security_bits, correctness_bits, roster_dropout)
    for k in range(2, n - 1):
        t = sparse_threshold(n, k, tol)
        if t <= k + 1 and not _fails_correctness(n, k, t, tol):
            return k, t
    t = safe_threshold(n, None, tol.colluding, tol.security_bits)
    if math.floor((1 - tol.dropout) * n) < t:
        raise InvalidInput(
            f"{n} devices cannot tolerate {tol.dropout:.0%} dropouts with "
            f"{tol.colluding:.0%} colluding: the threshold {t} needs more survivors"
        )
    return None, t
