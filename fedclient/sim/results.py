"""What a run's report says beyond its rounds: the devices' privacy spend, their
personalised models, and per-device results (``--per-device``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedclient import Personalization
from fedclient.privacy.dp import GaussianMechanism
from fedclient.protocol import JobPlan, Weights
from fedclient.runtime import TrainingBackend, create_backend
from fedclient.sim.config import SimulationConfig
from fedclient.sim.datasets import Dataset
from fedclient.sim.fleet import Fleet

__all__ = ["device_report", "personalization_report", "privacy_report", "rounded"]


def rounded(value: float | None) -> float | None:
    """A figure as reports hold it: 6 decimals (None stays None)."""
    return None if value is None else round(value, 6)


def privacy_report(plan: JobPlan, fleet: Fleet) -> dict[str, Any]:
    """Local DP: what each device spent, from the devices' own ledgers."""
    p = plan.privacy
    if p.dp_epsilon is None:
        return {}
    spent = fleet.epsilon_spent(plan.job.name, p.dp_delta)
    released = [e for e in spent if e > 0]
    return {
        "noise": "seeded from --seed for a reproducible report: a simulation's noise is "
        "not private (devices draw theirs from a CSPRNG)",
        # local: each device's update is (epsilon, delta)-DP; distributed: each round's
        # secure sum is, for every device in it (the ledgers charge the same per round).
        "mechanism": "distributed" if p.distributed_dp else "local",
        "epsilon_per_release": p.dp_epsilon,
        "delta": p.dp_delta,
        "clip": p.clip,
        "budget_epsilon": p.budget_epsilon
        or round(
            GaussianMechanism.for_release(p.dp_epsilon, p.dp_delta, p.clip).epsilon(
                p.dp_delta, plan.job.rounds
            ),
            4,
        ),
        "devices_released": len(released),
        "max_epsilon_spent": max(released, default=0.0),
        "mean_epsilon_spent": round(sum(released) / len(released), 4) if released else 0.0,
        "epsilon_spent_per_device": spent,
    }


def personalization_report(
    config: SimulationConfig,
    plan: JobPlan,
    data: Dataset,
    fleet: Fleet,
    latest: tuple[int, Weights] | None,
) -> dict[str, Any]:
    """With --personalize: the final global model's accuracy on each device's own held-out
    examples, and that of the model each device fine-tunes from it on its training ones
    (`fedclient.Personalization`), over every device's held-out examples together."""
    if not config.personalize or latest is None:
        return {}
    version, weights = latest
    tuning = Personalization(
        epochs=config.personalize,
        learning_rate=plan.train.learning_rate,
        batch_size=plan.train.batch_size,
    )
    backend = create_backend(plan.model, config.runtime)
    correct_global = correct_personal = examples = 0
    registry = fleet.registry
    for index in range(len(registry)):
        held = registry.own_held_out_data(index)
        if held is None:
            continue
        x_held, y_held = held
        backend.set_weights(weights)
        correct_global += round(backend.evaluate(x_held, y_held).accuracy * len(y_held))
        x, y = registry.device_data(index)
        tuning.apply(backend, weights, x, y, seed=config.seed * 100_003 + index)
        correct_personal += round(backend.evaluate(x_held, y_held).accuracy * len(y_held))
        examples += len(y_held)
    if not examples:
        return {}
    return {
        "personalized_accuracy": round(correct_personal / examples, 6),
        "global_accuracy_on_devices": round(correct_global / examples, 6),
        "personalization": {"epochs": config.personalize, "model_version": version},
    }


def device_report(
    config: SimulationConfig,
    data: Dataset,
    fleet: Fleet,
    latest: tuple[int, Weights] | None,
    backend: TrainingBackend,
    rounds: list[dict[str, Any]],
) -> dict[str, Any]:
    """With --per-device: the partition's statistics, and each device's share of the
    work and the final model's accuracy on its own held-out data (and their spread)."""
    if not config.per_device or latest is None:
        return {}
    version, weights = latest
    registry = fleet.registry
    taken = np.zeros(len(registry), dtype=np.int64)
    for record in rounds:
        taken[record.get("participants", [])] += 1
    backend.set_weights(weights)
    devices, accuracies = [], []
    for index in range(len(registry)):
        labels = registry.labels(index)
        held_out = registry.eval_data(index)
        entry: dict[str, Any] = {
            "device": index,
            "examples": len(labels),
            "classes": len(np.unique(labels)),
            "updates": int(taken[index]),
            "held_out": 0 if held_out is None else len(held_out[1]),
            "accuracy": None,
            "loss": None,
        }
        if held_out is not None:
            result = backend.evaluate(*held_out)
            entry["accuracy"], entry["loss"] = rounded(result.accuracy), rounded(result.loss)
            accuracies.append(result.accuracy)
        devices.append(entry)
    sizes = np.array([e["examples"] for e in devices])
    classes = np.array([e["classes"] for e in devices])
    return {
        "partition": {
            "scheme": config.partition,
            "devices": len(devices),
            "examples": _spread(sizes),
            "classes_per_device": _spread(classes),
        },
        "devices": devices,
        "final": {
            "device_accuracy": {
                "model_version": version,
                "devices": len(accuracies),
                **_spread(np.array(accuracies)),
            }
        },
    }


def _spread(values: np.ndarray) -> dict[str, float | None]:
    """Mean, standard deviation and quantiles of per-device figures."""
    if not len(values):
        return dict.fromkeys(("mean", "std", "min", "p10", "median", "p90", "max"))
    p10, median, p90 = np.percentile(values, [10, 50, 90])
    return {
        "mean": round(float(np.mean(values)), 6),
        "std": round(float(np.std(values)), 6),
        "min": round(float(np.min(values)), 6),
        "p10": round(float(p10), 6),
        "median": round(float(median), 6),
        "p90": round(float(p90), 6),
        "max": round(float(np.max(values)), 6),
    }
