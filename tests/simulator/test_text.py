"""Text classification: device-side hashing, SMS spam, and a user's own CSV or npz."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import fedclient
from fedclient.sim.cli import main as fedsim
from fedclient.sim.datasets import CsvColumns, load_dataset
from fedclient.text import hash_features, tokens
from tests.conftest import SHARED_DATA

SPAM = [
    "WINNER!! claim your free prize now",
    "Free entry: txt WIN to 80086 now!",
    "URGENT! your mobile won £1000 cash",
    "Call now to claim your free holiday",
]
HAM = [
    "are we still on for lunch today",
    "ok see you at home later",
    "can you pick up milk on the way",
    "running late, be there in ten",
]


def test_hashing_is_stable_and_normalised() -> None:
    a = hash_features(["Free prize!", "see you later"], dims=256)
    b = hash_features(["Free prize!", "see you later"], dims=256)
    assert np.array_equal(a, b) and a.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1.0, rtol=1e-6)
    assert tokens("FREE £100!!") == ["free", "£100", "!", "!"]
    with pytest.raises(fedclient.InvalidInput):
        hash_features([b"bytes"], dims=16)  # type: ignore[list-item]


def _write_csv(path: Path, rows: int, header: bool = True) -> None:
    rng = np.random.default_rng(0)
    lines = ["message,category,sender"] if header else []
    for i in range(rows):
        spam = bool(rng.random() < 0.4)
        text = (SPAM if spam else HAM)[int(rng.integers(0, 4))] + f" {i % 7}"
        lines.append(f'"{text}",{"spam" if spam else "ham"},user{i % 10}')
    path.write_text("\n".join(lines) + "\n")


def test_a_users_csv_runs_with_no_code(tmp_path: Path) -> None:
    data = tmp_path / "my messages.csv"
    _write_csv(data, 400)
    report = tmp_path / "csv.json"
    assert (
        fedsim(
            [
                "run",
                "--dataset",
                f"csv:{data}",
                "--text-column",
                "message",
                "--label-column",
                "category",
                "--user-column",
                "sender",
                "--partition",
                "natural",
                "--devices-per-round",
                "5",
                "--rounds",
                "5",
                "--seed",
                "1",
                "--quiet",
                "--report",
                str(report),
            ]
        )
        == 0
    )
    result = json.loads(report.read_text())
    assert result["final"]["devices"] == 10  # one per sender
    assert result["final"]["accuracy"] > 0.95
    assert result["plan"]["job"]["name"] == "my-messages"
    # Columns by index, no header.
    bare = tmp_path / "bare.csv"
    _write_csv(bare, 200, header=False)
    assert (
        fedsim(
            [
                "run",
                "--dataset",
                f"csv:{bare}",
                "--no-header",
                "--text-column",
                "0",
                "--label-column",
                "1",
                "--devices",
                "10",
                "--devices-per-round",
                "5",
                "--rounds",
                "2",
                "--quiet",
                "--report",
                str(tmp_path / "bare.json"),
            ]
        )
        == 0
    )


@pytest.mark.parametrize(
    ("content", "columns", "message"),
    [
        ("", CsvColumns(), "empty"),
        ("text,label\n", CsvColumns(), "empty"),
        ("words,label\nhello,a\nbye,b\n", CsvColumns(), "no text column 'text'"),
        ("text,label\nhello,a\nbye,a\n", CsvColumns(), "at least two classes"),
        (
            "text,label\n" + "".join(f"t{i},{i * 0.37}\n" for i in range(50)),
            CsvColumns(),
            "must be classes",
        ),
        ("a,b\n", CsvColumns("x", "1", header=False), "0-based index"),
        ("text,label\nonly-one-cell\n", CsvColumns(), "fewer than 2 columns"),
    ],
)
def test_bad_csvs_get_clear_errors(
    tmp_path: Path, content: str, columns: CsvColumns, message: str
) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(fedclient.InvalidInput, match=message):
        load_dataset(f"csv:{path}", columns=columns)


def test_npz_arrays(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int64)
    np.savez(tmp_path / "d.npz", x=x, y=y, user=np.arange(300) % 6)
    report = tmp_path / "npz.json"
    assert (
        fedsim(
            [
                "run",
                "--dataset",
                f"npz:{tmp_path / 'd.npz'}",
                "--partition",
                "natural",
                "--devices-per-round",
                "3",
                "--rounds",
                "4",
                "--quiet",
                "--report",
                str(report),
            ]
        )
        == 0
    )
    assert json.loads(report.read_text())["final"]["accuracy"] > 0.85
    np.savez(tmp_path / "bad.npz", x=x, y=y.astype(np.float32))
    with pytest.raises(fedclient.InvalidInput, match="integer classes"):
        load_dataset(f"npz:{tmp_path / 'bad.npz'}")


@pytest.mark.skipif(
    not (SHARED_DATA / "sms_spam").is_dir(),
    reason=f"SMS spam file not found in {SHARED_DATA}/sms_spam",
)
def test_sms_spam_end_to_end(tmp_path: Path) -> None:
    report = tmp_path / "sms.json"
    assert (
        fedsim(
            [
                "run",
                "--dataset",
                "sms_spam",
                "--data-dir",
                str(SHARED_DATA),
                "--devices",
                "50",
                "--devices-per-round",
                "10",
                "--rounds",
                "5",
                "--seed",
                "1",
                "--quiet",
                "--report",
                str(report),
            ]
        )
        == 0
    )
    final = json.loads(report.read_text())["final"]
    assert final["accuracy"] > 0.87  # above always answering "ham" (0.866)
