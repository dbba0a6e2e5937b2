"""The app runtime: a device that takes part for as long as its app runs.

`fedclient.Client.run_forever` (on a thread) and `arun_forever` (on an event
loop) repeat `run_once` and decide, after each round or failure, whether to
wait and how long, or to stop. The decision is written once (`RunLoop`); the
two drivers only sleep. What passes is waited out, what cannot pass ends the
loop with a typed reason, and the app hears of each through ``on_round``:

    what happened                                   the loop
    uploaded, or a round left or closed             reports it; checks in again after 1 s
    the server's "retry after N s", conditions      reports it; waits as told
    unmet, no examples yet
    network error, 5xx, 429, 408                    backs off: Retry-After, else an
    (after the request's own retries)               exponential wait with seeded jitter,
                                                    capped (`Backoff`)
    a round refused (403, 404, 409, 410, 400, 413)  drops the round, backs off
    a store's examples do not fit the job           backs off (the app may fix them)
    job finished                                    holds the final model; "finished"
    401 once enrolled                               "revoked"
    enrolment refused (401, 403 while enrolling)    "enrolment_refused"
    privacy policy refusal, budget spent            "privacy"
    arrays that do not fit the job                  "invalid_input"
    model mismatch, unusable state, unknown job     "model_mismatch", "state", "job_not_found"
    ``stop`` set, or ``rounds`` uploads made        "stopped", "rounds"

Nothing here sleeps on its own clock or draws from global randomness: waits go
through the ``stop`` event (so an app shutting down is never held), and the
jitter comes from the `Backoff`'s seeded generator.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, cast

from fedclient._examples import ExampleStore
from fedclient._exceptions import (
    ApiError,
    FedError,
    Forbidden,
    InvalidInput,
    ModelMismatch,
    NotFound,
    PrivacyBudgetExceeded,
    PrivacyPolicyViolation,
    StateError,
    Unauthorized,
)
from fedclient._state import Phase

if TYPE_CHECKING:
    from fedclient._client import Client
    from fedclient._effects import StepOutcome

__all__ = ["Backoff", "RoundEvent", "RunLoop", "RunResult", "StopReason"]

logger = logging.getLogger("fedclient")

#: Seconds before the next check-in after a round the device finished or left.
NEXT_ROUND_SECONDS = 1.0

#: Seconds a device waits when the step did not say how long (the job loop says, for
#: unmet conditions and for a store with no examples yet: a minute).
UNSAID_WAIT = 60.0

#: Why `run_forever` stopped.
StopReason = Literal[
    "finished",
    "stopped",
    "rounds",
    "revoked",
    "enrolment_refused",
    "privacy",
    "invalid_input",
    "model_mismatch",
    "state",
    "job_not_found",
]

#: What a `RoundEvent` reports.
EventStatus = Literal["uploaded", "waiting", "discarded", "failed", "finished", "stopped"]


@dataclass(frozen=True)
class RoundEvent:
    """What the device just did, for the app's ``on_round`` callback.

    ``status``: "uploaded" (an update went into ``round_id``), "discarded" (it left
    the round, or the round closed without it), "waiting" (nothing to do now: the
    server's answer, unmet conditions, no examples), "failed" (an error that can pass:
    ``error``), "finished" (the job is over; the device holds its final model),
    "stopped" (the loop ends: ``reason`` says why, ``error`` what). ``reason`` says
    why it waited or left; ``wait_seconds`` is how long it waits now. ``train_loss``
    and ``examples`` come from the round's training (None when this process did not
    train it, or the privacy policy keeps them on the device); ``bytes_up`` and
    ``bytes_down`` are what this round (or wait) moved."""

    status: EventStatus
    round_id: int | None = None
    train_loss: float | None = None
    examples: int | None = None
    bytes_up: int = 0
    bytes_down: int = 0
    reason: str = ""
    wait_seconds: float | None = None
    model_version: int | None = None
    error: FedError | None = None


@dataclass(frozen=True)
class RunResult:
    """How `run_forever` ended: ``reason`` (`StopReason`), the rounds it uploaded to, the
    model version the device holds, and the error that ended it, if one did."""

    reason: StopReason
    rounds: int
    model_version: int | None = None
    error: FedError | None = None


@dataclass
class Backoff:
    """How long `run_forever` waits after its ``failures``-th failure in a row:
    uniform between half and all of ``min(cap_seconds, base_seconds * 2**(failures-1))``
    (never zero: a fleet must not come back at once), or the server's Retry-After if
    that is longer. ``seed`` makes the jitter reproducible; leave it None on real
    devices, so a fleet that lost its server together does not return together."""

    base_seconds: float = 1.0
    cap_seconds: float = 300.0
    seed: int | None = None
    _rng: random.Random = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if not (self.base_seconds > 0 and self.cap_seconds >= self.base_seconds):
            raise InvalidInput("a backoff needs base_seconds > 0 and cap_seconds >= base_seconds")
        self._rng = random.Random(self.seed)

    def delay(self, failures: int, retry_after: float | None = None) -> float:
        """Seconds to wait after ``failures`` failures in a row (counting from 1)."""
        ceiling = min(self.cap_seconds, self.base_seconds * 2.0 ** min(failures - 1, 60))
        wait = self._rng.uniform(ceiling / 2, ceiling)
        return max(wait, retry_after) if retry_after is not None else wait


#: Errors worth waiting out besides `FedError`s: another process holds the state's lock.
TRANSIENT = (FedError, sqlite3.OperationalError)


class RunLoop:
    """The decisions `run_forever` and `arun_forever` share (see the module docstring):
    after each `run_once` (or its failure), what to tell the app, and how long to wait
    or why to stop."""

    def __init__(
        self,
        client: Client,
        *,
        rounds: int | None,
        on_round: Callable[[RoundEvent], None] | None,
        backoff: Backoff | None,
    ) -> None:
        if rounds is not None and rounds < 1:
            raise InvalidInput(
                f"rounds must be at least 1 (or None: until the job ends), got {rounds}"
            )
        self.client = client
        self.rounds = rounds
        self.on_round = on_round
        self.backoff = backoff or Backoff(seed=client.seed)
        self.uploaded = 0
        self.failures = 0
        self._moved = (client.stats.bytes_up, client.stats.bytes_down)

    def before(self, stop_set: bool) -> RunResult | None:
        """Whether to stop before the next round."""
        if self.client.closed:
            return self.closed()
        if stop_set:
            return self._end("stopped", None, "the app stopped the loop")
        if self.rounds is not None and self.uploaded >= self.rounds:
            return self._end("rounds", None, f"{self.uploaded} rounds uploaded, as asked")
        return None

    def after(self, outcome: StepOutcome) -> float | RunResult:
        """After a `run_once` that returned: seconds to wait, or how the run ends."""
        self.failures = 0
        if outcome.status == "finished":
            event = self._event("finished", outcome, reason=outcome.reason)
            self._tell(event)
            return RunResult("finished", self.uploaded, self._held_version())
        self.uploaded += outcome.status == "uploaded"
        if outcome.retry_after is not None:
            wait = max(0.0, outcome.retry_after)
        elif outcome.status in ("uploaded", "discarded"):
            wait = NEXT_ROUND_SECONDS
        else:
            wait = UNSAID_WAIT
        if self.rounds is not None and self.uploaded >= self.rounds:
            wait = 0.0  # done: no reason to wait before saying so
        status = cast(EventStatus, outcome.status)  # run_once ends on no other status
        self._tell(self._event(status, outcome, reason=outcome.reason, wait=wait))
        return wait

    def failed(self, error: BaseException) -> float | RunResult:
        """After a `run_once` that raised ``error``: seconds to wait, or how the run ends.
        An error that is not the SDK's (a bug) is raised again."""
        if not isinstance(error, TRANSIENT):
            raise error
        fed = error if isinstance(error, FedError) else FedError(f"device state: {error}")
        verdict = self._verdict(fed)
        if verdict is not None:
            return self._end(verdict, fed, str(fed))
        in_round = self.client.device_state.phase(self.client.job) is not Phase.IDLE
        if in_round and isinstance(fed, ApiError) and fed.status in (400, 403, 404, 409, 410, 413):
            # The server will not take this round's work: drop it, never send it again.
            self.client.device_state.discard_round(self.client.job)
            self.client.stats.discarded_rounds += 1
        self.failures += 1
        retry_after = fed.retry_after if isinstance(fed, ApiError) else None
        wait = self.backoff.delay(self.failures, retry_after)
        logger.info("job %r: %s; trying again in %.1f s", self.client.job, fed, wait)
        up, down = self._bytes()
        self._tell(RoundEvent("failed", None, None, None, up, down, str(fed), wait, error=fed))
        return wait

    # -- helpers -----------------------------------------------------------------
    def _verdict(self, error: FedError) -> StopReason | None:
        """Why ``error`` ends the run, or None if it can pass."""
        client = self.client
        enrolled = client.device_state.identity(client.server) is not None
        idle = client.device_state.phase(client.job) is Phase.IDLE
        if isinstance(error, Unauthorized):
            return "revoked" if enrolled else "enrolment_refused"
        if isinstance(error, Forbidden) and not enrolled:
            return "enrolment_refused"
        if isinstance(error, PrivacyPolicyViolation | PrivacyBudgetExceeded):
            return "privacy"
        if isinstance(error, InvalidInput):
            # A store's examples can change (the app forgets or adds); arrays cannot.
            return None if isinstance(client.data, ExampleStore) else "invalid_input"
        if isinstance(error, ModelMismatch):
            return "model_mismatch"
        if isinstance(error, StateError):
            return "state"
        if isinstance(error, NotFound) and idle:
            return "job_not_found"
        return None

    def closed(self) -> RunResult:
        """The run ends because the app closed the client."""
        return self._end("stopped", None, "the app closed the client")

    def _end(self, reason: StopReason, error: FedError | None, why: str) -> RunResult:
        up, down = self._bytes()
        self._tell(
            RoundEvent("stopped", None, None, None, up, down, f"{reason}: {why}", error=error)
        )
        return RunResult(reason, self.uploaded, self._held_version(), error)

    def _held_version(self) -> int | None:
        held = self.client.device_state.held_version(self.client.job)
        return None if held is None else held[0]

    def _bytes(self) -> tuple[int, int]:
        """Bytes moved (up, down) since the last event."""
        stats = self.client.stats
        up, down = stats.bytes_up - self._moved[0], stats.bytes_down - self._moved[1]
        self._moved = (stats.bytes_up, stats.bytes_down)
        return up, down

    def _event(
        self, status: EventStatus, outcome: StepOutcome, *, reason: str, wait: float | None = None
    ) -> RoundEvent:
        up, down = self._bytes()
        return RoundEvent(
            status,
            outcome.round_id,
            outcome.train_loss,
            outcome.examples,
            up,
            down,
            reason=reason,
            wait_seconds=wait,
            model_version=outcome.model_version,
        )

    def _tell(self, event: RoundEvent) -> None:
        if self.on_round is not None:
            self.on_round(event)


def run_forever(
    client: Client,
    *,
    rounds: int | None = None,
    stop: threading.Event | None = None,
    on_round: Callable[[RoundEvent], None] | None = None,
    backoff: Backoff | None = None,
) -> RunResult:
    """`fedclient.Client.run_forever`."""
    loop = RunLoop(client, rounds=rounds, on_round=on_round, backoff=backoff)
    stop = stop or threading.Event()
    while True:
        ended = loop.before(stop.is_set())
        if ended is not None:
            return ended
        try:
            decision = loop.after(client.run_once())
        except Exception as exc:
            if client.closed:  # closed from another thread mid-request
                return loop.closed()
            decision = loop.failed(exc)
        if isinstance(decision, RunResult):
            return decision
        stop.wait(decision)


async def arun_forever(
    client: Client,
    *,
    rounds: int | None = None,
    stop: asyncio.Event | None = None,
    on_round: Callable[[RoundEvent], None] | None = None,
    backoff: Backoff | None = None,
) -> RunResult:
    """`fedclient.Client.arun_forever`."""
    loop = RunLoop(client, rounds=rounds, on_round=on_round, backoff=backoff)
    stop = stop or asyncio.Event()
    while True:
        ended = loop.before(stop.is_set())
        if ended is not None:
            return ended
        try:
            decision = loop.after(await client.arun_once())
        except Exception as exc:
            if client.closed:  # closed by another task mid-request
                return loop.closed()
            decision = loop.failed(exc)
        if isinstance(decision, RunResult):
            return decision
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), decision)


def with_training(outcome: StepOutcome, trained: StepOutcome | None) -> StepOutcome:
    """``outcome`` carrying the loss and example count of the round's training step."""
    if trained is None or outcome.round_id != trained.round_id or outcome.train_loss is not None:
        return outcome
    return dataclasses.replace(outcome, train_loss=trained.train_loss, examples=trained.examples)
