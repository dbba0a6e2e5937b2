"""The device's memory: identity, round progress, held model and receipts, in SQLite.

Each step of the job loop ends in one transaction (`Database.atomic`), so a
crash at any line leaves the state of the step before or the step after,
never a mix. Many virtual devices may share one database file: every row is
keyed by the device ``key``.
"""

from __future__ import annotations

import secrets
import sqlite3
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import msgspec
import sqlite_utils

from fedclient._exceptions import StateError
from fedclient._sqlite import SharedDatabase, lock_of, opening
from fedclient.protocol import ModelSpec, RoundPlan, UploadReceipt

__all__ = ["DeviceState", "Identity", "Phase", "RoundProgress"]

#: Each schema version's statements, applied in order to bring an older file up to date.
MIGRATIONS: dict[int, list[str]] = {
    1: [
        "CREATE TABLE identities (key TEXT, server TEXT, device_id TEXT, token TEXT,"
        " PRIMARY KEY (key, server))",
        "CREATE TABLE progress (key TEXT, job TEXT, phase TEXT, plan TEXT,"
        " idempotency_key TEXT, update_body BLOB, updated_at REAL, PRIMARY KEY (key, job))",
        "CREATE TABLE models (key TEXT, job TEXT, version INTEGER, etag TEXT,"
        " body BLOB, PRIMARY KEY (key, job))",
        "CREATE TABLE receipts (key TEXT, job TEXT, round_id INTEGER, receipt TEXT,"
        " PRIMARY KEY (key, job, round_id))",
    ],
    2: [  # the bytes of a model download received so far, so a broken download resumes
        "CREATE TABLE download_parts (key TEXT, job TEXT, version INTEGER, etag TEXT,"
        " offset INTEGER, data BLOB, PRIMARY KEY (key, job, version, offset))",
    ],
    3: [  # what the device learned of its own training speed
        "CREATE TABLE speed (key TEXT PRIMARY KEY, examples_per_second REAL)",
    ],
    4: [  # what compression left out of past updates (error feedback)
        "CREATE TABLE residuals (key TEXT, job TEXT, body BLOB, PRIMARY KEY (key, job))",
    ],
    5: [  # the device's identity key (Ed25519) and an authority's certificate of it
        "CREATE TABLE signing_keys (key TEXT PRIMARY KEY, private BLOB NOT NULL, certificate BLOB)",
    ],
    6: [  # the architecture of the held model: it predicts after a restart, with no plan
        "ALTER TABLE models ADD COLUMN spec TEXT",
    ],
    7: [  # the example store's generation an update or residual was computed at: a forget
        # since then makes them models of forgotten examples (`ExampleStore.generation`)
        "ALTER TABLE progress ADD COLUMN data_generation INTEGER",
        "ALTER TABLE residuals ADD COLUMN data_generation INTEGER",
    ],
}
SCHEMA_VERSION = max(MIGRATIONS)

#: A client trainer's state is kept as the residual of job NAME + this (a job's name
#: cannot hold "/": `fedclient.protocol.JobSettings`).
TRAINER_STATE = "/trainer"

#: The connections this process found at (or brought to) `SCHEMA_VERSION`: a state
#: opened again on one of them does not ask again (a simulator wakes each of its
#: devices on a connection it shares with a hundred others).
_CURRENT: weakref.WeakSet[sqlite_utils.Database] = weakref.WeakSet()

# A device's row of a job is written in place (an upsert, not INSERT OR REPLACE's delete
# and insert, which frees a held body's pages and takes new ones: a third of the write).
_PROGRESS_UPSERT = (
    " ON CONFLICT (key, job) DO UPDATE SET phase = excluded.phase, plan = excluded.plan,"
    " idempotency_key = excluded.idempotency_key, update_body = excluded.update_body,"
    " updated_at = excluded.updated_at, data_generation = excluded.data_generation"
)
_HOLD_MODEL = (
    "INSERT INTO models (key, job, version, etag, body, spec) VALUES (?, ?, ?, ?, ?, ?)"
    " ON CONFLICT (key, job) DO UPDATE SET version = excluded.version,"
    " etag = excluded.etag, body = excluded.body, spec = excluded.spec"
)


class Phase(StrEnum):
    """Where a device stands in its current round."""

    IDLE = "idle"  # no round in hand: check in next
    ADMITTED = "admitted"  # holds a round plan: download the model next
    DOWNLOADED = "downloaded"  # holds the round's model: train next
    TRAINED = "trained"  # holds the update and its idempotency key: upload next


@dataclass(frozen=True)
class Identity:
    """The device's enrolment at one server."""

    device_id: str
    token: str


@dataclass(frozen=True)
class RoundProgress:
    """The stored progress through one round."""

    phase: Phase
    plan: RoundPlan | None = None
    idempotency_key: str | None = None
    update: bytes | None = None
    #: The example store's generation the update was trained at (None: arrays, or a
    #: state older than schema 7).
    data_generation: int | None = None


def apply_migrations(
    db: sqlite_utils.Database,
    migrations: dict[int, list[str]],
    version: int,
    what: str,
    program: str,
) -> None:
    """Bring ``db`` from schema ``version`` to the newest of ``migrations`` (in the caller's
    transaction), and record it in its ``meta`` table; `StateError` if the file is newer
    than this ``program`` knows."""
    newest = max(migrations)
    if version > newest:
        raise StateError(
            f"{what} schema {version} is newer than this {program} ({newest}); upgrade fedclient"
        )
    for target in range(version + 1, newest + 1):
        for statement in migrations.get(target, []):
            db.execute(statement)
    db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(newest)])


@contextmanager
def transaction(db: sqlite_utils.Database, forget: Callable[[], None]) -> Iterator[None]:
    """``db.atomic()`` for an object that keeps in memory what it last wrote: when the
    block rolls back, ``forget`` drops that, and the next reads go to the database."""
    try:
        with db.atomic():
            yield
    except BaseException:
        forget()
        raise


class DeviceState:
    """SQLite state of one device (``key``) in a database file it may share with others.

    One DeviceState at a time drives a key (a process opens it when the app starts):
    it keeps what it last wrote of the round's progress in memory. Opened from a path
    (or `in_memory`), it may be used from any thread (`fedclient._sqlite`); given an
    open `sqlite_utils.Database`, from the thread that database belongs to."""

    def __init__(self, db: str | Path | sqlite_utils.Database, key: str = "device") -> None:
        if isinstance(db, sqlite_utils.Database):
            self.db = db
        else:
            with opening(db):
                Path(db).parent.mkdir(parents=True, exist_ok=True)
                self.db = SharedDatabase(db)
                self.db.enable_wal()
                # FULL: each step's commit reaches the disk before the step's effect (an
                # upload, a privacy charge) can leave the device, so even a power cut
                # cannot roll back a charge for an update that was sent. A few fsyncs a round.
                self.db.execute("PRAGMA synchronous=FULL")
        self.key = key
        # Held while a read fills the caches below, so a reader on another thread cannot
        # put back a value a writer just replaced.
        self._lock = lock_of(self.db)
        # An enrolment never changes once stored, and every step needs it: read it once.
        self._identities: dict[str, Identity] = {}
        # The round progress and held model version last written or read, per job. One
        # DeviceState drives a device key at a time (its steps could not interleave
        # anyway), so they are what the file holds; a transaction that rolls back drops
        # them (`atomic`), and the next read goes to the file.
        self._progress: dict[str, RoundProgress] = {}
        self._held: dict[str, tuple[int, str] | None] = {}
        with opening(db) if not isinstance(db, sqlite_utils.Database) else nullcontext():
            self._migrate()

    @classmethod
    def in_memory(cls, key: str = "device") -> DeviceState:
        """A state that lives only as long as the process (tests, throwaway runs)."""
        return cls(SharedDatabase(None), key)

    def atomic(self) -> AbstractContextManager[None]:
        """One transaction: all of the block's writes or none (nested: a savepoint)."""
        return transaction(self.db, self._forget)

    def _forget(self) -> None:
        self._progress.clear()
        self._held.clear()

    def _schema_version(self) -> int:
        try:
            row = self.db.execute("SELECT value FROM meta WHERE name='schema_version'").fetchone()
        except sqlite3.OperationalError:  # no meta table yet: a new file
            return 0
        return int(row[0]) if row else 0

    def _migrate(self) -> None:
        if self.db in _CURRENT:
            return
        if self._schema_version() == SCHEMA_VERSION:
            _CURRENT.add(self.db)
            return  # the common case (and many devices may share a file): no write
        with self.db.atomic():
            self.db.execute("CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT)")
            apply_migrations(self.db, MIGRATIONS, self._schema_version(), "state", "fedclient")
        _CURRENT.add(self.db)

    # -- identity --------------------------------------------------------------
    def identity(self, server: str) -> Identity | None:
        """The stored enrolment at ``server``, if it completed."""
        known = self._identities.get(server)
        if known is not None:
            return known
        with self._lock:
            row = self.db.execute(
                "SELECT device_id, token FROM identities WHERE key=? AND server=?",
                [self.key, server],
            ).fetchone()
            if not row or not row[0]:
                return None
            identity = self._identities[server] = Identity(row[0], row[1])
            return identity

    def enrolment_token(self, server: str) -> str:
        """The token this device proposes to ``server``: made once, stored before use."""
        with self.atomic():
            row = self.db.execute(
                "SELECT token FROM identities WHERE key=? AND server=?", [self.key, server]
            ).fetchone()
            if row:
                return str(row[0])
            token = secrets.token_urlsafe(32)  # 256 bits from the OS CSPRNG
            self.db.execute(
                "INSERT INTO identities VALUES (?, ?, '', ?)", [self.key, server, token]
            )
            return token

    def save_identity(self, server: str, identity: Identity) -> None:
        """Remember an enrolment."""
        with self.atomic():
            self.db.execute(
                "INSERT OR REPLACE INTO identities VALUES (?, ?, ?, ?)",
                [self.key, server, identity.device_id, identity.token],
            )
            self._identities[server] = identity

    def signing_key(self) -> bytes:
        """The device's Ed25519 identity key (raw private bytes): made once, from the OS
        CSPRNG, and kept; every server the device enrols at learns its public half."""
        row = self.db.execute("SELECT private FROM signing_keys WHERE key=?", [self.key]).fetchone()
        if row:
            return bytes(row[0])
        from fedclient.identity import SigningKey

        private = SigningKey().private_bytes()
        with self.atomic():
            self.db.execute(
                "INSERT OR IGNORE INTO signing_keys (key, private) VALUES (?, ?)",
                [self.key, private],
            )
        return self.signing_key()  # whichever key won, should two writers race

    def identity_certificate(self) -> bytes | None:
        """An identity authority's certificate of this device's identity key, if given."""
        row = self.db.execute(
            "SELECT certificate FROM signing_keys WHERE key=?", [self.key]
        ).fetchone()
        return bytes(row[0]) if row and row[0] is not None else None

    def set_identity_certificate(self, certificate: bytes) -> None:
        """Keep an authority's certificate of the identity key (`fedclient.IdentityAuthority`)."""
        self.signing_key()
        with self.atomic():
            self.db.execute(
                "UPDATE signing_keys SET certificate=? WHERE key=?", [certificate, self.key]
            )

    # -- round progress --------------------------------------------------------
    def progress(self, job: str) -> RoundProgress:
        """Where the device stands in ``job``."""
        known = self._progress.get(job)
        if known is not None:
            return known
        with self._lock:
            row = self.db.execute(
                "SELECT phase, plan, idempotency_key, update_body, data_generation FROM progress"
                " WHERE key=? AND job=?",
                [self.key, job],
            ).fetchone()
            if row is None:
                progress = RoundProgress(Phase.IDLE)
            else:
                plan = msgspec.json.decode(row[1], type=RoundPlan) if row[1] else None
                progress = RoundProgress(Phase(row[0]), plan, row[2], row[3], row[4])
            self._progress[job] = progress
            return progress

    def phase(self, job: str) -> Phase:
        """Where the device stands in ``job``, without reading the plan or the update."""
        known = self._progress.get(job)
        if known is not None:
            return known.phase
        row = self.db.execute(
            "SELECT phase FROM progress WHERE key=? AND job=?", [self.key, job]
        ).fetchone()
        return Phase(row[0]) if row else Phase.IDLE

    def update_size(self, job: str) -> int:
        """Bytes of the trained update waiting for upload (0 if none), without reading it."""
        known = self._progress.get(job)
        if known is not None:
            return len(known.update or b"")
        row = self.db.execute(
            "SELECT length(update_body) FROM progress WHERE key=? AND job=?", [self.key, job]
        ).fetchone()
        return int(row[0] or 0) if row else 0

    def _set_progress(self, job: str, progress: RoundProgress) -> None:
        plan = msgspec.json.encode(progress.plan).decode() if progress.plan else None
        self.db.execute(
            "INSERT INTO progress (key, job, phase, plan, idempotency_key, update_body,"
            " updated_at, data_generation) VALUES (?, ?, ?, ?, ?, ?, ?, ?)" + _PROGRESS_UPSERT,
            [
                self.key,
                job,
                progress.phase.value,
                plan,
                progress.idempotency_key,
                progress.update,
                time.time(),
                progress.data_generation,
            ],
        )
        self._progress[job] = progress

    def record_admission(
        self, job: str, plan: RoundPlan, model: tuple[str, bytes] | None = None
    ) -> None:
        """Checked in and admitted: hold the round plan, and the round's model (etag,
        body) when it came with the admission (then no download is left to do)."""
        with self.atomic():
            if model is None:
                self._set_progress(job, RoundProgress(Phase.ADMITTED, plan))
                return
            # Bytes of a download that broke before are of no use any more.
            self.db.execute("DELETE FROM download_parts WHERE key=? AND job=?", [self.key, job])
            self._hold_model(job, plan, *model)

    def record_download(self, job: str, plan: RoundPlan, etag: str, body: bytes | None) -> None:
        """Hold the round's model (``body`` None: the held copy was still current)."""
        with self.atomic():
            self._hold_model(job, plan, etag, body)

    def _hold_model(self, job: str, plan: RoundPlan, etag: str, body: bytes | None) -> None:
        """`record_download`'s writes, for a caller already in a transaction."""
        if body is not None:
            self.db.execute(
                _HOLD_MODEL,
                [
                    self.key,
                    job,
                    plan.model_version,
                    etag,
                    body,
                    msgspec.json.encode(plan.model).decode(),
                ],
            )
            self._held[job] = (plan.model_version, etag)
        self._set_progress(job, RoundProgress(Phase.DOWNLOADED, plan))

    def record_update(
        self,
        job: str,
        plan: RoundPlan,
        update: bytes,
        idempotency_key: str,
        residual: bytes | None = None,
    ) -> None:
        """Trained: hold the update and the key every upload attempt will carry (and, with
        compression, what it left out, carried into the next update)."""
        with self.atomic():
            self.hold_update(job, plan, update, idempotency_key, residual)

    def hold_update(
        self,
        job: str,
        plan: RoundPlan,
        update: bytes,
        idempotency_key: str,
        residual: bytes | None = None,
        data_generation: int | None = None,
    ) -> None:
        """`record_update`'s writes, for a caller already in a transaction (the client's
        training step, which charges the privacy ledger in the same one).
        ``data_generation``: the example store's, when the examples were read."""
        if residual is not None:
            self.db.execute(
                "INSERT OR REPLACE INTO residuals (key, job, body, data_generation)"
                " VALUES (?, ?, ?, ?)",
                [self.key, job, residual, data_generation],
            )
        progress = RoundProgress(Phase.TRAINED, plan, idempotency_key, update, data_generation)
        self._set_progress(job, progress)

    def record_receipt(self, job: str, receipt: UploadReceipt) -> None:
        """Acknowledged: keep the receipt, drop the update, and go idle."""
        with self.atomic():
            self.db.execute(
                "INSERT OR REPLACE INTO receipts VALUES (?, ?, ?, ?)",
                [self.key, job, receipt.round_id, msgspec.json.encode(receipt).decode()],
            )
            self._set_progress(job, RoundProgress(Phase.IDLE))

    def discard_round(self, job: str) -> None:
        """Drop work for a round that closed without it."""
        with self.atomic():
            self._set_progress(job, RoundProgress(Phase.IDLE))

    # -- models and receipts ---------------------------------------------------
    def held_version(self, job: str) -> tuple[int, str] | None:
        """The model version held for ``job`` and its etag, without reading the body."""
        if job in self._held:
            return self._held[job]
        with self._lock:
            row = self.db.execute(
                "SELECT version, etag FROM models WHERE key=? AND job=?", [self.key, job]
            ).fetchone()
            held = self._held[job] = (int(row[0]), str(row[1])) if row else None
            return held

    def held_model(self, job: str) -> tuple[int, str, bytes] | None:
        """The model version held for ``job``: (version, etag, body)."""
        row = self.db.execute(
            "SELECT version, etag, body FROM models WHERE key=? AND job=?", [self.key, job]
        ).fetchone()
        return (int(row[0]), str(row[1]), bytes(row[2])) if row else None

    def held(self, job: str) -> tuple[int, bytes, ModelSpec | None] | None:
        """The model held for ``job`` with its architecture, read together: (version,
        body, spec); the spec is None in a state older than schema 6."""
        row = self.db.execute(
            "SELECT version, body, spec FROM models WHERE key=? AND job=?", [self.key, job]
        ).fetchone()
        if not row:
            return None
        spec = msgspec.json.decode(row[2], type=ModelSpec) if row[2] else None
        return int(row[0]), bytes(row[1]), spec

    def hold_model(self, job: str, version: int, etag: str, body: bytes, spec: ModelSpec) -> None:
        """Hold a model outside a round (a finished job's final model, a refresh): the
        progress stays as it is."""
        with self.atomic():
            self.db.execute(
                _HOLD_MODEL,
                [self.key, job, version, etag, body, msgspec.json.encode(spec).decode()],
            )
            self._held[job] = (version, etag)

    def held_spec(self, job: str) -> ModelSpec | None:
        """The architecture of the model held for ``job``, if one is held."""
        row = self.db.execute(
            "SELECT spec FROM models WHERE key=? AND job=?", [self.key, job]
        ).fetchone()
        return msgspec.json.decode(row[0], type=ModelSpec) if row and row[0] else None

    # -- partial downloads -----------------------------------------------------
    def partial_download(self, job: str, version: int) -> tuple[str, int]:
        """(etag, bytes held) of a broken download of ``version``; ("", 0) if none."""
        row = self.db.execute(
            "SELECT etag, coalesce(sum(length(data)), 0) FROM download_parts"
            " WHERE key=? AND job=? AND version=?",
            [self.key, job, version],
        ).fetchone()
        return (str(row[0] or ""), int(row[1])) if row else ("", 0)

    def has_download_parts(self, job: str) -> bool:
        """Whether bytes of any download for ``job`` are held."""
        row = self.db.execute(
            "SELECT EXISTS (SELECT 1 FROM download_parts WHERE key=? AND job=?)", [self.key, job]
        ).fetchone()
        return bool(row[0])

    def keep_download_part(
        self, job: str, version: int, etag: str, offset: int, data: bytes
    ) -> None:
        """Store received bytes of a download at ``offset``."""
        with self.atomic():
            self.db.execute(
                "INSERT OR REPLACE INTO download_parts VALUES (?, ?, ?, ?, ?, ?)",
                [self.key, job, version, etag, offset, data],
            )

    def drop_download_parts(self, job: str) -> bytes:
        """Forget the job's partial downloads; return the bytes of the newest, in order."""
        with self.atomic():
            rows = self.db.execute(
                "SELECT version, data FROM download_parts WHERE key=? AND job=?"
                " ORDER BY version DESC, offset",
                [self.key, job],
            ).fetchall()
            self.db.execute("DELETE FROM download_parts WHERE key=? AND job=?", [self.key, job])
        newest = rows[0][0] if rows else None
        return b"".join(bytes(r[1]) for r in rows if r[0] == newest)

    def residual(self, job: str, data_generation: int | None = None) -> bytes | None:
        """The compression residual carried into the next update, if any. Given the
        examples' ``data_generation``: none if it was computed at another one (some of
        them were forgotten since, and what it carries of them goes with them)."""
        row = self.db.execute(
            "SELECT body, data_generation FROM residuals WHERE key=? AND job=?", [self.key, job]
        ).fetchone()
        if not row:
            return None
        if data_generation is not None and row[1] is not None and row[1] != data_generation:
            return None
        return bytes(row[0])

    def drop_residual(self, job: str) -> None:
        """Forget the compression residual (its examples were forgotten)."""
        with self.atomic():
            self.db.execute("DELETE FROM residuals WHERE key=? AND job=?", [self.key, job])

    def trainer_state(self, job: str, data_generation: int | None = None) -> bytes | None:
        """What a client trainer kept on this device for ``job`` (tensors), if anything:
        none if it was computed at another ``data_generation`` of the examples (some were
        forgotten since), as for the compression residual."""
        return self.residual(job + TRAINER_STATE, data_generation)

    def keep_trainer_state(self, job: str, body: bytes, data_generation: int | None = None) -> None:
        """Keep a client trainer's state for its next round (inside the transaction that
        holds the update it came with). Beside the compression residual, under a name no
        job can have."""
        self.db.execute(
            "INSERT OR REPLACE INTO residuals (key, job, body, data_generation)"
            " VALUES (?, ?, ?, ?)",
            [self.key, job + TRAINER_STATE, body, data_generation],
        )

    # -- own speed -------------------------------------------------------------
    def speed(self) -> float | None:
        """Examples this device trains per second (an average over past rounds)."""
        row = self.db.execute(
            "SELECT examples_per_second FROM speed WHERE key=?", [self.key]
        ).fetchone()
        return float(row[0]) if row else None

    def record_speed(self, examples_per_second: float) -> None:
        """Fold one measurement into the average (exponentially weighted, 0.3 new).

        One statement, so atomic on its own: no read first, and no savepoint inside
        the training step's transaction (outside one, sqlite-utils commits it)."""
        self.db.execute(
            "INSERT INTO speed VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET"
            " examples_per_second ="
            " 0.7 * examples_per_second + 0.3 * excluded.examples_per_second",
            [self.key, examples_per_second],
        )

    def receipts(self, job: str) -> list[UploadReceipt]:
        """Every acknowledged upload for ``job``, oldest round first."""
        rows = self.db.execute(
            "SELECT receipt FROM receipts WHERE key=? AND job=? ORDER BY round_id", [self.key, job]
        ).fetchall()
        return [msgspec.json.decode(r[0], type=UploadReceipt) for r in rows]
