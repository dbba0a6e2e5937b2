"""What the device's job loop yields and returns, and the state it works on.

The loop (`fedclient._flow`) is a generator of *effects*: an `httpx.Request` to
send, a `ResumableDownload` to fetch into the device state, or a `TrainTask` to run.
The drivers (`fedclient._drivers`) perform them and send back the results;
`StepOutcome` is what each step returns. `FlowBase` declares the attributes a
`fedclient.Client` holds for its parts (the loop, secure aggregation, the drivers),
and builds the requests they all send.
"""

from __future__ import annotations

import functools
import inspect
import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Generator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, TypeVar

import httpx
import msgspec
import numpy as np

from fedclient._examples import ExampleStore
from fedclient._exceptions import FedError, InvalidInput
from fedclient._personalize import Personalization
from fedclient._state import DeviceState, Identity
from fedclient.conditions import Conditions
from fedclient.privacy.noise import NoiseSource
from fedclient.privacy.policy import PrivacyPolicy
from fedclient.protocol import (
    MSGPACK_MEDIA_TYPE,
    RoundPlan,
    Route,
    TrainSettings,
    UploadReceipt,
    Weights,
)
from fedclient.runtime import TrainingBackend, TrainResult, check_dataset, check_train_options
from fedclient.trainers import TrainContext, Trainer
from fedclient.transport import RetryPolicy, raise_for_error

__all__ = [
    "Effect",
    "Flow",
    "FlowBase",
    "ResumableDownload",
    "SecureSession",
    "StepOutcome",
    "StepStatus",
    "TrainTask",
    "TransferStats",
    "decode_answer",
    "secagg_module",
]

T = TypeVar("T")
logger = logging.getLogger("fedclient")

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
    examples: int | None = None  # trained on (None: another process trained the round)
    #: The model version the step left the device holding, where it changed or matters
    #: (a finished job's final model).
    model_version: int | None = None


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
    #: Called before each minibatch; what it raises ends training (`fedclient.Conditions`).
    interrupt: Callable[[], None] | None = None
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
        extra: dict[str, Any] = dict(self.options)
        if self.proximal_mu:
            extra["proximal_mu"] = self.proximal_mu
        check_train_options(self.backend, extra)
        if self.interrupt is not None and _takes(self.backend.train, "interrupt"):
            extra["interrupt"] = self.interrupt  # (a backend without it: checked after)
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
class SecureSession:
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


class FlowBase:
    """What a `fedclient.Client` holds that its parts share (the job loop, secure
    aggregation and the drivers are mixins of it), and the requests they build."""

    server: str
    job: str
    data: tuple[np.ndarray, np.ndarray] | ExampleStore
    model: TrainingBackend | None
    transport: httpx.BaseTransport | httpx.AsyncBaseTransport | None
    runtime: str
    seed: int | None
    timeout: float
    label: str
    clock: Callable[[], float]
    retry: RetryPolicy
    sleep: Callable[[float], None]
    asleep: Callable[[float], Awaitable[None]]
    chunk_threshold: int
    inline_model_max: int
    chunk_bytes: int
    estimate_seconds: Callable[[int], float] | None
    stats: TransferStats
    atrain: Callable[[TrainTask], Awaitable[tuple[Weights, TrainResult, float]]] | None
    simulation_seeded_noise: bool
    policy: PrivacyPolicy
    eval_data: tuple[np.ndarray, np.ndarray] | None
    verify: str | Path | bool | ssl.SSLContext
    enrolment_credential: str | None
    conditions: Conditions | None
    personalize: Personalization | None
    trainers: Mapping[str, Trainer] | None
    _store: DeviceState
    _arrays: tuple[np.ndarray, np.ndarray] | None
    _secure: dict[int, SecureSession]
    _identity: Any
    _identity_asked: bool
    _data_fits: tuple[int, int] | None
    _job_shape: tuple[int, int] | None
    _downloaded: tuple[int, str, Weights] | None

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

    def _discard(self, plan: RoundPlan, reason: str) -> StepOutcome:
        self._store.discard_round(self.job)
        self.stats.discarded_rounds += 1
        logger.info("discarded work for round %s of %r: %s", plan.round_id, self.job, reason)
        return StepOutcome("discarded", round_id=plan.round_id, reason=reason)

    def _noise_source(self, plan: RoundPlan) -> NoiseSource:
        """Where this round's privacy noise comes from: the OS-keyed CSPRNG, unless a
        simulation asked for noise drawn from ``seed`` (which warns: it is not private)."""
        if self.simulation_seeded_noise:
            if self.seed is None:
                raise InvalidInput("simulation_seeded_noise needs a seed")
            return NoiseSource.seeded_for_simulation(self.seed, plan.round_id)
        return NoiseSource()

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


def secagg_module() -> ModuleType:
    """`fedclient.privacy.secagg`, imported when a job first asks for it: it brings in
    `cryptography`, which an app that never aggregates securely need not load."""
    from fedclient.privacy import secagg

    return secagg


def decode_answer(response: httpx.Response, type_: type[T]) -> T:
    """Decode a JSON (or msgpack) answer, or raise the typed error an error answer
    stands for."""
    raise_for_error(response)
    try:
        if response.headers.get("content-type", "").startswith(MSGPACK_MEDIA_TYPE):
            return msgspec.msgpack.decode(response.content, type=type_)
        return msgspec.json.decode(response.content, type=type_)
    except msgspec.DecodeError as exc:
        raise FedError(f"unexpected answer from the server: {exc}") from exc


@functools.lru_cache(maxsize=64)
def _takes_parameter(function: Callable[..., Any], name: str) -> bool:
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    return name in parameters or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()
    )


def _takes(method: Callable[..., Any], name: str) -> bool:
    """Whether ``method`` accepts the keyword ``name`` (asked once per function)."""
    return _takes_parameter(getattr(method, "__func__", method), name)
