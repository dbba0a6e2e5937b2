"""`Client`: a device taking part in one federated job, and what an app asks of it.

The parts live in their own modules, each with one job: the job loop without I/O,
as a state table of steps (`fedclient._flow`, with secure aggregation's stages in
`fedclient._secure_flow`); the drivers that perform its effects over httpx
(`fedclient._drivers`); the app runtime that keeps a device taking part while the
app runs (`fedclient._app`: ``run_forever``, its backoff and events); and
inference on the held model (`fedclient._inference`). `Client` puts them
together behind the methods an app calls.
"""

from __future__ import annotations

import asyncio
import ssl
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from fedclient._app import Backoff, RoundEvent, RunResult, arun_forever, run_forever, with_training
from fedclient._drivers import AsyncDirect, Direct, Drivers
from fedclient._effects import SecureSession, StepOutcome, TrainTask, TransferStats
from fedclient._examples import ExampleStore
from fedclient._exceptions import FedError, InvalidInput
from fedclient._flow import JobLoop
from fedclient._inference import HeldModels
from fedclient._personalize import Personalization
from fedclient._state import DeviceState
from fedclient.conditions import Conditions
from fedclient.privacy.policy import PrivacyPolicy
from fedclient.protocol import JobStatus, Weights, split_job_url
from fedclient.runtime import TrainingBackend, TrainResult
from fedclient.trainers import Trainer
from fedclient.transport import RetryPolicy

__all__ = ["Client", "StepOutcome", "TrainTask", "TransferStats"]


@dataclass
class Client(JobLoop, Drivers):
    """A device taking part in one federated job.

    ``server`` is the server's root URL (``https://host[:port]``) and ``job`` the job's
    name, or ``server`` is the job's URL (``https://host[:port]/v1/jobs/NAME``, or
    ``.../jobs/NAME``; `fedclient.protocol.split_job_url`) and ``job`` empty or the same
    name. ``transport`` is any httpx transport (e.g.
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
    before it checks in, before each step of a round, between minibatches while it
    trains and before it uploads; a device that stops qualifying mid-round leaves it
    (the server gives the place to another).
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
        root, named = split_job_url(self.server)
        if named is not None:  # the job's own URL, as the server's status route has it
            if self.job and self.job != named:
                raise InvalidInput(
                    f"the URL {self.server!r} names job {named!r}, but job is {self.job!r}"
                )
            self.job = named
        if not self.job:
            raise InvalidInput(
                "which job? give its name (Client(server, job, ...)) or its URL "
                "(https://host[:port]/v1/jobs/NAME) as the server"
            )
        self.server = root
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
        self._sync: httpx.Client | Direct | None = None
        self._async: httpx.AsyncClient | AsyncDirect | None = None
        self._closed = False
        #: The stop events of the `run_forever` (`arun_forever`) loops running now:
        #: `close` (`aclose`) sets them.
        self._loops: set[threading.Event] = set()
        self._aloops: set[asyncio.Event] = set()
        self._lifecycle = threading.Lock()
        self._secure: dict[int, SecureSession] = {}
        self._identity: Any = None  # fedclient.identity.SigningKey, loaded on first use
        self._identity_asked = False  # a secure job asked for the identity key
        self._data_fits: tuple[int, int] | None = None  # (inputs, classes) the arrays passed
        self._job_shape: tuple[int, int] | None = None  # the plan's, once admitted
        self._held_models = HeldModels(
            self._store,
            self.job,
            self.runtime,
            training_model=lambda: self.model,
            personalize=self.personalize,
            examples=self._examples_now,
            seed=self.seed,
        )
        # The model just downloaded and checked, (version, etag, weights), handed to the
        # training step that follows so it need not read and decode the stored copy.
        self._downloaded: tuple[int, str, Weights] | None = None

    def step(self) -> StepOutcome:
        """Do the next step of the job loop over a blocking connection (`FedError` once
        the client is closed)."""
        self._check_open()
        return self._drive(self._step_flow())

    async def astep(self) -> StepOutcome:
        """Do the next step of the job loop over an asyncio connection."""
        self._check_open()
        return await self._adrive(self._step_flow())

    def _check_open(self) -> None:
        if self._closed:
            raise FedError("the client is closed: make a new one to take part again")

    def run_once(self) -> StepOutcome:
        """Step until this round's work is uploaded, or there is nothing to do now. The
        outcome carries the round's training loss and example count when this call
        trained it."""
        trained = None
        while True:
            outcome = self.step()
            if outcome.status == "trained":
                trained = outcome
            if outcome.status in ("uploaded", "waiting", "finished", "discarded"):
                return with_training(outcome, trained)

    async def arun_once(self) -> StepOutcome:
        """Async twin of `run_once`."""
        trained = None
        while True:
            outcome = await self.astep()
            if outcome.status == "trained":
                trained = outcome
            if outcome.status in ("uploaded", "waiting", "finished", "discarded"):
                return with_training(outcome, trained)

    def run_forever(
        self,
        *,
        rounds: int | None = None,
        stop: threading.Event | None = None,
        on_round: Callable[[RoundEvent], None] | None = None,
        backoff: Backoff | None = None,
    ) -> RunResult:
        """Take part until the job finishes (or ``rounds`` uploads, or ``stop`` is set),
        waiting as the server and the `conditions` say, and waiting out what can pass
        (network errors, 5xx, 429, a round it had to leave) with ``backoff``. Stops on
        what cannot pass (revoked, privacy refusal, ...) and says why in the
        `RunResult`; ``on_round`` hears of every round, wait and failure
        (`RoundEvent`). For apps that just want it to run, on a thread of its own; the
        table is in `fedclient._app`. `close` from another thread ends it ("stopped")."""
        stop = stop or threading.Event()
        with self._lifecycle:
            self._loops.add(stop)
        try:
            return run_forever(self, rounds=rounds, stop=stop, on_round=on_round, backoff=backoff)
        finally:
            with self._lifecycle:
                self._loops.discard(stop)
                if self._closed and not self._loops:  # `close` left the pool to the loop
                    self._close_pool()

    async def arun_forever(
        self,
        *,
        rounds: int | None = None,
        stop: asyncio.Event | None = None,
        on_round: Callable[[RoundEvent], None] | None = None,
        backoff: Backoff | None = None,
    ) -> RunResult:
        """Async twin of `run_forever` (`aclose` ends it)."""
        stop = stop or asyncio.Event()
        self._aloops.add(stop)
        try:
            return await arun_forever(
                self, rounds=rounds, stop=stop, on_round=on_round, backoff=backoff
            )
        finally:
            self._aloops.discard(stop)

    def job_status(self) -> JobStatus:
        """The job's status, as the server reports it to this (enrolled) device."""
        return self._drive(self._status_flow())

    async def ajob_status(self) -> JobStatus:
        """Async twin of `job_status`."""
        return await self._adrive(self._status_flow())

    def refresh_model(self) -> int:
        """Hold the job's newest global model now (downloaded unless held already), so
        `predict` serves it; its version. Outside rounds: it trains nothing."""
        return self._drive(self._refresh_flow())

    async def arefresh_model(self) -> int:
        """Async twin of `refresh_model`."""
        return await self._adrive(self._refresh_flow())

    def latest_model(self, *, personalized: bool = False) -> TrainingBackend:
        """The newest global model the device holds, ready for inference through the
        device's runtime (no network call; any thread, while another trains).
        ``personalized``: fine-tuned on the device's own data first, as `personalize`
        says (cached until a newer model arrives or the example store forgets)."""
        return self._held_models.latest(personalized=personalized)

    def predict(self, x: np.ndarray, *, personalized: bool = False) -> np.ndarray:
        """Class probabilities of ``x`` under `latest_model`: shape (n, classes). ``x``
        has shape (n, features); another shape is an `InvalidInput` naming the one the
        model takes."""
        return self._held_models.predict(x, personalized=personalized)

    @property
    def closed(self) -> bool:
        """Whether `close` was called: the client sends nothing more."""
        return self._closed

    def close(self) -> None:
        """Close the blocking connection pool, from any thread. A `run_forever` running
        on another thread ends ("stopped": its ``stop`` event is set) instead of failing
        on closed connections: the pool closes once its request in flight is done."""
        with self._lifecycle:
            self._closed = True
            for stop in self._loops:
                stop.set()
            if not self._loops:  # else the last loop closes it once its request is done
                self._close_pool()

    def _close_pool(self) -> None:
        if self._sync is not None:
            self._sync.close()

    async def aclose(self) -> None:
        """Close the asyncio connection pool. An `arun_forever` running in another task
        ends ("stopped") instead of failing on the closed connections."""
        self._closed = True
        for stop in list(self._aloops):
            stop.set()
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
