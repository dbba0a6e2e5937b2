"""fedsim at fleet scale: devices registered as columns, materialised only while they work,
and Synthetic(alpha, beta) drawn per device from its id and the seed."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from fedclient import InvalidInput
from fedclient.sim.cli import main as fedsim
from fedclient.sim.config import SimulationConfig
from fedclient.sim.datasets import load_dataset
from fedclient.sim.devices import PRESETS, draw_profile_columns, draw_profiles
from fedclient.sim.fleet import DEVICES_PER_STATE_FILE, Fleet, SimServer
from fedclient.sim.registry import register_devices
from fedclient.sim.synthetic import (
    CLASSES,
    FEATURES,
    MAX_EXAMPLES,
    MIN_EXAMPLES,
    SyntheticDevices,
)


def _run(tmp_path: Path, name: str, *flags: str) -> dict[str, Any]:
    out = tmp_path / f"{name}.json"
    assert fedsim(["run", *flags, "--quiet", "--no-plot", "--report", str(out)]) == 0
    return json.loads(out.read_text())  # type: ignore[no-any-return]


@pytest.mark.parametrize("fleet", sorted(PRESETS))
def test_profile_columns_hold_the_profiles_drawn_one_by_one(fleet: str) -> None:
    listed = draw_profiles(500, np.random.default_rng(7), fleet)
    columns = draw_profile_columns(500, np.random.default_rng(7), fleet)
    assert [columns.profile(i) for i in range(500)] == listed
    for now in (0.0, 5 * 3600.0, 17.5 * 3600.0):
        online = [p.online(now) for p in listed]
        assert [columns.online(i, now) for i in range(500)] == online
        assert columns.online_count(now) == sum(online)


def test_a_synthetic_device_holds_the_same_data_whenever_it_is_asked() -> None:
    devices = SyntheticDevices(1.0, 1.0, seed=3)
    x, y = devices.device_data(12_345_678)
    again_x, again_y = SyntheticDevices(1.0, 1.0, seed=3).device_data(12_345_678)
    assert np.array_equal(x, again_x) and np.array_equal(y, again_y)
    assert x.shape == (devices.size(12_345_678), FEATURES) and x.dtype == np.float32
    assert y.dtype == np.int64 and set(np.unique(y)) <= set(range(CLASSES))
    other_x, _ = devices.device_data(12_345_679)
    assert len(other_x) != len(x) or not np.array_equal(other_x, x)
    assert not np.array_equal(SyntheticDevices(1.0, 1.0, seed=4).device_data(12_345_678)[0], x)


def test_synthetic_sizes_follow_a_power_law_between_the_bounds() -> None:
    devices = SyntheticDevices(seed=1)
    sizes = np.array([devices.size(i) for i in range(4000)])
    assert sizes.min() >= MIN_EXAMPLES and sizes.max() <= MAX_EXAMPLES
    # A Pareto tail of exponent 1.5 above 20: median 20 * 2 ** (1 / 1.5) ~ 31.7, and a
    # long tail (P(size >= 200) = 10 ** -1.5 ~ 3%), not a lognormal's or a constant's.
    assert 28 <= np.median(sizes) <= 36
    assert 0.015 <= np.mean(sizes >= 200) <= 0.05


def test_alpha_zero_gives_every_device_the_shared_model() -> None:
    same = SyntheticDevices(0.0, 1.0, seed=2)
    weights, bias = same.shared
    for device in (0, 99, 5_000_000):
        x, y = same.device_data(device)
        assert np.array_equal(y, np.argmax(x.astype(np.float64) @ weights + bias, axis=1))
    # With alpha = 1 the devices' own models disagree with the shared one.
    apart = SyntheticDevices(1.0, 1.0, seed=2)
    x, y = apart.device_data(99)
    weights, bias = apart.shared
    assert not np.array_equal(y, np.argmax(x.astype(np.float64) @ weights + bias, axis=1))


def test_the_synthetic_test_set_does_not_depend_on_the_fleet() -> None:
    data = load_dataset("synthetic:0.5,0.5", seed=1)
    assert data.generated == SyntheticDevices(0.5, 0.5, 1)
    assert data.x_test.shape == (10_000, FEATURES) and len(data.x_train) == 0
    x, y = SyntheticDevices(0.5, 0.5, 1).held_out(0, 50)
    assert np.array_equal(data.x_test[:50], x) and np.array_equal(data.y_test[:50], y)
    with pytest.raises(InvalidInput, match="synthetic or synthetic:ALPHA,BETA"):
        load_dataset("synthetic:1", seed=1)


@pytest.mark.anyio
async def test_a_device_is_materialised_while_it_works_and_released_after() -> None:
    config = SimulationConfig(dataset="synthetic", devices=2_000_000, seed=1)
    data = load_dataset("synthetic", seed=1)
    plan = config.plan(data)
    registry = register_devices(config, plan, data)
    assert len(registry) == 2_000_000 and registry.parts is None
    server = SimServer("http://unused.local", httpx.MockTransport(lambda r: httpx.Response(500)))
    fleet = Fleet(config, plan, data, server, None, registry)
    try:
        far_apart = [3, 1_999_999, 1_000_000]
        for i in far_apart:
            device = fleet.activate(i, 1)
            assert device.size == data.generated.size(i)  # type: ignore[union-attr]
            assert device.profile == registry.profile(i)
        assert sorted(fleet.active) == sorted(far_apart)
        # Devices far apart in the fleet share a database in memory: one per
        # DEVICES_PER_STATE_FILE devices that worked, not one per index range.
        assert len(fleet.shards) == 1 and len(far_apart) < DEVICES_PER_STATE_FILE
        await fleet.rest()
        assert fleet.active == {}
        assert (await fleet.totals())["bytes_up"] == 0
    finally:
        fleet.close()


def test_a_synthetic_fleet_of_a_million_runs_and_reproduces(tmp_path: Path) -> None:
    flags = [
        "--dataset", "synthetic:0.5,0.5", "--devices", "1000000", "--devices-per-round", "8",
        "--rounds", "3", "--seed", "5",
    ]  # fmt: skip
    a = _run(tmp_path, "a", *flags)
    b = _run(tmp_path, "b", *flags)
    machine = ("wall_seconds", "startup_seconds", "peak_rss_mb")
    # The machine's figures are there: the run's time, its start-up, its peak memory
    # (at least the registry's three columns of a million float64s: 24 MB).
    final = a["final"]
    assert 0 < final["startup_seconds"] < final["wall_seconds"]
    assert final["peak_rss_mb"] > 24
    for report in (a, b):
        report["final"] = {k: v for k, v in report["final"].items() if k not in machine}
        for record in report["rounds"]:
            record.pop("wall_seconds")
    assert a == b
    assert a["final"]["devices"] == 1_000_000 and a["final"]["rounds_completed"] == 3
    for record in a["rounds"]:
        assert record["participation"]["available"] == 1_000_000
        assert record["participation"]["updates"] == record["updates"] == 8
        assert all(0 <= i < 1_000_000 for i in record["participants"])
    assert a["plan"]["model"]["inputs"] == FEATURES and a["plan"]["model"]["kind"] == "softmax"


def test_state_files_of_a_fleet_of_millions_fit_a_laptop_s_open_file_limit(
    tmp_path: Path,
) -> None:
    """--state-dir with a million devices under macOS's default `ulimit -n 256`: the
    blocks of 1,024 devices take turns in at most STATE_FILES files, each device's file
    a function of its index alone. A second run on the folder, whose devices the first
    run's in-process server enrolled, is refused in one line, not at its first device."""
    import resource
    import subprocess
    import sys

    from fedclient.sim.fleet import STATE_FILES

    state = tmp_path / "state"
    argv = [sys.executable, "-m", "fedclient.sim.cli", "run", "--dataset", "synthetic",
            "--devices", "1000000", "--devices-per-round", "200", "--rounds", "1",
            "--seed", "4", "--quiet", "--no-plot", "--state-dir", str(state)]  # fmt: skip

    def limited() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    runs = [
        subprocess.run(
            [*argv, "--report", str(tmp_path / f"{run}.json")],
            preexec_fn=limited,
            capture_output=True,
            text=True,
            timeout=600,
        )
        for run in ("first", "again")
    ]
    assert runs[0].returncode == 0, runs[0].stderr[-2000:]
    assert runs[1].returncode != 0 and "holds the devices of an earlier run" in runs[1].stderr
    assert "Traceback" not in runs[1].stderr and not (tmp_path / "again.json").exists()
    files = sorted(state.glob("devices-*.sqlite"))
    assert 1 < len(files) <= STATE_FILES
    worked = json.loads((tmp_path / "first.json").read_text())["rounds"][0]["participants"]
    assert {f"devices-{i // 1024 % STATE_FILES:04d}.sqlite" for i in worked} <= {
        f.name for f in files
    }


@pytest.mark.parametrize(
    ("flags", "refusal"),
    [
        (["--partition", "dirichlet:0.5"], "draws each device's own data"),
        (["--holdout", "10"], "it has no set"),
        (["--per-device", "--devices", "100001"], "at most 100,000"),
        (["--personalize", "1", "--devices", "100001"], "at most 100,000"),
    ],
)
def test_a_generated_data_set_refuses_what_needs_a_split(
    tmp_path: Path, capsys: Any, flags: list[str], refusal: str
) -> None:
    out = tmp_path / "r.json"
    code = fedsim(["run", "--dataset", "synthetic", "--devices", "50", "--rounds", "1",
                   *flags, "--quiet", "--no-plot", "--report", str(out)])  # fmt: skip
    assert code != 0 and refusal in capsys.readouterr().err
    assert not out.exists()


def test_synthetic_devices_evaluate_and_personalise_on_their_own_distribution(
    tmp_path: Path,
) -> None:
    """LEAF's per-device view of Synthetic(1, 1): each device holds out examples drawn
    from its own model and features (a fifth as many as it trains on), measures the
    global model on them ([evaluate], --per-device), and fine-tunes on its own data
    (--personalize), which its distribution rewards far more than the global model."""
    plan = tmp_path / "plan.toml"
    plan.write_text(
        '[job]\nname = "synthetic"\nrounds = 3\ndevices_per_round = 20\nseed = 3\n'
        '[model]\nkind = "softmax"\ninputs = 60\nclasses = 10\n'
        "[train]\nepochs = 1\n[evaluate]\nevery = 1\n"
    )
    flags = ["--plan", str(plan), "--dataset", "synthetic", "--devices", "300", "--seed", "3",
             "--per-device", "--personalize", "2", "--max-examples", "60"]  # fmt: skip
    report = _run(tmp_path, "a", *flags)
    assert _run(tmp_path, "b", *flags)["devices"] == report["devices"]
    devices = SyntheticDevices(seed=3)
    for entry in report["devices"][:20]:
        size = min(devices.size(entry["device"]), 60)
        assert entry["examples"] == size and entry["held_out"] == max(1, size // 5)
    assert max(e["examples"] for e in report["devices"]) == 60  # --max-examples holds
    assert all(r["evaluated"] >= 1 for r in report["rounds"])  # devices measured the model
    assert report["final"]["device_accuracy"]["devices"] == 300
    final = report["final"]
    assert final["personalized_accuracy"] > final["global_accuracy_on_devices"] + 0.2


def test_a_fleet_of_millions_draws_its_check_in_order_as_it_goes() -> None:
    import itertools

    from fedclient.sim.registry import LAZY_ORDER_DEVICES

    config = SimulationConfig(dataset="synthetic", devices=LAZY_ORDER_DEVICES + 1, seed=2)
    data = load_dataset("synthetic", seed=2)
    registry = register_devices(config, config.plan(data), data)
    order, failure = registry.checkin_order(2, 1)
    first = list(itertools.islice(order, 5000))
    assert len(set(first)) == 5000 and all(0 <= i < len(registry) for i in first)
    again, failure_again = registry.checkin_order(2, 1)
    assert list(itertools.islice(again, 5000)) == first
    assert [failure(i) for i in first[:50]] == [failure_again(i) for i in first[:50]]
    assert all(0 <= failure(i) < 1 for i in first[:50])
    other, _ = registry.checkin_order(2, 2)
    assert list(itertools.islice(other, 5000)) != first
    # Spread over the fleet, not its first devices: a uniform draw's mean index.
    assert abs(np.mean(first) / len(registry) - 0.5) < 0.02
    # A fleet up to the threshold keeps the permutation every earlier run drew.
    small = register_devices(
        SimulationConfig(dataset="synthetic", devices=1000, seed=2), config.plan(data), data
    )
    order, _ = small.checkin_order(2, 1)
    assert list(order) == np.random.default_rng([2, 1]).permutation(1000).tolist()


def test_the_async_line_keeps_the_order_a_deque_of_the_fleet_would() -> None:
    """fedsim --mode async's line of idle devices holds only those sent back; it gives
    them in the order a deque of the whole fleet's permutation would."""
    from collections import deque

    from fedclient.sim.buffered import Line

    order = np.random.default_rng(9).permutation(50).tolist()
    line, reference = Line(iter(order), 50), deque(order)
    ops = np.random.default_rng(10)
    out: list[int] = []
    for _ in range(400):
        assert len(line) == len(reference)
        if not reference or ops.random() < 0.4:
            if out:  # a device that finished (or was passed over) joins the end
                back = out.pop(int(ops.integers(len(out))))
                line.append(back)
                reference.append(back)
            continue
        assert line.first() == reference[0]
        if ops.random() < 0.5:  # offline: it waits for its next turn
            line.append(line.popleft())
            reference.append(reference.popleft())
        else:
            out.append(line.popleft())
            assert out[-1] == reference.popleft()


def test_an_async_fleet_of_millions_draws_its_line_as_it_goes(tmp_path: Path) -> None:
    from fedclient.sim.registry import LAZY_ORDER_DEVICES

    devices = LAZY_ORDER_DEVICES + 1
    flags = ["--dataset", "synthetic", "--devices", str(devices), "--devices-per-round", "4",
             "--rounds", "2", "--mode", "async", "--seed", "6"]  # fmt: skip
    report = _run(tmp_path, "async", *flags)
    assert [r["updates"] for r in report["rounds"]] == [4, 4]
    participants = [i for r in report["rounds"] for i in r["participants"]]
    assert all(0 <= i < devices for i in participants)
    # Drawn over the whole fleet as the line asks for devices, not its first ones.
    assert max(participants) > devices // 10


def test_every_device_of_a_lazy_order_comes_once() -> None:
    from fedclient.sim.registry import distinct_order

    for n in (1, 2, 7, 4097, 10_007):
        drawn = list(distinct_order(n, np.random.default_rng(n)))
        assert sorted(drawn) == list(range(n))
