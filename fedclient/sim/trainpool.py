"""Local training on a process pool (``fedsim run --workers N``).

The devices' protocol steps stay on the event loop, in order; each device's
training (`fedclient.TrainTask`) goes to a worker process, so while one device
trains, the loop serves the next device's download. A worker builds the job's
model once and reuses it for every task (a task carries the weights, the data and
the seed), so the result is the one the device would compute inline: the same
seed gives the same report whatever the number of workers.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import fields
from typing import Any

import msgspec

from fedclient import InvalidInput, TrainTask
from fedclient.protocol import ModelSpec, Weights
from fedclient.runtime import TrainingBackend, TrainResult, create_backend

__all__ = ["TrainPool", "resolve_workers"]


def resolve_workers(workers: int) -> int:
    """``workers`` as asked (0: one per CPU this process may use)."""
    if workers < 0:
        raise InvalidInput(f"--workers must be 0 (one per CPU) or more, got {workers}")
    if workers:
        return workers
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class TrainPool:
    """``workers`` processes training one job's model with one runtime."""

    def __init__(self, workers: int, spec: ModelSpec, runtime: str) -> None:
        # Imported here: a run on the loop alone (--workers 1) needs no process machinery.
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # fork: a worker starts in milliseconds with the simulator's modules loaded; it
        # touches nothing it inherits but the code. Elsewhere a spawned worker imports.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        self.workers = workers
        self.runtime = runtime
        self.spec = msgspec.json.encode(spec)
        self.executor = ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context(method), initializer=_start_worker
        )

    async def __call__(self, task: TrainTask) -> tuple[Weights, TrainResult, float]:
        """Run ``task`` on a worker (the driver's `Client.atrain` hook). The task goes
        without its backend (a worker has its own; an ONNX session does not pickle)."""
        loop = asyncio.get_running_loop()
        rest = {f.name: getattr(task, f.name) for f in fields(task) if f.name != "backend"}
        return await loop.run_in_executor(self.executor, _train, self.runtime, self.spec, rest)

    def close(self) -> None:
        self.executor.shutdown(cancel_futures=True)


_BACKENDS: dict[tuple[str, bytes], TrainingBackend] = {}


def _start_worker() -> None:
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1)  # small models: BLAS threads only contend (fedclient.sim.cli)


def _train(runtime: str, spec: bytes, task: dict[str, Any]) -> Any:
    """In a worker: the job's model, built once per worker, trained as `TrainTask.run`."""
    backend = _BACKENDS.get((runtime, spec))
    if backend is None:
        model = msgspec.json.decode(spec, type=ModelSpec)
        backend = _BACKENDS[(runtime, spec)] = create_backend(model, runtime)
    return TrainTask(backend, **task).run()
