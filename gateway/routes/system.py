"""Gateway-level routes: its own health, liveness/readiness, and the all-in-one status."""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

import msgspec
from litestar import Request, Response, Router, get
from litestar.status_codes import HTTP_200_OK, HTTP_503_SERVICE_UNAVAILABLE

from gateway.auth import read_guard
from gateway.services import Services
from shared.errors import StockpilotError
from shared.events import AwareDatetime, utc_now
from shared.runtime import VERSION, ServiceStatus

SERVICES = ("health", "usage", "batch")
# /status and /ready must answer quickly even when a service hangs: a shorter timeout.
PROBE_TIMEOUT_S = 1.0


class GatewayHealth(msgspec.Struct, kw_only=True):
    """The gateway process and its NATS connection."""

    status: Literal["healthy", "unhealthy"]
    version: str
    uptime_s: float
    timestamp: AwareDatetime
    nats_connected: bool


class Liveness(msgspec.Struct, kw_only=True):
    """The process answers."""

    status: Literal["alive"]
    timestamp: AwareDatetime


class Readiness(msgspec.Struct, kw_only=True):
    """Whether the gateway can serve: NATS and every service answering and caught up."""

    ready: bool
    nats_connected: bool
    services: dict[str, str]
    timestamp: AwareDatetime


class ServiceState(msgspec.Struct, kw_only=True):
    """One service as seen from the gateway."""

    status: Literal["up", "catching_up", "unavailable"]
    detail: str | None = None
    lag: int | None = None
    rss_mb: float | None = None
    cpu_percent: float | None = None
    uptime_s: float | None = None


class HealthSummary(msgspec.Struct, kw_only=True):
    """The health service's `summary` answer."""

    status: str
    components: dict[str, str]


class UsageToday(msgspec.Struct, kw_only=True):
    """Today's LLM usage at a glance."""

    requests: int
    cost_usd: float
    error_rate: float
    budget_used_pct: float | None


class UsageSummary(msgspec.Struct, kw_only=True):
    """The usage service's `summary` answer."""

    today: UsageToday
    alerts_24h: int


class BatchSummary(msgspec.Struct, kw_only=True):
    """The batch service's `summary` answer."""

    running: int
    failed_24h: int
    expired_locks: int


class SystemStatus(msgspec.Struct, kw_only=True):
    """Everything an operator needs at a glance."""

    status: Literal["healthy", "degraded", "unhealthy"]
    timestamp: AwareDatetime
    services: dict[str, ServiceState]
    components: dict[str, str]
    usage_today: UsageToday | None
    batch: BatchSummary | None
    alerts_24h: int | None


def _gateway_health(request: Request[Any, Any, Any], services: Services) -> GatewayHealth:
    connected = services.connected
    return GatewayHealth(
        status="healthy" if connected else "unhealthy",
        version=VERSION,
        uptime_s=round(time.monotonic() - request.app.state.started, 3),
        timestamp=utc_now(),
        nats_connected=connected,
    )


@get("/health", summary="Gateway health (503 when NATS cannot be reached)", guards=[read_guard])
async def gateway_health(
    request: Request[Any, Any, Any], services: Services
) -> Response[GatewayHealth]:
    """The gateway itself: 200 with NATS reachable, 503 otherwise."""
    body = _gateway_health(request, services)
    code = HTTP_200_OK if body.nats_connected else HTTP_503_SERVICE_UNAVAILABLE
    return Response(body, status_code=code)


@get("/health/live", summary="Liveness for orchestrators (the process answers)")
async def live() -> Liveness:
    """Always 200 while the process runs."""
    return Liveness(status="alive", timestamp=utc_now())


async def _service_states(services: Services) -> dict[str, ServiceState]:
    async def one(name: str) -> ServiceState:
        try:
            status = await services.query(name, "status", ServiceStatus, timeout=PROBE_TIMEOUT_S)
        except StockpilotError as exc:
            return ServiceState(status="unavailable", detail=exc.detail)
        return ServiceState(
            status="up" if status.ready else "catching_up",
            lag=sum(p.lag for p in status.projections),
            rss_mb=status.process.rss_mb,
            cpu_percent=status.process.cpu_percent,
            uptime_s=status.uptime_s,
        )

    states = await asyncio.gather(*(one(name) for name in SERVICES))
    return dict(zip(SERVICES, states, strict=True))


@get("/health/ready", summary="Readiness: NATS and all three services answering")
async def ready(services: Services) -> Response[Readiness]:
    """200 when NATS is connected and every service answers caught up; 503 otherwise."""
    states = (
        await _service_states(services)
        if services.connected
        else {
            name: ServiceState(status="unavailable", detail="NATS is unavailable")
            for name in SERVICES
        }
    )
    is_ready = services.connected and all(s.status == "up" for s in states.values())
    body = Readiness(
        ready=is_ready,
        nats_connected=services.connected,
        services={name: s.status for name, s in states.items()},
        timestamp=utc_now(),
    )
    return Response(body, status_code=HTTP_200_OK if is_ready else HTTP_503_SERVICE_UNAVAILABLE)


async def _optional(coro: Any) -> Any:
    try:
        return await coro
    except StockpilotError:
        return None


@get(
    "/status",
    summary="Everything at a glance: services, components, usage, batch, alerts",
    guards=[read_guard],
)
async def system_status(services: Services) -> SystemStatus:
    """Never hangs: a service that does not answer shows as `unavailable`."""
    states, health, usage, batch = await asyncio.gather(
        _service_states(services),
        _optional(services.query("health", "summary", HealthSummary, timeout=PROBE_TIMEOUT_S)),
        _optional(services.query("usage", "summary", UsageSummary, timeout=PROBE_TIMEOUT_S)),
        _optional(services.query("batch", "summary", BatchSummary, timeout=PROBE_TIMEOUT_S)),
    )
    overall: Literal["healthy", "degraded", "unhealthy"] = "healthy"
    if health is not None and health.status in ("degraded", "unhealthy"):
        overall = health.status
    if any(s.status == "unavailable" for s in states.values()):
        overall = (
            "unhealthy"
            if all(s.status == "unavailable" for s in states.values())
            else ("degraded" if overall == "healthy" else overall)
        )
    if not services.connected:
        overall = "unhealthy"
    return SystemStatus(
        status=overall,
        timestamp=utc_now(),
        services=states,
        components=health.components if health is not None else {},
        usage_today=usage.today if usage is not None else None,
        batch=batch,
        alerts_24h=usage.alerts_24h if usage is not None else None,
    )


router = Router(path="/api/v1", route_handlers=[gateway_health, live, ready, system_status])
