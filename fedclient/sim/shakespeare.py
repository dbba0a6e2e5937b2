"""LEAF's Shakespeare task: next-character prediction, one device per (play, role).

The staged file holds one JSON record per speech (``play``, ``role``, ``text``,
...). Each (play, role) is a device; its speeches, in the order of the plays,
joined by spaces, are its text. An example is a window of `WINDOW` characters
and the character that follows it, at every position of the text (LEAF's
windows). Each device holds out the last fifth of its windows (the end of its
lines; the test targets follow every training target), so the held-out split is
per device, as in LEAF. Devices with no training window (texts under 82
characters) take no part.

Characters are LEAF's 80 (`ALPHABET`); the few others in the plays (``$``,
``*``, ``\\``, ``_``, the dash ``—``) are read as spaces. A window is stored as
its start in one array of every device's character ids (`TextWindows`): 4 MB
for the 3.3 million training windows, expanded to ``(n, 80)`` ids only for the
devices that train.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from fedclient._exceptions import InvalidInput

__all__ = ["ALPHABET", "TEST_WINDOWS", "WINDOW", "Speakers", "TextWindows", "speakers"]

#: LEAF's characters: a character's id is its index here.
ALPHABET = "\n !\"&'(),-.0123456789:;>?ABCDEFGHIJKLMNOPQRSTUVWXYZ[]abcdefghijklmnopqrstuvwxyz}"
#: Characters of context in one example.
WINDOW = 80
#: The share of each device's windows it holds out (its last ones).
HELD_OUT = 0.2
#: Held-out windows the global model is evaluated on: a sample (drawn with the seed) of
#: every device's held-out windows, so that a round's evaluation takes seconds.
TEST_WINDOWS = 5_000
#: The random stream (with the run's seed) that draws the test sample.
TEST_STREAM = 0x5A4E


@dataclass(frozen=True)
class TextWindows:
    """Windows of ``length`` character ids cut from ``codes`` at given starts."""

    codes: np.ndarray
    length: int

    def take(self, starts: np.ndarray) -> np.ndarray:
        """The windows starting at ``starts``, as an (n, length) int32 array of ids."""
        starts = np.asarray(starts, dtype=np.int64).reshape(-1, 1)
        ids: np.ndarray = self.codes[starts + np.arange(self.length)].astype(np.int32)
        return ids


@dataclass(frozen=True)
class Speakers:
    """Every device's windows: training windows by start, target and device, and a sample
    of the held-out ones."""

    windows: TextWindows
    train_starts: np.ndarray
    train_targets: np.ndarray
    train_devices: np.ndarray
    test_starts: np.ndarray
    test_targets: np.ndarray
    roles: list[tuple[str, str]]


def _codes(text: str) -> np.ndarray:
    table = {c: i for i, c in enumerate(ALPHABET)}
    space = table[" "]
    return np.fromiter((table.get(c, space) for c in text), dtype=np.uint8, count=len(text))


def _roles(lines: Iterable[str]) -> dict[tuple[str, str], list[str]]:
    roles: dict[tuple[str, str], list[str]] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            key = (str(record["play"]), str(record["role"]))
            text = str(record["text"])
        except (ValueError, KeyError, TypeError) as exc:
            raise InvalidInput(
                f"shakespeare: line {number} is not a speech record: {exc}"
            ) from None
        roles.setdefault(key, []).append(text)
    return roles


def speakers(lines: Iterable[str], seed: int, test_windows: int | None = None) -> Speakers:
    """The windows of the speeches in ``lines`` (JSON records), split per device; the test
    sample holds ``test_windows`` of the held-out windows (default `TEST_WINDOWS`)."""
    test_windows = TEST_WINDOWS if test_windows is None else test_windows
    roles = _roles(lines)
    pieces: list[np.ndarray] = []
    train_starts, train_targets, train_devices, test_starts, test_targets = [], [], [], [], []
    kept: list[tuple[str, str]] = []
    offset = 0
    for key, speeches in roles.items():
        codes = _codes(" ".join(speeches))
        windows = len(codes) - WINDOW
        held = int(windows * HELD_OUT)
        train = windows - held
        if train < 1:
            continue
        starts = offset + np.arange(windows, dtype=np.int64)
        targets = codes[WINDOW:].astype(np.int64)
        train_starts.append(starts[:train])
        train_targets.append(targets[:train])
        train_devices.append(np.full(train, len(kept), dtype=np.int64))
        test_starts.append(starts[train:])
        test_targets.append(targets[train:])
        pieces.append(codes)
        kept.append(key)
        offset += len(codes)
    if not kept:
        raise InvalidInput("shakespeare: no role has a text longer than one window")
    all_test = np.concatenate(test_starts)
    all_targets = np.concatenate(test_targets)
    rng = np.random.default_rng([seed, TEST_STREAM])
    sample = np.sort(rng.permutation(len(all_test))[: min(test_windows, len(all_test))])
    return Speakers(
        TextWindows(np.concatenate(pieces), WINDOW),
        np.concatenate(train_starts),
        np.concatenate(train_targets),
        np.concatenate(train_devices),
        all_test[sample],
        all_targets[sample],
        kept,
    )
