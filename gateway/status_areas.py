"""The rules of /api/v1/status: what each area's status is, and why (a pure function).

Why one module of over 300 lines: it is one rule, area by area, with the structs it reads and
writes; each area's function is short, and the overall status, the ranking of severities and
the reason codes the dashboard keys on must stay side by side, so splitting the areas apart
would scatter the one answer /api/v1/status gives.

The services' `summary` answers come in (or None when a service did not answer); seven areas
with a status and a one-line summary, and one reason per problem, come out. The overall
status is the worst area: it never reads `healthy` while any area is degraded or unhealthy,
and it reads `unknown` when nothing is known about the dependencies (none configured, none
checked yet, or the health service silent) and nothing is wrong elsewhere, because "healthy"
must mean something was seen to be healthy.

Each area and reason carries a `code` and `params` beside its English text, so the dashboard
can say the same in the reader's language (gateway/static/i18n.js keys on the codes).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Literal

import msgspec

from services.batch.contract import BatchSummary
from services.health.contract import HealthSummary
from services.usage.contract import UsageSummary
from shared.events import AwareDatetime

AreaStatus = Literal["healthy", "degraded", "unhealthy", "unknown"]
Severity = Literal["info", "warning", "critical"]
# No `int` beside `float`: a JSON 0 would then match two types of the schema's oneOf.
Param = str | float | None

AREAS = (
    "dependencies",
    "llm_spend",
    "llm_errors",
    "batch",
    "locks",
    "services",
    "alert_hooks",
)
_SEVERITY: dict[str, Severity] = {"unknown": "info", "degraded": "warning", "unhealthy": "critical"}


class ServiceState(msgspec.Struct, kw_only=True):
    """One service as seen from the gateway."""

    status: Literal["up", "catching_up", "unavailable"]
    detail: str | None = None
    lag: int | None = None
    rss_mb: float | None = None
    cpu_percent: float | None = None
    uptime_s: float | None = None
    # How each projection reads its stream and each publisher of the service sends (the
    # usage service's "ingest"; shared.transport): "accelerated" or "nats-py".
    transports: dict[str, str] | None = None


class HookState(msgspec.Struct, kw_only=True):
    """One alert hook as the hook process last reported it."""

    name: str
    state: str
    delivered: int
    failures: int
    consecutive_failures: int
    last_error: str | None
    last_delivered_at: AwareDatetime | None


class Area(msgspec.Struct, kw_only=True):
    """One area of /api/v1/status: its status and a line that says what stands."""

    status: AreaStatus
    summary: str
    code: str
    params: dict[str, Param] = {}


class Reason(msgspec.Struct, kw_only=True):
    """Why an area is not healthy, in a sentence (and as a code the page can translate)."""

    area: str
    severity: Severity
    message: str
    code: str
    params: dict[str, Param] = {}


class Observed(msgspec.Struct, kw_only=True):
    """What the gateway gathered for one /status answer (None: that source did not answer)."""

    now: datetime
    nats_connected: bool
    services: dict[str, ServiceState]
    health: HealthSummary | None
    usage: UsageSummary | None
    batch: BatchSummary | None
    # (hook process state, hooks), or None when the state bucket could not be read.
    hooks: tuple[str, list[HookState]] | None
    # Why STOCKPILOT_USAGE refuses writes (full, sealed, out of storage), or None.
    usage_stream_refusal: str | None = None


class Verdict(msgspec.Struct, kw_only=True):
    """The areas, the reasons and the overall status."""

    status: AreaStatus
    areas: dict[str, Area]
    reasons: list[Reason]


def overall(areas: dict[str, Area]) -> AreaStatus:
    """The worst area; `unknown` instead of `healthy` while the dependencies are unknown."""
    statuses = [a.status for a in areas.values()]
    if "unhealthy" in statuses:
        return "unhealthy"
    if "degraded" in statuses:
        return "degraded"
    if all(s == "unknown" for s in statuses):
        return "unknown"
    deps = areas.get("dependencies")
    return "unknown" if deps is None or deps.status == "unknown" else "healthy"


def judge(seen: Observed) -> Verdict:
    """Every area's status and summary, a reason per problem, and the overall status."""
    reasons: list[Reason] = []
    areas = {
        "dependencies": _dependencies(seen, reasons),
        "llm_spend": _spend(seen, reasons),
        "llm_errors": _errors(seen, reasons),
        "batch": _batch(seen, reasons),
        "locks": _locks(seen, reasons),
        "services": _services(seen, reasons),
        "alert_hooks": _hooks(seen, reasons),
    }
    # An area that is not healthy always has a reason, even when its rule added none.
    named = {r.area for r in reasons}
    for name, area in areas.items():
        if area.status != "healthy" and name not in named:
            reasons.append(_reason(name, area.status, area.summary, area.code, area.params))
    order = {name: i for i, name in enumerate(AREAS)}
    reasons.sort(key=lambda r: (-_RANK_SEVERITY[r.severity], order[r.area]))
    return Verdict(status=overall(areas), areas=areas, reasons=reasons)


_RANK_SEVERITY = {"info": 0, "warning": 1, "critical": 2}


def _reason(
    area: str, status: str, message: str, code: str, params: dict[str, Param] | None = None
) -> Reason:
    return Reason(
        area=area, severity=_SEVERITY[status], message=message, code=code, params=params or {}
    )


def _silent(service: str) -> Area:
    return Area(
        status="unknown",
        summary=f"unavailable: the {service} service does not answer",
        code="unavailable",
        params={"service": service},
    )


def _names(items: Iterable[str]) -> str:
    return ", ".join(items)


# ----- dependencies ----------------------------------------------------------------------


def _dependencies(seen: Observed, reasons: list[Reason]) -> Area:
    health = seen.health
    if health is None:
        return _silent("health")
    checks = health.checks
    configured = [c for c in checks if c.configured]
    unconfigured = [c.name for c in checks if not c.configured]
    if not configured:
        return Area(
            status="unknown",
            summary="no dependency is configured: set STOCKPILOT_DATABASE_URL, "
            "STOCKPILOT_REDIS_URL, OPENAI_API_KEY or STOCKPILOT_EXTERNAL_APIS to probe them",
            code="dependencies.none_configured",
        )
    for check in configured:
        if check.status in ("degraded", "unhealthy"):
            why = f": {check.error}" if check.error else ""
            reasons.append(
                _reason(
                    "dependencies",
                    check.status,
                    f"{check.name} is {check.status}{why}",
                    f"dependency.{check.status}",
                    {"name": check.name, "error": check.error},
                )
            )
    bad = [c for c in configured if c.status in ("degraded", "unhealthy")]
    known = [c for c in configured if c.status != "unknown"]
    healthy = [c.name for c in configured if c.status == "healthy"]
    params: dict[str, Param] = {
        "healthy": len(healthy),
        "total": len(configured),
        "unconfigured": _names(unconfigured),
        "problems": _names(c.name for c in bad),
    }
    not_set = f"; not configured: {_names(unconfigured)}" if unconfigured else ""
    if bad:
        # The health service's own verdict (its external-API aggregate) decides how bad;
        # any dependency in trouble is at least degraded.
        status: AreaStatus = "unhealthy" if health.status == "unhealthy" else "degraded"
        if status == "degraded" and any(
            c.status == "unhealthy" and c.kind != "external_api" for c in bad
        ):
            status = "unhealthy"
        return Area(
            status=status,
            summary=f"{len(healthy)} of {len(configured)} healthy; "
            f"in trouble: {_names(c.name for c in bad)}{not_set}",
            code="dependencies.problem",
            params=params,
        )
    if not known:
        return Area(
            status="unknown",
            summary=f"not checked yet: {_names(c.name for c in configured)}{not_set}",
            code="dependencies.not_checked",
            params=params,
        )
    return Area(
        status="healthy",
        summary=f"{len(healthy)} of {len(configured)} healthy{not_set}",
        code="dependencies.ok",
        params=params,
    )


# ----- LLM spend and errors --------------------------------------------------------------


def _usd(amount: float) -> str:
    return f"${amount:,.2f}"


def _spend(seen: Observed, reasons: list[Reason]) -> Area:
    usage = seen.usage
    if usage is None:
        return _silent("usage")
    status: AreaStatus = "healthy"
    parts = []
    for period in usage.spend:
        if period.budget_usd is None or period.used_pct is None:
            parts.append(f"{period.period} {_usd(period.cost_usd)} (no budget)")
            continue
        parts.append(
            f"{period.period} {_usd(period.cost_usd)} of {_usd(period.budget_usd)} "
            f"({period.used_pct:.0f} %)"
        )
        params: dict[str, Param] = {
            "period": period.period,
            "pct": round(period.used_pct, 1),
            "cost_usd": round(period.cost_usd, 2),
            "budget_usd": period.budget_usd,
            "threshold": usage.cost_alert_pct,
        }
        if period.used_pct >= 100.0:
            status = "unhealthy"
            reasons.append(
                _reason(
                    "llm_spend",
                    "unhealthy",
                    f"{period.period} LLM budget {period.used_pct:.0f} % used: "
                    f"{_usd(period.cost_usd)} of {_usd(period.budget_usd)}",
                    "llm_spend.exceeded",
                    params,
                )
            )
        elif period.used_pct >= usage.cost_alert_pct:
            status = "degraded" if status == "healthy" else status
            reasons.append(
                _reason(
                    "llm_spend",
                    "degraded",
                    f"{period.period} LLM budget {period.used_pct:.0f} % used, over the "
                    f"{usage.cost_alert_pct:g} % warning threshold: "
                    f"{_usd(period.cost_usd)} of {_usd(period.budget_usd)}",
                    "llm_spend.warning",
                    params,
                )
            )
    spent = {p.period: p for p in usage.spend}
    daily, monthly = spent.get("daily"), spent.get("monthly")
    return Area(
        status=status,
        summary="; ".join(parts) if parts else f"{_usd(usage.today.cost_usd)} today",
        code="llm_spend.summary",
        params={
            "today_usd": round(daily.cost_usd if daily else usage.today.cost_usd, 2),
            "today_pct": daily.used_pct if daily else None,
            "month_usd": round(monthly.cost_usd, 2) if monthly else None,
            "month_pct": monthly.used_pct if monthly else None,
        },
    )


def _errors(seen: Observed, reasons: list[Reason]) -> Area:
    usage = seen.usage
    if usage is None:
        return _silent("usage")
    window = usage.errors
    if window is None:
        return Area(
            status="unknown", summary="the usage service does not report it", code="unknown"
        )
    minutes = window.window_s // 60
    params: dict[str, Param] = {
        "calls": window.calls,
        "failed": window.failed,
        "rate": window.rate_pct,
        "minutes": minutes,
        "threshold": window.threshold_pct,
        "min_calls": window.min_calls,
    }
    if window.rate_pct is None:
        return Area(
            status="healthy",
            summary=f"no LLM calls in the last {minutes} minutes",
            code="llm_errors.idle",
            params=params,
        )
    line = (
        f"{window.rate_pct:.1f} % of {window.calls} LLM calls failed in the last {minutes} minutes"
    )
    if window.calls >= window.min_calls and window.rate_pct >= window.threshold_pct:
        reasons.append(
            _reason(
                "llm_errors",
                "degraded",
                f"{line} (threshold {window.threshold_pct:g} %)",
                "llm_errors.high",
                params,
            )
        )
        return Area(status="degraded", summary=line, code="llm_errors.summary", params=params)
    return Area(status="healthy", summary=line, code="llm_errors.summary", params=params)


# ----- batch and locks -------------------------------------------------------------------


def _batch(seen: Observed, reasons: list[Reason]) -> Area:
    batch = seen.batch
    if batch is None:
        return _silent("batch")
    for job in batch.failing_jobs:
        how = "failed" if job.status == "failed" else "was lost (its heartbeats stopped)"
        error = f": {job.error}" if job.error and job.status == "failed" else ""
        reasons.append(
            _reason(
                "batch",
                "degraded",
                f"the last run of {job.job_id} {how}, and none has succeeded since{error}",
                f"batch.job_{job.status}",
                {"job_id": job.job_id, "error": job.error, "execution_id": job.execution_id},
            )
        )
    for missed in batch.missed_jobs:
        at = missed.expected_at.isoformat().replace("+00:00", "Z")
        reasons.append(
            _reason(
                "batch",
                "degraded",
                f"{missed.job_id} was expected to start at {at} and has not started "
                f"({missed.missed_slots} missed)",
                "batch.job_missed",
                {"job_id": missed.job_id, "expected_at": at, "count": missed.missed_slots},
            )
        )
    params: dict[str, Param] = {
        "running": batch.running,
        "failed_24h": batch.failed_24h,
        "failing": len(batch.failing_jobs),
        "jobs": _names(j.job_id for j in batch.failing_jobs),
        "missed": len(batch.missed_jobs),
        "missed_jobs": _names(j.job_id for j in batch.missed_jobs),
    }
    if batch.failing_jobs or batch.missed_jobs:
        problems = [f"failing: {params['jobs']}"] if batch.failing_jobs else []
        problems += [f"missed: {params['missed_jobs']}"] if batch.missed_jobs else []
        return Area(
            status="degraded",
            summary=f"{'; '.join(problems)}; {batch.running} running",
            code="batch.failing" if batch.failing_jobs else "batch.missed",
            params=params,
        )
    return Area(
        status="healthy",
        summary=f"{batch.running} running, {batch.failed_24h} failed in 24 h (since recovered)"
        if batch.failed_24h
        else f"{batch.running} running, no failures in 24 h",
        code="batch.ok",
        params=params,
    )


def _ago(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.0f} h"


def _locks(seen: Observed, reasons: list[Reason]) -> Area:
    batch = seen.batch
    if batch is None:
        return _silent("batch")
    for lock in batch.expired:
        ago = max(0.0, (seen.now - lock.expires_at).total_seconds())
        reasons.append(
            _reason(
                "locks",
                "degraded",
                f"the lock of {lock.job_id} expired {_ago(ago)} ago and is still held by "
                f"{lock.owner}: release it (POST /api/v1/batch/locks/cleanup)",
                "locks.expired",
                {"job_id": lock.job_id, "owner": lock.owner, "ago_s": round(ago)},
            )
        )
    count = len(batch.expired) or batch.expired_locks
    if count:
        return Area(
            status="degraded",
            summary=f"{count} expired lock(s) still held: "
            f"{_names(lock.job_id for lock in batch.expired)}",
            code="locks.expired_summary",
            params={"count": count, "jobs": _names(lock.job_id for lock in batch.expired)},
        )
    return Area(status="healthy", summary="no expired lock", code="locks.ok")


# ----- services and hooks ----------------------------------------------------------------


def _services(seen: Observed, reasons: list[Reason]) -> Area:
    if not seen.nats_connected:
        reasons.append(
            _reason(
                "services",
                "unhealthy",
                "the gateway cannot reach NATS: no service can answer",
                "services.nats_down",
            )
        )
        return Area(status="unhealthy", summary="NATS is unavailable", code="services.nats_down")
    if seen.usage_stream_refusal is not None:
        # Every LLM call then waits in its producer's spool, or is lost: nothing else matters.
        refusal = seen.usage_stream_refusal
        reasons.append(
            _reason(
                "services",
                "unhealthy",
                refusal,
                "services.usage_stream_refuses",
                {"detail": refusal},
            )
        )
        return Area(
            status="unhealthy",
            summary="the usage stream refuses writes",
            code="services.usage_stream_refuses",
            params={"detail": refusal},
        )
    down = [name for name, s in seen.services.items() if s.status == "unavailable"]
    for name in down:
        detail = seen.services[name].detail
        reasons.append(
            _reason(
                "services",
                "degraded",
                f"the {name} service does not answer" + (f": {detail}" if detail else ""),
                "services.unavailable",
                {"name": name, "detail": detail},
            )
        )
    catching_up = [name for name, s in seen.services.items() if s.status == "catching_up"]
    params: dict[str, Param] = {
        "up": len(seen.services) - len(down),
        "total": len(seen.services),
        "down": _names(down),
        "catching_up": _names(catching_up),
    }
    if down:
        status: AreaStatus = "unhealthy" if len(down) == len(seen.services) else "degraded"
        return Area(
            status=status,
            summary=f"unavailable: {_names(down)}",
            code="services.down",
            params=params,
        )
    lagging = f"; catching up: {_names(catching_up)}" if catching_up else ""
    return Area(
        status="healthy",
        summary=f"{params['up']} of {params['total']} up{lagging}",
        code="services.ok",
        params=params,
    )


def _hooks(seen: Observed, reasons: list[Reason]) -> Area:
    if seen.hooks is None:
        return Area(
            status="unknown",
            summary="unavailable: the hook status cannot be read",
            code="unavailable",
            params={"service": "hooks"},
        )
    process, hooks = seen.hooks
    if process == "not_configured":
        return Area(
            status="healthy",
            summary="not configured (stockpilot hooks sends alerts to webhooks)",
            code="alert_hooks.not_configured",
        )
    if process != "up":
        reasons.append(
            _reason(
                "alert_hooks",
                "degraded",
                "the alert hook process is not running: alerts are not being delivered",
                "alert_hooks.stopped",
            )
        )
        return Area(
            status="degraded", summary="the hook process is not running", code="alert_hooks.stopped"
        )
    failing = [h for h in hooks if h.state == "failing"]
    for hook in failing:
        why = f": {hook.last_error}" if hook.last_error else ""
        reasons.append(
            _reason(
                "alert_hooks",
                "degraded",
                f"alert hook {hook.name} is failing ({hook.consecutive_failures} failures "
                f"in a row){why}",
                "alert_hooks.failing",
                {
                    "name": hook.name,
                    "failures": hook.consecutive_failures,
                    "error": hook.last_error,
                },
            )
        )
    params: dict[str, Param] = {
        "ok": len(hooks) - len(failing),
        "total": len(hooks),
        "failing": _names(h.name for h in failing),
    }
    if failing:
        return Area(
            status="degraded",
            summary=f"failing: {params['failing']}",
            code="alert_hooks.failing_summary",
            params=params,
        )
    return Area(
        status="healthy",
        summary=f"{len(hooks)} hook(s) delivering",
        code="alert_hooks.ok",
        params=params,
    )
