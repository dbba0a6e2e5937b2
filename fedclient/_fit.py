"""`fit`: one call that trains on the device, standalone or as part of a federated job."""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import msgspec
import numpy as np

from fedclient._client import Client
from fedclient._exceptions import FedError, InvalidInput
from fedclient._state import DeviceState
from fedclient.privacy.policy import PrivacyPolicy
from fedclient.protocol import JOB_STATUS, MODEL, JobStatus, decode_tensors
from fedclient.runtime import TrainingBackend, check_dataset
from fedclient.transport import raise_for_error, ssl_context

__all__ = ["FitResult", "fit"]


@dataclass(frozen=True)
class FitResult:
    """What `fit` did: per-epoch (standalone) or per-round (federated) history."""

    mode: str  # "standalone" | "federated"
    history: list[dict[str, float]] = field(default_factory=list)
    model_version: int | None = None


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
    rounds: int = 1,
    transport: httpx.BaseTransport | None = None,
    patience_seconds: float = 3600.0,
    policy: PrivacyPolicy | None = None,
    verify: str | Path | bool | ssl.SSLContext = True,
) -> FitResult:
    """Train ``model`` on ``data``; ``federated=URL`` joins that job instead.

    Standalone (``federated=None``) runs ``epochs`` of minibatch SGD here. With
    ``federated="https://host/jobs/NAME"`` the device takes part in ``rounds``
    rounds of job NAME (the server's plan sets epochs, batch size and learning
    rate), keeping its progress in ``state`` (a SQLite path), and ends with the
    job's newest global model loaded into ``model``: once the round of its last
    update has closed, so that update is in it. ``patience_seconds`` bounds the wait
    for each round (to be admitted, for the secure stages, for the close). ``policy``
    is the device's `PrivacyPolicy` (default: `PrivacyPolicy()`): plans outside it are
    refused. The URL may name the job as ``/jobs/NAME`` or ``/v1/jobs/NAME``.
    ``verify`` checks the server's TLS certificate (`Client`'s).
    """
    x, y = check_dataset(data[0], data[1], inputs=model.inputs, classes=model.classes)
    if federated is None:
        rng = np.random.default_rng(seed)
        history = []
        for epoch in range(1, epochs + 1):
            result = model.train(
                x, y, epochs=1, batch_size=batch_size, learning_rate=learning_rate, rng=rng
            )
            history.append({"epoch": float(epoch), "loss": result.loss})
        return FitResult("standalone", history)

    server, job = _split_job_url(federated)
    client = Client(
        server,
        job,
        (x, y),
        state=state if state is not None else DeviceState.in_memory(),
        model=model,
        transport=transport,
        seed=seed,
        policy=policy or PrivacyPolicy(),
        verify=verify,
    )
    history = []
    waited = 0.0  # since the last upload: patience is per round
    last_round: int | None = None
    try:
        while len(history) < rounds:
            outcome = client.run_once()
            if outcome.status == "finished":
                break
            if outcome.status == "uploaded":
                history.append({"round_id": float(outcome.round_id or 0)})
                last_round, waited = outcome.round_id, 0.0
            elif outcome.status == "waiting":
                waited = _pause(client, outcome.retry_after or 1.0, waited, patience_seconds)
        if last_round is not None:
            _await_close(client, last_round, patience_seconds)
        version = _load_latest(client, model)
    finally:
        client.close()
    return FitResult("federated", history, version)


def _http(client: Client) -> httpx.Client:
    """A connection like the client's own (its transport, or TLS as it verifies)."""
    if client.transport is not None:
        return httpx.Client(transport=client.transport, timeout=client.timeout)  # type: ignore[arg-type]
    return httpx.Client(verify=ssl_context(client.verify), timeout=client.timeout)


def _pause(client: Client, seconds: float, waited: float, patience: float) -> float:
    """Sleep ``seconds`` (no more than the patience left); the time waited after it."""
    pause = min(seconds, patience - waited)
    if pause <= 0:
        raise FedError(f"no progress in job {client.job!r} within {patience} s")
    client.sleep(pause)
    return waited + pause


def _await_close(client: Client, round_id: int, patience: float) -> None:
    """Wait until round ``round_id`` (the last one this device uploaded to) has closed, so
    the model loaded next is the one its update went into."""
    waited = 0.0
    with _http(client) as http:
        while True:
            response = http.get(client.server + JOB_STATUS.url(job=client.job))
            raise_for_error(response)
            status = msgspec.json.decode(response.content, type=JobStatus)
            current = status.current_round
            if current is None or current.round_id != round_id:
                return
            waited = _pause(
                client, min(5.0, max(0.5, current.deadline - current.opened_at)), waited, patience
            )


def _split_job_url(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    segments = [s for s in parts.path.split("/") if s]
    if parts.scheme not in ("http", "https") or len(segments) < 2 or segments[-2] != "jobs":
        raise InvalidInput(f"federated must look like https://host[:port]/jobs/NAME, got {url!r}")
    if segments[-3:-2] == ["v1"]:  # the API's own path (/v1/jobs/NAME) names the job too
        segments = segments[:-3] + segments[-2:]
    base_path = "/".join(segments[:-2])
    server = f"{parts.scheme}://{parts.netloc}" + (f"/{base_path}" if base_path else "")
    return server, segments[-1]


def _load_latest(client: Client, model: TrainingBackend) -> int:
    """Load the job's newest global model into ``model``; return its version."""
    with _http(client) as http:
        response = http.get(client.server + JOB_STATUS.url(job=client.job))
        raise_for_error(response)
        status = msgspec.json.decode(response.content, type=JobStatus)
        identity = client.device_state.identity(client.server)
        headers = {"Authorization": f"Bearer {identity.token}"} if identity else {}
        response = http.get(
            client.server + MODEL.url(job=client.job, version=status.model_version), headers=headers
        )
        raise_for_error(response)
    weights, _ = decode_tensors(response.content)
    model.set_weights(weights)
    return status.model_version
