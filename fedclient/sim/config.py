"""What a simulation run depends on: `SimulationConfig`, and the job plan it describes.

The configuration is plain data (the ``fedsim run`` flags, or a plan file and the
flags that set the fleet); it is embedded in the report, so a report says how to
run it again.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from fedclient import InvalidInput
from fedclient.plugins import construct, describe, is_import_path, load_plugin
from fedclient.protocol import JobPlan
from fedclient.server import load_plan, plan_from_dict
from fedclient.server.selection import Selection
from fedclient.server.strategies import Strategy
from fedclient.sim.datasets import Dataset
from fedclient.trainers import Trainer, check_trainer_options

__all__ = ["DATASET_DEFAULTS", "PLAN_FIELDS", "SimulationConfig", "flag_name"]

#: The settings a plan file holds: beside ``plan_file`` they are refused, never ignored
#: (`SimulationConfig.plan_conflicts`). The fleet, data and engine stay the flags'.
PLAN_FIELDS = (
    "job",
    "rounds",
    "devices_per_round",
    "min_devices",
    "over_selection",
    "deadline_seconds",
    "compress",
    "mode",
    "max_staleness",
    "model",
    "epochs",
    "batch_size",
    "learning_rate",
    "proximal_mu",
    "strategy",
    "server_learning_rate",
    "dp",
    "secagg",
    "distributed_dp",
)


def flag_name(field: str) -> str:
    """The ``fedsim run`` flag of a `SimulationConfig` field (``devices_per_round`` ->
    ``--devices-per-round``)."""
    return "--" + field.replace("_", "-")


#: Model and training defaults per data set (the flags override them).
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "digits": {
        "model": {"kind": "mlp", "hidden": [64]},
        "train": {"epochs": 5, "batch_size": 8, "learning_rate": 0.1},
    },
    "mnist": {
        "model": {"kind": "softmax", "hidden": []},
        "train": {"epochs": 1, "batch_size": 10, "learning_rate": 0.1},
    },
    "femnist": {
        "model": {"kind": "mlp", "hidden": [200]},
        "train": {"epochs": 5, "batch_size": 10, "learning_rate": 0.05},
    },
    "text": {  # sms_spam and csv: hashed n-grams into softmax regression
        "model": {"kind": "softmax", "hidden": []},
        "train": {"epochs": 5, "batch_size": 8, "learning_rate": 4.0},  # rows are L2-normed
    },
    "synthetic": {  # Synthetic(alpha, beta): 60 features, 10 classes, drawn per device
        "model": {"kind": "softmax", "hidden": []},
        "train": {"epochs": 1, "batch_size": 10, "learning_rate": 0.05},
    },
    "arrays": {  # npz: an MLP over whatever features the arrays hold
        "model": {"kind": "mlp", "hidden": [64]},
        "train": {"epochs": 5, "batch_size": 8, "learning_rate": 0.1},
    },
}


@dataclass
class SimulationConfig:
    """Everything a run depends on; it is embedded in the report."""

    dataset: str = "digits"
    data_dir: str | None = None
    devices: int = 100
    devices_per_round: int = 20
    rounds: int = 40
    partition: str = "iid"
    seed: int = 0
    holdout: int = 0  # training examples (drawn with the seed) the devices never get
    max_examples: int | None = None  # each device keeps at most this many (drawn with the seed)
    fleet: str = "phones"
    availability: str = "always"  # always | diurnal[:...] | trace:PATH (sim.availability)
    epochs: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    min_devices: int | None = None
    over_selection: float = 1.0
    deadline_seconds: float = 600.0
    server: str | None = None
    job: str | None = None
    state_dir: str | None = None
    faults: str | None = None
    model: str | None = None  # softmax | mlp | cnn; default: the data set's
    compress: str = ""  # update compression the job asks of devices (fedclient.compression)
    inline_model_max: int = 1024 * 1024  # a model up to this size comes with the admission
    personalize: int = 0  # epochs of local fine-tuning whose accuracy the report measures
    per_device: bool = False  # each device's final accuracy and the partition, in the report
    save_model: str | None = None  # write the final global model here (safetensors)
    stop_at: float | None = None  # end the run after the first round this accurate
    text_column: str = "text"  # --dataset csv:PATH: which columns hold what
    label_column: str = "label"
    user_column: str | None = None
    no_header: bool = False
    plan_file: str | None = None  # a TOML plan (fedserver's): it sets the job, not the flags
    enrolment_credential: str | None = None  # for a remote server whose enrolment is closed
    ca_bundle: str | None = None  # the CA bundle that verifies a remote server's certificate
    server_patience: float = 60.0  # seconds a remote server may be away before the run ends
    dp: str = ""  # local DP: "epsilon=8,delta=1e-5,clip=1.0[,budget=E]"
    secagg: str = ""  # "", "secagg" or "secagg+": the server learns only each round's sum
    distributed_dp: bool = False  # with dp and secagg: the noise is shared, the sum is private
    mode: str = "sync"  # sync rounds, or async (FedBuff) buffers
    max_staleness: int = 10
    strategy: str = "fedavg"  # the server's aggregation (fedclient.server.strategies)
    server_learning_rate: float | None = None  # None: the strategy's default
    proximal_mu: float = 0.0  # FedProx
    runtime: str = "numpy"  # every device's training backend (fedclient.runtime.RUNTIMES)
    engine: str = "local"  # local | ray (fedclient.sim.engines.ray)
    workers: int = 1  # local engine: processes that train (1: in the loop; 0: one per CPU)
    ray_address: str | None = None  # None: a new local Ray instance; auto | ray://HOST:PORT
    ray_actors: int | None = None  # None: one per CPU of the Ray cluster
    ray_host_ip: str | None = None  # where the actors reach the server; None: detected

    def plan_conflicts(self) -> list[str]:
        """The `PLAN_FIELDS` set away from their defaults beside a ``plan_file``, or
        beside a remote ``server`` (whose plan rules; ``job`` names it): the plan would
        override them, so they are refused."""
        if self.plan_file is None and self.server is None:
            return []
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        named = PLAN_FIELDS if self.plan_file is not None else PLAN_FIELDS[1:]
        return [name for name in named if getattr(self, name) != defaults[name]]

    def resolved(self) -> SimulationConfig:
        """This configuration with its one seed settled, checked against its plan file.

        A run has one seed. It draws the split of the data, the device profiles, the
        version-0 model, the check-in order, each device's batches and (simulated)
        privacy noise. With a plan file it is ``seed`` or the plan's ``[job] seed``,
        whichever is set (0 is unset); two different ones are refused. Flags the plan
        sets are refused too (`plan_conflicts`)."""
        conflicts = self.plan_conflicts()
        if conflicts:
            where = f"the plan {self.plan_file}" if self.plan_file else "the server's plan"
            raise InvalidInput(
                f"{', '.join(flag_name(c) for c in conflicts)}: {where} sets the job, its "
                "training, strategy and privacy; change it there"
            )
        if self.plan_file is None:
            return self
        planned = load_plan(self.plan_file).job.seed
        if planned and self.seed and planned != self.seed:
            raise InvalidInput(
                f"two seeds: --seed {self.seed} and the plan's [job] seed = {planned}; a "
                "run has one (it draws the split, the model, the check-ins): give one"
            )
        return dataclasses.replace(self, seed=self.seed or planned)

    @property
    def plan_folder(self) -> str:
        """Where the plan's plugins are looked for first: the plan file's folder (and
        then the current directory)."""
        return str(Path(self.plan_file).parent) if self.plan_file else "."

    def plugins(self, plan: JobPlan) -> dict[str, dict[str, str]]:
        """The plugins ``plan`` names by import path, as the report records them."""
        named: dict[str, dict[str, str]] = {}
        where = [self.plan_folder]
        if is_import_path(plan.strategy.name):
            named["strategy"] = describe(plan.strategy.name, Strategy, where=where)
        if plan.train.trainer:
            named["trainer"] = describe(plan.train.trainer, Trainer, where=where)
        if is_import_path(plan.selection.name):
            named["selection"] = describe(plan.selection.name, Selection, where=where)
        return named

    def import_plugins(self) -> None:
        """Import the plugins of ``plan_file`` from its folder (see `load_plugin`)."""
        if self.plan_file is None:
            return
        plan = load_plan(self.plan_file)  # imports its strategy and selection
        if plan.train.trainer:
            load_plugin(plan.train.trainer, Trainer, where=[self.plan_folder])

    def trainers(self, plan: JobPlan) -> dict[str, Trainer]:
        """The client trainer the plan names, built with its settings, for the simulated
        devices to hold (the researcher's code: fedsim imports it, a device never does)."""
        name = plan.train.trainer
        if not name:
            return {}
        cls = load_plugin(name, Trainer, where=[self.plan_folder])
        trainer: Trainer = construct(cls, f"trainer {name!r}", options=plan.train.trainer_options)
        check_trainer_options(trainer, name, plan.train)
        return {name: trainer}

    def _model(self, default: dict[str, Any]) -> dict[str, Any]:
        if self.model is None or self.model == default["kind"]:
            return default
        hidden = {"softmax": [], "mlp": [64], "cnn": [8, 16]}.get(self.model)
        if hidden is None:
            raise InvalidInput(f"unknown model {self.model!r}; use softmax, mlp or cnn")
        return {"kind": self.model, "hidden": hidden}

    def plan(self, data: Dataset) -> JobPlan:
        """The job plan this configuration describes: ``plan_file``'s, checked against the
        data, or one built from the flags."""
        if self.plan_file is not None:
            plan = load_plan(self.plan_file)
            if self.seed and plan.job.seed != self.seed:  # the run's one seed (see `resolved`)
                job = msgspec.structs.replace(plan.job, seed=self.seed)
                plan = msgspec.structs.replace(plan, job=job)
            if (plan.model.inputs, plan.model.classes) != (data.inputs, data.classes):
                raise InvalidInput(
                    f"the plan's model takes {plan.model.inputs} inputs and {plan.model.classes}"
                    f" classes; {data.name} has {data.inputs} and {data.classes}"
                )
            return plan
        if data.windows is not None:
            raise InvalidInput(
                f"--dataset {data.name} trains a sequence model: give --plan with a fedconvert "
                "bundle that takes token ids (examples/shakespeare/ makes one)"
            )
        family = (
            "text"
            if data.texts is not None
            else "arrays"
            if data.name.startswith("npz:")
            else data.name
        )
        defaults = DATASET_DEFAULTS[family]
        train = dict(defaults["train"])
        for key in ("epochs", "batch_size", "learning_rate"):
            if getattr(self, key) is not None:
                train[key] = getattr(self, key)
        return plan_from_dict(
            {
                "job": {
                    "name": self.job or _job_name(data.name),
                    "rounds": self.rounds,
                    "devices_per_round": self.devices_per_round,
                    "min_devices": self.min_devices or max(1, self.devices_per_round // 2),
                    "over_selection": self.over_selection,
                    "deadline_seconds": self.deadline_seconds,
                    "compression": self.compress,
                    "mode": self.mode,
                    "max_staleness": self.max_staleness,
                    "seed": self.seed,
                },
                "model": {
                    **self._model(defaults["model"]),
                    "inputs": data.inputs,
                    "classes": data.classes,
                },
                "train": {**train, "proximal_mu": self.proximal_mu},
                "privacy": {
                    **_privacy(self.dp),
                    **({"secagg": self.secagg} if self.secagg else {}),
                    **({"distributed_dp": True} if self.distributed_dp else {}),
                },
                "strategy": {
                    "name": self.strategy,
                    "server_learning_rate": self.server_learning_rate,
                },
            }
        )


def _privacy(text: str) -> dict[str, Any]:
    """``epsilon=8,delta=1e-5,clip=1.0,budget=40`` -> the plan's [privacy] table."""
    names = {
        "epsilon": "dp_epsilon",
        "delta": "dp_delta",
        "clip": "clip",
        "budget": "budget_epsilon",
    }
    table: dict[str, Any] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, _, value = item.partition("=")
        if key not in names:
            raise InvalidInput(f"unknown --dp setting {key!r}; use {', '.join(names)}")
        try:
            table[names[key]] = float(value)
        except ValueError:
            raise InvalidInput(f"--dp {key} needs a number, got {value!r}") from None
    if table and "dp_epsilon" not in table:
        raise InvalidInput("--dp needs epsilon=...")
    return table


def _job_name(dataset: str) -> str:
    """A valid job name for a data set (``csv:my data.csv`` -> ``csv-my-data``)."""
    stem = dataset.split(":")[-1].rsplit(".", 1)[0] if ":" in dataset else dataset
    name = "".join(c if c.isalnum() or c in "_.-" else "-" for c in stem).strip("-.")
    return (name or "job")[:64]
