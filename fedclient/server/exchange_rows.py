"""What devices send a round beyond single uploads: each secure round's log (its opening,
every device's message, every stage the clock closed: `fedclient.server.secure_rounds`
replays it) and chunked uploads (sessions and their parts, until the last chunk makes
an update). `ServerStore` keeps them (it is an `ExchangeRows`); a round's close drops
both (`ServerStore.close_round`)."""

from __future__ import annotations

from fedclient.server.database import Database
from fedclient.server.schema import SessionRow

__all__ = ["ExchangeRows"]


class ExchangeRows:
    """The ``secure_events``, ``upload_sessions`` and ``upload_parts`` tables."""

    db: Database

    # -- secure aggregation ----------------------------------------------------
    def add_secure_event(
        self,
        round_id: int,
        kind: str,
        device: str,
        stage: str,
        body: bytes,
        receipt: str,
        at: float,
    ) -> int:
        """Append to a secure round's log (`fedclient.server.secure_rounds`); its seq."""
        row = self.db.execute(
            "INSERT INTO secure_events VALUES (?, (SELECT coalesce(max(seq), 0) + 1 FROM"
            " secure_events WHERE round_id = ?), ?, ?, ?, ?, ?, ?) RETURNING seq",
            [round_id, round_id, kind, device, stage, body, receipt, at],
        ).fetchall()[0]
        return int(row[0])

    def secure_events(
        self, round_id: int, *, after: int = 0
    ) -> list[tuple[int, str, str, str, bytes, str, float]]:
        """A secure round's log after event ``after``: (seq, kind, device, stage, body,
        receipt, at) each, in order."""
        rows = self.db.execute(
            "SELECT seq, kind, device, stage, body, receipt, at FROM secure_events"
            " WHERE round_id=? AND seq > ? ORDER BY seq",
            [round_id, after],
        ).fetchall()
        return [(int(r[0]), r[1], r[2], r[3], bytes(r[4]), r[5], float(r[6])) for r in rows]

    def secure_rounds(self) -> list[int]:
        """The open rounds that have a secure-aggregation log."""
        rows = self.db.execute(
            "SELECT DISTINCT e.round_id FROM secure_events e JOIN rounds r"
            " ON r.round_id = e.round_id WHERE r.status = 'open' ORDER BY e.round_id"
        ).fetchall()
        return [int(r[0]) for r in rows]

    # -- chunked uploads -------------------------------------------------------
    def add_session(self, session: SessionRow) -> None:
        """Open a chunked upload."""
        self.db.execute(
            "INSERT INTO upload_sessions VALUES (?, ?, ?, ?, ?, ?)",
            [
                session.device_id,
                session.upload_id,
                session.round_id,
                session.size,
                session.sha256,
                session.offset,
            ],
        )

    def open_sessions(self, device_id: str, round_id: int) -> int:
        """How many chunked uploads ``device_id`` has open in ``round_id``."""
        row = self.db.execute(
            "SELECT count(*) FROM upload_sessions WHERE device_id=? AND round_id=?",
            [device_id, round_id],
        ).fetchone()
        return int(row[0])

    def session(self, device_id: str, upload_id: str) -> SessionRow | None:
        """A chunked upload by its id."""
        row = self.db.execute(
            "SELECT * FROM upload_sessions WHERE device_id=? AND upload_id=?",
            [device_id, upload_id],
        ).fetchone()
        return SessionRow(*row) if row else None

    def add_part(self, session: SessionRow, data: bytes) -> None:
        """Append a chunk at the session's offset."""
        self.db.execute(
            "INSERT INTO upload_parts VALUES (?, ?, ?, ?)",
            [session.device_id, session.upload_id, session.offset, data],
        )
        self.db.execute(
            'UPDATE upload_sessions SET "offset"=? WHERE device_id=? AND upload_id=?',
            [session.offset + len(data), session.device_id, session.upload_id],
        )

    def assemble(self, session: SessionRow) -> bytes:
        """The bytes received so far, in order."""
        rows = self.db.execute(
            'SELECT data FROM upload_parts WHERE device_id=? AND upload_id=? ORDER BY "offset"',
            [session.device_id, session.upload_id],
        ).fetchall()
        return b"".join(bytes(r[0]) for r in rows)

    def drop_session(self, session: SessionRow) -> None:
        """Forget a chunked upload and its bytes."""
        for table in ("upload_parts", "upload_sessions"):
            self.db.execute(
                f"DELETE FROM {table} WHERE device_id=? AND upload_id=?",
                [session.device_id, session.upload_id],
            )
