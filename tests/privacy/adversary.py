"""A malicious server for secure aggregation, as strong as the threat model lets it be.

The README's malicious server writes the parameters and the plans, shows each
device the roster it likes, relays what it likes of what devices send, and runs
colluding devices whose secrets it holds (certified by the authority like any
other device). Two doubles play it:

- `Coalition`, at the protocol's level: real `SecAggClient`s for the honest
  devices and for the colluders, and the server's freedom over what each honest
  device is shown (`roster`, `agreement`, `sign_roster`).
- `LyingServer`, over HTTP against the real `fedclient.Client`: an httpx
  transport in front of the real server app that rewrites its answers (the
  plan of an admission, the parameters of a secure round) before the device
  reads them, and records every request the device sends, so a test can check
  that nothing derived from the device's input left.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgspec

from fedclient.identity import IdentityAuthority, SigningKey
from fedclient.privacy.secagg import (
    KeyAdvertisement,
    KeyRoster,
    PeerKeys,
    RosterAgreement,
    SecAggClient,
    SecAggParams,
    Vouch,
    crypto,
    roster_context,
)
from fedclient.protocol import Admitted, CheckinResponse, RoundPlan


@dataclass
class Coalition:
    """Every device of one aggregation: ``honest`` ones pin ``authority``; the server holds
    the ``colluders``' clients, keys and identities. Each honest device's policy is
    ``policy`` (`SecAggClient`'s keyword arguments), the default app's unless a test says."""

    params: SecAggParams
    authority: IdentityAuthority
    signers: dict[int, SigningKey]
    honest: dict[int, SecAggClient]
    colluders: dict[int, SecAggClient]
    adverts: dict[int, KeyAdvertisement] = field(default_factory=dict)

    @classmethod
    def start(
        cls,
        params: SecAggParams,
        honest: Iterable[int],
        colluders: Iterable[int] = (),
        **policy: Any,
    ) -> Coalition:
        authority = IdentityAuthority()
        honest, colluders = sorted(honest), sorted(colluders)
        signers = {d: SigningKey() for d in [*honest, *colluders]}
        pinned = {"trusted_authorities": [authority.public]}
        options = {"min_honest": 10, "colluding_fraction": 0.2} | policy
        clients = {d: SecAggClient(params, d, signers[d], **pinned, **options) for d in honest}
        # The colluders follow the server: they accept any parameters it writes.
        lax = {"min_honest": 1, "colluding_fraction": 0.0}
        bad = {d: SecAggClient(params, d, signers[d], **pinned, **lax) for d in colluders}
        coalition = cls(params, authority, signers, clients, bad)
        for d, client in {**clients, **bad}.items():
            coalition.adverts[d] = client.advertise_keys()
        return coalition

    def roster(self, members: Iterable[int]) -> KeyRoster:
        """The roster of ``members``' signed advertisements, as the server may show it."""
        peers = []
        for d in sorted(members):
            advert, key = self.adverts[d], self.signers[d].public
            certificate = self.authority.certify(key)
            peers.append(
                PeerKeys(d, advert.c_public, advert.s_public, advert.signature, key, certificate)
            )
        return KeyRoster(peers)

    def sign_roster(self, devices: Iterable[int], roster: KeyRoster) -> list[Vouch]:
        """``devices``' signatures of ``roster``'s digest: what the colluders sign of any
        roster, and what honest devices shown that roster sign (`SecAggClient.agree`)."""
        statement = crypto.roster_message(roster_context(self.params, roster.peers))
        return [Vouch(d, self.signers[d].sign(statement)) for d in sorted(devices)]

    @staticmethod
    def agreement(vouches: Iterable[Vouch]) -> RosterAgreement:
        return RosterAgreement(sorted(vouches, key=lambda v: v.device))


PlanEdit = Callable[[RoundPlan], RoundPlan]
ParamsEdit = Callable[[SecAggParams], SecAggParams]


class LyingServer(httpx.AsyncBaseTransport):
    """The real server app behind a transport that rewrites what it answers.

    ``plan`` rewrites the plan of every admission; ``params`` the parameters of every
    secure round a device fetches. ``sent`` records each request a device made
    (method, path), in order."""

    def __init__(
        self, app: Any, *, plan: PlanEdit | None = None, params: ParamsEdit | None = None
    ) -> None:
        self.inner = httpx.ASGITransport(app=app)
        self.plan, self.params = plan, params
        self.sent: list[tuple[str, str]] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.sent.append((request.method, request.url.path))
        response = await self.inner.handle_async_request(request)
        path = request.url.path
        ok = response.status_code == 200
        if self.plan is not None and path.endswith("/checkin") and ok:
            return await self._rewrite_admission(response, self.plan)
        if self.params is not None and path.endswith("/secagg/params") and ok:
            return await self._rewrite_params(response, self.params)
        return response

    def posted(self, suffix: str) -> list[str]:
        """The paths of the POSTs that end with ``suffix``."""
        return [p for m, p in self.sent if m == "POST" and p.endswith(suffix)]

    @staticmethod
    async def _body(response: httpx.Response) -> bytes:
        return b"".join([chunk async for chunk in response.aiter_raw()])

    async def _rewrite_admission(self, response: httpx.Response, edit: PlanEdit) -> httpx.Response:
        body = await self._body(response)
        msgpack = response.headers.get("content-type", "").startswith("application/msgpack")
        answer = (
            msgspec.msgpack.decode(body, type=CheckinResponse)
            if msgpack
            else msgspec.json.decode(body, type=CheckinResponse)
        )
        if isinstance(answer, Admitted):
            answer = msgspec.structs.replace(answer, plan=edit(answer.plan))
        content = msgspec.msgpack.encode(answer) if msgpack else msgspec.json.encode(answer)
        return _replaced(response, content)

    async def _rewrite_params(self, response: httpx.Response, edit: ParamsEdit) -> httpx.Response:
        offer = msgspec.msgpack.decode(await self._body(response))
        params = msgspec.msgpack.decode(offer["params"], type=SecAggParams)
        offer["params"] = msgspec.msgpack.encode(edit(params))
        return _replaced(response, msgspec.msgpack.encode(offer))


def _replaced(response: httpx.Response, content: bytes) -> httpx.Response:
    headers = [(k, v) for k, v in response.headers.items() if k.lower() != "content-length"]
    return httpx.Response(response.status_code, headers=headers, content=content)
