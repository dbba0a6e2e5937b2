"""Secure aggregation: exact sums under dropouts, clean failure, and what the server can see."""

from __future__ import annotations

import random
from collections import deque

import msgspec
import numpy as np
import pytest
from scipy import stats

from fedclient import Conflict, InvalidInput, InvalidRequest
from fedclient.privacy.secagg import (
    AggregationFailed,
    InvalidShare,
    KeyAdvertisement,
    KeyRoster,
    MaskedInput,
    PeerKeys,
    ProtocolViolation,
    Quantization,
    RelayedShare,
    RevealedShare,
    SecAggParams,
    ShareBundle,
    ShareKeys,
    UnmaskRequest,
    UnmaskResponse,
    _crypto,
    _shamir,
    decode,
    dequantize,
    encode,
    quantize,
)
from fedserver_ref.secagg import ServerStage
from tests.privacy.harness import STAGES, Aggregation

# (n, SecAgg+?, neighbours): SecAgg+ at n=3 is the complete graph; k=4 at n=10 makes
# groups of 5 (an odd size), the default k=20 at n=100 groups of 21.
CONFIGS: list[tuple[int, bool, int | None]] = [(3, False, None), (10, False, None)]
CONFIGS += [(100, False, None)]
CONFIGS += [(3, True, 2), (10, True, 4), (100, True, None)]


def tolerance(agg: Aggregation) -> int:
    """How many devices of one share group may drop: smallest group minus threshold."""
    return agg.params.group_sizes[0] - agg.params.threshold


def victims(agg: Aggregation, count: int, rng: random.Random) -> tuple[int, list[int]]:
    """A device and ``count`` of its neighbours: dropping them strains its group most."""
    centre = rng.choice(agg.params.participants)
    return centre, rng.sample(sorted(agg.params.neighbourhood(centre)), count)


# -- exactness ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "plus", "k"), CONFIGS)
@pytest.mark.parametrize("stage", [*STAGES, "spread"])
def test_secure_sum_is_bit_exact_with_dropouts_up_to_the_threshold(
    n: int, plus: bool, k: int | None, stage: str
) -> None:
    agg = Aggregation.start(n, 24, plus=plus, neighbours=k, seed=n)
    rng = random.Random(n * 7 + len(stage))
    _, dropped = victims(agg, tolerance(agg), rng)
    if stage == "spread":  # the tolerated dropouts spread over every stage
        drops = {s: dropped[i :: len(STAGES)] for i, s in enumerate(STAGES)}
    else:
        drops = {stage: dropped}

    result = agg.run(drops)

    gone = set(drops.get("advertise", ())) | set(drops.get("share", ()))
    gone |= set(drops.get("mask", ()))
    assert result.contributors == tuple(d for d in agg.params.participants if d not in gone)
    assert result.ring_sum.dtype == np.uint32
    np.testing.assert_array_equal(result.ring_sum, agg.plain_sum(result.contributors))
    expected = dequantize(agg.plain_sum(result.contributors), agg.params.quantization)
    np.testing.assert_array_equal(result.total, expected)


def test_odd_neighbourhood_and_even_share_counts_work() -> None:
    # k=5 with n=11 is Harary's odd case (one device has 6 neighbours); k=5 with n=12
    # gives share groups of 6, an even share count.
    for n in (11, 12):
        agg = Aggregation.start(n, 16, plus=True, neighbours=5)
        degrees = {len(agg.params.neighbourhood(d)) for d in agg.params.participants}
        assert degrees == ({5, 6} if n == 11 else {5})
        result = agg.run({"mask": [1]})
        np.testing.assert_array_equal(result.ring_sum, agg.plain_sum(result.contributors))


def test_the_sum_of_real_updates_comes_back_within_quantisation_error() -> None:
    rng = np.random.default_rng(3)
    q = Quantization(clip_range=0.5)
    updates = {d: rng.normal(0, 0.1, 1000) for d in range(1, 21)}
    inputs = {d: quantize(u, q, rng) for d, u in updates.items()}
    agg = Aggregation.start(20, 1000, plus=True, inputs=inputs, quantization=q)
    result = agg.run({"mask": [4, 9]})
    plain = sum(np.clip(updates[d], -0.5, 0.5) for d in result.contributors)
    assert np.max(np.abs(result.total - plain)) <= len(result.contributors) / q.scale


def test_encoding_cannot_wrap_for_ten_thousand_devices() -> None:
    q = Quantization()  # clip_range 1, max_devices 10,000
    rng = np.random.default_rng(0)
    for extreme in (1.0, -1.0, 7.5, -7.5):  # beyond the range: clipped
        one = quantize(np.full(4, extreme), q, rng)
        ring = (one.astype(np.uint64) * 10_000 % 2**32).astype(np.uint32)
        np.testing.assert_allclose(dequantize(ring, q), 10_000 * np.sign(extreme))
    assert 10_000 * q.bound <= 2**31 - 1


# -- failure beyond the threshold --------------------------------------------------------------
@pytest.mark.parametrize("plus", [False, True])
@pytest.mark.parametrize("stage", ["mask", "unmask"])
def test_one_dropout_too_many_fails_cleanly(plus: bool, stage: str) -> None:
    agg = Aggregation.start(30, 16, plus=plus, neighbours=8)
    centre, dropped = victims(agg, tolerance(agg) + 1, random.Random(1))
    agg.advertise()
    agg.share()
    if stage == "mask":
        with pytest.raises(AggregationFailed, match="threshold"):
            agg.mask(dropped)
        assert "mask" not in agg.received  # no unmask request went out: nothing revealed
    else:
        agg.mask()
        with pytest.raises(AggregationFailed, match="fewer than"):
            agg.unmask(dropped)
        # The server holds fewer than `threshold` shares of the centre's seed: Shamir hides it.
        shares = sum(
            any(s.owner == centre for s in r.self_mask_shares) for r in agg.sent["unmask"].values()
        )
        assert shares < agg.params.threshold
    assert agg.server.stage == ServerStage.FAILED
    with pytest.raises(Conflict, match="failed"):
        agg.server.finish()


def test_secagg_fails_when_too_few_devices_advertise_or_share() -> None:
    for stage in ("advertise", "share"):
        agg = Aggregation.start(10, 8)
        gone = list(range(1, 10 - agg.params.threshold + 2))  # n - t + 1 devices
        with pytest.raises(AggregationFailed):
            agg.run({stage: gone})
        assert agg.server.stage == ServerStage.FAILED


def test_secagg_plus_leaves_out_a_device_whose_group_is_too_thin_early() -> None:
    # Before any input exists, a device whose group fell under the threshold is left
    # out (its input is never sent), and the others still get their exact sum.
    agg = Aggregation.start(30, 16, plus=True, neighbours=8)
    centre, dropped = victims(agg, tolerance(agg) + 1, random.Random(5))
    result = agg.run({"advertise": dropped})
    assert centre not in result.contributors
    np.testing.assert_array_equal(result.ring_sum, agg.plain_sum(result.contributors))


def test_a_device_never_reveals_both_secrets_of_a_peer() -> None:
    agg = Aggregation.start(10, 8)
    agg.advertise()
    agg.share()
    requests = agg.mask(drop=[3])
    client = agg.clients[1]
    first = client.unmask(requests[1])
    assert client.unmask(requests[1]) == first  # a retried request: same answer
    flipped = UnmaskRequest(
        survivors=[d for d in requests[1].survivors if d != 5],
        dropped=sorted([*requests[1].dropped, 5]),
    )
    with pytest.raises(ProtocolViolation, match="already answered"):
        client.unmask(flipped)


def test_the_device_checks_the_unmask_request() -> None:
    agg = Aggregation.start(10, 8)
    agg.advertise()
    agg.share()
    requests = agg.mask()
    survivors = requests[2].survivors
    bad = [
        UnmaskRequest(survivors=survivors, dropped=[survivors[-1]]),  # both
        UnmaskRequest(survivors=[d for d in survivors if d != 2], dropped=[2]),  # self dropped
        UnmaskRequest(survivors=survivors[:-1], dropped=[]),  # a peer left out
        UnmaskRequest(survivors=[*survivors, survivors[0]], dropped=[]),  # repeated
    ]
    for request in bad:
        with pytest.raises(ProtocolViolation):
            agg.clients[2].unmask(request)
    few = UnmaskRequest(survivors=survivors[:5], dropped=survivors[5:])
    with pytest.raises(AggregationFailed):
        agg.clients[2].unmask(few)
    assert agg.clients[2].unmask(requests[2]).self_mask_shares


# -- what the server sees ----------------------------------------------------------------------
def uniformity_p(words: np.ndarray, bins: int = 64) -> float:
    """Chi-square p-value that uint32 words are uniform, binned on their top bits."""
    counts = np.bincount((words >> np.uint32(32 - 6)).astype(np.int64), minlength=bins)
    return float(stats.chisquare(counts).pvalue)


def test_a_masked_vector_is_indistinguishable_from_uniform() -> None:
    length = 8192
    inputs = {d: np.full(length, d % 2, dtype=np.uint32) for d in range(1, 6)}  # all 0 or 1
    agg = Aggregation.start(5, length, inputs=inputs)
    agg.run()
    masked = np.frombuffer(agg.sent["mask"][1].vector, dtype="<u4")
    # The test has power: the input itself is rejected outright...
    assert uniformity_p(inputs[1]) < 1e-12
    assert (
        uniformity_p(np.abs(np.random.default_rng(0).normal(0, 2**28, length)).astype(np.uint32))
        < 1e-6
    )
    # ...while the masked vector, and masked minus input, pass.
    assert uniformity_p(masked) > 1e-6
    assert uniformity_p(masked - inputs[1]) > 1e-6
    low = np.bincount((masked & np.uint32(63)).astype(np.int64), minlength=64)
    assert stats.chisquare(low).pvalue > 1e-6


def test_no_single_stage_reveals_an_update() -> None:
    length = 4096
    inputs = {d: np.zeros(length, dtype=np.uint32) for d in range(1, 9)}
    agg = Aggregation.start(8, length, inputs=inputs)
    result = agg.run({"mask": [8]})
    target = 1

    # Stage 0: two public keys, made before the update exists.
    adv = agg.sent["advertise"][target]
    assert isinstance(adv, KeyAdvertisement)
    assert len(adv.c_public) == len(adv.s_public) == 32

    # Stage 1: every share the server relays is a ciphertext only its recipient opens.
    shares = agg.sent["share"][target]
    assert isinstance(shares, ShareKeys)
    blob = b"".join(s.ciphertext[12:-16] for s in shares.shares)
    assert stats.chisquare(np.bincount(np.frombuffer(blob, np.uint8), minlength=256)).pvalue > 1e-6
    to_2 = next(s for s in shares.shares if s.recipient == 2)
    third = agg.clients[3]
    with pytest.raises(InvalidShare):  # device 3 cannot open device 1's share for device 2
        third._open(target, to_2.ciphertext)
    with pytest.raises(ValueError):  # nor can anyone holding only public values
        _crypto.decrypt_share(adv.c_public, agg.params.session, target, 2, to_2.ciphertext)

    # Stage 2: the masked vector of an all-zero update is uniform (see above) and not zero.
    masked = np.frombuffer(agg.sent["mask"][target].vector, dtype="<u4")
    assert np.count_nonzero(masked) > length - 5

    # Stage 3: survivors' self-mask seeds and the dropped device's key are revealed,
    # never both secrets of one device...
    revealed_b = {s.owner for r in agg.sent["unmask"].values() for s in r.self_mask_shares}
    revealed_s = {s.owner for r in agg.sent["unmask"].values() for s in r.key_shares}
    assert revealed_b == set(result.contributors) and revealed_s == {8}
    # ...and with the self-mask seed in hand the server still holds the update under the
    # pairwise masks of its surviving peers: uniform, not the (zero) update.
    b_shares = {
        holder: _shamir.decode_element(s.value)
        for holder, r in agg.sent["unmask"].items()
        for s in r.self_mask_shares
        if s.owner == target
    }
    seed = _shamir.reconstruct(b_shares, agg.params.threshold).to_bytes(33, "big")[-32:]
    expander = _crypto.MaskExpander(length)
    residue = masked.copy()
    expander.add(residue, _crypto.self_mask_key(seed, agg.params.session, target), -1)
    assert np.count_nonzero(residue) > length - 5
    assert uniformity_p(residue) > 1e-6


# -- bad input does not poison the round -------------------------------------------------------
def test_bad_keys_are_rejected_and_the_device_can_retry() -> None:
    agg = Aggregation.start(5, 8)
    server, good = agg.server, agg.clients[1].advertise_keys()
    low_order = bytes(32)  # the all-zero point has small order
    bad = [
        KeyAdvertisement(good.c_public[:31], good.s_public),
        KeyAdvertisement(low_order, good.s_public),
        KeyAdvertisement(good.c_public, good.c_public),
    ]
    for message in bad:
        with pytest.raises(InvalidRequest):
            server.receive_keys(1, message)
    with pytest.raises(InvalidRequest, match="not a participant"):
        server.receive_keys(99, good)
    server.receive_keys(1, good)
    server.receive_keys(1, good)  # an identical resend is a no-op
    with pytest.raises(InvalidRequest, match="already advertised"):
        server.receive_keys(2, good)  # someone else's keys
    with pytest.raises(Conflict, match="different"):
        server.receive_keys(1, agg.clients[2].advertise_keys())
    assert server.waiting_for == {2, 3, 4, 5}
    # The round goes on as if nothing happened.
    for d in (2, 3, 4, 5):
        server.receive_keys(d, agg.clients[d].advertise_keys())
    agg.received["advertise"] = server.close_advertise()
    agg.share()
    agg.mask()
    result = agg.unmask()
    np.testing.assert_array_equal(result.ring_sum, agg.plain_sum(range(1, 6)))


def test_bad_shares_are_rejected_and_a_tampered_one_is_ignored_by_its_recipient() -> None:
    agg = Aggregation.start(6, 8)
    rosters = agg.advertise()
    server = agg.server
    good = agg.clients[1].share_keys(rosters[1])
    first = good.shares[0]
    bad = [
        msgspec.structs.replace(good, shares=good.shares[1:]),  # a recipient missing
        msgspec.structs.replace(good, shares=[*good.shares, first]),  # repeated
        msgspec.structs.replace(
            good,
            shares=[
                msgspec.structs.replace(first, ciphertext=first.ciphertext[:-1]),
                *good.shares[1:],
            ],
        ),
        msgspec.structs.replace(
            good, shares=[msgspec.structs.replace(first, recipient=77), *good.shares[1:]]
        ),
        msgspec.structs.replace(good, seed_commitment=b"short"),
    ]
    for message in bad:
        with pytest.raises(InvalidRequest):
            server.receive_shares(1, message)
    # A well-formed ciphertext the server cannot check: flip one bit of the share for 2.
    tampered = [
        msgspec.structs.replace(
            s, ciphertext=s.ciphertext[:20] + bytes([s.ciphertext[20] ^ 1]) + s.ciphertext[21:]
        )
        if s.recipient == 2
        else s
        for s in good.shares
    ]
    server.receive_shares(1, msgspec.structs.replace(good, shares=tampered))
    with pytest.raises(Conflict, match="different"):
        server.receive_shares(1, good)
    for d in range(2, 6):
        server.receive_shares(d, agg.clients[d].share_keys(rosters[d]))
    agg.received["share"] = server.close_sharing()
    with pytest.raises(Conflict, match="not open"):  # device 6, after the stage closed
        server.receive_shares(6, agg.clients[6].share_keys(rosters[6]))
    agg.mask()
    rejected = agg.clients[2].rejected_shares
    assert list(rejected) == [1] and isinstance(rejected[1], InvalidShare)
    assert "authentication failed" in str(rejected[1])
    result = agg.unmask()
    assert result.dropped == ()  # device 6 never counted as sharing
    np.testing.assert_array_equal(result.ring_sum, agg.plain_sum(range(1, 6)))


def test_bad_masked_inputs_are_rejected_and_late_ones_refused() -> None:
    agg = Aggregation.start(6, 8)
    agg.advertise()
    bundles = agg.share()
    server = agg.server
    message = agg.clients[1].masked_input(bundles[1], agg.inputs[1])
    with pytest.raises(InvalidRequest, match="want 32"):
        server.receive_masked_input(1, MaskedInput(message.vector + b"\0\0\0\0"))
    with pytest.raises(InvalidRequest, match="not a participant"):
        server.receive_masked_input(0, message)
    server.receive_masked_input(1, message)
    with pytest.raises(Conflict, match="different"):
        server.receive_masked_input(1, MaskedInput(bytes(32)))
    for d in range(2, 6):
        server.receive_masked_input(d, agg.clients[d].masked_input(bundles[d], agg.inputs[d]))
    agg.received["mask"] = server.close_masking()
    late = agg.clients[6].masked_input(bundles[6], agg.inputs[6])
    with pytest.raises(Conflict, match="not open"):
        server.receive_masked_input(6, late)
    result = agg.unmask()
    assert result.dropped == (6,)
    np.testing.assert_array_equal(result.ring_sum, agg.plain_sum(range(1, 6)))


def test_bad_revealed_shares_are_rejected_whole() -> None:
    agg = Aggregation.start(6, 8)
    agg.advertise()
    agg.share()
    requests = agg.mask(drop=[6])
    server = agg.server
    honest = agg.clients[1].unmask(requests[1])
    wrong = msgspec.structs.replace(honest.self_mask_shares[1], value=_shamir.encode_element(12345))
    bad = [
        msgspec.structs.replace(honest, self_mask_shares=[honest.self_mask_shares[0], wrong]),
        msgspec.structs.replace(honest, key_shares=[RevealedShare(2, honest.key_shares[0].value)]),
        msgspec.structs.replace(
            honest, key_shares=[RevealedShare(6, bytes([255]) * 33)]
        ),  # not a field element
        msgspec.structs.replace(honest, key_shares=honest.key_shares * 2),
    ]
    for message in bad:
        with pytest.raises(InvalidRequest):
            server.receive_unmask(1, message)
    with pytest.raises(Conflict, match="earlier stage"):
        server.receive_unmask(6, UnmaskResponse([], []))
    server.receive_unmask(1, honest)
    for d in range(2, 6):
        server.receive_unmask(d, agg.clients[d].unmask(requests[d]))
    assert server.waiting_for == frozenset()
    result = server.finish()
    np.testing.assert_array_equal(result.ring_sum, agg.plain_sum(range(1, 6)))
    assert server.finish() is result


def test_the_device_checks_the_roster_and_bundle() -> None:
    agg = Aggregation.start(12, 8, plus=True, neighbours=4)
    rosters = agg.advertise()
    me = agg.clients[1]
    stranger = next(d for d in range(2, 13) if d not in me.neighbours)
    peer = rosters[1].peers[0]
    with pytest.raises(ProtocolViolation):  # out of order
        agg.clients[2].masked_input(ShareBundle([]), agg.inputs[2])
    with pytest.raises(ProtocolViolation, match="unexpectedly"):
        me.share_keys(KeyRoster([*rosters[1].peers, PeerKeys(stranger, b"x" * 32, b"y" * 32)]))
    with pytest.raises(ProtocolViolation, match="repeats a public key"):
        me.share_keys(
            KeyRoster([peer, PeerKeys(rosters[1].peers[1].device, peer.c_public, b"z" * 32)])
        )
    with pytest.raises(AggregationFailed):
        me.share_keys(KeyRoster(rosters[1].peers[:1]))
    bundles = agg.share()
    with pytest.raises(ProtocolViolation, match="sender twice"):
        me.masked_input(ShareBundle([*bundles[1].shares, bundles[1].shares[0]]), agg.inputs[1])
    with pytest.raises(ProtocolViolation, match="non-peer"):
        me.masked_input(
            ShareBundle([*bundles[1].shares, RelayedShare(stranger, b"")]), agg.inputs[1]
        )
    with pytest.raises(InvalidInput):
        me.masked_input(bundles[1], agg.inputs[1].astype(np.int64))
    with pytest.raises(InvalidInput):
        me.masked_input(bundles[1], agg.inputs[1][:-1])
    first = me.masked_input(bundles[1], agg.inputs[1])
    assert me.masked_input(bundles[1], agg.inputs[1]) == first  # retry: same message
    with pytest.raises(ProtocolViolation, match="different"):
        me.masked_input(bundles[1], agg.inputs[2])


def test_messages_round_trip_and_garbage_is_an_invalid_request() -> None:
    agg = Aggregation.start(4, 8)
    agg.run()
    for stage in STAGES:
        for message in [*agg.sent[stage].values(), *agg.received.get(stage, {}).values()]:
            assert decode(encode(message), type(message)) == message
    with pytest.raises(InvalidRequest):
        decode(b"\x93garbage", ShareKeys)
    with pytest.raises(InvalidRequest):
        decode(encode(MaskedInput(b"x")), ShareKeys)
    params = decode(encode(agg.params), SecAggParams)
    assert params == agg.params and params.graph() == agg.params.graph()


# -- parameters, graph, Shamir ---------------------------------------------------------------
def test_parameters_refuse_an_unsafe_threshold() -> None:
    ids = list(range(1, 11))
    base = SecAggParams.create(ids, 8)
    for t in (1, 5, 11):  # below 2, half of 10, above the group
        with pytest.raises(InvalidInput, match="threshold"):
            msgspec.structs.replace(base, threshold=t)
    assert msgspec.structs.replace(base, threshold=10).threshold == 10
    with pytest.raises(InvalidInput):
        SecAggParams.create([1, 1, 2], 8)
    with pytest.raises(InvalidInput):
        SecAggParams.create([0, 1, 2], 8)
    with pytest.raises(InvalidInput, match="wrap-around"):
        SecAggParams.create(ids, 8, quantization=Quantization(max_devices=5))
    with pytest.raises(msgspec.ValidationError):
        decode_params = msgspec.msgpack.encode(msgspec.structs.asdict(base) | {"threshold": 1})
        msgspec.msgpack.decode(decode_params, type=SecAggParams)


def test_the_neighbour_graph_is_a_k_connected_regular_graph_fixed_by_the_seed() -> None:
    params = SecAggParams.create(range(1, 201), 8, plus=True, neighbours=10)
    graph = params.graph()
    assert all(len(graph[d]) == 10 and d not in graph[d] for d in graph)
    assert all(d in graph[e] for d in graph for e in graph[d])
    other = SecAggParams.create(range(1, 201), 8, plus=True, neighbours=10)
    assert other.graph() != graph  # a fresh seed, a fresh graph
    rng = random.Random(0)
    for _ in range(20):  # Harary H(k, n) stays connected after any k - 1 removals
        removed = set(rng.sample(range(1, 201), 9))
        alive = set(graph) - removed
        start = next(iter(alive))
        seen, queue = {start}, deque([start])
        while queue:
            for e in graph[queue.popleft()] & alive - seen:
                seen.add(e)
                queue.append(e)
        assert seen == alive


def test_shamir_recovers_from_any_threshold_shares_and_uses_a_prime_field() -> None:
    assert _shamir.PRIME > 2**256 and all(
        pow(a, _shamir.PRIME - 1, _shamir.PRIME) == 1 for a in (2, 3, 5, 7, 11, 13, 17, 19, 23)
    )
    rng = random.Random(2)
    for t in (2, 3, 8, 9, 17):
        secret = rng.getrandbits(256)
        shares = _shamir.split(secret, t, range(1, 3 * t))
        for _ in range(5):
            subset = dict(rng.sample(sorted(shares.items()), t))
            assert _shamir.reconstruct(subset, t) == secret
        fewer = dict(list(shares.items())[: t - 1])
        with pytest.raises(ValueError):
            _shamir.reconstruct(fewer, t)
