"""Data sets and how they are split over virtual devices.

Loaders read real files (MNIST's IDX files from ``--data-dir``) or data shipped
in a package (scikit-learn's digits). Partitions are drawn from a seeded
`numpy.random.Generator`, so the same seed gives the same split.
"""

from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedclient._exceptions import InvalidInput

__all__ = ["Dataset", "load_dataset", "partition"]


@dataclass(frozen=True)
class Dataset:
    """A labelled train/test split with flat float32 features."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int
    users: np.ndarray | None = None  # the natural owner of each training example, if known

    @property
    def inputs(self) -> int:
        """Features per example."""
        return int(self.x_train.shape[1])


DATASETS = ("digits", "mnist", "femnist")


def load_dataset(name: str, data_dir: str | Path | None = None, *, seed: int = 0) -> Dataset:
    """Load ``digits`` (bundled with scikit-learn), or ``mnist`` or ``femnist`` from
    ``data_dir`` (the folder holding ``mnist/`` and ``femnist/``)."""
    if name == "digits":
        return _digits(seed)
    if name in ("mnist", "femnist"):
        if data_dir is None:
            raise InvalidInput(f"--dataset {name} needs --data-dir (the folder holding {name}/)")
        return _mnist(Path(data_dir)) if name == "mnist" else _femnist(Path(data_dir))
    raise InvalidInput(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")


def _digits(seed: int) -> Dataset:
    # scikit-learn ships the UCI digits as a CSV (64 pixels in 0..16, then the label).
    # Read that file directly: importing scikit-learn itself costs ~2 s.
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise InvalidInput("the digits data set comes with scikit-learn: pip install scikit-learn")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets/data/digits.csv.gz"
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    x = table[:, :-1] / np.float32(16.0)
    y = table[:, -1].astype(np.int64)
    # A stratified 80/20 split: each class keeps its share in the held-out set.
    rng = np.random.default_rng([seed, 0xD161])
    test = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        test[idx[: round(len(idx) * 0.2)]] = True
    return Dataset("digits", x[~test], y[~test], x[test], y[test], 10)


def _read_idx(path: Path) -> np.ndarray:
    """Read a gzip'd IDX file (the MNIST format: magic, dims, big-endian uint8 data)."""
    with gzip.open(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise InvalidInput(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise InvalidInput(f"{path}: expected {dims} values, found {data.size}")
    return data.reshape(dims)


def _mnist(data_dir: Path) -> Dataset:
    folder = data_dir / "mnist" if (data_dir / "mnist").is_dir() else data_dir
    names = [
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise InvalidInput(f"MNIST files missing in {folder}: {', '.join(missing)}")
    xtr, ytr, xte, yte = (_read_idx(folder / n) for n in names)
    return Dataset(
        "mnist",
        (xtr.reshape(len(xtr), -1) / 255.0).astype(np.float32),
        ytr.astype(np.int64),
        (xte.reshape(len(xte), -1) / 255.0).astype(np.float32),
        yte.astype(np.int64),
        10,
    )


def _femnist(data_dir: Path) -> Dataset:
    """LEAF's FEMNIST subset: 62 classes of handwritten characters, one user per writer.

    Ink is dark on a white (255) background in the file; it is inverted so that
    ink is 1.0 and background 0.0, as in MNIST. LEAF's own 90/10 split per writer
    gives the train and held-out test sets.
    """
    folder = data_dir / "femnist" if (data_dir / "femnist").is_dir() else data_dir
    path = folder / "femnist_leaf_subset.npz"
    if not path.is_file():
        raise InvalidInput(f"FEMNIST file missing: {path}")
    with np.load(path, allow_pickle=False) as npz:
        x = (255 - npz["x"].reshape(len(npz["x"]), -1)).astype(np.float32) / np.float32(255)
        y, writer, split = npz["y"].astype(np.int64), npz["writer"], npz["split"]
    train = split == 0
    return Dataset("femnist", x[train], y[train], x[~train], y[~train], 62, writer[train])


def partition(
    y: np.ndarray,
    devices: int,
    scheme: str,
    rng: np.random.Generator,
    users: np.ndarray | None = None,
) -> list[np.ndarray]:
    """Split example indices over ``devices``: ``iid``, ``dirichlet:ALPHA``, ``shards:K``,
    or ``natural`` (one device per user of ``users``, whatever ``devices`` says).

    Every device gets at least one example.
    """
    if scheme == "natural":
        if users is None:
            raise InvalidInput("partition natural needs a data set with users (e.g. femnist)")
        _, owner = np.unique(users, return_inverse=True)
        return [np.flatnonzero(owner == u) for u in range(owner.max() + 1)]
    if devices < 1 or devices > len(y):
        raise InvalidInput(f"cannot split {len(y)} examples over {devices} devices")
    kind, _, arg = scheme.partition(":")
    if kind == "iid":
        parts = np.array_split(rng.permutation(len(y)), devices)
    elif kind == "dirichlet":
        alpha = _positive(arg, scheme, float)
        parts = _dirichlet(y, devices, alpha, rng)
    elif kind == "shards":
        per_device = int(_positive(arg or "2", scheme, int))
        order = np.argsort(y, kind="stable")
        shards = np.array_split(order, devices * per_device)
        picks = rng.permutation(len(shards)).reshape(devices, per_device)
        parts = [np.concatenate([shards[s] for s in row]) for row in picks]
    else:
        raise InvalidInput(
            f"unknown partition {scheme!r}; use iid, dirichlet:ALPHA, shards:K or natural"
        )
    return [np.sort(p) for p in parts]


def _positive(text: str, scheme: str, kind: type[float] | type[int]) -> float:
    try:
        value = kind(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise InvalidInput(f"partition {scheme!r} needs a positive number after the colon")
    return value


def _dirichlet(
    y: np.ndarray, devices: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Per class, split its examples over devices in proportions drawn from Dir(alpha)."""
    buckets: list[list[int]] = [[] for _ in range(devices)]
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        shares = rng.dirichlet(np.full(devices, alpha))
        cuts = (np.cumsum(shares)[:-1] * len(idx)).astype(int)
        for bucket, chunk in zip(buckets, np.split(idx, cuts), strict=True):
            bucket.extend(chunk.tolist())
    # A device left empty takes one example from the largest device.
    for bucket in buckets:
        if not bucket:
            largest = max(buckets, key=len)
            bucket.append(largest.pop())
    return [np.array(b, dtype=np.int64) for b in buckets]
