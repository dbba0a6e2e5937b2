"""The device's job loop: check in, download, train, upload — one stored step at a time.

The loop is written once, without I/O, as a generator (`Client._step_flow`)
that yields *effects* — an `httpx.Request` to send or a `TrainTask` to run —
and receives their results, the way httpx's auth flows do. The sync driver
(`Client.step`) and the async driver (`Client.astep`) only perform effects, so
an app on a phone, the simulator and the crash-recovery code all drive the same
state table:

    phase       next action  ->  phase after it
    IDLE        check in         ADMITTED (or stays IDLE: retry later / finished)
    ADMITTED    download         DOWNLOADED
    DOWNLOADED  train            TRAINED
    TRAINED     upload           IDLE (receipt kept; or work discarded: round closed)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import ssl
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, TypeVar

import httpx
import msgspec
import numpy as np

from fedclient._examples import ExampleStore
from fedclient._exceptions import (
    Conflict,
    FedError,
    IdentityRequired,
    InvalidInput,
    InvalidRequest,
    ModelMismatch,
    PrivacyBudgetExceeded,
    PrivacyPolicyViolation,
    RequestTimeout,
    RoundClosed,
    StateError,
    TransportError,
)
from fedclient._personalize import Personalization
from fedclient._state import DeviceState, Identity, Phase
from fedclient.compression import CompressionSpec, compress
from fedclient.conditions import Conditions
from fedclient.privacy.distributed import device_sigma, honest_shares, ring_holds_noise
from fedclient.privacy.dp import PrivacyLedger
from fedclient.privacy.noise import NoiseSource, discrete_gaussian
from fedclient.privacy.policy import PrivacyPolicy
from fedclient.protocol import (
    BROADCAST,
    CHECKIN,
    DEVICE_ID_HEADER,
    IDEMPOTENCY_HEADER,
    LEAVE,
    MODEL,
    MSGPACK_MEDIA_TYPE,
    SECAGG_FETCH,
    SECAGG_POST,
    TENSOR_MEDIA_TYPE,
    UPLOAD,
    UPLOAD_CHUNK,
    UPLOAD_START,
    Admitted,
    CheckinRequest,
    CheckinResponse,
    JobFinished,
    RetryLater,
    RoundPlan,
    Route,
    TrainSettings,
    UploadReceipt,
    UploadSession,
    UploadStart,
    Weights,
    decode_tensors,
    encode_tensors,
    with_extras,
)
from fedclient.runtime import (
    TrainingBackend,
    TrainResult,
    check_dataset,
    check_train_options,
    create_backend,
)
from fedclient.trainers import TrainContext, Trainer, check_trainer_options
from fedclient.transport import (
    RetryPolicy,
    error_code,
    is_retriable_status,
    raise_for_error,
    ssl_context,
)

__all__ = ["Client", "StepOutcome", "TrainTask", "TransferStats"]

T = TypeVar("T")
logger = logging.getLogger("fedclient")

#: Seconds a device waits before looking again when its conditions are not met (or it
#: has no examples yet).
CONDITIONS_RETRY = 60.0

#: A streamed download is stored in blocks of this many bytes (the most a break loses).
DOWNLOAD_BLOCK = 256 * 1024

#: What a step did.
StepStatus = Literal[
    "admitted", "downloaded", "trained", "uploaded", "waiting", "finished", "discarded"
]


@dataclass(frozen=True)
class StepOutcome:
    """The result of one step (or of `Client.run_once`)."""

    status: StepStatus
    round_id: int | None = None
    retry_after: float | None = None
    receipt: UploadReceipt | None = None
    reason: str = ""
    train_loss: float | None = None


@dataclass
class TransferStats:
    """What this client moved (HTTP headers and bodies) and what the network cost it."""

    bytes_up: int = 0
    bytes_down: int = 0
    requests: int = 0
    retries: int = 0
    wasted_bytes: int = 0  # sent or received in attempts that failed
    resumed_transfers: int = 0
    discarded_rounds: int = 0


@dataclass(frozen=True)
class TrainTask:
    """Local training as an effect: the driver decides where it runs."""

    backend: TrainingBackend
    weights: Weights
    x: np.ndarray
    y: np.ndarray
    epochs: int
    batch_size: int
    learning_rate: float
    seed: int | None
    proximal_mu: float = 0.0
    #: The plan's other training settings (`fedclient.protocol.TrainSettings.options`).
    options: dict[str, Any] = field(default_factory=dict)
    #: A client trainer instead of the backend's training (`fedclient.trainers`), with
    #: the plan's settings, the round, what the strategy sent and what it kept.
    trainer: Trainer | None = None
    settings: TrainSettings | None = None
    round_number: int = 0
    server: Weights = field(default_factory=dict)
    state: Weights = field(default_factory=dict)

    def run(self) -> tuple[Weights, TrainResult, float]:
        """Train from ``weights``; return the new weights, what training did, and the
        seconds it took. A setting the backend cannot honour is refused (`InvalidInput`)
        before anything trains."""
        started = time.perf_counter()
        if self.trainer is not None:
            assert self.settings is not None
            x, y = check_dataset(
                self.x, self.y, inputs=self.backend.inputs, classes=self.backend.classes
            )
            self.backend.set_weights(self.weights)
            context = TrainContext(
                self.backend,
                x,
                y,
                self.settings,
                self.learning_rate,
                self.round_number,
                np.random.default_rng(self.seed),
                self.server,
                self.state,
            )
            result = self.trainer.train(context)
            return self.backend.get_weights(), result, time.perf_counter() - started
        extra = dict(self.options)
        if self.proximal_mu:
            extra["proximal_mu"] = self.proximal_mu
        check_train_options(self.backend, extra)
        self.backend.set_weights(self.weights)
        result = self.backend.train(
            self.x,
            self.y,
            epochs=self.epochs,
            batch_size=self.batch_size,
            learning_rate=self.learning_rate,
            rng=np.random.default_rng(self.seed),
            **extra,
        )
        return self.backend.get_weights(), result, time.perf_counter() - started


@dataclass
class _SecureSession:
    """A device's side of one round's secure aggregation (in memory: a restart drops it)."""

    client: Any  # fedclient.privacy.secagg.SecAggClient
    stage: str = "keys"  # the stage whose answer it waits for next
    receipt: UploadReceipt | None = None


@dataclass(frozen=True)
class ResumableDownload:
    """A GET whose body is kept in the device state as it arrives, so a retry after a
    broken connection asks only for the rest (HTTP Range + If-Range)."""

    request: httpx.Request
    job: str
    version: int


Effect = httpx.Request | TrainTask | ResumableDownload
Flow = Generator[Effect, Any, StepOutcome]


@dataclass
class Client:
    """A device taking part in one federated job.

    ``server`` is the server's base URL; ``transport`` any httpx transport (e.g.
    ``httpx.ASGITransport(app)`` for an in-process server, which needs the
    async methods). ``state`` is a SQLite path or a `DeviceState`; the device
    resumes from it after a crash or restart. ``data`` is the device's local
    labelled set. ``model`` is optional: by default the plan's built-in model
    is trained with the ``runtime`` backend.

    The device learns its training speed from past rounds and does not start work
    it cannot finish before the round's deadline: it tells the server it is
    leaving instead (``estimate_seconds(examples x epochs)`` overrides the
    estimate, e.g. in a simulator).

    A model of at most ``inline_model_max`` bytes comes with the admission (one round
    trip); a bigger one (or with 0) is downloaded from the model route, resumably.

    The async driver trains inline unless ``atrain`` is given: it receives each
    `TrainTask` and returns what ``task.run()`` would (e.g. from a process pool).

    ``policy`` is the device's own `PrivacyPolicy`: a plan outside it is refused at
    admission, before anything is trained or sent (`PrivacyPolicyViolation`), and
    the ledger is charged as the policy accounts.

    ``verify`` is how the server's TLS certificate is checked (without ``transport``):
    True (the system's CA store), a CA bundle's path (a server whose certificate a
    private CA signed, or a self-signed one), or an `ssl.SSLContext`.

    ``conditions`` (`fedclient.Conditions`) say when the device may work: checked
    before it checks in and before each step of a round; a device that stops
    qualifying mid-round leaves it (the server gives the place to another).
    ``personalize`` (`Personalization`) fine-tunes the global model on the device's
    own data for `latest_model` and `predict` (never for what is uploaded).

    ``trainers`` are the client trainers (`fedclient.trainers`) this device holds, by
    the name a plan gives them (``[train] trainer``): research in simulation. A plan
    naming one it does not hold is refused; a plan never makes a device import code.

    ``enrolment_credential`` is what the server's enrolment policy asks of a new
    device: the app's enrolment secret, a single-use code, or an attestation token.

    ``eval_data`` is the device's held-out labelled set for federated evaluation
    (`fedclient.protocol.EvaluateSettings`); without it a device asked to evaluate
    measures the model on its training data, which flatters the model.

    ``seed`` fixes what training and compression draw (batch order, rounding), never
    privacy noise: that comes from a CSPRNG keyed by the OS. Only a simulation that
    wants reproducible reports sets ``simulation_seeded_noise``, which draws the noise
    from ``seed`` too and warns (`fedclient.privacy.noise.SeededNoiseWarning`) each
    round: anyone who knows the seed can subtract such noise.
    """

    server: str
    job: str
    data: tuple[np.ndarray, np.ndarray] | ExampleStore
    state: str | Path | DeviceState = field(default_factory=DeviceState.in_memory)
    model: TrainingBackend | None = None
    transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None = None
    runtime: str = "numpy"
    seed: int | None = None
    timeout: float = 30.0
    label: str = ""
    clock: Callable[[], float] = time.time
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    sleep: Callable[[float], None] = time.sleep
    asleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    chunk_threshold: int = 1024 * 1024
    inline_model_max: int = 1024 * 1024
    chunk_bytes: int = 256 * 1024
    estimate_seconds: Callable[[int], float] | None = None
    stats: TransferStats = field(default_factory=TransferStats)
    atrain: Callable[[TrainTask], Awaitable[tuple[Weights, TrainResult, float]]] | None = None
    simulation_seeded_noise: bool = False
    policy: PrivacyPolicy = field(default_factory=PrivacyPolicy)
    eval_data: tuple[np.ndarray, np.ndarray] | None = None
    verify: str | Path | bool | ssl.SSLContext = True
    enrolment_credential: str | None = None
    conditions: Conditions | None = None
    personalize: Personalization | None = None
    trainers: Mapping[str, Trainer] | None = None

    def __post_init__(self) -> None:
        self.server = self.server.rstrip("/")
        if not isinstance(self.state, DeviceState):
            self.state = DeviceState(self.state)
        self._store: DeviceState = self.state
        if not isinstance(self.data, ExampleStore):
            x, y = np.asarray(self.data[0]), np.asarray(self.data[1])
            if x.ndim != 2 or y.shape != (x.shape[0],) or len(y) == 0:
                raise InvalidInput(
                    "data must be (x, y) with x of shape (n, features), y of shape (n,), "
                    "or an ExampleStore"
                )
            self._arrays: tuple[np.ndarray, np.ndarray] | None = (x, y)
        else:
            self._arrays = None  # read from the store when a round trains
        if self.eval_data is not None:
            ex, ey = np.asarray(self.eval_data[0]), np.asarray(self.eval_data[1])
            if ex.ndim != 2 or ey.shape != (ex.shape[0],) or len(ey) == 0:
                raise InvalidInput(
                    "eval_data must be (x, y) with x of shape (n, features), y of shape (n,)"
                )
        if self.inline_model_max < 0:
            raise InvalidInput(f"inline_model_max must be 0 or more, got {self.inline_model_max}")
        self._sync: httpx.Client | _Direct | None = None
        self._async: httpx.AsyncClient | _AsyncDirect | None = None
        self._secure: dict[int, _SecureSession] = {}
        self._identity: Any = None  # fedclient.identity.SigningKey, loaded on first use
        self._identity_asked = False  # a secure job asked for the identity key
        self._personal: tuple[int, TrainingBackend] | None = None  # (version, fine-tuned)
        # The model just downloaded and checked, (version, etag, weights), handed to the
        # training step that follows so it need not read and decode the stored copy.
        self._downloaded: tuple[int, str, Weights] | None = None

    @property
    def device_state(self) -> DeviceState:
        """The device's SQLite state."""
        return self._store

    @property
    def identity_key(self) -> bytes:
        """The device's Ed25519 identity public key (made on first use and kept in the
        state): what an identity authority certifies (`DeviceState.set_identity_certificate`)."""
        return bytes(self._signer().public)

    def _signer(self) -> Any:
        """The device's identity key (`fedclient.identity.SigningKey`), loaded once."""
        if self._identity is None:
            from fedclient.identity import SigningKey

            self._identity = SigningKey(self._store.signing_key())
        return self._identity

    # -- drivers ---------------------------------------------------------------
    def step(self) -> StepOutcome:
        """Do the next step of the job loop over a blocking connection."""
        if isinstance(self.transport, httpx.AsyncBaseTransport) and not isinstance(
            self.transport, httpx.BaseTransport
        ):
            raise InvalidInput("this client has an async transport: use astep()/arun_once()")
        if self._sync is None:
            self._sync = (
                _Direct(self.transport)
                if isinstance(self.transport, httpx.BaseTransport)
                else httpx.Client(verify=ssl_context(self.verify))
            )
        flow = self._step_flow()
        try:
            effect: Effect = next(flow)
            while True:
                if isinstance(effect, TrainTask):
                    effect = flow.send(effect.run())
                elif isinstance(effect, ResumableDownload):
                    effect = flow.send(self._send(effect.request, download=effect))
                else:
                    effect = flow.send(self._send(effect))
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    async def astep(self) -> StepOutcome:
        """Do the next step of the job loop over an asyncio connection."""
        if self._async is None:
            self._async = (
                _AsyncDirect(self.transport)
                if isinstance(self.transport, httpx.AsyncBaseTransport)
                else httpx.AsyncClient(verify=ssl_context(self.verify))
            )
        flow = self._step_flow()
        try:
            effect: Effect = next(flow)
            while True:
                if isinstance(effect, TrainTask):
                    trained = await self.atrain(effect) if self.atrain else effect.run()
                    effect = flow.send(trained)
                elif isinstance(effect, ResumableDownload):
                    effect = flow.send(await self._asend(effect.request, download=effect))
                else:
                    effect = flow.send(await self._asend(effect))
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    def run_once(self) -> StepOutcome:
        """Step until this round's work is uploaded, or there is nothing to do now."""
        while True:
            outcome = self.step()
            if outcome.status in ("uploaded", "waiting", "finished", "discarded"):
                return outcome

    async def arun_once(self) -> StepOutcome:
        """Async twin of `run_once`."""
        while True:
            outcome = await self.astep()
            if outcome.status in ("uploaded", "waiting", "finished", "discarded"):
                return outcome

    def run_forever(self, *, rounds: int | None = None, stop: threading.Event | None = None) -> int:
        """Take part until the job finishes (or ``rounds`` uploads, or ``stop`` is set),
        waiting as the server and the `conditions` say between rounds. Returns how many
        rounds it uploaded to. For apps that just want it to run (on a thread)."""
        done = 0
        stop = stop or threading.Event()
        while not stop.is_set() and (rounds is None or done < rounds):
            outcome = self.run_once()
            if outcome.status == "finished":
                break
            done += outcome.status == "uploaded"
            if outcome.status in ("waiting", "uploaded"):
                stop.wait(_pause(outcome))
        return done

    async def arun_forever(
        self, *, rounds: int | None = None, stop: asyncio.Event | None = None
    ) -> int:
        """Async twin of `run_forever`."""
        done = 0
        stop = stop or asyncio.Event()
        while not stop.is_set() and (rounds is None or done < rounds):
            outcome = await self.arun_once()
            if outcome.status == "finished":
                break
            done += outcome.status == "uploaded"
            if outcome.status in ("waiting", "uploaded"):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), _pause(outcome))
        return done

    def latest_model(self, *, personalized: bool = False) -> TrainingBackend:
        """The newest global model the device holds, ready for inference through the
        device's runtime (no network call). ``personalized``: fine-tuned on the device's
        own data first, as `personalize` says (cached until a newer model arrives)."""
        held = self._store.held_model(self.job)
        spec = self._store.held_spec(self.job)
        if held is None:
            raise StateError(f"the device holds no model of job {self.job!r} yet")
        weights = decode_tensors(held[2])[0]
        if spec is None and self.model is None:
            raise StateError("the held model's architecture is unknown (an older state)")
        if not personalized:
            backend = create_backend(spec, self.runtime) if spec is not None else self.model
            assert backend is not None
            backend.set_weights(weights)
            return backend
        if self.personalize is None:
            raise InvalidInput("personalized=True needs Client(personalize=...)")
        if self._personal is None or self._personal[0] != held[0]:
            assert spec is not None
            tuned = create_backend(spec, self.runtime)
            x, y = self._training_data()
            self.personalize.apply(tuned, weights, x, y, seed=self.seed)
            self._personal = (held[0], tuned)
        return self._personal[1]

    def predict(self, x: np.ndarray, *, personalized: bool = False) -> np.ndarray:
        """Class probabilities of ``x`` under `latest_model` (shape (n, classes))."""
        return self.latest_model(personalized=personalized).predict(np.asarray(x))

    def close(self) -> None:
        """Close the blocking connection pool."""
        if self._sync is not None:
            self._sync.close()

    async def aclose(self) -> None:
        """Close the asyncio connection pool."""
        if self._async is not None:
            await self._async.aclose()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def _send(
        self, request: httpx.Request, download: ResumableDownload | None = None
    ) -> httpx.Response:
        assert self._sync is not None
        attempt, waited = 1, 0.0
        while True:
            sent = self._resume_from(request, download)
            result: httpx.Response | FedError
            try:
                if download is None:
                    result = self._account(sent, self._sync.send(sent))
                else:
                    response = self._sync.send(sent, stream=True)
                    sink = _DownloadSink(self, download, sent, response)
                    try:
                        for chunk in response.iter_bytes():
                            sink.take(chunk)
                    except BaseException:
                        sink.flush()  # keep what arrived, even when the stream broke
                        raise
                    finally:
                        response.close()
                    result = sink.finish()
            except httpx.TransportError as exc:
                result = self._failed(sent, exc)
            delay = self._retry_delay(result, attempt, waited)
            if delay is None:
                if isinstance(result, FedError):
                    raise result
                return result
            attempt, waited = attempt + 1, waited + delay
            self.sleep(delay)

    async def _asend(
        self, request: httpx.Request, download: ResumableDownload | None = None
    ) -> httpx.Response:
        assert self._async is not None
        attempt, waited = 1, 0.0
        while True:
            sent = self._resume_from(request, download)
            result: httpx.Response | FedError
            try:
                if download is None:
                    result = self._account(sent, await self._async.send(sent))
                else:
                    response = await self._async.send(sent, stream=True)
                    sink = _DownloadSink(self, download, sent, response)
                    try:
                        async for chunk in response.aiter_bytes():
                            sink.take(chunk)
                    except BaseException:
                        sink.flush()  # keep what arrived, even when the stream broke
                        raise
                    finally:
                        await response.aclose()
                    result = sink.finish()
            except httpx.TransportError as exc:
                result = self._failed(sent, exc)
            delay = self._retry_delay(result, attempt, waited)
            if delay is None:
                if isinstance(result, FedError):
                    raise result
                return result
            attempt, waited = attempt + 1, waited + delay
            await self.asleep(delay)

    def _resume_from(
        self, request: httpx.Request, download: ResumableDownload | None
    ) -> httpx.Request:
        """The request to send: a download resumes after the bytes the device holds."""
        if download is None:
            return request
        etag, held = self._store.partial_download(download.job, download.version)
        if not held:
            return request
        self.stats.resumed_transfers += 1
        headers = httpx.Headers(request.headers)
        headers["Range"] = f"bytes={held}-"
        headers["If-Range"] = etag
        return httpx.Request(
            request.method, request.url, headers=headers, extensions=request.extensions
        )

    def _retry_delay(
        self, result: httpx.Response | FedError, attempt: int, waited: float
    ) -> float | None:
        """Backoff before retrying, or None to hand the result back. Shared by both drivers."""
        if isinstance(result, httpx.Response):
            if not is_retriable_status(result.status_code):
                return None
            self.stats.wasted_bytes += _wire_size(result.headers, len(result.content))
            header = result.headers.get("Retry-After", "")
            retry_after = float(header) if header.replace(".", "", 1).isdigit() else None
        else:
            retry_after = None
        delay = self.retry.delay(attempt, waited, retry_after)
        if delay is not None:
            self.stats.retries += 1
        return delay

    def _failed(self, request: httpx.Request, exc: httpx.TransportError) -> FedError:
        """A request that got no usable answer: count it, and map the error."""
        self.stats.requests += 1
        self.stats.wasted_bytes += _wire_size(request.headers, len(request.content))
        where = f"{request.method} {request.url.path}"
        if isinstance(exc, httpx.TimeoutException):
            return RequestTimeout(f"{where}: {exc}")
        return TransportError(f"{where}: {exc!r}")

    def _account(self, request: httpx.Request, response: httpx.Response) -> httpx.Response:
        self.stats.requests += 1
        self.stats.bytes_up += _wire_size(request.headers, len(request.content))
        self.stats.bytes_down += _wire_size(response.headers, len(response.content))
        return response

    # -- the job loop, without I/O ---------------------------------------------
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
        if unmet is not None and progress.phase in (Phase.ADMITTED, Phase.DOWNLOADED):
            # Stopped qualifying before the work: leave cleanly, the place goes to another.
            yield self._request(LEAVE, identity, round_id=progress.plan.round_id)
            return self._discard(progress.plan, f"conditions no longer met: {unmet}")
        if progress.phase is Phase.ADMITTED:
            return (yield from self._download(identity, progress.plan))
        if progress.phase is Phase.DOWNLOADED:
            return (yield from self._train(identity, progress.plan))
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
            return StepOutcome("finished", reason="the job ran all its rounds")
        assert isinstance(answer, Admitted)
        plan = answer.plan.rebased(self.clock())
        try:
            self.policy.check(plan)
        except PrivacyPolicyViolation:
            # Refused before anything is stored or trained; the place goes to another device.
            yield self._request(LEAVE, identity, round_id=plan.round_id)
            raise
        if answer.model is None:
            self._store.record_admission(self.job, plan)
        else:  # the model came along: admitted and downloaded in one transaction
            weights, _ = decode_tensors(answer.model)
            self._check_model(weights, plan)
            self._store.record_admission(self.job, plan, (answer.model_etag, answer.model))
            self._downloaded = (plan.model_version, answer.model_etag, weights)
        return StepOutcome("admitted", round_id=answer.plan.round_id)

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
        trainer, server, kept = None, {}, {}
        if settings.trainer:
            refusal = self._trainer_refusal(plan)
            if refusal is not None:
                yield self._request(LEAVE, identity, round_id=plan.round_id)
                self._discard(plan, refusal)
                raise InvalidInput(refusal)
            trainer = (self.trainers or {})[settings.trainer]
            response = yield self._request(
                BROADCAST, identity, job=self.job, version=plan.model_version
            )
            if response.status_code == 409:  # the round closed: its model is not current
                return self._discard(plan, "the round's model is no longer the job's")
            raise_for_error(response)
            server = decode_tensors(response.content)[0]
            held_state = self._store.trainer_state(self.job)
            kept = decode_tensors(held_state)[0] if held_state else {}
        base = self._held_weights(plan)
        backend = self._backend(plan)
        if trainer is None:
            try:  # a setting the runtime cannot honour: refused, and the place given back
                check_train_options(backend, settings.options())
            except InvalidInput as exc:
                yield self._request(LEAVE, identity, round_id=plan.round_id)
                self._discard(plan, str(exc))
                raise
        # The backend checks the data (shape, finite values, labels in range) as it
        # trains, before it changes anything: bad data fail this step, state untouched.
        x, y = self._training_data()  # a snapshot: examples arriving now wait a round
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
            settings.options(),
            trainer,
            settings,
            plan.round_number,
            server,
            kept,
        )
        delta = {
            name: (weights[name] - base[name]).astype(base[name].dtype, copy=False) for name in base
        }
        spec = CompressionSpec.parse(plan.compression)
        if result.extras and (privacy is not None or plan.privacy.secagg or spec.active):
            # Beside a DP release, inside a secure sum or compressed, they would leave
            # unprotected or unreadable: refused, as a plan the device cannot follow.
            reason = "a trainer's extra tensors travel only without DP, secagg and compression"
            yield self._request(LEAVE, identity, round_id=plan.round_id)
            self._discard(plan, reason)
            raise InvalidInput(reason)
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
            held_residual = self._store.residual(self.job)
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
                self._store.keep_trainer_state(self.job, encode_tensors(result.state))
            self._store._hold_update(self.job, plan, body, key, residual_body)
        return StepOutcome("trained", round_id=plan.round_id, train_loss=result.loss)

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
            return self._discard(plan, str(exc))
        self._store.record_receipt(self.job, receipt)
        return StepOutcome("uploaded", round_id=plan.round_id, receipt=receipt)

    def _secure_upload(
        self, identity: Identity, plan: RoundPlan, body: bytes
    ) -> Generator[Effect, Any, UploadReceipt | StepOutcome]:
        """Secure aggregation instead of an upload: one stage per step. A step fetches
        the server's answer to the last stage and posts this device's next message, then
        waits (the stage closes only once the others posted too: fetching at once would
        nearly always be answered 425); a stage not closed yet is "waiting" too."""
        waiting = StepOutcome(
            "waiting",
            round_id=plan.round_id,
            retry_after=1.0,
            reason="secure aggregation: waiting for the other devices",
        )
        secagg = _secagg()
        session = self._secure.get(plan.round_id)
        if session is None:
            response = yield self._request(
                SECAGG_FETCH, identity, round_id=plan.round_id, stage="params"
            )
            if response.status_code == 425:
                return waiting
            raise_for_error(response)
            offer = msgspec.msgpack.decode(response.content)
            params = secagg.decode(offer["params"], secagg.SecAggParams)
            if plan.privacy.distributed_dp and params.rotation is None:
                # No common grid: the device's share of the noise could not go in.
                raise secagg.ProtocolViolation(
                    "distributed DP without a rotated grid in the aggregation's parameters"
                )
            # The cohort bounds are the device's own (PrivacyPolicy), checked against the
            # parameters here and against the roster it is shown (`SecAggClient`).
            policy = self.policy
            client = secagg.SecAggClient(
                params,
                int(offer["device"]),
                self._signer(),
                trusted_authorities=policy.trusted_authorities,
                trust_server_identities=policy.trust_server_identities,
                min_honest=policy.min_secure_cohort,
                colluding_fraction=policy.max_colluding_fraction,
                colluding_devices=policy.max_colluding_devices,
            )
            if plan.privacy.distributed_dp:
                self._distributed_sigma(plan, client)  # a ring too narrow: refused now
            session = _SecureSession(client)
            yield from self._secure_post(
                identity, plan, "keys", secagg.encode(session.client.advertise_keys())
            )
            self._secure[plan.round_id] = session
            return waiting
        response = yield self._request(
            SECAGG_FETCH, identity, round_id=plan.round_id, stage=session.stage
        )
        if response.status_code == 425:
            return waiting
        raise_for_error(response)
        client = session.client
        if session.stage == "keys":
            roster = secagg.decode(response.content, secagg.KeyRoster)
            signed, session.stage = client.agree(roster), "agree"
            yield from self._secure_post(identity, plan, "agree", secagg.encode(signed))
        elif session.stage == "agree":
            agreement = secagg.decode(response.content, secagg.RosterAgreement)
            message, session.stage = client.share_keys(agreement), "shares"
            yield from self._secure_post(identity, plan, "shares", secagg.encode(message))
        elif session.stage == "shares":
            bundle = secagg.decode(response.content, secagg.ShareBundle)
            vector = self._secure_vector(plan, body, client)
            masked = client.masked_input(bundle, vector)
            answer = yield from self._secure_post(identity, plan, "masked", secagg.encode(masked))
            session.receipt, session.stage = _decode(answer, UploadReceipt), "masked"
        elif session.stage == "masked":
            survivors = secagg.decode(response.content, secagg.SurvivorList)
            message, session.stage = client.consistency(survivors), "consistency"
            yield from self._secure_post(identity, plan, "consistency", secagg.encode(message))
        else:
            request = secagg.decode(response.content, secagg.UnmaskRequest)
            yield from self._secure_post(
                identity, plan, "unmask", secagg.encode(client.unmask(request))
            )
            self._secure.pop(plan.round_id, None)
            assert session.receipt is not None
            return session.receipt
        return waiting

    def _secure_post(
        self, identity: Identity, plan: RoundPlan, stage: str, body: bytes
    ) -> Generator[Effect, Any, httpx.Response]:
        response: httpx.Response = yield self._request(
            SECAGG_POST,
            identity,
            content=body,
            round_id=plan.round_id,
            stage=stage,
            headers={"Content-Type": "application/msgpack"},
        )
        raise_for_error(response)
        return response

    def _secure_vector(self, plan: RoundPlan, body: bytes, client: Any) -> np.ndarray:
        """The update as ring elements, flat in name order, for ``client``'s aggregation.

        Fixed point (``params.rotation`` None): num_examples x delta, then num_examples,
        so the secure sum divided by its last element is FedAvg's mean. On a rotated
        grid (compressed, or distributed DP): weight x delta, then the weight, with this
        device's share of the noise when the plan asks for distributed DP."""
        params = client.params
        tensors, metadata = decode_tensors(body)
        flat = np.concatenate([tensors[n].ravel() for n in sorted(tensors)])
        # The rounding hides nothing (the masks do): its generator need not be secret.
        rng = np.random.default_rng(None if self.seed is None else [self.seed, plan.round_id, 11])
        rotation = params.rotation
        if plan.privacy.distributed_dp and rotation is None:
            raise _secagg().ProtocolViolation("distributed DP needs the aggregation's grid")
        if rotation is None:
            # Without the count (a DP release keeps it on the device) every update weighs 1.
            examples = float(metadata.get("num_examples", "1"))
            weighted = np.append(flat.astype(np.float64) * examples, examples)
            fixed: np.ndarray = _secagg().quantize(weighted, params.quantization, rng)
            return fixed
        noise = None
        if plan.privacy.distributed_dp:
            noise = self._distributed_noise(plan, client)
        # A few bits cannot carry a count exactly: capped weights (McMahan et al. 2018).
        # With DP every update weighs 1: a weight would put the count, unnoised, in the sum.
        count = metadata.get("num_examples")
        weight = 1.0
        if count is not None and plan.privacy.dp_epsilon is None:
            weight = min(1.0, int(count) / plan.privacy.weight_cap)
        ring: np.ndarray = rotation.encode(flat * weight, weight, rng, noise)
        return ring

    def _distributed_sigma(self, plan: RoundPlan, client: Any) -> float:
        """This device's share of the sum's noise (distributed DP, `fedclient.privacy.
        distributed`), in grid steps: enough that the devices of the aggregation's floor
        beyond the colluders it assumes (who may add none) give the sum the noise
        multiplier the device charged its ledger for. The floor is what every honest
        device enforces before it unmasks (`SecAggClient`), never the plan's word alone.
        Raises `ProtocolViolation` if the aggregation's ring cannot hold that noise (the
        sum would wrap: silently wrong)."""
        privacy = self.policy.check(plan)
        if privacy is None:
            raise _secagg().ProtocolViolation("distributed DP without a DP release to charge")
        mechanism, params = privacy.mechanism, client.params
        rotation = params.rotation
        sensitivity = rotation.sensitivity() * (2.0 if mechanism.neighbouring == "replace" else 1.0)
        shares = honest_shares(params.min_contributors, client.colluders)
        sigma = device_sigma(mechanism.noise_multiplier, sensitivity, shares, rotation.padded)
        if not ring_holds_noise(
            rotation.modulus_bits, rotation.levels, len(params.participants), sigma
        ):
            raise _secagg().ProtocolViolation(
                f"the aggregation's ring is too narrow for this device's noise (sigma {sigma:.3g} "
                f"grid steps for {shares} honest shares): the sum would wrap"
            )
        return sigma

    def _distributed_noise(self, plan: RoundPlan, client: Any) -> np.ndarray:
        """This device's share of the sum's noise (`_distributed_sigma`), from its CSPRNG."""
        rotation = client.params.rotation
        sigma = self._distributed_sigma(plan, client)
        noise: np.ndarray = discrete_gaussian(sigma, rotation.padded, self._noise_source(plan))
        return noise

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

    # -- helpers ---------------------------------------------------------------
    def _training_data(self) -> tuple[np.ndarray, np.ndarray]:
        """The examples to train on now: the arrays given, or a snapshot of the store."""
        if self._arrays is not None:
            return self._arrays
        assert isinstance(self.data, ExampleStore)
        x, y = self.data.arrays()
        if len(y) == 0:
            raise InvalidInput("the example store is empty: nothing to train on")
        return x, y

    def _example_count(self) -> int:
        return len(self._arrays[1]) if self._arrays is not None else len(self.data)

    def _seconds_needed(self, plan: RoundPlan) -> float | None:
        """Seconds this device expects to need to train and upload, if it can tell."""
        work = plan.train.work(self._example_count())
        if self.estimate_seconds is not None:
            return self.estimate_seconds(work)
        speed = self._store.speed()  # examples per second, learned from past rounds
        return None if speed is None else work / speed

    def _noise_source(self, plan: RoundPlan) -> NoiseSource:
        """Where this round's privacy noise comes from: the OS-keyed CSPRNG, unless a
        simulation asked for noise drawn from ``seed`` (which warns: it is not private)."""
        if self.simulation_seeded_noise:
            if self.seed is None:
                raise InvalidInput("simulation_seeded_noise needs a seed")
            return NoiseSource.seeded_for_simulation(self.seed, plan.round_id)
        return NoiseSource()

    def _discard(self, plan: RoundPlan, reason: str) -> StepOutcome:
        self._store.discard_round(self.job)
        self.stats.discarded_rounds += 1
        logger.info("discarded work for round %s of %r: %s", plan.round_id, self.job, reason)
        return StepOutcome("discarded", round_id=plan.round_id, reason=reason)

    def _held_weights(self, plan: RoundPlan) -> Weights:
        """The stored model for this round, decoded (handed over by the download that
        just stored it, when that was this process)."""
        downloaded, self._downloaded = self._downloaded, None
        held = self._store.held_version(self.job)
        assert held is not None and held[0] == plan.model_version
        if downloaded is not None and downloaded[:2] == held:
            return downloaded[2]
        stored = self._store.held_model(self.job)
        assert stored is not None
        return decode_tensors(stored[2])[0]

    def _backend(self, plan: RoundPlan) -> TrainingBackend:
        if self.model is None:
            self.model = create_backend(plan.model, self.runtime)
        return self.model

    def _check_model(self, weights: Weights, plan: RoundPlan) -> None:
        backend = self._backend(plan)
        digest = getattr(backend, "digest", "")
        if plan.model.digest and digest and digest != plan.model.digest:
            raise ModelMismatch(
                f"the job's model is bundle {plan.model.digest[:12]}; this device holds "
                f"bundle {digest[:12]}"
            )
        local = backend.get_weights()
        if {k: (v.shape, v.dtype) for k, v in weights.items()} != {
            k: (v.shape, v.dtype) for k, v in local.items()
        }:  # the common case compares without formatting anything
            theirs = {k: (tuple(v.shape), str(v.dtype)) for k, v in weights.items()}
            ours = {k: (tuple(v.shape), str(v.dtype)) for k, v in local.items()}
            differ = sorted(k for k in theirs.keys() | ours.keys() if theirs.get(k) != ours.get(k))
            detail = "; ".join(
                f"{k}: job {_describe(theirs.get(k))}, local {_describe(ours.get(k))}"
                for k in differ[:5]
            )
            raise ModelMismatch(
                f"the job's model does not match the local model ({len(differ)} tensors "
                f"differ): {detail}"
            )

    def _request(
        self,
        route: Route,
        identity: Identity | None,
        *,
        json: Any = None,
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
        **params: object,
    ) -> httpx.Request:
        all_headers = dict(headers or {})
        if identity is not None:
            all_headers["Authorization"] = f"Bearer {identity.token}"
        if json is not None:
            content = msgspec.json.encode(json)
            all_headers["Content-Type"] = "application/json"
        return httpx.Request(
            route.method,
            _url(self.server + route.url(**params)),
            headers=all_headers,
            content=content,
            extensions={"timeout": httpx.Timeout(self.timeout).as_dict()},
        )


@functools.lru_cache(maxsize=4096)
def _url(text: str) -> httpx.URL:
    """A parsed URL (immutable; parsing is the dearest part of building a request, and
    a fleet of simulated devices asks for the same few URLs)."""
    return httpx.URL(text)


class _Direct:
    """Sends on the transport the app gave, without an `httpx.Client` around it.

    The client would add cookies, redirects and auth flows, none of which the
    protocol uses (and, given a transport, it reads no proxy settings either), at
    a third of the time of a simulated round. Without a transport, the device
    sends through an `httpx.Client`, which reads the environment's proxy settings.
    """

    def __init__(self, transport: httpx.BaseTransport) -> None:
        self.transport = transport

    def send(self, request: httpx.Request, *, stream: bool = False) -> httpx.Response:
        response = self.transport.handle_request(request)
        response.request = request
        if not stream:
            try:
                response.read()
            finally:
                response.close()
        return response

    def close(self) -> None:
        self.transport.close()


class _AsyncDirect:
    """The async twin of `_Direct`."""

    def __init__(self, transport: httpx.AsyncBaseTransport) -> None:
        self.transport = transport

    async def send(self, request: httpx.Request, *, stream: bool = False) -> httpx.Response:
        response = await self.transport.handle_async_request(request)
        response.request = request
        if not stream:
            try:
                await response.aread()
            finally:
                await response.aclose()
        return response

    async def aclose(self) -> None:
        await self.transport.aclose()


class _DownloadSink:
    """Where a streamed model download goes: into the device state, block by block, so
    the bytes that arrived before a break are kept and the retry asks for the rest.

    A body that arrives whole within one block never touches the state: the caller
    stores the model itself, in the step's own transaction."""

    def __init__(
        self,
        client: Client,
        download: ResumableDownload,
        request: httpx.Request,
        response: httpx.Response,
    ) -> None:
        self.store = client.device_state
        self.stats = client.stats
        self.download = download
        self.request = request
        self.response = response
        self.body_kept = response.status_code in (200, 206)
        self.pending = bytearray()
        self.stats.requests += 1
        self.stats.bytes_up += _wire_size(request.headers, 0)
        self.stats.bytes_down += _wire_size(response.headers, 0)
        if response.status_code == 200:  # a whole body: whatever is held is stale
            if self.store.has_download_parts(download.job):
                self.store.drop_download_parts(download.job)
            held_etag, self.offset = "", 0
        else:
            held_etag, self.offset = self.store.partial_download(download.job, download.version)
        self.etag = response.headers.get("ETag", held_etag)
        self.stored = self.offset > 0  # parts of this body are in the state

    def take(self, chunk: bytes) -> None:
        """Receive a chunk of the body."""
        self.stats.bytes_down += len(chunk)
        self.pending.extend(chunk)
        if self.body_kept and len(self.pending) >= DOWNLOAD_BLOCK:
            self.flush()

    def flush(self) -> None:
        """Store the bytes received since the last flush."""
        if self.body_kept and self.pending:
            self.store.keep_download_part(
                self.download.job,
                self.download.version,
                self.etag,
                self.offset,
                bytes(self.pending),
            )
            self.offset += len(self.pending)
            self.pending.clear()
            self.stored = True

    def finish(self) -> httpx.Response:
        """The complete response, its body assembled from every stored part."""
        if self.response.status_code == 416:
            # Asked for bytes after the end: either every byte had arrived before a crash
            # (use them), or what is held is not this body (drop it; the next try starts over).
            total = self.response.headers.get("Content-Range", "").rpartition("/")[2]
            if total.isdigit() and int(total) == self.offset:
                body = self.store.drop_download_parts(self.download.job)
                return httpx.Response(
                    200, headers={"ETag": self.etag}, content=body, request=self.request
                )
            self.store.drop_download_parts(self.download.job)
        if not self.body_kept:  # an error or a 304: hand it back as it came
            return httpx.Response(
                self.response.status_code,
                headers=self.response.headers,
                content=bytes(self.pending),
                request=self.request,
            )
        if self.stored:  # a big or resumed body: the rest joins the parts it follows
            self.flush()
            body = self.store.drop_download_parts(self.download.job)
        else:
            body = bytes(self.pending)
        return httpx.Response(
            200, headers=self.response.headers, content=body, request=self.request
        )


def _secagg() -> ModuleType:
    """`fedclient.privacy.secagg`, imported when a job first asks for it: it brings in
    `cryptography`, which an app that never aggregates securely need not load."""
    from fedclient.privacy import secagg

    return secagg


def _decode(response: httpx.Response, type_: type[T]) -> T:
    """Decode a JSON (or msgpack) answer, or raise the typed error an error answer
    stands for."""
    raise_for_error(response)
    try:
        if response.headers.get("content-type", "").startswith(MSGPACK_MEDIA_TYPE):
            return msgspec.msgpack.decode(response.content, type=type_)
        return msgspec.json.decode(response.content, type=type_)
    except msgspec.DecodeError as exc:
        raise FedError(f"unexpected answer from the server: {exc}") from exc


def _pause(outcome: StepOutcome) -> float:
    """Seconds `Client.run_forever` waits after ``outcome``."""
    if outcome.retry_after is not None:
        return max(0.0, outcome.retry_after)
    return 1.0 if outcome.status == "uploaded" else CONDITIONS_RETRY


def _describe(tensor: tuple[tuple[int, ...], str] | None) -> str:
    return "missing" if tensor is None else f"{tensor[1]}{list(tensor[0])}"


def _wire_size(headers: httpx.Headers, body_length: int) -> int:
    return sum(len(k) + len(v) + 4 for k, v in headers.raw) + body_length
