"""The /api/v1/health routes: dependency health served from the health service's projection.

Answers come from the projection (`cached: true` with its age), and the gateway keeps each
for a second; `?fresh=true` has the service run a round of probes first (requests arriving
meanwhile share that round), so those requests wait up to the longest probe timeout.

A round calls every dependency for real (OpenAI with the real key), so `?fresh=true` needs the
admin token, and even then one gateway starts at most one round per
STOCKPILOT_HEALTH_FRESH_INTERVAL_S: asks inside that window are answered from the round
started at its beginning (in flight, or done).
"""

from __future__ import annotations

import asyncio
import time
import weakref
from datetime import datetime
from typing import Annotated, Any, TypeVar, cast

import msgspec
from litestar import Request, Router, get
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

T = TypeVar("T")

# A round is bounded by its longest probe timeout (at most 60 s, see HealthSettings).
FRESH_TIMEOUT_S = 65.0
# How long the gateway serves a health answer before asking the service again.
ANSWER_TTL_S = 1.0

Fresh = Annotated[
    bool,
    QueryParameter(
        description="Run a round of probes now instead of answering from the last round",
        required=False,
    ),
]


class _Answers:
    """One gateway's recent health answers: each serves for ANSWER_TTL_S, misses share a request.

    Health answers change once a round (every 30 s by default), so asking the service for
    each of thousands of requests a second buys nothing but NATS round trips; an answer
    served from here says `cached: true` and its `age_s` keeps counting.
    """

    def __init__(self) -> None:
        self.entries: dict[tuple[str, str | None], tuple[float, Any]] = {}
        self.pending: dict[tuple[str, str | None], asyncio.Task[Any]] = {}
        # The fresh window: when its round was asked for (sent to the service as
        # `requested_at`, which answers from any round started since) and its monotonic start.
        self.fresh_requested_at: datetime | None = None
        self.fresh_window_started = 0.0

    def fresh_since(self, interval_s: float, wall_now: datetime) -> datetime:
        """The `requested_at` for a fresh ask now: the open window's, or a new window's."""
        now = time.monotonic()
        if self.fresh_requested_at is None or now - self.fresh_window_started >= interval_s:
            self.fresh_requested_at = wall_now
            self.fresh_window_started = now
        return self.fresh_requested_at


# Per ServiceClient, that is per app: two apps in one process never share answers.
_answers: weakref.WeakKeyDictionary[ServiceClient, _Answers] = weakref.WeakKeyDictionary()


def _aged(value: T, elapsed: float) -> T:
    answer: Any = value
    age = answer.age_s if answer.age_s is not None else None
    return cast(
        T,
        msgspec.structs.replace(
            answer, cached=True, age_s=None if age is None else round(age + elapsed, 3)
        ),
    )


def _retrieve(task: asyncio.Task[Any]) -> None:
    if not task.cancelled():
        task.exception()  # every waiter may have gone: mark the outcome as seen


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
    answer: type[T],
    fresh: bool,
    name: str | None = None,
) -> T:
    """The cached answer, or (`fresh`) the answer of a round started in the fresh window."""
    answers = _answers.get(services)
    if answers is None:
        answers = _answers[services] = _Answers()
    key = (endpoint, name)
    if fresh:
        await _check_fresh_allowed(request)
        settings: GatewaySettings = request.app.state.settings
        # Each ask still goes to the service as a command (never kept by the response cache,
        # so a kept `?fresh=true` answer can never reach someone without the admin token);
        # the shared `requested_at` is what makes the service run one round for all of them.
        clock: Clock = request.app.state.clock
        requested_at = answers.fresh_since(settings.health_fresh_interval_s, clock.now())
        fresh_params: FreshParams | ComponentParams = (
            FreshParams(requested_at=requested_at)
            if name is None
            else ComponentParams(name=name, requested_at=requested_at)
        )
        value = await services.query(
            "health",
            f"{endpoint}_fresh",
            answer,
            fresh_params,
            timeout=max(services.timeout, FRESH_TIMEOUT_S),
        )
        answers.entries[key] = (time.monotonic(), value)
        return value
    entry = answers.entries.get(key)
    if entry is not None and time.monotonic() - entry[0] < ANSWER_TTL_S:
        return _aged(cast(T, entry[1]), time.monotonic() - entry[0])
    task = answers.pending.get(key)
    if task is None:
        params = None if name is None else ComponentParams(name=name)
        task = asyncio.create_task(services.query("health", endpoint, answer, params))
        answers.pending[key] = task
        task.add_done_callback(lambda _: answers.pending.pop(key, None))
        task.add_done_callback(_retrieve)
    value = await asyncio.shield(task)
    answers.entries[key] = (time.monotonic(), value)
    return value


@get(
    "/health/comprehensive",
    summary="Every dependency, the overall status and the host's metrics",
    guards=[read_guard],
    opt=CACHED,
)
async def comprehensive(
    request: Request[Any, Any, Any], services: Services, fresh: Fresh = False
) -> ComprehensiveHealth:
    """Overall: any unhealthy → unhealthy, else any degraded → degraded (unknown ignored)."""
    return await _ask(request, services, "comprehensive", ComprehensiveHealth, fresh)


@get("/health/database", summary="PostgreSQL", guards=[read_guard], opt=CACHED)
async def database(
    request: Request[Any, Any, Any], services: Services, fresh: Fresh = False
) -> ComponentAnswer:
    """Connect, SELECT 1, server version, connections in use vs max_connections."""
    return await _ask(request, services, "component", ComponentAnswer, fresh, "database")


@get("/health/openai", summary="OpenAI", guards=[read_guard], opt=CACHED)
async def openai(
    request: Request[Any, Any, Any], services: Services, fresh: Fresh = False
) -> ComponentAnswer:
    """GET {OPENAI_BASE_URL}/models with the key: the count of models, 401/429/5xx mapped."""
    return await _ask(request, services, "component", ComponentAnswer, fresh, "openai")


@get("/health/redis", summary="Redis", guards=[read_guard], opt=CACHED)
async def redis(
    request: Request[Any, Any, Any], services: Services, fresh: Fresh = False
) -> ComponentAnswer:
    """PING latency, memory used vs maxmemory, connected clients, version."""
    return await _ask(request, services, "component", ComponentAnswer, fresh, "redis")


@get(
    "/health/external-apis",
    summary="The external APIs of STOCKPILOT_EXTERNAL_APIS and their aggregate",
    guards=[read_guard],
    opt=CACHED,
)
async def external_apis(
    request: Request[Any, Any, Any], services: Services, fresh: Fresh = False
) -> ExternalApisHealth:
    """Healthy at >= 80 % reachable, degraded at >= 50 %, else unhealthy."""
    return await _ask(request, services, "external_apis", ExternalApisHealth, fresh)


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
