"""fedsim --availability: devices come and go over the simulated clock; only those online
check in, one that goes offline mid-round drops out, and each round reports participation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedclient import InvalidInput
from fedclient.sim.arrivals import ARRIVAL_STEP
from fedclient.sim.availability import (
    DAY,
    DiurnalSessions,
    TraceAvailability,
    parse_availability,
)
from fedclient.sim.cli import main as fedsim

RUN = [
    "run", "--dataset", "digits", "--devices", "40", "--devices-per-round", "6", "--rounds", "5",
    "--epochs", "1", "--seed", "2", "--quiet", "--no-plot",
]  # fmt: skip


def _run(tmp_path: Path, name: str, *flags: str) -> dict[str, Any]:
    out = tmp_path / f"{name}.json"
    assert fedsim([*RUN, *flags, "--report", str(out)]) == 0
    return json.loads(out.read_text())  # type: ignore[no-any-return]


def test_the_online_share_follows_each_device_s_local_time() -> None:
    sessions = DiurnalSessions(240_000, seed=1, peak=0.8, trough=0.1, session=1800.0)
    for now in (2 * DAY, 2 * DAY + 7 * 3600.0, 2 * DAY + 13 * 3600.0):
        online = sessions.online_mask(now)
        for zone in (0, 6, 12, 18):
            mine = sessions.zone == zone
            local = (now / 3600.0 + zone) % 24.0
            expected = float(sessions.share(np.array([local]))[0])
            # The share lags the curve by about a session; half an hour of a daily curve.
            assert abs(online[mine].mean() - expected) < 0.05, (now, zone)
    # Across zones the curve's highs and lows are both there at one moment.
    shares = [online[sessions.zone == z].mean() for z in range(24)]
    assert max(shares) > 0.7 and min(shares) < 0.2


def test_online_sessions_last_the_session_length_on_average() -> None:
    sessions = DiurnalSessions(50_000, seed=3, peak=0.6, trough=0.05, session=1800.0)
    now = DAY + 1234.0
    online = np.flatnonzero(sessions.online_mask(now))
    # Sessions are memoryless: what remains of one under way is a whole one on average.
    remaining = [sessions.online_until(int(i), now) - now for i in online[:5000]]
    assert min(remaining) > 0 and abs(np.mean(remaining) / 1800.0 - 1) < 0.06
    offline = int(np.flatnonzero(~sessions.online_mask(now))[0])
    assert sessions.online_until(offline, now) == now and not sessions.online(offline, now)


def test_the_same_seed_plays_the_same_sessions() -> None:
    times = [0.0, 300.0, 4000.0, 90_000.0]
    a, b, c = (DiurnalSessions(10_000, s, 0.6, 0.05, 1800.0) for s in (5, 5, 6))
    for now in times:
        assert np.array_equal(a.online_mask(now), b.online_mask(now))
    assert not np.array_equal(a.online_mask(times[-1]), c.online_mask(times[-1]))


def test_a_trace_file_says_who_is_online_and_repeats_daily(tmp_path: Path) -> None:
    trace = tmp_path / "online.csv"
    trace.write_text("device,start,end\n7,0,3600\n7,7200,9000\n3,100,86400\n")
    model = TraceAvailability(trace, devices=5)
    # Trace devices in id order: 3, then 7; fleet device i follows trace device i mod 2.
    assert [model.online(i, 50.0) for i in range(5)] == [False, True, False, True, False]
    assert model.online_until(1, 50.0) == 3600.0
    assert model.online(0, 200.0) and model.online_until(0, 200.0) == 86_400.0
    assert not model.online(1, 5000.0) and model.online(1, 8000.0)
    assert model.online(1, DAY + 8000.0) and model.online_until(1, DAY + 8000.0) == DAY + 9000
    assert model.online_mask(5000.0).tolist() == [True, False, True, False, True]


@pytest.mark.parametrize(
    ("text", "refusal"),
    [
        ("sometimes", "unknown --availability"),
        ("diurnal:peak=0.1,trough=0.5", "trough <= peak"),
        ("diurnal:noon=3", "unknown setting"),
        ("trace:/nonexistent/online.csv", "cannot read availability trace"),
    ],
)
def test_an_availability_model_it_cannot_play_is_refused(text: str, refusal: str) -> None:
    with pytest.raises(InvalidInput, match=refusal):
        parse_availability(text, 10, 1)


def test_a_bad_trace_row_is_refused_with_its_line(tmp_path: Path) -> None:
    trace = tmp_path / "online.csv"
    trace.write_text("device,start,end\n0,0,100\n1,50,20\n")
    with pytest.raises(InvalidInput, match="line 3"):
        TraceAvailability(trace, 4)
    trace.write_text("id,from,to\n0,0,100\n")
    with pytest.raises(InvalidInput, match="lacks columns"):
        TraceAvailability(trace, 4)


def test_only_online_devices_check_in(tmp_path: Path) -> None:
    trace = tmp_path / "online.csv"
    # Trace device 0 is online all day; trace device 1 for its first second only.
    trace.write_text("device,start,end\n0,0,86400\n1,0,1\n")
    report = _run(tmp_path, "trace", "--availability", f"trace:{trace}")
    for record in report["rounds"]:
        assert record["participants"] and all(i % 2 == 0 for i in record["participants"])
        if record["round"] > 1:  # after its first second: the even half of 40
            assert record["participation"]["available"] == 20
    assert report["final"]["rounds_completed"] == 5


def test_a_diurnal_fleet_reports_participation_and_reproduces(tmp_path: Path) -> None:
    flags = ["--availability", "diurnal:peak=0.5,trough=0.2,session=0.05"]
    a, b = _run(tmp_path, "a", *flags), _run(tmp_path, "b", *flags)
    plain = _run(tmp_path, "plain")
    assert [r["participation"] for r in a["rounds"]] == [r["participation"] for r in b["rounds"]]
    assert [r["accuracy"] for r in a["rounds"]] == [r["accuracy"] for r in b["rounds"]]
    for record in a["rounds"]:
        p = record["participation"]
        assert p["available"] <= 40 and p["checked_in"] <= p["available"]
        assert p["updates"] <= p["trained"] <= p["admitted"] <= p["checked_in"]
        assert p["updates"] == record["updates"]
    # Half the fleet online at most: fewer than all 40 available, every round.
    assert all(r["participation"]["available"] < 40 for r in a["rounds"])
    assert all(r["participation"]["available"] == 40 for r in plain["rounds"])
    # Three-second sessions end mid-round: some admitted devices never report.
    assert a["final"]["dropouts"]["unavailable"] > 0
    assert plain["final"]["dropouts"]["unavailable"] == 0


def test_async_buffers_see_devices_come_and_go_and_late_updates_count(tmp_path: Path) -> None:
    """FedBuff under availability: only online devices check in; three-second sessions
    end mid-training, so devices vanish holding their update (their places lapse at the
    deadline) and send it when next online; every buffer still fills, reproducibly."""
    flags = ["--mode", "async", "--availability", "diurnal:peak=0.5,trough=0.2,session=0.05"]
    a, b = _run(tmp_path, "a", *flags), _run(tmp_path, "b", *flags)
    plain = _run(tmp_path, "plain", "--mode", "async")

    def same(report: dict[str, Any]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k != "wall_seconds"} for r in report["rounds"]]

    assert same(a) == same(b)
    assert [r["status"] for r in a["rounds"]] == ["closed"] * 5
    for record in a["rounds"]:
        p = record["participation"]
        assert p["available"] < 40 and p["admitted"] <= p["checked_in"]
        assert p["updates"] == record["updates"] == len(record["participants"]) == 6
    vanished = sum(r["dropouts"]["unavailable"] for r in a["rounds"])
    trained_on_time = sum(r["participation"]["trained"] for r in a["rounds"])
    assert vanished > 0 and trained_on_time < 30  # some of the 30 updates came in late
    assert all(r["participation"]["available"] == 40 for r in plain["rounds"])
    assert sum(r["dropouts"]["unavailable"] for r in plain["rounds"]) == 0
    # Offline devices wait: the buffers take simulated time the always-online fleet does not.
    assert a["rounds"][-1]["simulated_seconds"] > plain["rounds"][-1]["simulated_seconds"]


def test_available_counts_devices_in_their_window_and_in_a_session() -> None:
    from fedclient.sim.config import SimulationConfig
    from fedclient.sim.datasets import load_dataset
    from fedclient.sim.registry import register_devices

    config = SimulationConfig(
        dataset="synthetic", devices=3000, seed=4, fleet="diurnal", availability="diurnal"
    )
    data = load_dataset("synthetic", seed=4)
    registry = register_devices(config, config.plan(data), data)
    for now in (600.0, 7 * 3600.0, 30 * 3600.0):
        each = [registry.online(i, now) for i in range(len(registry))]
        assert registry.available(now) == sum(each)
        # Both filters bite: the fleet's 8-hour windows and the sessions.
        windows = sum(registry.profiles.online(i, now) for i in range(len(registry)))
        assert 0 < sum(each) < windows < len(registry)


def test_each_round_s_line_says_how_many_were_online(tmp_path: Path, capsys: Any) -> None:
    trace = tmp_path / "online.csv"
    trace.write_text("device,start,end\n0,0,86400\n1,0,1\n")
    flags = [a for a in RUN if a != "--quiet"]
    report = tmp_path / "r.json"
    assert fedsim([*flags, "--availability", f"trace:{trace}", "--report", str(report)]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("round")]
    online = [r["participation"]["available"] for r in json.loads(report.read_text())["rounds"]]
    assert [line.split("online ")[1].split()[0] for line in lines] == [str(n) for n in online]
    assert fedsim([*flags, "--report", str(report)]) == 0  # always online: nothing to say
    assert "online" not in capsys.readouterr().err


def test_devices_that_come_online_while_a_round_is_open_join_it(tmp_path: Path) -> None:
    """A round that opens with too few devices online does not wait for its deadline with
    places empty: devices that come online meanwhile check in (a look every
    ARRIVAL_STEP seconds), train from then on, and fill it, as fedserver admits them."""
    trace = tmp_path / "online.csv"
    # Trace device 0 is online all day; devices 1-9 from the 90th second on. In a fleet of
    # 40, devices 0, 10, 20 and 30 are online when round 1 opens: 4 of the 6 it needs.
    rows = ["0,0,86400", *(f"{k},90,86400" for k in range(1, 10))]
    trace.write_text("device,start,end\n" + "\n".join(rows) + "\n")
    flags = ["--availability", f"trace:{trace}"]
    a, b = _run(tmp_path, "a", *flags), _run(tmp_path, "b", *flags)

    def same(report: dict[str, Any]) -> list[dict[str, Any]]:
        return [{k: v for k, v in r.items() if k != "wall_seconds"} for r in report["rounds"]]

    assert same(a) == same(b)
    first = a["rounds"][0]
    p = first["participation"]
    assert p["available"] == 4
    assert p["joined_late"] >= 2 and p["admitted"] == 4 + p["joined_late"]
    assert first["updates"] == 6 and first["status"] == "closed"
    late = [i for i in first["participants"] if i % 10]
    assert late, first["participants"]  # devices that came online at 90 s counted
    # They checked in at the first look after 90 s (120 s), long before the deadline.
    assert ARRIVAL_STEP * 2 <= first["round_seconds"] < 600
    # Later rounds open with every device online: nobody needs to join late.
    assert all(r["participation"]["joined_late"] == 0 for r in a["rounds"][1:])
    assert "joined_late" not in _run(tmp_path, "plain")["rounds"][0]["participation"]
