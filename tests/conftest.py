"""Shared fixtures: data, an in-process server, and a helper that wires N devices to it."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import fedclient
from fedclient.server import FederationService, ServerStore, create_app, plan_from_dict
from fedclient.sim.datasets import Dataset, load_dataset
from tests.postgres import PostgresCluster, find_binaries

SHARED_DATA = Path(os.environ.get("FEDCLIENT_DATA", Path(__file__).parents[2] / "shared/data"))


@pytest.fixture(autouse=True, scope="session")
def _data_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """fedsim's decompressed-data cache in a folder of the session's own, not ~/.cache
    (subprocesses inherit it)."""
    before = os.environ.get("FEDSIM_CACHE_DIR")
    os.environ["FEDSIM_CACHE_DIR"] = str(tmp_path_factory.mktemp("fedsim-cache"))
    yield
    if before is None:
        del os.environ["FEDSIM_CACHE_DIR"]
    else:
        os.environ["FEDSIM_CACHE_DIR"] = before


class ManualClock:
    """A clock tests move by hand, so deadlines pass without sleeping."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def step_until(device: fedclient.Client, phase: fedclient.Phase) -> None:
    """Step ``device`` until its stored phase is ``phase`` (whether the model came with
    the admission or took a step of its own)."""
    for _ in range(8):
        if device.device_state.progress(device.job).phase is phase:
            return
        await device.astep()
    raise AssertionError(f"never reached {phase}")


def make_plan(**job: Any) -> fedclient.protocol.JobPlan:
    """A small digits plan; keyword arguments override the [job] table."""
    settings = {
        "name": "digits",
        "rounds": 3,
        "devices_per_round": 2,
        "min_devices": 1,
        "over_selection": 1.5,
        "deadline_seconds": 60.0,
        "seed": 7,
    }
    settings.update(job)
    return plan_from_dict(
        {
            "job": settings,
            "model": {"kind": "mlp", "inputs": 64, "hidden": [16], "classes": 10},
            "train": {"epochs": 1, "batch_size": 8, "learning_rate": 0.1},
        }
    )


@dataclass
class Server:
    """One in-process reference server."""

    service: FederationService
    clock: ManualClock

    @property
    def store(self) -> ServerStore:
        return self.service.store

    def app(self) -> Any:
        return create_app(self.service)

    def app_with(self, **options: Any) -> Any:
        """The app with `create_app` options (rate limits, ...)."""
        return create_app(self.service, **options)

    def http(self) -> httpx.AsyncClient:
        """An HTTP client on the real ASGI app, in-process."""
        return httpx.AsyncClient(transport=self.transport(), base_url="http://fedserver.local")

    def transport(self) -> httpx.ASGITransport:
        return httpx.ASGITransport(app=self.app())


@pytest.fixture(scope="session")
def digits() -> Dataset:
    return load_dataset("digits", seed=0)


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster | None]:
    """A throwaway PostgreSQL server, or None where Debian's postgresql is not installed."""
    bin_dir = find_binaries()
    try:
        import psycopg  # noqa: F401
    except ImportError:
        bin_dir = None
    if bin_dir is None:
        yield None
        return
    cluster = PostgresCluster(bin_dir, max_connections=300)
    yield cluster
    cluster.stop()


@pytest.fixture
def engine() -> str:
    """The database engine a test's server stores in (tests/server runs both)."""
    return "sqlite"


@pytest.fixture
def db_url(
    engine: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., str]]:
    """``db_url(name=None)``: where a test's server stores, in the test's engine. The same
    name is the same database (a restarted server); no name, a new one (SQLite: in
    memory)."""
    made: dict[str, str] = {}
    cluster: PostgresCluster | None = None
    if engine == "postgresql":
        cluster = request.getfixturevalue("postgres")
        if cluster is None:
            pytest.skip("PostgreSQL is not installed (apt-get install postgresql; .ci/run does)")

    def url(name: str | None = None) -> str:
        if cluster is None:
            return str(tmp_path / f"{name}.sqlite") if name else ":memory:"
        key = name or f"anonymous-{len(made)}"
        if key not in made:
            made[key] = cluster.database()
        return made[key]

    yield url
    if cluster is not None:
        cluster.drop([made_url.rsplit("/", 1)[1].split("?")[0] for made_url in made.values()])


@pytest.fixture
def make_server(db_url: Callable[..., str]) -> Callable[..., Server]:
    def factory(
        db: str | Path | None = None, service_options: dict[str, Any] | None = None, **job: Any
    ) -> Server:
        """``service_options``: `FederationService` keyword arguments (admin token, ...)."""
        clock = ManualClock()
        store = ServerStore(db_url() if db is None else db)
        service = FederationService(store, clock=clock, **(service_options or {}))
        service.add_job(make_plan(**job))
        return Server(service, clock)

    return factory


@pytest.fixture
def server(make_server: Callable[..., Server]) -> Server:
    return make_server()


@pytest.fixture
def make_devices(digits: Dataset) -> Callable[..., list[fedclient.Client]]:
    """N clients on disjoint slices of digits, all talking to ``transport``."""

    def factory(
        n: int,
        transport: Any,
        *,
        base: str = "http://fedserver.local",
        job: str = "digits",
        clock: Callable[[], float] | None = None,
        per_device: dict[str, Callable[[int], Any]] | None = None,
        **kwargs: Any,
    ) -> list[fedclient.Client]:
        """``transport`` may be a list (one per device); ``per_device`` maps a Client
        argument to a function of the device index."""
        parts = np.array_split(np.arange(len(digits.y_train)), n)
        return [
            fedclient.Client(
                base,
                job,
                (digits.x_train[p], digits.y_train[p]),
                transport=transport[i] if isinstance(transport, list) else transport,
                seed=i,
                **({"clock": clock} if clock else {}),
                **{k: f(i) for k, f in (per_device or {}).items()},
                **kwargs,
            )
            for i, p in enumerate(parts)
        ]

    return factory


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def enrolled(server: Server) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, str]]]:
    """An HTTP client and the auth header of one enrolled device."""
    async with server.http() as http:
        yield http, await enrol(http)


async def enrol(http: httpx.AsyncClient) -> dict[str, str]:
    """Enrol a device; its auth header."""
    token = (await http.post("/v1/devices", json={"label": "test"})).json()["token"]
    return {"Authorization": f"Bearer {token}"}


@dataclass
class LiveServer:
    """The reference server under uvicorn on a free loopback port, in a thread."""

    server: Server
    url: str


@pytest.fixture
def live_server(make_server: Callable[..., Server]) -> Iterator[Callable[..., LiveServer]]:
    import threading

    import uvicorn

    running: list[tuple[uvicorn.Server, threading.Thread]] = []

    def start(*, tls: tuple[Path, Path] | None = None, **job: Any) -> LiveServer:
        """``tls``: (certificate, key) PEM files: serve HTTPS."""
        server = make_server(**job)
        config = uvicorn.Config(
            server.app(),
            host="127.0.0.1",
            port=0,
            log_level="warning",
            # uvicorn's dictConfig would close every handler logging knows, whoever
            # made it (absl's, once dp_accounting is imported, holds pytest's capture).
            log_config=None,
            lifespan="on",
            ssl_certfile=str(tls[0]) if tls else None,
            ssl_keyfile=str(tls[1]) if tls else None,
        )
        uv = uvicorn.Server(config)
        thread = threading.Thread(target=uv.run, daemon=True)
        thread.start()
        running.append((uv, thread))
        while not uv.started:  # uvicorn sets this once its socket listens
            if not thread.is_alive():
                raise RuntimeError("uvicorn failed to start")
            threading.Event().wait(0.01)
        port = uv.servers[0].sockets[0].getsockname()[1]
        return LiveServer(server, f"{'https' if tls else 'http'}://127.0.0.1:{port}")

    yield start
    for uv, thread in running:
        uv.should_exit = True
        thread.join(timeout=10)
