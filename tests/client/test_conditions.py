"""Conditions hold during training too: checked between minibatches and before the upload;
a device that stops qualifying leaves the round (issue 25)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import fedclient
from fedclient.conditions import ConditionsUnmet
from tests.conftest import LiveServer, Server

pytestmark = pytest.mark.anyio


class UnplugAfter:
    """A numpy model on a phone that is unplugged after ``batches`` minibatches: the
    model trains through the SDK's own backend, which calls the interrupt it is given."""

    runtime = "numpy"

    def __init__(self, batches: int, charging: list[bool]) -> None:
        self.inner = fedclient.models.mlp(64, 16, 10)
        self.inputs, self.classes = 64, 10
        self.batches, self.charging, self.ran = batches, charging, 0

    def get_weights(self) -> Any:
        return self.inner.get_weights()

    def set_weights(self, weights: Any) -> None:
        self.inner.set_weights(weights)

    def train(self, x: Any, y: Any, *, interrupt: Callable[[], None], **settings: Any) -> Any:
        def unplug_then_check() -> None:
            if self.ran == self.batches:
                self.charging[0] = False  # the cable comes out here
            interrupt()
            self.ran += 1

        return self.inner.train(x, y, interrupt=unplug_then_check, **settings)

    def evaluate(self, x: Any, y: Any) -> Any:
        return self.inner.evaluate(x, y)

    def predict(self, x: Any) -> Any:
        return self.inner.predict(x)


async def test_a_condition_that_turns_false_mid_training_leaves_the_round(
    make_server: Any, digits: Any
) -> None:
    server: Server = make_server(devices_per_round=1, over_selection=1.0)
    charging = [True]
    model = UnplugAfter(3, charging)
    device = fedclient.Client(
        "http://fedserver.local",
        "digits",
        (digits.x_train[:80], digits.y_train[:80]),  # 10 minibatches of 8 an epoch
        model=model,
        transport=server.transport(),
        conditions=fedclient.Conditions(lambda: charging[0], check_every=0),
    )
    outcome = await device.astep()
    while outcome.status not in ("discarded", "trained"):
        outcome = await device.astep()
    assert outcome.status == "discarded" and "conditions no longer met" in outcome.reason
    assert model.ran == 3  # it stopped at the next minibatch, not at the end of the round
    assert server.store.admitted_count(1) == 0  # the place went back
    assert device.device_state.phase("digits") is fedclient.Phase.IDLE
    assert server.store.update_count(1) == 0


async def test_a_condition_that_turns_false_after_training_leaves_before_the_upload(
    make_server: Any, digits: Any
) -> None:
    server: Server = make_server(devices_per_round=1, over_selection=1.0)
    charging = [True]

    async def train_then_unplug(task: fedclient.TrainTask) -> Any:
        trained = task.run()
        charging[0] = False
        return trained

    device = fedclient.Client(
        "http://fedserver.local",
        "digits",
        (digits.x_train[:80], digits.y_train[:80]),
        transport=server.transport(),
        atrain=train_then_unplug,
        conditions=fedclient.Conditions(lambda: charging[0]),
    )
    outcome = await device.astep()
    while outcome.status != "trained":
        outcome = await device.astep()
    left = await device.astep()
    assert left.status == "discarded" and "conditions no longer met" in left.reason
    assert server.store.update_count(1) == 0 and server.store.admitted_count(1) == 0


@pytest.mark.parametrize("runtime", ["numpy", "onnx", "tflite"])
def test_every_backend_asks_before_each_minibatch(runtime: str, digits: Any) -> None:
    if runtime == "tflite":
        pytest.importorskip("ai_edge_litert")
    spec = fedclient.protocol.ModelSpec(kind="mlp", inputs=64, hidden=[16], classes=10)
    backend = fedclient.create_backend(spec, runtime)
    asked = [0]

    def stop_at_the_fourth() -> None:
        asked[0] += 1
        if asked[0] == 4:
            raise ConditionsUnmet("charging")

    before = backend.get_weights()
    with pytest.raises(ConditionsUnmet):
        backend.train(
            digits.x_train[:64],
            digits.y_train[:64],
            epochs=2,
            batch_size=8,
            learning_rate=0.1,
            rng=np.random.default_rng(0),
            interrupt=stop_at_the_fourth,
        )
    assert asked[0] == 4
    assert any(not np.array_equal(before[k], v) for k, v in backend.get_weights().items())


def test_conditions_look_at_most_every_check_every_seconds() -> None:
    looked = [0]

    def count() -> bool:
        looked[0] += 1
        return True

    interrupt = fedclient.Conditions(count, check_every=3600).interrupt()
    for _ in range(1000):
        interrupt()
    assert looked[0] == 0  # an hour has not passed
    with pytest.raises(fedclient.InvalidInput):
        fedclient.Conditions(count, check_every=-1)


def _sysfs(root: Path, supplies: dict[str, dict[str, str]]) -> Path:
    """A /sys/class/power_supply as Linux lays it out: a folder per supply, a file per
    attribute, each value ending in a newline."""
    root.mkdir()
    for name, attributes in supplies.items():
        (root / name).mkdir()
        for attribute, value in attributes.items():
            (root / name / attribute).write_text(value + "\n")
    return root


AC = {"type": "Mains", "online": "1"}
BATTERY = {"type": "Battery", "scope": "System", "status": "Discharging", "capacity": "80"}
# A wireless mouse's battery (hid-*-battery): it powers the mouse, not this machine.
MOUSE = {"type": "Battery", "scope": "Device", "status": "Discharging", "capacity": "5"}


@pytest.mark.parametrize(
    ("supplies", "charging", "battery_at_least_50"),
    [
        ({"AC": AC, "BAT0": BATTERY}, True, True),  # a laptop on its charger
        ({"AC": {**AC, "online": "0"}, "BAT0": BATTERY}, False, True),  # ...unplugged
        ({"BAT0": {**BATTERY, "status": "Full", "capacity": "40"}}, True, False),
        ({"usb": {"type": "USB", "online": "1"}, "battery": BATTERY}, True, True),  # a phone
        ({}, None, True),  # a board with no supplies the kernel knows of: cannot tell
        # A desktop or gateway on mains with a wireless mouse: the mouse's battery says
        # nothing about this machine's power.
        ({"hid-00:1f:20:aa:bb:cc-battery": MOUSE}, None, True),
        ({"AC": AC, "BAT0": BATTERY, "hid-mouse-battery": MOUSE}, True, True),
    ],
)
def test_the_ready_made_power_checks_read_sysfs_as_linux_lays_it_out(
    tmp_path: Path,
    supplies: dict[str, dict[str, str]],
    charging: bool | None,
    battery_at_least_50: bool,
) -> None:
    root = _sysfs(tmp_path / "power_supply", supplies)
    assert fedclient.Conditions.charging(root)() is charging
    assert fedclient.Conditions.battery_at_least(50, root)() is battery_at_least_50
    assert fedclient.Conditions.charging(tmp_path / "absent")() is None  # not Linux


@pytest.mark.parametrize(
    ("zones", "cool"),
    [
        ({"thermal_zone0": "45000", "thermal_zone1": "61500"}, False),  # one zone at 61.5 C
        ({"thermal_zone0": "45000", "thermal_zone1": "-5000"}, True),  # an outdoor sensor
        ({"thermal_zone0": ""}, None),  # a zone the driver cannot read: cannot tell
        ({}, None),
    ],
)
def test_cooler_than_reads_every_thermal_zone(
    tmp_path: Path, zones: dict[str, str], cool: bool | None
) -> None:
    root = tmp_path / "thermal"
    root.mkdir()
    (root / "cooling_device0").mkdir()  # not a zone: a fan
    (root / "cooling_device0" / "cur_state").write_text("3\n")
    for zone, millidegrees in zones.items():
        (root / zone).mkdir()
        (root / zone / "temp").write_text(millidegrees + "\n")
    assert fedclient.Conditions.cooler_than(60, root)() is cool


def test_the_ready_made_checks_decide_whether_a_device_checks_in(
    live_server: Any, digits: Any, tmp_path: Path
) -> None:
    # A gateway unplugged from its charger waits; plugged in, it takes part.
    live: LiveServer = live_server(devices_per_round=1)
    root = _sysfs(tmp_path / "power_supply", {"AC": {**AC, "online": "0"}, "BAT0": BATTERY})
    checks = fedclient.Conditions(fedclient.Conditions.charging(root), strict=True)
    data = (digits.x_train[:100], digits.y_train[:100])
    with fedclient.Client(live.url, "digits", data, conditions=checks) as device:
        waiting = device.run_once()
        assert waiting.status == "waiting" and "charging" in waiting.reason, waiting
        assert live.server.store.admitted_count(1) == 0
        (root / "AC" / "online").write_text("1\n")
        assert device.run_once().status == "uploaded"
