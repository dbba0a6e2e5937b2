"""Virtual devices: how fast each computes and talks, when it is online, how often it fails.

Times are simulated, never slept: a device's round costs
``3 * latency + model_bytes / bandwidth_down + work / examples_per_second
+ update_bytes / bandwidth_up`` seconds of simulated time.

A fleet comes from a named preset (`PRESETS`) or from a CSV trace file
(``--fleet trace:PATH``) with one row per device profile and these columns
(a header row names them; rows are reused in turn when the fleet is larger):

    examples_per_second   training speed
    bandwidth_up          uplink, bytes per second
    bandwidth_down        downlink, bytes per second
    latency               one-way latency, seconds
    failure_rate          chance the device drops out of a round it joined (0-1)
    online_from_hour      start of its daily online window, 0-24 (simulated clock)
    online_hours          length of the window; 24 = always online
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np

from fedclient._exceptions import InvalidInput

__all__ = [
    "PRESETS",
    "DeviceProfile",
    "ProfileColumns",
    "draw_profile_columns",
    "draw_profiles",
    "load_trace",
]

DAY = 24 * 3600.0


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    """One device's speed, link, reliability and daily availability."""

    examples_per_second: float
    bandwidth_up: float  # bytes per second
    bandwidth_down: float  # bytes per second
    latency: float  # seconds, one way
    failure_rate: float = 0.0
    online_from_hour: float = 0.0
    online_hours: float = 24.0

    def training_seconds(self, work: int) -> float:
        """Simulated seconds to train ``work`` example-epochs."""
        return work / self.examples_per_second

    def round_seconds(
        self, examples: int, epochs: int, down_bytes: int, up_bytes: int, round_trips: int = 3
    ) -> float:
        """Simulated seconds from check-in to the end of the upload (``round_trips``:
        check-in, download and upload; 2 when the model came with the admission)."""
        return (
            round_trips * self.latency
            + down_bytes / self.bandwidth_down
            + self.training_seconds(examples * epochs)
            + up_bytes / self.bandwidth_up
        )

    def online(self, now: float) -> bool:
        """Whether the device is online (charging, on Wi-Fi) at simulated time ``now``."""
        if self.online_hours >= 24:
            return True
        hour = (now % DAY) / 3600.0
        return (hour - self.online_from_hour) % 24 < self.online_hours


#: Fleet presets. speed: median examples/s; sigma: lognormal spread of speed and link;
#: slow: share of devices 10x slower than the rest; fail: per-round failure rate;
#: hours: daily online window (24 = always).
PRESETS: dict[str, dict[str, float]] = {
    "phones": {"speed": 40.0, "sigma": 0.5, "up": 250e3, "down": 1.5e6, "latency": 0.08},
    "uniform": {"speed": 40.0, "sigma": 0.0, "up": 250e3, "down": 1.5e6, "latency": 0.08},
    "slow-tail": {
        "speed": 40.0,
        "sigma": 0.5,
        "up": 250e3,
        "down": 1.5e6,
        "latency": 0.08,
        "slow": 0.2,
        "fail": 0.05,
    },
    "diurnal": {
        "speed": 40.0,
        "sigma": 0.5,
        "up": 250e3,
        "down": 1.5e6,
        "latency": 0.08,
        "fail": 0.02,
        "hours": 8.0,
    },
}


@dataclass(frozen=True, slots=True)
class ProfileColumns:
    """Every device's profile as columns (a fleet of millions holds arrays, not objects).

    ``speed``, ``link`` and ``latency`` hold one value per device; ``up`` and ``down``
    scale ``link`` into bandwidths; a device's daily window starts at ``start[i]``
    (all zeros when the preset has none). A trace's rows are ``rows`` instead, reused
    in turn. `profile` builds the `DeviceProfile` of one device when it is needed."""

    speed: np.ndarray
    link: np.ndarray
    latency: np.ndarray
    start: np.ndarray | None
    up: float
    down: float
    fail: float
    hours: float
    rows: tuple[DeviceProfile, ...] = ()

    def __len__(self) -> int:
        return len(self.speed)

    def profile(self, i: int) -> DeviceProfile:
        """Device ``i``'s profile (the same floats as drawn, whichever way it is read)."""
        if self.rows:
            return self.rows[i % len(self.rows)]
        q = float(self.link[i])
        return DeviceProfile(
            float(self.speed[i]),
            float(self.up * q),
            float(self.down * q),
            float(self.latency[i]),
            self.fail,
            0.0 if self.start is None else float(self.start[i]),
            self.hours,
        )

    def failure_rate(self, i: int) -> float:
        """Device ``i``'s chance to drop out of a round it joined."""
        return self.rows[i % len(self.rows)].failure_rate if self.rows else self.fail

    def online(self, i: int, now: float) -> bool:
        """Whether device ``i``'s daily window holds simulated time ``now``."""
        if self.rows:
            return self.rows[i % len(self.rows)].online(now)
        if self.hours >= 24 or self.start is None:
            return True
        hour = (now % DAY) / 3600.0
        return bool((hour - self.start[i]) % 24 < self.hours)

    def online_mask(self, now: float) -> np.ndarray | None:
        """Which devices' daily windows hold ``now`` (None: every device's does)."""
        if self.rows:
            each = np.array([r.online(now) for r in self.rows])
            return None if each.all() else np.resize(each, len(self))
        if self.hours >= 24 or self.start is None:
            return None
        hour = (now % DAY) / 3600.0
        mask: np.ndarray = (hour - self.start) % 24 < self.hours
        return mask

    def online_count(self, now: float) -> int:
        """How many devices' daily windows hold ``now`` (counted over the columns)."""
        mask = self.online_mask(now)
        return len(self) if mask is None else int(np.count_nonzero(mask))


def draw_profile_columns(n: int, rng: np.random.Generator, fleet: str = "phones") -> ProfileColumns:
    """``n`` profiles from a named preset, or from ``trace:PATH`` (see the module docs),
    as columns: the same draws, in the same order, as `draw_profiles`."""
    if fleet.startswith("trace:"):
        trace = load_trace(fleet.removeprefix("trace:"))
        empty = np.zeros(n, dtype=np.float64)  # (a trace's rows hold the profiles)
        return ProfileColumns(empty, empty, empty, None, 0.0, 0.0, 0.0, 24.0, tuple(trace))
    if fleet not in PRESETS:
        raise InvalidInput(
            f"unknown fleet {fleet!r}; use one of {', '.join(PRESETS)} or trace:PATH.csv"
        )
    p = PRESETS[fleet]
    speed = p["speed"] * rng.lognormal(0.0, p["sigma"], n)
    if p.get("slow"):
        speed[rng.random(n) < p["slow"]] /= 10.0
    link = rng.lognormal(0.0, p["sigma"], n)
    latency = p["latency"] * rng.lognormal(0.0, p["sigma"] / 2, n)
    # Devices live in every time zone (drawn only when the preset has a window).
    start = rng.uniform(0.0, 24.0, n) if p.get("hours", 24.0) < 24 else None
    return ProfileColumns(
        speed, link, latency, start, p["up"], p["down"], p.get("fail", 0.0), p.get("hours", 24.0)
    )


def draw_profiles(n: int, rng: np.random.Generator, fleet: str = "phones") -> list[DeviceProfile]:
    """``n`` profiles from a named preset, or from ``trace:PATH`` (see the module docs)."""
    columns = draw_profile_columns(n, rng, fleet)
    return [columns.profile(i) for i in range(n)]


def load_trace(path: str | Path) -> list[DeviceProfile]:
    """Device profiles from a CSV trace file (columns as in the module docs)."""
    names = [f.name for f in fields(DeviceProfile)]
    try:
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    except OSError as exc:
        raise InvalidInput(f"cannot read fleet trace {path}: {exc}") from exc
    if not rows:
        raise InvalidInput(f"fleet trace {path} has no rows")
    missing = [n for n in names[:4] if n not in rows[0]]
    if missing:
        raise InvalidInput(f"fleet trace {path} lacks columns {missing}; it needs {names}")
    profiles = []
    for number, row in enumerate(rows, start=2):
        try:
            values = {n: float(row[n]) for n in names if row.get(n) not in (None, "")}
            profile = DeviceProfile(**values)
        except (TypeError, ValueError) as exc:
            raise InvalidInput(f"{path}, line {number}: {exc}") from exc
        if min(profile.examples_per_second, profile.bandwidth_up, profile.bandwidth_down) <= 0:
            raise InvalidInput(f"{path}, line {number}: speeds and bandwidths must be > 0")
        if not 0 <= profile.failure_rate <= 1:
            raise InvalidInput(f"{path}, line {number}: failure_rate must lie in [0, 1]")
        profiles.append(profile)
    return profiles
