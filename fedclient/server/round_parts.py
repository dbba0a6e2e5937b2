"""What each worker keeps of a round beside the others (issue 27): the updates it took,
and its partial sum of them (`fedclient.server.rounds`: each worker folds the updates
it took; the close adds the partial sums), one ``round_parts`` row a worker and round,
which no other worker writes. `ServerStore` keeps them (it is a `RoundParts`), in the
same database and transactions as the rest; a round's close drops their bodies and
keeps their counts (`ServerStore.close_round`)."""

from __future__ import annotations

from fedclient.server.database import Database

__all__ = ["COUNT_UPDATE", "RoundParts"]

#: One more update of this worker (round_id, worker) in the round: its counts after it.
COUNT_UPDATE = (
    "INSERT INTO round_parts (round_id, worker, updates) VALUES (?, ?, 1)"
    " ON CONFLICT (round_id, worker) DO UPDATE SET updates = round_parts.updates + 1"
    " RETURNING updates, folded"
)

#: Updates whose bodies one statement drops (a fold drops `FOLD_EVERY` of them; a close may
#: drop thousands: within both engines' limits on a statement's parameters).
_SEQS_A_STATEMENT = 500


class RoundParts:
    """The ``round_parts`` table (see the module docstring)."""

    db: Database
    #: This worker's name among those that share the database (`ServerStore.worker`).
    worker: str
    #: (round, taken, folded) as this worker's last update in the round counted them.
    _waiting: tuple[int, int, int] | None
    #: (round, updates every worker took) as this request's update, taken into its
    #: worker's group, counted them (`counted`): what `taken` reads without another
    #: round trip (the group's uploads are counted again once it commits:
    #: `fedclient.server.uploads.Uploads.quota_after_commit`); forgotten with the
    #: request's other reads (`ServerStore._forget`).
    _taken: tuple[int, int] | None

    def count_update(self, round_id: int) -> None:
        """One more update taken by this worker in the round (and how many wait for its
        next fold, kept for `waiting`)."""
        row = self.db.execute(COUNT_UPDATE, [round_id, self.worker]).fetchall()[0]
        self.counted(round_id, int(row[0]), int(row[1]))

    def counted(self, round_id: int, taken: int, folded: int, everyone: int | None = None) -> None:
        """This worker's counts in the round as `COUNT_UPDATE` returned them (kept for
        `waiting`): a caller that ran it inside a statement of its own says so here;
        ``everyone``: every worker's, as the same statement saw them, kept for `taken`."""
        self._waiting = (round_id, taken, folded)
        self._taken = (round_id, everyone) if everyone is not None else None

    def taken(self, round_id: int) -> int:
        """Updates every worker took in the round."""
        if self._taken is not None and self._taken[0] == round_id:
            return self._taken[1]
        row = self.db.execute(
            "SELECT coalesce(sum(updates), 0) FROM round_parts WHERE round_id=?", [round_id]
        ).fetchone()
        return int(row[0])

    def partial_sum(self, round_id: int) -> tuple[bytes, float, int] | None:
        """This worker's partial sum of the round as stored: its body, total weight and
        update count (None before its first fold)."""
        row = self.db.execute(
            "SELECT body, weight, folded FROM round_parts"
            " WHERE round_id=? AND worker=? AND body IS NOT NULL",
            [round_id, self.worker],
        ).fetchone()
        return (bytes(row[0]), float(row[1]), int(row[2])) if row else None

    def partial_sums(self, round_id: int) -> list[tuple[bytes, float, int]]:
        """Every worker's partial sum of the round (body, weight, count), by worker."""
        rows = self.db.execute(
            "SELECT body, weight, folded FROM round_parts"
            " WHERE round_id=? AND body IS NOT NULL ORDER BY worker",
            [round_id],
        ).fetchall()
        return [(bytes(r[0]), float(r[1]), int(r[2])) for r in rows]

    def waiting(self, round_id: int) -> tuple[int, int]:
        """This worker's updates in the round: taken, and folded into its partial sum."""
        if self._waiting is not None and self._waiting[0] == round_id:
            return self._waiting[1], self._waiting[2]  # as its last update counted them
        row = self.db.execute(
            "SELECT updates, folded FROM round_parts WHERE round_id=? AND worker=?",
            [round_id, self.worker],
        ).fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def round_sum_count(self, round_id: int) -> int:
        """How many updates the round's partial sums hold (0 before its first fold)."""
        row = self.db.execute(
            "SELECT coalesce(sum(folded), 0) FROM round_parts WHERE round_id=?", [round_id]
        ).fetchone()
        return int(row[0])

    def save_partial_sum(
        self, round_id: int, body: bytes, weight: float, count: int, folded: list[int]
    ) -> None:
        """Store this worker's partial sum of the round and drop the bodies of the updates
        (``folded``, their seqs) it now holds: in the caller's transaction, so each is
        counted once."""
        self.db.execute(
            "INSERT INTO round_parts (round_id, worker, body, weight, folded)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (round_id, worker)"
            " DO UPDATE SET body = excluded.body, weight = excluded.weight,"
            " folded = excluded.folded",
            [round_id, self.worker, body, weight, count],
        )
        self._waiting = None
        for start in range(0, len(folded), _SEQS_A_STATEMENT):  # one statement, not one each
            seqs = folded[start : start + _SEQS_A_STATEMENT]
            self.db.execute(
                "UPDATE updates SET body=NULL, spool_offset=NULL, spool_length=NULL"
                f" WHERE seq IN ({', '.join('?' * len(seqs))})",
                seqs,
            )
