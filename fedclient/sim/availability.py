"""When devices are online: sessions that come and go over the simulated clock.

``fedsim run --availability MODEL``:

``always`` (the default)
    Every device is online whenever its profile's daily window (``--fleet``) says so.

``diurnal[:peak=P,trough=T,session=MINUTES]``
    Each device alternates online and offline sessions of random length. Online
    sessions last ``session`` minutes on average (default 30, exponentially
    distributed); an offline device comes back at a rate that makes the share of
    time it is online follow a daily curve of its local time: ``peak`` (default 0.6,
    below 1) at 03:00, when phones charge on Wi-Fi, down to ``trough`` (default
    0.05) at 15:00, along a cosine. Each device lives in a time zone drawn from the seed. A device
    that goes offline before it finishes a round's work drops out of the round (the
    report counts it ``unavailable``), as it does in production.

``trace:PATH.csv``
    Measured availability: a CSV file with a header row and the columns
    ``device,start,end`` (an integer id, then seconds on the simulated clock): the
    device is online from ``start`` until ``end``; a device has as many rows as it
    has sessions. The trace repeats every whole number of days that holds its last
    ``end``. A fleet larger than the trace's devices reuses them in turn (device ``i``
    follows the trace's ``i mod n``-th device, in the order of their ids).

Nothing per device is an object: the session model keeps three columns (its time
zone, whether it is online, when that may change: 10 bytes a device); every change is
drawn from one generator seeded with the run's seed, in a fixed order, so the same
seed gives the same sessions. Selection (`fedclient.sim.engine`) asks only
devices that are online to check in.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Protocol

import numpy as np

from fedclient._exceptions import InvalidInput

__all__ = ["Availability", "DiurnalSessions", "TraceAvailability", "parse_availability"]

DAY = 24 * 3600.0
#: The local hour at which the most devices are online (charging, idle, on Wi-Fi).
PEAK_HOUR = 3.0
#: The random stream (with the run's seed) that draws the sessions.
_STREAM = 0xA7A1


class Availability(Protocol):
    """Which devices are online, and until when (simulated seconds)."""

    def online(self, i: int, now: float) -> bool:
        """Whether device ``i`` is online at ``now``."""
        ...

    def online_mask(self, now: float) -> np.ndarray:
        """Every device's `online` at ``now``, as a boolean array."""
        ...

    def online_until(self, i: int, now: float) -> float:
        """When device ``i``, online at ``now``, goes offline."""
        ...


def parse_availability(text: str, devices: int, seed: int) -> Availability | None:
    """The model ``--availability`` names (None: ``always``)."""
    kind, _, arg = text.partition(":")
    if kind == "always" and not arg:
        return None
    if kind == "diurnal":
        settings = {"peak": 0.6, "trough": 0.05, "session": 30.0}
        for item in filter(None, (part.strip() for part in arg.split(","))):
            key, _, value = item.partition("=")
            if key not in settings:
                raise InvalidInput(f"--availability diurnal: unknown setting {key!r}")
            try:
                settings[key] = float(value)
            except ValueError:
                raise InvalidInput(f"--availability diurnal: {key} needs a number") from None
        peak, trough, session = settings["peak"], settings["trough"], settings["session"]
        if not 0 < trough <= peak < 1 or session <= 0:
            raise InvalidInput(
                "--availability diurnal: needs 0 < trough <= peak < 1 and session > 0 minutes"
            )
        return DiurnalSessions(devices, seed, peak, trough, session * 60.0)
    if kind == "trace" and arg:
        return TraceAvailability(arg, devices)
    raise InvalidInput(
        f"unknown --availability {text!r}; use always, diurnal[:peak=P,trough=T,session=MIN] "
        "or trace:PATH.csv"
    )


class DiurnalSessions:
    """On/off sessions whose online share follows the local time of day (module docs)."""

    def __init__(self, devices: int, seed: int, peak: float, trough: float, session: float) -> None:
        self.peak, self.trough, self.session = peak, trough, session
        # An offline device comes online at rate share / (session * (1 - share)), so that
        # it is online that share of the time; the rate follows its local hour. It is
        # played by thinning: chances at the day's highest rate, each taken with the
        # ratio of the rate now to that one (so the share tracks the curve, without lag).
        self.fastest = peak / (session * (1.0 - peak))
        self.rng = np.random.default_rng([seed, _STREAM])
        self.zone = self.rng.integers(0, 24, devices, dtype=np.int8)  # hours ahead of UTC
        self.now = 0.0
        self.on = self.rng.random(devices) < self.share(self.zone.astype(np.float64))
        self.until = self._next(self.on, np.zeros(devices))

    def share(self, local_hour: np.ndarray) -> np.ndarray:
        """The share of time a device is online at each local hour."""
        swing = (1.0 + np.cos(2 * math.pi * (local_hour - PEAK_HOUR) / 24.0)) / 2.0
        result: np.ndarray = self.trough + (self.peak - self.trough) * swing
        return result

    def _next(self, on: np.ndarray, at: np.ndarray) -> np.ndarray:
        """The next change from ``at``: an online session's end (mean ``session``; being
        memoryless, what remains of one under way is a whole one), or an offline
        device's next chance to come online."""
        mean = np.where(on, self.session, 1.0 / self.fastest)
        result: np.ndarray = at + self.rng.exponential(1.0, len(on)) * mean
        return result

    def _advance(self, now: float) -> None:
        """Play every change up to ``now`` (a later time only)."""
        if now <= self.now:
            return
        self.now = now
        changing = np.flatnonzero(self.until <= now)
        while len(changing):
            at = self.until[changing]
            local = (at / 3600.0 + self.zone[changing]) % 24.0
            share = self.share(local)
            rate = share / (self.session * (1.0 - share))
            chance = self.rng.random(len(changing))
            on = ~self.on[changing] & (chance < rate / self.fastest)
            self.on[changing] = on
            self.until[changing] = self._next(on, at)
            changing = changing[self.until[changing] <= now]

    def online(self, i: int, now: float) -> bool:
        self._advance(now)
        return bool(self.on[i])

    def online_mask(self, now: float) -> np.ndarray:
        self._advance(now)
        return self.on

    def online_until(self, i: int, now: float) -> float:
        self._advance(now)
        return float(self.until[i]) if self.on[i] else now


class TraceAvailability:
    """Online sessions read from a CSV trace (module docs), reused in turn by a larger fleet."""

    def __init__(self, path: str | Path, devices: int) -> None:
        sessions: dict[int, list[tuple[float, float]]] = {}
        try:
            with open(path, newline="") as handle:
                reader = csv.DictReader(handle)
                missing = {"device", "start", "end"} - set(reader.fieldnames or ())
                if missing:
                    raise InvalidInput(
                        f"availability trace {path} lacks columns {sorted(missing)}; "
                        "it needs device,start,end"
                    )
                for number, row in enumerate(reader, start=2):
                    try:
                        device = int(row["device"])
                        start, end = float(row["start"]), float(row["end"])
                    except (TypeError, ValueError):
                        raise InvalidInput(f"{path}, line {number}: {row}") from None
                    if not 0 <= start < end:
                        raise InvalidInput(f"{path}, line {number}: needs 0 <= start < end")
                    sessions.setdefault(device, []).append((start, end))
        except OSError as exc:
            raise InvalidInput(f"cannot read availability trace {path}: {exc}") from exc
        if not sessions:
            raise InvalidInput(f"availability trace {path} has no rows")
        last = max(end for rows in sessions.values() for _, end in rows)
        self.period = DAY * max(1, math.ceil(last / DAY))
        self.devices = devices
        # Per trace device, its sessions' starts and ends, in order.
        self.starts, self.ends = [], []
        for device in sorted(sessions):
            rows = sorted(sessions[device])
            self.starts.append(np.array([s for s, _ in rows]))
            self.ends.append(np.array([e for _, e in rows]))

    def _session(self, i: int, now: float) -> float | None:
        """The end (on the simulated clock) of device ``i``'s session at ``now``, if any."""
        k = i % len(self.starts)
        t = now % self.period
        j = int(np.searchsorted(self.starts[k], t, side="right")) - 1
        if j >= 0 and t < self.ends[k][j]:
            return float(now - t + self.ends[k][j])
        return None

    def online(self, i: int, now: float) -> bool:
        return self._session(i, now) is not None

    def online_mask(self, now: float) -> np.ndarray:
        each = np.array([self._session(k, now) is not None for k in range(len(self.starts))])
        return np.resize(each, self.devices)

    def online_until(self, i: int, now: float) -> float:
        end = self._session(i, now)
        return now if end is None else end
