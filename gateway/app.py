"""The gateway: `create_app(settings) -> Litestar`, serving the dashboard REST API under /api/v1.

NATS opens in the lifespan and reaches handlers through dependency injection (`services`).
Errors are mapped to HTTP in one place (`gateway.errors`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import cast

from litestar import Litestar
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.types import ASGIApp

from gateway.alert_fanout import AlertFanout
from gateway.errors import exception_handlers
from gateway.openapi import describe_inputs, document_errors, document_security
from gateway.request_metrics import RequestMetrics
from gateway.response_cache import ResponseCache
from gateway.routes import all_routers
from gateway.services import ServiceClient
from gateway.settings import GatewaySettings
from shared import connection
from shared.clock import SYSTEM_CLOCK, Clock
from shared.service_status import VERSION
from shared.streams import STREAMS, provision_or_check

log = logging.getLogger("stockpilot.gateway")


def app_from_environment() -> Litestar:
    """The app for settings from the environment: what each uvicorn worker process builds."""
    from shared.logs import configure_logging
    from shared.settings import settings_or_exit

    settings = settings_or_exit(GatewaySettings)
    configure_logging("gateway", settings.log_level)
    return create_app(settings)


def create_app(settings: GatewaySettings, clock: Clock = SYSTEM_CLOCK) -> Litestar:
    """Build the gateway application for these settings; `clock` tells every route's "now"."""

    services = ServiceClient(settings.service_timeout_s, cache_ttl_s=settings.cache_ttl_s)
    alert_fanout = AlertFanout(settings.sse_max_clients, settings.sse_client_buffer_bytes)

    @contextlib.asynccontextmanager
    async def nats_connection(app: Litestar) -> AsyncIterator[None]:
        # Connect in the background: the gateway serves (503 on NATS-backed routes) while
        # NATS is unreachable at start, instead of not listening at all.
        async def reconnected() -> None:
            services.forget_all()  # change notices may have been missed while away

        async def connect() -> None:
            nc = await connection.connect(
                settings, "stockpilot-gateway", on_reconnected=reconnected
            )
            services.nc = nc
            await services.watch_changes()
            with contextlib.suppress(Exception):
                await provision_or_check(nc.jetstream(), settings, (STREAMS["alerts"].name,))

        task = asyncio.create_task(connect())
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            await alert_fanout.close()  # ends the SSE streams, deletes their consumer
            if services.nc is not None:
                await connection.drain_or_close(services.nc)

    def provide_services() -> ServiceClient:
        return services

    def provide_clock() -> Clock:
        return clock

    app = Litestar(
        route_handlers=all_routers(),
        lifespan=[nats_connection],
        dependencies={
            "services": Provide(provide_services, sync_to_thread=False),
            "clock": Provide(provide_clock, sync_to_thread=False),
        },
        exception_handlers=exception_handlers(),
        request_max_body_size=settings.max_body_bytes,
        # Litestar's default logging config replaces the root handler with its own, which
        # neither redacts secrets nor escapes control characters: keep shared.logs' handler
        # (unhandled errors are logged by gateway.errors).
        logging_config=None,
        openapi_config=OpenAPIConfig(
            title="StockPilot Ops API",
            version=VERSION,
            description=(
                "Operations backend of StockPilot AI: dependency health, LLM usage and cost, "
                "batch jobs and job locks."
            ),
            path="/schema",
            render_plugins=[SwaggerRenderPlugin()],
        ),
    )
    document_errors(app.openapi_schema)
    describe_inputs(app.openapi_schema)
    document_security(app)
    # Outside the router, inside Litestar's __call__ (so lifespan, state and the test client
    # are Litestar's own): every request is counted, and kept answers skip the framework.
    front = RequestMetrics(ResponseCache(app.asgi_handler, services, settings))
    app.asgi_handler = cast("ASGIApp", front)  # plain ASGI dicts, see gateway.asgi
    app.state.settings = settings
    app.state.services = services
    app.state.clock = clock
    app.state.alert_fanout = alert_fanout
    app.state.started = time.monotonic()
    return app
