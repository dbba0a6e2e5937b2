"""The registered fleet: every virtual device as an id and a few columns, none as an object.

A registered device is its index plus what it keeps between rounds. What it is
drawn with (its speed, link and daily window) lives in `ProfileColumns`; which
examples it holds is its part of the data set's partition (a list of index
arrays, for the data sets that have a training set) or is drawn on demand from its
id (``synthetic``); its state and privacy ledger live in SQLite once it worked
(`fedclient.sim.fleet.Fleet`). A `fedclient.sim.fleet.Device` with a real `Client`
is built from these only when the device is selected, and dropped after the round:
memory grows with the round, not with the fleet (15 million devices hold ~0.4 GB
of columns).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from fedclient._exceptions import InvalidInput
from fedclient.protocol import JobPlan
from fedclient.sim.availability import Availability, parse_availability
from fedclient.sim.config import SimulationConfig
from fedclient.sim.datasets import Dataset, partition
from fedclient.sim.devices import DeviceProfile, ProfileColumns, draw_profile_columns

__all__ = [
    "HELD_OUT_SHARE",
    "LAZY_ORDER_DEVICES",
    "MAX_EXAMPLES_STREAM",
    "PER_DEVICE_LIMIT",
    "DeviceRegistry",
    "distinct_order",
    "keep_at_most",
    "register_devices",
]

#: Fleets larger than this draw a round's check-in order as they go (`checkin_order`).
LAZY_ORDER_DEVICES = 1_000_000
#: A device of a generated data set holds out a fifth as many examples as it trains on
#: (at least one), drawn from its own distribution: what it evaluates on.
HELD_OUT_SHARE = 5
#: Per-device results (``--per-device``, ``--personalize``) walk every device: for a
#: generated data set, up to this many.
PER_DEVICE_LIMIT = 100_000


@dataclass(frozen=True)
class DeviceRegistry:
    """Every registered device of a run, as columns; `register_devices` draws it."""

    size: int
    profiles: ProfileColumns
    data: Dataset
    parts: list[np.ndarray] | None = None  # each device's training examples (a partition)
    held_out: list[np.ndarray | None] | None = None  # its share of the test set
    own_held_out: list[np.ndarray | None] | None = None  # its examples kept from training
    availability: Availability | None = None  # when devices come and go (--availability)
    # A generated data set's devices: how many examples each keeps at most (0: all), and
    # whether each holds out examples of its own to evaluate on (`HELD_OUT_SHARE`).
    max_examples: int = 0
    generated_held_out: bool = False

    def __len__(self) -> int:
        return self.size

    def profile(self, i: int) -> DeviceProfile:
        """Device ``i``'s speed, link, reliability and daily window."""
        return self.profiles.profile(i)

    def examples(self, i: int) -> np.ndarray:
        """The indices of device ``i``'s training examples (a partitioned data set)."""
        if self.parts is None:
            raise InvalidInput(f"{self.data.name} has no partition: its devices draw their data")
        return self.parts[i]

    def count(self, i: int) -> int:
        """How many training examples device ``i`` holds."""
        if self.data.generated is not None:
            size = self.data.generated.size(i)
            return min(size, self.max_examples) if self.max_examples else size
        return len(self.examples(i))

    def device_data(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Device ``i``'s training data, as it hands it to its `Client`."""
        if self.data.generated is not None:
            x, y = self.data.generated.device_data(i)
            if self.max_examples:  # independent draws: the first ones are a random subset
                return x[: self.max_examples], y[: self.max_examples]
            return x, y
        return self.data.device_data(self.examples(i))

    def labels(self, i: int) -> np.ndarray:
        """Device ``i``'s training labels."""
        if self.data.generated is not None:
            return self.device_data(i)[1]
        return np.asarray(self.data.y_train[self.examples(i)])

    def _generated_held_out(self, i: int) -> tuple[np.ndarray, np.ndarray] | None:
        if self.data.generated is None or not self.generated_held_out:
            return None
        return self.data.generated.held_out(i, max(1, self.count(i) // HELD_OUT_SHARE))

    def eval_data(self, i: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Device ``i``'s held-out data, when it evaluates (else None): its share of the
        test set, or, for a generated data set, examples of its own distribution."""
        if self.data.generated is not None:
            return self._generated_held_out(i)
        share = None if self.held_out is None else self.held_out[i]
        return None if share is None else (self.data.x_test[share], self.data.y_test[share])

    def own_held_out_data(self, i: int) -> tuple[np.ndarray, np.ndarray] | None:
        """With --personalize, the examples device ``i`` kept from training to measure
        its fine-tuned model on (a generated data set's: drawn like `eval_data`)."""
        if self.data.generated is not None:
            return self._generated_held_out(i)
        own = None if self.own_held_out is None else self.own_held_out[i]
        return None if own is None else self.data.device_data(own)

    def failure_rate(self, i: int) -> float:
        """Device ``i``'s chance to drop out of a round it joined."""
        return self.profiles.failure_rate(i)

    def online(self, i: int, now: float) -> bool:
        """Whether device ``i`` would check in at simulated time ``now``: inside its
        profile's daily window and, with an availability model, in an online session."""
        if not self.profiles.online(i, now):
            return False
        return self.availability is None or self.availability.online(i, now)

    def available(self, now: float) -> int:
        """How many devices would check in at ``now`` (a count over the columns)."""
        mask = self.online_mask(now)
        return len(self) if mask is None else int(np.count_nonzero(mask))

    def online_mask(self, now: float) -> np.ndarray | None:
        """Every device's `online` at ``now``, as a boolean array (None: all of them)."""
        windows = self.profiles.online_mask(now)
        if self.availability is None:
            return windows
        sessions = self.availability.online_mask(now)
        return sessions if windows is None else sessions & windows

    def checkin_order(
        self, seed: int, round_number: int
    ) -> tuple[Iterator[int], Callable[[int], float]]:
        """The order in which the devices arrive in a round, and each one's draw against
        its failure rate, both from the seed.

        Up to `LAZY_ORDER_DEVICES` devices: a permutation of the whole fleet and a draw
        per device, made at once (as every run before fleets of millions). Beyond it a
        round needs a few thousand devices of millions: they come as they are asked
        for, distinct random devices from a generator seeded with the round, and each
        device's failure draw from its own seed; the whole permutation would cost a
        second and 240 MB a round at 15 million."""
        if self.size <= LAZY_ORDER_DEVICES:
            order = np.random.default_rng([seed, round_number]).permutation(self.size)
            failures = np.random.default_rng([seed, round_number, 1]).random(self.size)
            return (int(i) for i in order), lambda i: float(failures[i])
        rng = np.random.default_rng([seed, round_number])

        def failure(i: int) -> float:
            return float(np.random.default_rng([seed, round_number, 1, i]).random())

        return distinct_order(self.size, rng), failure

    def online_until(self, i: int, now: float) -> float:
        """When device ``i``, online at ``now``, goes offline (inf: not before the
        profile's window closes, as far as the availability model says)."""
        return np.inf if self.availability is None else self.availability.online_until(i, now)


def distinct_order(n: int, rng: np.random.Generator, chunk: int = 4096) -> Iterator[int]:
    """Every index below ``n`` once, in random order, drawn as it is asked for: uniform
    draws that skip those already given, then (past half of them) a permutation of
    what is left, so that even a round that walks the whole fleet ends."""
    given: set[int] = set()
    while 2 * len(given) < n:
        for i in rng.integers(0, n, min(chunk, n)).tolist():
            if i not in given:
                given.add(i)
                yield i
    rest = np.setdiff1d(np.arange(n), np.fromiter(given, dtype=np.int64, count=len(given)))
    yield from (int(i) for i in rng.permutation(rest))


#: The random stream (with the run's seed, and the device) that draws the examples a
#: device keeps under ``--max-examples``.
MAX_EXAMPLES_STREAM = 0x3E4A


def keep_at_most(parts: list[np.ndarray], count: int, seed: int) -> list[np.ndarray]:
    """Each device's examples, at most ``count`` of them drawn with ``seed`` (in order): a
    device that keeps part of its history (``fedsim --max-examples``)."""
    kept = []
    for i, part in enumerate(parts):
        if len(part) > count:
            drawn = np.random.default_rng([seed, MAX_EXAMPLES_STREAM, i]).permutation(part)
            part = np.sort(drawn[:count])
        kept.append(part)
    return kept


def register_devices(config: SimulationConfig, plan: JobPlan, data: Dataset) -> DeviceRegistry:
    """The run's devices, drawn from its seed: each one's examples (the partition, or
    none to hold for a generated data set), its profile, the held-out data it
    evaluates on, and when it is online."""
    rng = np.random.default_rng(config.seed)
    availability = parse_availability(config.availability, config.devices, config.seed)
    if data.generated is not None:
        _check_generated(config, data)
        profiles = draw_profile_columns(config.devices, rng, config.fleet)
        return DeviceRegistry(
            config.devices,
            profiles,
            data,
            availability=availability,
            max_examples=config.max_examples or 0,
            generated_held_out=bool(plan.evaluate.every or config.per_device or config.personalize),
        )
    parts = partition(data.y_train, config.devices, config.partition, rng, data.users)
    if config.max_examples:
        parts = keep_at_most(parts, config.max_examples, config.seed)
    profiles = draw_profile_columns(len(parts), rng, config.fleet)  # natural: one per user
    own_held_out: list[np.ndarray | None] | None = None
    if config.personalize:
        # Personalisation is measured on each device's own held-out examples (a
        # fifth of them; devices with fewer than 5 keep all for training).
        own_held_out = []
        for index, examples in enumerate(parts):
            mine = np.random.default_rng([config.seed, 4, index]).permutation(examples)
            if len(mine) >= 5:
                cut = len(mine) - len(mine) // 5
                parts[index] = mine[:cut]
                own_held_out.append(mine[cut:])
            else:
                own_held_out.append(None)
    held_out: list[np.ndarray | None] | None = None
    if plan.evaluate.every or config.per_device:
        # Federated evaluation and per-device results: each device holds a share of the
        # test set as its held-out data, split like the training set; with a natural
        # split, its own user's test examples where the data set says whose they are.
        shares = _test_shares(config, data, len(parts))
        held_out = [share if len(share) else None for share in shares]
    if availability is not None and len(parts) != config.devices:
        availability = parse_availability(config.availability, len(parts), config.seed)
    return DeviceRegistry(len(parts), profiles, data, parts, held_out, own_held_out, availability)


def _check_generated(config: SimulationConfig, data: Dataset) -> None:
    """What a data set drawn per device does not have: a split; per-device results for
    more devices than `PER_DEVICE_LIMIT`."""
    if config.partition != "iid":
        raise InvalidInput(
            f"--partition {config.partition}: {data.name} draws each device's own data "
            "(its alpha and beta set how the devices differ); drop --partition"
        )
    asked = [
        flag
        for flag, on in (("--personalize", config.personalize), ("--per-device", config.per_device))
        if on
    ]
    if asked and config.devices > PER_DEVICE_LIMIT:
        raise InvalidInput(
            f"{', '.join(asked)}: a result for each of {config.devices:,} devices; at most "
            f"{PER_DEVICE_LIMIT:,} (the report would hold every one)"
        )
    if config.devices < 1:
        raise InvalidInput(f"--devices must be at least 1, got {config.devices}")


def _test_shares(config: SimulationConfig, data: Dataset, devices: int) -> list[np.ndarray]:
    """Each device's share of the test set (see `register_devices`)."""
    if config.partition == "natural" and data.users is not None and data.test_users is not None:
        users = np.unique(data.users)  # device u is users[u] (`partition`)
        where = np.searchsorted(users, data.test_users).clip(0, len(users) - 1)
        owner = np.where(users[where] == data.test_users, where, -1)
        return [np.flatnonzero(owner == u) for u in range(devices)]
    scheme = "iid" if config.partition == "natural" else config.partition
    return partition(data.y_test, devices, scheme, np.random.default_rng([config.seed, 3]))
