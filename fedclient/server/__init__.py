"""The fedclient reference server: an ASGI app over a SQLite store.

service = FederationService(ServerStore("server.sqlite"))
service.add_job(load_plan("plan.toml"))
app = create_app(service, tick_seconds=1.0)      # serve with uvicorn
"""

import typing as _typing

from fedclient.server.plan import load_plan, plan_from_dict
from fedclient.server.service import FederationService
from fedclient.server.store import ServerStore
from fedclient.server.strategies import (
    ClientUpdate,
    FedAvg,
    MeanStrategy,
    Strategy,
    strategy_for,
)

if _typing.TYPE_CHECKING:
    from fedclient.server.app import create_app

__all__ = [
    "ClientUpdate",
    "FedAvg",
    "FederationService",
    "MeanStrategy",
    "ServerStore",
    "Strategy",
    "create_app",
    "load_plan",
    "plan_from_dict",
    "strategy_for",
]


def __getattr__(name: str) -> _typing.Any:
    # The app needs starlette (the server extra): `fedserver` on a core install must be
    # able to say so in one line, which it cannot if importing this package fails first.
    if name == "create_app":
        from fedclient.server.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
