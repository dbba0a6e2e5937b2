"""Secure aggregation: exact sums under dropouts, clean failure, and what the server can see."""

from __future__ import annotations

import random
from collections import deque

import msgspec
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from scipy import stats

from fedclient import Conflict, InvalidInput, InvalidRequest
from fedclient.identity import SigningKey
from fedclient.privacy.secagg import (
    AggregationFailed,
    InvalidShare,
    KeyAdvertisement,
    KeyRoster,
    MaskedInput,
    ProtocolViolation,
    Quantization,
    RelayedShare,
    RevealedShare,
    SecAggClient,
    SecAggParams,
    ShareBundle,
    ShareKeys,
    SurvivorList,
    Tolerance,
    UnmaskRequest,
    UnmaskResponse,
    Vouch,
    choose,
    crypto,
    decode,
    dequantize,
    encode,
    quantize,
    shamir,
    signature_quorum,
    sparse_threshold,
)
from fedclient.server.secagg import ServerStage
from tests.privacy.harness import STAGES, Aggregation

# (n, SecAgg+?, neighbours): SecAgg+ at n=3 is the complete graph; k=4 at n=10 makes
# groups of 5 (an odd size), the default k=20 at n=100 groups of 21.
CONFIGS: list[tuple[int, bool, int | None]] = [(3, False, None), (10, False, None)]
CONFIGS += [(100, False, None)]
CONFIGS += [(3, True, 2), (10, True, 4), (100, True, None)]


def tolerance(agg: Aggregation) -> int:
    """How many devices of one share group may drop: smallest group minus threshold, and
    no more than leave enough signers of the contributor list (a majority, here)."""
    n = len(agg.params.participants)
    signers = n - signature_quorum(n, 0)
    return min(agg.params.group_sizes[0] - agg.params.threshold, signers)


def victims(agg: Aggregation, count: int, rng: random.Random) -> tuple[int, list[int]]:
    """A device and ``count`` of its neighbours: dropping them strains its group most.
    The graph exists once the roster does: call after `Aggregation.advertise`."""
    centre = rng.choice(sorted(agg.server.graph))
    return centre, rng.sample(sorted(agg.server.graph[centre]), count)


# -- exactness ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("n", "plus", "k"), CONFIGS)
@pytest.mark.parametrize("stage", [*STAGES, "spread"])
def test_secure_sum_is_bit_exact_with_dropouts_up_to_the_threshold(
    n: int, plus: bool, k: int | None, stage: str
) -> None:
    agg = Aggregation.start(n, 24, plus=plus, neighbours=k, seed=n)
    rng = random.Random(n * 7 + len(stage))
    later = STAGES[1:]  # the graph is laid over the devices that advertised
    if stage == "advertise":  # who never advertises is simply not in the graph
        drops = {"advertise": rng.sample(agg.params.participants, tolerance(agg))}
        agg.advertise(drops["advertise"])
    else:
        agg.advertise()
        _, dropped = victims(agg, tolerance(agg), rng)
        if stage == "spread":  # the tolerated dropouts spread over every later stage
            drops = {s: dropped[i :: len(later)] for i, s in enumerate(later)}
        else:
            drops = {stage: dropped}
    agg.share(drops.get("share", ()))
    agg.mask(drops.get("mask", ()))
    agg.consistency(drops.get("consistency", ()))
    result = agg.unmask(drops.get("unmask", ()))

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
        agg = Aggregation.start(n, 16, plus=True, neighbours=5, threshold=4)
        agg.advertise()
        degrees = {len(agg.server.graph[d]) for d in agg.params.participants}
        assert degrees == ({5, 6} if n == 11 else {5})
        agg.share()
        agg.mask([1])
        agg.consistency()
        result = agg.unmask()
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
    # A majority threshold, so one dropout too many shows at the threshold, not first
    # at the signature quorum (a majority too, with no colluders assumed).
    agg = Aggregation.start(30, 16, plus=plus, neighbours=8, threshold=5 if plus else 16)
    agg.advertise()
    centre, dropped = victims(agg, tolerance(agg) + 1, random.Random(1))
    agg.share()
    if stage == "mask":
        with pytest.raises(AggregationFailed, match="threshold"):
            agg.mask(dropped)
        assert "mask" not in agg.received  # no contributor list went out: nothing revealed
    else:
        agg.mask()
        agg.consistency()
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
    agg = Aggregation.start(30, 16, plus=True, neighbours=8, threshold=5)
    agg.advertise()
    centre, dropped = victims(agg, tolerance(agg) + 1, random.Random(5))
    agg.share(dropped)
    assert centre not in agg.received["share"]  # no bundle: it never masks
    agg.mask()
    agg.consistency()
    result = agg.unmask()
    assert centre not in result.contributors
    np.testing.assert_array_equal(result.ring_sum, agg.plain_sum(result.contributors))


def test_a_device_signs_one_contributor_list_and_unmasks_only_that_one() -> None:
    agg = Aggregation.start(10, 8)
    agg.advertise()
    agg.share()
    lists = agg.mask(drop=[3])
    client = agg.clients[1]
    signed = client.consistency(lists[1])
    assert client.consistency(lists[1]) == signed  # a retried request: same answer
    with pytest.raises(ProtocolViolation, match="already answered"):
        client.consistency(SurvivorList([d for d in lists[1].contributors if d != 5]))
    requests = agg.consistency()
    first = client.unmask(requests[1])
    assert client.unmask(requests[1]) == first
    # Another list, whatever its signatures: the device never reveals a second set of shares.
    other = UnmaskRequest([d for d in requests[1].contributors if d != 5], requests[1].signatures)
    with pytest.raises(ProtocolViolation, match="already answered"):
        client.unmask(other)


def test_the_device_checks_the_contributor_list() -> None:
    agg = Aggregation.start(10, 8, min_contributors=7)
    agg.advertise()
    agg.share(drop=[9])  # device 9 never shared: no one masked with it
    lists = agg.mask()
    listed = lists[2].contributors
    assert 9 not in listed
    bad = [
        SurvivorList(listed[::-1]),  # not sorted
        SurvivorList([d for d in listed if d != 2]),  # this device left out
        SurvivorList(sorted([*listed, 11])),  # a device that never advertised
        SurvivorList(sorted([*listed, 9])),  # a neighbour that never shared with it
    ]
    for survivors in bad:
        with pytest.raises(ProtocolViolation):
            agg.clients[2].consistency(survivors)
    with pytest.raises(AggregationFailed, match="unmasks sums of 7"):
        agg.clients[2].consistency(SurvivorList(listed[:6]))
    assert agg.clients[2].stage == "consistency"  # nothing signed yet
    agg.clients[2].consistency(lists[2])


def test_the_device_checks_the_unmask_request() -> None:
    agg = Aggregation.start(10, 8)
    agg.advertise()
    agg.share()
    agg.mask()
    requests = agg.consistency()
    request, client = requests[2], agg.clients[2]
    vouches = request.signatures
    forged = Vouch(vouches[0].device, bytes(64))
    bad = [
        UnmaskRequest(request.contributors[:-1], vouches),  # not the list it signed
        UnmaskRequest(request.contributors, [forged, *vouches[1:]]),  # a forged signature
        UnmaskRequest(request.contributors, [*vouches, vouches[0]]),  # a signature twice
        UnmaskRequest(request.contributors, vouches[:5]),  # five of ten: no majority
        UnmaskRequest(  # device 4's signature passed off as device 3's
            request.contributors,
            [Vouch(3, vouches[3].signature), *(v for v in vouches if v.device != 3)],
        ),
    ]
    for candidate in bad:
        with pytest.raises(ProtocolViolation):
            client.unmask(candidate)
    assert client.unmask(request).self_mask_shares


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
        crypto.decrypt_share(adv.c_public, agg.server.context, target, 2, to_2.ciphertext)

    # Stage 2: the masked vector of an all-zero update is uniform (see above) and not zero.
    masked = np.frombuffer(agg.sent["mask"][target].vector, dtype="<u4")
    assert np.count_nonzero(masked) > length - 5

    # Stage 4: survivors' self-mask seeds and the dropped device's key are revealed,
    # never both secrets of one device...
    revealed_b = {s.owner for r in agg.sent["unmask"].values() for s in r.self_mask_shares}
    revealed_s = {s.owner for r in agg.sent["unmask"].values() for s in r.key_shares}
    assert revealed_b == set(result.contributors) and revealed_s == {8}
    # ...and with the self-mask seed in hand the server still holds the update under the
    # pairwise masks of its surviving peers: uniform, not the (zero) update.
    b_shares = {
        holder: shamir.decode_element(s.value)
        for holder, r in agg.sent["unmask"].items()
        for s in r.self_mask_shares
        if s.owner == target
    }
    seed = shamir.reconstruct(b_shares, agg.params.threshold).to_bytes(33, "big")[-32:]
    expander = crypto.MaskExpander(length)
    residue = masked.copy()
    expander.add(residue, crypto.self_mask_key(seed, agg.server.context, target), -1)
    assert np.count_nonzero(residue) > length - 5
    assert uniformity_p(residue) > 1e-6


# -- bad input does not poison the round -------------------------------------------------------
def test_bad_keys_are_rejected_and_the_device_can_retry() -> None:
    agg = Aggregation.start(5, 8)
    server, good = agg.server, agg.clients[1].advertise_keys()
    low_order = bytes(32)  # the all-zero point has small order
    bad = [
        msgspec.structs.replace(good, c_public=good.c_public[:31]),
        msgspec.structs.replace(good, c_public=low_order),
        msgspec.structs.replace(good, s_public=good.c_public),
        msgspec.structs.replace(good, signature=bytes(64)),  # not its identity's signature
        msgspec.structs.replace(good, s_public=agg.clients[2].advertise_keys().s_public),
    ]
    for message in bad:
        with pytest.raises(InvalidRequest):
            server.receive_keys(1, message)
    with pytest.raises(InvalidRequest, match="not a participant"):
        server.receive_keys(99, good)
    server.receive_keys(1, good)
    server.receive_keys(1, good)  # an identical resend is a no-op
    with pytest.raises(InvalidRequest, match="not signed"):
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
    agg.consistency()
    result = agg.unmask()
    np.testing.assert_array_equal(result.ring_sum, agg.plain_sum(range(1, 6)))


def test_bad_shares_are_rejected_and_a_tampered_one_stops_its_recipient() -> None:
    agg = Aggregation.start(6, 8)
    agg.advertise()
    agreements = agg.agree()
    server = agg.server
    good = agg.clients[1].share_keys(agreements[1])
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
        server.receive_shares(d, agg.clients[d].share_keys(agreements[d]))
    agg.received["share"] = server.close_sharing()
    with pytest.raises(Conflict, match="not open"):  # device 6, after the stage closed
        server.receive_shares(6, agg.clients[6].share_keys(agreements[6]))
    # Device 2 cannot open device 1's share: its keys were signed, so only tampering
    # explains it. It masks nothing and drops out; the others go on without it.
    with pytest.raises(InvalidShare, match="authentication failed"):
        agg.clients[2].masked_input(agg.received["share"][2], agg.inputs[2])
    assert 2 not in agg.clients[2]._sent.get("mask", {})
    agg.mask(drop=[2])
    agg.consistency()
    result = agg.unmask()
    assert result.dropped == (2,)  # device 6 never counted as sharing
    np.testing.assert_array_equal(result.ring_sum, agg.plain_sum([1, 3, 4, 5]))


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
    agg.consistency()
    result = agg.unmask()
    assert result.dropped == (6,)
    np.testing.assert_array_equal(result.ring_sum, agg.plain_sum(range(1, 6)))


def test_bad_revealed_shares_are_rejected_whole() -> None:
    agg = Aggregation.start(6, 8)
    agg.advertise()
    agg.share()
    agg.mask(drop=[6])
    requests = agg.consistency()
    server = agg.server
    honest = agg.clients[1].unmask(requests[1])
    wrong = msgspec.structs.replace(honest.self_mask_shares[1], value=shamir.encode_element(12345))
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
    roster = rosters[1]
    entry = {p.device: p for p in roster.peers}
    with pytest.raises(ProtocolViolation):  # out of order
        agg.clients[2].masked_input(ShareBundle([]), agg.inputs[2])
    stranger = msgspec.structs.replace(entry[2], device=13)
    own = entry[1]
    bad = {
        "unexpectedly": [*roster.peers, stranger],  # a device not in the aggregation
        "repeats a public key": [
            msgspec.structs.replace(p, s_public=entry[2].s_public) if p.device == 3 else p
            for p in roster.peers
        ],
        "repeats an identity": [
            msgspec.structs.replace(p, identity_key=entry[2].identity_key) if p.device == 3 else p
            for p in roster.peers
        ],
        "not signed": [  # device 3's keys swapped for others, its signature kept
            msgspec.structs.replace(
                p, c_public=X25519PrivateKey.generate().public_key().public_bytes_raw()
            )
            if p.device == 3
            else p
            for p in roster.peers
        ],
        "not certified": [
            msgspec.structs.replace(p, certificate=bytes(64)) if p.device == 3 else p
            for p in roster.peers
        ],
        "leaves this device out": [p for p in roster.peers if p.device != 1],
        "device 1's keys are not signed": [  # its own entry altered
            msgspec.structs.replace(own, c_public=entry[2].c_public) if p.device == 1 else p
            for p in roster.peers
        ],
    }
    for reason, peers in bad.items():
        with pytest.raises(ProtocolViolation, match=reason):
            me.agree(KeyRoster(peers))
    assert me.stage == "agree"  # nothing signed, nothing encrypted to anyone
    bundles = agg.share()
    stranger_id = next(d for d in range(2, 13) if d not in me.neighbours)
    with pytest.raises(ProtocolViolation, match="sender twice"):
        me.masked_input(ShareBundle([*bundles[1].shares, bundles[1].shares[0]]), agg.inputs[1])
    with pytest.raises(ProtocolViolation, match="non-peer"):
        me.masked_input(
            ShareBundle([*bundles[1].shares, RelayedShare(stranger_id, b"")]), agg.inputs[1]
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
    assert decode(encode(agg.params), SecAggParams) == agg.params


# -- parameters, graph, Shamir ---------------------------------------------------------------
def test_parameters_refuse_an_unsafe_threshold() -> None:
    ids = list(range(1, 11))
    base = SecAggParams.create(ids, 8)
    assert base.threshold == 3  # more than the 2 colluders of 10 (20%) hold
    for t in (1, 11):  # below 2, above the group
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
    # Few neighbours are safe only if every share of the group is needed: no dropout
    # is tolerated (the colluders among k neighbours hold at most k of k + 1 shares).
    for k in (2, 4, 8):
        assert SecAggParams.create(range(1, 101), 8, plus=True, neighbours=k).threshold == k + 1


def test_a_device_refuses_a_threshold_its_colluders_could_reach() -> None:
    # A server announcing a threshold of 2 for 10 devices: two colluders would rebuild
    # any device's secrets. A device that assumes 20% colluding wants 3.
    params = SecAggParams.create(range(1, 11), 8, threshold=2, min_contributors=5)
    trusting = {"trust_server_identities": True}
    with pytest.raises(ProtocolViolation, match="wants at least 3"):
        SecAggClient(params, 1, SigningKey(), colluding_fraction=0.2, **trusting)
    SecAggClient(params, 1, SigningKey(), colluding_fraction=0.1, **trusting)  # one: fine
    # An absolute bound holds however small the cohort: 2 colluders of 10 reach 2.
    with pytest.raises(ProtocolViolation, match="wants at least 3"):
        SecAggClient(
            params, 1, SigningKey(), colluding_fraction=0.1, colluding_devices=2, **trusting
        )


@pytest.mark.parametrize(("n", "expected"), [(100, (None, 21)), (1000, (244, 111))])
def test_neighbours_and_threshold_follow_the_tolerances(
    n: int, expected: tuple[int | None, int]
) -> None:
    # Bell et al. 2020's conditions at 20% colluding, 30% dropout, 2^-40 both ways, in a
    # roster that may lose 10% of the devices before it forms (the colluders stay).
    assert choose(n) == expected
    k, t = expected
    if k is not None:
        roster, share = int(0.9 * n), 0.2 * n / int(0.9 * n)
        # Security in that roster: roster * P[Bin(k, share) >= t] <= 2^-40 (and in the
        # whole one, where the colluders' share is smaller); correctness: P[Bin(k, 0.7) < t].
        tail = stats.binom.sf(t - 1, k, share) * roster
        short = stats.binom.cdf(t - 1, k, 0.7) * n
        assert tail <= 2**-40 and short <= 2**-40
        assert stats.binom.sf(t - 2, k, share) * roster > 2**-40  # one lower: not safe
        # k is the fewest: one neighbour fewer, its safe threshold fails correctness.
        fewer = sparse_threshold(n, k - 1, Tolerance())
        assert stats.binom.cdf(fewer - 1, k - 1, 0.7) * n > 2**-40
        # Without the roster's shrinking, Bell et al.'s figures at exactly 20%.
        assert choose(n, Tolerance(roster_dropout=0.0)) == (218, 96)
    else:
        assert t == 21 and int(0.7 * n) >= t
    params = SecAggParams.create(range(1, n + 1), 8, plus=True)
    assert (params.neighbours, params.threshold) == expected
    with pytest.raises(InvalidInput, match="cannot tolerate"):
        choose(20, Tolerance(colluding=0.4, dropout=0.6))


def test_a_sparse_threshold_holds_in_every_roster_the_tolerance_allows() -> None:
    # Devices check the threshold against the roster they are shown: a SecAgg+ round
    # whose roster lost up to 10% of its devices goes on, and one that lost more is
    # refused by the devices (the colluders would be too large a share of it).
    n = 1000
    params = SecAggParams.create(range(1, n + 1), 8, plus=True, min_contributors=210)
    assert params.threshold == 111
    client = SecAggClient(params, 1, SigningKey(), trust_server_identities=True, min_honest=10)
    for roster in (1000, 950, 900):
        client._check_cohort(roster)
    with pytest.raises(ProtocolViolation, match="within their reach"):
        client._check_cohort(890)


def test_the_neighbour_graph_is_a_k_connected_regular_graph_fixed_by_the_seed() -> None:
    params = SecAggParams.create(range(1, 201), 8, plus=True, neighbours=10)
    graph = params.graph_for(range(1, 201), b"a" * 32)
    assert all(len(graph[d]) == 10 and d not in graph[d] for d in graph)
    assert all(d in graph[e] for d in graph for e in graph[d])
    assert params.graph_for(range(1, 201), b"b" * 32) != graph  # another roster, another graph
    assert params.graph_for(range(1, 201), b"a" * 32) == graph
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


def test_the_graph_comes_from_the_whole_signed_roster() -> None:
    # Each device lays the graph from a hash of every advertisement, fresh keys included:
    # the server cannot choose it, and device and server agree on it.
    agg = Aggregation.start(40, 8, plus=True, neighbours=6)
    agg.advertise()
    agg.share()
    for d, client in agg.clients.items():
        assert client.neighbours == agg.server.graph[d]
    again = Aggregation.start(40, 8, plus=True, neighbours=6)
    again.advertise()
    assert again.server.graph != agg.server.graph


def test_shamir_recovers_from_any_threshold_shares_and_uses_a_prime_field() -> None:
    assert shamir.PRIME > 2**256 and all(
        pow(a, shamir.PRIME - 1, shamir.PRIME) == 1 for a in (2, 3, 5, 7, 11, 13, 17, 19, 23)
    )
    rng = random.Random(2)
    for t in (2, 3, 8, 9, 17):
        secret = rng.getrandbits(256)
        shares = shamir.split(secret, t, range(1, 3 * t))
        for _ in range(5):
            subset = dict(rng.sample(sorted(shares.items()), t))
            assert shamir.reconstruct(subset, t) == secret
        fewer = dict(list(shares.items())[: t - 1])
        with pytest.raises(ValueError):
            shamir.reconstruct(fewer, t)
