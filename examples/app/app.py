"""The README's "Embedding in an app", as a program: an app that collects labelled
examples as they come, trains only when its conditions hold, predicts with the newest
model it holds on its own (UI) thread while `run_forever` takes part on another, and
prints each round's outcome.

    python examples/app/app.py                  # a fedserver of its own and 3 apps
    python examples/app/app.py --server URL --secret-file enrolment.secret --device 0

Without ``--server`` it starts ``fedserver`` on a free port (the plan beside this
file, an enrolment secret, a database in a temporary folder), runs ``--devices``
app processes against it, and stops it when they are done. With ``--server`` it
is one app, device ``--device`` of ``--devices`` (each holds its share of the
digits data). Needs ``pip install -e '.[sim]'`` (scikit-learn, for the data).

Each app ends with one JSON line: why it stopped, the rounds it uploaded to, the
model version it holds, and where it saved what that model predicts for the
digits test set's first 100 images (``predictions.npy``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import numpy as np

import fedclient
from fedclient.sim.datasets import load_dataset

PLAN = Path(__file__).with_name("plan.toml")
PROBE = 100  # the digits test images every app classifies at the end


class Platform:
    """What a phone's platform would answer (here: a desktop that is always plugged in
    and online); an app passes its own callables."""

    def is_charging(self) -> bool:
        return True

    def on_wifi(self) -> bool:
        return True


def describe(device: int, event: fedclient.RoundEvent) -> str:
    """One line for one `RoundEvent`: what a settings screen would show."""
    head = f"device {device}: "
    if event.status == "uploaded":
        loss = "-" if event.train_loss is None else f"{event.train_loss:.3f}"
        return (
            f"{head}round {event.round_id} uploaded: {event.examples} examples, train loss "
            f"{loss}, {event.bytes_up / 1000:.1f} kB up, {event.bytes_down / 1000:.1f} kB down"
        )
    if event.status == "failed":
        return f"{head}{event.reason}; trying again in {event.wait_seconds:.1f} s"
    if event.status in ("waiting", "discarded"):
        wait = f" (next look in {event.wait_seconds:.0f} s)" if event.wait_seconds else ""
        round_ = f"round {event.round_id} " if event.round_id else ""
        return f"{head}{round_}{event.status}: {event.reason}{wait}"
    if event.status == "finished":
        return f"{head}the job is over; holding its final model, version {event.model_version}"
    return f"{head}{event.status}: {event.reason}"


def run_app(args: argparse.Namespace) -> int:
    """One app: the README's pattern, then the user's side of it on this (main) thread."""
    data = load_dataset("digits", seed=0)
    mine = np.array_split(np.arange(len(data.y_train)), args.devices)[args.device]
    x, y = data.x_train[mine], data.y_train[mine]
    app_data = Path(args.state_dir)
    app_data.mkdir(parents=True, exist_ok=True)
    app = Platform()
    secret = Path(args.secret_file).read_text().strip() if args.secret_file else None

    # -- the README's app: made on the main thread --------------------------------
    examples = fedclient.ExampleStore(
        app_data / "examples.sqlite", max_examples=5_000, max_age_seconds=30 * 86400
    )
    client = fedclient.Client(
        args.server,
        "digits",
        examples,
        state=app_data / "fl.sqlite",
        conditions=fedclient.Conditions(app.is_charging, app.on_wifi),
        personalize=fedclient.Personalization(epochs=2),
        enrolment_credential=secret,
        policy=fedclient.PrivacyPolicy(),  # the device's own limits on what plans ask
        retry=fedclient.RetryPolicy(max_attempts=args.retry_attempts),
        seed=args.seed * 1000 + args.device,
    )
    half = len(y) // 2
    if len(examples) == 0:  # what the app collected in earlier sessions
        examples.add(x[:half], y[:half], source="earlier")

    def on_round(event: fedclient.RoundEvent) -> None:
        print(describe(args.device, event), flush=True)

    stop = threading.Event()
    results: list[fedclient.RunResult] = []
    worker = threading.Thread(
        target=lambda: results.append(
            client.run_forever(
                stop=stop,
                on_round=on_round,
                backoff=fedclient.Backoff(cap_seconds=args.backoff_cap),
            )
        ),
        daemon=True,
    )
    worker.start()

    # -- the user's side, on the main thread while the worker takes part ----------------
    probe = data.x_test[:PROBE]
    labelled, predictions = half, 0
    while worker.is_alive():
        if labelled < len(y):  # a label arrives now and then
            examples.add(x[labelled : labelled + 1], y[labelled : labelled + 1], source="user")
            labelled += 1
        try:
            client.predict(probe[predictions % PROBE : predictions % PROBE + 1])
            predictions += 1
        except fedclient.StateError:
            pass  # no model held yet: the UI shows no suggestion
        worker.join(timeout=0.05)
    result = results[0]
    final = client.predict(probe)
    np.save(app_data / "predictions.npy", final)
    tuned = client.predict(probe, personalized=True).argmax(axis=1)
    print(
        json.dumps(
            {
                "device": args.device,
                "reason": result.reason,
                "rounds": result.rounds,
                "model_version": result.model_version,
                "predictions": str(app_data / "predictions.npy"),
                "predictions_served_while_training": predictions,
                "probe_accuracy": float((final.argmax(axis=1) == data.y_test[:PROBE]).mean()),
                "personalised_probe_accuracy": float((tuned == data.y_test[:PROBE]).mean()),
            }
        ),
        flush=True,
    )
    client.close()
    return 0 if result.reason == "finished" else 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(folder: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    """A fedserver of our own: (process, URL, enrolment secret file)."""
    secret = folder / "enrolment.secret"
    secret.write_text(os.urandom(24).hex())
    db = folder / "server.sqlite"
    fedserver = [sys.executable, "-m", "fedclient.server.cli"]
    init = ["init", "--plan", str(PLAN), "--db", str(db)]
    subprocess.run([*fedserver, *init], check=True, stdout=subprocess.DEVNULL)
    port = free_port()
    process = subprocess.Popen(
        [
            *fedserver,
            "--plan",
            str(PLAN),
            "--db",
            str(db),
            "--port",
            str(port),
            "--tick-seconds",
            "0.2",
            "--enrolment-secret-file",
            str(secret),
        ],
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return process, url, secret
        except httpx.TransportError:
            time.sleep(0.05)
    process.kill()
    raise SystemExit("fedserver did not start")


def run_fleet(args: argparse.Namespace) -> int:
    """Start a fedserver, run ``args.devices`` apps against it, stop it."""
    with tempfile.TemporaryDirectory(prefix="fedclient-app-") as folder:
        process, url, secret = serve(Path(folder))
        print(f"fedserver at {url} (plan {PLAN.name}, data in {folder})", flush=True)
        try:
            apps = [
                subprocess.Popen(
                    [
                        sys.executable,
                        __file__,
                        "--server",
                        url,
                        "--secret-file",
                        str(secret),
                        "--device",
                        str(i),
                        "--devices",
                        str(args.devices),
                        "--state-dir",
                        str(Path(folder) / f"device-{i}"),
                        "--seed",
                        str(args.seed),
                    ]
                )
                for i in range(args.devices)
            ]
            codes = [app.wait() for app in apps]
        finally:
            process.terminate()
            process.wait(timeout=30)
    print(f"apps exited with {codes}", flush=True)
    return max(codes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server", help="the fedserver's URL (default: start one here)")
    parser.add_argument("--secret-file", help="the enrolment secret the app ships")
    parser.add_argument("--device", type=int, default=0, help="which app of --devices this is")
    parser.add_argument("--devices", type=int, default=3, help="how many apps share the data")
    parser.add_argument("--state-dir", help="the app's own folder (default: app_data/device-N)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--retry-attempts",
        type=int,
        default=6,
        help="tries of one request before the loop's own backoff",
    )
    parser.add_argument(
        "--backoff-cap", type=float, default=30.0, help="the longest wait after failures, seconds"
    )
    args = parser.parse_args(argv)
    if not 0 <= args.device < args.devices:
        parser.error("--device must lie in [0, --devices)")
    if args.server is None:
        return run_fleet(args)
    args.state_dir = args.state_dir or f"app_data/device-{args.device}"
    return run_app(args)


if __name__ == "__main__":
    raise SystemExit(main())
