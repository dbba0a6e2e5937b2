"""One server and N devices of a secure aggregation, wired in-process, stage by stage.

Each device has an identity key certified by one identity authority, which every
device pins (`authority`). Devices assume no colluders unless a test says
(``colluding_fraction``, ``colluding_devices``): the dropout tests need only a
majority of signers. The aggregation's floor is the least the devices accept
(``min_honest`` beyond the colluders) unless a test sets ``min_contributors``."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from fedclient.identity import IdentityAuthority, SigningKey
from fedclient.privacy.secagg import (
    KeyAdvertisement,
    KeyRoster,
    MaskedInput,
    RosterAgreement,
    RosterSignature,
    SecAggClient,
    SecAggParams,
    ShareBundle,
    ShareKeys,
    SurvivorList,
    SurvivorSignature,
    UnmaskRequest,
    UnmaskResponse,
    assumed_colluders,
    quantize,
)
from fedclient.server.secagg import SecAggResult, SecAggServer

STAGES = ("advertise", "agree", "share", "mask", "consistency", "unmask")


@dataclass
class Aggregation:
    """A server, its clients and their quantised inputs; each step drops the devices named."""

    params: SecAggParams
    server: SecAggServer
    clients: dict[int, SecAggClient]
    inputs: dict[int, npt.NDArray[np.uint32]]
    authority: IdentityAuthority
    signers: dict[int, SigningKey]
    sent: dict[str, dict[int, Any]] = field(default_factory=dict)
    received: dict[str, dict[int, Any]] = field(default_factory=dict)

    @classmethod
    def start(
        cls,
        n: int,
        length: int = 32,
        *,
        plus: bool = False,
        seed: int = 0,
        inputs: dict[int, npt.NDArray[np.uint32]] | None = None,
        **kwargs: Any,
    ) -> Aggregation:
        client_options = {"colluding_fraction": 0.0}
        client_options |= {
            k: kwargs.pop(k)
            for k in ("min_honest", "colluding_fraction", "colluding_devices")
            if k in kwargs
        }
        if "min_contributors" not in kwargs:  # the floor these devices accept
            kwargs["min_contributors"] = min(
                n,
                client_options.get("min_honest", 2)
                + assumed_colluders(
                    n,
                    client_options["colluding_fraction"],
                    client_options.get("colluding_devices", 0),
                ),
            )
        params = SecAggParams.create(range(1, n + 1), length, plus=plus, **kwargs)
        rng = np.random.default_rng(seed)
        if inputs is None:
            inputs = {
                d: quantize(rng.uniform(-1, 1, length), params.quantization, rng)
                for d in params.participants
            }
        authority = IdentityAuthority()
        signers = {d: SigningKey() for d in params.participants}
        identities = {d: (k.public, authority.certify(k.public)) for d, k in signers.items()}
        clients = {
            d: SecAggClient(
                params, d, signers[d], trusted_authorities=[authority.public], **client_options
            )
            for d in params.participants
        }
        return cls(params, SecAggServer(params, identities), clients, inputs, authority, signers)

    def advertise(self, drop: Iterable[int] = ()) -> dict[int, KeyRoster]:
        out: dict[int, KeyAdvertisement] = {}
        for d in sorted(set(self.clients) - set(drop)):
            out[d] = self.clients[d].advertise_keys()
            self.server.receive_keys(d, out[d])
        self.sent["advertise"] = dict(out)
        rosters = self.server.close_advertise()
        self.received["advertise"] = dict(rosters)
        return rosters

    def agree(self, drop: Iterable[int] = ()) -> dict[int, RosterAgreement]:
        rosters = self.received["advertise"]
        out: dict[int, RosterSignature] = {}
        for d in sorted(set(rosters) - set(drop)):
            out[d] = self.clients[d].agree(rosters[d])
            self.server.receive_agreement(d, out[d])
        self.sent["agree"] = dict(out)
        agreements = self.server.close_agreement()
        self.received["agree"] = dict(agreements)
        return agreements

    def share(self, drop: Iterable[int] = ()) -> dict[int, ShareBundle]:
        if "agree" not in self.received:
            self.agree()
        agreements = self.received["agree"]
        out: dict[int, ShareKeys] = {}
        for d in sorted(set(agreements) - set(drop)):
            out[d] = self.clients[d].share_keys(agreements[d])
            self.server.receive_shares(d, out[d])
        self.sent["share"] = dict(out)
        bundles = self.server.close_sharing()
        self.received["share"] = dict(bundles)
        return bundles

    def mask(self, drop: Iterable[int] = ()) -> dict[int, SurvivorList]:
        bundles = self.received["share"]
        out: dict[int, MaskedInput] = {}
        for d in sorted(set(bundles) - set(drop)):
            out[d] = self.clients[d].masked_input(bundles[d], self.inputs[d])
            self.server.receive_masked_input(d, out[d])
        self.sent["mask"] = dict(out)
        lists = self.server.close_masking()
        self.received["mask"] = dict(lists)
        return lists

    def consistency(self, drop: Iterable[int] = ()) -> dict[int, UnmaskRequest]:
        lists = self.received["mask"]
        out: dict[int, SurvivorSignature] = {}
        for d in sorted(set(lists) - set(drop)):
            out[d] = self.clients[d].consistency(lists[d])
            self.server.receive_consistency(d, out[d])
        self.sent["consistency"] = dict(out)
        requests = self.server.close_consistency()
        self.received["consistency"] = dict(requests)
        return requests

    def unmask(self, drop: Iterable[int] = ()) -> SecAggResult:
        requests = self.received["consistency"]
        out: dict[int, UnmaskResponse] = {}
        for d in sorted(set(requests) - set(drop)):
            out[d] = self.clients[d].unmask(requests[d])
            self.server.receive_unmask(d, out[d])
        self.sent["unmask"] = dict(out)
        return self.server.finish()

    def run(self, drops: Mapping[str, Iterable[int]] | None = None) -> SecAggResult:
        drops = drops or {}
        self.advertise(drops.get("advertise", ()))
        self.agree(drops.get("agree", ()))
        self.share(drops.get("share", ()))
        self.mask(drops.get("mask", ()))
        self.consistency(drops.get("consistency", ()))
        return self.unmask(drops.get("unmask", ()))

    def plain_sum(self, devices: Iterable[int]) -> npt.NDArray[np.uint32]:
        """The sum of the quantised inputs of ``devices`` in Z_{2^32}, computed in the clear."""
        total = np.zeros(self.params.vector_length, dtype=np.uint64)
        for d in devices:
            total += self.inputs[d]
        return (total % 2**32).astype(np.uint32)
