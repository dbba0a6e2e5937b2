"""What a job learns: its model versions (immutable once written), its strategy's
memory, the privacy budget devices report spending, and what devices measured of a
round's model (federated evaluation). `ServerStore` keeps them (it is a
`ModelRows`), in the same database and transactions as the rest."""

from __future__ import annotations

from fedclient.server.database import Database

__all__ = ["ModelRows"]


class ModelRows:
    """The ``models``, ``strategy_state``, ``privacy_spent`` and ``evaluations`` tables."""

    db: Database

    def add_model(self, job: str, version: int, body: bytes, etag: str, now: float) -> None:
        """Store a model version (immutable once written)."""
        self.db.execute(
            "INSERT INTO models VALUES (?, ?, ?, ?, ?)", [job, version, body, etag, now]
        )

    def model(self, job: str, version: int) -> tuple[bytes, str] | None:
        """A model version's (body, etag)."""
        row = self.db.execute(
            "SELECT body, etag FROM models WHERE job=? AND version=?", [job, version]
        ).fetchone()
        return (bytes(row[0]), str(row[1])) if row else None

    def strategy_state(self, job: str) -> bytes | None:
        """The job's strategy memory (momentum, moments), if it has any."""
        row = self.db.execute("SELECT body FROM strategy_state WHERE job=?", [job]).fetchone()
        return bytes(row[0]) if row else None

    def save_strategy_state(self, job: str, body: bytes) -> None:
        """Keep the job's strategy memory."""
        self.db.execute(
            "INSERT INTO strategy_state VALUES (?, ?)"
            " ON CONFLICT (job) DO UPDATE SET body = excluded.body",
            [job, body],
        )

    def record_privacy_spent(self, job: str, device_id: str, epsilon: float) -> None:
        """What a device reports it has spent on the job (local DP)."""
        self.db.execute(
            "INSERT INTO privacy_spent VALUES (?, ?, ?) ON CONFLICT (job, device_id)"
            " DO UPDATE SET epsilon = CASE WHEN excluded.epsilon > privacy_spent.epsilon"
            " THEN excluded.epsilon ELSE privacy_spent.epsilon END",
            [job, device_id, epsilon],
        )

    def privacy_spent(self, job: str) -> dict[str, float]:
        """The fleet's budget use: devices, and the most and mean epsilon they spent."""
        row = self.db.execute(
            "SELECT count(*), max(epsilon), avg(epsilon) FROM privacy_spent WHERE job=?", [job]
        ).fetchone()
        if not row or not row[0]:
            return {}
        return {
            "devices": float(row[0]),
            "max_epsilon": float(row[1]),
            "mean_epsilon": float(row[2]),
        }

    def add_evaluation(
        self, round_id: int, device_id: str, correct: int, loss_sum: float, examples: int
    ) -> None:
        """Record what a device measured of the round's model (once per device)."""
        self.db.execute(
            "INSERT INTO evaluations VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
            [round_id, device_id, correct, loss_sum, examples],
        )

    def evaluation(self, round_id: int) -> tuple[int, int, float, int]:
        """The round's federated evaluation: devices, correct, loss sum, examples."""
        row = self.db.execute(
            "SELECT count(*), sum(correct), sum(loss_sum), sum(examples) FROM evaluations"
            " WHERE round_id=?",
            [round_id],
        ).fetchone()
        return int(row[0]), int(row[1] or 0), float(row[2] or 0.0), int(row[3] or 0)
