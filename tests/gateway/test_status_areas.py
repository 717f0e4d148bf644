"""The /api/v1/status rules as a table: summaries in, areas, reasons and overall status out."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import msgspec
import pytest

from gateway.status_areas import HookState, Observed, ServiceState, judge, overall
from services.batch.contract import BatchSummary, ExpiredLock, FailingJob, MissedJob
from services.health.contract import ComponentBrief, HealthSummary
from services.usage.contract import ErrorWindow, SpendPeriod, UsageSummary, UsageToday
from tests.clocks import NOON

UP = {name: ServiceState(status="up") for name in ("health", "usage", "batch")}


def health(**statuses: str) -> HealthSummary:
    """database/redis/openai configured with these statuses; others not configured."""
    checks = [
        ComponentBrief(
            name=name,
            kind="external_api" if name.startswith("external.") else name,  # type: ignore[arg-type]
            status=statuses.get(name, "unknown"),  # type: ignore[arg-type]
            configured=name in statuses,
            error=f"{name} broke" if statuses.get(name) in ("degraded", "unhealthy") else None,
        )
        for name in ("database", "redis", "openai", *(n for n in statuses if "." in n))
    ]
    worst = "healthy"
    for s in statuses.values():
        if s == "unhealthy" or (s == "degraded" and worst == "healthy"):
            worst = s
    return HealthSummary(status=worst, components=dict(statuses), checks=checks)


def usage(
    daily: tuple[float, float | None] = (0.0, None),
    monthly: tuple[float, float | None] = (0.0, None),
    calls: int = 0,
    failed: int = 0,
) -> UsageSummary:
    """Spend (cost, budget) per period and the error window's calls."""

    def period(name: str, cost: float, budget: float | None) -> SpendPeriod:
        pct = round(100.0 * cost / budget, 4) if budget else None
        return SpendPeriod(period=name, cost_usd=cost, budget_usd=budget, used_pct=pct)

    return UsageSummary(
        today=UsageToday(requests=calls, cost_usd=daily[0], error_rate=None, budget_used_pct=None),
        alerts_24h=0,
        spend=[period("daily", *daily), period("monthly", *monthly)],
        cost_alert_pct=80.0,
        errors=ErrorWindow(
            window_s=300,
            calls=calls,
            failed=failed,
            rate_pct=round(100.0 * failed / calls, 4) if calls else None,
            threshold_pct=20.0,
            min_calls=10,
        ),
    )


QUIET_BATCH = BatchSummary(running=0, failed_24h=0, expired_locks=0)
FAILED_JOB = BatchSummary(
    running=0,
    failed_24h=1,
    expired_locks=0,
    failing_jobs=[
        FailingJob(job_id="price_sync", status="failed", execution_id="e1", at=NOON, error="boom")
    ],
)
EXPIRED_LOCK = BatchSummary(
    running=0,
    failed_24h=0,
    expired_locks=1,
    expired=[ExpiredLock(job_id="report", owner="w-1", expires_at=NOON - timedelta(hours=3))],
)


def hook(state: str) -> HookState:
    return HookState(
        name="slack",
        state=state,
        delivered=3,
        failures=5 if state == "failing" else 0,
        consecutive_failures=5 if state == "failing" else 0,
        last_error="HTTP 500" if state == "failing" else None,
        last_delivered_at=None,
    )


def seen(**changes: Any) -> Observed:
    """All well: every service up, the database healthy, no spend, no runs, no hooks."""
    base = Observed(
        now=NOON,
        nats_connected=True,
        services=dict(UP),
        health=health(database="healthy"),
        usage=usage(),
        batch=QUIET_BATCH,
        hooks=("not_configured", []),
    )
    return msgspec.structs.replace(base, **changes)


# (case, observed, overall status, {area: status} expected, reason codes expected)
CASES: list[tuple[str, Observed, str, dict[str, str], list[str]]] = [
    ("all well", seen(), "healthy", {"dependencies": "healthy", "llm_spend": "healthy"}, []),
    (
        "daily budget at 300 %",
        seen(usage=usage(daily=(30.0, 10.0), calls=5)),
        "unhealthy",
        {"llm_spend": "unhealthy"},
        ["llm_spend.exceeded"],
    ),
    (
        "budget exactly 100 %",
        seen(usage=usage(monthly=(50.0, 50.0))),
        "unhealthy",
        {"llm_spend": "unhealthy"},
        ["llm_spend.exceeded"],
    ),
    (
        "budget over the warning threshold",
        seen(usage=usage(daily=(8.5, 10.0))),
        "degraded",
        {"llm_spend": "degraded"},
        ["llm_spend.warning"],
    ),
    (
        "budget under the warning threshold",
        seen(usage=usage(daily=(7.9, 10.0))),
        "healthy",
        {"llm_spend": "healthy"},
        [],
    ),
    (
        "half the calls failing",
        seen(usage=usage(calls=40, failed=20)),
        "degraded",
        {"llm_errors": "degraded"},
        ["llm_errors.high"],
    ),
    (
        "failing but too few calls to judge",
        seen(usage=usage(calls=4, failed=4)),
        "healthy",
        {"llm_errors": "healthy"},
        [],
    ),
    (
        "a failed job not followed by a success",
        seen(batch=FAILED_JOB),
        "degraded",
        {"batch": "degraded"},
        ["batch.job_failed"],
    ),
    (
        "an expired lock still held",
        seen(batch=EXPIRED_LOCK),
        "degraded",
        {"locks": "degraded", "batch": "healthy"},
        ["locks.expired"],
    ),
    (
        "a stopped service",
        seen(
            services=UP | {"usage": ServiceState(status="unavailable", detail="not running")},
            usage=None,
        ),
        "degraded",
        {"services": "degraded", "llm_spend": "unknown", "llm_errors": "unknown"},
        ["services.unavailable", "unavailable", "unavailable"],
    ),
    (
        "every service stopped",
        seen(
            services={n: ServiceState(status="unavailable") for n in UP},
            health=None,
            usage=None,
            batch=None,
        ),
        "unhealthy",
        {"services": "unhealthy", "dependencies": "unknown"},
        ["services.unavailable"] * 3 + ["unavailable"] * 5,
    ),
    (
        "NATS unreachable",
        seen(nats_connected=False, health=None, usage=None, batch=None, hooks=None),
        "unhealthy",
        {"services": "unhealthy"},
        ["services.nats_down"] + ["unavailable"] * 6,
    ),
    (
        "the usage stream refuses writes",
        seen(
            health=health(database="healthy"),
            usage_stream_refusal="stream STOCKPILOT_USAGE is sealed: it refuses every write",
        ),
        "unhealthy",
        {"services": "unhealthy", "dependencies": "healthy"},
        ["services.usage_stream_refuses"],
    ),
    (
        "nothing configured",
        seen(health=health()),
        "unknown",
        {"dependencies": "unknown"},
        ["dependencies.none_configured"],
    ),
    (
        "configured but not checked yet",
        seen(health=health(database="unknown")),
        "unknown",
        {"dependencies": "unknown"},
        ["dependencies.not_checked"],
    ),
    (
        "an unhealthy database",
        seen(health=health(database="unhealthy", redis="healthy")),
        "unhealthy",
        {"dependencies": "unhealthy"},
        ["dependency.unhealthy"],
    ),
    (
        "a degraded redis",
        seen(health=health(database="healthy", redis="degraded")),
        "degraded",
        {"dependencies": "degraded"},
        ["dependency.degraded"],
    ),
    (
        "one external API down (4 of 5 reachable) is degraded, not healthy",
        seen(
            health=msgspec.structs.replace(
                health(database="healthy", **{"external.quotes": "unhealthy"}), status="healthy"
            )
        ),
        "degraded",
        {"dependencies": "degraded"},
        ["dependency.unhealthy"],
    ),
    (
        "a scheduled job that missed its start (contract §5)",
        seen(
            batch=BatchSummary(
                running=0,
                failed_24h=0,
                expired_locks=0,
                missed_jobs=[
                    MissedJob(
                        job_id="nightly", expected_at=NOON - timedelta(hours=2), missed_slots=1
                    )
                ],
            )
        ),
        "degraded",
        {"batch": "degraded", "locks": "healthy"},
        ["batch.job_missed"],
    ),
    (
        "a failing hook",
        seen(hooks=("up", [hook("failing")])),
        "degraded",
        {"alert_hooks": "degraded"},
        ["alert_hooks.failing"],
    ),
    (
        "the hook process stopped",
        seen(hooks=("unavailable", [hook("ok")])),
        "degraded",
        {"alert_hooks": "degraded"},
        ["alert_hooks.stopped"],
    ),
    (
        "hooks delivering",
        seen(hooks=("up", [hook("ok")])),
        "healthy",
        {"alert_hooks": "healthy"},
        [],
    ),
    (
        "everything wrong at once: the worst wins",
        seen(
            usage=usage(daily=(30.0, 10.0), calls=40, failed=20),
            batch=msgspec.structs.replace(FAILED_JOB, expired=EXPIRED_LOCK.expired),
            hooks=("up", [hook("failing")]),
        ),
        "unhealthy",
        {"llm_spend": "unhealthy", "llm_errors": "degraded", "locks": "degraded"},
        [
            "llm_spend.exceeded",
            "llm_errors.high",
            "batch.job_failed",
            "locks.expired",
            "alert_hooks.failing",
        ],
    ),
]


@pytest.mark.parametrize(
    ("observed", "status", "areas", "codes"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_status_areas(
    observed: Observed, status: str, areas: dict[str, str], codes: list[str]
) -> None:
    verdict = judge(observed)
    assert verdict.status == status
    assert {name: verdict.areas[name].status for name in areas} == areas
    assert [r.code for r in verdict.reasons] == codes
    # Every area that is not healthy is named by a reason that says why in a sentence.
    for name, area in verdict.areas.items():
        if area.status != "healthy":
            assert any(r.area == name and r.message for r in verdict.reasons), name
    assert verdict.status != "healthy" or not verdict.reasons


def test_every_area_is_always_present_with_a_summary() -> None:
    for _, observed, *_ in CASES:
        areas = judge(observed).areas
        assert list(areas) == [
            "dependencies",
            "llm_spend",
            "llm_errors",
            "batch",
            "locks",
            "services",
            "alert_hooks",
        ]
        assert all(a.summary for a in areas.values())


def test_a_missed_job_says_when_it_was_expected() -> None:
    missed = MissedJob(job_id="nightly", expected_at=NOON - timedelta(hours=2), missed_slots=3)
    batch = BatchSummary(running=0, failed_24h=0, expired_locks=0, missed_jobs=[missed])
    verdict = judge(seen(batch=batch))
    at = (NOON - timedelta(hours=2)).isoformat().replace("+00:00", "Z")
    assert [r.message for r in verdict.reasons] == [
        f"nightly was expected to start at {at} and has not started (3 missed)"
    ]
    assert verdict.areas["batch"].summary == "missed: nightly; 0 running"


def test_reasons_say_what_and_how_much() -> None:
    verdict = judge(seen(usage=usage(daily=(30.0, 10.0)), batch=EXPIRED_LOCK))
    messages = [r.message for r in verdict.reasons]
    assert "daily LLM budget 300 % used: $30.00 of $10.00" in messages
    assert any("report expired 3 h ago" in m and "w-1" in m for m in messages)
    assert verdict.reasons[0].severity == "critical"


def test_overall_of_no_areas_is_unknown() -> None:
    assert overall({}) == "unknown"
