"""The server's handlers as plain functions: no HTTP here, so tests call them directly.

Each handler authenticates, brings rounds up to date with the clock, validates
everything, and only then writes, in one transaction. A rejected request
raises an `ApiError` subclass and changes nothing.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

from fedclient._exceptions import (
    Conflict,
    Forbidden,
    IdentityRequired,
    InvalidInput,
    NotFound,
    RoundClosed,
    ServiceUnavailable,
    Unauthorized,
)
from fedclient.protocol import (
    Admitted,
    CheckinRequest,
    CheckinResponse,
    EnrolRequest,
    EnrolResponse,
    EvaluationReport,
    JobFinished,
    JobPlan,
    JobStatus,
    RetryLater,
    RoundPlan,
    RoundSummary,
    UploadReceipt,
    Weights,
    decode_tensors,
    encode_tensors,
)
from fedclient.server.auth import EnrolmentPolicy, hash_token, new_credentials
from fedclient.server.job_snapshots import PAUSED_RETRY, ROUND_FULL, JobSnapshots, spread
from fedclient.server.operator import Operator
from fedclient.server.rounds import SyncRounds, model_etag
from fedclient.server.selection import NOT_SELECTED, SELECTION_PENDING, Pools
from fedclient.server.store import JobRow, RoundRow, ServerStore, serialised
from fedclient.server.strategies import ClientUpdate, Strategy, decode_state
from fedclient.server.uploads import Uploads, unlocked
from fedclient.server.validation import evaluation_counts

if TYPE_CHECKING:
    from fedclient.server.secure_rounds import SecureRounds

__all__ = ["CONTRIBUTED_RETRY", "FederationService"]


#: Seconds a device waits before asking again for a model damaged in storage.
DAMAGED_RETRY = 300.0

logger = logging.getLogger("fedserver")

#: Seconds a device that already contributed to the open round waits before it asks
#: again, at most (the round may close by quota any moment; its deadline may be far).
CONTRIBUTED_RETRY = 30.0


class FederationService:
    """Every job of one server: enrolment, check-in, models, uploads, status.

    Each handler runs inside one `ServerStore.exclusive` block, so several workers may
    serve one PostgreSQL database: everything a request needs to be correct is in the
    database, and what a worker keeps in memory is a cache (of immutable model
    versions; of the rest only within one block, when the database is shared). The hot
    path (check-ins and uploads of a sync job without secure aggregation or selection,
    status reads) runs beside the other workers' requests, without the cluster-wide
    lock (`unlocked`); the rest takes it."""

    def __init__(
        self,
        store: ServerStore,
        *,
        strategy: Strategy | None = None,
        clock: Callable[[], float] = time.time,
        secure_random: Callable[[int], bytes] = os.urandom,
        identity_authorities: tuple[bytes, ...] = (),
        enrolment: EnrolmentPolicy | None = None,
        admin_token: str | None = None,
        public_status: bool = True,
        metrics_token: str | None = None,
        public_metrics: bool = True,
    ) -> None:
        self.store = store
        self.clock = clock
        #: Who may enrol (`fedclient.server.auth.EnrolmentPolicy`; default: anyone).
        self.enrolment = enrolment or EnrolmentPolicy.open()
        #: The operator's handlers, and who may read status and metrics
        #: (`fedclient.server.operator`).
        self.operator = Operator(
            self,
            admin_token=admin_token,
            public_status=public_status,
            metrics_token=metrics_token,
            public_metrics=public_metrics,
        )
        #: Identity authorities' public keys: when set, a device enrols only with an
        #: identity key one of them certified (`fedclient.IdentityAuthority`).
        self.identity_authorities = identity_authorities
        #: The server's Prometheus counters (`fedclient.server.metrics.Metrics`), when its app
        #: serves them.
        self.metrics: Any = None
        # Public randomness of secure aggregations (sessions, graphs, rotations): a
        # simulation seeds it to reproduce its report; it hides nothing either way.
        self.secure_random = secure_random
        self.rounds = SyncRounds(store, strategy)
        #: The candidate pools of jobs that select (`fedclient.server.selection`).
        self.pools = Pools()
        #: What check-ins that cannot be admitted now are answered from.
        self.snapshots = JobSnapshots(store)
        #: The upload handlers, whole and chunked (`fedclient.server.uploads`).
        self.uploads = Uploads(self)
        self._secure: SecureRounds | None = None  # made by the first secure round
        # Decoded model versions (immutable once stored) that uploads are checked against.
        self._references: dict[tuple[str, int], Weights] = {}
        self._bodies: dict[tuple[str, int], tuple[bytes, str]] = {}  # see _model_body
        # Token hash -> device id. Devices are only ever added, so a hit stays true; every
        # request authenticates (an upload twice: before and after reading its body).
        self._devices: dict[str, str] = {}
        store.db.on_rollback.append(self._forget_written)

    def forget_device(self, device_id: str) -> None:
        """Drop what this service keeps of a device's token (it was revoked)."""
        for hashed, known in list(self._devices.items()):
            if known == device_id:
                del self._devices[hashed]

    def _forget_written(self) -> None:
        """Writes not yet committed were lost (a failed group commit): forget what this
        service kept of them (devices enrolled, updates held decoded, running sums)."""
        self._devices.clear()
        self.rounds.forget()

    @property
    def secure(self) -> SecureRounds:
        """The secure-aggregation rounds in flight (imported and made on first use: they
        bring in `cryptography`, which a server without secure jobs need not load)."""
        if self._secure is None:
            from fedclient.server.secure_rounds import SecureRounds

            self._secure = SecureRounds(self.store, self.secure_random)
        return self._secure

    # -- setup -----------------------------------------------------------------
    @serialised
    def add_job(self, plan: JobPlan) -> None:
        """Create the job, or resume it if the store already has it with the same plan."""
        if plan.selection.name and self.store.shared:
            raise InvalidInput(
                "a selection keeps its candidates in the server's memory: a job that "
                "selects runs on one worker, not on a shared database"
            )
        existing = self.store.job(plan.job.name)
        if existing is None:
            self.rounds.create_job(plan, self.clock())
        elif existing.plan != plan:
            raise InvalidInput(
                f"job {plan.job.name!r} already exists in the store with a "
                "different plan; use a new job name or a new database"
            )

    def tick(self) -> None:
        """Close the rounds whose quota is met or whose deadline passed, and the secure
        stages whose time is up (those under the cluster-wide lock)."""
        with self.store.exclusive(lock=False):
            if any(job.plan.privacy.secagg for job in self.store.jobs()):
                with self.store.exclusive():
                    self._tick_secure()
            self.rounds.advance(self.clock())

    def _tick_secure(self) -> None:
        now = self.clock()
        with self.store.atomic():  # a stage's close and the round's, together
            for round_id, aggregate in self.secure.tick(now).items():
                round_ = self.store.round(round_id)
                if round_ is None or round_.status != "open":
                    continue
                job = self.job(round_.job)
                if aggregate is None:  # too many dropouts: fail now, reveal nothing
                    reason = "secure aggregation failed"
                    self.rounds.close(job, round_, now, reason, updates=[])
                else:
                    self._close_secure(job, round_, now, aggregate)

    # -- handlers --------------------------------------------------------------
    def enrol(self, request: EnrolRequest) -> EnrolResponse:
        """Give a device an id and a bearer token (its own proposal, if it made one).

        Enrolling again with the same proposed token names the same device. Beside the
        other workers' requests (no cluster-wide lock): the token's uniqueness decides
        between two enrolments of one token at once, and the second names the first's
        device."""
        with self.store.exclusive(lock=False):
            enrolled = self._enrol(request)
            if enrolled is None:  # the same token enrolled meanwhile: name that device
                enrolled = self._enrol(request)
            assert enrolled is not None
            return enrolled

    def _enrol(self, request: EnrolRequest) -> EnrolResponse | None:
        device_id, token = new_credentials()
        token = request.token or token
        hashed = hash_token(token)
        key, certificate = request.identity_key, request.identity_certificate
        if self.identity_authorities:
            if key is None or certificate is None:
                raise Forbidden("this server enrols devices with a certified identity key only")
            self._check_certificate(key, certificate)
        try:
            return self._add_device(request, device_id, token, hashed)
        except _TokenTaken:
            return None

    def _add_device(
        self, request: EnrolRequest, device_id: str, token: str, hashed: str
    ) -> EnrolResponse:
        key, certificate = request.identity_key, request.identity_certificate
        with self.store.atomic():
            found = self.store.device_by_token(hashed)
            if found is not None and found[1]:
                raise Unauthorized("this device was revoked")
            existing = found[0] if found else None
            if existing is None:  # a new device: the enrolment policy decides
                self.enrolment.admit(request.credential, device_id, self.store)
            if existing is not None:
                held = self.store.device_identity(existing)
                if key is not None and held is not None and held[0] != key:
                    raise Conflict("this device enrolled with another identity key")
                if key is not None and held is None:  # its first key: registered now
                    self.store.set_device_identity(existing, key, certificate)
                return EnrolResponse(existing, token)
            if not self.store.add_device(device_id, hashed, request.label, key, certificate):
                raise _TokenTaken  # rolled back: a code it spent is unspent
        self._remember(hashed, device_id)  # stored: its first check-in follows at once
        if self.metrics is not None:
            self.metrics.enrolments.inc()
        return EnrolResponse(device_id, token)

    def _check_certificate(self, key: bytes, certificate: bytes | None) -> None:
        """Forbidden unless a trusted authority certified ``key`` (if the server has any)."""
        if not self.identity_authorities:
            return
        from fedclient.identity import verify_certificate

        if certificate is None or not verify_certificate(
            self.identity_authorities, key, certificate
        ):
            raise Forbidden("the identity certificate is not from a trusted authority")

    def authenticate(self, token: str) -> str:
        """The device id behind a bearer token (a read: no lock needed)."""
        hashed = hash_token(token)
        # Another worker may revoke a device: a shared database is asked every time.
        device_id = None if self.store.shared else self._devices.get(hashed)
        if device_id is None:
            device_id = self.store.device_for_token(hashed)
            if device_id is None:
                raise Unauthorized("unknown device token")
            self._remember(hashed, device_id)
        return device_id

    def _remember(self, hashed: str, device_id: str) -> None:
        if len(self._devices) >= 1 << 16:
            self._devices.clear()
        self._devices[hashed] = device_id

    def checkin(
        self, token: str, job_name: str, request: CheckinRequest, *, inline: bool = False
    ) -> CheckinResponse:
        """Admit the device to the job's open round, or tell it when to come back.

        A device that cannot be admitted now (the round is full, the job paused or
        finished) is answered from this worker's recent view of the job, without
        writing or locking anything (`fedclient.server.job_snapshots`); the others are
        decided in the database.

        ``inline``: the answer can carry bytes (msgpack), so an admission brings the
        round's model when the device does not hold it and it fits the device's
        ``inline_model_max``."""
        answer = self.turned_away(token, job_name)
        if answer is None:
            answer = self._checkin(self.authenticate(token), job_name, request)
        if not (inline and isinstance(answer, Admitted) and request.inline_model_max > 0):
            return answer
        version = answer.plan.model_version
        if request.model_version == version:
            return answer
        body, etag = self._model_body(job_name, version)
        if len(body) > request.inline_model_max:
            return answer
        return Admitted(answer.plan, body, etag)

    def turned_away(self, token: str, job_name: str) -> CheckinResponse | None:
        """The answer to a check-in that cannot be admitted now, from this worker's
        recent view of the job (`fedclient.server.job_snapshots`: no write, no lock, no
        read of the device); None when the exact path must decide. Where job status is
        private, the token is checked first (a read)."""
        if not self.operator.public_status:
            self.authenticate(token)
        return self.snapshots.not_now(job_name, hash_token(token), self.clock())

    def _checkin(self, device_id: str, job_name: str, request: CheckinRequest) -> CheckinResponse:
        with self.store.exclusive(lock=False):
            job = self.store.job(job_name)
            with self.store.exclusive(lock=job is None or not unlocked(job)):
                return self._admit(device_id, job_name, request)

    def _admit(self, device_id: str, job_name: str, request: CheckinRequest) -> CheckinResponse:
        job = self.job(job_name)
        now = self.clock()
        if self.rounds.advance(now):  # a round closed: the job moved on
            job = self.job(job_name)
        if job.status in ("finished", "stopped"):
            return JobFinished(job.model_version)
        round_ = self.store.latest_rounds(job.name, 1)[0]
        if round_.status != "open":  # another worker closed it since: come back soon
            return RetryLater(1.0, "the round is closing")
        if job.status == "paused":
            return RetryLater(spread(PAUSED_RETRY, device_id, round_.round_id), "the job is paused")
        if job.plan.job.mode == "async":
            return self._checkin_async(job, round_, device_id, now)
        wait = max(1.0, round_.deadline - now)
        if self.store.is_admitted(round_.round_id, device_id):
            if self.store.has_update(round_.round_id, device_id):
                # The round may close by quota long before its deadline: ask again soon.
                return RetryLater(min(wait, CONTRIBUTED_RETRY), "already contributed to this round")
            return Admitted(self._plan(job, round_, device_id))
        if job.plan.selection.name and self.pools.chosen(round_.round_id, device_id) is False:
            return RetryLater(wait, NOT_SELECTED)  # a candidate; the picked were admitted
        if self.store.admitted_count(round_.round_id) >= job.plan.admit_per_round:
            self.snapshots.forget(job.name)  # it filled since this worker last looked
            return RetryLater(spread(wait, device_id, round_.round_id), ROUND_FULL)
        if job.plan.selection.name:
            not_yet = self._select(job, round_, device_id, now)
            if not_yet is not None:
                return not_yet
        if job.plan.privacy.secagg and self.store.device_identity(device_id) is None:
            # A device registers its identity key when it first needs one (a job without
            # secure aggregation never asks for it: no key is made, no crypto loaded).
            if request.identity_key is None:
                raise IdentityRequired(
                    "secure aggregation needs the device's identity key: send identity_key "
                    "(and identity_certificate) with the check-in"
                )
            self._check_certificate(request.identity_key, request.identity_certificate)
            self.store.set_device_identity(
                device_id, request.identity_key, request.identity_certificate
            )
        if not self.store.admit_within(round_.round_id, device_id, now, job.plan.admit_per_round):
            self.snapshots.forget(job.name)  # another worker filled it meanwhile
            return RetryLater(spread(wait, device_id, round_.round_id), ROUND_FULL)
        if self.store.admitted_count(round_.round_id) >= job.plan.admit_per_round:
            self.snapshots.forget(job.name)  # full now: the next check-ins are turned away
            if job.plan.privacy.secagg:
                self._open_secure(job, round_)
        return Admitted(self._plan(job, round_, device_id))

    def _select(
        self, job: JobRow, round_: RoundRow, device_id: str, now: float
    ) -> RetryLater | None:
        """A round whose job selects: None to admit the device now (it was picked); else
        when to come back (the round still gathers candidates, or it was not picked).
        The devices picked with it are admitted too (`fedclient.server.selection`)."""
        wait = max(1.0, round_.deadline - now)
        places = job.plan.admit_per_round - self.store.admitted_count(round_.round_id)
        picked, retry = self.pools.offer(
            job.plan, round_.round_id, round_.number, round_.opened_at, device_id, places, now
        )
        if retry is not None:
            return RetryLater(retry, SELECTION_PENDING)
        with self.store.atomic():
            for other in picked:
                if other != device_id:
                    self.store.admit(round_.round_id, other, now)
        return None if device_id in picked else RetryLater(wait, NOT_SELECTED)

    def _open_secure(self, job: JobRow, round_: RoundRow) -> None:
        """The round is full: fix its cohort for secure aggregation."""
        current = self.store.model(job.name, round_.model_version)
        assert current is not None
        identities = {}
        for device in self.store.admitted_devices(round_.round_id):
            identity = self.store.device_identity(device)
            assert identity is not None  # checked at admission
            identities[device] = identity
        self.secure.open(round_.round_id, job.plan, identities, decode_tensors(current[0])[0])

    @serialised
    def secagg_fetch(self, token: str, round_id: int, stage: str) -> bytes:
        """A secure-aggregation stage's message for this device (msgpack)."""
        device_id = self.authenticate(token)
        self.rounds.advance(self.clock())
        return self.secure.fetch(round_id, device_id, stage)

    @serialised
    def secagg_post(
        self, token: str, round_id: int, stage: str, body: bytes
    ) -> UploadReceipt | None:
        """A device's message of a stage; the last one closes the round with the secure sum."""
        device_id = self.authenticate(token)
        now = self.clock()
        self.rounds.advance(now)
        round_ = self.store.round(round_id)
        if round_ is None:
            raise NotFound(f"no round {round_id}")
        if round_.status != "open":
            raise RoundClosed(f"round {round_id} is closed ({round_.reason})")
        with self.store.atomic():  # the message and the close it brings, together
            receipt, aggregate = self.secure.post(round_id, device_id, stage, body, now)
            if aggregate is not None:
                self._close_secure(self.job(round_.job), round_, now, aggregate)
        return receipt

    def _close_secure(
        self, job: JobRow, round_: RoundRow, now: float, aggregate: ClientUpdate
    ) -> None:
        """End a round with its secure sum: the mean update, shaped like the model."""
        current = self.store.model(job.name, round_.model_version)
        assert current is not None
        base = decode_tensors(current[0])[0]
        flat, at, delta = aggregate.delta["flat"], 0, {}
        for name in sorted(base):  # devices flatten in sorted-name order
            size = base[name].size
            delta[name] = flat[at : at + size].reshape(base[name].shape).astype(np.float32)
            at += size
        update = ClientUpdate("secagg", aggregate.num_examples, delta)
        self.rounds.close(job, round_, now, "secure sum", updates=[update])

    def _checkin_async(
        self, job: JobRow, round_: RoundRow, device_id: str, now: float
    ) -> CheckinResponse:
        """Async: any number of buffers may be in flight; at most ``admit_per_round``
        devices train at once, each on the version current when it checked in. A
        device that neither uploads nor leaves within ``deadline_seconds`` of its
        check-in (switched off, out of reach) gives its place back: without that, devices
        that vanish would hold every place and the job would wait for ever. Its update,
        should it come after all, still counts (weighted by its staleness)."""
        oldest = job.model_version - job.plan.job.max_staleness
        since = now - job.plan.job.deadline_seconds
        held = self.store.admission_of(job.name, device_id, oldest, since)
        if held is not None:
            return Admitted(self._plan(job, held, device_id))
        if self.store.in_flight(job.name, oldest, since) >= job.plan.admit_per_round:
            return RetryLater(1.0, "enough devices are training")
        lapsed = self.store.admission_of(job.name, device_id, oldest)
        with self.store.atomic():
            if lapsed is not None:  # back after its place lapsed: it starts again, afresh
                self.store.withdraw(lapsed.round_id, device_id)
            self.store.admit(round_.round_id, device_id, now)
        return Admitted(self._plan(job, round_, device_id))

    @serialised
    def leave(self, token: str, round_id: int) -> bool:
        """A device gives its place in a round back (if it has not contributed)."""
        device_id = self.authenticate(token)
        round_ = self.store.round(round_id)
        if round_ is None:
            raise NotFound(f"no round {round_id}")
        job = self.job(round_.job)
        if not self.store.is_admitted(round_id, device_id) or (
            job.plan.job.mode == "sync"
            and (round_.status != "open" or self.store.has_update(round_id, device_id))
        ):
            return False
        with self.store.atomic():
            self.store.withdraw(round_id, device_id)
        return True

    @serialised
    def report_evaluation(self, token: str, round_id: int, report: EvaluationReport) -> None:
        """A device's evaluation of ``round_id``'s model, on its own (its update did not
        count): kept once per device and round (a repeat changes nothing), from a device
        asked to evaluate."""
        device_id = self.authenticate(token)
        round_ = self.store.round(round_id)
        if round_ is None:
            raise NotFound(f"no round {round_id}")
        job = self.job(round_.job)
        if not (
            self.store.is_admitted(round_id, device_id) and self.evaluates(job, round_, device_id)
        ):
            raise Forbidden(f"this device was not asked to evaluate round {round_id}'s model")
        counts = {
            "eval_correct": str(report.correct),
            "eval_loss_sum": repr(report.loss_sum),
            "eval_examples": str(report.examples),
        }
        evaluation = evaluation_counts(counts, job.plan.job.max_examples)
        assert evaluation is not None
        with self.store.atomic():
            self.store.add_evaluation(round_id, device_id, *evaluation)

    def model(self, token: str, job_name: str, version: int) -> tuple[bytes, str]:
        """A model version's body and ETag (immutable once stored: read without the
        cluster-wide lock, which every admitted device's download would otherwise take)."""
        with self.store.exclusive(lock=False):
            self.authenticate(token)
            self.job(job_name)
            try:
                return self._model_body(job_name, version)
            except KeyError:
                raise NotFound(f"job {job_name!r} has no model version {version}") from None

    def job_status(self, job_name: str) -> JobStatus:
        """The job's progress and current round."""
        with self.store.exclusive(lock=False):
            return self._job_status(job_name)

    def _job_status(self, job_name: str) -> JobStatus:
        self.rounds.advance(self.clock())
        job = self.job(job_name)
        latest = self.store.latest_rounds(job_name, 2)
        summaries = [self.summary(r) for r in latest]
        if latest and latest[0].status == "open":
            current, previous = summaries[0], (summaries[1] if len(summaries) > 1 else None)
        else:
            current, previous = None, (summaries[0] if summaries else None)
        return JobStatus(
            job.name,
            job.status,  # type: ignore[arg-type]
            job.model_version,
            job.rounds_completed,
            job.rounds_failed,
            current,
            job.plan,
            previous,
            self.store.privacy_spent(job.name),
        )

    def round_status(self, job_name: str, number: int) -> RoundSummary:
        """One round of a job."""
        with self.store.exclusive(lock=False):
            return self._round_status(job_name, number)

    def _round_status(self, job_name: str, number: int) -> RoundSummary:
        self.rounds.advance(self.clock())
        round_ = self.store.round_by_number(self.job(job_name).name, number)
        if round_ is None:
            raise NotFound(f"job {job_name!r} has no round {number}")
        return self.summary(round_)

    def summary(self, round_: RoundRow) -> RoundSummary:
        """A round as its status answers say."""
        devices, correct, loss_sum, examples = self.store.evaluation(round_.round_id)
        return RoundSummary(
            round_.round_id,
            round_.number,
            round_.status,  # type: ignore[arg-type]
            round_.model_version,
            round_.opened_at,
            round_.deadline,
            self.store.admitted_count(round_.round_id),
            self.store.update_count(round_.round_id),
            round_.closed_at,
            round_.reason,
            round_.train_loss,
            devices,
            correct / examples if examples else None,
            loss_sum / examples if examples else None,
        )

    # -- helpers ---------------------------------------------------------------
    def job(self, name: str) -> JobRow:
        """A job by name, or `NotFound`."""
        job = self.store.job(name)
        if job is None:
            raise NotFound(f"no job {name!r}")
        return job

    def evaluates(self, job: JobRow, round_: RoundRow, device_id: str) -> bool:
        """Whether ``device_id`` evaluates ``round_``'s model (`EvaluateSettings`)."""
        settings = job.plan.evaluate
        if not settings.every or round_.number % settings.every:
            return False
        if not settings.devices:
            return True
        return device_id in self.store.admitted_devices(round_.round_id)[: settings.devices]

    def _plan(self, job: JobRow, round_: RoundRow, device_id: str = "") -> RoundPlan:
        # Async buffers have no deadline; a device gets deadline_seconds from now to finish.
        deadline = (
            round_.deadline
            if job.plan.job.mode == "sync"
            else self.clock() + job.plan.job.deadline_seconds
        )
        return RoundPlan(
            job.name,
            round_.round_id,
            round_.number,
            round_.model_version,
            deadline,
            self.clock(),
            job.plan.model,
            job.plan.train,
            job.plan.job.compression,
            job.plan.privacy,
            job.plan.job.rounds,
            job.plan.job.min_devices,
            bool(device_id) and self.evaluates(job, round_, device_id),
        )

    def _model_body(self, job: str, version: int) -> tuple[bytes, str]:
        """Model ``version`` of ``job``: (body, ETag), KeyError if there is none. The
        newest few are kept (immutable once stored): a round's check-ins and downloads
        all serve the same one. Each is checked against its digest as it is read (once
        per version, a hash of the body): a model damaged on disk since the start-up
        checks is never served, and every request that needs it answers 503."""
        key = (job, version)
        held = self._bodies.get(key)
        if held is None:
            found = self.store.model(job, version)
            if found is None:
                raise KeyError(key)
            if model_etag(found[0]) != found[1]:
                logger.error("job %r's model version %d does not match its digest", job, version)
                raise ServiceUnavailable(
                    f"job {job!r}'s stored model version {version} is damaged; the operator"
                    " must restore the database",
                    retry_after=DAMAGED_RETRY,
                )
            held = self._bodies[key] = found
            if len(self._bodies) > 4:
                del self._bodies[next(iter(self._bodies))]
        return held

    def reference(self, job: str, version: int) -> Weights:
        """Model ``version`` of ``job``, decoded once (callers only read it)."""
        key = (job, version)
        if key not in self._references:
            self._references[key] = decode_tensors(self._model_body(job, version)[0])[0]
            if len(self._references) > 16:  # async jobs check against recent versions
                del self._references[next(iter(self._references))]
        return self._references[key]

    @serialised
    def broadcast(self, token: str, job_name: str, version: int) -> bytes:
        """What the job's strategy sends beside model ``version`` (the current one)."""
        self.authenticate(token)
        job = self.job(job_name)
        if version != job.model_version:
            raise Conflict(
                f"job {job_name!r} is at model version {job.model_version}, not {version}"
            )
        held = self.store.strategy_state(job_name)
        state = decode_state(held) if held else {}
        return encode_tensors(self.rounds.strategy_for(job.plan).broadcast(state))


class _TokenTaken(Exception):
    """Another request enrolled the same token meanwhile (its transaction rolls back)."""
