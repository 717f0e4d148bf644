"""The /api/v1/health routes: dependency health served from the health service's projection.

Answers come from the projection (`cached: true` with its age); `?fresh=true` has the service
run a round of probes first (requests arriving meanwhile share that round), so those requests
wait up to the longest probe timeout.
"""

from __future__ import annotations

from typing import Annotated, TypeVar

from litestar import Router, get
from litestar.params import QueryParameter

from gateway.auth import read_guard
from gateway.services import ServiceClient, Services
from services.health.history import MAX_HOURS, HealthHistory, HistoryParams
from services.health.queries import (
    ComponentAnswer,
    ComponentParams,
    ComprehensiveHealth,
    ExternalApisHealth,
    FreshParams,
)
from shared.events import utc_now

T = TypeVar("T")

# A round is bounded by its longest probe timeout (at most 60 s, see HealthSettings).
FRESH_TIMEOUT_S = 65.0

Fresh = Annotated[
    bool,
    QueryParameter(
        description="Run a round of probes now instead of answering from the last round",
        required=False,
    ),
]


async def _ask(
    services: ServiceClient, endpoint: str, answer: type[T], fresh: bool, name: str | None = None
) -> T:
    """The cached answer, or (`fresh`) the answer after a round started now."""
    if not fresh:
        params = None if name is None else ComponentParams(name=name)
        return await services.query("health", endpoint, answer, params)
    requested_at = utc_now()
    fresh_params: FreshParams | ComponentParams = (
        FreshParams(requested_at=requested_at)
        if name is None
        else ComponentParams(name=name, requested_at=requested_at)
    )
    return await services.query(
        "health",
        f"{endpoint}_fresh",
        answer,
        fresh_params,
        timeout=max(services.timeout, FRESH_TIMEOUT_S),
    )


@get(
    "/health/comprehensive",
    summary="Every dependency, the overall status and the host's metrics",
    guards=[read_guard],
)
async def comprehensive(services: Services, fresh: Fresh = False) -> ComprehensiveHealth:
    """Overall: any unhealthy → unhealthy, else any degraded → degraded (unknown ignored)."""
    return await _ask(services, "comprehensive", ComprehensiveHealth, fresh)


@get("/health/database", summary="PostgreSQL", guards=[read_guard])
async def database(services: Services, fresh: Fresh = False) -> ComponentAnswer:
    """Connect, SELECT 1, server version, connections in use vs max_connections."""
    return await _ask(services, "component", ComponentAnswer, fresh, "database")


@get("/health/openai", summary="OpenAI", guards=[read_guard])
async def openai(services: Services, fresh: Fresh = False) -> ComponentAnswer:
    """GET {OPENAI_BASE_URL}/models with the key: the count of models, 401/429/5xx mapped."""
    return await _ask(services, "component", ComponentAnswer, fresh, "openai")


@get("/health/redis", summary="Redis", guards=[read_guard])
async def redis(services: Services, fresh: Fresh = False) -> ComponentAnswer:
    """PING latency, memory used vs maxmemory, connected clients, version."""
    return await _ask(services, "component", ComponentAnswer, fresh, "redis")


@get(
    "/health/external-apis",
    summary="The external APIs of STOCKPILOT_EXTERNAL_APIS and their aggregate",
    guards=[read_guard],
)
async def external_apis(services: Services, fresh: Fresh = False) -> ExternalApisHealth:
    """Healthy at >= 80 % reachable, degraded at >= 50 %, else unhealthy."""
    return await _ask(services, "external_apis", ExternalApisHealth, fresh)


@get(
    "/health/history",
    summary="Status points and uptime per component over the last hours",
    guards=[read_guard],
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
) -> HealthHistory:
    """Raw results up to 24 h, hourly buckets beyond; points bounded per component."""
    return await services.query(
        "health",
        "history",
        HealthHistory,
        HistoryParams(component=component, hours=hours),
    )


router = Router(
    path="/api/v1",
    route_handlers=[comprehensive, database, openai, redis, external_apis, history],
)
