"""The /api/v1/health routes: dependency health served from the health service's projection.

Answers come from the projection (`cached: true` with its age, as the service computed it
when asked) and are passed through unchanged; the gateway's edge keeps them like every read
(`gateway.response_cache`). `?fresh=true` has the service run a round of probes first
(requests arriving meanwhile share that round), so those requests wait up to the longest
probe timeout.

A round calls every dependency for real (OpenAI with the real key), so `?fresh=true` needs the
admin token, and even then one gateway starts at most one round per
STOCKPILOT_HEALTH_FRESH_INTERVAL_S: asks inside that window are answered from the round
started at its beginning (in flight, or done).
"""

from __future__ import annotations

import time
import weakref
from datetime import datetime
from typing import Annotated, Any

from litestar import Request, Response, Router, get
from litestar.params import QueryParameter

from gateway.auth import admin_guard, read_guard
from gateway.response_cache import CACHED
from gateway.services import ServiceClient, Services
from gateway.settings import GatewaySettings
from services.health.contract import (
    MAX_HOURS,
    ComponentAnswer,
    ComponentParams,
    ComprehensiveHealth,
    ExternalApisHealth,
    FreshParams,
    HealthHistory,
    HistoryParams,
)
from shared.clock import Clock
from shared.errors import ForbiddenError, UnauthorizedError

# A round is bounded by its longest probe timeout (at most 60 s, see HealthSettings).
FRESH_TIMEOUT_S = 65.0

Fresh = Annotated[
    bool,
    QueryParameter(
        description="Run a round of probes now instead of answering from the last round",
        required=False,
    ),
]


class _FreshWindow:
    """One gateway's fresh window: when its round was asked for (sent to the service as
    `requested_at`, which answers from any round started since) and its monotonic start."""

    def __init__(self) -> None:
        self.requested_at: datetime | None = None
        self.started = 0.0

    def since(self, interval_s: float, wall_now: datetime) -> datetime:
        """The `requested_at` for a fresh ask now: the open window's, or a new window's."""
        now = time.monotonic()
        if self.requested_at is None or now - self.started >= interval_s:
            self.requested_at = wall_now
            self.started = now
        return self.requested_at


# Per ServiceClient, that is per app: two apps in one process never share a window.
_windows: weakref.WeakKeyDictionary[ServiceClient, _FreshWindow] = weakref.WeakKeyDictionary()


async def _check_fresh_allowed(request: Request[Any, Any, Any]) -> None:
    """`?fresh=true` is for the admin token only (the read token is not enough): 403 otherwise."""
    try:
        await admin_guard(request, request.route_handler)
    except (UnauthorizedError, ForbiddenError):
        settings: GatewaySettings = request.app.state.settings
        how = (
            "send Authorization: Bearer <admin token>"
            if settings.admin_token
            else "set STOCKPILOT_ADMIN_TOKEN on the gateway to enable it"
        )
        raise ForbiddenError(
            "?fresh=true runs the probes against the real dependencies and needs the admin "
            f"token: {how}; without it the answer of the last scheduled round is served"
        ) from None


async def _ask(
    request: Request[Any, Any, Any],
    services: ServiceClient,
    endpoint: str,
    fresh: bool,
    name: str | None = None,
) -> Response[Any]:
    """The service's answer from its last round, or (`fresh`) from a round started in the
    fresh window; its bytes unchanged."""
    if not fresh:
        return await services.answer(
            "health", endpoint, None if name is None else ComponentParams(name=name)
        )
    await _check_fresh_allowed(request)
    settings: GatewaySettings = request.app.state.settings
    window = _windows.get(services)
    if window is None:
        window = _windows[services] = _FreshWindow()
    # Each ask still goes to the service as a command (never kept at the edge, so a fresh
    # answer can never reach someone without the admin token); the shared `requested_at` is
    # what makes the service run one round for all of them.
    clock: Clock = request.app.state.clock
    requested_at = window.since(settings.health_fresh_interval_s, clock.now())
    fresh_params: FreshParams | ComponentParams = (
        FreshParams(requested_at=requested_at)
        if name is None
        else ComponentParams(name=name, requested_at=requested_at)
    )
    return await services.answer(
        "health",
        f"{endpoint}_fresh",
        fresh_params,
        timeout=max(services.timeout, FRESH_TIMEOUT_S),
    )


@get(
    "/health/comprehensive",
    summary="Every dependency, the overall status and the host's metrics",
    guards=[read_guard],
    opt=CACHED,
)
async def comprehensive(
    request: Request[Any, Any, Any], services: Services, fresh: Fresh = False
) -> Response[ComprehensiveHealth]:
    """Overall: any unhealthy → unhealthy, else any degraded → degraded (unknown ignored)."""
    return await _ask(request, services, "comprehensive", fresh)


@get("/health/database", summary="PostgreSQL", guards=[read_guard], opt=CACHED)
async def database(
    request: Request[Any, Any, Any], services: Services, fresh: Fresh = False
) -> Response[ComponentAnswer]:
    """Connect, SELECT 1, server version, connections in use vs max_connections."""
    return await _ask(request, services, "component", fresh, "database")


@get("/health/openai", summary="OpenAI", guards=[read_guard], opt=CACHED)
async def openai(
    request: Request[Any, Any, Any], services: Services, fresh: Fresh = False
) -> Response[ComponentAnswer]:
    """GET {OPENAI_BASE_URL}/models with the key: the count of models, 401/429/5xx mapped."""
    return await _ask(request, services, "component", fresh, "openai")


@get("/health/redis", summary="Redis", guards=[read_guard], opt=CACHED)
async def redis(
    request: Request[Any, Any, Any], services: Services, fresh: Fresh = False
) -> Response[ComponentAnswer]:
    """PING latency, memory used vs maxmemory, connected clients, version."""
    return await _ask(request, services, "component", fresh, "redis")


@get(
    "/health/external-apis",
    summary="The external APIs of STOCKPILOT_EXTERNAL_APIS and their aggregate",
    guards=[read_guard],
    opt=CACHED,
)
async def external_apis(
    request: Request[Any, Any, Any], services: Services, fresh: Fresh = False
) -> Response[ExternalApisHealth]:
    """Healthy at >= 80 % reachable, degraded at >= 50 %, else unhealthy."""
    return await _ask(request, services, "external_apis", fresh)


@get(
    "/health/history",
    summary="Status points and uptime per component over the last hours",
    guards=[read_guard],
    opt=CACHED,
)
async def history(
    services: Services,
    component: Annotated[
        str | None, QueryParameter(description="One component id; all when absent", required=False)
    ] = None,
    hours: Annotated[
        int,
        QueryParameter(ge=1, le=MAX_HOURS, description="Window in hours (1–2160)", required=False),
    ] = 24,
) -> Response[HealthHistory]:
    """Raw results up to 24 h, hourly buckets beyond; points bounded per component."""
    return await services.answer(
        "health", "history", HistoryParams(component=component, hours=hours)
    )


router = Router(
    path="/api/v1",
    route_handlers=[comprehensive, database, openai, redis, external_apis, history],
)
