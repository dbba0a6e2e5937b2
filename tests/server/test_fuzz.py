"""Schemathesis against the server's own OpenAPI document: no 5xx, no answer outside it.

Bounded (a few dozen examples an operation), with a device's and the admin's tokens
among the examples' headers so that the checks reach past authentication."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    allow_header_conformance,
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from fedclient.protocol import TENSOR_MEDIA_TYPE, CheckinRequest, EnrolRequest
from fedclient.server import FederationService, ServerStore, create_app
from fedclient.server.limits import RateLimits
from tests.conftest import make_plan

ADMIN = "a" * 40


@schemathesis.serializer(TENSOR_MEDIA_TYPE)
def _tensors(context: Any, value: Any) -> bytes:
    """Whatever the generator made, as bytes: a tensor body the server must refuse."""
    return value if isinstance(value, bytes) else msgspec.json.encode(value)


def _app() -> tuple[Any, str]:
    """The app, and an enrolled device's token (admitted to round 1)."""
    service = FederationService(ServerStore(), admin_token=ADMIN, public_status=False)
    service.add_job(make_plan())
    token = service.enrol(EnrolRequest()).token
    service.checkin(token, "digits", CheckinRequest())
    # With fedserver's rate limits: a 429 must be in the document too.
    return create_app(service, rate_limits=RateLimits.parse("")), token


APP, DEVICE = _app()
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)


@schema.parametrize()
@settings(
    max_examples=25,
    deadline=None,
    derandomize=True,
    database=None,  # the same examples every run, none replayed from an earlier one
    suppress_health_check=list(HealthCheck),
)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_no_5xx_and_no_answer_outside_the_schema(case: Any) -> None:
    for token in ("", DEVICE, ADMIN):
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        case.call_and_validate(
            headers=headers,
            checks=[
                not_a_server_error,
                status_code_conformance,
                content_type_conformance,
                response_schema_conformance,
                allow_header_conformance,
            ],
        )


@pytest.mark.anyio
async def test_a_405_names_every_method_its_path_has() -> None:
    # Starlette's 405 named the first route's methods only: two routes share a path.
    import httpx

    transport = httpx.ASGITransport(app=APP)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    checked = 0
    async with httpx.AsyncClient(transport=transport, base_url="http://fedserver.local") as http:
        document = (await http.get("/openapi.json")).json()
        for path, operations in document["paths"].items():
            concrete = path.format(
                job="digits",
                version=0,
                round_id=1,
                number=1,
                upload_id="u",
                stage="keys",
                action="pause",
                device="d",
            )
            allowed = {m.upper() for m in operations} | ({"HEAD"} if "get" in operations else set())
            for method in {"GET", "POST", "PATCH", "PUT", "DELETE"} - allowed:
                answer = await http.request(method, concrete, headers=admin)
                assert answer.status_code == 405, (method, path, answer.status_code)
                assert set(answer.headers["allow"].split(", ")) == allowed, (method, path)
                checked += 1
    assert checked >= 60
