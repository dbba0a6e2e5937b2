"""Several ``fedserver`` workers on one PostgreSQL database (issue 15): a federation
through them matches the in-process one, and a worker killed mid-round loses nothing."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import psycopg
import pytest

import fedclient
from fedclient.protocol import (
    Admitted,
    CheckinRequest,
    EnrolRequest,
    decode_tensors,
    encode_tensors,
)
from fedclient.server import FederationService, ServerStore, create_app
from fedclient.server.auth import EnrolmentPolicy
from fedclient.server.cli import main as fedserver_main
from fedclient.sim.cli import main as fedsim
from tests.conftest import ManualClock, make_plan
from tests.integration.test_fedserver_process import (
    PLAN,
    FedServerProcess,
    fedserver,  # noqa: F401  (the fixture)
)
from tests.postgres import PostgresCluster
from tests.privacy.test_secagg_rounds import _one_round as one_secure_round
from tests.privacy.test_secagg_rounds import _server as secure_server


@pytest.fixture
def database(postgres: PostgresCluster | None) -> Any:
    if postgres is None:
        pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")
    url = postgres.database()
    yield url
    postgres.drop([url.rsplit("/", 1)[1].split("?")[0]])


def _fedsim(tmp_path: Path, name: str, *where: str) -> dict[str, Any]:
    report = tmp_path / f"{name}.json"
    common = ["--devices", "30", "--partition", "iid", "--quiet"]
    assert fedsim(["run", *where, *common, "--report", str(report)]) == 0
    return json.loads(report.read_text())  # type: ignore[no-any-return]


def test_fedsim_through_two_workers_on_postgresql_matches_the_in_process_run(
    fedserver: Any,  # noqa: F811
    database: str,
    tmp_path: Path,
) -> None:
    server = fedserver(rounds=6, per_round=10, db=database, workers=2)
    assert len(server.worker_pids()) == 2
    # The seed of the server's plan (which draws the model) draws the devices' split too.
    remote = _fedsim(tmp_path, "remote", "--server", server.url, "--job", "digits", "--seed", "3")
    local = _fedsim(tmp_path, "local", "--plan", str(server.plan), "--dataset", "digits")
    assert [r["updates"] for r in remote["rounds"]] == [10] * 6
    assert remote["final"]["model_version"] == local["final"]["model_version"] == 6
    assert abs(remote["final"]["accuracy"] - local["final"]["accuracy"]) <= 0.01


@pytest.mark.parametrize("bodies", ["rows", "files"])
def test_a_worker_killed_mid_round_loses_no_acknowledged_update(
    fedserver: Any,  # noqa: F811
    database: str,
    digits: Any,
    bodies: str,
    tmp_path: Path,
) -> None:
    """Bodies in the database's rows, or in a folder the workers share (``--bodies``):
    fewer updates than a fold takes, so the close reads every one the killed worker took
    from where it left it."""
    per_round = 24
    folder = tmp_path / "bodies"
    options = ("--bodies", str(folder)) if bodies == "files" else ()
    server = fedserver(rounds=2, per_round=per_round, db=database, workers=2, options=options)
    victim = server.worker_pids()[0]
    acknowledged: list[str] = []
    lock = threading.Lock()
    killed = threading.Event()

    def device(i: int) -> None:
        part = slice(i * 50, (i + 1) * 50)
        with fedclient.Client(
            server.url, "digits", (digits.x_train[part], digits.y_train[part]), seed=i
        ) as client:
            for _ in range(20):  # an app keeps stepping through a lost connection
                try:
                    outcome = client.run_once()
                except fedclient.TransportError:
                    continue
                if outcome.status == "uploaded":
                    assert outcome.receipt is not None
                    with lock:
                        acknowledged.append(outcome.receipt.device_id)
                        if len(acknowledged) == per_round // 3 and not killed.is_set():
                            os.kill(victim, signal.SIGKILL)  # mid-round, others in flight
                            killed.set()
                    return
        raise AssertionError(f"device {i} never got its update acknowledged")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(device, range(per_round)))
    assert killed.is_set() and len(set(acknowledged)) == per_round

    with psycopg.connect(database) as conn:
        rounds = conn.execute("SELECT number, status FROM rounds ORDER BY number").fetchall()
        counted = conn.execute(
            "SELECT device_id, count(*) FROM updates u JOIN rounds r USING (round_id)"
            " WHERE r.number = 1 GROUP BY device_id"
        ).fetchall()
        versions = conn.execute("SELECT version FROM models ORDER BY version").fetchall()
    assert rounds == [(1, "closed"), (2, "open")]  # closed once, one next round
    assert sorted(d for d, _ in counted) == sorted(acknowledged)  # every one counted...
    assert all(n == 1 for _, n in counted)  # ...once
    assert versions == [(0,), (1,)]
    assert server.round(1)["updates"] == per_round
    if bodies == "files":
        # The closed round's files went with its close (the killed worker's too); the
        # database names no body in a file any more.
        assert not list(folder.glob("round-1.*"))
        with psycopg.connect(database) as conn:
            named = conn.execute(
                "SELECT count(*) FROM updates WHERE spool_offset IS NOT NULL"
            ).fetchone()
        assert named == (0,)


def test_two_workers_admit_no_more_devices_than_the_round_holds(database: str) -> None:
    # Two services on one database, each on a thread of its own, as two worker
    # processes: the check "is the round full?" and the admission are one conditional update.
    plan = make_plan(devices_per_round=5, over_selection=1.0)
    workers = [FederationService(ServerStore(database)) for _ in range(2)]
    for worker in workers:
        worker.add_job(plan)
    tokens = [workers[0].enrol(EnrolRequest()).token for _ in range(40)]
    answers: list[Any] = []

    def serve(worker: FederationService, mine: list[str]) -> None:
        for token in mine:
            answers.append(worker.checkin(token, "digits", CheckinRequest()))

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(serve, workers, [tokens[0::2], tokens[1::2]]))
    assert sum(isinstance(a, Admitted) for a in answers) == 5
    assert workers[1].job_status("digits").current_round.admitted == 5  # type: ignore[union-attr]
    for worker in workers:
        worker.store.close()


def test_several_workers_need_postgresql(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plan = tmp_path / "plan.toml"
    plan.write_text('[job]\nname = "digits"\n')
    db = tmp_path / "s.sqlite"
    assert fedserver_main(["init", "--plan", str(plan), "--db", str(db)]) == 0
    assert fedserver_main(["--plan", str(plan), "--db", str(db), "--workers", "2"]) == 2
    assert "PostgreSQL database only" in capsys.readouterr().err


class _TakeTurns(httpx.AsyncBaseTransport):
    """Requests go to each worker in turn, as behind a round-robin load balancer."""

    def __init__(self, apps: list[Any]) -> None:
        self.transports = [httpx.ASGITransport(app=app) for app in apps]
        self.served = [0] * len(apps)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        turn = sum(self.served) % len(self.transports)
        self.served[turn] += 1
        return await self.transports[turn].handle_async_request(request)


class _Workers:
    """Two workers (services with their own connections) on one database."""

    def __init__(self, database: str, plan: Any) -> None:
        clock = ManualClock()
        self.services = [FederationService(ServerStore(database), clock=clock) for _ in range(2)]
        for service in self.services:
            service.add_job(plan)
        self.store = self.services[0].store
        self.turns = _TakeTurns([create_app(s, metrics=False) for s in self.services])

    def transport(self) -> _TakeTurns:
        return self.turns


@pytest.mark.anyio
async def test_a_secure_round_runs_through_two_workers_taking_turns(
    database: str, make_devices: Any
) -> None:
    # Every request, secure-aggregation stages included, may land on either worker: each
    # rebuilds the round from its log in the database. The sum is the single worker's.
    alone = await one_secure_round(secure_server("secagg+"), make_devices)
    workers = _Workers(database, secure_server("secagg+").service.store.job("digits").plan)
    together = await one_secure_round(workers, make_devices)
    assert all(n > 20 for n in workers.turns.served)
    for name in alone:
        np.testing.assert_array_equal(together[name], alone[name])
    assert not workers.store.secure_events(1)  # the closed round's log is gone
    for service in workers.services:
        service.store.close()


def test_two_fedserver_processes_admit_exactly_the_round_s_places_under_a_burst(
    database: str, tmp_path: Path
) -> None:
    # Two servers on one database, as two hosts behind a load balancer, each check-in
    # of a burst sent to one or the other at the same moment (a barrier): admission is
    # one conditional update of the round's count, with no lock shared by the workers.
    plan = PLAN.format(rounds=2, per_round=10).replace(
        "over_selection = 1.0", "over_selection = 1.5"
    )
    servers: list[FedServerProcess] = []
    try:
        _burst(database, tmp_path, plan, servers)
    finally:
        for server in servers:
            if server.proc is not None and server.proc.poll() is None:
                server.stop()
    # Stopped, each says how long it held what every worker waits for (bench/ingest.py
    # reads it): twice, at its start (the schema checked, the plan registered), and
    # never for the enrolments, check-ins, timer ticks and status reads that followed.
    for server in servers:
        held = re.findall(r"held cluster-wide ([0-9.]+) ms \((\d+) times\)", server.output())
        assert [times for _, times in held] == ["2"], server.output()


def _burst(database: str, tmp_path: Path, plan: str, servers: list[FedServerProcess]) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        server = FedServerProcess(tmp_path / name, 2, 10, database, plan=plan)
        server.made = bool(servers)  # the database is made once
        server.start()
        servers.append(server)
    devices = 60
    with httpx.Client(timeout=30) as http:
        tokens = [
            http.post(servers[i % 2].url + "/v1/devices", json={})
            .raise_for_status()
            .json()["token"]
            for i in range(devices)
        ]
    start = threading.Barrier(devices)

    def check_in(i: int) -> str:
        with httpx.Client(timeout=60) as http:
            start.wait(timeout=60)
            answer = http.post(
                servers[i % 2].url + "/v1/jobs/digits/checkin",
                json={},
                headers={"Authorization": f"Bearer {tokens[i]}"},
            )
            return str(answer.raise_for_status().json()["status"])

    with ThreadPoolExecutor(devices) as pool:
        answers = list(pool.map(check_in, range(devices)))
    assert answers.count("admitted") == 15  # devices_per_round x over_selection
    assert answers.count("retry") == devices - 15
    with psycopg.connect(database) as conn:
        admitted = conn.execute("SELECT count(*), count(DISTINCT device_id) FROM admissions")
        assert admitted.fetchone() == (15, 15)
        counted = conn.execute("SELECT admitted FROM round_counts WHERE round_id = 1")
        assert counted.fetchone() == (15,)
    for server in servers:
        assert server.round(1)["admitted"] == 15  # as each server reports it


def _update_body(service: FederationService, seed: int, version: int) -> bytes:
    """A valid update of the job's model (trained on ``version``): a small random delta,
    10 examples."""
    found = service.store.model("digits", 0)
    assert found is not None
    rng = np.random.default_rng(seed)
    delta = {
        name: (rng.standard_normal(w.shape) * 1e-3).astype(np.float32)
        for name, w in decode_tensors(found[0])[0].items()
    }
    return encode_tensors(delta, {"num_examples": "10", "model_version": str(version)})


def test_a_round_closes_once_when_both_workers_see_its_quota_at_once(database: str) -> None:
    # Each worker takes one of the round's two updates; both commit, then both count the
    # quota met (a barrier holds each until the other's update is in) and both try to
    # close: one closes, the other finds it closed. Over three rounds, on real PostgreSQL.
    plan = make_plan(devices_per_round=2, over_selection=1.0, rounds=3)
    workers = [FederationService(ServerStore(database)) for _ in range(2)]
    for worker in workers:
        worker.add_job(plan)
    both_in = threading.Barrier(2)
    closes: list[bool] = []

    def instrument(worker: FederationService) -> None:
        armed: list[bool] = []
        accepted, count, close = (
            worker.rounds.accepted,
            worker.store.update_count,
            worker.rounds.close,
        )

        def accepted_(*args: Any) -> None:
            accepted(*args)
            armed.append(True)  # in the accepting transaction: the next count follows it

        def count_(round_id: int) -> int:
            if armed:
                armed.clear()
                both_in.wait(timeout=60)  # both updates are committed now
            return count(round_id)

        def close_(*args: Any, **kwargs: Any) -> bool:
            closed = close(*args, **kwargs)
            closes.append(closed)
            return closed

        worker.rounds.accepted = accepted_  # type: ignore[method-assign]
        worker.store.update_count = count_  # type: ignore[method-assign]
        worker.rounds.close = close_  # type: ignore[method-assign]

    for worker in workers:
        instrument(worker)
    for number in (1, 2, 3):
        tokens = [w.enrol(EnrolRequest()).token for w in workers]
        plans = [
            w.checkin(t, "digits", CheckinRequest()) for w, t in zip(workers, tokens, strict=True)
        ]
        assert all(isinstance(p, Admitted) for p in plans)
        round_id = plans[0].plan.round_id  # type: ignore[union-attr]
        bodies = [_update_body(workers[0], number * 2 + i, number - 1) for i in range(2)]
        with ThreadPoolExecutor(2) as pool:
            uploads = [
                pool.submit(w.uploads.upload, t, round_id, f"key-{number}-{i}", b)
                for i, (w, t, b) in enumerate(zip(workers, tokens, bodies, strict=True))
            ]
            receipts = [u.result(timeout=120) for u in uploads]
        assert {r.round_id for r in receipts} == {round_id}
        assert sorted(closes) == [False, True], closes  # tried twice, closed once
        closes.clear()

    with psycopg.connect(database) as conn:
        rounds = conn.execute(
            "SELECT number, status, reason FROM rounds ORDER BY number"
        ).fetchall()
        versions = conn.execute("SELECT version FROM models ORDER BY version").fetchall()
        job = conn.execute("SELECT status, rounds_completed, model_version FROM jobs").fetchone()
    assert [(n, s) for n, s, _ in rounds] == [(1, "closed"), (2, "closed"), (3, "closed")]
    assert all(reason == "quota: 2 updates" for _, _, reason in rounds)
    assert versions == [(0,), (1,), (2,), (3,)]
    assert job == ("finished", 3, 3)
    for worker in workers:
        worker.store.close()


def test_one_token_enrolled_on_two_workers_at_once_names_one_device(database: str) -> None:
    # Enrolment takes no cluster-wide lock: the token's uniqueness decides. Worker b
    # reads "no such token" before worker a's enrolment is in (made certain here by
    # hiding a's row from b's first read), then finds the token taken when it writes:
    # it answers a's device, and the code it would have spent stays unspent.
    workers = [
        FederationService(ServerStore(database), enrolment=EnrolmentPolicy.codes())
        for _ in range(2)
    ]
    codes = workers[0].operator.issue_codes(2)
    a = workers[0].enrol(EnrolRequest(token="t" * 40, credential=codes[0]))
    reads = workers[1].store.device_by_token
    hidden = [True]

    def device_by_token(token_hash: str) -> Any:
        if hidden:
            hidden.clear()
            return None  # as read before a's commit
        return reads(token_hash)

    workers[1].store.device_by_token = device_by_token  # type: ignore[method-assign]
    b = workers[1].enrol(EnrolRequest(token="t" * 40, credential=codes[1]))
    assert not hidden  # b did read before writing
    assert b.device_id == a.device_id
    with psycopg.connect(database) as conn:
        assert conn.execute("SELECT count(*) FROM devices").fetchone() == (1,)
        spent = conn.execute("SELECT count(*) FROM enrolment_codes WHERE used_by IS NOT NULL")
        assert spent.fetchone() == (1,)
    for worker in workers:
        worker.store.close()
