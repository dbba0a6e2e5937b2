"""The device's job loop: check in, download, train, upload — one stored step at a time.

The loop is written once, without I/O, as a generator (`JobLoop._step_flow`)
that yields *effects* (`fedclient._effects`: an `httpx.Request` to send, a download,
a `TrainTask` to run) and receives their results, the way httpx's auth flows do. The
drivers (`fedclient._drivers`, behind `fedclient.Client.step` and ``astep``) only
perform effects, and throw a failed one back in; so an app on a phone, the simulator
and the crash-recovery code all drive the same state table:

    phase       next action  ->  phase after it
    IDLE        check in         ADMITTED (or stays IDLE: retry later; finished:
                                 the job's final model held)
    ADMITTED    download         DOWNLOADED
    DOWNLOADED  train            TRAINED
    TRAINED     upload           IDLE (receipt kept; or work discarded: round closed)

and from ADMITTED, DOWNLOADED or TRAINED (before a secure aggregation starts), back
to IDLE, telling the server it leaves: when the conditions stop holding (checked
before each step and between minibatches), when the examples an update was trained
on were forgotten, or on any failure of the device's own (data that do not fit the
plan's model, a model that does not match, a backend's error), which is raised after.
A failure of the network leaves the phase as it was: the next step resumes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import uuid
from collections.abc import Generator
from typing import Any

import msgspec
import numpy as np

from fedclient._effects import (
    Effect,
    Flow,
    ResumableDownload,
    StepOutcome,
    TrainTask,
)
from fedclient._effects import decode_answer as _decode
from fedclient._effects import secagg_module as _secagg
from fedclient._exceptions import (
    ApiError,
    Conflict,
    FedError,
    IdentityRequired,
    InvalidInput,
    InvalidRequest,
    PrivacyBudgetExceeded,
    PrivacyPolicyViolation,
    RoundClosed,
    StateError,
    TransportError,
)
from fedclient._local_work import LocalWork
from fedclient._secure_flow import SecureUpload
from fedclient._state import Identity, Phase
from fedclient.compression import CompressionSpec, compress
from fedclient.conditions import ConditionsUnmet
from fedclient.privacy.dp import PrivacyLedger
from fedclient.protocol import (
    BROADCAST,
    CHECKIN,
    DEVICE_ID_HEADER,
    EVALUATION,
    IDEMPOTENCY_HEADER,
    JOB_STATUS,
    LEAVE,
    MODEL,
    MSGPACK_MEDIA_TYPE,
    TENSOR_MEDIA_TYPE,
    UPLOAD,
    UPLOAD_CHUNK,
    UPLOAD_START,
    Admitted,
    CheckinRequest,
    CheckinResponse,
    EvaluationReport,
    JobFinished,
    JobStatus,
    ModelSpec,
    RetryLater,
    RoundPlan,
    UploadReceipt,
    UploadSession,
    UploadStart,
    decode_tensors,
    encode_tensors,
    with_extras,
)
from fedclient.runtime import check_train_options
from fedclient.trainers import check_trainer_options
from fedclient.transport import error_code, raise_for_error

__all__ = ["CONDITIONS_RETRY", "JobLoop"]

CONDITIONS_RETRY = 60.0


class JobLoop(SecureUpload, LocalWork):
    """The job loop's steps, without I/O (see the module docstring): each yields the
    effects it needs and returns a `StepOutcome`."""

    def _step_flow(self) -> Flow:
        identity = self._store.identity(self.server)
        unmet = self.conditions.unmet() if self.conditions is not None else None
        if unmet is not None and self._store.phase(self.job) is Phase.IDLE:
            reason = f"conditions not met: {unmet}"
            return StepOutcome("waiting", retry_after=CONDITIONS_RETRY, reason=reason)
        if identity is None:
            # Not enrolled: the first check-in enrols it. The device proposes its own
            # token and stores it first, so a retried or resumed enrolment names the
            # same device instead of creating another.
            token = self._store.enrolment_token(self.server)
            return (yield from self._checkin(Identity("", token)))
        progress = self._store.progress(self.job)
        if progress.phase is Phase.IDLE:
            return (yield from self._checkin(identity))
        assert progress.plan is not None
        if unmet is not None and (
            progress.phase in (Phase.ADMITTED, Phase.DOWNLOADED)
            or (progress.phase is Phase.TRAINED and progress.plan.round_id not in self._secure)
        ):
            # Stopped qualifying before the work or before its upload: leave cleanly, the
            # place goes to another (once a secure aggregation started, it is a dropout).
            yield self._request(LEAVE, identity, round_id=progress.plan.round_id)
            return self._discard(progress.plan, f"conditions no longer met: {unmet}")
        if (
            progress.phase is Phase.TRAINED
            and progress.plan.round_id not in self._secure
            and self._forgotten_since(progress)
        ):
            # Trained on examples the user has since had forgotten: it must not leave.
            self._store.drop_residual(self.job)
            yield self._request(LEAVE, identity, round_id=progress.plan.round_id)
            return self._discard(progress.plan, "examples it was trained on were forgotten")
        if progress.phase is Phase.ADMITTED:
            download = self._download(identity, progress.plan)
            return (yield from self._leaving_on_failure(identity, progress.plan, download))
        if progress.phase is Phase.DOWNLOADED:
            train = self._train(identity, progress.plan)
            return (yield from self._leaving_on_failure(identity, progress.plan, train))
        assert progress.update is not None and progress.idempotency_key is not None
        return (
            yield from self._upload(
                identity, progress.plan, progress.update, progress.idempotency_key
            )
        )

    def _checkin(self, identity: Identity) -> Flow:
        """Check in (``identity`` without a device id: enrol with it first)."""
        if self._example_count() == 0:  # an example store with nothing in it yet
            return StepOutcome("waiting", retry_after=CONDITIONS_RETRY, reason="no examples yet")
        known = self._model_shape()
        if known is not None:  # bad data never takes a place in a round
            self._check_data(*known)
        held = self._store.held_version(self.job)
        inline = self.inline_model_max
        enrol = not identity.device_id
        # The identity key goes with an enrolment when an authority certified it (a server
        # with an authority enrols no one without), else when a secure job first asks.
        certificate = self._store.identity_certificate() if enrol else None
        send_identity = certificate is not None or self._identity_asked
        body = CheckinRequest(
            runtime=self.runtime,
            model_version=held[0] if held else None,
            inline_model_max=inline,
            enrol_label=self.label if enrol else None,
            enrol_credential=self.enrolment_credential if enrol else None,
            identity_key=self.identity_key if send_identity else None,
            identity_certificate=self._store.identity_certificate() if send_identity else None,
        )
        headers = {"Accept": f"{MSGPACK_MEDIA_TYPE}, application/json"} if inline else None
        response = yield self._request(CHECKIN, identity, json=body, headers=headers, job=self.job)
        if (
            response.status_code == 403
            and not send_identity
            and error_code(response) == (IdentityRequired.code)
        ):
            # Ask again at once, with the key (an enrolment it made is idempotent by token).
            self._identity_asked = True
            return (yield from self._checkin(identity))
        answer: CheckinResponse = _decode(response, CheckinResponse)  # type: ignore[arg-type]
        if enrol:
            device_id = response.headers.get(DEVICE_ID_HEADER, "")
            if not device_id:
                raise FedError("the server answered an enrolling check-in without a Device-Id")
            self._store.save_identity(self.server, Identity(device_id, identity.token))
        if isinstance(answer, RetryLater):
            return StepOutcome("waiting", retry_after=answer.retry_after, reason=answer.reason)
        if isinstance(answer, JobFinished):
            return (yield from self._finished(identity, answer.model_version))
        assert isinstance(answer, Admitted)
        plan = answer.plan.rebased(self.clock())
        try:
            self.policy.check(plan)
        except PrivacyPolicyViolation:
            # Refused before anything is stored or trained; the place goes to another device.
            yield self._request(LEAVE, identity, round_id=plan.round_id)
            raise
        return (yield from self._leaving_on_failure(identity, plan, self._admit(answer, plan)))

    def _admit(self, answer: Admitted, plan: RoundPlan) -> Flow:
        """Hold the admission, once the device's data and model fit the plan's."""
        self._job_shape = (plan.model.inputs, plan.model.classes)  # checked before, next time
        self._check_data(*self._job_shape)
        if answer.model is None:
            self._store.record_admission(self.job, plan)
        else:  # the model came along: admitted and downloaded in one transaction
            weights, _ = decode_tensors(answer.model)
            self._check_model(weights, plan)
            self._store.record_admission(self.job, plan, (answer.model_etag, answer.model))
            self._downloaded = (plan.model_version, answer.model_etag, weights)
        return StepOutcome("admitted", round_id=answer.plan.round_id)
        yield  # unreachable: it makes this a step of the flow, whose failures are caught

    def _leaving_on_failure(self, identity: Identity, plan: RoundPlan, work: Flow) -> Flow:
        """Do ``work`` for the round of ``plan``. A failure of the device's own (data that
        do not fit, a model that does not match, a backend's error) leaves the round at
        once, so the server gives the place to another device, and is raised. The
        network's failures keep the round: the next step resumes it."""
        try:
            return (yield from work)
        except (TransportError, ApiError, PrivacyBudgetExceeded, PrivacyPolicyViolation):
            raise  # the network's, or a refusal that left the round already
        except Exception as exc:
            if self._store.phase(self.job) is not Phase.IDLE:
                self._discard(plan, f"left after a failure on the device: {exc}")
            with contextlib.suppress(FedError):  # unheard, the place frees at the deadline
                yield self._request(LEAVE, identity, round_id=plan.round_id)
            raise

    def _finished(self, identity: Identity, version: int) -> Flow:
        """The job is over: hold its final model (fetched once), so `predict` and
        `latest_model` serve the last aggregate, not the one before it."""
        yield from self._hold_version(identity, version, None)
        return StepOutcome("finished", reason="the job is over", model_version=version)

    def _hold_version(
        self, identity: Identity, version: int, spec: ModelSpec | None
    ) -> Generator[Effect, Any, int]:
        """Hold model ``version`` of the job outside a round (downloaded unless held)."""
        held = self._store.held_version(self.job)
        if held is None or held[0] != version:
            spec = spec or self._store.held_spec(self.job)
            if spec is None:  # never admitted: the job's status names the architecture
                spec = (yield from self._status_flow()).plan.model
            request = self._request(MODEL, identity, job=self.job, version=version)
            response = yield ResumableDownload(request, self.job, version)
            raise_for_error(response)
            self._check_weights(decode_tensors(response.content)[0], spec)
            etag = response.headers.get("ETag", "")
            self._store.hold_model(self.job, version, etag, response.content, spec)
        return version

    def _status_flow(self) -> Generator[Effect, Any, JobStatus]:
        identity = self._store.identity(self.server)
        if identity is None:
            raise StateError("the device is not enrolled yet (its first check-in enrols it)")
        response = yield self._request(JOB_STATUS, identity, job=self.job)
        status: JobStatus = _decode(response, JobStatus)
        return status

    def _refresh_flow(self) -> Generator[Effect, Any, int]:
        status = yield from self._status_flow()
        identity = self._store.identity(self.server)
        assert identity is not None  # the status flow needs it
        return (yield from self._hold_version(identity, status.model_version, status.plan.model))

    def _download(self, identity: Identity, plan: RoundPlan) -> Flow:
        held = self._store.held_version(self.job)
        headers = {}
        if held is not None and held[0] == plan.model_version:
            headers["If-None-Match"] = held[1]
        request = self._request(
            MODEL, identity, headers=headers, job=self.job, version=plan.model_version
        )
        response = yield ResumableDownload(request, self.job, plan.model_version)
        raise_for_error(response)
        if response.status_code == 304 and held is not None:
            self._store.record_download(self.job, plan, held[1], None)
        else:
            weights, _ = decode_tensors(response.content)
            self._check_model(weights, plan)
            etag = response.headers.get("ETag", "")
            self._store.record_download(self.job, plan, etag, response.content)
            self._downloaded = (plan.model_version, etag, weights)
        return StepOutcome("downloaded", round_id=plan.round_id)

    def _train(self, identity: Identity, plan: RoundPlan) -> Flow:
        needed = self._seconds_needed(plan)
        if self.clock() + (needed or 0.0) >= plan.deadline:
            # Tell the server now, so it can give the place to a device that can finish.
            yield self._request(LEAVE, identity, round_id=plan.round_id)
            return self._discard(
                plan, f"cannot finish before the deadline (needs about {needed or 0:.0f} s)"
            )
        try:  # the policy may have changed since the admission (an app update)
            privacy = self.policy.check(plan)
            if privacy is not None:  # refuse before training, not after: the work is wasted
                ledger = PrivacyLedger(self._store.db, self._store.key)
                epsilon_after = ledger.check(
                    self.job,
                    privacy.mechanism.noise_multiplier,
                    privacy.budget,
                    lifetime=privacy.lifetime,
                )
        except (PrivacyBudgetExceeded, PrivacyPolicyViolation) as exc:
            yield self._request(LEAVE, identity, round_id=plan.round_id)
            self._discard(plan, str(exc))
            raise
        settings = plan.train
        # The backend checks the data (shape, finite values, labels in range) as it
        # trains, before it changes anything: bad data fail this step, state untouched.
        x, y, generation = self._training_data()  # a snapshot: later examples wait a round
        trainer, server, kept = None, {}, {}
        if settings.trainer:  # research in simulation: a trainer this device holds
            refusal = self._trainer_refusal(plan)
            if refusal is not None:
                raise InvalidInput(refusal)  # leaves the round (`_leaving_on_failure`)
            trainer = (self.trainers or {})[settings.trainer]
            response = yield self._request(
                BROADCAST, identity, job=self.job, version=plan.model_version
            )
            if response.status_code == 409:  # the round closed: its model is not current
                yield self._request(LEAVE, identity, round_id=plan.round_id)
                return self._discard(plan, "the round's model is no longer the job's")
            raise_for_error(response)
            server = decode_tensors(response.content)[0]
            held_state = self._store.trainer_state(self.job, generation)
            kept = decode_tensors(held_state)[0] if held_state else {}
        base = self._held_weights(plan)
        backend = self._backend(plan)
        if trainer is None:  # a setting the runtime cannot honour: refused, place given back
            check_train_options(backend, settings.options())
        evaluation = None
        if (
            plan.evaluate
            and not plan.privacy.secagg
            and (privacy is None or self.policy.share_metadata)
        ):
            # The received model, measured before training touches it.
            backend.set_weights(base)
            held_out = self.eval_data if self.eval_data is not None else (x, y)
            measured = backend.evaluate(np.asarray(held_out[0]), np.asarray(held_out[1]))
            evaluation = {
                "eval_correct": str(round(measured.accuracy * measured.num_examples)),
                "eval_loss_sum": repr(measured.loss * measured.num_examples),
                "eval_examples": str(measured.num_examples),
            }
        seed = None if self.seed is None else self.seed * 1_000_003 + plan.round_id
        try:
            weights, result, seconds = yield TrainTask(
                backend,
                base,
                x,
                y,
                settings.epochs,
                settings.batch_size,
                settings.round_learning_rate(plan.round_number),
                seed,
                settings.proximal_mu,
                self.conditions.interrupt() if self.conditions is not None else None,
                settings.options(),
                trainer,
                settings,
                plan.round_number,
                server,
                kept,
            )
        except ConditionsUnmet as stopped:  # unplugged mid-training: leave, drop the work
            yield self._request(LEAVE, identity, round_id=plan.round_id)
            return self._discard(plan, str(stopped))
        delta = {
            name: (weights[name] - base[name]).astype(base[name].dtype, copy=False) for name in base
        }
        spec = CompressionSpec.parse(plan.compression)
        if result.extras and (privacy is not None or plan.privacy.secagg or spec.active):
            # Beside a DP release, inside a secure sum or compressed, they would leave
            # unprotected or unreadable: refused, as a plan the device cannot follow.
            raise InvalidInput(
                "a trainer's extra tensors travel only without DP, secagg and compression"
            )
        metadata = {"model_version": str(plan.model_version), "round_id": str(plan.round_id)}
        if privacy is None or self.policy.share_metadata:
            # Beside a DP release these would be unnoised facts about the data: by default
            # they stay on the device, and the server weights the update like any other.
            metadata["num_examples"] = str(result.num_examples)
            metadata["train_loss"] = repr(result.loss)
        metadata.update(evaluation or {})
        if privacy is not None and not (plan.privacy.distributed_dp and plan.privacy.secagg):
            delta = privacy.mechanism.privatize(delta, self._noise_source(plan))
            # Not about the data: the count of releases and the plan fix it.
            metadata["epsilon_spent"] = repr(epsilon_after)
        # With distributed DP the noise goes in with the masked input (`_secure_vector`);
        # the ledger is charged for it below all the same, before anything can leave.
        residual_body = None
        if spec.active and not plan.privacy.secagg:  # secure sums quantise on their grid
            held_residual = self._store.residual(self.job, generation)
            residual = decode_tensors(held_residual)[0] if held_residual else None
            tensors, left_out = compress(delta, spec, np.random.default_rng(seed), residual)
            metadata["compression"] = str(spec)
            body = encode_tensors(tensors, metadata)
            residual_body = encode_tensors(left_out)
        else:
            body = encode_tensors(with_extras(delta, result.extras or {}), metadata)
        key = uuid.uuid4().hex
        with self._store.atomic():  # the release is charged before it can leave
            if seconds > 0:
                self._store.record_speed(settings.work(len(y)) / seconds)
            if privacy is not None:
                ledger.charge(
                    self.job,
                    key,
                    privacy.mechanism.noise_multiplier,
                    privacy.budget,
                    lifetime=privacy.lifetime,
                )
            if result.state is not None:  # kept with the update it came with
                state = encode_tensors(result.state)
                self._store.keep_trainer_state(self.job, state, generation)
            self._store.hold_update(self.job, plan, body, key, residual_body, generation)
        return StepOutcome(
            "trained", round_id=plan.round_id, train_loss=result.loss, examples=len(y)
        )

    def _trainer_refusal(self, plan: RoundPlan) -> str | None:
        """Why this device cannot train with the plan's trainer (None: it can): it must
        hold one under that name (`trainers`), and honour the plan's settings."""
        name = plan.train.trainer
        trainer = (self.trainers or {}).get(name)
        if trainer is None:
            return f"the plan asks for the trainer {name!r}, which this device does not hold"
        try:
            check_trainer_options(trainer, name, plan.train)
        except InvalidInput as exc:
            return str(exc)
        return None

    def _upload(self, identity: Identity, plan: RoundPlan, body: bytes, key: str) -> Flow:
        headers = {IDEMPOTENCY_HEADER: key, "Content-Type": TENSOR_MEDIA_TYPE}
        rejected: tuple[type[Exception], ...] = (RoundClosed, InvalidRequest, Conflict)
        if plan.privacy.secagg:
            rejected += (_secagg().SecAggError,)
        try:
            if plan.privacy.secagg:
                secured = yield from self._secure_upload(identity, plan, body)
                if isinstance(secured, StepOutcome):
                    return secured  # waiting for the other devices' stage
                receipt = secured
            elif len(body) <= self.chunk_threshold:
                response = yield self._request(
                    UPLOAD, identity, content=body, headers=headers, round_id=plan.round_id
                )
                receipt = _decode(response, UploadReceipt)
            else:
                receipt = yield from self._upload_chunks(identity, plan, body, key)
        except rejected as exc:
            # Stale or rejected work must never be sent again, nor into another round.
            self._secure.pop(plan.round_id, None)
            if isinstance(exc, RoundClosed) and not plan.privacy.secagg:
                yield from self._report_evaluation(identity, plan, body)
            return self._discard(plan, str(exc))
        self._store.record_receipt(self.job, receipt)
        return StepOutcome("uploaded", round_id=plan.round_id, receipt=receipt)

    def _report_evaluation(
        self, identity: Identity, plan: RoundPlan, body: bytes
    ) -> Generator[Effect, Any, None]:
        """The update came too late to count: send the evaluation it carries (if the
        round asked this device for one) on its own, so the round's federated accuracy
        hears from every device asked, not only from those whose updates counted."""
        metadata = decode_tensors(body)[1]
        if "eval_examples" not in metadata:
            return
        report = EvaluationReport(
            int(metadata["eval_correct"]),
            float(metadata["eval_loss_sum"]),
            int(metadata["eval_examples"]),
        )
        with contextlib.suppress(FedError):  # lost, it costs one device's measure, no more
            yield self._request(EVALUATION, identity, json=report, round_id=plan.round_id)

    def _upload_chunks(
        self, identity: Identity, plan: RoundPlan, body: bytes, key: str
    ) -> Generator[Effect, Any, UploadReceipt]:
        """A large update in chunks. Opening the session again tells the device how much
        the server already holds, so a broken upload resumes where it stopped."""
        start = UploadStart(size=len(body), sha256=hashlib.sha256(body).hexdigest())
        response = yield self._request(
            UPLOAD_START,
            identity,
            json=start,
            headers={IDEMPOTENCY_HEADER: key},
            round_id=plan.round_id,
        )
        session = _decode(response, UploadSession)
        if 0 < session.offset < session.size:
            self.stats.resumed_transfers += 1
        while session.receipt is None:
            chunk = body[session.offset : session.offset + self.chunk_bytes]
            response = yield self._request(
                UPLOAD_CHUNK,
                identity,
                content=chunk,
                headers={
                    "Upload-Offset": str(session.offset),
                    "Content-Type": "application/octet-stream",
                },
                round_id=plan.round_id,
                upload_id=key,
            )
            held = response.headers.get("Upload-Offset", "")
            if response.status_code == 409 and held.isdigit():
                # The server holds more (an answer was lost) or less than we thought.
                session = msgspec.structs.replace(session, offset=int(held))
                self.stats.resumed_transfers += 1
                continue
            session = _decode(response, UploadSession)
        return session.receipt
