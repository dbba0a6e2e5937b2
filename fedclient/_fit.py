"""`fit`: one call that trains on the device, standalone or as part of a federated job."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import msgspec
import numpy as np

from fedclient._client import Client, raise_for_error
from fedclient._exceptions import FedError, InvalidInput
from fedclient._state import DeviceState
from fedclient.privacy.policy import PrivacyPolicy
from fedclient.protocol import JOB_STATUS, MODEL, JobStatus, decode_tensors
from fedclient.runtime import TrainingBackend, check_dataset

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
) -> FitResult:
    """Train ``model`` on ``data``; ``federated=URL`` joins that job instead.

    Standalone (``federated=None``) runs ``epochs`` of minibatch SGD here. With
    ``federated="https://host/jobs/NAME"`` the device takes part in ``rounds``
    rounds of job NAME (the server's plan sets epochs, batch size and learning
    rate), keeping its progress in ``state`` (a SQLite path), and ends with the
    job's newest global model loaded into ``model``. ``policy`` is the device's
    `PrivacyPolicy` (default: `PrivacyPolicy()`): plans outside it are refused.
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
    )
    history = []
    waited = 0.0
    try:
        while len(history) < rounds:
            outcome = client.run_once()
            if outcome.status == "finished":
                break
            if outcome.status == "uploaded":
                history.append({"round_id": float(outcome.round_id or 0)})
            elif outcome.status == "waiting":
                pause = min(outcome.retry_after or 1.0, patience_seconds - waited)
                if pause <= 0:
                    raise FedError(
                        f"not admitted to a round of {job!r} within {patience_seconds} s"
                    )
                time.sleep(pause)
                waited += pause
        version = _load_latest(client, model)
    finally:
        client.close()
    return FitResult("federated", history, version)


def _split_job_url(url: str) -> tuple[str, str]:
    parts = urlsplit(url)
    segments = [s for s in parts.path.split("/") if s]
    if parts.scheme not in ("http", "https") or len(segments) < 2 or segments[-2] != "jobs":
        raise InvalidInput(f"federated must look like https://host[:port]/jobs/NAME, got {url!r}")
    base_path = "/".join(segments[:-2])
    server = f"{parts.scheme}://{parts.netloc}" + (f"/{base_path}" if base_path else "")
    return server, segments[-1]


def _load_latest(client: Client, model: TrainingBackend) -> int:
    """Load the job's newest global model into ``model``; return its version."""
    with httpx.Client(transport=client.transport, timeout=client.timeout) as http:  # type: ignore[arg-type]
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
