"""The README's examples, run as they stand (issue 25): every ```python block, in order,
in one namespace (as a reader follows the tour), against real ``fedserver`` processes;
and the reference server's commands, with the README's own plan, read as ``curl`` does.

What the blocks assume, the README says: ``x``, ``y`` (the digits data), ``app`` (the
platform's answers), ``APP_ENROLMENT_SECRET``, ``user_id``. Their URLs
(``https://fl.example.com``, ``http://127.0.0.1:8080``) are pointed at a server on a
free port serving ``examples/app/plan.toml`` with one device a round, so each block
runs alone: the app's block (it enrols with the secret) at one that requires the
secret, the others at one with open enrolment, as the README's quickstart server is.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import fedclient
from tests.integration.test_apps import SECRET, served_model
from tests.integration.test_fedserver_process import FedServerProcess, _free_port

README = Path(__file__).parents[1] / "README.md"
APP_PLAN = Path(__file__).parents[1] / "examples" / "app" / "plan.toml"
URLS = ("https://fl.example.com", "http://127.0.0.1:8080")


def fenced(language: str) -> list[tuple[int, str]]:
    """The README's ```language blocks: (line of the fence, code)."""
    text = README.read_text()
    return [
        (text[: m.start()].count("\n") + 1, m.group(1))
        for m in re.finditer(rf"^```{language}\n(.*?)^```", text, re.S | re.M)
    ]


class Platform:
    """The ``app`` the README's app block asks: plugged in and on Wi-Fi."""

    def is_charging(self) -> bool:
        return True

    def on_wifi(self) -> bool:
        return True


def _server(folder: Path, *, secret: bool) -> FedServerProcess:
    folder.mkdir()
    plan = APP_PLAN.read_text().replace("rounds = 10", "rounds = 3")
    plan = plan.replace("devices_per_round = 2", "devices_per_round = 1")
    args: tuple[str, ...] = ()
    if secret:
        (folder / "enrolment.secret").write_text(SECRET)
        args = ("--enrolment-secret-file", str(folder / "enrolment.secret"))
    server = FedServerProcess(folder, rounds=3, per_round=1, plan=plan, options=args)
    server.start()
    return server


def test_every_python_block_runs_in_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, digits: Any
) -> None:
    # The strategy plugin's file runs from a plan in its own folder:
    # tests/simulator/test_plugins.py::test_the_readme_s_krum_runs_from_a_plan.
    plugins = [b for b in fenced("python") if b[1].startswith("# krum.py")]
    blocks = [b for b in fenced("python") if b not in plugins]
    assert len(plugins) == 1
    assert len(blocks) == 4, "a new block: say below what it should leave behind"
    monkeypatch.chdir(tmp_path)  # the blocks' app_data/ and fl.sqlite land here
    open_server = _server(tmp_path / "open", secret=False)
    secret_server = _server(tmp_path / "secret", secret=True)
    x, y = digits.x_train[:300], digits.y_train[:300]
    # The app has collected examples in earlier sessions.
    earlier = fedclient.ExampleStore(tmp_path / "app_data" / "examples.sqlite")
    earlier.add(x[:100], y[:100], source="user-1")
    earlier.add(x[100:200], y[100:200], source="user-2")
    earlier.db.close()
    namespace: dict[str, Any] = {
        "x": x,
        "y": y,
        "app": Platform(),
        "APP_ENROLMENT_SECRET": SECRET,
        "user_id": "user-1",
    }
    try:
        for line, code in blocks:
            server = secret_server if "enrolment_credential" in code else open_server
            for url in URLS:
                code = code.replace(url, server.url)
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
            if "fedclient.fit(" in code:
                # fit's federated call ends holding the model its update went into.
                state = fedclient.DeviceState(tmp_path / "app_data" / "fl.sqlite")
                identity = state.identity(server.url)
                assert identity is not None
                served = served_model(server, identity.token, 1)
                for name, value in namespace["model"].get_weights().items():
                    np.testing.assert_array_equal(value, served[name])
            elif "run_once()" in code:
                assert namespace["outcome"].status == "uploaded"
                namespace["client"].close()  # the next block makes the app's client
            elif "run_forever" in code:
                _play_the_app(namespace, server, digits)
            elif "IdentityAuthority" in code:
                authority = namespace["authority"]
                assert namespace["policy"].trusted_authorities == (authority.public,)
                held = namespace["client"].device_state.identity_certificate()
                assert held == namespace["cert"]
    finally:
        if "stop" in namespace:
            namespace["stop"].set()
            namespace["worker"].join(timeout=30)
            namespace["client"].close()
        for server in (open_server, secret_server):
            server.stop()


def _play_the_app(namespace: dict[str, Any], server: FedServerProcess, digits: Any) -> None:
    """Use the README's app as its UI would while its worker takes part."""
    namespace["on_labelled"](digits.x_train[300], int(digits.y_train[300]))  # any thread
    worker = namespace["worker"]
    worker.join(timeout=120)
    assert not worker.is_alive(), "the app's run_forever did not end with the job"
    client = namespace["client"]
    held = client.device_state.held_version("digits")
    assert held is not None and held[0] == server.status()["model_version"] == 3
    label = namespace["classify"](digits.x_test[0])
    assert label.shape == (1,) and 0 <= int(label[0]) < 10
    tuned = client.latest_model(personalized=True)
    forgotten = namespace["on_forget_me"]()
    assert forgotten == fedclient.Forgotten(101, complete=True)  # 100 earlier, 1 just now
    assert client.latest_model(personalized=True) is not tuned  # tuned on user-2's alone


def test_the_servers_commands_serve_status_as_curl_reads_it(tmp_path: Path) -> None:
    (plan,) = [code for _, code in fenced("toml") if code.startswith("# plan.toml")]
    (tmp_path / "plan.toml").write_text(plan)
    commands = [
        shlex.split(line.split("#")[0])
        for _, code in fenced("bash")
        for line in code.splitlines()
        if line.startswith(".venv/bin/fedserver ") and "plan.toml --db server.sqlite" in line
    ]
    assert [c[1] for c in commands] == ["init", "--plan"]  # init, then serve
    fedserver = [sys.executable, "-m", "fedclient.server.cli"]
    subprocess.run([*fedserver, *commands[0][1:]], cwd=tmp_path, check=True, capture_output=True)
    serve = commands[1][1:]
    port = _free_port()
    serve[serve.index("--port") + 1] = str(port)
    process = subprocess.Popen(
        [*fedserver, *serve], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        url = f"http://127.0.0.1:{port}"
        status = None
        for _ in range(600):  # its readiness: up to 30 s
            try:
                status = httpx.get(url + "/v1/jobs/digits", timeout=1)  # as curl: no token
                break
            except httpx.TransportError:
                assert process.poll() is None, "fedserver exited"
                threading.Event().wait(0.05)
        assert status is not None and status.status_code == 200, status
        assert status.json()["job"] == "digits" and status.json()["status"] == "running"
        # "job status, plan, current round": the plan served is the README's own.
        assert status.json()["plan"]["job"]["devices_per_round"] == 20
        assert status.json()["plan"]["evaluate"]["devices"] == 20
        assert status.json()["current_round"]["number"] == 1
        openapi = httpx.get(url + "/openapi.json", timeout=5)
        assert "/v1/rounds/{round_id}/evaluation" in openapi.json()["paths"]
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_the_two_commands_are_what_they_say(tmp_path: Path) -> None:
    # "Two commands": the first, as written but for 3 rounds of its 40, from a folder
    # with no runs/ yet, through the installed fedsim script; the second is what
    # .ci/run runs.
    text = README.read_text()
    heading = text[: text.index("## Two commands")].count("\n") + 1
    tour = text[: text.index("## A five-minute tour")].count("\n") + 1
    ((_, code),) = [block for block in fenced("bash") if heading < block[0] < tour]
    lines = [line for line in code.splitlines() if line and not line.startswith("#")]
    first, second = (line.split(" && ") for line in lines)
    run = shlex.split(first[2])
    assert run[0] == ".venv/bin/fedsim"
    run[run.index("--rounds") + 1] = "3"
    fedsim = Path(sys.executable).with_name("fedsim")
    done = subprocess.run(
        [str(fedsim), *run[1:]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"},  # what it imports, on stderr
    )
    assert done.returncode == 0, done.stderr
    said = done.stdout + done.stderr
    # This venv holds every extra; a fresh one holds what '.[sim]' brings, no more.
    outside = _distributions_imported(done.stderr) - _installed_with("fedclient", "sim")
    assert not outside, f"fedsim run imports {outside}, which '.[sim]' does not install"
    for number in (1, 2, 3):  # the held-out accuracy after every round
        assert re.search(rf"^round +{number}  accuracy 0\.\d{{4}}", said, re.M), said
    report = json.loads((tmp_path / "runs" / "digits.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    assert report["final"]["accuracy"] == report["rounds"][-1]["accuracy"]
    assert (tmp_path / "runs" / "digits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    assert " && ".join(second) in ci


def _distributions_imported(importtime: str) -> set[str]:
    """The installed distributions whose modules a ``-X importtime`` log shows imported
    (leaving out the standard library and private names: startup hooks, C parts)."""
    from importlib.metadata import packages_distributions

    from packaging.utils import canonicalize_name

    owners = packages_distributions()
    modules = {
        m.group(1).split(".")[0]
        for m in re.finditer(r"^import time:.*\|\s*(\S+)$", importtime, re.M)
    }
    assert "numpy" in modules  # the log is there
    return {
        canonicalize_name(owner)
        for module in modules - set(sys.stdlib_module_names)
        if not module.startswith("_")
        for owner in owners.get(module, [])
    }


def _installed_with(name: str, extra: str) -> set[str]:
    """The distributions ``pip install name[extra]`` installs: its requirements and
    theirs, markers evaluated here."""
    from importlib.metadata import requires

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(name, frozenset({extra}))]
    while todo:
        dist, extras = todo.pop()
        if (canonicalize_name(dist), extras) in seen:
            continue
        seen.add((canonicalize_name(dist), extras))
        for text in requires(dist) or []:
            needed = Requirement(text)
            marker = needed.marker
            if marker is None or any(marker.evaluate({"extra": e}) for e in {"", *extras}):
                todo.append((needed.name, frozenset(needed.extras)))
    return {dist for dist, _ in seen}


def test_the_readme_plan_runs_in_fedsim_as_the_readme_says(tmp_path: Path) -> None:
    # "fedsim run --plan plan.toml --dataset digits --devices 100 simulates the very plan
    # fedserver serves": the README's plan (2 of its 40 rounds), its [evaluate] heard
    # from every device asked, beside the central accuracy of the same model.
    (plan,) = [code for _, code in fenced("toml") if code.startswith("# plan.toml")]
    (tmp_path / "plan.toml").write_text(plan.replace("rounds = 40", "rounds = 2"))
    (command,) = re.findall(r"`(fedsim run --plan plan\.toml[^`]*)`", README.read_text())
    fedsim = Path(sys.executable).with_name("fedsim")
    args = [*shlex.split(command)[1:], "--report", "r.json"]
    done = subprocess.run(
        [str(fedsim), *args], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["plan"]["job"]["devices_per_round"] == 20 and len(report["rounds"]) == 2
    for r in report["rounds"]:
        assert (r["admitted"], r["updates"], r["evaluated"]) == (26, 20, 20), r
        assert r["federated_model_version"] == r["model_version"] - 1  # the one it started from
        assert 0 < r["federated_accuracy"] < 1 and 0 < r["federated_central_accuracy"] < 1
