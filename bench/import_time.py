"""What importing the SDK costs an app: ``python -X importtime``, medians of several runs.

    python bench/import_time.py            # 15 runs each
    python bench/import_time.py --runs 31

Two figures: ``import fedclient`` (what an app pays at start-up: the public names
load on first use), and ``fedclient.Client`` ready (numpy, httpx, SQLite and the
job loop loaded: what it pays when it first federates). Each is the cumulative
import time of the top-level modules the statement imports, summed, as
``-X importtime`` reports them (microseconds), excluding the interpreter's own
start-up (``site`` and what it imports). The goal for the first is 150 ms.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

STATEMENTS = {
    "import fedclient": "import fedclient",
    "fedclient.Client ready": "import fedclient; fedclient.Client; fedclient.DeviceState",
}


def cumulative_ms(statement: str) -> float:
    """Milliseconds of imports ``statement`` triggers (top-level modules, after site)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", statement],
        capture_output=True,
        text=True,
        check=True,
    )
    total, after_site = 0, False
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        _, cumulative, name = (part.strip() for part in line.split("|"))
        top = not line.split("|")[2].startswith("  ")
        if name == "site":
            after_site = True
            continue
        if after_site and top and cumulative.isdigit():
            total += int(cumulative)
    return total / 1000


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=15)
    args = parser.parse_args(argv)
    for label, statement in STATEMENTS.items():
        cumulative_ms(statement)  # byte-compile, warm the file cache
        runs = [cumulative_ms(statement) for _ in range(args.runs)]
        print(
            f"{label:24s} median {statistics.median(runs):6.1f} ms "
            f"(min {min(runs):.1f}, max {max(runs):.1f}, {args.runs} runs)"
        )
    median = statistics.median(cumulative_ms(STATEMENTS["import fedclient"]) for _ in range(5))
    print(f"import_fedclient_ms={median:.1f} (goal < 150)")


if __name__ == "__main__":
    main()
