"""Secure aggregation against a malicious server: the attacks of issue 14 (findings 1, 2).

The test plays the server. Each attack was found to recover a device's exact quantised
input before the devices checked what the server relays; each now ends with the target
aborting, having sent nothing the server could unmask.
"""

from __future__ import annotations

import os

import msgspec
import numpy as np
import pytest

from fedclient.identity import IdentityAuthority, SigningKey
from fedclient.privacy.secagg import (
    AggregationFailed,
    InvalidShare,
    KeyRoster,
    PeerKeys,
    ProtocolViolation,
    RelayedShare,
    SecAggClient,
    SecAggParams,
    ShareBundle,
    SurvivorList,
    UnmaskRequest,
    Vouch,
    crypto,
)
from tests.privacy.harness import Aggregation


def _server_entry(device: int, session: bytes, signer: SigningKey, cert: bytes) -> PeerKeys:
    """A key advertisement the server makes up for ``device``, with keys it holds."""
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    c = X25519PrivateKey.generate().public_key().public_bytes_raw()
    s = X25519PrivateKey.generate().public_key().public_bytes_raw()
    signature = signer.sign(crypto.advertisement_message(session, device, c, s))
    return PeerKeys(device, c, s, signature, signer.public, cert)


def test_key_substitution_aborts_before_anything_is_encrypted_to_the_server() -> None:
    # Finding 1: the server put its own keys in the target's roster for every peer, got
    # every share the target encrypted, and unmasked its input (n=5, t=3).
    agg = Aggregation.start(5, 16, colluding_fraction=0.2)
    rosters = agg.advertise()
    target = agg.clients[1]
    honest = {p.device: p for p in rosters[1].peers}
    session = agg.params.session
    attacker = SigningKey()  # the server's own identity key
    attempts = {
        # its keys under the peer's identity and signature: the signature fails
        "not signed by its identity": lambda d: msgspec.structs.replace(
            _server_entry(d, session, attacker, b""),
            identity_key=honest[d].identity_key,
            certificate=honest[d].certificate,
        ),
        # its keys under its own identity key: no certificate from the pinned authority
        "not certified": lambda d: _server_entry(d, session, attacker, bytes(64)),
        # ...nor from an authority of its own making
        "not certified ": lambda d: _server_entry(
            d, session, attacker, IdentityAuthority().certify(attacker.public)
        ),
    }
    for reason, forge in attempts.items():
        forged = [honest[1], *(forge(d) for d in (2, 3, 4, 5))]
        with pytest.raises(ProtocolViolation, match=reason.strip()):
            target.agree(KeyRoster(forged))
        assert target.stage == "agree"  # nothing signed, no share encrypted, to anyone
        assert "agree" not in target._sent and "share" not in target._sent


def test_undecryptable_shares_make_the_target_abort_before_masking() -> None:
    # Finding 1, second half: a bundle of random bytes was enough to make the target send
    # its masked input (shares that failed to decrypt still counted as mask peers).
    agg = Aggregation.start(5, 16)
    agg.advertise()
    bundles = agg.share()
    target = agg.clients[1]
    junk = ShareBundle(
        [RelayedShare(s.sender, os.urandom(len(s.ciphertext))) for s in bundles[1].shares]
    )
    with pytest.raises(InvalidShare):
        target.masked_input(junk, agg.inputs[1])
    assert target.stage == "mask" and "mask" not in target._sent  # no masked input exists


def _inconsistent_views(
    agg: Aggregation, victim: int, colluder: int
) -> tuple[dict[int, list[int]], dict[int, Exception | object]]:
    """The server tells half the devices the victim dropped and the other half it
    survived; the colluder signs both lists. Returns each honest device's answer."""
    agg.advertise()
    agg.share()
    agg.mask()  # everyone, the victim included, sent a masked input
    everyone = sorted(agg.clients)
    without = [d for d in everyone if d != victim]
    shown = {d: (without if d % 2 == 0 else everyone) for d in everyone if d != colluder}
    signed: dict[int, bytes] = {}
    for d, listed in shown.items():
        if d == victim and victim not in listed:
            continue
        signed[d] = agg.clients[d].consistency(SurvivorList(listed)).signature
    context = agg.server.context
    colluder_key = agg.signers[colluder]
    answers: dict[int, Exception | object] = {}
    for d, listed in shown.items():
        vouches = [Vouch(e, signed[e]) for e in sorted(signed) if shown[e] == listed]
        vouches.append(
            Vouch(colluder, colluder_key.sign(crypto.survivors_message(context, listed)))
        )
        try:
            answers[d] = agg.clients[d].unmask(
                UnmaskRequest(listed, sorted(vouches, key=lambda v: v.device))
            )
        except ProtocolViolation as exc:
            answers[d] = exc
    return shown, answers


@pytest.mark.parametrize("n", [5, 9])
def test_inconsistent_views_with_a_colluding_device_recover_nothing(n: int) -> None:
    # Finding 2: showing devices different dropout sets, with one colluding device,
    # recovered an input at the default threshold (no consistency round, no signatures).
    agg = Aggregation.start(n, 16, colluding_fraction=0.2)
    victim, colluder = 1, n
    shown, answers = _inconsistent_views(agg, victim, colluder)
    # Had the devices answered, the attack would work: those told the victim survived
    # (and the victim itself) reveal shares of its self-mask seed, those told it dropped
    # shares of its mask key, the colluder both, and each side reaches the threshold.
    t = agg.params.threshold
    assert sum(victim in listed for listed in shown.values()) + 1 >= t
    assert sum(victim not in listed for listed in shown.values()) + 1 >= t
    # No list gathers a quorum of signatures: every honest device refuses to unmask.
    for d, answer in answers.items():
        assert isinstance(answer, ProtocolViolation), (d, answer)
        assert "signed the contributor list" in str(answer)
    # So the server holds, of the victim's self-mask seed and of its mask key, only what
    # the colluder knows: one share each, under the threshold. Shamir hides both.
    assert agg.params.threshold > 1
    revealed = [a for a in answers.values() if not isinstance(a, Exception)]
    assert revealed == []


def test_a_consistent_view_still_unmasks_with_the_same_colluder() -> None:
    # The check costs nothing when the server is honest: the same devices, one colluding,
    # one dropped before masking, get their exact sum.
    agg = Aggregation.start(9, 16, colluding_fraction=0.2)
    agg.advertise()
    agg.share()
    agg.mask(drop=[4])
    agg.consistency()
    result = agg.unmask()
    assert result.dropped == (4,)
    np.testing.assert_array_equal(result.ring_sum, agg.plain_sum(result.contributors))


def test_a_small_or_short_sum_is_refused_on_the_device() -> None:
    # Devices refuse cohorts under their minimum, and contributor lists shorter than it:
    # a server cannot shrink a sum to one device's input by calling the others dropped.
    agg = Aggregation.start(6, 16, min_contributors=5)
    agg.advertise()
    agg.share()
    lists = agg.mask(drop=[2, 3])
    with pytest.raises(AggregationFailed, match="unmasks sums of 5"):
        agg.clients[1].consistency(lists[1])
    # A floor the server announces under what the device wants is refused up front.
    params = SecAggParams.create(range(1, 13), 8, min_contributors=11)
    with pytest.raises(ProtocolViolation, match="floor of at least 13"):
        SecAggClient(params, 1, SigningKey(), min_honest=10, trust_server_identities=True)
