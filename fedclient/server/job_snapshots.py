"""Check-ins answered "not now" from a worker's short-lived view of a job's state.

Nearly every check-in of a large fleet is answered "not now": the round is full, the
job is paused or finished. Ten million devices checking in once an hour are 2,800
check-ins a second; answering each one inside a transaction, or under any lock shared
by the workers, would make the fleet's idle chatter the server's bottleneck. A worker
instead keeps, per job, a `JobSnapshot` read from the database at most
`SNAPSHOT_SECONDS` ago (one read for all the check-ins of that second), and answers
from it whatever it can answer without writing: a device that could be admitted, or
already is, goes on to the exact path (`FederationService.checkin`), which checks its
token and decides admissions in the database.

A device is known here by its token's hash (`fedclient.server.auth.hash_token`), not
looked up: a "not now" costs no read of the device. So a token that is unknown or
revoked is told "not now" too, while the round is full, and learns it is refused (401)
when there is room; a "not now" says nothing a job's public status does not (a server
whose status is private checks the token first: `FederationService.turned_away`).

What may be stale, and why it is harmless: another worker's pause, resume or round
close is seen within `SNAPSHOT_SECONDS` (this worker's own writes are seen at once: a
snapshot holds only while the store's `ServerStore.changes` is what it was); a round
that filled is full until it closes, and a device told "not now" a second too long
comes back later. Nothing stale ever admits a device, and nothing here writes.

The Retry-After of a "not now" is spread over the expected wait (a device's own share
of it, from a hash of its token's hash and the round: reproducible in a simulation, different
across devices), so a fleet told "the round is full" does not come back in one burst
at the deadline.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from fedclient.protocol import CheckinResponse, JobFinished, RetryLater
from fedclient.server.store import JobRow, RoundRow, ServerStore

__all__ = [
    "PAUSED_RETRY",
    "ROUND_FULL",
    "SNAPSHOT_SECONDS",
    "JobSnapshot",
    "JobSnapshots",
    "spread",
]

#: Seconds a worker answers "not now" from one read of a job's state.
SNAPSHOT_SECONDS = 1.0

#: Seconds a device is told to wait while its job is paused (spread: half to all of it).
PAUSED_RETRY = 300.0

#: Reason of a "not now" because the round holds all the devices it admits.
ROUND_FULL = "the round is full"


def spread(wait: float, device: str, round_id: int) -> float:
    """A device's Retry-After for an expected wait of ``wait`` seconds: between half of
    it and all of it (at least a second), where in between fixed by ``device`` (its id,
    or its token's hash) and the round."""
    digest = hashlib.blake2b(f"{device}/{round_id}".encode(), digest_size=4).digest()
    share = int.from_bytes(digest, "big") / 2**32
    return max(1.0, wait * (0.5 + 0.5 * share))


@dataclass(frozen=True)
class JobSnapshot:
    """A job's state as read once: its row, its newest round, and, when that round is
    open and full, the token hashes of the devices it admitted (they are answered on the
    exact path)."""

    job: JobRow
    round_: RoundRow | None
    full: bool
    admitted: frozenset[str]
    read_at: float  # time.monotonic() of the read
    changes: int  # the store's `ServerStore.changes` at the read


class JobSnapshots:
    """Each job's `JobSnapshot`, read again once `SNAPSHOT_SECONDS` old (or once this
    worker wrote something that may change it)."""

    def __init__(self, store: ServerStore, monotonic: Callable[[], float] = time.monotonic):
        self.store = store
        self.monotonic = monotonic
        self._held: dict[str, JobSnapshot] = {}

    def forget(self, job_name: str) -> None:
        """Read the job's state again at its next check-in (the exact path found it
        changed: its round filled)."""
        self._held.pop(job_name, None)

    def snapshot(self, job_name: str) -> JobSnapshot | None:
        """The job's state, read at most `SNAPSHOT_SECONDS` ago; None if there is no job."""
        held = self._held.get(job_name)
        now = self.monotonic()
        if (
            held is not None
            and now - held.read_at < SNAPSHOT_SECONDS
            and held.changes == self.store.changes
        ):
            return held
        changes = self.store.changes
        state = self.store.job_state(job_name)
        if state is None:
            self._held.pop(job_name, None)
            return None
        job, round_, admitted_count = state
        full = (
            round_ is not None
            and round_.status == "open"
            and admitted_count >= job.plan.admit_per_round
        )
        admitted = (
            frozenset(self.store.admitted_token_hashes(round_.round_id))
            if full and round_ is not None
            else frozenset()
        )
        if len(self._held) >= 1024:
            self._held.clear()
        snapshot = self._held[job_name] = JobSnapshot(job, round_, full, admitted, now, changes)
        return snapshot

    def not_now(self, job_name: str, token_hash: str, now: float) -> CheckinResponse | None:
        """The answer to a device (by its token's hash) that cannot be admitted now, if
        the snapshot shows it cannot; None when the exact path must decide (``now``: the
        service's clock)."""
        snapshot = self.snapshot(job_name)
        if snapshot is None:
            return None  # the exact path says NotFound
        job, round_ = snapshot.job, snapshot.round_
        if job.status in ("finished", "stopped"):
            return JobFinished(job.model_version)
        if round_ is None or round_.status != "open" or now >= round_.deadline:
            return None  # a round is due to close, or to open: the exact path does it
        if job.status == "paused":
            wait = spread(PAUSED_RETRY, token_hash, round_.round_id)
            return RetryLater(wait, "the job is paused")
        plan = job.plan
        if plan.job.mode != "sync" or plan.selection.name:
            return None  # async admissions and selections are decided on the exact path
        if snapshot.full and token_hash not in snapshot.admitted:
            wait = max(1.0, round_.deadline - now)
            return RetryLater(spread(wait, token_hash, round_.round_id), ROUND_FULL)
        return None
