"""The server's schema: its tables as ``fedserver init`` makes them, the migrations that
bring an older database up to date, and the rows the store hands out.

The DDL is written once in SQLite's types; `fedclient.server.database` maps them to
PostgreSQL's. `SCHEMA_VERSION` is the version a database is at once migrated; a
database of a newer one is refused (`fedclient.server.integrity`).
"""

from __future__ import annotations

from dataclasses import dataclass

from fedclient.protocol import JobPlan

__all__ = [
    "MIGRATIONS",
    "SCHEMA",
    "SCHEMA_VERSION",
    "JobRow",
    "RoundRow",
    "SessionRow",
    "UpdateRow",
]

#: Each schema version's statements after the first (`SCHEMA`), applied in order to
#: bring an older database up to date. A statement for one engine only is a dict
#: from its kind (``"sqlite"``, ``"postgresql"``) to the statement.
MIGRATIONS: dict[int, list[str | dict[str, str]]] = {
    2: [  # a device's identity key (Ed25519) and an identity authority's certificate of it
        "ALTER TABLE devices ADD COLUMN identity_key BLOB",
        "ALTER TABLE devices ADD COLUMN certificate BLOB",
    ],
    3: [  # federated evaluation: what each device measured of a round's model
        "CREATE TABLE evaluations (round_id INTEGER, device_id TEXT, correct INTEGER NOT NULL,"
        " loss_sum REAL NOT NULL, examples INTEGER NOT NULL, PRIMARY KEY (round_id, device_id))",
    ],
    4: [  # the operator's levers: revoked devices, single-use enrolment codes
        "ALTER TABLE devices ADD COLUMN revoked INTEGER NOT NULL DEFAULT 0",
        "CREATE TABLE enrolment_codes (code_hash TEXT PRIMARY KEY, issued REAL NOT NULL,"
        " used_by TEXT)",
    ],
    5: [  # streaming aggregation: a round's updates folded so far, and their number
        "CREATE TABLE round_sums (round_id INTEGER PRIMARY KEY, body BLOB NOT NULL,"
        " weight REAL NOT NULL, count INTEGER NOT NULL)",
    ],
    6: [  # admission order without SQLite's rowid; update bodies stored as they are
        "ALTER TABLE admissions ADD COLUMN seq INTEGER",
        {"sqlite": "UPDATE admissions SET seq = rowid"},
        # Float32 tensors do not compress: PostgreSQL need not try on every upload.
        {"postgresql": "ALTER TABLE updates ALTER COLUMN body SET STORAGE EXTERNAL"},
        {"postgresql": "ALTER TABLE models ALTER COLUMN body SET STORAGE EXTERNAL"},
    ],
    7: [  # each round's admissions and updates, counted as they are written
        "CREATE TABLE round_counts (round_id INTEGER PRIMARY KEY,"
        " admitted INTEGER NOT NULL DEFAULT 0, updates INTEGER NOT NULL DEFAULT 0)",
        "INSERT INTO round_counts (round_id, admitted, updates) SELECT r.round_id,"
        " (SELECT count(*) FROM admissions a WHERE a.round_id = r.round_id),"
        " (SELECT count(*) FROM updates u WHERE u.round_id = r.round_id) FROM rounds r",
    ],
    8: [  # each open secure round's log: its opening, devices' messages, stages closed
        "CREATE TABLE secure_events (round_id INTEGER, seq INTEGER, kind TEXT NOT NULL,"
        " device TEXT NOT NULL, stage TEXT NOT NULL, body BLOB NOT NULL,"
        " receipt TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (round_id, seq))",
    ],
    9: [  # an update body kept in its round's file beside a served SQLite file (spool.py)
        "ALTER TABLE updates ADD COLUMN spool_offset INTEGER",
        "ALTER TABLE updates ADD COLUMN spool_length INTEGER",
    ],
    10: [  # workers beside each other: each folds the updates it took into a sum of its own
        "ALTER TABLE updates ADD COLUMN worker TEXT NOT NULL DEFAULT ''",
        "CREATE TABLE round_parts (round_id INTEGER, worker TEXT,"
        " updates INTEGER NOT NULL DEFAULT 0, body BLOB, weight REAL NOT NULL DEFAULT 0,"
        " folded INTEGER NOT NULL DEFAULT 0, PRIMARY KEY (round_id, worker))",
        "INSERT INTO round_parts (round_id, worker, updates, body, weight, folded)"
        " SELECT c.round_id, '', c.updates, s.body, coalesce(s.weight, 0), coalesce(s.count, 0)"
        " FROM round_counts c LEFT JOIN round_sums s ON s.round_id = c.round_id",
        "DROP TABLE round_sums",
        # Admissions are one conditional update of the round's count: every round has one.
        "INSERT INTO round_counts (round_id) SELECT round_id FROM rounds"
        " WHERE round_id NOT IN (SELECT round_id FROM round_counts)",
        {"postgresql": "ALTER TABLE round_parts ALTER COLUMN body SET STORAGE EXTERNAL"},
    ],
    11: [  # the next admission's seq found in the index, not by reading the round's rows
        "CREATE INDEX admissions_in_order ON admissions (round_id, seq)",
    ],
}
SCHEMA_VERSION = max(MIGRATIONS)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS devices (
    device_id TEXT PRIMARY KEY, token_hash TEXT UNIQUE NOT NULL, label TEXT, created REAL);
CREATE TABLE IF NOT EXISTS jobs (
    name TEXT PRIMARY KEY, plan TEXT NOT NULL, status TEXT NOT NULL,
    model_version INTEGER NOT NULL, rounds_completed INTEGER NOT NULL,
    rounds_failed INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS models (
    job TEXT, version INTEGER, body BLOB NOT NULL, etag TEXT NOT NULL, created REAL,
    PRIMARY KEY (job, version));
CREATE TABLE IF NOT EXISTS rounds (
    round_id INTEGER PRIMARY KEY AUTOINCREMENT, job TEXT NOT NULL, number INTEGER NOT NULL,
    status TEXT NOT NULL, model_version INTEGER NOT NULL, opened_at REAL NOT NULL,
    deadline REAL NOT NULL, closed_at REAL, reason TEXT NOT NULL DEFAULT '', train_loss REAL,
    UNIQUE (job, number));
CREATE INDEX IF NOT EXISTS rounds_open ON rounds (status, job);
CREATE TABLE IF NOT EXISTS admissions (
    round_id INTEGER, device_id TEXT, admitted_at REAL, PRIMARY KEY (round_id, device_id));
CREATE TABLE IF NOT EXISTS updates (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, round_id INTEGER NOT NULL, device_id TEXT NOT NULL,
    idempotency_key TEXT NOT NULL, receipt_id TEXT NOT NULL, num_examples INTEGER NOT NULL,
    train_loss REAL, body BLOB, received_at REAL NOT NULL, staleness INTEGER NOT NULL DEFAULT 0,
    UNIQUE (device_id, idempotency_key));
CREATE INDEX IF NOT EXISTS updates_by_round ON updates (round_id, device_id);
-- A round's updates in arrival order (round_id, then the rowid seq) without sorting
-- them: a sort copies every 30 kB body into a temporary b-tree.
CREATE INDEX IF NOT EXISTS updates_in_order ON updates (round_id);
CREATE TABLE IF NOT EXISTS strategy_state (job TEXT PRIMARY KEY, body BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS privacy_spent (
    job TEXT, device_id TEXT, epsilon REAL NOT NULL, PRIMARY KEY (job, device_id));
CREATE TABLE IF NOT EXISTS upload_sessions (
    device_id TEXT, upload_id TEXT, round_id INTEGER NOT NULL, size INTEGER NOT NULL,
    sha256 TEXT NOT NULL, "offset" INTEGER NOT NULL, PRIMARY KEY (device_id, upload_id));
CREATE TABLE IF NOT EXISTS upload_parts (
    device_id TEXT, upload_id TEXT, "offset" INTEGER, data BLOB NOT NULL,
    PRIMARY KEY (device_id, upload_id, "offset"));
"""


@dataclass(frozen=True)
class JobRow:
    """A job as stored."""

    name: str
    plan: JobPlan
    status: str
    model_version: int
    rounds_completed: int
    rounds_failed: int


@dataclass(frozen=True)
class RoundRow:
    """A round as stored."""

    round_id: int
    job: str
    number: int
    status: str
    model_version: int
    opened_at: float
    deadline: float
    closed_at: float | None
    reason: str
    train_loss: float | None


@dataclass(frozen=True)
class SessionRow:
    """A chunked upload in progress."""

    device_id: str
    upload_id: str
    round_id: int
    size: int
    sha256: str
    offset: int


@dataclass(frozen=True)
class UpdateRow:
    """One accepted update (its body is None once its round closed)."""

    seq: int
    round_id: int
    device_id: str
    idempotency_key: str
    receipt_id: str
    num_examples: int
    train_loss: float | None
    body: bytes | None
    received_at: float
    staleness: int = 0
