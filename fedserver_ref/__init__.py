"""The fedclient reference server: an ASGI app over a SQLite store.

service = FederationService(ServerStore("server.sqlite"))
service.add_job(load_plan("plan.toml"))
app = create_app(service, tick_seconds=1.0)      # serve with uvicorn
"""

from fedserver_ref.app import create_app
from fedserver_ref.plan import load_plan, plan_from_dict
from fedserver_ref.service import FederationService
from fedserver_ref.store import ServerStore
from fedserver_ref.strategies import ClientUpdate, FedAvg, Strategy, strategy_for

__all__ = [
    "ClientUpdate",
    "FedAvg",
    "FederationService",
    "ServerStore",
    "Strategy",
    "create_app",
    "load_plan",
    "plan_from_dict",
    "strategy_for",
]
