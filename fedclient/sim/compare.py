"""``fedsim compare``: runs grouped by configuration, with the spread across seeds.

Reports whose configuration and plan differ only in their seed are one group (a
sweep's ``NAME-seedN.json``: group ``NAME``). For each group the table gives the
final accuracy's mean and standard deviation over its seeds, and with a target
accuracy the rounds, the bytes (up and down) and the simulated time each run took
to first reach it (their mean and spread over the runs that did, and how many did).
The figure draws each group's mean accuracy per round and per megabyte sent and
received, in a band of one standard deviation across seeds: vector graphics (PDF or
SVG by the file's suffix; PNG too), with axis labels and no title, for a paper.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedclient._exceptions import InvalidInput

__all__ = [
    "Group",
    "group_reports",
    "plot_groups",
    "reports_in",
    "summary_table",
    "to_target",
]

#: Settings that do not make two runs different configurations.
_NOT_CONFIGURATION = (
    "seed",
    "plan_file",
    "data_dir",
    "state_dir",
    "workers",
    "save_model",
    "server_patience",
)


@dataclass
class Group:
    """Runs of one configuration: its label, and each run's (name, report)."""

    label: str
    runs: list[tuple[str, dict[str, Any]]]

    def accuracies(self) -> list[list[float]]:
        """Each run's accuracy per round."""
        return [[r["accuracy"] for r in report["rounds"]] for _, report in self.runs]


def reports_in(paths: Sequence[str]) -> list[Path]:
    """The report files named, a folder standing for the reports in it (not its index,
    sweep.json, nor replays)."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            found.extend(
                p
                for p in sorted(path.glob("*.json"))
                if p.name != "sweep.json" and not p.name.endswith(".replay.json")
            )
        else:
            found.append(path)
    if not found:
        raise InvalidInput(f"no reports in {', '.join(paths)}")
    return found


def _configuration(report: dict[str, Any]) -> str:
    config = {k: v for k, v in report["config"].items() if k not in _NOT_CONFIGURATION}
    plan = json.loads(json.dumps(report.get("plan", {})))
    plan.get("job", {}).pop("seed", None)
    return json.dumps({"config": config, "plan": plan}, sort_keys=True)


def group_reports(loaded: Sequence[tuple[str, dict[str, Any]]]) -> list[Group]:
    """The runs grouped by configuration, in the order each first appears."""
    groups: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    for name, report in loaded:
        groups.setdefault(_configuration(report), []).append((name, report))
    return [Group(_label([n for n, _ in runs]), runs) for runs in groups.values()]


def _label(names: Sequence[str]) -> str:
    """A group's label: its runs' common name without the seed (``fedavg-seed2``)."""
    bases = {re.sub(r"[-_.]?seed\d+$", "", name) for name in names}
    if len(bases) == 1 and next(iter(bases)):
        return next(iter(bases))
    return "+".join(names)


def to_target(report: dict[str, Any], target: float) -> tuple[int, int, float] | None:
    """The first round whose accuracy reached ``target``, the bytes up and down until
    then, and the simulated seconds (None: it never did)."""
    sent = 0
    for record in report["rounds"]:
        sent += record["bytes_up"] + record["bytes_down"]
        if record["accuracy"] is not None and record["accuracy"] >= target:
            return record["round"], sent, record["simulated_seconds"]
    return None


def _mean_sd(values: Sequence[float], digits: int) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def summary_table(groups: Sequence[Group], target: float | None = None) -> str:
    """Each configuration's runs: accuracy (mean ± s.d. over seeds), and to ``target``."""
    header = ["run", "seeds", "rounds", "accuracy", "best"]
    if target is not None:
        header += [f"rounds to {target:g}", f"MB to {target:g}", "sim min", "reached"]
    header += ["MB up", "MB down", "wall s"]
    rows = [header]
    for group in groups:
        reports = [report for _, report in group.runs]
        finals = [r["final"] for r in reports]
        row = [
            group.label,
            str(len(reports)),
            str(max(len(r["rounds"]) for r in reports)),
            _mean_sd([f["accuracy"] for f in finals], 4),
            _mean_sd([max(a) for a in group.accuracies()], 4),
        ]
        if target is not None:
            reached = [hit for hit in (to_target(r, target) for r in reports) if hit]
            row += [
                _mean_sd([h[0] for h in reached], 1),
                _mean_sd([h[1] / 1e6 for h in reached], 1),
                _mean_sd([h[2] / 60 for h in reached], 1),
                f"{len(reached)}/{len(reports)}",
            ]
        row += [
            _mean_sd([f["bytes_up"] / 1e6 for f in finals], 1),
            _mean_sd([f["bytes_down"] / 1e6 for f in finals], 1),
            _mean_sd([f["wall_seconds"] for f in finals], 1),
        ]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _band(
    series: Sequence[Sequence[float] | np.ndarray],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per position: the mean and one standard deviation either side, over the series
    that reach it."""
    length = max(len(s) for s in series)
    table = np.full((len(series), length), np.nan)
    for i, s in enumerate(series):
        table[i, : len(s)] = s
    counts = np.sum(~np.isnan(table), axis=0)
    mean = np.nansum(table, axis=0) / counts
    squares = np.nansum((table - mean) ** 2, axis=0)
    sd = np.sqrt(squares / np.maximum(counts - 1, 1)) * (counts > 1)  # one run: no band
    return mean, mean - sd, mean + sd


def plot_groups(groups: Sequence[Group], path: str | Path, target: float | None = None) -> None:
    """Accuracy per round and per MB on the wire: each group's mean over its seeds in a
    band of one standard deviation. The format follows the suffix (.pdf, .svg, .png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.suffix.lower() not in (".pdf", ".svg", ".png"):
        raise InvalidInput(f"--plot {path}: write .pdf, .svg or .png")
    style: Any = {"font.size": 9, "axes.spines.top": False, "axes.spines.right": False}
    with plt.rc_context(style):
        fig, (by_round, by_bytes) = plt.subplots(1, 2, figsize=(7.0, 2.8), constrained_layout=True)
        lowest = 1.0
        for group in groups:
            accuracy = group.accuracies()
            mean, low, high = _band(accuracy)
            rounds = np.arange(1, len(mean) + 1)
            sent = _band(
                [
                    np.cumsum([r["bytes_up"] + r["bytes_down"] for r in report["rounds"]]) / 1e6
                    for _, report in group.runs
                ]
            )[0]
            seeds = len(group.runs)
            label = group.label + (f" ({seeds} seeds)" if seeds > 1 else "")
            (line,) = by_round.plot(rounds, mean, linewidth=1.2, label=label)
            by_bytes.plot(sent, mean, linewidth=1.2, color=line.get_color())
            if seeds > 1:
                by_round.fill_between(rounds, low, high, color=line.get_color(), alpha=0.25, lw=0)
                by_bytes.fill_between(sent, low, high, color=line.get_color(), alpha=0.25, lw=0)
            lowest = min(lowest, float(np.nanmin(mean[len(mean) // 10 :])))
        for ax in (by_round, by_bytes):
            if target is not None:
                ax.axhline(target, color="0.4", linestyle="--", linewidth=0.8)
            ax.set_ylabel("test accuracy")
            ax.set_ylim(max(0.0, lowest - 0.05), 1.0)
            ax.grid(alpha=0.3, linewidth=0.5)
        by_round.set_xlabel("round")
        by_round.xaxis.get_major_locator().set_params(integer=True)
        by_bytes.set_xlabel("data sent and received (MB, all devices)")
        by_round.legend(loc="lower right", frameon=False, fontsize=8)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=200 if path.suffix.lower() == ".png" else None)
        plt.close(fig)
