"""The check-in front door (`fedclient.server.front_door`, issue 27): a check-in turned
away is answered before the web framework exactly as the app answers it, whether its
body came with its headers or after them; whatever it cannot answer goes on to the app
with its body intact."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import httpx
import msgspec
import pytest

from fedclient.protocol import MSGPACK_MEDIA_TYPE, CheckinRequest, EnrolRequest
from tests.conftest import LiveServer, Server

pytestmark = pytest.mark.anyio

PATH = "/v1/jobs/digits/checkin"


class Answer:
    """An ASGI response as a server sends it on: status, headers, body."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""

    async def send(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = {k.decode(): v.decode() for k, v in message["headers"]}
        else:
            self.body += message.get("body", b"")


async def call(
    app: Any,
    token: str,
    body: bytes,
    *,
    accept: str | None = None,
    arrives: asyncio.Event | None = None,
    asked: asyncio.Event | None = None,
) -> Answer:
    """One check-in through ``app`` as uvicorn hands it over: the whole body in one
    message (once ``arrives`` is set, if given; ``asked`` is set when the app first
    waits for it), and nothing more."""
    headers = [
        (b"authorization", f"Bearer {token}".encode()),
        (b"content-type", b"application/json"),
    ]
    if accept is not None:
        headers.append((b"accept", accept.encode()))
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": PATH,
        "raw_path": PATH.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 80),
    }
    answer, sent = Answer(), False
    never = asyncio.Event()

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await never.wait()  # a connection kept open: no more messages
        if asked is not None:
            asked.set()
        if arrives is not None:
            await arrives.wait()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    await app(scope, receive, answer.send)
    return answer


def _full_round(make_server: Callable[..., Server]) -> tuple[Server, list[str]]:
    """A round that admits one device, which is admitted; four more devices enrolled."""
    server = make_server(devices_per_round=1, over_selection=1.0, deadline_seconds=600.0)
    tokens = [server.service.enrol(EnrolRequest()).token for _ in range(5)]
    server.service.checkin(tokens[0], "digits", CheckinRequest())
    return server, tokens


def _requests(server: Server) -> float:
    assert server.service.metrics is not None
    value = server.service.metrics.registry.get_sample_value(
        "fedserver_requests_total", {"route": PATH.replace("digits", "{job}"), "status": "200"}
    )
    return value or 0.0


@pytest.mark.parametrize("accept", [None, MSGPACK_MEDIA_TYPE])
async def test_a_check_in_turned_away_is_answered_as_the_app_answers_it(
    make_server: Callable[..., Server], accept: str | None
) -> None:
    server, tokens = _full_round(make_server)
    app = server.app()
    before = server.store.fingerprint()
    door = await call(app, tokens[1], b"{}", accept=accept)
    # httpx hands the body over in two messages: the front door sends it on to the app.
    headers = {"Authorization": f"Bearer {tokens[1]}"}
    if accept is not None:
        headers["Accept"] = accept
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://fedserver.local"
    ) as http:
        routed = await http.post(PATH, content=b"{}", headers=headers)
    assert door.status == routed.status_code == 200
    assert door.body == routed.content
    assert door.headers["content-type"] == routed.headers["content-type"]
    assert door.headers["retry-after"] == routed.headers["retry-after"]
    assert int(door.headers["content-length"]) == len(door.body)
    decode = msgspec.msgpack.decode if accept else msgspec.json.decode
    answer = decode(door.body)
    assert answer["status"] == "retry" and answer["reason"] == "the round is full"
    assert int(door.headers["retry-after"]) == max(1, round(answer["retry_after"]))
    assert _requests(server) == 2  # both counted, as requests of the check-in route
    assert server.store.fingerprint() == before


async def test_a_body_that_comes_after_its_headers_is_waited_for(
    make_server: Callable[..., Server],
) -> None:
    server, tokens = _full_round(make_server)
    app = server.app()
    whole = await call(app, tokens[2], b"{}")
    arrives, asked = asyncio.Event(), asyncio.Event()
    later = asyncio.create_task(call(app, tokens[2], b"{}", arrives=arrives, asked=asked))
    await asked.wait()  # the front door waits for the body now
    assert not later.done()
    arrives.set()
    answer = await asyncio.wait_for(later, timeout=30)
    assert (answer.status, answer.body) == (whole.status, whole.body)
    assert answer.headers == whole.headers


async def test_a_body_that_never_comes_is_refused_with_408(
    make_server: Callable[..., Server],
) -> None:
    server, tokens = _full_round(make_server)
    app = server.app_with(body_idle_seconds=0.2)
    answer = await call(app, tokens[1], b"{}", arrives=asyncio.Event())
    assert answer.status == 408
    assert msgspec.json.decode(answer.body)["error"]["code"] == "body_timeout"


async def test_a_first_contact_goes_on_to_the_app_with_its_body(
    make_server: Callable[..., Server],
) -> None:
    server, _ = _full_round(make_server)
    token = "t" * 43
    answer = await call(server.app(), token, b'{"enrol_label": "phone"}')
    assert answer.status == 200 and answer.headers["device-id"]  # enrolled...
    assert msgspec.json.decode(answer.body)["reason"] == "the round is full"  # ...and told


def test_a_turned_away_check_in_over_http_is_the_app_s_answer(
    live_server: Callable[..., LiveServer],
) -> None:
    live = live_server(devices_per_round=1, over_selection=1.0, deadline_seconds=600.0)
    service = live.server.service
    tokens = [service.enrol(EnrolRequest()).token for _ in range(3)]
    service.checkin(tokens[0], "digits", CheckinRequest())
    headers = {"Authorization": f"Bearer {tokens[1]}"}
    over_http = httpx.post(live.url + PATH, json={}, headers=headers, timeout=30)
    exact = msgspec.json.encode(service.checkin(tokens[1], "digits", CheckinRequest()))
    assert over_http.status_code == 200 and over_http.content == exact
