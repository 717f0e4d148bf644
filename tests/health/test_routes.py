"""The health routes on their own: declared without anything Litestar deprecates."""

from __future__ import annotations

import warnings

from litestar import Litestar
from litestar.di import Provide

from gateway.routes import health
from gateway.services import ServiceClient


def test_health_router_builds_without_deprecation_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        app = Litestar(
            route_handlers=[health.router],
            dependencies={"services": Provide(lambda: ServiceClient(1.0), sync_to_thread=False)},
        )
    paths = {route.path for route in app.routes}
    assert paths >= {
        "/api/v1/health/comprehensive",
        "/api/v1/health/database",
        "/api/v1/health/openai",
        "/api/v1/health/redis",
        "/api/v1/health/external-apis",
        "/api/v1/health/history",
    }
