"""Device identity keys at enrolment: registered once, certified where the server demands it."""

from __future__ import annotations

import base64
from typing import Any

import pytest

import fedclient
from fedclient.identity import SigningKey, verify_certificate
from fedclient.server import FederationService, ServerStore
from fedclient.server.cli import main as fedserver
from tests.conftest import ManualClock, Server, make_plan

pytestmark = pytest.mark.anyio


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _server(db: str, authorities: tuple[bytes, ...] = ()) -> Server:
    clock = ManualClock()
    service = FederationService(ServerStore(db), clock=clock, identity_authorities=authorities)
    service.add_job(make_plan())
    return Server(service, clock)


async def test_a_server_with_an_authority_enrols_certified_devices_only(db_url: Any) -> None:
    authority = fedclient.IdentityAuthority()
    server = _server(db_url(), (authority.public,))
    key = SigningKey().public
    before = server.store.fingerprint()
    async with server.http() as http:
        bare = await http.post("/v1/devices", json={"identity_key": _b64(key)})
        assert bare.status_code == 403 and "certified" in bare.json()["error"]["message"]
        forged = fedclient.IdentityAuthority().certify(key)  # an authority of the attacker's
        wrong = await http.post(
            "/v1/devices",
            json={"identity_key": _b64(key), "identity_certificate": _b64(forged)},
        )
        assert wrong.status_code == 403 and "trusted" in wrong.json()["error"]["message"]
        assert server.store.fingerprint() == before  # refusals wrote nothing
        good = await http.post(
            "/v1/devices",
            json={"identity_key": _b64(key), "identity_certificate": _b64(authority.certify(key))},
        )
        assert good.status_code == 200
    device = good.json()["device_id"]
    held = server.store.device_identity(device)
    assert held is not None and held[0] == key
    assert held[1] is not None and verify_certificate([authority.public], key, held[1])


async def test_an_identity_key_cannot_be_changed_by_enrolling_again(db_url: Any) -> None:
    server = _server(db_url())
    token = "t" * 40
    async with server.http() as http:
        first = await http.post(
            "/v1/devices", json={"token": token, "identity_key": _b64(bytes(32))}
        )
        again = await http.post(
            "/v1/devices", json={"token": token, "identity_key": _b64(bytes(32))}
        )
        assert first.json()["device_id"] == again.json()["device_id"]
        other = await http.post(
            "/v1/devices", json={"token": token, "identity_key": _b64(bytes([1]) * 32)}
        )
        assert other.status_code == 409
        bad = await http.post("/v1/devices", json={"identity_key": _b64(b"short")})
        assert bad.status_code == 400


async def test_a_client_enrols_with_its_key_and_certificate(db_url: Any, make_devices: Any) -> None:
    authority = fedclient.IdentityAuthority()
    server = _server(db_url(), (authority.public,))
    (device,) = make_devices(1, server.transport())
    with pytest.raises(fedclient.Forbidden):
        await device.astep()  # no certificate yet: the server refuses it
    device.device_state.set_identity_certificate(authority.certify(device.identity_key))
    assert (await device.astep()).status == "admitted"
    enrolled = device.device_state.identity(device.server)
    assert enrolled is not None
    held = server.store.device_identity(enrolled.device_id)
    assert held is not None and held[0] == device.identity_key
    # The key is made once and kept: a new Client on the same state has the same one.
    again = fedclient.Client(device.server, "digits", device.data, state=device.device_state)
    assert again.identity_key == device.identity_key


def test_fedserver_refuses_a_malformed_authority_key(capsys: pytest.CaptureFixture[str]) -> None:
    assert fedserver(["--plan", "x.toml", "--identity-authority", "abcd"]) == 2
    assert "64 hex digits" in capsys.readouterr().err


async def test_a_device_registers_its_key_when_a_secure_job_first_asks(
    db_url: Any,
    make_devices: Any,
) -> None:
    # A job without secure aggregation never makes a device create a key; the first
    # secure job asks (403 identity_required) and the device answers with its key.
    from fedclient.server import plan_from_dict

    clock = ManualClock()
    service = FederationService(ServerStore(db_url()), clock=clock)
    service.add_job(make_plan(name="plain"))
    secure = plan_from_dict(
        {
            "job": {"name": "secure", "devices_per_round": 3, "over_selection": 1.0},
            "model": {"kind": "mlp", "inputs": 64, "hidden": [16], "classes": 10},
            "privacy": {"secagg": "secagg"},
        }
    )
    service.add_job(secure)
    server = Server(service, clock)
    state = fedclient.DeviceState.in_memory()
    (plain,) = make_devices(1, server.transport(), job="plain", state=state)
    assert (await plain.astep()).status == "admitted"
    enrolled = state.identity(plain.server)
    assert enrolled is not None and service.store.device_identity(enrolled.device_id) is None
    assert state.db.execute("SELECT count(*) FROM signing_keys").fetchone()[0] == 0
    trusting = fedclient.PrivacyPolicy(trust_server_identities=True)
    (device,) = make_devices(1, server.transport(), job="secure", state=state, policy=trusting)
    assert (await device.astep()).status == "admitted"  # asked, answered, admitted
    held = service.store.device_identity(enrolled.device_id)
    assert held is not None and held[0] == device.identity_key
