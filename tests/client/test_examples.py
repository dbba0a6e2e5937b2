"""The example store as an app meets it: limits that travel with the data, forgetting with
another connection reading, and use from several threads (issue 25)."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import fedclient

MARKER = np.full((3, 64), 12345.678, dtype=np.float32)  # bytes a scan can find


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``condition`` until it holds (AssertionError after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        threading.Event().wait(0.005)


def _files(path: Path) -> list[Path]:
    return [path, path.with_name(path.name + "-wal")]


def _holds_marker(path: Path) -> bool:
    return any(f.exists() and MARKER[0].tobytes() in f.read_bytes() for f in _files(path))


def _filled(path: Path) -> fedclient.ExampleStore:
    store = fedclient.ExampleStore(path)
    rng = np.random.default_rng(0)
    store.add(rng.random((50, 64), dtype=np.float32), rng.integers(0, 10, 50), source="alice")
    store.add(MARKER, [1, 2, 3], source="bob")
    assert store.scrub()
    assert _holds_marker(path)  # on disk before it is forgotten
    return store


class Reader(threading.Thread):
    """Another connection to the file that reads the examples row by row (as an app's
    own export, or a backup, would) and holds its read open until ``done`` is set."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.reading = threading.Event()
        self.done = threading.Event()
        self.rows = 0

    def run(self) -> None:
        connection = sqlite3.connect(self.path)
        cursor = connection.execute("SELECT features FROM examples")
        cursor.fetchone()  # mid-read: its snapshot holds the pages it started on
        self.rows = 1
        self.reading.set()
        self.done.wait(timeout=60)
        self.rows += len(cursor.fetchall())
        connection.close()


def test_forget_with_a_reader_says_the_bytes_stay_and_finishes_when_the_read_ends(
    tmp_path: Path,
) -> None:
    path = tmp_path / "examples.sqlite"
    store = _filled(path)
    reader = Reader(path)
    reader.start()
    assert reader.reading.wait(timeout=10)

    forgotten = store.forget(source="bob", wait_seconds=0.2)
    assert forgotten.count == 3 and not forgotten.complete
    assert "reading" in forgotten.reason
    assert _holds_marker(path)  # what it reported: the reader holds the old pages
    assert store.scrub_pending
    assert len(store) == 50  # the rows are gone at once, for every new reader
    other = sqlite3.connect(path)
    assert other.execute("SELECT count(*) FROM examples WHERE source='bob'").fetchone()[0] == 0
    other.close()

    reader.done.set()
    reader.join(timeout=10)
    assert reader.rows == 53  # the reader saw its own consistent snapshot
    store.add(np.zeros((1, 64), np.float32), [0])  # the next use finishes the job
    assert not store.scrub_pending
    assert not _holds_marker(path)


def test_forget_waits_for_a_read_that_ends_and_then_removes_the_bytes(tmp_path: Path) -> None:
    path = tmp_path / "examples.sqlite"
    store = _filled(path)
    reader = Reader(path)
    reader.start()
    assert reader.reading.wait(timeout=10)
    assert not store.scrub_pending

    def end_the_read_once_forget_waits() -> None:
        wait_until(lambda: store.scrub_pending)  # forget deleted, and now waits
        reader.done.set()

    helper = threading.Thread(target=end_the_read_once_forget_waits, daemon=True)
    helper.start()
    forgotten = store.forget(source="bob", wait_seconds=30)
    helper.join(timeout=10)
    assert forgotten == fedclient.Forgotten(3, complete=True)
    assert not _holds_marker(path)


def test_forget_without_readers_removes_the_bytes_at_once(tmp_path: Path) -> None:
    path = tmp_path / "examples.sqlite"
    store = _filled(path)
    before = store.generation
    assert store.forget(source="bob", wait_seconds=0) == fedclient.Forgotten(3, complete=True)
    assert not _holds_marker(path)
    assert store.generation == before + 1  # models tuned on the old examples are stale
    assert store.forget(source="nobody").count == 0
    assert store.generation == before + 1  # nothing went: nothing is stale


def test_retention_limits_are_stored_with_the_examples(tmp_path: Path) -> None:
    path = tmp_path / "examples.sqlite"
    now = [1_000.0]
    store = fedclient.ExampleStore(path, max_examples=5, max_age_seconds=600, clock=lambda: now[0])
    store.add(np.zeros((8, 4), np.float32), np.zeros(8, int))
    assert len(store) == 5
    store.db.close()

    # The app restarts without the limits (another version, another screen): they hold.
    again = fedclient.ExampleStore(path, clock=lambda: now[0])
    assert (again.max_examples, again.max_age_seconds) == (5, 600)
    again.add(np.ones((4, 4), np.float32), np.ones(4, int))
    assert len(again) == 5
    now[0] += 601
    assert fedclient.ExampleStore(path, clock=lambda: now[0]).max_examples == 5
    assert len(again) == 0  # opening enforced the age limit

    assert again.set_limits(max_examples=None, max_age_seconds=None) == 0
    again.add(np.ones((9, 4), np.float32), np.ones(9, int))
    assert len(again) == 9 and fedclient.ExampleStore(path).max_examples is None
    with pytest.raises(fedclient.InvalidInput):
        again.set_limits(max_examples=0, max_age_seconds=None)
    assert len(again) == 9  # refused: nothing changed


def test_a_store_and_a_state_made_on_one_thread_work_on_others(tmp_path: Path) -> None:
    store = fedclient.ExampleStore(tmp_path / "examples.sqlite")
    state = fedclient.DeviceState(tmp_path / "fl.sqlite")
    shared = fedclient.ExampleStore(state)  # examples in the state's own file
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for j in range(20):
                store.add(np.full((1, 8), i, np.float32), [j], source=f"t{i}")
                shared.add(np.full((1, 8), i, np.float32), [j], source=f"t{i}")
                with state.atomic():  # a transaction no other thread's write joins
                    state.record_speed(float(i + 1))
                store.arrays()
            store.forget(source=f"t{i}")
        except BaseException as exc:  # reported below, with the thread's traceback
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert errors == []
    assert len(store) == 0 and len(shared) == 80
    assert state.speed() is not None
