"""A job's ``compression`` setting, parsed: what devices do to an update before upload.

The spec is part of the protocol because the plan is: `JobPlan` refuses a spec
devices could not follow when it is loaded. The codec that applies it (`compress`
on the device, `decompress` on the server) is `fedclient.compression`.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedclient._exceptions import InvalidInput

__all__ = ["CompressionSpec"]


@dataclass(frozen=True)
class CompressionSpec:
    """What a device does to its update before upload."""

    topk: float | None = None  # fraction of entries kept
    bits: int | None = None  # 8 or 4: stochastic quantisation of the kept values

    @classmethod
    def parse(cls, text: str) -> CompressionSpec:
        """``""`` (none), ``"q8"``, ``"q4"``, ``"topk:F"`` or ``"topk:F,q8"``."""
        topk: float | None = None
        bits: int | None = None
        for part in filter(None, (p.strip() for p in text.split(","))):
            if part in ("q8", "q4"):
                bits = int(part[1:])
            elif part.startswith("topk:"):
                try:
                    topk = float(part.removeprefix("topk:"))
                except ValueError:
                    topk = -1.0
                if not 0 < topk <= 1:
                    raise InvalidInput(f"topk needs a fraction in (0, 1], got {part!r}")
            else:
                raise InvalidInput(f"unknown compression {part!r}; use q8, q4 or topk:FRACTION")
        return cls(topk, bits)

    def __str__(self) -> str:
        parts = ([f"topk:{self.topk:g}"] if self.topk else []) + (
            [f"q{self.bits}"] if self.bits else []
        )
        return ",".join(parts)

    @property
    def active(self) -> bool:
        """Whether this spec changes anything."""
        return bool(self.topk or self.bits)
