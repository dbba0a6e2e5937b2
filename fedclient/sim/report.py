"""Reports: the JSON a run writes and the PNG dashboard beside it (comparisons of several
runs: `fedclient.sim.compare`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedclient._exceptions import InvalidInput

__all__ = ["load_report", "plot_report", "replay_differences", "write_report"]

CAUSES = ("deadline", "over_selection", "unavailable", "network", "budget")


def write_report(
    report: dict[str, Any], path: str | Path, *, plot: bool = True
) -> tuple[Path, Path | None]:
    """Write ``report`` as JSON at ``path`` and (``plot``) its plot at the same name
    with ``.png``; return both paths (None for a plot not drawn)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    if not plot:
        return path, None
    png = path.with_suffix(".png")
    plot_report(report, png)
    return path, png


def load_report(path: str | Path) -> dict[str, Any]:
    """Read a report written by ``fedsim run``."""
    try:
        report = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise InvalidInput(f"cannot read report {path}: {exc}") from exc
    if not isinstance(report, dict) or not {"config", "rounds", "final"} <= report.keys():
        raise InvalidInput(f"{path} is not a fedsim report (no config, rounds and final)")
    return report


def replay_differences(original: dict[str, Any], replayed: dict[str, Any]) -> list[str]:
    """What a replay ran differently from the report it replays: the plan (every key
    the report recorded; keys added since keep their defaults) and the plugins' files."""
    found = [
        f"the plan's {key} is {now!r} (the report's: {then!r})"
        for key, then, now in _changed(original.get("plan", {}), replayed.get("plan", {}))
    ]
    for kind, entry in original.get("plugins", {}).items():
        now = replayed.get("plugins", {}).get(kind, {})
        if now.get("sha256") != entry.get("sha256"):
            changed = now.get("file") or "its file"
            found.append(f"the {kind} {entry['name']} is not the report's ({changed} changed)")
    return found


def _changed(then: Any, now: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    if isinstance(then, dict) and isinstance(now, dict):
        return [
            change
            for key, value in then.items()
            for change in _changed(value, now.get(key), f"{prefix}{key}.")
        ]
    return [] if then == now else [(prefix.rstrip("."), then, now)]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _title(report: dict[str, Any]) -> str:
    c = report["config"]
    return (
        f"{c['dataset']}, {report['final'].get('devices', c['devices'])} devices, "
        f"{c['devices_per_round']} per round, partition {c['partition']}, seed {c['seed']}"
    )


def plot_report(report: dict[str, Any], png: str | Path) -> None:
    """Four panels: accuracy and loss per round, accuracy over simulated time,
    participation and dropouts by cause, and bytes on the wire."""
    plt = _pyplot()
    rounds = report["rounds"]
    x = [r["round"] for r in rounds]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8), constrained_layout=True)
    (acc_ax, time_ax), (part_ax, bytes_ax) = axes

    acc_ax.plot(
        x,
        [r["accuracy"] for r in rounds],
        marker="o",
        markersize=3,
        color="tab:blue",
        label="test accuracy",
    )
    # The devices measure the model a round started from: drawn at the round that made
    # that model (0: the initial one), beside the test set's measure of the same model.
    made_in = {r["model_version"]: r["round"] for r in rounds if r["status"] == "closed"}
    federated = [
        (made_in.get(r.get("federated_model_version", -1), 0), r["federated_accuracy"])
        for r in rounds
        if r.get("federated_accuracy") is not None
    ]
    if federated:  # the devices' own measure, on their held-out data
        acc_ax.plot(
            [n for n, _ in federated],
            [a for _, a in federated],
            marker="s",
            markersize=3,
            linestyle="--",
            color="tab:green",
            label="federated accuracy",
        )
    acc_ax.set_xlabel("round")
    acc_ax.set_ylabel("accuracy (held-out test set)")
    acc_ax.set_ylim(0, 1)
    acc_ax.grid(alpha=0.3)
    loss_ax = acc_ax.twinx()
    loss_ax.plot(x, [r["loss"] for r in rounds], color="tab:red", alpha=0.6, label="test loss")
    loss_ax.set_ylabel("cross-entropy loss")
    lines = acc_ax.get_legend_handles_labels()
    more = loss_ax.get_legend_handles_labels()
    acc_ax.legend(lines[0] + more[0], lines[1] + more[1], loc="center right")
    acc_ax.set_title("global model per round")

    minutes = [r["simulated_seconds"] / 60 for r in rounds]
    time_ax.plot(
        minutes,
        [r["accuracy"] for r in rounds],
        marker="o",
        markersize=3,
        color="tab:blue",
        label="test accuracy",
    )
    time_ax.set_xlabel("simulated time (minutes)")
    time_ax.set_ylabel("accuracy (held-out test set)")
    time_ax.set_ylim(0, 1)
    time_ax.grid(alpha=0.3)
    time_ax.legend(loc="lower right")
    time_ax.set_title("accuracy over simulated time")

    updates = [r["updates"] for r in rounds]
    part_ax.bar(x, updates, color="tab:green", label="updates aggregated")
    bottom = list(updates)
    colours = {
        "deadline": "tab:orange",
        "over_selection": "tab:olive",
        "unavailable": "tab:gray",
        "network": "tab:red",
        "budget": "tab:brown",
    }
    for cause in CAUSES:
        values = [r.get("dropouts", {}).get(cause, 0) for r in rounds]  # older reports: fewer
        if any(values):
            part_ax.bar(x, values, bottom=bottom, color=colours[cause], label=f"dropped: {cause}")
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    part_ax.set_xlabel("round")
    part_ax.set_ylabel("devices")
    part_ax.set_ylim(0, max([1, *bottom]) * 1.35)  # room for the legend above the bars
    part_ax.grid(alpha=0.3, axis="y")
    part_ax.legend(loc="upper center", ncol=2, fontsize="small")
    part_ax.set_title("participation")

    bytes_ax.plot(x, [r["bytes_up"] / 1e6 for r in rounds], color="tab:purple", label="uploaded")
    bytes_ax.plot(x, [r["bytes_down"] / 1e6 for r in rounds], color="tab:cyan", label="downloaded")
    wasted = [r.get("wasted_bytes", 0) / 1e6 for r in rounds]
    if any(wasted):
        bytes_ax.plot(x, wasted, color="tab:red", linestyle="--", label="wasted (failed tries)")
    bytes_ax.set_xlabel("round")
    bytes_ax.set_ylabel("MB on the wire, all devices")
    peak = max(
        [r["bytes_down"] / 1e6 for r in rounds] + [r["bytes_up"] / 1e6 for r in rounds] + [1e-3]
    )
    bytes_ax.set_ylim(0, peak * 1.25)  # lines clear of the frame and the legend
    bytes_ax.grid(alpha=0.3)
    bytes_ax.legend(loc="lower right")
    bytes_ax.set_title("network")

    fig.suptitle(_title(report))
    fig.savefig(png, dpi=100)
    plt.close(fig)
