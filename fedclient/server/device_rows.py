"""The server's devices: enrolment (token hashes, identity keys and certificates),
revocation, single-use enrolment codes, and who took part in a job. `ServerStore` keeps
them (it is a `DeviceRows`), in the same database and transactions as the rest."""

from __future__ import annotations

import time

from fedclient.server.database import Database

__all__ = ["DeviceRows"]


class DeviceRows:
    """The ``devices`` and ``enrolment_codes`` tables (see the module docstring)."""

    db: Database

    def add_device(
        self,
        device_id: str,
        token_hash: str,
        label: str,
        identity_key: bytes | None = None,
        certificate: bytes | None = None,
    ) -> bool:
        """Register an enrolled device (with its identity key, and a certificate of it);
        False if a device holds the token already (enrolled meanwhile)."""
        rows = self.db.execute(
            "INSERT INTO devices (device_id, token_hash, label, created, identity_key,"
            " certificate) VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (token_hash) DO NOTHING"
            " RETURNING device_id",
            [device_id, token_hash, label, time.time(), identity_key, certificate],
        ).fetchall()
        return bool(rows)

    def set_device_identity(
        self, device_id: str, identity_key: bytes, certificate: bytes | None
    ) -> None:
        """Register the identity key of a device that enrolled without one (never replaces)."""
        self.db.execute(
            "UPDATE devices SET identity_key=?, certificate=? WHERE device_id=?"
            " AND identity_key IS NULL",
            [identity_key, certificate, device_id],
        )

    def device_identity(self, device_id: str) -> tuple[bytes, bytes | None] | None:
        """A device's identity key and its certificate, if it registered a key."""
        row = self.db.execute(
            "SELECT identity_key, certificate FROM devices WHERE device_id=?", [device_id]
        ).fetchone()
        if not row or row[0] is None:
            return None
        return bytes(row[0]), bytes(row[1]) if row[1] is not None else None

    def device_by_token(self, token_hash: str) -> tuple[str, bool] | None:
        """The device whose token hashes to ``token_hash``, and whether it is revoked."""
        row = self.db.execute(
            "SELECT device_id, revoked FROM devices WHERE token_hash=?", [token_hash]
        ).fetchone()
        return (str(row[0]), bool(row[1])) if row else None

    def device_for_token(self, token_hash: str) -> str | None:
        """The (not revoked) device whose token hashes to ``token_hash``."""
        found = self.device_by_token(token_hash)
        return found[0] if found and not found[1] else None

    def revoke_device(self, device_id: str) -> bool:
        """Revoke a device: its token stops working. False if there is no such device."""
        cursor = self.db.execute("UPDATE devices SET revoked=1 WHERE device_id=?", [device_id])
        return cursor.rowcount > 0

    def add_enrolment_codes(self, code_hashes: list[str], now: float) -> None:
        """Store the hashes of newly issued single-use enrolment codes."""
        self.db.executemany(
            "INSERT INTO enrolment_codes (code_hash, issued) VALUES (?, ?)",
            [(h, now) for h in code_hashes],
        )

    def use_enrolment_code(self, code_hash: str, device_id: str) -> bool:
        """Spend a code on ``device_id``; False if it was never issued or is spent."""
        cursor = self.db.execute(
            "UPDATE enrolment_codes SET used_by=? WHERE code_hash=? AND used_by IS NULL",
            [device_id, code_hash],
        )
        return cursor.rowcount > 0

    def participation(self, job: str) -> list[tuple[str, str, int, int, float | None, bool]]:
        """Per device that took part in ``job``: id, label, rounds admitted to, updates
        sent, when it last took part, and whether it is revoked."""
        rows = self.db.execute(
            "SELECT d.device_id, d.label, count(DISTINCT a.round_id),"
            " (SELECT count(*) FROM updates u JOIN rounds r2 ON r2.round_id = u.round_id"
            "  WHERE u.device_id = d.device_id AND r2.job = ?),"
            " max(a.admitted_at), d.revoked"
            " FROM devices d JOIN admissions a ON a.device_id = d.device_id"
            " JOIN rounds r ON r.round_id = a.round_id WHERE r.job = ?"
            " GROUP BY d.device_id ORDER BY d.device_id",
            [job, job],
        ).fetchall()
        return [(str(r[0]), str(r[1] or ""), int(r[2]), int(r[3]), r[4], bool(r[5])) for r in rows]
