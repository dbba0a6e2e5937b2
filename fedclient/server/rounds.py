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
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import numpy as np

from fedclient.protocol import JobPlan, Weights, decode_tensors, encode_tensors
from fedclient.runtime import bundle_weights, create_backend
from fedclient.server.store import JobRow, RoundRow, ServerStore
from fedclient.server.strategies import ClientUpdate, FedAvg, Strategy, strategy_for

__all__ = ["DECODED_MAX_BYTES", "SyncRounds", "initial_weights", "model_etag"]

#: At most this many bytes of accepted updates are held decoded for their round's close.
DECODED_MAX_BYTES = 256 * 1024 * 1024


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

    def hold_decoded(self, receipt_id: str, tensors: Weights) -> None:
        """Keep an accepted update's tensors (the decoded body) for its round's close."""
        size = sum(t.nbytes for t in tensors.values())
        if self._decoded_bytes + size <= DECODED_MAX_BYTES:
            self._decoded[receipt_id] = tensors
            self._decoded_bytes += size

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
        return self.strategy or strategy_for(plan.strategy)

    def create_job(self, plan: JobPlan, now: float) -> None:
        """Register a job with its version-0 model and open its first round."""
        self.strategy_for(plan)  # an unknown strategy is refused before anything is stored
        body = encode_tensors(initial_weights(plan))
        with self.store.atomic():
            self.store.add_job(plan)
            self.store.add_model(plan.job.name, 0, body, model_etag(body), now)
            self.store.open_round(plan.job.name, 1, 0, now, now + plan.job.deadline_seconds)

    def advance(self, now: float) -> bool:
        """Close every round whose quota is met or whose deadline passed; whether any was."""
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

    def close(
        self,
        job: JobRow,
        round_: RoundRow,
        now: float,
        why: str,
        updates: list[ClientUpdate] | None = None,
    ) -> None:
        """Aggregate (or fail) the round, then open the next one or finish the job.

        ``updates`` replaces the stored ones (a secure round hands in its sum)."""
        plan = job.plan
        with self.store.atomic():
            rows = self.store.updates(round_.round_id, bodies=False)
            completed, failed, version = job.rounds_completed, job.rounds_failed, job.model_version
            decoded = [self.drop_decoded(r.receipt_id) for r in rows]  # whatever happens next
            if updates or (updates is None and len(rows) >= plan.job.min_devices):
                current = self.store.model(job.name, round_.model_version)
                assert current is not None
                base, _ = decode_tensors(current[0])
                if updates is None:
                    updates = [
                        ClientUpdate(
                            r.device_id,
                            r.num_examples,
                            tensors if tensors is not None else self._decode_stored(r.seq),
                            r.staleness,
                        )
                        for r, tensors in zip(rows, decoded, strict=True)
                    ]
                held = self.store.strategy_state(job.name)
                state = decode_tensors(held)[0] if held else {}
                strategy = FedAvg() if job.plan.privacy.secagg else self.strategy_for(plan)
                with np.errstate(over="ignore", invalid="ignore"):  # checked just below
                    new_weights, state = strategy.aggregate(base, updates, state)
            if updates and not all(np.all(np.isfinite(w)) for w in new_weights.values()):
                # Every update was finite and bounded, yet their aggregate is not (an
                # overflow): publishing it would stop every device. The model stays.
                self.store.close_round(
                    round_.round_id, "failed", now, f"{why}: the aggregate is not finite", None
                )
                failed += 1
            elif updates:
                body = encode_tensors(new_weights)
                if state:
                    self.store.save_strategy_state(job.name, encode_tensors(state))
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
        if self.on_close is not None:
            self.on_close(job.name, "closed" if completed > job.rounds_completed else "failed")
