"""Pure queries over the health view: they fill the answers of services.health.contract."""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import datetime

import msgspec

from services.health.contract import (
    ComponentAnswer,
    ComponentBrief,
    ComponentHealth,
    ComprehensiveHealth,
    ExternalApisHealth,
    HealthSummary,
    Kind,
    Status,
    SystemMetrics,
)
from services.health.projection import (
    CODES,
    HOUR_S,
    RANK,
    ComponentState,
    HealthView,
    Sample,
    newest,
)
from services.health.settings import HealthSettings
from shared.errors import NotFoundError

CORE: tuple[tuple[str, Kind], ...] = (
    ("database", "database"),
    ("redis", "redis"),
    ("openai", "openai"),
)


# ----- helpers ---------------------------------------------------------------------------


def configured(settings: HealthSettings) -> list[tuple[str, Kind]]:
    """The components the settings define, in display order."""
    return [*CORE, *((f"external.{api.name}", "external_api") for api in settings.external_apis)]


def worst(statuses: Iterable[Status]) -> Status:
    """Any unhealthy → unhealthy, else any degraded → degraded, else healthy (unknown ignored)."""
    known = [s for s in statuses if s != "unknown"]
    if not known:
        return "unknown"
    return max(known, key=lambda s: RANK[s])


def _uptime(samples: Iterable[Sample]) -> tuple[float | None, int]:
    up = total = 0
    for sample in samples:
        if sample.status == CODES["unknown"]:
            continue
        total += 1
        if sample.status != CODES["unhealthy"]:
            up += 1
    return (round(100.0 * up / total, 2) if total else None), total


def _p95(values: list[float]) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)], 3)


def window(state: ComponentState, since: float) -> list[Sample]:
    """The component's raw samples taken at or after `since` (epoch seconds)."""
    samples = state.samples
    lo, hi = 0, len(samples)
    while lo < hi:
        mid = (lo + hi) // 2
        if samples[mid].t < since:
            lo = mid + 1
        else:
            hi = mid
    return samples[lo:]


def component_health(view: HealthView, name: str, kind: Kind, now: datetime) -> ComponentHealth:
    """One component as it stands (a component never checked is `unknown`)."""
    state = view.components.get(name)
    if state is None:
        return ComponentHealth(
            name=name,
            kind=kind,
            status="unknown",
            latency_ms=None,
            details={},
            error=None,
            checked_at=None,
            last_result="unknown",
            status_since=None,
            pending_status=None,
            pending_results=0,
            uptime_pct_1h=None,
            uptime_pct_24h=None,
            latency_p95_ms_1h=None,
            latency_p95_ms_24h=None,
        )
    t = now.timestamp()
    hour, day = window(state, t - HOUR_S), window(state, t - 24 * HOUR_S)
    latest = state.latest
    return ComponentHealth(
        name=name,
        kind=state.kind,
        status=state.status,
        latency_ms=latest.latency_ms,
        details=latest.details,
        error=latest.error,
        checked_at=latest.occurred_at,
        last_result=latest.status,
        status_since=state.since,
        pending_status=state.pending,
        pending_results=state.streak,
        uptime_pct_1h=_uptime(hour)[0],
        uptime_pct_24h=_uptime(day)[0],
        latency_p95_ms_1h=_p95([s.latency_ms for s in hour if s.latency_ms is not None]),
        latency_p95_ms_24h=_p95([s.latency_ms for s in day if s.latency_ms is not None]),
    )


Board = dict[str, ComponentHealth]


def board(view: HealthView, settings: HealthSettings, now: datetime) -> Board:
    """Every configured component as it stands, in display order (the costly part: windows)."""
    return {name: component_health(view, name, kind, now) for name, kind in configured(settings)}


def _age(view: HealthView, now: datetime) -> float | None:
    at = newest(view)
    return round(max(0.0, (now - at).total_seconds()), 3) if at else None


def component(
    view: HealthView,
    settings: HealthSettings,
    name: str,
    now: datetime,
    cached: bool,
    current: Board | None = None,
) -> ComponentAnswer:
    """The answer of /health/database, /openai, /redis (and any component by id)."""
    one = (current or {}).get(name)
    if one is None:
        state = view.components.get(name)
        kinds = dict(configured(settings))
        if name not in kinds and state is None:
            raise NotFoundError(f"no health component named {name!r}")
        kind = kinds.get(name) or (state.kind if state else "external_api")
        one = component_health(view, name, kind, now)
    return ComponentAnswer(
        **msgspec.structs.asdict(one), cached=cached, age_s=_age(view, now) if cached else 0.0
    )


def external_apis(
    view: HealthView,
    settings: HealthSettings,
    now: datetime,
    cached: bool,
    current: Board | None = None,
) -> ExternalApisHealth:
    """The external APIs and their aggregate status."""
    current = current if current is not None else board(view, settings, now)
    apis = [c for c in current.values() if c.kind == "external_api"]
    known = [a for a in apis if a.status != "unknown"]
    reachable = sum(1 for a in known if a.status in ("healthy", "degraded"))
    pct = round(100.0 * reachable / len(known), 2) if known else None
    status: Status
    if pct is None:
        status = "unknown"
    elif pct >= settings.external_healthy_pct:
        status = "healthy"
    elif pct >= settings.external_degraded_pct:
        status = "degraded"
    else:
        status = "unhealthy"
    checked = [a.checked_at for a in apis if a.checked_at is not None]
    return ExternalApisHealth(
        status=status,
        apis=apis,
        reachable=reachable,
        total=len(apis),
        reachable_pct=pct,
        checked_at=max(checked) if checked else None,
        cached=cached,
        age_s=_age(view, now) if cached else 0.0,
    )


def comprehensive(
    view: HealthView,
    settings: HealthSettings,
    now: datetime,
    cached: bool,
    current: Board | None = None,
) -> ComprehensiveHealth:
    """Everything: core components, the external APIs' aggregate, the host."""
    current = current if current is not None else board(view, settings, now)
    components = list(current.values())
    externals = external_apis(view, settings, now, cached, current)
    core = [c.status for c in components if c.kind != "external_api"]
    host = view.host
    return ComprehensiveHealth(
        status=worst([*core, externals.status]),
        checked_at=newest(view),
        cached=cached,
        age_s=_age(view, now) if cached else 0.0,
        components=components,
        external_apis=externals,
        system_metrics=SystemMetrics(
            cpu_percent=host.cpu_percent,
            memory_percent=host.memory_percent,
            disk_percent=host.disk_percent,
            uptime_s=host.uptime_s,
            sampled_at=host.occurred_at,
        )
        if host is not None
        else None,
    )


def summary(
    view: HealthView, settings: HealthSettings, now: datetime, current: Board | None = None
) -> HealthSummary:
    """The overall status and each component's status, for /api/v1/status."""
    whole = comprehensive(view, settings, now, True, current)
    components: dict[str, str] = {c.name: c.status for c in whole.components}
    if settings.external_apis:
        components["external-apis"] = whole.external_apis.status
    checks = [
        ComponentBrief(
            name=c.name,
            kind=c.kind,
            status=c.status,
            configured=is_configured(settings, c.name),
            error=c.error,
        )
        for c in whole.components
    ]
    return HealthSummary(status=whole.status, components=components, checks=checks)


def is_configured(settings: HealthSettings, name: str) -> bool:
    """Whether the settings switch the component's probe on (an external API always is)."""
    if name == "database":
        return bool(settings.database_url)
    if name == "redis":
        return bool(settings.redis_url)
    if name == "openai":
        return bool(settings.openai_api_key)
    return True
