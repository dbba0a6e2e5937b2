"""The Ray engine: the local engine's rounds, with the devices sharded onto Ray actors.

    fedsim run --engine ray [--ray-address auto | ray://HEAD:10001] [--ray-actors N] ...

The driver (the ``fedsim`` process) keeps `fedclient.sim.engine`'s round logic: the
seeded check-in order, the devices' simulated finish times, the uploads in that
order, the evaluation. The devices live on actors: actor ``k`` of ``N`` owns the
devices ``k, k + N, k + 2N, ...``, builds a real `fedclient.Client` for one when it
wakes (its state in SQLite in the actor's memory, or under ``--state-dir``) and
does the steps the driver asks for, a batch per round: check-in in waves, then
download and training on every actor at once, then the uploads one by one.

A cluster cannot reach the in-process ASGI app, so the devices talk HTTP to a real
server: the one ``--server URL`` names (on real time, as with the local engine),
or the simulation's own reference server, which the driver serves with uvicorn in
its own event loop — still on the simulated clock, so that the same seed gives the
same report. It listens on 127.0.0.1 when the Ray cluster is this machine, else on
``--ray-host-ip`` (default: this node's IP), which every node must reach.

The data set goes into the object store once, with the device registry (profile
columns and example indices), so only the driver needs the data files.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
import warnings
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import ray
import uvicorn
from threadpoolctl import threadpool_limits

from fedclient import InvalidInput, StepOutcome
from fedclient.privacy.noise import SeededNoiseWarning
from fedclient.protocol import JobPlan
from fedclient.server import FederationService, create_app
from fedclient.sim.config import SimulationConfig
from fedclient.sim.datasets import Dataset
from fedclient.sim.fleet import TOTALS, Checkin, Fleet, SimClock, SimServer, Work
from fedclient.sim.registry import DeviceRegistry

__all__ = ["ray_fleet"]

#: How long the cluster may take to place and start the actors (they import numpy,
#: fedclient and the data set before they answer).
READY_SECONDS = 120.0


@contextlib.asynccontextmanager
async def ray_fleet(
    config: SimulationConfig, plan: JobPlan, data: Dataset, service: FederationService | None
) -> AsyncIterator[Fleet]:
    """The fleet on Ray actors, for the duration of a run.

    ``service`` is the simulation's own server, served here over HTTP for the actors;
    None when ``config.server`` names a running one.
    """
    started = _connect(config)
    try:
        async with contextlib.AsyncExitStack() as stack:
            if service is not None:
                base_url = await stack.enter_async_context(
                    _serve(create_app(service, metrics=False), _host(config))
                )
            else:
                assert config.server is not None
                base_url = config.server.rstrip("/")
            fleet = _RayFleet(config, plan, data, SimServer(base_url, None), None)
            stack.push_async_callback(fleet.stop)
            await fleet.start(simulated=service is not None)
            yield fleet
    finally:
        if started:
            ray.shutdown()


def _connect(config: SimulationConfig) -> bool:
    """Connect to Ray unless this process already is; whether this call did (then the
    run disconnects, and stops the local instance it started).

    ``--ray-address`` defaults to ``local``, a new instance on this machine: Ray's
    own default would join whichever cluster was started here last."""
    if ray.is_initialized():
        return False
    address = config.ray_address or "local"
    try:
        ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING)
    except (ConnectionError, RuntimeError) as exc:  # unreachable, or another Ray version
        raise InvalidInput(f"cannot connect to the Ray cluster at {address}: {exc}") from None
    return True


def _host(config: SimulationConfig) -> str:
    """The address the simulation's server listens on, which every actor must reach."""
    if config.ray_host_ip:
        return config.ray_host_ip
    alive = [node for node in ray.nodes() if node["Alive"]]
    if len(alive) == 1 and not ray.util.client.ray.is_connected():
        return "127.0.0.1"  # the cluster is this machine
    return str(ray.util.get_node_ip_address())


class _Uvicorn(uvicorn.Server):
    """uvicorn inside the simulation's event loop: it says when it listens, and it
    leaves Ctrl-C to the simulation (which stops it on the way out)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.listening = asyncio.Event()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            self.listening.set()

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def _serve(app: Any, host: str) -> AsyncIterator[str]:
    """Serve ``app`` on ``host`` (a free port) in this event loop; yield its base URL."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP
    # (without it every response waits out a 40 ms delayed ACK).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, 0))
    except OSError as exc:
        sock.close()
        raise InvalidInput(
            f"cannot serve the simulation on {host} ({exc}); see --ray-host-ip"
        ) from None
    port = sock.getsockname()[1]
    server = _Uvicorn(
        uvicorn.Config(
            app,
            log_level="warning",
            log_config=None,  # fedsim's process: its logging is the user's, not uvicorn's
            access_log=False,
            # Answer with the in-process app's headers: the devices count the same bytes.
            server_header=False,
            date_header=False,
            timeout_graceful_shutdown=5,
        )
    )
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    listening = asyncio.create_task(server.listening.wait())
    try:
        await asyncio.wait({serving, listening}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if not server.listening.is_set():
            if serving.done():
                serving.result()  # its error, if it raised one
            raise RuntimeError(f"the simulation's server did not start on {host}:{port}")
        yield f"http://[{host}]:{port}" if family == socket.AF_INET6 else f"http://{host}:{port}"
    finally:
        listening.cancel()
        server.should_exit = True
        await asyncio.wait({serving})
        sock.close()


class _Pool(httpx.AsyncBaseTransport):
    """One connection pool for all of an actor's devices. A device's `Client` closes its
    transport when the device goes idle: that must not close the pool, nor cost a new
    one (an SSL context, ~30 ms) each time a device wakes up."""

    def __init__(self) -> None:
        self.http = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        return await self.http.handle_async_request(request)

    async def aclose(self) -> None:
        """Nothing: the actor closes the pool (`_Shard.close`)."""


class _Shard:
    """A Ray actor's devices (every one the driver routes here), over real HTTP."""

    def __init__(
        self,
        config: SimulationConfig,
        plan: JobPlan,
        data: Dataset,
        registry: DeviceRegistry,
        base_url: str,
        simulated: bool,
        number: int,
    ) -> None:
        # Device models are small: BLAS threads only contend (see fedclient.sim.cli).
        threadpool_limits(limits=1)
        # This actor's devices draw their privacy noise from the seed, knowingly.
        warnings.filterwarnings("ignore", category=SeededNoiseWarning)
        state_dir = None  # in memory, unless kept
        if config.state_dir:
            state_dir = Path(config.state_dir) / f"shard-{number:03d}"
            state_dir.mkdir(parents=True, exist_ok=True)
        # On the simulated clock the driver says what time it is with every call.
        self.pool = _Pool()
        server = SimServer(base_url, self.pool, SimClock() if simulated else time.time)
        self.fleet = Fleet(config, plan, data, server, state_dir, registry=registry)

    async def ready(self) -> str:
        """Answer once placed and built: the IP of the node this actor runs on."""
        return str(ray.util.get_node_ip_address())

    async def checkin(self, indices: list[int], round_number: int, now: float) -> list[Checkin]:
        return await self.fleet.checkin(indices, round_number, now)

    async def work(self, indices: list[int], now: float) -> list[Work]:
        return await self.fleet.work(indices, now)

    async def upload(self, index: int, now: float) -> tuple[StepOutcome | None, float]:
        return await self.fleet.upload(index, now)

    async def totals(self) -> dict[str, int]:
        return await self.fleet.totals()

    async def epsilon_spent(self, job: str, delta: float) -> list[float]:
        return self.fleet.epsilon_spent(job, delta)

    async def rest(self) -> None:
        await self.fleet.rest()

    async def close(self) -> None:
        await self.fleet.rest()
        self.fleet.close()
        await self.pool.http.aclose()


class _RayFleet(Fleet):
    """The driver's view of the fleet: the device registry (profiles, data sizes) and
    the evaluator come from `Fleet`; the devices' steps run on the actors."""

    actors: list[Any]  # handles of the `_Shard` actors
    ready = False  # every actor answered

    async def start(self, simulated: bool) -> None:
        """Place the actors (``--ray-actors``, default one per CPU) and wait for them."""
        if self.config.ray_actors is not None and self.config.ray_actors < 1:
            raise InvalidInput("--ray-actors needs at least 1")
        cpus = float(ray.cluster_resources().get("CPU", 1.0))
        count = min(self.config.ray_actors or max(1, int(cpus)), len(self))
        data, registry = ray.put(self.data), ray.put(self.registry)
        actor = ray.remote(_Shard).options(
            num_cpus=min(1.0, cpus / count), scheduling_strategy="SPREAD"
        )
        self.actors = [
            actor.remote(self.config, self.plan, data, registry, self.server.base_url, simulated, k)
            for k in range(count)
        ]
        try:
            await asyncio.wait_for(
                asyncio.gather(*(s.ready.remote() for s in self.actors)), READY_SECONDS
            )
        except TimeoutError:
            raise InvalidInput(
                f"the Ray cluster did not start {count} actors in {READY_SECONDS:.0f} s "
                f"({cpus:g} CPUs): try fewer --ray-actors, or see `ray status`"
            ) from None
        self.ready = True

    async def stop(self) -> None:
        """Close the actors' devices and their state files, then end the actors."""
        actors, self.actors = getattr(self, "actors", []), []
        try:
            if self.ready:  # (an actor never placed would never answer)
                await asyncio.gather(*(s.close.remote() for s in actors))
        finally:
            for s in actors:
                ray.kill(s)

    def _by_shard(self, indices: Sequence[int]) -> dict[int, list[int]]:
        groups: dict[int, list[int]] = {}
        for i in indices:
            groups.setdefault(i % len(self.actors), []).append(i)
        return groups

    async def checkin(self, indices: Sequence[int], round_number: int, now: float) -> list[Checkin]:
        # The driver sends a wave no larger than the places left, so checking in on
        # every actor at once admits the same devices as one by one.
        groups = self._by_shard(indices)
        batches = await asyncio.gather(
            *(self.actors[s].checkin.remote(g, round_number, now) for s, g in groups.items())
        )
        rank = {i: k for k, i in enumerate(indices)}
        return sorted((c for batch in batches for c in batch), key=lambda c: rank[c.device])

    async def work(self, indices: Sequence[int], now: float) -> list[Work]:
        groups = self._by_shard(indices)
        batches = await asyncio.gather(
            *(self.actors[s].work.remote(g, now) for s, g in groups.items())
        )
        done = {w.device: w for batch in batches for w in batch}
        return [done[i] for i in indices]

    async def upload(self, index: int, now: float) -> tuple[StepOutcome | None, float]:
        result: tuple[StepOutcome | None, float] = await self.actors[
            index % len(self.actors)
        ].upload.remote(index, now)
        return result

    async def totals(self) -> dict[str, int]:
        parts = await asyncio.gather(*(s.totals.remote() for s in self.actors))
        return {name: sum(p[name] for p in parts) for name in TOTALS}

    async def rest(self) -> None:
        await asyncio.gather(*(s.rest.remote() for s in self.actors))

    def epsilon_spent(self, job: str, delta: float) -> list[float]:
        # Each actor reads the ledgers of its own devices (the others read 0).
        # Blocking is fine here: answering needs nothing from this event loop.
        spent = ray.get([s.epsilon_spent.remote(job, delta) for s in self.actors])
        return [spent[i % len(self.actors)][i] for i in range(len(self))]
