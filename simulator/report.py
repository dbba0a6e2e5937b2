"""Reports: the JSON a run writes, and the PNG plot beside it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["plot_report", "write_report"]


def write_report(report: dict[str, Any], path: str | Path) -> tuple[Path, Path]:
    """Write ``report`` as JSON at ``path`` and its plot at the same name with ``.png``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    png = path.with_suffix(".png")
    plot_report(report, png)
    return path, png


def plot_report(report: dict[str, Any], png: str | Path) -> None:
    """Accuracy and loss of the global model per round (held-out test split)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rounds = report["rounds"]
    x = [r["round"] for r in rounds]
    config = report["config"]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    acc_ax.plot(
        x,
        [r["accuracy"] for r in rounds],
        marker="o",
        markersize=3,
        color="tab:blue",
        label="test accuracy",
    )
    acc_ax.set_xlabel("round")
    acc_ax.set_ylabel("accuracy (held-out test split)")
    acc_ax.set_ylim(0, 1)
    acc_ax.grid(alpha=0.3)
    acc_ax.legend(loc="lower right")
    loss_ax.plot(
        x, [r["loss"] for r in rounds], marker="o", markersize=3, color="tab:red", label="test loss"
    )
    train = [(r["round"], r["train_loss"]) for r in rounds if r.get("train_loss") is not None]
    if train:
        loss_ax.plot(
            *zip(*train, strict=True),
            linestyle="--",
            color="tab:orange",
            label="mean device training loss",
        )
    loss_ax.set_xlabel("round")
    loss_ax.set_ylabel("cross-entropy loss")
    loss_ax.grid(alpha=0.3)
    loss_ax.legend(loc="upper right")
    fig.suptitle(
        f"fedsim: {config['dataset']}, {config['devices']} devices, "
        f"{config['devices_per_round']} per round, partition {config['partition']}, "
        f"seed {config['seed']}"
    )
    fig.savefig(png, dpi=110)
    plt.close(fig)
