"""Rate limits on enrolment, check-in and upload: per client address and per device.

A flood of requests from one address (a script enrolling Sybil devices, a
device stuck in a loop) gets 429 with Retry-After, which devices honour, while
the rest of the fleet goes on. The counting is the `limits` package's moving
window in this process's memory: each server process limits what it sees.

Per-address limits are generous, because many phones share an address behind a
carrier's NAT; per-device limits are tight, because a device has no reason to
check in or upload more than a few times a round.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields

from fedclient._exceptions import InvalidInput, TooManyRequests

__all__ = ["RateLimiter", "RateLimits"]


@dataclass(frozen=True)
class RateLimits:
    """Limits in the `limits` notation (``"60/minute"``, ``"5/second"``); "" is none.

    ``enrol`` is per address; ``checkin`` and ``upload`` (single uploads and the start of
    chunked ones; not the chunks) per address and, separately, per device."""

    enrol: str = "60/minute"
    checkin_per_address: str = "1200/minute"
    checkin_per_device: str = "30/minute"
    upload_per_address: str = "1200/minute"
    upload_per_device: str = "30/minute"

    @classmethod
    def parse(cls, text: str) -> RateLimits:
        """``"enrol=10/minute,checkin_per_device=5/minute"``: the rest keep their defaults."""
        known = {f.name for f in fields(cls)}
        values: dict[str, str] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            name, _, value = item.partition("=")
            if name not in known:
                raise InvalidInput(f"unknown rate limit {name!r}; use {', '.join(sorted(known))}")
            values[name] = value.strip()
        limits = cls(**values)
        RateLimiter(limits)  # check the notation now, not on the first request
        return limits


class RateLimiter:
    """Counts requests against `RateLimits`; `hit` raises `TooManyRequests` past one."""

    def __init__(self, limits: RateLimits) -> None:
        from limits import parse
        from limits.storage import MemoryStorage
        from limits.strategies import MovingWindowRateLimiter

        self.limits = limits
        self._limiter = MovingWindowRateLimiter(MemoryStorage())
        self._items = {}
        for f in fields(limits):
            text = getattr(limits, f.name)
            if text:
                try:
                    self._items[f.name] = parse(text)
                except ValueError as exc:
                    raise InvalidInput(f"rate limit {f.name}={text!r}: {exc}") from None

    def hit(self, name: str, key: str) -> None:
        """Count one request of kind ``name`` from ``key`` (an address or a device)."""
        item = self._items.get(name)
        if item is None or self._limiter.hit(item, name, key):
            return
        reset, _ = self._limiter.get_window_stats(item, name, key)
        wait = max(1.0, reset - time.time())
        raise TooManyRequests(
            f"too many requests ({name.replace('_', ' ')}: {self.limits.__dict__[name]}); "
            f"retry in {wait:.0f} s",
            retry_after=wait,
        )
