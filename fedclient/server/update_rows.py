"""The ``updates`` table: accepted updates, their receipts and idempotency keys, and
their bodies until they are folded into a sum (issue 27: split from `ServerStore`,
which is an `UpdateRows`, with the upload's reads made few).

An upload on a shared database (PostgreSQL) reads what it must know before its
transaction in one statement (`upload_state`: the round, its job, the receipt of the
key, the device's place), where it took four; inside the transaction, one more
(`hold_for_upload`: the round held open, the device's place locked, its earlier
updates), where it took three.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fedclient.server.database import Database
from fedclient.server.round_parts import COUNT_UPDATE
from fedclient.server.schema import JobRow, RoundRow, UpdateRow
from fedclient.server.spool import BodySpool

__all__ = ["UPDATE_COLUMNS", "UPDATE_COLUMNS_NO_BODY", "UpdateRows"]

#: The columns of `UpdateRow`, then where a spooled body is (`fedclient.server.spool`:
#: offset and length in the file of the round and worker).
UPDATE_COLUMNS = (
    "seq, round_id, device_id, idempotency_key, receipt_id, num_examples, train_loss, body,"
    " received_at, staleness, spool_offset, spool_length, worker"
)
#: The same without the body (`UpdateRow.body` None), for callers that need the receipt.
UPDATE_COLUMNS_NO_BODY = UPDATE_COLUMNS.replace("body,", "NULL,").replace(
    "spool_offset, spool_length, worker", "NULL, NULL, NULL"
)
_PRIOR = (
    f"SELECT {UPDATE_COLUMNS_NO_BODY} FROM updates"
    " WHERE device_id=? AND (idempotency_key=? OR round_id=?)"
)
#: `UPDATE_COLUMNS_NO_BODY` of ``updates u`` (in a join).
_UPDATE_COLUMNS_OF_U = ", ".join(
    c if c == "NULL" else "u." + c for c in (c.strip() for c in UPDATE_COLUMNS_NO_BODY.split(","))
)
_ROUND_COLUMNS = (
    "r.round_id, r.job, r.number, r.status, r.model_version, r.opened_at, r.deadline,"
    " r.closed_at, r.reason, r.train_loss"
)
_JOB_COLUMNS = "j.name, j.plan, j.status, j.model_version, j.rounds_completed, j.rounds_failed"


class UpdateRows:
    """The ``updates`` table (see the module docstring)."""

    db: Database
    worker: str
    _spool: BodySpool | None
    _jobs: dict[str, JobRow]
    _rounds: dict[int, RoundRow]
    _update_counts: dict[int, int]
    _updated: dict[int, set[str]]

    def _spooled(self) -> BodySpool:
        raise NotImplementedError

    def _job_row(self, row: Sequence[Any]) -> JobRow:
        raise NotImplementedError

    def is_admitted(self, round_id: int, device_id: str) -> bool:
        raise NotImplementedError

    def count_update(self, round_id: int) -> None:
        raise NotImplementedError

    def counted(self, round_id: int, taken: int, folded: int, everyone: int | None = None) -> None:
        raise NotImplementedError

    def _update_row(self, row: Sequence[Any]) -> UpdateRow:
        """An `UpdateRow` from `UPDATE_COLUMNS`, its body read from the spool if there."""
        values = list(row[:10])
        offset, length, worker = row[10], row[11], row[12]
        if values[7] is None and offset is not None and length is not None:
            values[7] = self._spooled().read(
                int(values[1]), int(offset), int(length), worker=self._spool_name(worker)
            )
        return UpdateRow(*values)

    def _spool_name(self, worker: str | None) -> str:
        """The name of ``worker``'s spool files: none where one process spools (a SQLite
        file), the worker's own where several share a folder (`BodySpool`)."""
        return (worker or "") if self.db.shared else ""

    def upload_state(
        self, round_id: int, device_id: str, key: str
    ) -> tuple[RoundRow, JobRow, UpdateRow | None, bool] | None:
        """In one read: the round, its job, the update the device sent with ``key`` (its
        receipt) and whether the device holds a place in the round; None if there is no
        such round. The round and the job are kept as `round` and `job` keep them."""
        row = self.db.execute(
            f"SELECT {_ROUND_COLUMNS}, {_JOB_COLUMNS},"
            " (SELECT 1 FROM admissions a WHERE a.round_id = r.round_id AND a.device_id = ?),"
            f" {_UPDATE_COLUMNS_OF_U}"
            " FROM rounds r JOIN jobs j ON j.name = r.job"
            " LEFT JOIN updates u ON u.device_id = ? AND u.idempotency_key = ?"
            " WHERE r.round_id = ?",
            [device_id, device_id, key, round_id],
        ).fetchone()
        return self._upload_state(round_id, row) if row is not None else None

    def _upload_state(
        self, round_id: int, row: Sequence[Any]
    ) -> tuple[RoundRow, JobRow, UpdateRow | None, bool]:
        """`upload_state` from its columns (the round's, the job's, the place, the update's),
        the round and the job kept as `round` and `job` keep them."""
        round_ = self._rounds[round_id] = RoundRow(*row[:10])
        job = self._jobs[round_.job] = self._job_row(row[10:16])
        previous = self._update_row(row[17:]) if row[17] is not None else None
        return round_, job, previous, row[16] is not None

    def upload_state_for_token(
        self, round_id: int, token_hash: str, key: str
    ) -> tuple[str, bool, tuple[RoundRow, JobRow, UpdateRow | None, bool] | None] | None:
        """`upload_state` and the device behind a token in one read (before an upload's
        body, on a shared database): the device, whether it is revoked, and the state
        (None if there is no such round); None if no device has the token."""
        row = self.db.execute(
            f"SELECT d.device_id, d.revoked, {_ROUND_COLUMNS}, {_JOB_COLUMNS},"
            " (SELECT 1 FROM admissions a WHERE a.round_id = r.round_id"
            " AND a.device_id = d.device_id),"
            f" {_UPDATE_COLUMNS_OF_U}"
            " FROM devices d"
            " LEFT JOIN rounds r ON r.round_id = ?"
            " LEFT JOIN jobs j ON j.name = r.job"
            " LEFT JOIN updates u ON u.device_id = d.device_id AND u.idempotency_key = ?"
            " WHERE d.token_hash = ?",
            [round_id, key, token_hash],
        ).fetchone()
        if row is None:
            return None
        device_id, revoked, row = str(row[0]), bool(row[1]), row[2:]
        if row[0] is None or row[10] is None:  # no such round (or, damaged, its job)
            return device_id, revoked, None
        return device_id, revoked, self._upload_state(round_id, row)

    def hold_for_upload(
        self, round_id: int, trained_round_id: int, device_id: str, key: str
    ) -> tuple[str | None, bool, UpdateRow | None, bool]:
        """Inside the accepting transaction: the status of the round that takes the
        update, read so that it stays so until the transaction ends (on a shared
        database, a share lock on its row, which a close, `claim_close`, waits for; None
        if there is no such round); whether the device holds a place in the round it
        trained in, read so that its other requests wait until the transaction ends (a
        row lock: one update per device and round, whichever worker each of its
        requests reaches); the update it sent with ``key`` (its receipt); and whether it
        has an update in the round. On a shared database, one statement while the device
        holds its place (the locks taken as the three statements before took them)."""
        if self.db.shared:
            rows = self.db.execute(
                f"SELECT r.status, {_UPDATE_COLUMNS_OF_U} FROM admissions a"
                " JOIN rounds r ON r.round_id = ?"
                " LEFT JOIN updates u ON u.device_id = a.device_id"
                " AND (u.idempotency_key = ? OR u.round_id = ?)"
                " WHERE a.round_id = ? AND a.device_id = ? FOR SHARE OF r FOR UPDATE OF a",
                [round_id, key, round_id, trained_round_id, device_id],
            ).fetchall()
            if not rows:  # no place (or no round): no update of the device matters
                status = self.db.execute(
                    "SELECT status FROM rounds WHERE round_id=? FOR SHARE", [round_id]
                ).fetchone()
                return (str(status[0]) if status else None), False, None, False
            holds = True
            found = [self._update_row(row[1:]) for row in rows if row[1] is not None]
            status = rows[0]
        else:
            status = self.db.execute(
                "SELECT status FROM rounds WHERE round_id=?", [round_id]
            ).fetchone()
            holds = self.is_admitted(trained_round_id, device_id)
            prior = self.db.execute(_PRIOR, [device_id, key, round_id]).fetchall()
            found = [self._update_row(row) for row in prior]
        by_key = next((u for u in found if u.idempotency_key == key), None)
        return (
            str(status[0]) if status else None,
            holds,
            by_key,
            any(u.round_id == round_id for u in found),
        )

    def add_update(
        self,
        round_id: int,
        device_id: str,
        key: str,
        receipt_id: str,
        num_examples: int,
        train_loss: float | None,
        body: bytes,
        now: float,
        staleness: int = 0,
    ) -> UpdateRow:
        """Store an accepted update (the row as stored, without reading it back), and
        count it as this worker's (`RoundParts.count_update`)."""
        stored: bytes | None = body
        offset = None
        if self._spool is not None:
            offset, stored = self._spool.append(round_id, body), None
        insert = (
            "INSERT INTO updates (round_id, device_id, idempotency_key, receipt_id,"
            " num_examples, train_loss, body, received_at, staleness, spool_offset,"
            " spool_length, worker) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING seq"
        )
        values = [
            round_id,
            device_id,
            key,
            receipt_id,
            num_examples,
            train_loss,
            stored,
            now,
            staleness,
            offset,
            None if offset is None else len(body),
            self.worker,
        ]
        if self.db.shared:
            # One round trip: the row, this worker's count of it, and every worker's as
            # this statement found them (its own increment not yet among them). Inside a
            # group that count is the quota's (`ServerStore.update_count`): the others'
            # groups are counted once this one commits (`Uploads.quota_after_commit`).
            row = self.db.execute(
                f"WITH u AS ({insert}) {COUNT_UPDATE}, (SELECT seq FROM u),"
                " (SELECT coalesce(sum(updates), 0) FROM round_parts WHERE round_id=?)",
                [*values, round_id, self.worker, round_id],
            ).fetchall()[0]
            everyone = int(row[3]) + 1 if self.db.in_group else None
            self.counted(round_id, int(row[0]), int(row[1]), everyone)
            seq = row[2]
        else:  # (SQLite: no INSERT inside WITH)
            seq = self.db.execute(insert, values).fetchall()[0][0]
            self.count_update(round_id)
        if round_id in self._update_counts:
            self._update_counts[round_id] += 1
        if round_id in self._updated:
            self._updated[round_id].add(device_id)
        return UpdateRow(
            int(seq),
            round_id,
            device_id,
            key,
            receipt_id,
            num_examples,
            train_loss,
            body,
            now,
            staleness,
        )

    def update_by_key(self, device_id: str, key: str) -> UpdateRow | None:
        """The update a device sent with an idempotency key (its receipt: ``body`` None)."""
        row = self.db.execute(
            f"SELECT {UPDATE_COLUMNS_NO_BODY} FROM updates WHERE device_id=? AND idempotency_key=?",
            [device_id, key],
        ).fetchone()
        return self._update_row(row) if row else None

    def updates(
        self, round_id: int, *, bodies: bool = True, unfolded: bool = False, mine: bool = False
    ) -> list[UpdateRow]:
        """The round's updates, in the order they were received (``bodies=False``: with
        ``body`` None, for a caller that holds them decoded; see `update_body`).
        ``unfolded``: only those whose bodies are still stored (not yet folded into a
        partial sum of the round). ``mine``: only those this worker took."""
        columns = UPDATE_COLUMNS if bodies else UPDATE_COLUMNS_NO_BODY
        where = " AND (body IS NOT NULL OR spool_offset IS NOT NULL)" if unfolded else ""
        params: list[Any] = [round_id]
        if mine:
            where += " AND worker=?"
            params.append(self.worker)
        rows = self.db.execute(
            f"SELECT {columns} FROM updates WHERE round_id=?{where} ORDER BY seq", params
        ).fetchall()
        return [self._update_row(row) for row in rows]

    def first_examples(self, round_id: int, count: int) -> list[int]:
        """The example counts the round's first ``count`` updates claimed, in order."""
        rows = self.db.execute(
            "SELECT num_examples FROM updates WHERE round_id=? ORDER BY seq LIMIT ?",
            [round_id, count],
        ).fetchall()
        return [int(r[0]) for r in rows]

    def update_body(self, seq: int) -> bytes | None:
        """One update's body (None once its round closed)."""
        row = self.db.execute(f"SELECT {UPDATE_COLUMNS} FROM updates WHERE seq=?", [seq]).fetchone()
        body = self._update_row(row).body if row else None
        return bytes(body) if body is not None else None
