"""The operator's levers: enrolment policy, the admin API and its CLI, job status access."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

import fedclient
from fedclient.server.admin import main as admin_cli
from fedclient.server.auth import EnrolmentPolicy
from tests.conftest import LiveServer, Server

pytestmark = pytest.mark.anyio

ADMIN = "a" * 40
SECRET = "the-app-enrolment-secret"


async def test_enrolment_needs_the_app_secret(make_server: Any) -> None:
    server: Server = make_server(service_options={"enrolment": EnrolmentPolicy.secret(SECRET)})
    before = server.store.fingerprint()
    async with server.http() as http:
        bare = await http.post("/v1/devices", json={})
        wrong = await http.post("/v1/devices", json={"credential": "not-the-secret"})
        assert bare.status_code == wrong.status_code == 403
        assert server.store.fingerprint() == before  # refused: nothing created
        good = await http.post("/v1/devices", json={"credential": SECRET})
        assert good.status_code == 200


async def test_a_client_enrols_with_its_credential(make_server: Any, make_devices: Any) -> None:
    server: Server = make_server(service_options={"enrolment": EnrolmentPolicy.secret(SECRET)})
    (stranger,) = make_devices(1, server.transport())
    with pytest.raises(fedclient.Forbidden):
        await stranger.astep()
    (device,) = make_devices(1, server.transport(), enrolment_credential=SECRET)
    assert (await device.arun_once()).status == "uploaded"


async def test_single_use_codes_and_a_verifier(make_server: Any) -> None:
    server: Server = make_server(service_options={"enrolment": EnrolmentPolicy.codes()})
    (code,) = server.service.operator.issue_codes(1)
    async with server.http() as http:
        assert (await http.post("/v1/devices", json={"credential": code})).status_code == 200
        spent = await http.post("/v1/devices", json={"credential": code})
        assert spent.status_code == 403  # one device per code
    seen: list[str] = []
    checked: Server = make_server(
        service_options={
            "enrolment": EnrolmentPolicy.verifier(lambda token: seen.append(token) or token == "ok")
        }
    )
    async with checked.http() as http:
        assert (await http.post("/v1/devices", json={"credential": "bad"})).status_code == 403
        assert (await http.post("/v1/devices", json={"credential": "ok"})).status_code == 200
    assert seen == ["bad", "ok"]


async def test_job_status_needs_a_token_unless_public(make_server: Any) -> None:
    server: Server = make_server(service_options={"admin_token": ADMIN, "public_status": False})
    async with server.http() as http:
        assert (await http.get("/v1/jobs/digits")).status_code == 401
        assert (await http.get("/v1/jobs/digits/rounds/1")).status_code == 401
        admin = {"Authorization": f"Bearer {ADMIN}"}
        assert (await http.get("/v1/jobs/digits", headers=admin)).status_code == 200
        device = {
            "Authorization": "Bearer " + (await http.post("/v1/devices", json={})).json()["token"]
        }
        assert (await http.get("/v1/jobs/digits", headers=device)).status_code == 200
        assert (await http.post("/v1/admin/jobs/digits/pause", headers=device)).status_code == 401


def test_the_admin_cli_pauses_resumes_and_revokes(
    live_server: Any, digits: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    live: LiveServer = live_server(
        service_options={"admin_token": ADMIN}, devices_per_round=1, rounds=4
    )
    token_file = tmp_path / "admin.token"
    token_file.write_text(ADMIN + "\n")

    def admin(*args: str) -> Any:
        code = admin_cli(["--url", live.url, "--token-file", str(token_file), *args])
        out = capsys.readouterr()
        assert code == 0, out.err
        return __import__("json").loads(out.out)

    data = (digits.x_train[:100], digits.y_train[:100])
    device = fedclient.Client(live.url, "digits", data)
    assert device.run_once().status == "uploaded"
    assert admin("pause", "digits")["status"] == "paused"
    paused = device.run_once()
    assert paused.status == "waiting" and "paused" in paused.reason
    assert admin("resume", "digits")["status"] == "running"
    assert device.run_once().status == "uploaded"
    rounds = admin("rounds", "digits")
    assert [r["status"] for r in rounds][-2:] == ["closed", "closed"]
    (seen,) = admin("devices", "digits")
    assert seen["updates"] == 2 and not seen["revoked"]
    admin("revoke", seen["device_id"])
    with pytest.raises(fedclient.Unauthorized):
        device.run_once()  # revoked: its next request is a 401
    device.close()
    assert len(admin("codes", "3")["codes"]) == 3
    # Piped into a reader that stops early (`| head -2`): no traceback, in a real pipe.
    piped = subprocess.run(
        f"{sys.executable} -m fedclient.server.cli admin --url {live.url}"
        f" --token-file {token_file} codes 5000 | head -2",
        shell=True,
        capture_output=True,
        text=True,
    )
    assert piped.stdout.splitlines()[0] == "{" and "Traceback" not in piped.stderr, piped.stderr
    assert piped.stderr == ""
    assert admin("stop", "digits")["status"] == "stopped"
    # A wrong token is one line on stderr and a non-zero exit.
    token_file.write_text("b" * 40)
    assert admin_cli(["--url", live.url, "--token-file", str(token_file), "pause", "digits"]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "admin token" in err
    assert httpx.get(live.url + "/healthz").status_code == 200


async def test_the_admin_api_creates_a_job_and_refuses_one_it_cannot_build(
    make_server: Any,
) -> None:
    # Found by the schemathesis run: a CNN plan whose inputs are not a square was a 500.
    server: Server = make_server(service_options={"admin_token": ADMIN})
    admin = {"Authorization": f"Bearer {ADMIN}"}
    plan = {"job": {"name": "more"}, "model": {"kind": "softmax", "inputs": 64, "classes": 10}}
    async with server.http() as http:
        created = await http.post("/v1/admin/jobs", json=plan, headers=admin)
        assert created.status_code == 200 and created.json()["job"] == "more"
        again = await http.post("/v1/admin/jobs", json=plan, headers=admin)
        assert again.status_code == 200  # the same plan: a no-op
        other = {**plan, "train": {"epochs": 9}}
        assert (await http.post("/v1/admin/jobs", json=other, headers=admin)).status_code == 409
        before = server.store.fingerprint()
        cnn = {"job": {"name": "cnn"}, "model": {"kind": "cnn", "inputs": 206, "classes": 10}}
        refused = await http.post("/v1/admin/jobs", json=cnn, headers=admin)
        assert refused.status_code == 400 and "square" in refused.text
        assert server.store.fingerprint() == before
