"""The same federated workload through Flower's simulation engine and through ``fedsim``.

    python bench/vs_flower.py                    # W2: MNIST, 1,000 devices, 100 a round
    python bench/vs_flower.py --workload w1      # digits MLP, 100 devices, Dirichlet(0.5)
    python bench/vs_flower.py --skip-flower      # fedsim only
    python bench/vs_flower.py --repeats 3        # alternate the engines, report medians
    python bench/vs_flower.py --flower-venv /tmp/venv-flower --data-dir ../shared/data

Run it with the project's interpreter (``/work/venv/bin/python``). Flower is not a
project dependency: the first run creates a venv of its own (``--flower-venv``,
default ``~/.cache/fedclient-bench/venv-flower``) and pip-installs
``flwr[simulation]`` (pinned, see ``FLOWER_REQUIREMENT``) and numpy into it; later
runs reuse it. The Flower side is a ``ClientApp``/``ServerApp`` pair this script
writes to a temp dir and runs with ``flwr.simulation.run_simulation`` in that venv.

Both engines get the same workload: the same train/test data (MNIST from the same
IDX files; for digits, fedsim's own stratified split handed over as arrays), the
same device partition (computed with fedsim's partitioner and seed, handed over as
indices), the same initial weights (the reference server's version-0 model), the
same local training (numpy minibatch SGD on mean cross-entropy, a fresh shuffle
each epoch, float32 weights in PyTorch's ``(out, in)`` layout), FedAvg weighted by
examples over exactly ``devices_per_round`` devices a round, and an evaluation of
the global model on the held-out test set after every round. Which devices are
picked each round and the shuffles differ (each engine draws its own), so the
accuracies agree only up to that randomness.

Each engine runs as one subprocess, timed from outside: the wall clock from launch
to exit, start-up and teardown included (a tiny launcher process starts it, times
it and reads its CPU time and peak RSS). The engine's process and all its
descendants (Ray's raylet, GCS and workers for Flower) are sampled every 0.5 s from
/proc: the peak of their summed PSS, and their CPU time (user + sys).
Installing Flower, byte-compiling fedsim's packages and writing the shared input
files happen before, untimed; so does decompressing MNIST: fedsim keeps the
decompressed files in its cache (``fedclient.sim._prefetch``) and Flower's clients read
those same uncompressed bytes, so neither engine inflates gzip in a timed run.
The load average is printed: on a shared machine use ``--repeats`` and read the
times with it in mind.
"""

from __future__ import annotations

import argparse
import compileall
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedclient.server.rounds import initial_weights
from fedclient.sim import _prefetch
from fedclient.sim.datasets import load_dataset, partition
from fedclient.sim.engine import SimulationConfig

FLOWER_REQUIREMENT = "flwr[simulation]==1.42.0"
DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared/data"
DEFAULT_FLOWER_VENV = Path.home() / ".cache/fedclient-bench/venv-flower"
FEDSIM = Path(sys.executable).with_name("fedsim")


@dataclass(frozen=True)
class Workload:
    """One federated workload, described once for both engines."""

    name: str
    dataset: str
    devices: int
    per_round: int
    rounds: int
    partition: str
    epochs: int
    batch_size: int
    learning_rate: float
    seed: int = 1

    def describe(self) -> str:
        return (
            f"{self.dataset}, {self.devices:,} devices {self.partition}, {self.per_round:,} a "
            f"round, {self.rounds} rounds, {self.epochs} epoch(s), batch {self.batch_size}, "
            f"lr {self.learning_rate}, seed {self.seed}"
        )


WORKLOADS = {
    "w1": Workload("w1", "digits", 100, 20, 40, "dirichlet:0.5", 5, 8, 0.1),
    "w2": Workload("w2", "mnist", 1_000, 100, 5, "iid", 1, 10, 0.1),
    "w3": Workload("w3", "mnist", 10_000, 1_000, 5, "iid", 1, 10, 0.1),
}


@dataclass
class Run:
    """What one engine's run measured."""

    engine: str
    wall_seconds: float
    cpu_seconds: float
    in_run_seconds: float | None
    peak_tree_mb: float | None
    max_process_rss_mb: float
    accuracy: float


# -- the Flower side ---------------------------------------------------------------------

FLOWER_APP = '''
"""Flower side of bench/vs_flower.py (written and run by it, in Flower's own venv).

An importable module (not __main__), so each Ray worker imports it once and keeps
its data cache across the ClientApp calls it serves.
"""

import gzip
import json
import os
import time
from pathlib import Path

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord
from flwr.app import RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation

CONFIG = json.loads(Path(os.environ["VS_FLOWER_CONFIG"]).read_text())
_CACHE = {}


def read_idx(path):
    """A gzip'd IDX file: zero, zero, type 0x08 (ubyte), ndim, big-endian dims, data.

    Read from the decompressed copy fedsim keeps, when the benchmark handed one over:
    both engines then read the same uncompressed bytes."""
    copy = CONFIG.get("decompressed", {}).get(Path(path).name)
    if copy:
        raw = Path(copy).read_bytes()
    else:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
    if raw[:3] != b"\\x00\\x00\\x08":
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load(split):
    """(x, y) for "train" or "test", read once per process; MNIST's x stays uint8."""
    if split not in _CACHE:
        if CONFIG["dataset"] == "mnist":
            folder = Path(CONFIG["mnist_dir"])
            stem = "train" if split == "train" else "t10k"
            x = read_idx(folder / f"{stem}-images-idx3-ubyte.gz")
            y = read_idx(folder / f"{stem}-labels-idx1-ubyte.gz")
            _CACHE[split] = (x.reshape(len(x), -1), y.astype(np.int64))
        else:
            arrays = np.load(CONFIG["arrays"])
            _CACHE[split] = (arrays[f"x_{split}"], arrays[f"y_{split}"])
    return _CACHE[split]


def features(x):
    """Float32 inputs: MNIST pixels / 255 (converted per client, only the rows it needs)."""
    return (x / 255.0).astype(np.float32) if x.dtype == np.uint8 else x


def checksum():
    """Of the training set as the clients see it (bench/vs_flower.py compares it)."""
    x, y = load("train")
    return float(features(x).sum(dtype=np.float64)) + float(y.sum())


def partition_indices(partition_id):
    if "parts" not in _CACHE:
        parts = np.load(CONFIG["partition"])
        _CACHE["parts"] = (parts["indices"], parts["offsets"])
    indices, offsets = _CACHE["parts"]
    return indices[offsets[partition_id] : offsets[partition_id + 1]]


# A dense ReLU network with a softmax output (no hidden layer: softmax regression),
# weights named and laid out as PyTorch's nn.Linear: fcN.weight is (out, in).
def layers(weights):
    return len(weights) // 2


def forward(weights, x):
    acts = [x]
    a = x
    for i in range(1, layers(weights) + 1):
        z = a @ weights[f"fc{i}.weight"].T + weights[f"fc{i}.bias"]
        a = np.maximum(z, 0) if i < layers(weights) else z
        acts.append(a)
    shifted = a - a.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True), acts


def sgd_epoch(weights, x, y, batch_size, lr, rng):
    order = rng.permutation(len(y))
    total = 0.0
    for start in range(0, len(y), batch_size):
        idx = order[start : start + batch_size]
        xb, yb = x[idx], y[idx]
        probs, acts = forward(weights, xb)
        n = len(idx)
        total += float(-np.log(np.maximum(probs[np.arange(n), yb], 1e-12)).sum())
        delta = probs
        delta[np.arange(n), yb] -= 1.0
        delta /= n
        for i in range(layers(weights), 0, -1):
            gw = delta.T @ acts[i - 1]
            gb = delta.sum(axis=0)
            if i > 1:
                delta = (delta @ weights[f"fc{i}.weight"]) * (acts[i - 1] > 0)
            weights[f"fc{i}.weight"] -= (lr * gw).astype(np.float32)
            weights[f"fc{i}.bias"] -= (lr * gb).astype(np.float32)
    return total / len(y)


def evaluate(weights, x, y):
    probs, _ = forward(weights, x)
    loss = float(-np.log(np.maximum(probs[np.arange(len(y)), y], 1e-12)).mean())
    return loss, float((probs.argmax(axis=1) == y).mean())


app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    partition_id = int(context.node_config["partition-id"])
    config = msg.content["config"]
    x, y = load("train")
    idx = partition_indices(partition_id)
    x, y = features(x[idx]), y[idx]
    weights = {k: np.array(v.numpy()) for k, v in msg.content["arrays"].items()}
    rng = np.random.default_rng([CONFIG["seed"], partition_id, int(config["server-round"])])
    loss = 0.0
    for _ in range(int(config["epochs"])):
        loss = sgd_epoch(weights, x, y, int(config["batch-size"]), float(config["lr"]), rng)
    reply = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in weights.items()}),
            "metrics": MetricRecord({"train_loss": loss, "num-examples": len(y)}),
        }
    )
    return Message(content=reply, reply_to=msg)


server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    x_test, y_test = load("test")
    x_test = features(x_test)

    def central_evaluate(server_round, arrays):
        weights = {k: v.numpy() for k, v in arrays.items()}
        loss, accuracy = evaluate(weights, x_test, y_test)
        return MetricRecord({"accuracy": accuracy, "loss": loss})

    init = np.load(CONFIG["initial"])
    initial = ArrayRecord({k: Array(init[k].astype(np.float32)) for k in CONFIG["names"]})
    n = CONFIG["per_round"]
    strategy = FedAvg(
        fraction_train=n / CONFIG["devices"],  # int(devices * fraction) == n ...
        min_train_nodes=n,  # ... and never fewer
        fraction_evaluate=0.0,  # fedsim evaluates centrally only; so do we
        min_available_nodes=CONFIG["devices"],
    )
    started = time.perf_counter()
    result = strategy.start(
        grid=grid,
        initial_arrays=initial,
        num_rounds=CONFIG["rounds"],
        train_config=ConfigRecord(
            {"epochs": CONFIG["epochs"], "batch-size": CONFIG["batch_size"], "lr": CONFIG["lr"]}
        ),
        evaluate_fn=central_evaluate,
    )
    seconds = time.perf_counter() - started
    history = result.evaluate_metrics_serverapp
    last = history[max(history)]
    Path(CONFIG["result"]).write_text(
        json.dumps(
            {
                "accuracy": float(last["accuracy"]),
                "loss": float(last["loss"]),
                "rounds": {str(r): float(m["accuracy"]) for r, m in history.items()},
                "strategy_seconds": seconds,
            }
        )
    )


def run(backend_config):
    run_simulation(
        server_app=server,
        client_app=app,
        num_supernodes=CONFIG["devices"],
        backend_config=backend_config,
    )
'''


def flower_python(venv: Path) -> Path:
    """The venv's interpreter, with Flower installed (created and installed if missing)."""
    python = venv / "bin/python"
    if _flower_versions(python) is None:
        print(f"installing {FLOWER_REQUIREMENT} and numpy into {venv} ...", flush=True)
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        started = time.perf_counter()
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*pip, FLOWER_REQUIREMENT, "numpy"], check=True)
        print(f"installed in {time.perf_counter() - started:.0f} s", flush=True)
        if _flower_versions(python) is None:
            raise SystemExit(f"Flower still does not import in {venv}")
    return python


def _flower_versions(python: Path) -> dict[str, str] | None:
    """Installed flwr/ray/numpy versions in that interpreter, or None if flwr is missing."""
    if not python.exists():
        return None
    code = (
        "import json, importlib.metadata as m; import flwr.simulation; "
        "print(json.dumps({p: m.version(p) for p in ('flwr', 'ray', 'numpy')}))"
    )
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return json.loads(done.stdout) if done.returncode == 0 else None


# -- shared inputs ---------------------------------------------------------------------


def compile_project() -> None:
    """Byte-compile fedsim's own packages (untimed), as an install leaves them: with
    PYTHONDONTWRITEBYTECODE set, an editable install would compile every module of
    the project from source on every run (Flower's come compiled from its wheels)."""
    root = Path(__file__).resolve().parents[1]
    compileall.compile_dir(root / "fedclient", quiet=1)


def prepare(workload: Workload, data_dir: Path, scratch: Path) -> dict[str, Any]:
    """Write the partition, the initial model (and digits' arrays) both engines use."""
    data = load_dataset(workload.dataset, data_dir, seed=workload.seed)
    # fedsim's first draw from default_rng(seed) is the partition: the same split here.
    parts = partition(
        data.y_train, workload.devices, workload.partition, np.random.default_rng(workload.seed)
    )
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])])
    np.savez(scratch / "partition.npz", indices=np.concatenate(parts), offsets=offsets)
    plan = _config(workload, data_dir).plan(data)
    weights = initial_weights(plan)
    np.savez(scratch / "initial.npz", **weights)
    config: dict[str, Any] = {
        "dataset": workload.dataset,
        "devices": workload.devices,
        "per_round": workload.per_round,
        "rounds": workload.rounds,
        "epochs": workload.epochs,
        "batch_size": workload.batch_size,
        "lr": workload.learning_rate,
        "seed": workload.seed,
        "partition": str(scratch / "partition.npz"),
        "initial": str(scratch / "initial.npz"),
        "names": list(weights),
        "result": str(scratch / "flower-result.json"),
    }
    if workload.dataset == "mnist":
        folder = data_dir / "mnist" if (data_dir / "mnist").is_dir() else data_dir
        config["mnist_dir"] = str(folder)
        # load_dataset above left fedsim's decompressed copies in its cache (unless
        # FEDSIM_CACHE_DIR=off): Flower's clients read the same copies, not the .gz files.
        names = _prefetch.GZIP_FILES["mnist"]
        copies = {name: _prefetch.cached_copy(folder / name) for name in names}
        if all(c is not None and c.is_file() for c in copies.values()):
            config["decompressed"] = {name: str(c) for name, c in copies.items()}
    else:  # digits comes with scikit-learn, absent from Flower's venv: hand over fedsim's split
        np.savez(
            scratch / "arrays.npz",
            x_train=data.train_features(),
            y_train=data.y_train,
            x_test=data.x_test,
            y_test=data.y_test,
        )
        config["arrays"] = str(scratch / "arrays.npz")
    features = data.train_features()
    config["train_checksum"] = float(features.sum(dtype=np.float64)) + float(data.y_train.sum())
    return config


def _config(workload: Workload, data_dir: Path) -> SimulationConfig:
    return SimulationConfig(
        dataset=workload.dataset,
        data_dir=str(data_dir),
        devices=workload.devices,
        devices_per_round=workload.per_round,
        rounds=workload.rounds,
        partition=workload.partition,
        seed=workload.seed,
        epochs=workload.epochs,
        batch_size=workload.batch_size,
        learning_rate=workload.learning_rate,
    )


# -- timing and memory --------------------------------------------------------------------


class TreeMonitor(threading.Thread):
    """Samples a process and its descendants from /proc: the peak of their summed PSS
    (RSS where PSS is unreadable), and the CPU time each one was last seen with."""

    def __init__(self, root: int, interval: float = 0.5) -> None:
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.peak_kb = 0
        self.cpu_ticks: dict[int, int] = {}
        self.stopped = threading.Event()
        self.available = Path("/proc/self/stat").exists()

    @property
    def cpu_seconds(self) -> float:
        return sum(self.cpu_ticks.values()) / os.sysconf("SC_CLK_TCK")

    def run(self) -> None:
        while self.available and not self.stopped.is_set():
            self.peak_kb = max(self.peak_kb, self._sample())
            self.stopped.wait(self.interval)

    def _sample(self) -> int:
        children: dict[int, list[int]] = {}
        stats: dict[int, list[str]] = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                try:
                    stat = Path(f"/proc/{entry.name}/stat").read_text()
                except OSError:
                    continue
                fields = stat.rsplit(")", 1)[1].split()  # fields[0] is field 3 of proc(5)
                stats[int(entry.name)] = fields
                children.setdefault(int(fields[1]), []).append(int(entry.name))
        total, todo = 0, [self.root]
        while todo:
            pid = todo.pop()
            todo.extend(children.get(pid, []))
            total += self._kb(pid)
            if pid in stats:  # utime + stime
                self.cpu_ticks[pid] = int(stats[pid][11]) + int(stats[pid][12])
        return total

    @staticmethod
    def _kb(pid: int) -> int:
        for name, key in (("smaps_rollup", "Pss:"), ("status", "VmRSS:")):
            try:
                for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
                    if line.startswith(key):
                        return int(line.split()[1])
            except OSError:
                continue
        return 0


# A small launcher between us and each engine. A child's ru_maxrss starts from its
# parent's RSS when it is forked (Linux keeps the high-water mark across exec), and
# this process holds MNIST; the launcher's own few MB are what its child inherits.
LAUNCHER = """
import json, resource, subprocess, sys, time
started = time.perf_counter()
code = subprocess.call(sys.argv[2:])
wall = time.perf_counter() - started
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "w") as out:
    cpu = usage.ru_utime + usage.ru_stime
    json.dump({"wall": wall, "cpu": cpu, "maxrss_kb": usage.ru_maxrss}, out)
sys.exit(code)
"""


class RunFailed(Exception):
    """An engine's run exited non-zero or outlived its timeout."""


def timed(
    argv: list[str],
    log: Path,
    timeout: float,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> tuple[float, float, float | None, float]:
    """Run ``argv`` to completion: (wall s, CPU s, peak tree MB, largest process RSS MB).

    The run gets its own session; on timeout or interrupt the whole process group
    (Ray's daemons included) is killed.
    """
    measured = log.with_suffix(".rusage.json")
    launcher = [sys.executable, "-I", "-S", "-c", LAUNCHER, str(measured)]
    with log.open("wb") as out:
        process = subprocess.Popen(
            [*launcher, *argv],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        memory = TreeMonitor(process.pid)
        memory.start()
        timed_out = False
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process)
            timed_out = True
        except BaseException:  # Ctrl-C: leave nothing running
            _kill_group(process)
            raise
        finally:
            memory.stopped.set()
            memory.join()
    if timed_out or process.returncode != 0:
        what = f"ran over {timeout:.0f} s and was killed" if timed_out else "failed"
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise RunFailed(f"{argv[0]} {what} (exit {process.returncode}); end of {log}:\n{tail}")
    usage = json.loads(measured.read_text())
    peak = memory.peak_kb / 1024 if memory.available else None
    # Both undercount: getrusage misses descendants nobody waited for (Ray's workers
    # when the raylet is killed), sampling misses each process's last half second.
    cpu = max(usage["cpu"], memory.cpu_seconds)
    return usage["wall"], cpu, peak, usage["maxrss_kb"] / 1024  # ru_maxrss: KiB on Linux


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the run's process group; SIGKILL whatever is left of it after 5 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            process.poll()  # reap the launcher, or it stays in the group as a zombie
            os.killpg(process.pid, 0)  # ProcessLookupError once the group is empty
            time.sleep(0.1)
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def fedsim_argv(workload: Workload, data_dir: Path, report: Path) -> list[str]:
    argv = [str(FEDSIM), "run", "--dataset", workload.dataset, "--data-dir", str(data_dir)]
    argv += ["--devices", str(workload.devices), "--devices-per-round", str(workload.per_round)]
    argv += ["--rounds", str(workload.rounds), "--partition", workload.partition]
    argv += ["--seed", str(workload.seed), "--epochs", str(workload.epochs)]
    argv += ["--batch-size", str(workload.batch_size)]
    argv += ["--learning-rate", str(workload.learning_rate)]
    # The JSON report, no PNG: the Flower side draws no plot either.
    return [*argv, "--report", str(report), "--quiet", "--no-plot"]


def run_fedsim(argv: list[str], scratch: Path, timeout: float) -> Run:
    wall, cpu, peak, rss = timed(argv, scratch / "fedsim.log", timeout)
    report = json.loads(Path(argv[argv.index("--report") + 1]).read_text())
    final = report["final"]
    engine = f"fedsim {report.get('fedsim_version', '?')}"
    return Run(engine, wall, cpu, final["wall_seconds"], peak, rss, final["accuracy"])


class Flower:
    """The Flower side: its app written to ``scratch``, run with the venv's python."""

    def __init__(self, python: Path, config: dict[str, Any], scratch: Path, cpus: float) -> None:
        self.python, self.config, self.scratch = python, config, scratch
        versions = _flower_versions(python) or {}
        self.engine = f"flower {versions.get('flwr', '?')} (ray {versions.get('ray', '?')})"
        (scratch / "flower_app.py").write_text(textwrap.dedent(FLOWER_APP).lstrip())
        (scratch / "flower-config.json").write_text(json.dumps(config))
        self.env = dict(os.environ)
        self.env.pop("PYTHONPATH", None)  # nothing of the project's environment leaks in
        self.env.update(
            VS_FLOWER_CONFIG=str(scratch / "flower-config.json"),
            PYTHONPATH=str(scratch),  # Ray's workers import flower_app from here
            FLWR_TELEMETRY_ENABLED="0",  # no internet here; do not let it try
            # Ray already gives each actor one BLAS thread; the driver's OpenBLAS pool,
            # used by the ServerApp thread while Ray starts, hung once in exec_blas.
            OPENBLAS_NUM_THREADS="1",
        )
        backend = {"client_resources": {"num_cpus": cpus, "num_gpus": 0.0}}
        self.code = f"import flower_app; flower_app.run({backend!r})"

    def command(self) -> str:
        return f"(cd {self.scratch} && {self.python} -c {self.code!r})"

    def check_data(self) -> None:
        """Untimed: the clients' training set must be fedsim's."""
        code = "import flower_app; print(flower_app.checksum())"
        done = subprocess.run(
            [str(self.python), "-c", code],
            capture_output=True,
            text=True,
            env=self.env,
            cwd=self.scratch,
            check=True,
        )
        theirs, ours = float(done.stdout.split()[-1]), self.config["train_checksum"]
        if abs(theirs - ours) > 1e-6 * abs(ours):
            raise SystemExit(f"Flower's training data differs from fedsim's ({theirs} != {ours})")

    def run(self, timeout: float) -> Run:
        argv = [str(self.python), "-c", self.code]
        log = self.scratch / "flower.log"
        wall, cpu, peak, rss = timed(argv, log, timeout, env=self.env, cwd=self.scratch)
        result = json.loads(Path(self.config["result"]).read_text())
        in_run = result["strategy_seconds"]
        return Run(self.engine, wall, cpu, in_run, peak, rss, result["accuracy"])


# -- main -------------------------------------------------------------------------------


def median_run(runs: list[Run]) -> Run:
    """The run with the median wall time (the lower middle one for an even count)."""
    return sorted(runs, key=lambda r: r.wall_seconds)[(len(runs) - 1) // 2]


def _table(workload: Workload, runs: list[Run]) -> str:
    def fmt(value: float | None, spec: str) -> str:
        return "n/a" if value is None else format(value, spec)

    header = ("workload", "engine", "wall s", "cpu s", "in-run s", "peak tree MB", "max proc MB")
    header = (*header, "acc")
    rows = [header] + [
        (
            workload.name,
            r.engine,
            fmt(r.wall_seconds, ".1f"),
            fmt(r.cpu_seconds, ".1f"),
            fmt(r.in_run_seconds, ".1f"),
            fmt(r.peak_tree_mb, ",.0f"),
            fmt(r.max_process_rss_mb, ",.0f"),
            fmt(r.accuracy, ".4f"),
        )
        for r in runs
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(width) if i < 2 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _load() -> str:
    if not hasattr(os, "getloadavg"):
        return "n/a"
    return " ".join(f"{v:.1f}" for v in os.getloadavg()) + f" on {os.cpu_count()} CPUs"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="w2")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    parser.add_argument("--skip-flower", action="store_true", help="run and print fedsim only")
    parser.add_argument("--flower-venv", type=Path, default=DEFAULT_FLOWER_VENV)
    parser.add_argument(
        "--flower-client-cpus",
        type=float,
        default=1.0,
        help="Ray CPUs per ClientApp actor (1: one actor per core; Flower's default is 2)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run each engine this many times, alternating; report each one's median run",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=900.0,
        help="seconds one engine run may take before it is killed (default 900)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the scratch dir and logs")
    args = parser.parse_args(argv)
    workload = WORKLOADS[args.workload]
    data_dir = args.data_dir.resolve()
    python = None if args.skip_flower else flower_python(args.flower_venv)

    scratch = Path(tempfile.mkdtemp(prefix="vs-flower-"))
    try:
        print(f"{workload.name}: {workload.describe()}", flush=True)
        compile_project()
        config = prepare(workload, data_dir, scratch)
        fedsim = fedsim_argv(workload, data_dir, scratch / "fedsim-report.json")
        print("$", " ".join(fedsim), flush=True)
        flower = None
        if python is not None:
            flower = Flower(python, config, scratch, args.flower_client_cpus)
            flower.check_data()
            print("$", flower.command(), flush=True)
        print(f"load average before: {_load()}", flush=True)
        runs: dict[str, list[Run]] = {"fedsim": [], "flower": []}
        for _ in range(max(1, args.repeats)):
            runs["fedsim"].append(run_fedsim(fedsim, scratch, args.timeout))
            if flower is not None:
                runs["flower"].append(flower.run(args.timeout))
        print(f"load average after:  {_load()}")
        if args.repeats > 1:
            for name, done in runs.items():
                if done:
                    print(f"{name} wall s: " + ", ".join(f"{r.wall_seconds:.1f}" for r in done))
        chosen = [median_run(done) for done in runs.values() if done]
        print()
        print(_table(workload, chosen))
        print(
            "wall: the whole subprocess, start-up and teardown included; cpu: user+sys of\n"
            "the process tree (a lower bound); in-run: fedsim's report wall_seconds / Flower's\n"
            "strategy.start(); peak tree: summed PSS of the process tree (sampled); max proc:\n"
            "the largest single process's peak RSS"
        )
        if flower is not None:
            cpu = chosen[1].cpu_seconds / chosen[0].cpu_seconds
            print(f"cpu-time ratio flower/fedsim = {cpu:.1f}x (less sensitive to other load)")
            ratio = chosen[1].wall_seconds / chosen[0].wall_seconds
            print(f"ratio flower/fedsim = {ratio:.1f}x")
    except RunFailed as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        args.keep = True  # the logs are the point now
        return 1
    finally:
        if args.keep:
            print(f"kept {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
