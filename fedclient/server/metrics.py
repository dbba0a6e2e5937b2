"""Prometheus metrics of one server: requests, latency, rounds, updates, enrolments, refusals.

`Metrics` holds its own registry (several apps in one process, as in the tests, do
not share counters), served as Prometheus text at ``/metrics`` by `create_app`.
`RequestMetrics` is the ASGI middleware that counts every request by route
template (``/v1/rounds/{round_id}/updates``, never the raw path: ids would make
a series per round) and status, and times it.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["CONTENT_TYPE", "Metrics", "RequestMetrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """The server's counters and histograms, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "fedserver_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.latency = Histogram(
            "fedserver_request_seconds",
            "Time to answer a request, by route",
            ["route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0),
            registry=r,
        )
        self.rounds = Counter(
            "fedserver_rounds", "Rounds ended, by job and outcome", ["job", "outcome"], registry=r
        )
        self.updates = Counter("fedserver_updates", "Updates accepted, by job", ["job"], registry=r)
        self.enrolments = Counter("fedserver_enrolments", "Devices enrolled", registry=r)
        self.refusals = Counter(
            "fedserver_refusals", "Requests refused (4xx), by error code", ["code"], registry=r
        )

    def text(self) -> bytes:
        """Everything, in the Prometheus text format."""
        return generate_latest(self.registry)


class RequestMetrics:
    """ASGI middleware: count and time every HTTP request by route template and status."""

    def __init__(self, app: ASGIApp, metrics: Metrics, routes: list[Route]) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes

    def _template(self, scope: Scope) -> str:
        for route in self.routes:
            match, _ = route.matches(scope)
            if match != Match.NONE:
                return route.path
        return "other"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status: dict[str, Any] = {"code": 500}

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = self._template(scope)
            self.metrics.requests.labels(route, str(status["code"])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)
