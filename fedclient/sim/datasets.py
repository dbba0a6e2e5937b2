"""Data sets and how they are split over virtual devices.

Loaders read real files (MNIST's IDX files from ``--data-dir``) or data shipped
in a package (scikit-learn's digits). Partitions are drawn from a seeded
`numpy.random.Generator`, so the same seed gives the same split.
"""

from __future__ import annotations

import csv
import dataclasses
import heapq
import importlib.util
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedclient._exceptions import InvalidInput
from fedclient.sim import _prefetch
from fedclient.sim.shakespeare import ALPHABET, TextWindows, speakers
from fedclient.sim.synthetic import CLASSES, FEATURES, SyntheticDevices
from fedclient.text import hash_features

__all__ = ["CsvColumns", "Dataset", "load_dataset", "partition"]


@dataclass(frozen=True)
class Dataset:
    """A labelled train/test split with flat float32 features.

    ``x_train`` may instead hold uint8 pixels (MNIST: 47 MB rather than 188 MB as
    float32): `device_data` scales the rows a device holds to [0, 1] as it hands
    them over, and `train_features` does so for the whole set. For text windows
    (Shakespeare) ``x_train`` holds each window's start in ``windows`` (one column),
    and a device's rows become (n, window) character ids as it gets them.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int
    users: np.ndarray | None = None  # the natural owner of each training example, if known
    texts: np.ndarray | None = None  # raw training texts: devices featurise their own
    labels: tuple[str, ...] = ()  # class names, where the data names them
    test_users: np.ndarray | None = None  # the owner of each test example (per-user evaluation)
    windows: TextWindows | None = None  # x_train holds starts of windows of these ids
    #: A data set drawn per device on demand (``synthetic``): no training arrays, no split.
    generated: SyntheticDevices | None = None

    def device_data(self, examples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """What one device holds. Text is featurised on the device, from its own messages."""
        if self.texts is not None:
            features = hash_features(self.texts[examples], dims=self.inputs)
            return features, self.y_train[examples]
        if self.windows is not None:
            return self.windows.take(self.x_train[examples, 0]), self.y_train[examples]
        return _features(self.x_train[examples]), self.y_train[examples]

    def train_features(self) -> np.ndarray:
        """Every training example's float32 features (a copy, if stored as pixels; text
        windows as int32 ids: 1 GB for Shakespeare's)."""
        if self.windows is not None:
            return self.windows.take(self.x_train[:, 0])
        return _features(self.x_train)

    @property
    def inputs(self) -> int:
        """Features per example (characters per window, for text windows)."""
        if self.windows is not None:
            return self.windows.length
        return int(self.x_train.shape[1])

    def holdout(self, count: int, seed: int) -> np.ndarray:
        """The indices of ``count`` training examples drawn with ``seed``, in order: data the
        server keeps for itself (``fedsim --holdout``), e.g. public data it pre-trains on."""
        if self.generated is not None:
            raise InvalidInput(f"--holdout: {self.name} draws each device's data, it has no set")
        if not 0 <= count < len(self.y_train):
            raise InvalidInput(
                f"--holdout must leave the devices some of the {len(self.y_train)} training "
                f"examples, got {count}"
            )
        drawn = np.random.default_rng([seed, HOLDOUT_STREAM]).permutation(len(self.y_train))
        return np.sort(drawn[:count])

    def without(self, examples: np.ndarray) -> Dataset:
        """This data set with those training examples removed (the test set unchanged)."""
        keep = np.ones(len(self.y_train), dtype=bool)
        keep[examples] = False
        return dataclasses.replace(
            self,
            x_train=self.x_train[keep],
            y_train=self.y_train[keep],
            users=None if self.users is None else self.users[keep],
            texts=None if self.texts is None else self.texts[keep],
        )


def _features(x: np.ndarray) -> np.ndarray:
    """Float32 features: uint8 pixels scaled to [0, 1], anything else as it is.

    Divided in float32: the same values as ``(x / 255.0).astype(np.float32)`` for
    every byte (a test checks all 256), without the float64 array in between
    (7x faster; the test set is 10,000 x 784)."""
    if x.dtype != np.uint8:
        return x
    scaled: np.ndarray = np.divide(x, np.float32(255.0), dtype=np.float32)
    return scaled


DATASETS = (
    "digits",
    "mnist",
    "femnist",
    "sms_spam",
    "shakespeare",
    "synthetic[:ALPHA,BETA]",
    "csv:PATH",
    "npz:PATH",
)
#: The random stream (with the run's seed) that draws `Dataset.holdout`.
HOLDOUT_STREAM = 0x401D

#: Hashed text features per message (fedclient.text.hash_features).
TEXT_DIMS = 4096


@dataclass(frozen=True)
class CsvColumns:
    """Which columns of a user's CSV hold the text, the label and (optionally) the user."""

    text: str = "text"
    label: str = "label"
    user: str | None = None
    header: bool = True


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    *,
    seed: int = 0,
    columns: CsvColumns | None = None,
) -> Dataset:
    """Load ``digits`` (bundled with scikit-learn); ``mnist``, ``femnist``, ``sms_spam`` or
    ``shakespeare`` from ``data_dir`` (the folder holding ``mnist/``...); or the user's own data:
    ``csv:PATH`` (labelled texts, see `CsvColumns`) or ``npz:PATH`` (arrays ``x``, ``y``,
    optional ``user``)."""
    if name == "digits":
        return _digits(seed)
    if name == "synthetic" or name.startswith("synthetic:"):
        return _synthetic(name, seed)
    if name.startswith("csv:"):
        return _csv(Path(name.removeprefix("csv:")), columns or CsvColumns(), seed)
    if name.startswith("npz:"):
        return _npz(Path(name.removeprefix("npz:")), seed)
    loaders = {
        "mnist": _mnist,
        "femnist": _femnist,
        "sms_spam": _sms_spam,
        "shakespeare": _shakespeare,
    }
    if name in loaders:
        if data_dir is None:
            raise InvalidInput(f"--dataset {name} needs --data-dir (the folder holding {name}/)")
        return loaders[name](Path(data_dir), seed)
    raise InvalidInput(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")


def _stratified_test(y: np.ndarray, seed: int, share: float = 0.2) -> np.ndarray:
    """A boolean mask holding out ``share`` of every class, drawn from ``seed``."""
    rng = np.random.default_rng([seed, 0xD161])
    test = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == label))
        test[idx[: round(len(idx) * share)]] = True
    return test


def _text_dataset(
    name: str, texts: list[str], labels: list[str], seed: int, users: np.ndarray | None = None
) -> Dataset:
    if not texts:
        raise InvalidInput(f"{name}: no rows")
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise InvalidInput(f"{name}: labels must name at least two classes, found {classes}")
    if len(classes) > max(2, len(labels) // 2):
        raise InvalidInput(
            f"{name}: {len(classes)} distinct labels in {len(labels)} rows; "
            "labels must be classes (a handful of repeated values)"
        )
    y = np.array([classes.index(label) for label in labels], dtype=np.int64)
    raw = np.array(texts, dtype=object)
    test = _stratified_test(y, seed)
    features = hash_features(raw, dims=TEXT_DIMS)
    return Dataset(
        name,
        features[~test],
        y[~test],
        features[test],
        y[test],
        len(classes),
        users[~test] if users is not None else None,
        raw[~test],
        tuple(classes),
        test_users=users[test] if users is not None else None,
    )


def _sms_spam(data_dir: Path, seed: int) -> Dataset:
    """The SMS Spam Collection: TSV ``label<TAB>text`` with a header line."""
    folder = _prefetch.folder(data_dir, "sms_spam")
    path = folder / "SMSSpamCollection"
    if not path.is_file():
        raise InvalidInput(f"SMS spam file missing: {path}")
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE))
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read {path}: {exc}") from None
    rows = [r for r in rows[1:] if len(r) >= 2]  # the first line is a header
    return _text_dataset("sms_spam", [r[1] for r in rows], [r[0] for r in rows], seed)


def _csv(path: Path, columns: CsvColumns, seed: int) -> Dataset:
    """A user's CSV of labelled texts; columns by name, or by 0-based index without a header."""
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            rows = list(csv.reader(handle))
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read {path}: {exc}") from exc
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows or (columns.header and len(rows) < 2):
        raise InvalidInput(f"{path} is empty")
    header, body = (rows[0], rows[1:]) if columns.header else ([], rows)

    def index(column: str | None, role: str) -> int | None:
        if column is None:
            return None
        if columns.header:
            if column in header:
                return header.index(column)
            raise InvalidInput(f"{path} has no {role} column {column!r}; it has {header}")
        if not column.isdigit():
            raise InvalidInput(f"without a header, --{role}-column must be a 0-based index")
        return int(column)

    text_at, label_at = index(columns.text, "text"), index(columns.label, "label")
    user_at = index(columns.user, "user")
    assert text_at is not None and label_at is not None
    width = max(i for i in (text_at, label_at, user_at) if i is not None) + 1
    short = [n for n, r in enumerate(body, start=2 if columns.header else 1) if len(r) < width]
    if short:
        raise InvalidInput(f"{path}: rows {short[:5]} have fewer than {width} columns")
    users = np.array([r[user_at] for r in body]) if user_at is not None else None
    return _text_dataset(
        f"csv:{path.name}",
        [r[text_at] for r in body],
        [r[label_at].strip() for r in body],
        seed,
        users,
    )


def _arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of an .npz file (never pickles); a damaged file is `InvalidInput`."""
    import zipfile  # np.load imports it too, for .npz files only: MNIST needs neither

    try:
        # Our own handle: np.load leaves its own open when the zip turns out damaged.
        with open(path, "rb") as handle:
            loaded = np.load(handle, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):  # a lone .npy array
                raise ValueError(path)
            with loaded as npz:
                return {k: npz[k] for k in npz.files}
    except ValueError:  # numpy's answer to anything else, e.g. a pickle
        raise InvalidInput(f"cannot read {path}: not an .npz file of plain arrays") from None
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise InvalidInput(f"cannot read {path}: {exc}") from None


def _npz(path: Path, seed: int) -> Dataset:
    """Arrays ``x`` (n, features), ``y`` (n,) integer classes, optional ``user`` (n,)."""
    arrays = _arrays(path)
    if "x" not in arrays or "y" not in arrays:
        raise InvalidInput(f"{path} needs arrays x and y, has {sorted(arrays)}")
    x, y = arrays["x"], arrays["y"]
    if x.ndim < 2 or len(x) != len(y) or len(y) == 0:
        raise InvalidInput(
            f"{path}: x must be (n, features...) and y (n,), got {x.shape}, {y.shape}"
        )
    if not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise InvalidInput(f"{path}: y must hold non-negative integer classes")
    x = x.reshape(len(x), -1).astype(np.float32)
    y = y.astype(np.int64)
    users = arrays.get("user")
    test = _stratified_test(y, seed)
    return Dataset(
        f"npz:{path.name}",
        x[~test],
        y[~test],
        x[test],
        y[test],
        max(2, int(y.max()) + 1),
        users[~test] if users is not None else None,
        test_users=users[test] if users is not None else None,
    )


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
    test = _stratified_test(y, seed)  # each class keeps its share in the held-out set
    return Dataset("digits", x[~test], y[~test], x[test], y[test], 10)


def _synthetic(name: str, seed: int) -> Dataset:
    """Synthetic(alpha, beta) (`fedclient.sim.synthetic`): only the test set is held
    here; each device's examples are drawn when it works."""
    devices = SyntheticDevices.parse(name, seed)
    x_test, y_test = devices.test_set()
    empty = np.zeros((0, FEATURES), dtype=np.float32)
    return Dataset(
        "synthetic",
        empty,
        np.zeros(0, dtype=np.int64),
        x_test,
        y_test,
        CLASSES,
        generated=devices,
    )


def _read_idx(path: Path) -> np.ndarray:
    """Read a gzip'd IDX file (the MNIST format: magic, dims, big-endian uint8 data)."""
    try:
        raw = _prefetch.read_gzip(path)  # decompressed on a thread if fedsim started it
    except (OSError, EOFError, zlib.error) as exc:  # truncated, or not gzip at all
        raise InvalidInput(f"cannot read {path}: {exc}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise InvalidInput(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise InvalidInput(f"{path}: expected {dims} values, found {data.size}")
    return data.reshape(dims)


def _mnist(data_dir: Path, seed: int = 0) -> Dataset:
    folder = _prefetch.folder(data_dir, "mnist")
    names = _prefetch.GZIP_FILES["mnist"]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise InvalidInput(f"MNIST files missing in {folder}: {', '.join(missing)}")
    xtr, ytr, xte, yte = (_read_idx(folder / n) for n in names)
    return Dataset(
        "mnist",
        xtr.reshape(len(xtr), -1),  # pixels; devices get their rows as float32
        ytr.astype(np.int64),
        _features(xte.reshape(len(xte), -1)),
        yte.astype(np.int64),
        10,
    )


def _femnist(data_dir: Path, seed: int = 0) -> Dataset:
    """LEAF's FEMNIST subset: 62 classes of handwritten characters, one user per writer.

    Ink is dark on a white (255) background in the file; it is inverted so that
    ink is 1.0 and background 0.0, as in MNIST. LEAF's own 90/10 split per writer
    gives the train and held-out test sets.
    """
    folder = _prefetch.folder(data_dir, "femnist")
    path = folder / "femnist_leaf_subset.npz"
    if not path.is_file():
        raise InvalidInput(f"FEMNIST file missing: {path}")
    arrays = _arrays(path)
    missing = {"x", "y", "writer", "split"} - set(arrays)
    if missing:
        raise InvalidInput(f"{path} lacks the arrays {sorted(missing)}")
    x = (255 - arrays["x"].reshape(len(arrays["x"]), -1)).astype(np.float32) / np.float32(255)
    y, writer, split = arrays["y"].astype(np.int64), arrays["writer"], arrays["split"]
    train = split == 0
    return Dataset(
        "femnist",
        x[train],
        y[train],
        x[~train],
        y[~train],
        62,
        writer[train],
        test_users=writer[~train],
    )


def _shakespeare(data_dir: Path, seed: int = 0) -> Dataset:
    """LEAF's Shakespeare (`fedclient.sim.shakespeare`): next-character prediction from
    80 characters, one user per (play, role), the last fifth of each role held out."""
    folder = _prefetch.folder(data_dir, "shakespeare")
    (name,) = _prefetch.GZIP_FILES["shakespeare"]
    path = folder / name
    if not path.is_file():
        raise InvalidInput(f"Shakespeare file missing: {path}")
    try:
        text = bytes(_prefetch.read_gzip(path)).decode("utf-8")
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read {path}: {exc}") from None
    found = speakers(text.splitlines(), seed)
    windows = found.windows
    return Dataset(
        "shakespeare",
        found.train_starts.reshape(-1, 1),
        found.train_targets,
        windows.take(found.test_starts),
        found.test_targets,
        len(ALPHABET),
        found.train_devices,
        windows=windows,
    )


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
        # Grouped by a stable sort: each user's examples in order (Shakespeare's 3.2
        # million windows over 1,198 roles took 16 s one user at a time).
        order = np.argsort(owner, kind="stable")
        return np.split(order, np.cumsum(np.bincount(owner))[:-1])
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
    # A device left empty takes one example from the largest device (the first of the
    # largest; a heap of (-size, device) with stale entries skipped finds it in log time).
    sizes = [(-len(b), i) for i, b in enumerate(buckets)]
    heapq.heapify(sizes)
    for i, bucket in enumerate(buckets):
        if bucket:
            continue
        while -sizes[0][0] != len(buckets[sizes[0][1]]):
            heapq.heappop(sizes)  # stale: that device's size changed since
        largest = sizes[0][1]
        bucket.append(buckets[largest].pop())
        heapq.heappush(sizes, (-len(buckets[largest]), largest))
        heapq.heappush(sizes, (-1, i))
    return [np.array(b, dtype=np.int64) for b in buckets]
