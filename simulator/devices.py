"""Virtual devices: how fast each computes and talks, drawn from a seed.

Times are simulated, never slept: a device's round costs
``3 * latency + model_bytes / bandwidth_down + work / examples_per_second
+ update_bytes / bandwidth_up`` seconds of simulated time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fedclient._exceptions import InvalidInput

__all__ = ["PRESETS", "DeviceProfile", "draw_profiles"]


@dataclass(frozen=True)
class DeviceProfile:
    """One device's speed and link."""

    examples_per_second: float
    bandwidth_up: float  # bytes per second
    bandwidth_down: float  # bytes per second
    latency: float  # seconds, one way

    def training_seconds(self, work: int) -> float:
        """Simulated seconds to train ``work`` example-epochs."""
        return work / self.examples_per_second

    def round_seconds(self, examples: int, epochs: int, down_bytes: int, up_bytes: int) -> float:
        """Simulated seconds from check-in to the end of the upload."""
        return (
            3 * self.latency
            + down_bytes / self.bandwidth_down
            + examples * epochs / self.examples_per_second
            + up_bytes / self.bandwidth_up
        )


#: Fleet presets: median examples/s, spread (lognormal sigma), uplink and downlink bytes/s.
PRESETS: dict[str, dict[str, float]] = {
    "phones": {"speed": 40.0, "sigma": 0.5, "up": 250e3, "down": 1.5e6, "latency": 0.08},
    "uniform": {"speed": 40.0, "sigma": 0.0, "up": 250e3, "down": 1.5e6, "latency": 0.08},
}


def draw_profiles(n: int, rng: np.random.Generator, preset: str = "phones") -> list[DeviceProfile]:
    """``n`` profiles from a named preset."""
    if preset not in PRESETS:
        raise InvalidInput(f"unknown fleet preset {preset!r}; available: {', '.join(PRESETS)}")
    p = PRESETS[preset]
    speed = p["speed"] * rng.lognormal(0.0, p["sigma"], n)
    link = rng.lognormal(0.0, p["sigma"], n)
    latency = p["latency"] * rng.lognormal(0.0, p["sigma"] / 2, n)
    return [
        DeviceProfile(float(s), float(p["up"] * q), float(p["down"] * q), float(lat))
        for s, q, lat in zip(speed, link, latency, strict=True)
    ]
