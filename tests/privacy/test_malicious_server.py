"""The strongest server the threat model names, against the device (issue 24).

Each attack was found to recover a device's exact input (or its unnoised update) while
the server did only what the README's threat model allows: it writes parameters,
plans and rosters, relays selectively, and runs colluding certified devices. Each test
plays it with the doubles of `tests.privacy.adversary` and asserts that the honest
device refuses for a protocol reason *before* it sends anything derived from its input
(for secure aggregation: before its shares, its masked input or its unmasking), or that
what the server and its colluders hold does not determine the input.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec
import numpy as np
import pytest

import fedclient
from fedclient.identity import SigningKey
from fedclient.privacy.distributed import (
    device_sigma,
    effective_noise_multiplier,
    honest_shares,
)
from fedclient.privacy.dp import GaussianMechanism
from fedclient.privacy.noise import SeededNoiseWarning
from fedclient.privacy.secagg import (
    InvalidShare,
    ProtocolViolation,
    RelayedShare,
    SecAggClient,
    SecAggParams,
    ShareBundle,
    assumed_colluders,
    signature_quorum,
)
from fedclient.protocol import decode_tensors
from fedclient.server import FederationService, ServerStore, plan_from_dict
from tests.conftest import ManualClock, Server, step_until
from tests.privacy.adversary import Coalition, LyingServer

pytestmark = pytest.mark.anyio


def _nothing_shared(client: SecAggClient) -> bool:
    """The device encrypted no share, masked nothing and unmasked nothing."""
    return not {"share", "mask", "unmask"} & {stage.value for stage in client._sent}


# -- 1: split rosters ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("n", "plus", "policy"),
    [
        (20, False, {"min_honest": 2}),  # groups of 10: each group's own bounds pass
        (20, False, {}),  # the default policy: the groups refuse their small rosters too
        (1000, True, {}),  # SecAgg+ at 1,000: the groups' rosters break their bounds too
    ],
)
def test_split_rosters_get_no_share_from_the_target(
    n: int, plus: bool, policy: dict[str, Any]
) -> None:
    # The server shows the target the whole roster and two disjoint groups A and B a
    # roster of the target and their own group. Later A would be told the target
    # dropped (revealing shares of its mask key) and B that it survived (revealing its
    # self-mask seed's): its input, exactly. No device colludes; the authority is pinned.
    target, group_a, group_b = 1, range(2, n // 2 + 1), range(n // 2 + 1, n + 1)
    floor = policy.get("min_honest", 10) + assumed_colluders(n, 0.2)
    params = SecAggParams.create(range(1, n + 1), 8, plus=plus, min_contributors=floor)
    # At n = 1,000 five devices run the real client; the others' advertisements (and, as
    # `agree` would, their signatures) are made by the test.
    real = [target, *group_a[:2], *group_b[:2]] if n > 100 else list(range(1, n + 1))
    coalition = Coalition.start(params, real, **policy)
    others = Coalition.start(params, [], colluders=set(range(1, n + 1)) - set(real))
    coalition.adverts |= others.adverts
    coalition.signers |= others.signers
    everyone = coalition.roster(range(1, n + 1))
    roster_a = coalition.roster([target, *group_a])
    roster_b = coalition.roster([target, *group_b])
    me = coalition.honest[target]
    mine = me.agree(everyone)
    # Each group's honest devices check the roster they were shown, and sign it.
    refused = []
    for member, roster in [(d, roster_a) for d in group_a] + [(d, roster_b) for d in group_b]:
        client = coalition.honest.get(member)
        if client is None:
            continue
        try:
            signed = client.agree(roster)
        except ProtocolViolation:
            refused.append(member)
            continue
        assert [signed.signature] == [v.signature for v in coalition.sign_roster([member], roster)]
    if policy:  # the groups' views pass their own checks, and A alone reaches its quorum:
        assert refused == []
        assert len(group_a) >= signature_quorum(len(roster_a.peers), assumed_colluders(n, 0.2))
    else:  # the default policy: too small a roster for 10 beyond 20% colluders, or for k
        assert refused == [d for d in real if d != target]
    # The server can show the target only signatures of other digests (or its own).
    vouches = coalition.sign_roster(group_a, roster_a) + coalition.sign_roster(group_b, roster_b)
    relabelled = Coalition.agreement(vouches)
    with pytest.raises(ProtocolViolation, match="does not verify"):
        me.share_keys(relabelled)
    alone = Coalition.agreement(coalition.sign_roster([target], everyone))
    with pytest.raises(ProtocolViolation, match=r"1 devices signed the roster"):
        me.share_keys(alone)
    assert mine.signature  # it agreed on one roster, and shares with no one
    assert _nothing_shared(me)


def test_past_its_colluders_a_share_still_opens_only_under_the_roster_it_was_made_for() -> None:
    # Beyond the model: 12 of 20 devices collude (the target assumes 4) and complete the
    # target's quorum over the whole roster. Group A, shown another roster, still cannot
    # open the target's shares: they are keyed and authenticated by the roster's digest.
    n, target = 20, 1
    params = SecAggParams.create(range(1, n + 1), 8, min_contributors=6)
    colluders, group_a = range(9, 21), range(2, 9)
    coalition = Coalition.start(params, [target, *group_a], colluders, min_honest=2)
    everyone = coalition.roster(range(1, n + 1))
    roster_a = coalition.roster([target, *group_a, *colluders][:12])
    me = coalition.honest[target]
    me.agree(everyone)
    shares = me.share_keys(
        Coalition.agreement(coalition.sign_roster([target, *colluders], everyone))
    )
    agreement_a = Coalition.agreement(coalition.sign_roster(range(2, 13), roster_a))
    sent_a = {}
    for d in (2, 3, 4, 5):  # A's devices agree on their roster and share under it
        coalition.honest[d].agree(roster_a)
        sent_a[d] = coalition.honest[d].share_keys(agreement_a)
    member = coalition.honest[2]
    to_member = next(s for s in shares.shares if s.recipient == 2)
    bundle = [RelayedShare(target, to_member.ciphertext)]
    for d in (3, 4, 5):
        bundle += [RelayedShare(d, s.ciphertext) for s in sent_a[d].shares if s.recipient == 2]
    with pytest.raises(InvalidShare, match="authentication failed"):
        member.masked_input(ShareBundle(bundle), np.zeros(params.vector_length, np.uint32))
    assert "mask" not in {s.value for s in member._sent}


# -- 2: no trust root ---------------------------------------------------------------------------
def test_without_an_authority_secure_aggregation_is_refused_unless_the_policy_says() -> None:
    params = SecAggParams.create(range(1, 21), 8, min_contributors=14)
    with pytest.raises(fedclient.InvalidInput, match="trust_server_identities"):
        SecAggClient(params, 1, SigningKey())
    # With the opt-in, the server can do what the README's row says it can: make up a
    # peer (its own keys under its own identity), and the device cannot tell.
    coalition = Coalition.start(params, range(1, 21))
    trusting = SecAggClient(params, 1, SigningKey(), trust_server_identities=True)
    advert = trusting.advertise_keys()
    impostor = Coalition.start(params, [], colluders=range(2, 21))
    impostor.adverts[1] = advert
    impostor.signers[1] = trusting.signer
    roster = impostor.roster(range(1, 21))  # every peer the server's own
    assert trusting.agree(roster).signature
    assert coalition.honest[1].trusted_authorities  # a pinning device refuses it:
    with pytest.raises(ProtocolViolation, match="not certified"):
        pinned = Coalition.start(params, [1])
        pinned.adverts |= {d: impostor.adverts[d] for d in range(2, 21)}
        pinned.signers |= {d: impostor.signers[d] for d in range(2, 21)}
        forged = pinned.roster(range(1, 21))
        forged = msgspec.structs.replace(
            forged,
            peers=[
                p if p.device == 1 else msgspec.structs.replace(p, certificate=bytes(64))
                for p in forged.peers
            ],
        )
        pinned.honest[1].agree(forged)


async def test_a_default_device_refuses_a_secure_job_without_an_authority(
    make_devices: Any,
) -> None:
    server = _secure_server({})
    lying = LyingServer(server.app())
    (device,) = make_devices(1, lying)  # PrivacyPolicy() pins no authority
    with pytest.raises(fedclient.PrivacyPolicyViolation, match="identity authority"):
        await device.astep()
    assert lying.posted("/leave")  # its place went back, nothing else was sent
    assert not lying.posted("/secagg/keys") and server.store.update_count(1) == 0


# -- 3 and 4: isolation with the colluders the device assumes -------------------------------------
def test_isolating_the_target_with_its_assumed_colluders_is_refused() -> None:
    # 100 devices announced (t = 21), 20 colluding (the default 20%): the server runs the
    # round with the target and its 20 colluders only; the sum minus theirs is the target's.
    n, target, colluders = 100, 1, range(2, 22)
    for floor in (21, 29):  # a floor under 10 beyond 20 colluders: refused up front
        params = SecAggParams.create(range(1, n + 1), 8, min_contributors=floor)
        with pytest.raises(ProtocolViolation, match="floor of at least 30"):
            Coalition.start(params, [target])
    params = SecAggParams.create(range(1, n + 1), 8, min_contributors=30)
    assert params.threshold == 21
    coalition = Coalition.start(params, [target], colluders)
    me = coalition.honest[target]
    with pytest.raises(ProtocolViolation, match="cannot reach the aggregation's floor of 30"):
        me.agree(coalition.roster([target, *colluders]))
    assert "agree" not in {s.value for s in me._sent} and _nothing_shared(me)


def test_an_absolute_colluder_bound_holds_however_small_the_announced_cohort() -> None:
    # The server announces 25 devices (20% would be 5 colluders) but holds 20: a device
    # whose app knows more could be compromised says so in devices, not a fraction.
    params = SecAggParams.create(range(1, 26), 8, min_contributors=15)
    Coalition.start(params, [1])  # 10 beyond 5: the announced cohort looks fine
    with pytest.raises(ProtocolViolation, match="threshold 6 lets the 20 colluding"):
        Coalition.start(params, [1], colluding_devices=20)


@pytest.mark.parametrize("members", [201, 300])
def test_a_secagg_plus_roster_cannot_be_made_to_surround_the_target(members: int) -> None:
    # 1,000 devices announced (k = 244, t = 111: the 218 and 96 before the
    # threshold held for a roster 10% smaller too), 200 certified colluders. The server
    # shows the target a roster of itself and the 200 (at most k + 1: the graph is
    # complete, every colluder a neighbour, 200 shares >= t), or of 300 devices where
    # the colluders are two thirds of every neighbourhood.
    n, target, colluders = 1000, 1, range(2, 202)
    honest = [target, *range(202, members + 1)]
    strict = SecAggParams.create(range(1, n + 1), 8, plus=True, min_contributors=210)
    assert (strict.neighbours, strict.threshold) == (244, 111)
    coalition = Coalition.start(strict, honest, colluders)
    with pytest.raises(  # the default policy: under its floor, or within their reach
        ProtocolViolation, match="floor of 210" if members < 210 else "within their reach"
    ):
        coalition.honest[target].agree(coalition.roster([*honest, *colluders]))
    # A device that asks for a single honest device beyond its colluders still refuses.
    lax = msgspec.structs.replace(strict, min_contributors=201)
    coalition = Coalition.start(lax, honest, colluders, min_honest=1)
    me = coalition.honest[target]
    reason = "every one is a neighbour" if members == 201 else "within their reach"
    with pytest.raises(ProtocolViolation, match=reason):
        me.agree(coalition.roster([*honest, *colluders]))
    assert _nothing_shared(me)


# -- 5: a plan that switches DP off ---------------------------------------------------------------
def _secure_server(privacy: dict[str, Any], *, seeded: bool = False, **job: Any) -> Server:
    plan = plan_from_dict(
        {
            "job": {
                "name": "digits",
                "rounds": 1,
                "devices_per_round": 6,
                "over_selection": 1.0,
                "seed": 4,
                **job,
            },
            "model": {"kind": "mlp", "inputs": 64, "hidden": [16], "classes": 10},
            "train": {"epochs": 1, "batch_size": 8, "learning_rate": 0.1},
            "privacy": {"secagg": "secagg", **privacy},
        }
    )
    clock = ManualClock()
    # Seeded: the sessions (public) repeat, so two runs can be compared bit for bit.
    stream = np.random.default_rng(0)
    randomness = {"secure_random": lambda k: stream.bytes(k)} if seeded else {}
    service = FederationService(ServerStore(), clock=clock, **randomness)
    service.add_job(plan)
    return Server(service, clock)


SMALL = fedclient.PrivacyPolicy(min_secure_cohort=2, trust_server_identities=True)
DDP = {"dp_epsilon": 8.0, "clip": 1.0, "distributed_dp": True}


async def test_a_plan_cannot_turn_distributed_dp_into_no_dp(make_devices: Any) -> None:
    # The server sends distributed DP without secure aggregation: the device used to
    # skip its clipping and noise and upload the raw delta, charged all the same.
    server = _secure_server(DDP)
    lying = LyingServer(
        server.app(),
        plan=lambda p: msgspec.structs.replace(
            p, privacy=msgspec.structs.replace(p.privacy, secagg="")
        ),
    )
    (device,) = make_devices(1, lying, policy=SMALL)
    with pytest.raises(fedclient.PrivacyPolicyViolation, match="unnoised"):
        await device.astep()
    assert [p for m, p in lying.sent if m == "POST"][-1].endswith("/leave")
    assert not lying.posted("/updates") and server.store.update_count(1) == 0


async def test_distributed_dp_without_a_grid_is_refused_before_any_key(
    make_devices: Any,
) -> None:
    # Secure aggregation and distributed DP, but parameters without the rotated grid:
    # the device's vector would have carried no noise at all.
    server = _secure_server(DDP)
    lying = LyingServer(
        server.app(), params=lambda p: msgspec.structs.replace(p, rotation=None, modulus_bits=32)
    )
    devices = make_devices(6, lying, policy=SMALL)
    for device in devices:
        await step_until(device, fedclient.Phase.TRAINED)
    for device in devices:
        outcome = await device.astep()
        assert outcome.status == "discarded" and "rotated grid" in outcome.reason
    assert not lying.posted("/secagg/keys") and not lying.posted("/secagg/masked")


async def test_a_ring_too_narrow_for_the_noise_is_refused_before_any_key(
    make_devices: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A server (malicious, or just misconfigured) announces a grid whose ring leaves no
    # room for the devices' noise: the sum would wrap, and the model be silently wrong.
    from fedclient.server import secure_rounds

    honest = secure_rounds.rotated_encoding

    def narrow(*args: Any) -> Any:
        grid = honest(*args)
        return msgspec.structs.replace(grid, levels=(2**31 - 1) // 7)

    monkeypatch.setattr(secure_rounds, "rotated_encoding", narrow)
    server = _secure_server(DDP)
    lying = LyingServer(server.app())
    devices = make_devices(6, lying, policy=SMALL)
    for device in devices:
        await step_until(device, fedclient.Phase.TRAINED)
    for device in devices:
        outcome = await device.astep()
        assert outcome.status == "discarded" and "too narrow" in outcome.reason
    assert not lying.posted("/secagg/keys")


@pytest.mark.filterwarnings("ignore::fedclient.privacy.noise.SeededNoiseWarning")
async def test_an_inflated_min_devices_does_not_shrink_a_device_s_noise(
    make_devices: Any,
) -> None:
    # The server tells devices min_devices = 1,000 (each would add 1/1,000 of the noise)
    # but runs the round with the real plan's 4 on six devices. Each device sizes its
    # share from the floor every honest device enforces, so the aggregate is the one an
    # honest plan gives, bit for bit (noise drawn from the seed, so the two runs can be
    # compared).
    results = []
    for forged in (False, True):
        server = _secure_server(DDP, seeded=True, min_devices=4)
        edit = (lambda p: msgspec.structs.replace(p, min_devices=1000)) if forged else (lambda p: p)
        lying = LyingServer(server.app(), plan=edit)
        devices = make_devices(6, lying, policy=SMALL, simulation_seeded_noise=True)
        for device in devices:
            await step_until(device, fedclient.Phase.TRAINED)
        pending = list(devices)
        for _ in range(12):
            pending = [d for d in pending if (await d.astep()).status == "waiting"]
        assert not pending
        found = server.store.model("digits", 1)
        assert found is not None
        results.append(decode_tensors(found[0])[0])
    honest, forged_run = results
    for name in honest:
        np.testing.assert_array_equal(forged_run[name], honest[name])


def test_the_floor_s_honest_devices_carry_all_the_noise_the_device_charged() -> None:
    # Colluders add no noise: a device that assumes c of them sizes its share so that
    # the floor's other devices carry the noise multiplier it charges its ledger for.
    z = GaussianMechanism.for_release(8.0, 1e-5, 1.0).noise_multiplier
    sensitivity, d = 60.0, 4864
    for floor, colluders in [(14, 4), (30, 20), (210, 200)]:
        shares = honest_shares(floor, colluders)
        sigma = device_sigma(z, sensitivity, shares, d)
        assert effective_noise_multiplier(sigma, sensitivity, floor - colluders, d) >= z
        assert effective_noise_multiplier(sigma, sensitivity, floor - colluders - 1, d) < z
    with pytest.raises(fedclient.InvalidInput):
        honest_shares(20, 20)
    assert math.isfinite(z) and SeededNoiseWarning  # imported for the filter above
