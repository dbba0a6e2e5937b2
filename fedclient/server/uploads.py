"""The upload handlers: an update sent whole (`Uploads.upload`) or in chunks
(`start_upload`, `upload_chunk`, `upload_status`), each taken exactly once per
idempotency key.

What an upload must find before its body is read (`Uploads._admissible`: the round,
the device's place, the key unused) and again inside the transaction that takes it
(`Uploads._still_admissible`, on a shared database with the round's and the place's
rows locked), then the update checked (`fedclient.server.validation`), stored, folded
towards the round's sum and, when it meets the quota, the round closed
(`fedclient.server.rounds`).
"""

from __future__ import annotations

import hashlib
import uuid
from typing import TYPE_CHECKING

from fedclient._exceptions import (
    Conflict,
    DeadlinePassed,
    Forbidden,
    InvalidRequest,
    NotFound,
    OffsetMismatch,
    PayloadTooLarge,
    RoundClosed,
    Unauthorized,
)
from fedclient.protocol import UploadReceipt, UploadSession, UploadStart
from fedclient.server.auth import hash_token
from fedclient.server.store import JobRow, RoundRow, ServerStore, SessionRow, UpdateRow, serialised
from fedclient.server.validation import check_key, validate_update

if TYPE_CHECKING:
    from fedclient.server.service import FederationService

__all__ = ["MAX_OPEN_UPLOADS", "UploadState", "Uploads", "unlocked"]

#: What an upload must find (`ServerStore.upload_state`): its round, the round's job,
#: the receipt already given for its key, and whether the device holds a place.
UploadState = tuple[RoundRow, JobRow, UpdateRow | None, bool]

#: Chunked uploads one device may hold open in a round (each holds up to
#: max_upload_bytes of parts on the server).
MAX_OPEN_UPLOADS = 2

#: Updates short of its quota a round must be, as an upload that a PostgreSQL worker
#: commits with its group counts it, for that upload to count again once committed
#: (`Uploads.quota_after_commit`): other workers' groups, not yet committed, are not in
#: the first count, and the last to commit must see the quota met.
RECOUNT_WITHIN = 256


class Uploads:
    """The upload handlers over one service (its store, rounds and models)."""

    def __init__(self, service: FederationService) -> None:
        self.service = service
        self.store: ServerStore = service.store
        self._facts: dict[int, tuple[int, bool]] = {}  # see _round_facts
        self._recount: set[int] = set()  # see quota_after_commit

    def _round_facts(self, round_id: int) -> tuple[int, bool] | None:
        """What never changes of a round: the largest upload its job takes, and whether
        its uploads run without the cluster-wide lock (`unlocked`). None if no round."""
        facts = self._facts.get(round_id)
        if facts is None:
            with self.store.exclusive(lock=False):
                round_ = self.store.round(round_id)
                job = self.store.job(round_.job) if round_ is not None else None
                if job is None:
                    return None
                if len(self._facts) >= 4096:
                    self._facts.clear()
                facts = self._facts[round_id] = (job.plan.job.max_upload_bytes, unlocked(job))
        return facts

    def upload_limit(self, round_id: int) -> int:
        """The largest upload body the round accepts."""
        facts = self._round_facts(round_id)
        return facts[0] if facts is not None else 64 * 1024 * 1024

    def before_body(
        self, token: str, round_id: int, idempotency_key: str | None
    ) -> tuple[str, UploadState | None]:
        """Before an upload's body is read: the device behind ``token`` (`Unauthorized`
        for a stranger or a revoked device, whose body is then never read) and, on a
        shared database, what the upload must find (`ServerStore.upload_state`), in the
        same read: one round trip fewer an upload. What it found is checked again
        inside the accepting transaction (`_still_admissible`)."""
        if not self.store.shared or idempotency_key is None:
            return self.service.authenticate(token), None
        try:
            key = check_key(idempotency_key)
        except InvalidRequest:  # said after the body, as for any upload
            return self.service.authenticate(token), None
        found = self.store.upload_state_for_token(round_id, hash_token(token), key)
        if found is None or found[1]:
            raise Unauthorized("unknown device token")
        return found[0], found[2]

    def upload(
        self,
        token: str,
        round_id: int,
        idempotency_key: str | None,
        body: bytes,
        *,
        device_id: str | None = None,
        state: UploadState | None = None,
    ) -> UploadReceipt:
        """Accept one update, exactly once per idempotency key. ``device_id`` and
        ``state``: what `before_body` found earlier in the same request, so that it is
        not read twice (the state only where the accepting transaction checks it again:
        a job whose uploads take the cluster-wide lock reads it under the lock)."""
        facts = self._round_facts(round_id)
        locked = facts is None or not facts[1]
        with self.store.exclusive(lock=locked):
            return self._upload(
                token, round_id, idempotency_key, body, device_id, None if locked else state
            )

    def _upload(
        self,
        token: str,
        round_id: int,
        idempotency_key: str | None,
        body: bytes,
        device_id: str | None,
        state: UploadState | None = None,
    ) -> UploadReceipt:
        device_id = device_id or self.service.authenticate(token)
        key = check_key(idempotency_key)
        previous, job, round_ = self._admissible(device_id, round_id, key, state)
        if previous is not None:
            return previous
        if job.plan.privacy.secagg:
            raise InvalidRequest("this job aggregates securely: use the secagg stages")
        return self._accept(device_id, job, round_, key, body)

    @serialised
    def start_upload(
        self, token: str, round_id: int, idempotency_key: str | None, request: UploadStart
    ) -> UploadSession:
        """Open a chunked upload (or report where an open one stands)."""
        device_id = self.service.authenticate(token)
        key = check_key(idempotency_key)
        previous, job, _ = self._admissible(device_id, round_id, key)
        if previous is not None:
            return UploadSession(key, round_id, request.size, request.size, previous)
        session = self.store.session(device_id, key)
        if session is not None:
            if (session.round_id, session.size, session.sha256) != (
                round_id,
                request.size,
                request.sha256,
            ):
                raise Conflict("this upload id was opened for another round or body")
            return _session(session)
        if request.size > job.plan.job.max_upload_bytes:
            raise PayloadTooLarge(f"update is over {job.plan.job.max_upload_bytes} bytes")
        if self.store.open_sessions(device_id, round_id) >= MAX_OPEN_UPLOADS:
            # One update a round: a second open body is a retry with a new key at most.
            raise Conflict(
                f"this device already has {MAX_OPEN_UPLOADS} uploads open in round {round_id}"
            )
        session = SessionRow(device_id, key, round_id, request.size, request.sha256, 0)
        with self.store.atomic():
            self.store.add_session(session)
        return _session(session)

    @serialised
    def upload_status(self, token: str, round_id: int, upload_id: str) -> UploadSession:
        """Where a chunked upload stands (complete ones carry their receipt)."""
        device_id = self.service.authenticate(token)
        previous = self.store.update_by_key(device_id, upload_id)
        if previous is not None and previous.round_id == round_id:
            return UploadSession(upload_id, round_id, 0, 0, _receipt(previous))
        session = self.store.session(device_id, upload_id)
        if session is None or session.round_id != round_id:
            raise NotFound(f"no upload {upload_id!r} in round {round_id}")
        return _session(session)

    @serialised
    def upload_chunk(
        self, token: str, round_id: int, upload_id: str, offset: str | None, chunk: bytes
    ) -> UploadSession:
        """Append a chunk; the one that completes the body turns it into an update."""
        device_id = self.service.authenticate(token)
        if offset is None or not offset.isdigit():
            raise InvalidRequest("an Upload-Offset header (a byte offset) is required")
        status = self.upload_status(token, round_id, upload_id)
        if status.receipt is not None:  # complete already: a retried last chunk
            return status
        _, job, round_ = self._admissible(device_id, round_id, upload_id)
        session = self.store.session(device_id, upload_id)
        assert session is not None
        if int(offset) != session.offset:
            raise OffsetMismatch(
                f"the server holds {session.offset} bytes of this upload",
                headers={"Upload-Offset": str(session.offset)},
            )
        if not chunk or session.offset + len(chunk) > session.size:
            raise InvalidRequest(f"chunk must hold 1..{session.size - session.offset} bytes")
        with self.store.atomic():
            self.store.add_part(session, chunk)
        session = self.store.session(device_id, upload_id)
        assert session is not None
        if session.offset < session.size:
            return _session(session)
        body = self.store.assemble(session)
        try:
            if hashlib.sha256(body).hexdigest() != session.sha256:
                raise InvalidRequest("the assembled upload does not match its SHA-256")
            receipt = self._accept(device_id, job, round_, upload_id, body)
        except InvalidRequest:
            with self.store.atomic():
                self.store.drop_session(session)
            raise
        with self.store.atomic():
            self.store.drop_session(session)
        return UploadSession(upload_id, round_id, session.size, session.size, receipt)

    def _admissible(
        self, device_id: str, round_id: int, key: str, known: UploadState | None = None
    ) -> tuple[UploadReceipt | None, JobRow, RoundRow]:
        """The receipt already given for ``key``, or the (job, round) that may take an
        update (``known``: `ServerStore.upload_state` as `before_body` read it)."""
        now = self.service.clock()
        # Shared: what the upload must know, in one read (`ServerStore.upload_state`);
        # the round's quota is met by the upload that meets it (`_accept`) and its
        # deadline by the timer: closed here only if it is due.
        state = known
        if state is None and self.store.shared:
            state = self.store.upload_state(round_id, device_id, key)
        admitted: bool | None = None  # not read yet
        if state is not None and now < state[0].deadline:
            round_, job, previous, admitted = state
        else:
            self.service.rounds.advance(now)
            found = self.store.round(round_id)
            if found is None:
                raise NotFound(f"no round {round_id}")
            round_, job = found, self.service.job(found.job)
            previous = self.store.update_by_key(device_id, key)
        if previous is not None:
            if previous.round_id != round_id and job.plan.job.mode == "sync":
                raise Conflict("this Idempotency-Key was used for another round")
            return _receipt(previous), job, round_
        if job.plan.job.mode == "async":
            return None, job, self._async_admissible(job, round_, device_id)
        if round_.status != "open":
            if now >= round_.deadline:
                raise DeadlinePassed(f"round {round_id} closed at its deadline")
            raise RoundClosed(f"round {round_id} is closed ({round_.reason})")
        if not (admitted if admitted is not None else self.store.is_admitted(round_id, device_id)):
            raise Forbidden(f"device was not admitted to round {round_id}")
        if not self.store.shared and self.store.has_update(round_id, device_id):
            # Shared: asked again, with the device's other requests held off, as the
            # update is accepted (`_still_admissible`).
            raise Conflict(f"device already uploaded an update for round {round_id}")
        return None, job, round_

    def _async_admissible(self, job: JobRow, trained: RoundRow, device_id: str) -> RoundRow:
        """Async: the round the device trained in, if its update may still be folded in."""
        if job.status == "finished":
            raise RoundClosed("the job ran all its rounds")
        if not self.store.is_admitted(trained.round_id, device_id):
            raise Forbidden(f"device holds no admission to round {trained.round_id}")
        staleness = job.model_version - trained.model_version
        if staleness > job.plan.job.max_staleness:
            raise RoundClosed(
                f"update trained on version {trained.model_version} is {staleness} versions "
                f"behind; the job takes at most {job.plan.job.max_staleness}"
            )
        return trained

    def _accept(
        self, device_id: str, job: JobRow, round_: RoundRow, key: str, body: bytes
    ) -> UploadReceipt:
        if len(body) > job.plan.job.max_upload_bytes:
            raise PayloadTooLarge(f"update is over {job.plan.job.max_upload_bytes} bytes")
        reference = self.service.reference(job.name, round_.model_version)
        num_examples, train_loss, body, spent, tensors, evaluation = validate_update(
            job.plan,
            round_.model_version,
            reference,
            body,
            accepts_extras=self.service.rounds.strategy_for(job.plan).accepts_extras,
        )
        now = self.service.clock()
        # Sync: the update belongs to its own round. Async: to the buffer open now, with
        # its staleness, and it uses up the admission it was trained under.
        target, staleness = round_, 0
        if job.plan.job.mode == "async":
            target = self.store.latest_rounds(job.name, 1)[0]
            staleness = target.model_version - round_.model_version
        receipt_id = uuid.uuid4().hex
        try:
            # Grouped: on PostgreSQL, committed with the other uploads this worker took
            # in the same few milliseconds (one fsync), as every write is on a SQLite file.
            with self.store.atomic(grouped=True):
                # What was checked before reading the body, again, now that it holds:
                # the round stays open and the device's other requests wait until this
                # transaction ends, on any worker.
                previous = self._still_admissible(job, round_, target, device_id, key, now)
                if previous is not None:
                    return previous
                if spent is not None:
                    self.store.record_privacy_spent(job.name, device_id, spent)
                if job.plan.job.mode == "async":
                    self.store.withdraw(round_.round_id, device_id)
                if evaluation is not None and self.service.evaluates(job, round_, device_id):
                    self.store.add_evaluation(round_.round_id, device_id, *evaluation)
                row = self.store.add_update(
                    target.round_id,
                    device_id,
                    key,
                    receipt_id,
                    num_examples,
                    train_loss,
                    body,
                    now,
                    staleness,
                )
                self.service.rounds.hold_decoded(receipt_id, tensors, target.round_id)
                if job.plan.selection.name:
                    self.service.pools.record(
                        job.name, round_.round_id, device_id, num_examples, train_loss, now
                    )
                self.service.rounds.accepted(job, target.round_id)
        except BaseException:
            self.service.rounds.drop_decoded(receipt_id)  # the update was not stored after all
            raise
        if self.service.metrics is not None:
            self.service.metrics.updates.labels(job.name).inc()
        # The update is in (on a shared database, committed; or in this worker's group,
        # then counted again once that commits: `quota_after_commit`): the quota,
        # counted over every worker's updates, may be met. Two workers that both see it
        # try to close the round; one does (`SyncRounds.close`).
        count = self.store.update_count(target.round_id)
        if count >= job.plan.job.devices_per_round:
            self.service.rounds.close(job, target, now, "quota")
        elif (
            self.store.shared
            and self.store.db.grouping
            and count >= job.plan.job.devices_per_round - RECOUNT_WITHIN
        ):
            self._recount.add(target.round_id)
        return _receipt(row)

    def recount(self) -> set[int]:
        """The rounds whose uploads in this request must be counted again once their
        group has committed (`quota_after_commit`)."""
        rounds, self._recount = self._recount, set()
        return rounds

    def quota_after_commit(self, round_id: int) -> None:
        """Close the round if its quota is met, now that this worker's group committed:
        an upload that a group took saw other workers' uncommitted groups nowhere, so two
        workers' last uploads, each in its own group, could each count one short and
        leave a full round open until the deadline timer."""
        with self.store.exclusive(lock=False):
            round_ = self.store.round(round_id)
            if round_ is None or round_.status != "open":
                return
            job = self.service.job(round_.job)
            if self.store.update_count(round_id) >= job.plan.job.devices_per_round:
                self.service.rounds.close(job, round_, self.service.clock(), "quota")

    def _still_admissible(
        self,
        job: JobRow,
        trained: RoundRow,
        target: RoundRow,
        device_id: str,
        key: str,
        now: float,
    ) -> UploadReceipt | None:
        """Inside the accepting transaction: the round that takes the update is open and
        stays so until it ends (`ServerStore.hold_for_upload`), the device holds its place
        (a row lock: its other requests wait), and its key and round are still unused;
        the receipt already given for ``key``, if another request of the device took it
        meanwhile."""
        status, held, previous, contributed = self.store.hold_for_upload(
            target.round_id, trained.round_id, device_id, key
        )
        if status != "open":
            if job.plan.job.mode == "sync" and now >= target.deadline:
                raise DeadlinePassed(f"round {target.round_id} closed at its deadline")
            raise RoundClosed(f"round {target.round_id} is closed")
        if not held:
            raise Forbidden(f"device holds no admission to round {trained.round_id}")
        if previous is not None:
            return _receipt(previous)
        if job.plan.job.mode == "sync" and contributed:
            raise Conflict(f"device already uploaded an update for round {target.round_id}")
        return None


def unlocked(job: JobRow) -> bool:
    """Whether the job's check-ins and uploads run without the cluster-wide lock: a sync
    job without secure aggregation or selection (their state machines read, then write,
    several rows across requests, and keep the lock)."""
    plan = job.plan
    return plan.job.mode == "sync" and not plan.selection.name and not plan.privacy.secagg


def _session(row: SessionRow) -> UploadSession:
    return UploadSession(row.upload_id, row.round_id, row.size, row.offset)


def _receipt(row: UpdateRow) -> UploadReceipt:
    return UploadReceipt(
        row.receipt_id, row.round_id, row.device_id, row.num_examples, row.received_at
    )
