"""The SDK inside real apps, against a real `fedserver` process that enrols devices only
with the app's secret and serves status only to its devices (issue 25)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import fedclient
from fedclient.protocol import MODEL, decode_tensors
from tests.integration.test_fedserver_process import FedServerProcess

SECRET = "app-enrolment-secret-" + "e" * 24


def secret_server(tmp_path: Path, **options: Any) -> FedServerProcess:
    """A fedserver process that enrols only devices presenting ``SECRET``."""
    secret = tmp_path / "enrolment.secret"
    secret.write_text(SECRET)
    return FedServerProcess(tmp_path, args=("--enrolment-secret-file", str(secret)), **options)


def served_model(server: FedServerProcess, token: str, version: int) -> dict[str, np.ndarray]:
    """Model ``version`` as the server serves it to a device."""
    answer = httpx.get(
        server.url + MODEL.url(job="digits", version=version),
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )
    answer.raise_for_status()
    return decode_tensors(answer.content)[0]


def test_fit_against_a_server_with_an_enrolment_secret_returns_the_final_aggregate(
    tmp_path: Path, digits: Any
) -> None:
    server = secret_server(tmp_path, rounds=3, per_round=1)
    server.start()
    try:
        data = (digits.x_train[:300], digits.y_train[:300])
        url = f"{server.url}/v1/jobs/digits"  # the URL the status route has
        with pytest.raises(fedclient.Forbidden, match="credential"):
            fedclient.fit(fedclient.models.mlp(64, 32, 10), data, federated=url, rounds=None)

        model = fedclient.models.mlp(64, 32, 10)
        state = tmp_path / "fl.sqlite"
        result = fedclient.fit(
            model, data, federated=url, rounds=None, state=state, enrolment_credential=SECRET
        )
        assert (result.mode, result.reason, result.model_version) == ("federated", "finished", 3)
        assert [h["round_id"] for h in result.history] == [1, 2, 3]
        assert all(h["examples"] == 300 and h["train_loss"] > 0 for h in result.history)
        assert all(h["bytes_up"] > 0 and h["bytes_down"] > 0 for h in result.history)
        assert server.status()["status"] == "finished"
        identity = fedclient.DeviceState(state).identity(server.url)
        assert identity is not None
        final = served_model(server, identity.token, 3)
        for name, value in model.get_weights().items():
            np.testing.assert_array_equal(value, final[name])  # the final aggregate itself
    finally:
        server.stop()
