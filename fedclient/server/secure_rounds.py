"""Secure aggregation inside a sync round: the server's side of the stages, over HTTP.

When a round whose plan asks for ``secagg`` or ``secagg+`` fills up, its cohort
is fixed and a `SecAggServer` is set up over it. Devices then train as usual
and, instead of uploading their update, walk the stages:

    GET  .../secagg/params       the round's SecAggParams and the device's number
    POST .../secagg/keys         KeyAdvertisement    GET .../secagg/keys         KeyRoster
    POST .../secagg/agree        RosterSignature     GET .../secagg/agree        RosterAgreement
    POST .../secagg/shares       ShareKeys           GET .../secagg/shares       ShareBundle
    POST .../secagg/masked       MaskedInput         GET .../secagg/masked       SurvivorList
    POST .../secagg/consistency  SurvivorSignature   GET .../secagg/consistency  UnmaskRequest
    POST .../secagg/unmask       UnmaskResponse -> the device's receipt

A stage closes when every device still in it has posted. A GET before then is a
425 (too early) that the device answers by waiting. When the unmask stage
closes, the exact ring sum becomes the round's aggregate: devices send
``num_examples * delta`` with ``num_examples`` appended, so the sum divided by
its last coordinate is FedAvg's weighted mean (or, on a rotated grid, weight x
delta and the weight); the server never sees one device's update. Every device
in the cohort must have enrolled with an identity key: the roster carries it
(and its certificate) to its peers. The aggregation's floor is the plan's
``min_devices``, or more: two beyond the colluders the plan assumes
(`secure_floor`).

A secure round's state is a log in the store (``secure_events``): its opening
(parameters and cohort), every message a device posted, and every stage the
clock closed. `SecAggServer` is deterministic, so a worker rebuilds a round by
replaying the log and keeps the result as a cache, brought up to date from the
log's end at each request (under the store's lock, `ServerStore.exclusive`): any
worker of a shared database serves any stage, and a restarted server resumes the
round where it was. The log goes when the round closes.
"""

from __future__ import annotations

import hashlib
import math
import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from fedclient._exceptions import Conflict, Forbidden, NotFound, TooEarly
from fedclient.compression import CompressionSpec
from fedclient.privacy.dp import GaussianMechanism
from fedclient.privacy.secagg import (
    BLOCK,
    BOUND_SIGMAS,
    AggregationFailed,
    KeyAdvertisement,
    MaskedInput,
    Quantization,
    RosterSignature,
    RotatedQuantization,
    SecAggParams,
    ShareKeys,
    SurvivorSignature,
    Tolerance,
    UnmaskResponse,
    assumed_colluders,
    decode,
    dequantize,
    encode,
)
from fedclient.protocol import JobPlan, PrivacySettings, UploadReceipt, Weights
from fedclient.server.secagg import SecAggServer
from fedclient.server.store import ServerStore
from fedclient.server.strategies import ClientUpdate

__all__ = [
    "STAGES",
    "SecureRounds",
    "rotated_encoding",
    "secure_floor",
    "secure_vector_length",
]

STAGES = ("params", "keys", "agree", "shares", "masked", "consistency", "unmask")


def secure_vector_length(weights: Weights) -> int:
    """Ring elements a device sends: every parameter, then its example count."""
    return sum(int(v.size) for v in weights.values()) + 1


def secure_floor(plan: JobPlan, cohort: int) -> int:
    """The fewest contributors a secure round of ``cohort`` devices unmasks: the plan's
    ``min_devices``, and at least two beyond the colluders it assumes. Devices refuse a
    floor under their own (`fedclient.PrivacyPolicy`: ``min_secure_cohort`` beyond the
    colluders they assume), so a plan for devices with default policies sets
    ``min_devices`` to 10 beyond its colluders."""
    colluders = assumed_colluders(cohort, plan.privacy.secagg_colluding)
    return min(cohort, max(plan.job.min_devices, colluders + 2, 2))


def distributed_noise_ratio(privacy: PrivacySettings, shares: int, dimension: int) -> float:
    """About how many grid steps of noise each device adds per level of its values, with
    distributed DP, when ``shares`` honest devices' noise must make the sum's: what the
    ring must be wide enough for. Sized for the replace relation (twice add_remove's
    sensitivity), whatever the plan says, since a device may account that way
    (`fedclient.PrivacyPolicy`)."""
    assert privacy.dp_epsilon is not None
    z = GaussianMechanism.for_release(privacy.dp_epsilon, privacy.dp_delta, 1.0).noise_multiplier
    padded = -(-dimension // BLOCK) * BLOCK
    steps_per_level = math.sqrt(padded) / BOUND_SIGMAS  # clip in grid steps, per level
    return z * 2.0 * steps_per_level / math.sqrt(max(1, shares))


def rotated_encoding(
    plan: JobPlan, cohort: int, weights: Weights, session: bytes
) -> RotatedQuantization | None:
    """The common grid of a compressed (q8, q4) or noised (distributed DP) secure sum,
    or None for the plain 32-bit fixed point. Its rotation's public randomness comes
    from the session."""
    bits = CompressionSpec.parse(plan.job.compression).bits
    p = plan.privacy
    if bits is None and not p.distributed_dp:
        return None
    dimension = sum(int(v.size) for v in weights.values())
    noise_ratio = 0.0
    if p.distributed_dp:
        # Each device sizes its share for the floor's honest devices (the colluders
        # assumed add none): more noise each than min_devices shares would need.
        colluders = assumed_colluders(cohort, p.secagg_colluding)
        shares = secure_floor(plan, cohort) - colluders
        noise_ratio = distributed_noise_ratio(p, shares, dimension)
    return RotatedQuantization.create(
        dimension,
        clip=p.clip,
        max_devices=max(2, cohort),
        seed=hashlib.sha256(b"fedclient/rotation" + session).digest(),
        bits=bits,
        noise_ratio=noise_ratio,
    )


@dataclass
class _SecureRound:
    params: SecAggParams
    server: SecAggServer
    members: dict[str, int]  # device id -> its number in the protocol
    answers: dict[str, dict[int, Any]] = field(default_factory=dict)  # stage -> per device
    receipts: dict[str, UploadReceipt] = field(default_factory=dict)
    stage_seconds: float = 60.0
    stage_deadline: float | None = None  # set when the stage's first message arrives
    applied: int = 0  # the log's events folded in (the last one's seq)


class _Opened(msgspec.Struct, frozen=True):
    """The log's first event: what `SecureRounds.open` fixed."""

    params: bytes  # SecAggParams, encoded
    members: list[str]  # device ids, in their protocol numbers' order
    stage_seconds: float


class SecureRounds:
    """The secure rounds in progress, as their logs in ``store`` say (by round id)."""

    def __init__(self, store: ServerStore, random: Callable[[int], bytes] = os.urandom) -> None:
        self.store = store
        #: Each round as replayed from its log so far (a cache: `_sync` brings it up to date).
        self.rounds: dict[int, _SecureRound] = {}
        #: Where sessions and graphs come from: the OS, except in a simulation that wants
        #: the same report from the same seed (a session is public, so nothing hides).
        self.random = random

    def open(
        self,
        round_id: int,
        plan: JobPlan,
        admitted: dict[str, tuple[bytes, bytes | None]],
        weights: Weights,
    ) -> None:
        """Fix the cohort of a full round and set up its aggregation. Each stage closes when
        every device in it has posted, or ``stage_seconds`` after its first message
        (devices that did not post by then are dropouts the protocol tolerates up to
        its threshold). ``admitted`` maps each device to its identity key and certificate."""
        p = plan.privacy
        members = list(admitted)
        session = self.random(32)
        rotation = rotated_encoding(plan, len(members), weights, session)
        params = SecAggParams.create(
            list(range(1, len(members) + 1)),
            rotation.vector_length if rotation else secure_vector_length(weights),
            plus=p.secagg == "secagg+",
            quantization=Quantization(p.secagg_clip, max_devices=max(2, len(members))),
            session=session,
            rotation=rotation,
            tolerance=Tolerance(
                p.secagg_colluding, p.secagg_dropout, roster_dropout=p.secagg_roster_dropout
            ),
            min_contributors=secure_floor(plan, len(members)),
        )
        opened = _Opened(encode(params), members, p.secagg_stage_seconds)
        self.store.add_secure_event(round_id, "open", "", "", msgspec.msgpack.encode(opened), "", 0)
        self._sync(round_id)

    def _sync(self, round_id: int) -> _SecureRound | None:
        """The round as its log says now (None before its cohort is fixed)."""
        secure = self.rounds.get(round_id)
        for event in self.store.secure_events(round_id, after=secure.applied if secure else 0):
            seq, kind, device, stage, body, receipt, at = event
            if kind == "open":
                secure = self._opened(msgspec.msgpack.decode(body, type=_Opened))
            else:
                assert secure is not None, "a secure round's log starts with its opening"
                if kind == "post":
                    self._receive(round_id, secure, device, stage, body, receipt, at)
                else:  # "close": the clock closed a stage
                    self._close_stage(secure)
            secure.applied = seq
            self.rounds[round_id] = secure
        return secure

    def _opened(self, opened: _Opened) -> _SecureRound:
        params = decode(opened.params, SecAggParams)
        members = {device: i for i, device in enumerate(opened.members, start=1)}
        identities = {}
        for device, number in members.items():
            identity = self.store.device_identity(device)
            assert identity is not None  # checked at admission, never changed after
            identities[number] = identity
        return _SecureRound(
            params, SecAggServer(params, identities), members, stage_seconds=opened.stage_seconds
        )

    def _round(self, round_id: int, device_id: str) -> tuple[_SecureRound, int]:
        secure = self._sync(round_id)
        if secure is None:
            raise TooEarly("the round's cohort is not complete yet", retry_after=1.0)
        if device_id not in secure.members:
            raise Forbidden(f"device is not in round {round_id}'s secure aggregation")
        return secure, secure.members[device_id]

    def fetch(self, round_id: int, device_id: str, stage: str) -> bytes:
        """The server's message of ``stage`` for one device (msgpack)."""
        secure, number = self._round(round_id, device_id)
        if stage == "params":
            return msgspec.msgpack.encode({"params": encode(secure.params), "device": number})
        answer = secure.answers.get(stage, {}).get(number)
        if answer is None:
            raise TooEarly(f"stage {stage!r} has not closed yet", retry_after=1.0)
        return encode(answer)

    def post(
        self,
        round_id: int,
        device_id: str,
        stage: str,
        body: bytes,
        now: float,
    ) -> tuple[UploadReceipt | None, ClientUpdate | None]:
        """Take a device's message; when the last stage closes, return the aggregate.
        Run it in the caller's transaction, with the round's close."""
        secure, _ = self._round(round_id, device_id)
        receipt = secure.receipts.get(device_id)
        receipt_id = receipt.receipt_id if receipt else uuid.uuid4().hex
        try:
            aggregate = self._receive(round_id, secure, device_id, stage, body, receipt_id, now)
            secure.applied = self.store.add_secure_event(
                round_id, "post", device_id, stage, body, receipt_id, now
            )
        except BaseException:
            self.rounds.pop(round_id, None)  # maybe half-applied: replayed from the log
            raise
        if aggregate is not None:
            self.rounds.pop(round_id, None)  # the round closes; its log goes with it
        return secure.receipts.get(device_id), aggregate

    def _receive(
        self,
        round_id: int,
        secure: _SecureRound,
        device_id: str,
        stage: str,
        body: bytes,
        receipt_id: str,
        now: float,
    ) -> ClientUpdate | None:
        """Apply one device's message (its receipt id, if the stage gives one)."""
        server, number = secure.server, secure.members[device_id]
        if stage == "keys":
            server.receive_keys(number, decode(body, KeyAdvertisement))
        elif stage == "agree":
            server.receive_agreement(number, decode(body, RosterSignature))
        elif stage == "shares":
            server.receive_shares(number, decode(body, ShareKeys))
        elif stage == "masked":
            server.receive_masked_input(number, decode(body, MaskedInput))
        elif stage == "consistency":
            server.receive_consistency(number, decode(body, SurvivorSignature))
        elif stage == "unmask":
            server.receive_unmask(number, decode(body, UnmaskResponse))
        else:
            raise NotFound(f"no secure-aggregation stage {stage!r} to post to")
        if stage == "masked" and device_id not in secure.receipts:
            secure.receipts[device_id] = UploadReceipt(receipt_id, round_id, device_id, 0, now)
        if secure.stage_deadline is None:
            secure.stage_deadline = now + secure.stage_seconds
        if server.waiting_for:
            return None
        return self._close_stage(secure)

    def tick(self, now: float) -> dict[int, ClientUpdate | None]:
        """Close the stages whose time is up. Returns the rounds that ended: their aggregate,
        or None where too many devices dropped out (the round fails, nothing revealed).
        Run it in the caller's transaction, with the rounds' close."""
        ended: dict[int, ClientUpdate | None] = {}
        for round_id in self.store.secure_rounds():
            secure = self._sync(round_id)
            if secure is None or secure.stage_deadline is None or now < secure.stage_deadline:
                continue
            try:
                aggregate = self._close_stage(secure)
                closed = self.store.add_secure_event(round_id, "close", "", "", b"", "", now)
                secure.applied = closed
            except AggregationFailed:
                self.rounds.pop(round_id, None)
                ended[round_id] = None
                continue
            except BaseException:
                self.rounds.pop(round_id, None)
                raise
            if aggregate is not None:
                self.rounds.pop(round_id, None)
                ended[round_id] = aggregate
        return ended

    def _close_stage(self, secure: _SecureRound) -> ClientUpdate | None:
        server = secure.server
        secure.stage_deadline = None  # the next stage's clock starts with its first message
        if "keys" not in secure.answers:
            secure.answers["keys"] = server.close_advertise()
        elif "agree" not in secure.answers:
            secure.answers["agree"] = server.close_agreement()
        elif "shares" not in secure.answers:
            secure.answers["shares"] = server.close_sharing()
        elif "masked" not in secure.answers:
            secure.answers["masked"] = server.close_masking()
        elif "consistency" not in secure.answers:
            secure.answers["consistency"] = server.close_consistency()
        else:
            return self._aggregate(secure)
        return None

    def _aggregate(self, secure: _SecureRound) -> ClientUpdate:
        result = secure.server.finish()
        rotation = secure.params.rotation
        if rotation is None:
            total = dequantize(result.ring_sum, secure.params.quantization)
            flat, examples = total[:-1], float(total[-1])
        else:
            flat, examples = rotation.decode(result.ring_sum)
        if examples <= 0:
            raise Conflict("the secure sum holds no examples")
        # The weighted mean update, flat in sorted-name order; the caller gives it shape.
        return ClientUpdate("secagg", max(1, round(examples)), {"flat": flat / examples})
