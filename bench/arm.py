"""fedclient on aarch64: which extras pip resolves there, and one round on emulated aarch64.

    python bench/arm.py                          # the table, then the round if the root exists
    python bench/arm.py --resolve-only           # the table alone (no root, no root user)
    python bench/arm.py --round-only --devices 2 --epochs 5 --runtime auto
    bash bench/arm-setup.sh [ROOT]               # builds ROOT (default /var/tmp/arm64-root)

1. Resolution. For each extra the README offers on ARM devices (the core SDK,
   ``[onnxruntime]``, ``[tflite]``; their requirements read from pyproject.toml) and
   each Python, ``pip install --dry-run --only-binary=:all: --report`` resolves the
   requirements for ``--platform`` (default ``manylinux_2_28_aarch64``, i.e. a device
   with glibc 2.28 or newer). pip takes a ``--platform`` tag literally: a
   ``manylinux_2_28`` device also runs ``manylinux_2_27`` ... ``manylinux_2_17``
   wheels, so every one of those tags is passed (``--exact-platform`` passes the one
   tag alone, which is how a ``manylinux_2_27`` wheel such as ai-edge-litert 2.3.0's
   looks missing). The requirements' own markers are evaluated for the target
   (aarch64, Linux, that Python); pip still evaluates its dependencies' markers for
   this machine, so the native install in the root (part 2) is the last word.

2. The round. With Debian's ``qemu-user-static`` registered with binfmt_misc and
   an aarch64 Debian root holding a venv of fedclient's device requirements
   (`bench/arm-setup.sh`), the reference server (``fedserver``) runs here, and
   ``--devices`` device processes run this very file (``arm.py device``) under the
   root's aarch64 Python, emulated, each in a private mount namespace with /proc
   and this repository (read-only, on ``PYTHONPATH``) mounted into the root:
   nothing is copied and no mount outlives the process. Each device gets an IID
   share of the digits training set, checks in, trains the plan's MLP (ONNX Runtime
   when ``--runtime auto`` finds it in the root and the bundle trains on it, else
   numpy) and uploads; the round closes and the aggregated model is measured on the
   held-out test set here. Needs root (chroot, mounts). ``--runtime tflite`` trains
   through LiteRT, which crashes under qemu (bench/README.md says where).

Printed: the resolution table; the root's packages; per device its runtime, import,
backend and per-phase seconds, seconds per local epoch (emulated, and the same
training natively here); the round's wall time and the test accuracy before and
after. Last line::

    arm resolve=<ok>/<n> round=<ok|skipped|failed> runtime=<onnx-plain|numpy|...> seconds=<s>

Only the standard library is imported at the top: the same file runs as the device
under the root's Python, and as the requirement lister for ``arm-setup.sh``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

REPO = Path(__file__).resolve().parent.parent
#: What the README offers on ARM devices: the device SDK and its two edge runtimes.
ARM_EXTRAS = ("core", "onnxruntime", "tflite")
PYTHONS = ("3.11", "3.12", "3.13")
DEFAULT_ROOT = Path("/var/tmp/arm64-root")
#: Inside the root: the venv arm-setup.sh makes, where the repository is mounted, and
#: the scratch folder for one run (data, device states, caches, logs).
ROOT_VENV = "/opt/fedclient-venv"
ROOT_REPO = "/opt/fedclient-src"
ROOT_WORK = "/tmp/fedclient-arm"
BINFMT = Path("/proc/sys/fs/binfmt_misc/qemu-aarch64")
DEVICE_MARK = "ARM-DEVICE "
#: A built-in model every runtime trains (shipped as .tflite too).
ROUND_MODEL = "mlp:64:32:10"
#: A bench server: loopback only, no rate limits, status readable without a token.
SERVER_FLAGS = ("--host", "127.0.0.1", "--no-rate-limits", "--public-status")
SETUP_HINT = "bash bench/arm-setup.sh"
#: --runtime: auto is ONNX Runtime where it trains the bundle in the root, else numpy.
RUNTIMES = ("auto", "onnx", "numpy", "tflite")


# -- the requirements ------------------------------------------------------------------
def extra_requirements(extra: str, pyproject: Path = REPO / "pyproject.toml") -> list[str]:
    """The requirement strings ``pip install 'fedclient[extra]'`` asks for (``core``: the
    dependencies alone), self-references (``fedclient[server]``) expanded."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional: dict[str, list[str]] = project.get("optional-dependencies", {})
    wanted = list(project["dependencies"])
    pending = [] if extra == "core" else [extra]
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        if name not in optional:
            raise SystemExit(f"pyproject.toml has no extra {name!r}")
        seen.add(name)
        for line in optional[name]:
            self_ref = re.match(r"fedclient\[([^\]]+)\]", line.replace(" ", ""))
            if self_ref:
                pending.extend(self_ref.group(1).split(","))
            elif line not in wanted:
                wanted.append(line)
    return wanted


def _target_environment(python: str, machine: str) -> dict[str, str]:
    """PEP 508 marker values of a CPython ``python`` on Linux ``machine``."""
    return {
        "implementation_name": "cpython",
        "implementation_version": f"{python}.0",
        "os_name": "posix",
        "platform_machine": machine,
        "platform_python_implementation": "CPython",
        "platform_release": "",
        "platform_system": "Linux",
        "platform_version": "",
        "python_full_version": f"{python}.0",
        "python_version": python,
        "sys_platform": "linux",
    }


def _requirement(line: str) -> Any:
    """``packaging``'s parsed requirement (pip's vendored copy where it is not installed)."""
    try:
        from packaging.requirements import Requirement
    except ImportError:
        from pip._vendor.packaging.requirements import Requirement  # type: ignore[assignment]
    return Requirement(line)


def _for_target(lines: list[str], python: str, machine: str) -> list[str]:
    """The requirements whose markers hold on the target, markers dropped (pip would
    evaluate them for this machine)."""
    env = _target_environment(python, machine)
    kept = []
    for line in lines:
        req = _requirement(line)
        if req.marker is not None and not req.marker.evaluate({**env, "extra": ""}):
            continue
        extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
        kept.append(f"{req.name}{extras}{req.specifier}")
    return kept


def platform_tags(platform: str, exact: bool = False) -> list[str]:
    """The wheel platform tags a device of ``platform`` runs, newest first:
    ``manylinux_2_28_aarch64`` -> 2_28, 2_27, ..., 2_17 and the manylinux2014 alias."""
    match = re.fullmatch(r"manylinux_(\d+)_(\d+)_(\w+)", platform)
    if exact or match is None:
        return [platform]
    major, minor, arch = int(match[1]), int(match[2]), match[3]
    tags = [f"manylinux_{major}_{m}_{arch}" for m in range(minor, 16, -1)]
    return [*tags, f"manylinux2014_{arch}"] if minor >= 17 else tags


# -- part 1: resolution -----------------------------------------------------------------
@dataclass
class Resolution:
    """What pip made of one extra for one Python on the target platform."""

    extra: str
    python: str
    ok: bool
    chosen: list[str] = field(default_factory=list)  # "name version (glibc 2.27)"
    error: str = ""
    seconds: float = 0.0


#: The glibc each legacy manylinux tag stands for (PEP 600).
LEGACY_MANYLINUX = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}


def _wheel_needs(url: str) -> str:
    """What a wheel asks of the platform: ``glibc 2.27`` (the oldest of its manylinux
    tags), its platform tag otherwise, or "" for a pure-Python wheel."""
    name = url.rsplit("/", 1)[-1].split("#", 1)[0]
    if not name.endswith(".whl"):
        return "sdist"
    platforms = name.removesuffix(".whl").rsplit("-", 1)[-1].split(".")
    if platforms == ["any"]:
        return ""
    glibc = []
    for tag in platforms:
        match = re.match(r"manylinux_(\d+)_(\d+)_", tag)
        legacy = LEGACY_MANYLINUX.get(tag.split("_", 1)[0])
        if match:
            glibc.append((int(match[1]), int(match[2])))
        elif legacy:
            glibc.append(legacy)
    if not glibc:
        return ".".join(platforms)
    major, minor = min(glibc)
    return f"glibc {major}.{minor}"


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def resolve(extra: str, python: str, platform: str, exact: bool, timeout: float) -> Resolution:
    """Ask this interpreter's pip to resolve ``extra`` for ``python`` on ``platform``."""
    machine = platform.rsplit("_", 1)[-1]
    wanted = _for_target(extra_requirements(extra), python, machine)
    # Show the extra's own packages (the core's for "core"), with the wheel each got.
    core = extra_requirements("core")
    own = [r for r in extra_requirements(extra) if extra == "core" or r not in core]
    own = _for_target(own, python, machine)

    names = {_canonical(_requirement(r).name) for r in own}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="arm-resolve-") as tmp:
        report = Path(tmp) / "report.json"
        command = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--dry-run",
            "--ignore-installed",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
            str(Path(tmp) / "target"),
            "--only-binary=:all:",
            "--implementation",
            "cp",
            "--python-version",
            python,
            *(arg for tag in platform_tags(platform, exact) for arg in ("--platform", tag)),
            "--report",
            str(report),
            *wanted,
        ]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return Resolution(extra, python, False, error=f"pip took over {timeout:.0f} s")
        seconds = time.perf_counter() - started
        if done.returncode != 0 or not report.exists():
            errors = [ln for ln in done.stderr.splitlines() if ln.startswith("ERROR")]
            message = errors[-1] if errors else (done.stderr.strip().splitlines() or ["?"])[-1]
            return Resolution(extra, python, False, error=message, seconds=seconds)
        installs = json.loads(report.read_text())["install"]
    chosen = [
        f"{item['metadata']['name']} {item['metadata']['version']}"
        + (f" ({needs})" if (needs := _wheel_needs(item["download_info"]["url"])) else "")
        for item in installs
        if _canonical(item["metadata"]["name"]) in names
    ]
    return Resolution(extra, python, True, chosen=sorted(chosen, key=str.lower), seconds=seconds)


def resolution_table(
    extras: list[str], pythons: list[str], platform: str, exact: bool, timeout: float
) -> list[Resolution]:
    """Resolve every extra for every Python (three pip processes at a time) and print
    the table."""
    jobs = [(extra, python) for extra in extras for python in pythons]
    with ThreadPoolExecutor(max_workers=3) as pool:
        results = list(
            pool.map(lambda job: resolve(job[0], job[1], platform, exact, timeout), jobs)
        )
    tags = platform_tags(platform, exact)
    print(f"## Resolution for {platform} (pip --only-binary=:all:, --platform {tags[0]}", end="")
    print(f" ... {tags[-1]}, {len(tags)} tags)" if len(tags) > 1 else ")")
    print()
    print("| extra | python | resolves | wheels chosen (the extra's own requirements) |")
    print("|---|---|---|---|")
    for r in results:
        what = ", ".join(r.chosen) if r.ok else r.error
        label = "fedclient" if r.extra == "core" else f"fedclient[{r.extra}]"
        print(f"| {label} | {r.python} | {'yes' if r.ok else '**no**'} | {what} |")
    print()
    return results


# -- part 2: the round on emulated aarch64 -------------------------------------------------
PLAN = """\
[job]
name = "arm"
rounds = 1
devices_per_round = {devices}
min_devices = {devices}
over_selection = 1.0
deadline_seconds = {deadline}
seed = 1
[model]
kind = "mlp"
inputs = 64
hidden = [32]
classes = 10
[train]
epochs = {epochs}
batch_size = {batch}
learning_rate = 0.1
"""

#: Run as root in a mount namespace of its own, so the mounts end with the process:
#: $1 the root, $2 the repository; the rest is the command to run in the root. No /sys:
#: with the host's /sys and /proc both there, ONNX Runtime's cpuinfo reads the x86
#: host's CPU description at import and crashes (SIGSEGV under qemu 7.2); with /proc
#: alone it warns ("cpuinfo_initialize failed") and runs.
MOUNT_AND_CHROOT = r"""
set -e
root=$1 repo=$2
shift 2
mount -t proc proc "$root/proc"
mkdir -p "$root/opt/fedclient-src"
mount --bind "$repo" "$root/opt/fedclient-src"
mount -o remount,bind,ro "$root/opt/fedclient-src"
exec chroot "$root" "$@"
"""


def missing_for_round(root: Path) -> list[str]:
    """What the round needs and this machine lacks, each with the fix."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (chroot and mounts in a private namespace): run as root")
    if shutil.which("unshare") is None or shutil.which("chroot") is None:
        missing.append("unshare and chroot (util-linux, coreutils)")
    if not BINFMT.exists():
        if shutil.which("qemu-aarch64-static") is None:
            missing.append(f"qemu-user-static: apt-get install qemu-user-static ({SETUP_HINT})")
        else:
            missing.append(
                "qemu-aarch64 is not registered with binfmt_misc: mount -t binfmt_misc "
                "binfmt_misc /proc/sys/fs/binfmt_misc; update-binfmts --enable qemu-aarch64"
            )
    elif not BINFMT.read_text().startswith("enabled"):
        missing.append("binfmt qemu-aarch64 is disabled: update-binfmts --enable qemu-aarch64")
    if not (root / ROOT_VENV.lstrip("/") / "bin/python").exists():
        missing.append(f"an aarch64 root with {ROOT_VENV} at {root}: {SETUP_HINT} {root}")
    for module, extra in (("fedclient.server.app", "server"), ("sklearn", "sim")):
        try:
            __import__(module)
        except ImportError:
            missing.append(f"{module} in this Python (server, digits): pip install -e '.[{extra}]'")
    return missing


def in_root(root: Path, args: list[str], env: dict[str, str] | None = None) -> list[str]:
    """The command that runs ``args`` in the root, with the repository mounted."""
    clean = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "PYTHONPATH": ROOT_REPO,
        "PYTHONPYCACHEPREFIX": "/var/cache/fedclient-arm-pycache",  # the repo is mounted ro
        "OPENBLAS_NUM_THREADS": "1",
        "PYTHONFAULTHANDLER": "1",  # a crash in a runtime's C code leaves its Python stack
        **(env or {}),
    }
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "sh",
        "-c",
        MOUNT_AND_CHROOT,
        "arm-chroot",
        str(root),
        str(REPO),
        "/usr/bin/env",
        "-i",
        *(f"{k}={v}" for k, v in clean.items()),
        *args,
    ]


PROBE = """
import importlib.metadata as m, json, platform, sys
def version(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return None
names = ["numpy", "httpx", "cryptography", "msgspec", "safetensors", "sqlite-utils",
         "onnxruntime", "onnx", "ai-edge-litert", "onnxruntime-training"]
print(json.dumps({"machine": platform.machine(), "python": platform.python_version(),
                  "libc": "-".join(platform.libc_ver()),
                  "packages": {n: version(n) for n in names}}))
"""


def probe_root(root: Path) -> dict[str, Any]:
    """The root's machine, Python, libc and installed packages (one emulated Python)."""
    done = subprocess.run(
        in_root(root, [f"{ROOT_VENV}/bin/python", "-c", PROBE]),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        raise RuntimeError(f"the root's Python failed: {done.stderr.strip()[-600:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RoundResult:
    """One round on emulated aarch64, as measured here."""

    ok: bool
    runtime: str = ""
    seconds: float = 0.0
    reason: str = ""


def run_round(args: argparse.Namespace) -> RoundResult:
    """Serve a one-round job here, run ``args.devices`` emulated devices, report."""
    import httpx
    import numpy as np

    from fedclient.protocol import JOB_STATUS, MODEL, ModelSpec, decode_tensors
    from fedclient.runtime import NumpyModel
    from fedclient.sim.datasets import load_dataset, partition

    root: Path = args.root
    started = time.perf_counter()
    info = probe_root(root)
    probe_seconds = time.perf_counter() - started
    packages = ", ".join(f"{k} {v}" for k, v in info["packages"].items() if v)
    print(f"## One round on emulated {info['machine']} ({root})")
    print()
    print(f"- root: Python {info['python']}, {info['libc']}; {packages}")
    print(f"- one emulated Python start-up (this probe): {probe_seconds:.1f} s")
    if info["machine"] != "aarch64":
        return RoundResult(False, reason=f"the root runs {info['machine']}, not aarch64")

    kind, inputs, hidden, classes = ROUND_MODEL.split(":")
    spec = ModelSpec(cast(Any, kind), int(inputs), [int(hidden)], int(classes))
    data = load_dataset("digits", seed=1)
    shares = partition(data.y_train, args.devices, "iid", np.random.default_rng(1))
    work = root / ROOT_WORK.lstrip("/")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    for i, share in enumerate(shares):
        x, y = data.device_data(share)
        np.savez(work / f"device-{i}.npz", x=x, y=y)

    host = Path(tempfile.mkdtemp(prefix="arm-round-"))
    plan = host / "plan.toml"
    plan.write_text(
        PLAN.format(
            devices=args.devices, deadline=args.timeout, epochs=args.epochs, batch=args.batch
        )
    )
    cli = [sys.executable, "-m", "fedclient.server.cli"]
    db = str(host / "server.sqlite")
    subprocess.run([*cli, "init", "--plan", str(plan), "--db", db], check=True, capture_output=True)
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    server_log = (host / "server.log").open("w")
    server = subprocess.Popen(
        [*cli, "--plan", str(plan), "--db", db, "--port", str(port), *SERVER_FLAGS],
        stdout=server_log,
        stderr=subprocess.STDOUT,
    )
    devices: list[subprocess.Popen[str]] = []
    try:
        deadline = time.monotonic() + 60
        while True:  # readiness probe, bounded
            if server.poll() is not None or time.monotonic() > deadline:
                return RoundResult(False, reason=f"fedserver did not start (logs: {host})")
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        status_url = url + JOB_STATUS.url(job="arm")
        before = httpx.get(status_url, timeout=30).json()

        round_started = time.perf_counter()
        for i in range(args.devices):
            device_args = {
                "--server": url,
                "--job": "arm",
                "--model": ROUND_MODEL,
                "--runtime": args.runtime,
                "--data": f"{ROOT_WORK}/device-{i}.npz",
                "--state": f"{ROOT_WORK}/device-{i}",
                "--seed": str(i),
                "--timeout": str(args.timeout),
            }
            command = in_root(
                root,
                [f"{ROOT_VENV}/bin/python", f"{ROOT_REPO}/bench/arm.py", "device"]
                + [part for pair in device_args.items() for part in pair],
                env={"FEDCLIENT_CACHE_DIR": f"{ROOT_WORK}/cache-{i}"},
            )
            log = (host / f"device-{i}.log").open("w")
            devices.append(subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True))
        reports = []
        for i, device in enumerate(devices):
            try:
                out, _ = device.communicate(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                device.kill()
                out, _ = device.communicate()
            lines = [ln for ln in out.splitlines() if ln.startswith(DEVICE_MARK)]
            if device.returncode != 0 or not lines:
                said = (host / f"device-{i}.log").read_text().splitlines()
                tail = [ln for ln in said if ln.strip() and "cpuinfo" not in ln][-3:]
                return RoundResult(
                    False,
                    reason=f"device {i} exited {device.returncode} (logs: {host}): "
                    + " / ".join(tail),
                )
            reports.append(json.loads(lines[-1].removeprefix(DEVICE_MARK)))
        closing = time.monotonic() + args.timeout
        while True:
            status = httpx.get(status_url, timeout=30).json()
            if status["rounds_completed"] >= 1 or status["rounds_failed"] >= 1:
                break
            if time.monotonic() > closing:
                return RoundResult(False, reason=f"no round closed before --timeout (logs: {host})")
            time.sleep(0.2)
        round_seconds = time.perf_counter() - round_started
        if status["rounds_completed"] < 1:
            return RoundResult(False, reason=f"the round failed (logs: {host})")

        # An observer device reads the models (the model route wants a device token).
        token = httpx.post(url + "/v1/devices", json={"label": "arm-observer"}, timeout=30)
        headers = {"Authorization": f"Bearer {token.json()['token']}"}
        accuracies = []
        for version in (before["model_version"], status["model_version"]):
            body = httpx.get(url + MODEL.url(job="arm", version=version), headers=headers)
            body.raise_for_status()
            model = NumpyModel(spec)
            model.set_weights(decode_tensors(body.content)[0])
            accuracies.append(model.evaluate(data.x_test, data.y_test).accuracy)
    finally:
        for device in devices:
            if device.poll() is None:
                device.kill()
        server.terminate()
        server.wait(timeout=30)
        server_log.close()

    runtimes = sorted({r["runtime"] for r in reports})
    native = native_epoch_seconds(spec, reports[0], work / "device-0.npz", args)
    print(
        f"- plan: 1 round, {args.devices} devices, {ROUND_MODEL}, {args.epochs} epochs of "
        f"batch {args.batch}, lr 0.1; digits split IID ({len(data.y_train)} train, "
        f"{len(data.y_test)} test); fedserver on this {os.uname().machine} machine"
    )
    print()
    print("| device | runtime | examples | import s | backend s | check-in+download s |", end="")
    print(" train step s | upload s | s / local epoch | native s / epoch | slowdown |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(reports):
        ph = r["phases"]
        native_s = native.get(r["runtime"])
        slowdown = f"{r['epoch_seconds'] / native_s:.0f}x" if native_s else "-"
        native_text = f"{native_s:.4f}" if native_s else "-"
        print(
            f"| {i} | {r['runtime']} | {r['examples']} | {r['import_seconds']:.1f} | "
            f"{r['backend_seconds']:.1f} | "
            f"{ph.get('admitted', 0) + ph.get('downloaded', 0):.2f} | {ph.get('trained', 0):.2f} | "
            f"{ph.get('uploaded', 0):.2f} | {r['epoch_seconds']:.3f} | {native_text} | {slowdown} |"
        )
        if r.get("fallback"):
            print(f"|   | (numpy because: {r['fallback']}) |")
    print()
    print(
        f"- round wall time (devices started -> round closed): {round_seconds:.1f} s; "
        f"test accuracy {accuracies[0]:.4f} (model v{before['model_version']}) -> "
        f"{accuracies[1]:.4f} (v{status['model_version']})"
    )
    print()
    shutil.rmtree(host, ignore_errors=True)
    return RoundResult(True, runtime="+".join(runtimes), seconds=round_seconds)


def native_epoch_seconds(
    spec: Any, report: dict[str, Any], data: Path, args: argparse.Namespace
) -> dict[str, float]:
    """Seconds per epoch of the same training on this machine, by runtime label (the
    runtimes this Python has): the reference for the emulation's slowdown."""
    import numpy as np

    from fedclient import FedError
    from fedclient.runtime import NumpyModel, OnnxBackend

    arrays = np.load(data)
    x, y = arrays["x"], arrays["y"]
    result = {}
    cache = Path(tempfile.mkdtemp(prefix="arm-native-"))  # the bundle, built here once
    candidates: list[tuple[str, Any]] = [("numpy", lambda: NumpyModel(spec, seed=0))]
    if report["runtime"].startswith("onnx"):
        engine = report["runtime"].removeprefix("onnx-")

        def onnx_backend() -> Any:
            backend = OnnxBackend.for_spec(spec, cache_dir=cache)
            if engine in ("plain", "training") and backend.engine != engine:
                return OnnxBackend(backend.bundle, engine=engine)  # the device's engine
            return backend

        candidates.append((report["runtime"], onnx_backend))
    for label, make in candidates:
        try:
            model = make()
        except (FedError, ImportError) as exc:
            print(f"- no native {label} reference here: {exc}")
            continue
        rng = np.random.default_rng(0)
        model.train(x, y, epochs=1, batch_size=args.batch, learning_rate=0.1, rng=rng)
        start = time.perf_counter()
        model.train(x, y, epochs=args.epochs, batch_size=args.batch, learning_rate=0.1, rng=rng)
        result[label] = (time.perf_counter() - start) / args.epochs
    shutil.rmtree(cache, ignore_errors=True)
    return result


# -- the device (runs in the root, under emulation) -----------------------------------------
def device_main(args: argparse.Namespace) -> int:
    """One device: build its backend, take part in one round, print what it measured."""
    started = time.perf_counter()
    import numpy as np

    import fedclient
    from fedclient.protocol import ModelSpec

    import_seconds = time.perf_counter() - started
    arrays = np.load(args.data)
    x, y = arrays["x"], arrays["y"]
    kind, inputs, hidden, classes = args.model.split(":")
    spec = ModelSpec(cast(Any, kind), int(inputs), [int(hidden)], int(classes))
    fallback = ""
    started = time.perf_counter()
    backend: Any = None
    if args.runtime == "tflite":
        backend = fedclient.create_backend(spec, "tflite", seed=0)
    if args.runtime in ("auto", "onnx"):
        try:
            backend = fedclient.create_backend(spec, "onnx", seed=0)
        except (fedclient.FedError, ImportError) as exc:
            if args.runtime == "onnx":
                raise
            fallback = f"{type(exc).__name__}: {exc}"
            print(f"ONNX Runtime cannot train here, numpy instead: {fallback}", file=sys.stderr)
    if backend is None:
        backend = fedclient.create_backend(spec, "numpy", seed=0)
    backend_seconds = time.perf_counter() - started
    runtime = backend.runtime
    engine = getattr(backend, "engine", "")
    label = f"{runtime}-{engine}" if engine else runtime

    phases: dict[str, float] = {}
    deadline = time.monotonic() + args.timeout
    Path(args.state).mkdir(parents=True, exist_ok=True)
    with fedclient.Client(
        args.server,
        args.job,
        (x, y),
        state=str(Path(args.state) / "state.sqlite"),
        model=backend,
        runtime=runtime,
        seed=args.seed,
        label=f"arm-{args.seed}",
    ) as client:
        while True:
            step_started = time.perf_counter()
            outcome = client.step()
            elapsed = time.perf_counter() - step_started
            phases[outcome.status] = phases.get(outcome.status, 0.0) + elapsed
            if outcome.status == "uploaded":
                break
            if outcome.status in ("finished", "discarded"):
                print(f"the round ended for this device: {outcome}", file=sys.stderr)
                return 1
            if outcome.status == "waiting":
                if time.monotonic() > deadline:
                    print("no admission before --timeout", file=sys.stderr)
                    return 1
                time.sleep(min(outcome.retry_after or 1.0, 2.0))
        speed = client.device_state.speed()  # examples a second, measured around training
        train_loss = outcome.train_loss
    import platform

    report = {
        "machine": platform.machine(),
        "python": platform.python_version(),
        "runtime": label,
        "fallback": fallback,
        "examples": len(y),
        "import_seconds": import_seconds,
        "backend_seconds": backend_seconds,
        "phases": phases,
        "epoch_seconds": len(y) / speed if speed else float("nan"),
        "train_loss": train_loss,
        "bytes_up": client.stats.bytes_up,
        "bytes_down": client.stats.bytes_down,
    }
    print(DEVICE_MARK + json.dumps(report), flush=True)
    return 0


# -- entry points -------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["device"]:
        return device_main(_device_parser().parse_args(argv[1:]))
    if argv[:1] == ["requirements"]:  # for arm-setup.sh: one requirement a line
        lines = [line for extra in argv[1:] or ARM_EXTRAS for line in extra_requirements(extra)]
        print("\n".join(dict.fromkeys(lines)))
        return 0
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Subcommands used by this bench itself: 'device ...' (one emulated device) "
        "and 'requirements [EXTRA...]' (the extras' requirements, one a line).",
    )
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT, help="the aarch64 root")
    parser.add_argument("--platform", default="manylinux_2_28_aarch64")
    parser.add_argument("--exact-platform", action="store_true", help="pass only --platform")
    parser.add_argument("--python", action="append", help=f"default: {', '.join(PYTHONS)}")
    parser.add_argument("--extra", action="append", help=f"default: {', '.join(ARM_EXTRAS)}")
    parser.add_argument("--resolve-only", action="store_true")
    parser.add_argument("--round-only", action="store_true")
    parser.add_argument("--devices", type=int, default=2, help="emulated devices in the round")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default="auto",
        help="auto: ONNX Runtime where the root has it and the bundle trains there, else numpy",
    )
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds, per stage")
    args = parser.parse_args(argv)

    resolved: list[Resolution] = []
    if not args.round_only:
        resolved = resolution_table(
            args.extra or list(ARM_EXTRAS),
            args.python or list(PYTHONS),
            args.platform,
            args.exact_platform,
            args.timeout,
        )
    outcome = RoundResult(False, reason="--resolve-only")
    state = "skipped"
    if not args.resolve_only:
        missing = missing_for_round(args.root)
        if missing:
            print("## Round skipped: missing")
            print()
            print("\n".join(f"- {m}" for m in missing))
            print()
        else:
            try:
                outcome = run_round(args)
            except (RuntimeError, subprocess.SubprocessError, OSError) as exc:
                outcome = RoundResult(False, reason=f"{type(exc).__name__}: {exc}")
            state = "ok" if outcome.ok else "failed"
            if not outcome.ok:
                print(f"## Round failed: {outcome.reason}")
                print()
    ok = sum(r.ok for r in resolved)
    print(
        f"arm resolve={ok}/{len(resolved)} round={state} runtime={outcome.runtime or '-'} "
        f"seconds={outcome.seconds:.1f}"
    )
    return 0 if ok == len(resolved) and state != "failed" else 1


def _device_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arm.py device", description=device_main.__doc__)
    parser.add_argument("--server", required=True)
    parser.add_argument("--job", required=True)
    parser.add_argument("--model", default=ROUND_MODEL, help="kind:inputs:hidden:classes")
    parser.add_argument("--runtime", choices=RUNTIMES, default="auto")
    parser.add_argument("--data", required=True, help="an .npz with x and y")
    parser.add_argument("--state", required=True, help="a folder for the device's state")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800.0)
    return parser


if __name__ == "__main__":
    sys.exit(main())
