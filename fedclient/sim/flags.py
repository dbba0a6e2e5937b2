"""The flags of ``fedsim run`` and ``fedsim sweep`` (`fedclient.sim.cli`).

Only the standard library: ``fedsim`` reads its flags and starts decompressing the
data set before it imports anything heavy (`fedclient.sim._prefetch`). Each flag
defaults to None where `fedclient.sim.config.SimulationConfig` holds the default, so
a flag given beside a plan that sets the same thing is refused, never ignored.
"""

from __future__ import annotations

import argparse

__all__ = ["add_run_arguments"]


def add_run_arguments(run: argparse.ArgumentParser, *, sweep: bool) -> None:
    """The flags of ``fedsim run`` (and of each run of ``fedsim sweep``: ``sweep``)."""
    run.add_argument(
        "--dataset",
        default="digits",
        help="digits (bundled with scikit-learn); mnist, femnist, sms_spam or shakespeare "
        "(from --data-dir); synthetic[:ALPHA,BETA] (LEAF's Synthetic, drawn per device on "
        "demand: any --devices); csv:PATH (with --text-column, --label-column, --user-column, "
        "--no-header) or npz:PATH (arrays x, y and optionally user)",
    )
    run.add_argument(
        "--data-dir",
        help="folder holding the data files (e.g. ../shared/data); gzip'd ones are "
        "decompressed once into $FEDSIM_CACHE_DIR (default ~/.cache/fedsim; 'off': no cache)",
    )
    run.add_argument(
        "--text-column",
        default="text",
        help="csv: the column of texts (a name, or a 0-based index with --no-header)",
    )
    run.add_argument("--label-column", default="label", help="csv: the column of labels")
    run.add_argument(
        "--user-column", help="csv: a column naming each row's user (for --partition natural)"
    )
    run.add_argument("--no-header", action="store_true", help="csv: the file has no header row")
    if sweep:
        run.add_argument(
            "--plan",
            dest="plan_files",
            action="append",
            metavar="PLAN.toml",
            help="a job plan; several: each is a configuration of the sweep",
        )
    else:
        run.add_argument(
            "--plan",
            dest="plan_file",
            metavar="PLAN.toml",
            help="a job plan (the TOML fedserver --plan serves): it sets the job, model, "
            "training, strategy, privacy and [evaluate]; the flags below set the fleet, data "
            "and engine (a flag for what the plan sets is refused)",
        )
    # Flags default to None here and take SimulationConfig's defaults: a flag given
    # beside --plan, or --devices beside --partition natural, is refused, never ignored.
    run.add_argument("--devices", type=int, help="virtual devices (default 100)")
    run.add_argument("--devices-per-round", type=int, help="(default 20)")
    run.add_argument("--rounds", type=int, help="(default 40)")
    run.add_argument(
        "--partition",
        help="iid | dirichlet:ALPHA | shards:K | natural (one device per user; the default "
        "for shakespeare, iid for the others)",
    )
    run.add_argument(
        "--seed",
        type=int,
        help="the run's one seed: the split, the device profiles, the version-0 model, the "
        "check-in order, each device's batches (default: the plan's [job] seed, else 0)",
    )
    run.add_argument(
        "--holdout",
        type=int,
        default=0,
        metavar="N",
        help="keep N training examples (drawn with the seed; Dataset.holdout) off the "
        "devices: the server's own data, e.g. the public data a model was pre-trained on",
    )
    run.add_argument(
        "--max-examples",
        type=int,
        metavar="N",
        help="each device keeps at most N of its training examples (drawn with the seed), "
        "as a phone keeps part of its history; bounds a round's work on natural partitions",
    )
    run.add_argument(
        "--fleet",
        default="phones",
        help="device profiles: phones | uniform | slow-tail | diurnal | "
        "trace:PATH.csv (see fedclient/sim/devices.py)",
    )
    run.add_argument(
        "--availability",
        default="always",
        help="when devices are online: always (their --fleet window) | "
        "diurnal[:peak=0.6,trough=0.05,session=30] (on/off sessions following local time) | "
        "trace:PATH.csv (device,start,end rows; see fedclient/sim/availability.py)",
    )
    run.add_argument("--epochs", type=int)
    run.add_argument("--batch-size", type=int)
    run.add_argument("--learning-rate", type=float)
    run.add_argument("--min-devices", type=int)
    run.add_argument(
        "--over-selection",
        type=float,
        help="admit this many times --devices-per-round; the round closes when "
        "--devices-per-round updates arrived, so the slowest are cut (default 1.0)",
    )
    run.add_argument("--deadline-seconds", type=float, help="(default 600)")
    run.add_argument("--server", help="a running fedserver's base URL (default: in-process)")
    run.add_argument("--job", help="job name (default: the dataset's name)")
    enrolment = run.add_mutually_exclusive_group()
    enrolment.add_argument(
        "--enrolment-secret-file",
        help="with --server: a file holding the enrolment secret (or code) the server asks "
        "new devices for (fedserver --enrolment-secret-file)",
    )
    enrolment.add_argument(
        "--enrolment-credential",
        help="with --server: the enrolment secret or code itself (visible to other users of "
        "the machine: prefer --enrolment-secret-file)",
    )
    run.add_argument(
        "--ca-bundle",
        help="with --server: the CA bundle (PEM) that verifies the server's certificate "
        "(default: the system's CAs)",
    )
    run.add_argument(
        "--server-patience",
        type=float,
        metavar="SECONDS",
        help="with --server: how long a server that stopped answering (restarting, say) is "
        "asked again before the run ends (default 60)",
    )
    run.add_argument("--state-dir", help="keep the devices' SQLite state here")
    run.add_argument(
        "--strategy",
        help="server aggregation (default fedavg): fedavg | fedavgm | fedadam | fedyogi | "
        "fedadagrad | median | trimmed_mean | norm_bound | module:Class (your own; its "
        "settings go in a plan's [strategy] table)",
    )
    run.add_argument(
        "--server-learning-rate",
        type=float,
        help="step on the aggregated update (default: the strategy's; 1 for "
        "fedavg, 0.03 for fedadam/fedyogi, 0.1 for fedadagrad)",
    )
    run.add_argument("--proximal-mu", type=float, help="FedProx's mu (default 0: off)")
    run.add_argument(
        "--mode",
        choices=("sync", "async"),
        help="sync (default): rounds with deadlines; async (FedBuff): devices train on whatever "
        "version is current and every --devices-per-round updates are folded in",
    )
    run.add_argument(
        "--max-staleness",
        type=int,
        help="async: refuse updates trained this many versions ago or more (default 10)",
    )
    run.add_argument(
        "--secagg",
        dest="secagg",
        action="store_const",
        const="secagg",
        help="secure aggregation (SecAgg): the server learns only sums",
    )
    run.add_argument(
        "--secagg-plus",
        dest="secagg",
        action="store_const",
        const="secagg+",
        help="SecAgg+: each device shares keys with O(log n) neighbours only",
    )
    run.add_argument(
        "--dp",
        help="local differential privacy: epsilon=E,delta=D,clip=C[,budget=B] (epsilon per "
        "release; budget per device over the job, default epsilon x rounds)",
    )
    run.add_argument(
        "--personalize",
        type=int,
        default=0,
        metavar="EPOCHS",
        help="hold out a fifth of each device's examples; report the final model's accuracy "
        "on them beside that of the model each device fine-tunes for EPOCHS on the rest",
    )
    run.add_argument(
        "--per-device",
        action="store_true",
        default=None,
        help="per-device results in the report: the partition's statistics, each round's "
        "participants' use, each device's final accuracy on its own held-out data (a share "
        "of the test set split like the training set, or its own user's test examples) and "
        "their spread",
    )
    run.add_argument(
        "--stop-at",
        type=float,
        metavar="ACCURACY",
        help="end the run after the first round whose test accuracy reaches this (the "
        "plan's rounds are then at most): a rounds-to-target run costs no more rounds",
    )
    if not sweep:
        run.add_argument(
            "--save-model",
            metavar="PATH",
            help="write the final global model there (safetensors, as the server serves it)",
        )
    run.add_argument(
        "--distributed-dp",
        action="store_true",
        default=None,
        help="with --dp and --secagg/--secagg-plus: each device adds a share of discrete "
        "Gaussian noise so that the secure sum, not each update, is (epsilon, delta)-DP "
        "per round (Kairouz et al. 2021)",
    )
    run.add_argument(
        "--compress",
        help="update compression: q8 | q4 | topk:FRACTION | topk:FRACTION,q8",
    )
    run.add_argument(
        "--inline-model-max",
        type=int,
        default=1024 * 1024,
        metavar="BYTES",
        help="a model up to this size comes with the admission (one round trip fewer); "
        "bigger ones, or all with 0, are downloaded separately (resumably)",
    )
    run.add_argument(
        "--model",
        choices=("softmax", "mlp", "cnn"),
        help="model architecture (default: the data set's: digits mlp, mnist softmax, femnist mlp)",
    )
    run.add_argument(
        "--runtime",
        default="numpy",
        choices=("numpy", "onnx", "tflite"),
        help="the devices' training backend (onnx needs the onnx extra; default numpy)",
    )
    run.add_argument(
        "--engine",
        default="local",
        choices=("local", "ray"),
        help="local: every device in this process; ray: the devices sharded onto the "
        "actors of a Ray cluster (needs the ray extra; see README)",
    )
    run.add_argument(
        "--ray-address",
        help="the Ray cluster: auto (the one this node joined), HEAD:6379, or ray://HEAD:10001 "
        "(needs ray[client]); default: start a local Ray instance for the run",
    )
    run.add_argument(
        "--ray-actors", type=int, help="actors the devices are sharded onto (default: one per CPU)"
    )
    run.add_argument(
        "--workers",
        type=int,
        default=1,
        help="local engine: processes the devices train on (default 1: in the event loop; "
        "0: one per CPU). The report is the same for any number",
    )
    run.add_argument(
        "--ray-host-ip",
        help="address the simulation's server listens on, reachable from every Ray node "
        "(default: 127.0.0.1 on a one-node cluster, else this node's IP)",
    )
    run.add_argument(
        "--faults",
        help="inject network faults under every device, e.g. "
        "drop=0.3 (30%% of requests fail, every way) or lost=0.1,reset=0.05",
    )
    if not sweep:
        run.add_argument(
            "--report",
            default="fedsim-report.json",
            help="JSON report path; the plot goes beside it (.png)",
        )
    run.add_argument("--quiet", action="store_true", help="no progress bar or per-round lines")
    if not sweep:
        run.add_argument(
            "--no-plot", action="store_true", help="write the JSON report only, no PNG (saves ~1 s)"
        )
