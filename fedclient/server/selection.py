"""Client selection: which of the devices checking in to a sync round it admits.

Without a selection (the default) a round admits devices as they check in, first come
first served, up to ``admit_per_round``. A plan's ``[selection] name`` (a built-in
name or ``"module:Class"``, its settings in the same table) makes each round gather
candidates first: a device that checks in is told to come back shortly (``retry``,
"selection pending") until the round holds ``pool_size`` candidates or
``window_seconds`` passed since it opened; then the selection picks from them, those
picked are admitted at once (they learn it when they check in again) and the others
are told they were not selected. A `Selection` sees, for each candidate, what the
server knows of it from its earlier updates to the job (`Candidate`)::

    class Fastest(Selection):
        def select(self, round_number, candidates, places, rng):
            known = sorted(candidates, key=lambda c: c.seconds or float("inf"))
            return [c.device_id for c in known[:places]]

Built in: ``power_of_choice`` (Cho et al. 2022: the highest-loss ``places`` of ``d``
candidates; with losses from each device's last update, their rpow-d). The pools and
the statistics live in the server's memory (a restarted server gathers them again):
a job that selects runs on one server worker.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import msgspec
import numpy as np

from fedclient._exceptions import InvalidInput
from fedclient.plugins import construct, is_import_path, load_plugin
from fedclient.protocol import JobPlan, SelectionSettings

__all__ = [
    "NOT_SELECTED",
    "SELECTION_PENDING",
    "Candidate",
    "Pools",
    "PowerOfChoice",
    "Selection",
    "selection_for",
]

#: The reason a candidate is told to come back while its round gathers candidates.
SELECTION_PENDING = "selection pending"
#: The reason a candidate the selection did not pick is given.
NOT_SELECTED = "not selected for this round"
#: How soon a candidate comes back at most (seconds), within the round's window.
PENDING_RETRY = 10.0


@dataclass(frozen=True)
class Candidate:
    """A device checking in, as the server knows it from its updates to the job.

    ``examples`` and ``loss``: the example count and training loss of its last update
    (None: it sent none yet, or kept them on the device beside a DP release);
    ``seconds``: its last round's time from admission to its update's arrival;
    ``updates``: how many it sent (since the server started)."""

    device_id: str
    examples: int | None = None
    loss: float | None = None
    seconds: float | None = None
    updates: int = 0


class Selection(ABC):
    """Which candidates a round admits (see the module's documentation)."""

    name: ClassVar[str] = ""
    registry: ClassVar[dict[str, type[Selection]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.name:
            Selection.registry[cls.name] = cls

    def __init__(self, settings: SelectionSettings | None = None) -> None:
        self.settings = settings or SelectionSettings()

    def pool_size(self, places: int) -> int:
        """Candidates to gather before choosing ``places`` of them (default: twice)."""
        return 2 * places

    @abstractmethod
    def select(
        self,
        round_number: int,
        candidates: Sequence[Candidate],
        places: int,
        rng: np.random.Generator,
    ) -> Sequence[str]:
        """The device ids to admit: at most ``places`` of the candidates'."""


class PowerOfChoice(Selection):
    """The ``places`` candidates with the highest loss, of ``d`` (default: twice the
    places). A device that never reported a loss ranks first (it is unexplored);
    ties go in an order drawn from the round's generator."""

    name = "power_of_choice"

    def __init__(self, settings: SelectionSettings | None = None, *, d: int = 0) -> None:
        super().__init__(settings)
        if d < 0:
            raise ValueError(f"d must be 0 (twice the places) or more, got {d}")
        self.d = d

    def pool_size(self, places: int) -> int:
        return max(places, self.d or 2 * places)

    def select(
        self,
        round_number: int,
        candidates: Sequence[Candidate],
        places: int,
        rng: np.random.Generator,
    ) -> Sequence[str]:
        shuffled = [candidates[i] for i in rng.permutation(len(candidates))]
        ranked = sorted(shuffled, key=lambda c: -math.inf if c.loss is None else -c.loss)
        return [c.device_id for c in ranked[:places]]


def selection_for(settings: SelectionSettings, *, where: Sequence[str | Path] = ()) -> Selection:
    """The selection a plan names, built with its own settings."""
    name = settings.name
    if is_import_path(name):
        cls: type[Selection] = load_plugin(name, Selection, where=where)
    elif name in Selection.registry:
        cls = Selection.registry[name]
    else:
        raise InvalidInput(
            f"unknown selection {name!r}; available: {', '.join(sorted(Selection.registry))}, "
            "or your own class as module:Class"
        )
    return construct(cls, f"selection {name!r}", settings, options=settings.options)


@dataclass
class _Pool:
    """One round's candidates (by arrival), and the devices picked once it chose."""

    arrived: dict[str, None] = field(default_factory=dict)
    chosen: set[str] | None = None


class Pools:
    """The candidate pools of the rounds whose jobs select, and what the server knows
    of each device (in memory: see the module's documentation)."""

    def __init__(self) -> None:
        self._pools: dict[int, _Pool] = {}
        self._selections: dict[bytes, Selection] = {}
        self._known: dict[tuple[str, str], Candidate] = {}
        self._admitted: dict[tuple[int, str], float] = {}
        self._current: dict[str, int] = {}  # each job's round gathering or chosen

    def selection(self, plan: JobPlan) -> Selection:
        """The plan's selection, built once."""
        key = msgspec.json.encode(plan.selection)
        if key not in self._selections:
            self._selections[key] = selection_for(plan.selection)
        return self._selections[key]

    def offer(
        self,
        plan: JobPlan,
        round_id: int,
        round_number: int,
        opened_at: float,
        device_id: str,
        places: int,
        now: float,
    ) -> tuple[list[str], float | None]:
        """A device checks in to a round that selects: (the devices to admit now,
        including it if it was picked; how long it should wait, None once decided)."""
        previous = self._current.get(plan.job.name)
        if previous != round_id:  # a new round: the last one's pool is over
            self._current[plan.job.name] = round_id
            self._pools.pop(previous or -1, None)
            for key in [k for k in self._admitted if k[0] == previous]:
                del self._admitted[key]
        pool = self._pools.setdefault(round_id, _Pool())
        if pool.chosen is not None:
            return [], None
        pool.arrived.setdefault(device_id, None)
        selection = self.selection(plan)
        window_end = opened_at + plan.selection.window_seconds
        if len(pool.arrived) < selection.pool_size(places) and now < window_end:
            return [], min(PENDING_RETRY, max(1.0, window_end - now))
        candidates = [self._known.get((plan.job.name, d), Candidate(d)) for d in pool.arrived]
        rng = np.random.default_rng([plan.job.seed, round_number, 0x5E1EC7])
        picked = list(dict.fromkeys(selection.select(round_number, candidates, places, rng)))
        unknown = set(picked) - set(pool.arrived)
        if unknown or len(picked) > places:
            raise InvalidInput(
                f"selection {plan.selection.name!r} picked {len(picked)} devices for {places} "
                f"places{', some not among the candidates' if unknown else ''}"
            )
        pool.chosen = set(picked)
        for device in picked:
            self._admitted[(round_id, device)] = now
        return picked, None

    def chosen(self, round_id: int, device_id: str) -> bool | None:
        """Whether the round's selection picked the device (None: not decided yet, or
        the device was no candidate)."""
        pool = self._pools.get(round_id)
        if pool is None or pool.chosen is None or device_id not in pool.arrived:
            return None
        return device_id in pool.chosen

    def record(
        self,
        job: str,
        round_id: int,
        device_id: str,
        examples: int,
        loss: float | None,
        now: float,
    ) -> None:
        """A device's update arrived: what the selection will know of it next time."""
        before = self._known.get((job, device_id), Candidate(device_id))
        admitted = self._admitted.pop((round_id, device_id), None)
        self._known[(job, device_id)] = Candidate(
            device_id,
            examples,
            loss,
            None if admitted is None else now - admitted,
            before.updates + 1,
        )
