"""When a device may train: charging, battery, idle CPU, temperature, network, or the app's say.

Production federated learning trains only on devices that are charging, idle
and on an unmetered network (Bonawitz et al. 2019), so the user never notices.
A `Conditions` is a list of checks, each a callable returning True (met), False
(not met) or None (the platform cannot tell). A `fedclient.Client` given one
checks it before it checks in, before each step of a round, between minibatches
while it trains (at most every ``check_every`` seconds) and before it uploads: a
device that stops qualifying mid-round tells the server it is leaving (its place
goes to another device) and drops the round's work.

The ready-made checks read Linux's sysfs and ``/proc`` (single-board computers,
gateways, Linux phones); elsewhere they answer None, and the app passes its
own (e.g. from Android's BatteryManager via a bridge)::

    conditions = fedclient.Conditions(
        Conditions.charging(), Conditions.battery_at_least(50), Conditions.idle(),
        lambda: not app.in_foreground(),
    )
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

from fedclient._exceptions import InvalidInput

__all__ = ["Condition", "Conditions", "ConditionsUnmet"]

#: A check: True (met), False (not met), None (cannot tell here).
Condition = Callable[[], bool | None]

_POWER = Path("/sys/class/power_supply")
_THERMAL = Path("/sys/class/thermal")


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _system_supplies(root: Path) -> list[Path]:
    """The power supplies under ``root`` that power this machine: not those whose
    ``scope`` is ``Device`` (a wireless mouse's or a gamepad's battery)."""
    return [supply for supply in root.iterdir() if _read(supply / "scope") != "Device"]


class ConditionsUnmet(Exception):
    """Raised between minibatches when a check stopped holding: training ends there."""

    def __init__(self, check: str) -> None:
        super().__init__(f"conditions no longer met: {check}")
        self.check = check


class Conditions:
    """Every check must be met; a check that cannot tell counts as met unless ``strict``.

    While a round trains, the checks run between minibatches, at most every
    ``check_every`` seconds (0: before every minibatch; keep the checks cheap then)."""

    def __init__(self, *checks: Condition, strict: bool = False, check_every: float = 1.0) -> None:
        if not check_every >= 0:
            raise InvalidInput(f"check_every must be 0 or more seconds, got {check_every}")
        self.checks = checks
        self.strict = strict
        self.check_every = check_every

    def interrupt(self) -> Callable[[], None]:
        """What a training backend calls before each minibatch: it raises
        `ConditionsUnmet` once a check no longer holds (looking at most every
        ``check_every`` seconds, the first time after that long)."""
        last = time.monotonic()

        def interrupt() -> None:
            nonlocal last
            now = time.monotonic()
            if now - last < self.check_every:
                return
            last = now
            unmet = self.unmet()
            if unmet is not None:
                raise ConditionsUnmet(unmet)

        return interrupt

    def unmet(self) -> str | None:
        """The first check that is not met (its name), or None when all are."""
        for check in self.checks:
            answer = check()
            if answer is False or (answer is None and self.strict):
                return getattr(check, "__name__", repr(check))
        return None

    # -- ready-made checks -----------------------------------------------------------
    @staticmethod
    def charging(root: Path = _POWER) -> Condition:
        """On external power (a mains or USB supply online, or a battery charging/full)."""

        def charging() -> bool | None:
            if not root.is_dir():
                return None
            supplies = _system_supplies(root)
            for supply in supplies:
                kind = _read(supply / "type")
                if kind in ("Mains", "USB", "USB_C", "USB_PD") and _read(supply / "online") == "1":
                    return True
                if kind == "Battery" and _read(supply / "status") in ("Charging", "Full"):
                    return True
            return False if supplies else None

        return charging

    @staticmethod
    def battery_at_least(percent: float, root: Path = _POWER) -> Condition:
        """The battery holds at least ``percent`` % (no battery: a wired device, met)."""

        def battery() -> bool | None:
            if not root.is_dir():
                return None
            levels = [
                int(level)
                for supply in _system_supplies(root)
                if _read(supply / "type") == "Battery"
                and (level := _read(supply / "capacity") or "").isdigit()
            ]
            return True if not levels else min(levels) >= percent

        return battery

    @staticmethod
    def idle(max_load: float = 0.5) -> Condition:
        """The last minute's load average per CPU is at most ``max_load``."""

        def idle() -> bool | None:
            try:
                load = os.getloadavg()[0]
            except OSError:
                return None
            return load / (os.cpu_count() or 1) <= max_load

        return idle

    @staticmethod
    def cooler_than(celsius: float, root: Path = _THERMAL) -> Condition:
        """Every thermal zone is below ``celsius`` degrees."""

        def cool() -> bool | None:
            temps = [
                int(raw) / 1000
                for zone in (root.glob("thermal_zone*") if root.is_dir() else [])
                if (raw := _read(zone / "temp") or "").lstrip("-").isdigit()
            ]
            return None if not temps else max(temps) < celsius

        return cool

    @staticmethod
    def unmetered(probe: Callable[[], bool | None] | None = None) -> Condition:
        """On an unmetered network. Linux does not say in general: without ``probe``
        (the app's, e.g. NetworkManager's or the phone's) this cannot tell (None)."""

        def unmetered() -> bool | None:
            return probe() if probe is not None else None

        return unmetered
