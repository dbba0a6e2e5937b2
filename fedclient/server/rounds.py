"""Synchronous rounds with deadlines, as a state machine over the store.

    open --(devices_per_round updates)------------------------> closed (aggregated)
    open --(deadline, >= min_devices updates)------------------> closed (aggregated)
    open --(deadline, fewer than min_devices updates)----------> failed (model kept)

Asynchronous jobs (``mode = "async"``, FedBuff, Nguyen et al. 2022) reuse the same
table with one change: a round is a *buffer* that closes only when it holds
``devices_per_round`` updates, each trained on whatever version was current when
its device checked in and weighted by 1/sqrt(1 + staleness).

Closing a round writes the next model version and opens the next round (or
finishes the job) in the same transaction. Time comes from the caller, so the
simulator can run rounds on a simulated clock.

A device's weight in a mean is capped (``max_weight_ratio``, 4 by default) at that many
times the median example count of the round's first `FOLD_EVERY` updates (every update's,
if the round has fewer): a figure fixed by the time a round first folds, the same for a
restarted server and for every worker, and out of reach of any one device.

Streaming aggregation: with a `MeanStrategy` (fedavg and the server optimisers), once
`FOLD_EVERY` updates a worker took wait, `SyncRounds.fold` adds them to that worker's
partial sum of the round (`RunningSum`, stored in ``round_parts``, one row a worker)
and drops their bodies, in one transaction: an update is in a sum or has its body,
never both, never neither, and no two workers ever write the same row. A round then
holds O(model) a worker plus at most `FOLD_EVERY` bodies a worker, whatever its number
of updates; its close folds what is left (a killed worker's bodies too), adds the
partial sums, and steps from the mean. One worker (a SQLite file) folds in arrival
order, bit for bit as one sum would. A robust strategy (median, trimmed mean) needs
every update at once: its rounds keep every body until the close, and hold them in
memory then.

Closing happens once: the first transaction to claim the round (`ServerStore.
claim_close`, a conditional update) closes it; another that saw the quota at the same
time finds it closed and does nothing.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable

import msgspec
import numpy as np

from fedclient.protocol import JobPlan, Weights, decode_tensors, encode_tensors, split_extras
from fedclient.runtime import bundle_weights, create_backend
from fedclient.server.store import JobRow, RoundRow, ServerStore, UpdateRow
from fedclient.server.strategies import (
    ClientUpdate,
    FedAvg,
    MeanStrategy,
    RunningSum,
    Strategy,
    decode_state,
    encode_state,
    strategy_for,
)

__all__ = ["DECODED_MAX_BYTES", "FOLD_EVERY", "SyncRounds", "initial_weights", "model_etag"]

#: At most this many bytes of accepted updates are held decoded for their round's close.
DECODED_MAX_BYTES = 256 * 1024 * 1024

#: Rounds whose updates a worker holds decoded at once (see `SyncRounds.hold_decoded`).
HELD_ROUNDS = 4

#: A streaming round folds its waiting update bodies into its running sum once this many
#: wait: each fold writes the sum (8 bytes a parameter) once for this many updates.
FOLD_EVERY = 32


def _update(row: UpdateRow, tensors: Weights, cap: int | None = None) -> ClientUpdate:
    """A stored update as its strategy sees it: the delta, and a trainer's extras; its
    example count no more than the round's weight cap (None: uncapped)."""
    delta, extras = split_extras(tensors)
    examples = row.num_examples if not cap else min(row.num_examples, cap)
    return ClientUpdate(row.device_id, examples, delta, row.staleness, extras)


def initial_weights(plan: JobPlan) -> Weights:
    """The job's version-0 model: drawn from the plan's seed, or a bundle's own."""
    if plan.model.kind == "bundle":
        return bundle_weights(plan.model.bundle)
    return create_backend(plan.model, "numpy", seed=plan.job.seed).get_weights()


def model_etag(body: bytes) -> str:
    """A strong ETag for an immutable model body."""
    return '"' + hashlib.sha256(body).hexdigest()[:32] + '"'


class SyncRounds:
    """The round lifecycle of every job in a store, with one aggregation strategy."""

    def __init__(self, store: ServerStore, strategy: Strategy | None = None) -> None:
        self.store = store
        self.strategy = strategy  # overrides every plan's choice when given
        #: Called with (job, "closed" | "failed") when a round ends (the server's metrics).
        self.on_close: Callable[[str, str], None] | None = None
        # Updates as decoded when they were checked on arrival, by receipt id, until their
        # round closes (up to DECODED_MAX_BYTES): the close aggregates them without
        # decoding every body again. A restarted server decodes the stored bodies.
        self._decoded: dict[str, Weights] = {}
        self._decoded_bytes = 0
        self._held_rounds: dict[int, list[str]] = {}  # round -> receipts held, oldest first
        # Each streaming round's running sum as last folded, by round id: a cache of the
        # stored one, used only while its count matches the store's (a fold whose
        # transaction rolled back leaves it ahead; it is then read again).
        self._sums: dict[int, RunningSum] = {}
        # Each round's weight cap, once fixed (its first FOLD_EVERY updates are in).
        self._caps: dict[int, int | None] = {}
        # Each plan's strategy, built once (by its [strategy] table, as JSON).
        self._strategies: dict[bytes, Strategy] = {}

    def forget(self) -> None:
        """Drop every update held decoded and every running sum kept (writes were lost:
        what is left is read from the store again)."""
        self._decoded.clear()
        self._decoded_bytes = 0
        self._held_rounds.clear()
        self._sums.clear()
        self._caps.clear()

    def weight_cap(self, plan: JobPlan, round_id: int) -> int | None:
        """The most examples one update of the round counts for (see the module
        docstring), or None without a cap."""
        ratio = plan.job.max_weight_ratio
        if ratio is None:
            return None
        if round_id in self._caps and not self.store.shared:
            return self._caps[round_id]
        claimed = self.store.first_examples(round_id, FOLD_EVERY)
        cap = max(1, math.floor(ratio * float(np.median(claimed)))) if claimed else None
        if len(claimed) == FOLD_EVERY:  # fixed from now on
            if len(self._caps) >= 1024:
                self._caps.clear()
            self._caps[round_id] = cap
        return cap

    def hold_decoded(self, receipt_id: str, tensors: Weights, round_id: int) -> None:
        """Keep an accepted update's tensors (the decoded body) for the fold or close
        that takes it in: this worker folds the updates it took itself (a close on
        another worker reads the bodies it left). Held for the newest few rounds only:
        a round another worker closed leaves no tensors here for long."""
        held = self._held_rounds.setdefault(round_id, [])
        if len(self._held_rounds) > HELD_ROUNDS:
            for receipt in self._held_rounds.pop(next(iter(self._held_rounds))):
                self.drop_decoded(receipt)
        size = sum(t.nbytes for t in tensors.values())
        if self._decoded_bytes + size <= DECODED_MAX_BYTES:
            self._decoded[receipt_id] = tensors
            self._decoded_bytes += size
            held.append(receipt_id)

    def drop_decoded(self, receipt_id: str) -> Weights | None:
        """Stop holding an update's tensors; return them, if they were held."""
        held = self._decoded.pop(receipt_id, None)
        if held is not None:
            self._decoded_bytes -= sum(t.nbytes for t in held.values())
        return held

    def _decode_stored(self, seq: int) -> Weights:
        """An update not held decoded (over the bound, or from before a restart)."""
        return decode_tensors(self.store.update_body(seq) or b"")[0]

    def strategy_for(self, plan: JobPlan) -> Strategy:
        """The strategy that aggregates this job's rounds."""
        if self.strategy is not None:
            return self.strategy
        key = msgspec.json.encode(plan.strategy)
        built = self._strategies.get(key)
        if built is None:
            built = self._strategies[key] = strategy_for(plan.strategy)
        return built

    def _streaming(self, plan: JobPlan) -> MeanStrategy | None:
        """The job's strategy if its rounds fold updates as they arrive, else None (a
        secure round's server sees only the sum, handed in at the close)."""
        strategy = self.strategy_for(plan)
        if plan.privacy.secagg or not isinstance(strategy, MeanStrategy):
            return None
        return strategy

    def accepted(self, job: JobRow, round_id: int) -> None:
        """After an update is stored: fold this worker's waiting bodies once `FOLD_EVERY`
        wait (streaming strategies only). Call inside the accepting transaction."""
        if self._streaming(job.plan) is None:
            return
        taken, folded = self.store.waiting(round_id)
        if taken - folded >= FOLD_EVERY:
            self.fold(job, round_id)

    def fold(self, job: JobRow, round_id: int, *, everyone: bool = False) -> RunningSum:
        """Fold this worker's waiting updates (``everyone``: every worker's, at the close)
        into its partial sum of the round, in arrival order, and drop their bodies, in
        one transaction; return the partial sum."""
        strategy = self._streaming(job.plan)
        assert strategy is not None
        with self.store.atomic():
            running = self._sums.pop(round_id, None)
            if running is None or running.count != self.store.waiting(round_id)[1]:
                stored = self.store.partial_sum(round_id)  # read only when not kept
                running = RunningSum()
                if stored is not None:
                    running = RunningSum(
                        {k: v.copy() for k, v in decode_tensors(stored[0])[0].items()},
                        stored[1],
                        stored[2],
                    )
            # This worker's updates are held decoded since their upload; another's (at
            # the close) are read from their bodies.
            rows = self.store.updates(round_id, bodies=False, unfolded=True, mine=not everyone)
            cap = self.weight_cap(job.plan, round_id) if rows else None
            for row in rows:
                update = _update(row, self._tensors(row), cap)
                running.add(update.weight, strategy.contribution(update))
            if rows:
                self.store.save_partial_sum(
                    round_id,
                    encode_tensors(running.sums),
                    running.weight,
                    running.count,
                    [r.seq for r in rows],
                )
        self._sums[round_id] = running
        return running

    def create_job(self, plan: JobPlan, now: float) -> None:
        """Register a job with its version-0 model and open its first round."""
        self.strategy_for(plan)  # an unknown strategy is refused before anything is stored
        body = encode_tensors(initial_weights(plan))
        with self.store.atomic():
            self.store.add_job(plan)
            self.store.add_model(plan.job.name, 0, body, model_etag(body), now)
            self.store.open_round(plan.job.name, 1, 0, now, now + plan.job.deadline_seconds)

    def advance(self, now: float) -> bool:
        """Close every round whose quota is met or whose deadline passed; whether any was
        (here, or by another worker meanwhile)."""
        closed = False
        for round_ in self.store.open_rounds():
            job = self.store.job(round_.job)
            assert job is not None
            count = self.store.update_count(round_.round_id)
            if count >= job.plan.job.devices_per_round:
                self.close(job, round_, now, "quota")
                closed = True
            elif now >= round_.deadline and job.plan.job.mode == "sync":
                # An async buffer has no deadline: it closes when it is full.
                self.close(job, round_, now, "deadline")
                closed = True
        return closed

    def _round_sum(self, job: JobRow, round_id: int) -> RunningSum:
        """The round's whole sum, at its close: what is left folded, the partial sums
        of every worker added (by worker name)."""
        self.fold(job, round_id, everyone=True)
        total = RunningSum()
        for body, weight, count in self.store.partial_sums(round_id):
            total.merge(RunningSum(decode_tensors(body)[0], weight, count))
        return total

    def _aggregate(
        self,
        job: JobRow,
        round_: RoundRow,
        rows: list[UpdateRow],
        updates: list[ClientUpdate] | None,
    ) -> tuple[Weights, Weights]:
        """The round's next weights and strategy state: from its running sum (a streaming
        strategy), its stored updates, or ``updates`` (a secure round's sum)."""
        plan = job.plan
        current = self.store.model(job.name, round_.model_version)
        assert current is not None
        base, _ = decode_tensors(current[0])
        held = self.store.strategy_state(job.name)
        state = decode_state(held) if held else {}
        streaming = self._streaming(plan) if updates is None else None
        with np.errstate(over="ignore", invalid="ignore"):  # the caller checks the result
            if streaming is not None:
                return streaming.step(base, self._round_sum(job, round_.round_id).mean(), state)
            if updates is None:
                cap = self.weight_cap(plan, round_.round_id)
                updates = [_update(r, self._tensors(r), cap) for r in rows]
            strategy = FedAvg() if plan.privacy.secagg else self.strategy_for(plan)
            return strategy.aggregate(base, updates, state)

    def _tensors(self, row: UpdateRow) -> Weights:
        """An update's tensors: as held decoded since its upload, else from its body."""
        held = self.drop_decoded(row.receipt_id)
        return held if held is not None else self._decode_stored(row.seq)

    def close(
        self,
        job: JobRow,
        round_: RoundRow,
        now: float,
        why: str,
        updates: list[ClientUpdate] | None = None,
    ) -> bool:
        """Aggregate (or fail) the round, then open the next one or finish the job;
        whether this call closed it (False: it was closed already, by another worker or
        an earlier request).

        ``updates`` replaces the stored ones (a secure round hands in its sum)."""
        plan = job.plan
        with self.store.atomic():
            if not self.store.claim_close(round_.round_id):
                return False
            # From here to the commit, the round's row is this transaction's: every
            # worker's uploads to it wait (and then find it closed).
            claimed = time.perf_counter()
            # The job as it is now: another worker may have closed its previous round
            # since this request read it.
            job = self.store.reread_job(job.name)
            rows = self.store.updates(round_.round_id, bodies=False)
            completed, failed, version = job.rounds_completed, job.rounds_failed, job.model_version
            new_weights: Weights | None = None
            if updates or (updates is None and len(rows) >= plan.job.min_devices):
                new_weights, state = self._aggregate(job, round_, rows, updates)
            for row in rows:
                self.drop_decoded(row.receipt_id)  # a failed round's (the others are used)
            self._sums.pop(round_.round_id, None)
            self._caps.pop(round_.round_id, None)
            if new_weights is not None and not all(
                np.all(np.isfinite(w)) for w in new_weights.values()
            ):
                # Every update was finite and bounded, yet their aggregate is not (an
                # overflow): publishing it would stop every device. The model stays.
                self.store.close_round(
                    round_.round_id, "failed", now, f"{why}: the aggregate is not finite", None
                )
                failed += 1
            elif new_weights is not None:
                body = encode_tensors(new_weights)
                if state:
                    self.store.save_strategy_state(job.name, encode_state(state))
                version = round_.model_version + 1
                self.store.add_model(job.name, version, body, model_etag(body), now)
                losses = [(r.train_loss, r.num_examples) for r in rows if r.train_loss is not None]
                loss = (
                    float(np.average([l_ for l_, _ in losses], weights=[n for _, n in losses]))
                    if losses
                    else None
                )
                self.store.close_round(
                    round_.round_id,
                    "closed",
                    now,
                    f"{why}: {len(rows) or 'one sum of'} updates",
                    loss,
                )
                completed += 1
            else:
                self.store.close_round(
                    round_.round_id,
                    "failed",
                    now,
                    f"{why}: {len(rows)} updates, fewer than min_devices={plan.job.min_devices}",
                    None,
                )
                failed += 1
            finished = round_.number >= plan.job.rounds
            stopped = job.status == "stopped"  # by the operator: no round follows
            self.store.update_job(
                job.name,
                # A paused (or stopped) job stays so while its open round runs out.
                status="finished" if finished and not stopped else job.status,
                model_version=version,
                rounds_completed=completed,
                rounds_failed=failed,
            )
            if not (finished or stopped):
                self.store.open_round(
                    job.name, round_.number + 1, version, now, now + plan.job.deadline_seconds
                )
        self.store.db.held(time.perf_counter() - claimed)
        if self.on_close is not None:
            self.on_close(job.name, "closed" if completed > job.rounds_completed else "failed")
        return True
