"""Gateway-level routes: its own health, liveness/readiness, and the all-in-one status.

Why one module of over 300 lines: it is the route module of one area, the gateway's own state
(health, liveness, readiness, the all-in-one status); readiness and the status ask the same
questions (are the services up, does the usage stream accept writes), so they share helpers.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any, Literal

import msgspec
from litestar import Request, Response, Router, get
from litestar.status_codes import HTTP_200_OK, HTTP_503_SERVICE_UNAVAILABLE
from nats.js import api as js_api
from nats.js.errors import NotFoundError as JsNotFoundError

from gateway.auth import read_guard
from gateway.response_cache import CACHED
from gateway.services import GatewayClock, ServiceClient, Services
from gateway.status_areas import (
    Area,
    AreaStatus,
    HookState,
    Observed,
    Reason,
    ServiceState,
    judge,
)
from services.batch.contract import BatchSummary
from services.health.contract import HealthSummary
from services.usage.contract import UsageSummary, UsageToday
from shared.errors import StockpilotError, UnavailableError
from shared.events import AwareDatetime
from shared.hook_status import hooks_process_state, read_hooks_status
from shared.nats_errors import NATS_ERRORS
from shared.service_status import VERSION, ServiceStatus
from shared.streams import STREAMS

SERVICES = ("health", "usage", "batch")
# /status and /ready must answer quickly even when a service hangs: a shorter timeout.
PROBE_TIMEOUT_S = 1.0
USAGE_STREAM = STREAMS["usage"].name
# A stream (or account) with less room than this left cannot take a usage event.
EVENT_ROOM_BYTES = 1024


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
    """Whether the gateway can serve: NATS and every service answering and caught up, and
    the usage stream taking writes."""

    ready: bool
    nats_connected: bool
    services: dict[str, str]
    timestamp: AwareDatetime
    # Why it is not ready, when a stream refuses writes.
    detail: str | None = None


class StreamWrites(msgspec.Struct, kw_only=True):
    """Whether a stream takes writes: `accepting` null when it could not be checked."""

    stream: str
    accepting: bool | None
    detail: str | None = None


class SystemStatus(msgspec.Struct, kw_only=True):
    """Everything an operator needs at a glance."""

    # The worst of `areas`: never healthy while one is degraded or unhealthy; unknown when
    # nothing is known of the dependencies (see gateway.status_areas).
    status: AreaStatus
    timestamp: AwareDatetime
    services: dict[str, ServiceState]
    components: dict[str, str]
    usage_today: UsageToday | None
    batch: BatchSummary | None
    alerts_24h: int | None
    # The alert hooks; `hooks_process` is `unavailable` when its status is stale or missing.
    hooks_process: Literal["up", "unavailable", "not_configured"] = "not_configured"
    hooks: list[HookState] = msgspec.field(default_factory=list)
    # STOCKPILOT_USAGE refusing writes (full, sealed, JetStream out of storage) is unhealthy:
    # every LLM call then waits in its producer's spool or is lost.
    usage_stream: StreamWrites | None = None
    # dependencies, llm_spend, llm_errors, batch, locks, services, alert_hooks
    areas: dict[str, Area] = msgspec.field(default_factory=dict)
    # One per problem, worst first: every area that is not healthy has at least one.
    reasons: list[Reason] = msgspec.field(default_factory=list)


def _gateway_health(
    request: Request[Any, Any, Any], services: Services, clock: GatewayClock
) -> GatewayHealth:
    connected = services.connected
    return GatewayHealth(
        status="healthy" if connected else "unhealthy",
        version=VERSION,
        uptime_s=round(time.monotonic() - request.app.state.started, 3),
        timestamp=clock.now(),
        nats_connected=connected,
    )


@get("/health", summary="Gateway health (503 when NATS cannot be reached)", guards=[read_guard])
async def gateway_health(
    request: Request[Any, Any, Any], services: Services, clock: GatewayClock
) -> Response[GatewayHealth]:
    """The gateway itself: 200 with NATS reachable, 503 otherwise."""
    body = _gateway_health(request, services, clock)
    code = HTTP_200_OK if body.nats_connected else HTTP_503_SERVICE_UNAVAILABLE
    return Response(body, status_code=code)


@get("/health/live", summary="Liveness for orchestrators (the process answers)")
async def live(clock: GatewayClock) -> Liveness:
    """Always 200 while the process runs."""
    return Liveness(status="alive", timestamp=clock.now())


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
            transports={
                **{p.name: p.transport for p in status.projections if p.transport},
                **(status.publishers or {}),
            }
            or None,
        )

    states = await asyncio.gather(*(one(name) for name in SERVICES))
    return dict(zip(SERVICES, states, strict=True))


def stream_refusal(
    name: str,
    config: js_api.StreamConfig,
    state: js_api.StreamState,
    account: js_api.AccountInfo | None = None,
) -> str | None:
    """Why a stream refuses new events, judged from its info (and its account's), or None."""
    if config.sealed:
        return f"stream {name} is sealed: it refuses every write"
    if config.discard == js_api.DiscardPolicy.NEW:
        if config.max_bytes and config.max_bytes > 0:
            if state.bytes + EVENT_ROOM_BYTES > config.max_bytes:
                return (
                    f"stream {name} is full: {state.bytes} of its max_bytes {config.max_bytes}, "
                    "and it refuses new events (discard new); raise max_bytes or free space"
                )
        if config.max_msgs and 0 < config.max_msgs <= state.messages:
            return (
                f"stream {name} is full: {state.messages} of its max_msgs {config.max_msgs}, "
                "and it refuses new events (discard new); raise max_msgs"
            )
    if account is not None and account.limits.max_storage is not None:
        max_storage = account.limits.max_storage
        if 0 < max_storage < account.storage + EVENT_ROOM_BYTES:
            return (
                f"stream {name} cannot grow: its JetStream account has used {account.storage} "
                f"of its {max_storage} bytes of file storage"
            )
    return None


async def _usage_stream_writes(services: ServiceClient) -> StreamWrites:
    """Whether STOCKPILOT_USAGE takes writes, from its stream and account info."""
    if services.nc is None or not services.nc.is_connected:
        return StreamWrites(stream=USAGE_STREAM, accepting=None, detail="NATS is unavailable")
    js = services.nc.jetstream()
    try:
        info, account = await asyncio.wait_for(
            asyncio.gather(js.stream_info(USAGE_STREAM), js.account_info()), PROBE_TIMEOUT_S
        )
    except TimeoutError:
        # Not an answer about the stream (a slow server, or no permission to ask).
        return StreamWrites(
            stream=USAGE_STREAM, accepting=None, detail="its stream info was not answered in time"
        )
    except JsNotFoundError:
        detail = f"stream {USAGE_STREAM} does not exist (the usage service creates it at start)"
        return StreamWrites(stream=USAGE_STREAM, accepting=False, detail=detail)
    except NATS_ERRORS as exc:
        # JetStream that answers with an error, or not at all (a full disk disables it).
        detail = f"JetStream does not describe stream {USAGE_STREAM} ({exc}): it takes no writes"
        return StreamWrites(stream=USAGE_STREAM, accepting=False, detail=detail)
    refusal = stream_refusal(USAGE_STREAM, info.config, info.state, account)
    return StreamWrites(stream=USAGE_STREAM, accepting=refusal is None, detail=refusal)


@get("/health/ready", summary="Readiness: NATS and all three services answering")
async def ready(services: Services, clock: GatewayClock) -> Response[Readiness]:
    """200 when NATS is connected, every service answers caught up and the usage stream
    takes writes; 503 otherwise."""
    if services.connected:
        states, usage_stream = await asyncio.gather(
            _service_states(services), _usage_stream_writes(services)
        )
    else:
        states = {
            name: ServiceState(status="unavailable", detail="NATS is unavailable")
            for name in SERVICES
        }
        usage_stream = StreamWrites(stream=USAGE_STREAM, accepting=None)
    refusing = usage_stream.accepting is False
    is_ready = (
        services.connected and all(s.status == "up" for s in states.values()) and not refusing
    )
    body = Readiness(
        ready=is_ready,
        nats_connected=services.connected,
        services={name: s.status for name, s in states.items()},
        timestamp=clock.now(),
        detail=usage_stream.detail if refusing else None,
    )
    return Response(body, status_code=HTTP_200_OK if is_ready else HTTP_503_SERVICE_UNAVAILABLE)


# A state bucket that does not answer in time or answers with a NATS error.
_UNREADABLE: tuple[type[Exception], ...] = (TimeoutError, *NATS_ERRORS)


async def _hooks(services: ServiceClient, now: datetime) -> tuple[str, list[HookState]]:
    """The hook process's last published status (KV): not `up` once stopped, failed or stale.

    Read on every build of /status: the edge keeps the whole answer (gateway.response_cache).
    """
    if services.nc is None or not services.nc.is_connected:
        raise UnavailableError("NATS is unavailable")
    try:
        status = await asyncio.wait_for(read_hooks_status(services.nc.jetstream()), PROBE_TIMEOUT_S)
    except _UNREADABLE:
        raise UnavailableError("the state bucket cannot be read") from None
    if status is None:
        return "not_configured", []
    hooks = [
        HookState(
            name=h.name,
            state=h.state,
            delivered=h.delivered,
            failures=h.failures,
            consecutive_failures=h.consecutive_failures,
            last_error=h.last_error,
            last_delivered_at=h.last_delivered_at,
        )
        for h in status.hooks
    ]
    return hooks_process_state(status, now), hooks


async def _optional(coro: Any) -> Any:
    try:
        return await coro
    except StockpilotError:
        return None


@get(
    "/status",
    summary="Everything at a glance: services, components, usage, batch, alerts",
    guards=[read_guard],
    opt=CACHED,
)
async def system_status(services: Services, clock: GatewayClock) -> SystemStatus:
    """Never hangs: a service that does not answer shows as `unavailable`."""
    states, health, usage, batch, hooks, usage_stream = await asyncio.gather(
        _service_states(services),
        _optional(services.query("health", "summary", HealthSummary, timeout=PROBE_TIMEOUT_S)),
        _optional(services.query("usage", "summary", UsageSummary, timeout=PROBE_TIMEOUT_S)),
        _optional(services.query("batch", "summary", BatchSummary, timeout=PROBE_TIMEOUT_S)),
        _optional(_hooks(services, clock.now())),
        _usage_stream_writes(services),
    )
    now = clock.now()
    verdict = judge(
        Observed(
            now=now,
            nats_connected=services.connected,
            services=states,
            health=health,
            usage=usage,
            batch=batch,
            hooks=hooks,
            usage_stream_refusal=usage_stream.detail if usage_stream.accepting is False else None,
        )
    )
    return SystemStatus(
        status=verdict.status,
        timestamp=now,
        services=states,
        components=health.components if health is not None else {},
        usage_today=usage.today if usage is not None else None,
        batch=batch,
        alerts_24h=usage.alerts_24h if usage is not None else None,
        hooks_process=hooks[0] if hooks is not None else "unavailable",
        hooks=hooks[1] if hooks is not None else [],
        usage_stream=usage_stream,
        areas=verdict.areas,
        reasons=verdict.reasons,
    )


router = Router(path="/api/v1", route_handlers=[gateway_health, live, ready, system_status])
