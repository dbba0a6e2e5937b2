"""fedsim: reports, plots, reproducibility, partitions and data loading."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import sqlite_utils

from fedclient import DeviceState, InvalidInput
from fedclient.sim.cli import main as fedsim
from fedclient.sim.datasets import _features, load_dataset, partition
from tests.conftest import SHARED_DATA

SMALL = [
    "run",
    "--dataset",
    "digits",
    "--devices",
    "20",
    "--devices-per-round",
    "5",
    "--rounds",
    "4",
    "--partition",
    "dirichlet:0.5",
    "--epochs",
    "2",
    "--quiet",
]


def _run(tmp_path: Path, name: str, *extra: str) -> dict[str, Any]:
    report = tmp_path / f"{name}.json"
    assert fedsim([*SMALL, *extra, "--report", str(report)]) == 0
    return json.loads(report.read_text())  # type: ignore[no-any-return]


def _without_wall_time(report: dict[str, Any]) -> dict[str, Any]:
    rounds = [{k: v for k, v in r.items() if k != "wall_seconds"} for r in report["rounds"]]
    # The machine's figures (wall time, start-up, peak memory) differ run to run.
    machine = ("wall_seconds", "startup_seconds", "peak_rss_mb")
    final = {k: v for k, v in report["final"].items() if k not in machine}
    return {**report, "rounds": rounds, "final": final}


def test_a_run_writes_a_report_and_a_plot(tmp_path: Path, capsys: Any) -> None:
    report = _run(tmp_path, "a", "--seed", "4")
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3, 4]
    first, last = report["rounds"][0], report["rounds"][-1]
    assert last["accuracy"] > first["accuracy"]
    for key in (
        "accuracy",
        "loss",
        "bytes_up",
        "bytes_down",
        "wall_seconds",
        "simulated_seconds",
        "rounds_completed",
    ):
        assert report["final"][key] is not None, key
    assert report["final"]["rounds_completed"] == 4
    assert report["final"]["bytes_up"] == sum(r["bytes_up"] for r in report["rounds"])
    assert all(r["updates"] == 5 for r in report["rounds"])
    # Simulated time is that of the devices' profiles, not the wall clock.
    assert report["final"]["simulated_seconds"] > report["final"]["wall_seconds"]
    assert report["plan"]["job"]["seed"] == 4 and report["config"]["partition"] == "dirichlet:0.5"
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "final accuracy" in capsys.readouterr().out


def test_state_in_files_gives_the_report_of_state_in_memory(tmp_path: Path) -> None:
    in_memory = _run(tmp_path, "memory", "--seed", "3")
    kept = tmp_path / "state"
    in_files = _run(tmp_path, "files", "--seed", "3", "--state-dir", str(kept), "--no-plot")
    assert not (tmp_path / "files.png").exists() and (tmp_path / "memory.png").exists()
    in_files["config"]["state_dir"] = None
    assert _without_wall_time(in_files) == _without_wall_time(in_memory)
    # The devices' state outlives the run there: every accepted update has its receipt.
    job = in_files["plan"]["job"]["name"]
    (path,) = kept.glob("devices-*.sqlite")  # 20 devices: one database
    db = sqlite_utils.Database(path)
    receipts = sum(len(DeviceState(db, key=f"device-{i}").receipts(job)) for i in range(20))
    assert receipts == sum(r["updates"] for r in in_files["rounds"]) > 0


def test_the_same_seed_gives_the_same_report(tmp_path: Path) -> None:
    a, b = _run(tmp_path, "a", "--seed", "1"), _run(tmp_path, "b", "--seed", "1")
    c = _run(tmp_path, "c", "--seed", "2")
    assert _without_wall_time(a) == _without_wall_time(b)
    assert [r["accuracy"] for r in a["rounds"]] != [r["accuracy"] for r in c["rounds"]]


def test_a_holdout_is_kept_off_every_device(tmp_path: Path) -> None:
    data = load_dataset("digits", seed=0)
    held = data.holdout(300, seed=1)
    assert len(held) == len(set(held.tolist())) == 300
    np.testing.assert_array_equal(held, data.holdout(300, seed=1))  # the seed draws it
    assert not np.array_equal(held, data.holdout(300, seed=2))
    rest = data.without(held)
    kept = np.setdiff1d(np.arange(len(data.y_train)), held)
    np.testing.assert_array_equal(rest.x_train, data.x_train[kept])  # the others, in order
    np.testing.assert_array_equal(rest.y_train, data.y_train[kept])
    assert rest.x_test is data.x_test  # the test set is the test set
    with pytest.raises(InvalidInput, match="--holdout"):
        data.holdout(len(data.y_train), seed=1)
    held_run = _run(tmp_path, "held", "--seed", "1", "--holdout", "300")
    full_run = _run(tmp_path, "full", "--seed", "1")
    assert held_run["config"]["holdout"] == 300 and full_run["config"]["holdout"] == 0
    accuracies = [[r["accuracy"] for r in run["rounds"]] for run in (held_run, full_run)]
    assert accuracies[0] != accuracies[1]


def test_a_short_deadline_fails_rounds_cleanly(tmp_path: Path) -> None:
    report = _run(tmp_path, "d", "--seed", "1", "--deadline-seconds", "0.01", "--rounds", "3")
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    assert [r["status"] for r in report["rounds"]] == ["failed", "failed", "failed"]
    assert all(r["model_version"] == 0 and r["updates"] == 0 for r in report["rounds"])
    assert report["rounds"][0]["discarded"] == report["rounds"][0]["admitted"] == 5
    assert report["final"]["rounds_failed"] == 3


def test_bad_arguments_exit_with_a_clear_message(tmp_path: Path, capsys: Any) -> None:
    assert (
        fedsim(["run", "--dataset", "nope", "--quiet", "--report", str(tmp_path / "x.json")]) == 2
    )
    assert fedsim(["run", "--partition", "dirichlet:-1", "--report", str(tmp_path / "x.json")]) == 2
    assert "positive number" in capsys.readouterr().err
    assert fedsim([*SMALL, "--workers", "-1", "--report", str(tmp_path / "x.json")]) == 2
    assert "--workers" in capsys.readouterr().err
    assert fedsim([*SMALL, "--inline-model-max", "-1", "--report", str(tmp_path / "x.json")]) == 2
    assert "--inline-model-max" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_training_on_worker_processes_gives_the_same_report(tmp_path: Path) -> None:
    inline = _run(tmp_path, "inline", "--seed", "5", "--no-plot")
    pooled = _run(tmp_path, "pooled", "--seed", "5", "--no-plot", "--workers", "2")
    assert pooled["config"]["workers"] == 2
    pooled["config"]["workers"] = 1
    assert _without_wall_time(pooled) == _without_wall_time(inline)
    assert pooled["final"]["rounds_completed"] == 4


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.1", "dirichlet:10", "shards:2"])
def test_partitions_cover_every_example_once(scheme: str) -> None:
    y = np.random.default_rng(0).integers(0, 10, 1000)
    parts = partition(y, 50, scheme, np.random.default_rng(1))
    assert len(parts) == 50 and all(len(p) >= 1 for p in parts)
    assert np.array_equal(np.sort(np.concatenate(parts)), np.arange(1000))
    again = partition(y, 50, scheme, np.random.default_rng(1))
    assert all(np.array_equal(p, q) for p, q in zip(parts, again, strict=True))


def test_dirichlet_skews_labels_more_as_alpha_shrinks() -> None:
    y = np.repeat(np.arange(10), 200)

    def classes_per_device(scheme: str) -> float:
        parts = partition(y, 40, scheme, np.random.default_rng(0))
        return float(np.mean([len(np.unique(y[p])) for p in parts]))

    assert (
        classes_per_device("dirichlet:0.1")
        < classes_per_device("dirichlet:1")
        < classes_per_device("iid")
    )
    assert classes_per_device("shards:2") <= 2


def test_unknown_partition_and_too_many_devices_are_refused() -> None:
    y = np.zeros(10, int)
    with pytest.raises(InvalidInput):
        partition(y, 5, "zipf:2", np.random.default_rng(0))
    with pytest.raises(InvalidInput):
        partition(y, 11, "iid", np.random.default_rng(0))


def test_digits_split_is_stratified_and_disjoint() -> None:
    data = load_dataset("digits", seed=0)
    assert len(data.y_train) + len(data.y_test) == 1797
    assert np.bincount(data.y_test).min() >= 35
    assert data.x_train.dtype == np.float32 and data.x_train.max() <= 1.0


@pytest.mark.skipif(
    not (SHARED_DATA / "mnist").is_dir(),
    reason=f"MNIST files not found in {SHARED_DATA}/mnist (set FEDCLIENT_DATA)",
)
def test_mnist_loads_from_the_idx_files() -> None:
    data = load_dataset("mnist", SHARED_DATA)
    assert data.x_train.shape == (60_000, 784) and data.x_test.shape == (10_000, 784)
    assert set(np.unique(data.y_train)) == set(range(10))
    x = data.train_features()
    assert x.dtype == np.float32 and x.min() == 0.0 and x.max() == 1.0
    assert data.x_test.dtype == np.float32 and data.x_test.max() == 1.0
    # A device's rows are the same features, scaled as it gets them.
    rows = np.array([7, 0, 59_999])
    features, labels = data.device_data(rows)
    assert features.dtype == np.float32 and np.array_equal(features, x[rows])
    assert np.array_equal(labels, data.y_train[rows])


def test_pixels_scale_to_the_float64_quotient_rounded_once() -> None:
    # Every byte value: the float32 division gives what x / 255.0 cast to float32 gives.
    pixels = np.arange(256, dtype=np.uint8).reshape(1, 256)
    expected = (pixels / 255.0).astype(np.float32)
    got = _features(pixels)
    assert got.dtype == np.float32 and np.array_equal(got, expected)
    floats = np.ones((2, 3), np.float32)
    assert _features(floats) is floats


def test_mnist_without_a_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="data-dir"):
        load_dataset("mnist")
    with pytest.raises(InvalidInput, match="missing"):
        load_dataset("mnist", tmp_path)


def test_a_damaged_mnist_file_is_a_clear_error(tmp_path: Path, capsys: Any) -> None:
    folder = tmp_path / "mnist"
    folder.mkdir()
    idx = gzip.compress(b"\x00\x00\x08\x01" + (4).to_bytes(4, "big") + bytes(4))
    for name in ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1"):
        (folder / f"{name}-ubyte.gz").write_bytes(idx)
    damaged = folder / "train-images-idx3-ubyte.gz"
    damaged.write_bytes(
        idx[:-6]
    )  # cut short (fedsim reads it on a thread: fedclient.sim._prefetch)
    run = ["run", "--dataset", "mnist", "--data-dir", str(tmp_path), "--devices", "2", "--quiet"]
    assert fedsim([*run, "--report", str(tmp_path / "r.json")]) == 2
    assert damaged.name in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
    damaged.write_bytes(b"not gzip at all")
    with pytest.raises(InvalidInput, match="cannot read"):
        load_dataset("mnist", tmp_path)


def _write_mnist(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Tiny MNIST-format files: gzip'd IDX (magic, dims, uint8 data)."""
    folder.mkdir(parents=True, exist_ok=True)

    def idx(a: np.ndarray) -> bytes:
        dims = b"".join(d.to_bytes(4, "big") for d in a.shape)
        return gzip.compress(bytes([0, 0, 8, a.ndim]) + dims + a.astype(np.uint8).tobytes())

    for split in ("train", "t10k"):
        (folder / f"{split}-images-idx3-ubyte.gz").write_bytes(idx(images))
        (folder / f"{split}-labels-idx1-ubyte.gz").write_bytes(idx(labels))


def test_decompressed_files_are_cached_and_follow_their_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    monkeypatch.setenv("FEDSIM_CACHE_DIR", str(cache))
    images = np.arange(6 * 4, dtype=np.uint8).reshape(6, 2, 2)
    labels = np.array([0, 1, 2, 0, 1, 2], np.uint8)
    _write_mnist(tmp_path / "mnist", images, labels)
    first = load_dataset("mnist", tmp_path)
    assert len(list(cache.iterdir())) == 4  # one decompressed copy per file

    def no_gunzip(data: bytes) -> bytes:
        raise AssertionError("decompressed again")

    monkeypatch.setattr(gzip, "decompress", no_gunzip)
    again = load_dataset("mnist", tmp_path)  # from the cache: nothing is inflated
    assert np.array_equal(again.x_train, first.x_train)
    assert np.array_equal(again.y_test, first.y_test)
    monkeypatch.undo()
    monkeypatch.setenv("FEDSIM_CACHE_DIR", str(cache))

    # A changed source is decompressed again, not served stale from the cache.
    _write_mnist(tmp_path / "mnist", images[::-1], labels[::-1])
    changed = load_dataset("mnist", tmp_path)
    assert np.array_equal(changed.x_train, images[::-1].reshape(6, 4))
    # A cached copy cut short (a full disk, say) is ignored and made whole again.
    for copy in cache.glob("*train-images*"):
        copy.write_bytes(copy.read_bytes()[:-3])
    assert np.array_equal(load_dataset("mnist", tmp_path).x_train, changed.x_train)
    # Off, or impossible to write: the data loads all the same.
    for setting in ("off", str(tmp_path / "mnist" / "train-labels-idx1-ubyte.gz")):
        monkeypatch.setenv("FEDSIM_CACHE_DIR", setting)
        assert np.array_equal(load_dataset("mnist", tmp_path).y_train, labels[::-1])
    assert sorted(p.name for p in (tmp_path / "mnist").iterdir()) == [
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
    ]


@pytest.mark.parametrize("content", [b"junk", b"PK\x03\x04 cut short"])
def test_a_damaged_npz_file_is_a_clear_error(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "femnist").mkdir()
    (tmp_path / "femnist" / "femnist_leaf_subset.npz").write_bytes(content)
    (tmp_path / "mine.npz").write_bytes(content)
    with pytest.raises(InvalidInput, match="cannot read"):
        load_dataset("femnist", tmp_path)
    with pytest.raises(InvalidInput, match="cannot read"):
        load_dataset(f"npz:{tmp_path / 'mine.npz'}")


def test_faults_cost_retries_and_bytes_but_not_accuracy(tmp_path: Path) -> None:
    clean = _run(tmp_path, "clean", "--seed", "3")
    faulty = _run(tmp_path, "faulty", "--seed", "3", "--faults", "drop=0.3")
    again = _run(tmp_path, "again", "--seed", "3", "--faults", "drop=0.3")
    assert _without_wall_time(faulty) == _without_wall_time(again)  # faults come from the seed
    assert clean["final"]["retries"] == 0 and clean["final"]["wasted_bytes"] == 0
    assert faulty["final"]["retries"] > 10 and faulty["final"]["wasted_bytes"] > 0
    # Models downloaded on their own (not with the admission): those cut mid-body go on.
    resets = _run(
        tmp_path, "resets", "--seed", "3", "--faults", "reset=0.4", "--inline-model-max", "0"
    )
    assert resets["final"]["resumed_transfers"] > 0
    assert faulty["final"]["rounds_completed"] == 4
    assert abs(faulty["final"]["accuracy"] - clean["final"]["accuracy"]) <= 0.02
    assert faulty["final"]["simulated_seconds"] > clean["final"]["simulated_seconds"]
    assert faulty["config"]["faults"] == "drop=0.3"


def test_a_model_that_comes_with_the_admission_saves_a_round_trip(tmp_path: Path) -> None:
    inline = _run(tmp_path, "inline", "--seed", "5")
    apart = _run(tmp_path, "apart", "--seed", "5", "--inline-model-max", "0")
    assert inline["config"]["inline_model_max"] > 0 == apart["config"]["inline_model_max"]
    # The same training (the same bytes of model reach each device), one latency less
    # a device-round, and one response's headers less.
    assert [r["accuracy"] for r in inline["rounds"]] == [r["accuracy"] for r in apart["rounds"]]
    assert inline["final"]["bytes_up"] < apart["final"]["bytes_up"]
    assert inline["final"]["bytes_down"] < apart["final"]["bytes_down"]
    assert inline["final"]["simulated_seconds"] < apart["final"]["simulated_seconds"]


def test_a_slow_tail_fleet_with_a_deadline_drops_devices_by_cause(tmp_path: Path) -> None:
    args = (
        "--seed",
        "5",
        "--fleet",
        "slow-tail",
        "--deadline-seconds",
        "20",
        "--over-selection",
        "1.6",
    )
    a, b = _run(tmp_path, "a", *args), _run(tmp_path, "b", *args)
    assert _without_wall_time(a) == _without_wall_time(b)
    dropouts = a["final"]["dropouts"]
    assert dropouts["deadline"] > 0
    assert set(dropouts) == {"deadline", "over_selection", "unavailable", "network", "budget"}
    assert sum(r["dropouts"]["deadline"] for r in a["rounds"]) == dropouts["deadline"]


def test_a_fleet_from_a_trace_file(tmp_path: Path) -> None:
    trace = tmp_path / "fleet.csv"
    trace.write_text(
        "examples_per_second,bandwidth_up,bandwidth_down,latency,failure_rate\n"
        "100,1e6,1e6,0.01,0\n"
        "1,1e3,1e3,0.5,0\n"
    )
    report = _run(
        tmp_path, "t", "--seed", "1", "--fleet", f"trace:{trace}", "--deadline-seconds", "30"
    )
    # Every second device is hopelessly slow: it leaves rounds it cannot finish.
    assert report["final"]["dropouts"]["deadline"] > 0
    trace.write_text("examples_per_second,latency\n1,1\n")
    assert fedsim([*SMALL, "--fleet", f"trace:{trace}", "--report", str(tmp_path / "x.json")]) == 2


def test_compare_and_replay(tmp_path: Path, capsys: Any) -> None:
    _run(tmp_path, "first", "--seed", "1")
    _run(tmp_path, "second", "--seed", "1", "--faults", "drop=0.2")
    capsys.readouterr()
    assert (
        fedsim(
            [
                "compare",
                str(tmp_path / "first.json"),
                str(tmp_path / "second.json"),
                "--plot",
                str(tmp_path / "both.png"),
            ]
        )
        == 0
    )
    table = capsys.readouterr().out
    assert "first" in table and "second" in table and "accuracy" in table
    assert (tmp_path / "both.png").read_bytes()[:4] == b"\x89PNG"
    assert fedsim(["replay", str(tmp_path / "second.json"), "--quiet"]) == 0
    assert "the same per-round accuracies" in capsys.readouterr().out
    replayed = json.loads((tmp_path / "second.replay.json").read_text())
    assert replayed["config"] == json.loads((tmp_path / "second.json").read_text())["config"]
    assert replayed["versions"]["numpy"] == np.__version__
    (tmp_path / "junk.json").write_text("{}")
    assert fedsim(["compare", str(tmp_path / "junk.json")]) == 2


@pytest.mark.skipif(
    not (SHARED_DATA / "femnist").is_dir(),
    reason=f"FEMNIST file not found in {SHARED_DATA}/femnist (set FEDCLIENT_DATA)",
)
def test_femnist_runs_one_device_per_writer(tmp_path: Path) -> None:
    report = tmp_path / "femnist.json"
    assert (
        fedsim(
            [
                "run",
                "--dataset",
                "femnist",
                "--data-dir",
                str(SHARED_DATA),
                "--partition",
                "natural",
                "--devices-per-round",
                "5",
                "--rounds",
                "2",
                "--epochs",
                "1",
                "--seed",
                "1",
                "--quiet",
                "--report",
                str(report),
            ]
        )
        == 0
    )
    data = json.loads(report.read_text())
    assert data["final"]["devices"] == 105  # the writers with training data
    assert data["plan"]["model"]["classes"] == 62
    assert data["final"]["accuracy"] > 1 / 62


def test_async_federation_beats_sync_on_simulated_time_with_a_slow_tail(tmp_path: Path) -> None:
    common = [
        "run",
        "--dataset",
        "digits",
        "--devices",
        "40",
        "--partition",
        "iid",
        "--seed",
        "3",
        "--fleet",
        "slow-tail",
        "--epochs",
        "2",
        "--quiet",
    ]
    assert (
        fedsim(
            [
                *common,
                "--devices-per-round",
                "8",
                "--rounds",
                "6",
                "--over-selection",
                "1.3",
                "--report",
                str(tmp_path / "sync.json"),
            ]
        )
        == 0
    )
    for name in ("async", "async2"):
        assert (
            fedsim(
                [
                    *common,
                    "--mode",
                    "async",
                    "--devices-per-round",
                    "4",
                    "--rounds",
                    "30",
                    "--over-selection",
                    "2",
                    "--report",
                    str(tmp_path / f"{name}.json"),
                ]
            )
            == 0
        )
    sync = json.loads((tmp_path / "sync.json").read_text())
    fast = json.loads((tmp_path / "async.json").read_text())
    assert _without_wall_time(fast) == _without_wall_time(
        json.loads((tmp_path / "async2.json").read_text())
    )
    assert [r["model_version"] for r in fast["rounds"]] == list(range(1, 31))
    target = sync["final"]["accuracy"]
    reached = next(r for r in fast["rounds"] if r["accuracy"] >= target)
    assert reached["simulated_seconds"] < sync["final"]["simulated_seconds"]


def test_the_fedsim_process_runs_without_httpx_s_command_line_client() -> None:
    # httpx imports its CLI (rich, pygments) when they are installed; fedsim skips it,
    # and the in-process server still answers through httpx.
    code = (
        "import asyncio, sys\n"
        "from fedclient.sim import cli\n"
        "if sys.argv[1] == 'skip':\n"
        "    cli._without_httpx_cli()\n"
        "import httpx\n"
        "from fedclient.server.app import create_app\n"
        "from fedclient.server.service import FederationService\n"
        "from fedclient.server.store import ServerStore\n"
        "app = create_app(FederationService(ServerStore()))\n"
        "async def get():\n"
        "    async with httpx.AsyncClient(transport=httpx.ASGITransport(app)) as c:\n"
        "        return (await c.get('http://t/healthz')).status_code\n"
        "status = asyncio.run(get())\n"
        "print(status, 'pygments' in sys.modules, 'rich.syntax' in sys.modules)\n"
    )
    run = [sys.executable, "-c", code]
    pytest.importorskip("rich")
    cold = subprocess.run([*run, "keep"], capture_output=True, text=True, check=True)
    assert cold.stdout.split() == ["200", "True", "True"]  # what the skip avoids
    skipped = subprocess.run([*run, "skip"], capture_output=True, text=True, check=True)
    assert skipped.stdout.split() == ["200", "False", "False"]


def test_the_fedsim_process_imports_without_collecting_and_runs_collecting(
    tmp_path: Path,
) -> None:
    report = tmp_path / "r.json"
    code = (
        "import gc, sys\n"
        "from fedclient.sim import cli\n"
        f"sys.argv = ['fedsim', *{[*SMALL, '--rounds', '1', '--report', str(report)]!r}]\n"
        "code = cli.console()\n"
        "print(code, gc.isenabled(), gc.get_freeze_count() > 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-3:] == ["0", "True", "True"]
    assert json.loads(report.read_text())["final"]["rounds_completed"] == 1


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
@pytest.mark.parametrize(("preset", "threads"), [(None, 1), ("2", 2)])
def test_the_fedsim_process_loads_openblas_with_one_thread_unless_told_otherwise(
    preset: str | None, threads: int
) -> None:
    code = (
        "import os\n"
        "from fedclient.sim import cli\n"
        "cli._one_blas_thread()\n"
        "import numpy\n"
        "print(os.environ['OPENBLAS_NUM_THREADS'], len(os.listdir('/proc/self/task')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if preset is not None:
        env["OPENBLAS_NUM_THREADS"] = preset
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env
    )
    # The main thread and, told two, OpenBLAS's one other.
    assert out.stdout.split() == [preset or "1", str(threads)]


def test_an_async_job_whose_devices_are_all_turned_away_ends_and_says_so(
    tmp_path: Path, capsys: Any
) -> None:
    """Every device's privacy budget is spent before its first release: no device can
    ever train. The async run ends (it went round its line for ever before) and says
    that no round closed (it failed formatting an accuracy of None before)."""
    report = tmp_path / "r.json"
    spent = "epsilon=1,delta=1e-5,clip=1,budget=1"
    code = fedsim(["run", "--dataset", "digits", "--devices", "10", "--devices-per-round",
                   "5", "--rounds", "3", "--mode", "async", "--seed", "3", "--no-plot",
                   "--dp", spent, "--report", str(report)])  # fmt: skip
    assert code == 0
    assert "final no round closed" in capsys.readouterr().out
    data = json.loads(report.read_text())
    assert data["rounds"] == [] and data["final"]["accuracy"] is None
