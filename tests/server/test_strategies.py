"""Strategies: each one's arithmetic, their state across a restart, and robustness to
poisoned updates."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import fedclient
from fedclient.protocol import StrategySettings, decode_tensors
from fedclient.runtime import NumpyModel
from fedclient.server import FederationService, ServerStore, plan_from_dict
from fedclient.server.rounds import SyncRounds, initial_weights
from fedclient.server.strategies import (
    ClientUpdate,
    Strategy,
    decode_state,
    encode_state,
    strategy_for,
)
from fedclient.sim.datasets import Dataset, partition
from tests.conftest import ManualClock, Server

pytestmark = pytest.mark.anyio

BASE = {"w": np.zeros(3, np.float32)}


def _updates(*rows: list[float]) -> list[ClientUpdate]:
    return [ClientUpdate(f"d{i}", 1, {"w": np.array(r, np.float32)}) for i, r in enumerate(rows)]


def test_robust_aggregators_ignore_a_wild_update() -> None:
    updates = _updates([1, 1, 1], [1.2, 0.8, 1], [0.9, 1.1, 1], [1, 1, 1], [100, -100, 1])
    mean = strategy_for(StrategySettings("fedavg")).aggregate(BASE, updates, {})[0]["w"]
    median = strategy_for(StrategySettings("median")).aggregate(BASE, updates, {})[0]["w"]
    trimmed = strategy_for(StrategySettings("trimmed_mean", trim_fraction=0.2)).aggregate(
        BASE, updates, {}
    )[0]["w"]
    bounded = strategy_for(StrategySettings("norm_bound", norm_bound=2.0)).aggregate(
        BASE, updates, {}
    )[0]["w"]
    assert abs(mean[0]) > 15
    np.testing.assert_allclose(median, [1, 1, 1])
    np.testing.assert_allclose(trimmed, [3.2 / 3, 2.8 / 3, 1], rtol=1e-5)  # 1 cut per side
    assert np.abs(bounded).max() < 1.5


def test_server_optimisers_keep_state_between_rounds() -> None:
    updates = _updates([1, 0, -1])
    for name in ("fedavgm", "fedadam", "fedyogi", "fedadagrad"):
        strategy = strategy_for(StrategySettings(name))
        first, state = strategy.aggregate(BASE, updates, {})
        second, state2 = strategy.aggregate(first, updates, state)
        assert state and set(state) == set(state2), name
        assert np.sign(second["w"][0]) == 1 and np.sign(second["w"][2]) == -1, name
        assert second["w"][1] == 0, name
        # Momentum: the second step is longer than the first.
        assert abs(second["w"][0] - first["w"][0]) > abs(first["w"][0]) * 0.99, name


def test_a_strategy_is_one_class() -> None:
    class Newest(Strategy):
        name = "newest_only"

        def aggregate(self, weights: Any, updates: Any, state: Any) -> Any:
            last = updates[-1].delta
            return {k: v + last[k] for k, v in weights.items()}, state

    result = strategy_for(StrategySettings("newest_only")).aggregate(
        BASE, _updates([1, 2, 3], [4, 5, 6]), {}
    )
    np.testing.assert_array_equal(result[0]["w"], [4, 5, 6])
    with pytest.raises(fedclient.InvalidInput, match="unknown strategy"):
        strategy_for(StrategySettings("nope"))
    with pytest.raises(fedclient.InvalidInput, match="unknown strategy"):
        FederationService(ServerStore()).add_job(
            plan_from_dict({"job": {"name": "x"}, "strategy": {"name": "nope"}})
        )


async def test_optimiser_state_survives_a_server_restart(
    db_url: Any, make_devices: Any, digits: Dataset
) -> None:
    plan = plan_from_dict(
        {
            "job": {"name": "digits", "rounds": 3, "devices_per_round": 1},
            "model": {"kind": "softmax", "inputs": 64, "hidden": [], "classes": 10},
            "strategy": {"name": "fedadam"},
        }
    )
    clock = ManualClock()
    first = FederationService(ServerStore(db_url("s")), clock=clock)
    first.add_job(plan)
    (device,) = make_devices(1, Server(first, clock).transport())
    await device.arun_once()
    state = first.store.strategy_state("digits")
    assert state is not None and "m.fc1.weight" in decode_tensors(state)[0]
    first.store.close()
    again = FederationService(ServerStore(db_url("s")), clock=clock)
    again.add_job(plan)
    assert again.store.strategy_state("digits") == state


class SignFlipper(NumpyModel):
    """A poisoned device: it trains, then sends ten times the opposite of its update."""

    def train(self, x: Any, y: Any, **kwargs: Any) -> Any:
        start = self.get_weights()
        result = super().train(x, y, **kwargs)
        self.set_weights(
            {
                k: (start[k] - 10 * (v - start[k])).astype(v.dtype)
                for k, v in self.get_weights().items()
            }
        )
        return result


async def _poisoned_federation(strategy: str, digits: Dataset) -> float:
    plan = plan_from_dict(
        {
            "job": {
                "name": "digits",
                "rounds": 8,
                "devices_per_round": 20,
                "min_devices": 20,
                "over_selection": 1.0,
                "seed": 1,
            },
            "model": {"kind": "mlp", "inputs": 64, "hidden": [32], "classes": 10},
            "train": {"epochs": 2, "batch_size": 8, "learning_rate": 0.1},
            "strategy": {"name": strategy},
        }
    )
    service = FederationService(ServerStore(), clock=ManualClock())
    service.add_job(plan)
    transport = Server(service, ManualClock()).transport()
    parts = partition(digits.y_train, 20, "iid", np.random.default_rng(0))
    devices = [
        fedclient.Client(
            "http://fl",
            "digits",
            (digits.x_train[p], digits.y_train[p]),
            transport=transport,
            seed=i,
            model=(SignFlipper if i < 2 else NumpyModel)(plan.model),
        )
        for i, p in enumerate(parts)
    ]
    for _ in range(8):
        for d in devices:
            assert (await d.arun_once()).status == "uploaded"
    found = service.store.model("digits", 8)
    assert found is not None
    model = NumpyModel(plan.model)
    model.set_weights(decode_tensors(found[0])[0])
    return model.evaluate(digits.x_test, digits.y_test).accuracy


async def test_median_keeps_accuracy_when_a_tenth_of_devices_are_poisoned(digits: Dataset) -> None:
    fedavg = await _poisoned_federation("fedavg", digits)
    median = await _poisoned_federation("median", digits)
    trimmed = await _poisoned_federation("trimmed_mean", digits)
    assert median > 0.85 and trimmed > 0.85
    assert fedavg < 0.5  # two sign-flipped, scaled updates in twenty wreck the mean
    print(f"poisoned 10%: fedavg {fedavg:.3f}, median {median:.3f}, trimmed {trimmed:.3f}")


def test_fedprox_keeps_local_training_near_the_global_model(digits: Dataset) -> None:
    spec = fedclient.protocol.ModelSpec("mlp", 64, [16], 10)
    drift = {}
    for mu in (0.0, 1.0):
        model = NumpyModel(spec, seed=0)
        start = model.get_weights()
        model.train(
            digits.x_train[:200],
            digits.y_train[:200],
            epochs=5,
            batch_size=8,
            learning_rate=0.1,
            rng=np.random.default_rng(0),
            proximal_mu=mu,
        )
        end = model.get_weights()
        drift[mu] = sum(float(np.sum((end[k] - start[k]) ** 2)) for k in start)
    assert drift[1.0] < 0.8 * drift[0.0]


@pytest.mark.parametrize("ratio", [4.0, None])
def test_one_device_claiming_max_examples_counts_as_ratio_median_devices(
    make_server: Any, ratio: float | None
) -> None:
    # Nine honest devices (20 examples, delta +0.01) and one that claims max_examples with
    # delta -0.05: under fedavg it counts for `max_weight_ratio` median devices at most.
    from fedclient.protocol import CheckinRequest, EnrolRequest, encode_tensors

    server: Server = make_server(devices_per_round=10, min_devices=10, max_weight_ratio=ratio)
    service, store = server.service, server.store
    base = decode_tensors(store.model("digits", 0)[0])[0]  # type: ignore[index]
    claims = [20] * 9 + [1_000_000]
    steps = [0.01] * 9 + [-0.05]
    for i, (claim, step) in enumerate(zip(claims, steps, strict=True)):
        token = service.enrol(EnrolRequest()).token
        service.checkin(token, "digits", CheckinRequest())
        delta = {k: np.full_like(v, step) for k, v in base.items()}
        body = encode_tensors(delta, {"num_examples": str(claim), "model_version": "0"})
        service.uploads.upload(token, 1, f"key-{i}", body)
    assert store.round(1).status == "closed"  # type: ignore[union-attr]
    new = decode_tensors(store.model("digits", 1)[0])[0]  # type: ignore[index]
    liar = 4 * 20 if ratio else 1_000_000
    mean = (9 * 20 * 0.01 + liar * -0.05) / (9 * 20 + liar)
    for name, weights in base.items():
        np.testing.assert_allclose(new[name], weights + mean, atol=1e-6)


def test_a_strategy_by_import_path_takes_and_validates_its_own_settings(tmp_path: Any) -> None:
    (tmp_path / "damped_strategy_a.py").write_text(
        "from fedclient.server.strategies import FedAvg\n"
        "class Damped(FedAvg):\n"
        "    def __init__(self, settings=None, *, damping=1.0):\n"
        "        super().__init__(settings)\n"
        "        if not 0 < damping <= 1:\n"
        "            raise ValueError(f'damping must be in (0, 1], got {damping}')\n"
        "        self.learning_rate *= damping\n"
    )
    base = {"job": {"name": "x"}}

    def plan(**strategy: Any) -> fedclient.protocol.JobPlan:
        table = {"name": "damped_strategy_a:Damped", **strategy}
        return plan_from_dict({**base, "strategy": table}, base=tmp_path)

    loaded = plan(damping=0.25)
    assert loaded.strategy.options == {"damping": 0.25}
    step = strategy_for(loaded.strategy).aggregate(BASE, _updates([4, 4, 4]), {})[0]["w"]
    np.testing.assert_allclose(step, [1, 1, 1])
    with pytest.raises(fedclient.InvalidInput, match="damping must be in"):
        plan(damping=2.0)
    with pytest.raises(fedclient.InvalidInput, match=r"takes no setting 'dampng'.*damping"):
        plan(dampng=0.5)
    # A built-in strategy refuses settings it does not take, as an unknown key.
    with pytest.raises(fedclient.InvalidInput, match="takes no setting 'mu'"):
        plan_from_dict({**base, "strategy": {"name": "fedavg", "mu": 1}})
    with pytest.raises(fedclient.InvalidInput, match="cannot import 'no_such_module'"):
        plan_from_dict({**base, "strategy": {"name": "no_such_module:X"}})
    with pytest.raises(fedclient.InvalidInput, match="is not a Strategy"):
        plan_from_dict({**base, "strategy": {"name": "numpy:ndarray"}})


def test_strategy_state_of_any_shape_survives_the_store(db_url: Any) -> None:
    class Counting(Strategy):
        name = "counting_any_shape"

        def aggregate(self, weights: Any, updates: Any, state: Any) -> Any:
            count = state.get("rounds", np.array(0))
            assert count.shape == ()  # a 0-d array comes back 0-d
            return weights, {
                "rounds": count + 1,
                "last_lr": 0.5,  # a plain number is kept as a 0-d array
                "table": np.arange(6, dtype=np.int64).reshape(2, 3),
            }

    plan = plan_from_dict(
        {
            "job": {"name": "digits", "rounds": 3, "devices_per_round": 1},
            "model": {"kind": "softmax", "inputs": 64, "hidden": [], "classes": 10},
            "strategy": {"name": "counting_any_shape"},
        }
    )
    state = decode_state(encode_state({"a": np.float32(2), "b": np.ones((2, 0))}))
    assert state["a"].shape == () and state["a"].dtype == np.float32 and state["b"].shape == (2, 0)
    store = ServerStore(db_url("state"))
    rounds = SyncRounds(store)
    rounds.create_job(plan, 0.0)
    for number in (1, 2, 3):
        job = store.job("digits")
        assert job is not None
        round_ = store.latest_rounds("digits", 1)[0]
        weights = {k: np.zeros_like(v) for k, v in initial_weights(plan).items()}
        store.admit(round_.round_id, "d", 0.0)
        update = ClientUpdate("d", 1, weights)
        rounds.close(job, round_, float(number), "test", updates=[update])
    held = store.strategy_state("digits")
    assert held is not None
    kept = decode_state(held)
    assert int(kept["rounds"]) == 3 and kept["rounds"].shape == ()
    assert kept["last_lr"].shape == () and kept["table"].shape == (2, 3)
