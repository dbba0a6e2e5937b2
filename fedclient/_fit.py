"""`fit`: one call that trains on the device, standalone or as part of a federated job."""

from __future__ import annotations

import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from fedclient._app import Backoff, RoundEvent, StopReason
from fedclient._client import Client
from fedclient._exceptions import FedError, InvalidInput
from fedclient._state import DeviceState
from fedclient.conditions import Conditions
from fedclient.privacy.policy import PrivacyPolicy
from fedclient.protocol import split_job_url
from fedclient.runtime import TrainingBackend, check_dataset
from fedclient.transport import RetryPolicy

__all__ = ["FitResult", "fit"]


@dataclass(frozen=True)
class FitResult:
    """What `fit` did.

    Standalone: one ``history`` entry per epoch (``epoch``, ``loss``: the mean training
    loss over the epoch, ``accuracy``: on the training data after it). Federated: one
    per round the device uploaded to (``round_id``, ``train_loss``, ``examples``,
    ``bytes_up``, ``bytes_down``: what the round moved), the ``model_version`` loaded
    into the model at the end, and why the run ended (``reason``: "rounds" or
    "finished")."""

    mode: str  # "standalone" | "federated"
    history: list[dict[str, float]] = field(default_factory=list)
    model_version: int | None = None
    reason: StopReason | None = None


def fit(
    model: TrainingBackend,
    data: tuple[np.ndarray, np.ndarray],
    *,
    epochs: int = 5,
    batch_size: int = 32,
    learning_rate: float = 0.1,
    seed: int | None = None,
    federated: str | None = None,
    state: str | Path | DeviceState | None = None,
    rounds: int | None = 1,
    transport: httpx.BaseTransport | None = None,
    patience_seconds: float = 3600.0,
    policy: PrivacyPolicy | None = None,
    verify: str | Path | bool | ssl.SSLContext = True,
    enrolment_credential: str | None = None,
    label: str = "",
    timeout: float = 30.0,
    retry: RetryPolicy | None = None,
    conditions: Conditions | None = None,
    eval_data: tuple[np.ndarray, np.ndarray] | None = None,
    on_round: Callable[[RoundEvent], None] | None = None,
    backoff: Backoff | None = None,
    **client_options: Any,
) -> FitResult:
    """Train ``model`` on ``data``; ``federated=URL`` joins that job instead.

    Standalone (``federated=None``) runs ``epochs`` of minibatch SGD here. With
    ``federated`` a job's URL (``https://host[:port]/v1/jobs/NAME`` or ``.../jobs/NAME``,
    `fedclient.protocol.split_job_url`) the device takes part in ``rounds`` rounds of
    the job (None: until the job ends; the server's plan sets epochs, batch size and
    learning rate), keeping its progress in ``state`` (a SQLite path), and ends with
    a global model loaded into ``model``: once the round of its last update has
    closed, the model that update went into; when the job ended, its final model. A
    round that failed instead (fewer than ``min_devices`` updates by its deadline) is
    a `FedError` saying so.

    It waits out what can pass (network errors, 5xx, 429, a round it lost) as
    `Client.run_forever` does, and raises what cannot (`Unauthorized` for a revoked
    device, `PrivacyPolicyViolation`, ...). ``patience_seconds`` bounds the time from
    one upload to the next (to be admitted, for the secure stages, for the close):
    past it, a `FedError`. The other arguments are `Client`'s: ``enrolment_credential``
    for a server that enrols only with one, ``policy`` (default `PrivacyPolicy()`),
    ``verify`` (TLS), ``transport``, ``timeout``, ``retry``, ``conditions``,
    ``eval_data``, ``label``, and any other (``inline_model_max``, ``runtime``,
    ``trainers``, ...) in ``client_options``; ``on_round`` and ``backoff`` are
    `run_forever`'s.
    """
    # A misspelt argument is refused as Python refuses one, in both modes.
    unknown = sorted(set(client_options) - _CLIENT_OPTIONS)
    if unknown:
        raise TypeError(f"fit() got an unexpected keyword argument {unknown[0]!r}")
    x, y = check_dataset(data[0], data[1], inputs=model.inputs, classes=model.classes)
    if federated is None:
        rng = np.random.default_rng(seed)
        history = []
        for epoch in range(1, epochs + 1):
            result = model.train(
                x, y, epochs=1, batch_size=batch_size, learning_rate=learning_rate, rng=rng
            )
            accuracy = model.evaluate(x, y).accuracy
            history.append({"epoch": float(epoch), "loss": result.loss, "accuracy": accuracy})
        return FitResult("standalone", history)

    server, job = split_job_url(federated)
    if job is None:
        raise InvalidInput(
            f"federated takes a job's URL, https://host[:port]/v1/jobs/NAME or "
            f".../jobs/NAME; got {federated!r}"
        )
    client = Client(
        server,
        job,
        (x, y),
        state=state if state is not None else DeviceState.in_memory(),
        model=model,
        transport=transport,
        seed=seed,
        timeout=timeout,
        label=label,
        retry=retry or RetryPolicy(),
        policy=policy or PrivacyPolicy(),
        eval_data=eval_data,
        verify=verify,
        enrolment_credential=enrolment_credential,
        conditions=conditions,
        **client_options,
    )
    try:
        return _federate(client, model, rounds, patience_seconds, on_round, backoff)
    finally:
        client.close()


#: `Client` arguments `fit` passes on as they come (it sets the others itself).
_CLIENT_OPTIONS = frozenset(f.name for f in fields(Client) if f.init) - {
    "server",
    "job",
    "data",
    "state",
    "model",
}


def _federate(
    client: Client,
    model: TrainingBackend,
    rounds: int | None,
    patience: float,
    on_round: Callable[[RoundEvent], None] | None,
    backoff: Backoff | None,
) -> FitResult:
    history: list[dict[str, float]] = []
    progress = [time.monotonic()]  # when the device last uploaded (or started)
    impatient = _Impatience(patience)

    def record(event: RoundEvent) -> None:
        if event.status == "uploaded":
            progress[0] = time.monotonic()
            history.append(
                {
                    "round_id": float(event.round_id or 0),
                    "train_loss": float("nan") if event.train_loss is None else event.train_loss,
                    "examples": float(event.examples or 0),
                    "bytes_up": float(event.bytes_up),
                    "bytes_down": float(event.bytes_down),
                }
            )
        elif event.wait_seconds is not None:
            impatient.check(time.monotonic() - progress[0] + event.wait_seconds)
        if on_round is not None:
            on_round(event)

    run = client.run_forever(rounds=rounds, stop=impatient.stop, on_round=record, backoff=backoff)
    if run.reason == "stopped":
        raise FedError(f"no progress in job {client.job!r} within {patience} s")
    if run.reason not in ("rounds", "finished"):
        assert run.error is not None  # every other ending is an error's
        raise run.error
    if run.reason == "rounds" and history:
        _await_close(client, int(history[-1]["round_id"]), patience)
        client.refresh_model()  # the model the last update went into (or a later one)
    model.set_weights(client.latest_model().get_weights())
    held = client.device_state.held_version(client.job)
    return FitResult("federated", history, held[0] if held else None, run.reason)


class _Impatience:
    """Stops the run once the next wait would take it past ``patience`` seconds since
    the last upload (so it never sleeps past it first)."""

    def __init__(self, patience: float) -> None:
        self.patience = patience
        self.stop = threading.Event()

    def check(self, seconds: float) -> None:
        if seconds > self.patience:
            self.stop.set()


def _await_close(client: Client, round_id: int, patience: float) -> None:
    """Wait until round ``round_id`` (the last one this device uploaded to) has closed, so
    the model loaded next is the one its update went into; a `FedError` if the round
    failed instead (too few updates by its deadline): no model holds the update."""
    waited = 0.0
    while True:
        status = client.job_status()
        current = status.current_round
        if current is None or current.round_id != round_id:
            ended = status.previous_round
            if ended is not None and ended.round_id == round_id and ended.status == "failed":
                raise FedError(
                    f"round {ended.number} of job {client.job!r} failed ({ended.reason}): no "
                    f"model holds this device's update; the job's is still version "
                    f"{status.model_version}"
                )
            return
        pause = min(1.0, max(0.1, current.deadline - current.opened_at), patience - waited)
        if pause <= 0:
            raise FedError(f"round {round_id} of job {client.job!r} did not close in {patience} s")
        client.sleep(pause)
        waited += pause
