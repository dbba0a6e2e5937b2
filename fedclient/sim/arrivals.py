"""Devices that come online while a sync round is open check in (``--availability``).

A sync round opens with the devices online at that moment (`fedclient.sim.engine`):
they check in, in the round's order, until the round holds ``admit_per_round``. When
fewer are online, the places left stay open: the server admits any device that checks
in while its round is open and has room, as a phone that wakes up on its charger does.
So, with an availability model, every `ARRIVAL_STEP` simulated seconds until the
deadline (while the round has places left and has not taken its quota of updates),
the devices that were offline when the round opened and are online now check in, in
the round's order; each one admitted trains from that moment, and its upload takes its
place among the others' in simulated-time order. The report counts them
(``participation.joined_late``, within ``checked_in`` and ``admitted``). A device whose
session begins and ends between two looks is not seen (sessions last 30 minutes on
average by default: a look a minute sees nearly all of them). Against a remote
server (``fedsim --server``, which keeps real time), and in secure or selecting
rounds (whose cohort is fixed when they start), a round takes who is online when it
opens.

Only the devices offline at the round's open are kept, in the round's order (8 bytes
each, as an array); a round that filled at once scanned, and keeps, only a few.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Iterator

import numpy as np

from fedclient.sim.registry import DeviceRegistry

__all__ = ["ARRIVAL_STEP", "Arrivals"]

#: Simulated seconds between two looks for devices that came online in an open round.
ARRIVAL_STEP = 60.0


class Arrivals:
    """The devices of one round offline at its open, and which of them came online."""

    def __init__(self, registry: DeviceRegistry) -> None:
        self.registry = registry
        self._missed = array("q")  # offline at the open, in the round's order
        self._ids: np.ndarray | None = None  # the same, once the looks begin
        self._waiting: np.ndarray | None = None  # which of them have not checked in

    def online_now(self, order: Iterable[int], now: float) -> Iterator[int]:
        """The devices of ``order`` online at ``now``; those offline are kept for `take`."""
        online, missed = self.registry.online, self._missed
        for i in order:
            if online(i, now):
                yield i
            else:
                missed.append(i)

    def take(self, now: float, count: int) -> list[int]:
        """Up to ``count`` devices offline at the open and online at ``now``, in the
        round's order; each is taken once."""
        if self._ids is None:
            self._ids = np.frombuffer(self._missed, dtype=np.int64).copy()
            self._missed = array("q")
            self._waiting = np.ones(len(self._ids), dtype=bool)
        assert self._waiting is not None
        if count <= 0 or not len(self._ids):
            return []
        mask = self.registry.online_mask(now)
        here = self._waiting if mask is None else self._waiting & mask[self._ids]
        chosen = np.flatnonzero(here)[:count]
        self._waiting[chosen] = False
        return [int(i) for i in self._ids[chosen]]
