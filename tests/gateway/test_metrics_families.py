"""The /metrics family builders: answer structs in, Prometheus families out (no NATS)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import msgspec
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from gateway import metrics_families as fam
from services.batch.contract import BatchStats, HeldLocks, LockStatus
from services.health.contract import ComprehensiveHealth
from services.usage.contract import UsageCosts, UsageCounters, UsageStats, UsageSummary
from shared.hook_status import HooksStatus, HookStatus
from shared.service_status import ServiceStatus
from tests.clocks import NOON

NOW = NOON  # the scrape's "now": the run's noon UTC, never a literal date
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


class _Fixed(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


def render(families: list[Metric]) -> Samples:
    """Through the text format and prometheus-client's parser, as Prometheus would see them."""
    registry = CollectorRegistry()
    registry.register(_Fixed(families))
    text = generate_latest(registry).decode()
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in found, f"duplicate series {key}"
            found[key] = sample.value
    return found


def series(found: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {labels: value for (n, labels), value in found.items() if n == name}


def key(**labels: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


# ----- answer builders ---------------------------------------------------------------------


def breakdown(requests: int, failed: int, prompt: int, completion: int, cost: float) -> Any:
    return {
        "requests": requests,
        "successful_requests": requests - failed,
        "failed_requests": failed,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cached_tokens": 0,
        "total_tokens": prompt + completion,
        "cost_usd": cost,
        "avg_response_time_ms": 100.0,
    }


def usage_stats(by_model: dict[str, Any], **extra: Any) -> UsageStats:
    total = sum(m["requests"] for m in by_model.values())
    failed = sum(m["failed_requests"] for m in by_model.values())
    body: dict[str, Any] = {
        "period": {"start": NOW.date(), "end": NOW.date(), "timezone": "UTC"},
        "total_requests": total,
        "successful_requests": total - failed,
        "failed_requests": failed,
        "success_rate": 100.0 * (total - failed) / total if total else 0.0,
        "error_rate": 100.0 * failed / total if total else 0.0,
        "prompt_tokens": 0,
        "completion_tokens": 0,
        "cached_tokens": 0,
        "total_tokens": 0,
        "total_cost_usd": 0.0,
        "avg_response_time_ms": 0.0,
        "p50_response_time_ms": 90.0,
        "p95_response_time_ms": 180.0,
        "p99_response_time_ms": 250.0,
        "requests_per_minute": 0.4,
        "by_endpoint": {},
        "by_model": by_model,
        "by_error_code": {},
        "by_status_code": {},
        "top_users": [],
        "unpriced_models": [],
    } | extra
    return msgspec.convert(body, UsageStats)


def usage_costs(by_model: dict[str, Any], daily_budget: float | None = None) -> UsageCosts:
    month_cost = sum(m["cost_usd"] for m in by_model.values())
    return msgspec.convert(
        {
            "currency": "USD",
            "today": {
                "cost_usd": 1.0,
                "budget_usd": daily_budget,
                "used_pct": None if daily_budget is None else 100.0 / daily_budget,
                "requests": 3,
            },
            "month": {"cost_usd": month_cost, "budget_usd": None, "used_pct": None, "requests": 9},
            "by_model": by_model,
            "daily": [],
            "unpriced_models": [],
            "forecast": {
                "month_end_cost_usd": 42.0,
                "budget_usd": None,
                "over_budget": False,
                "elapsed_pct": 85.0,
            },
        },
        UsageCosts,
    )


def component(name: str, kind: str, status: str, latency: float | None = 2.5) -> dict[str, Any]:
    return {
        "name": name,
        "kind": kind,
        "status": status,
        "latency_ms": latency,
        "details": {},
        "error": None,
        "checked_at": NOW if latency is not None else None,
        "last_result": status,
        "status_since": None,
        "pending_status": None,
        "pending_results": 0,
        "uptime_pct_1h": 100.0 if latency is not None else None,
        "uptime_pct_24h": 50.0 if latency is not None else None,
        "latency_p95_ms_1h": None,
        "latency_p95_ms_24h": None,
    }


def comprehensive(components: list[dict[str, Any]], status: str) -> ComprehensiveHealth:
    apis = [c for c in components if c["kind"] == "external_api"]
    return msgspec.convert(
        {
            "status": status,
            "checked_at": NOW,
            "cached": True,
            "age_s": 1.0,
            "components": components,
            "external_apis": {
                "status": "healthy",
                "apis": apis,
                "reachable": len(apis),
                "total": len(apis),
                "reachable_pct": 100.0 if apis else None,
                "checked_at": NOW,
                "cached": True,
                "age_s": 1.0,
            },
            "system_metrics": {
                "cpu_percent": 12.5,
                "memory_percent": 40.0,
                "disk_percent": 70.0,
                "uptime_s": 3600.0,
                "sampled_at": NOW,
            },
        },
        ComprehensiveHealth,
    )


def job_stats(**counts: int) -> dict[str, Any]:
    statuses = ("succeeded", "failed", "cancelled", "lost", "running")
    row: dict[str, Any] = {s: counts.get(s, 0) for s in statuses}
    finished = row["succeeded"] + row["failed"] + row["cancelled"] + row["lost"]
    return row | {
        "total": finished + row["running"],
        "success_rate": 100.0 * row["succeeded"] / finished if finished else None,
        "avg_duration_s": 2.0 if finished else None,
        "p95_duration_s": 3.0 if finished else None,
        "avg_throughput_per_s": None,
        "peak_memory_mb": None,
        "avg_cpu_percent": None,
        "last_started_at": NOW,
        "last_status": "succeeded",
    }


def batch_stats(by_job: dict[str, dict[str, Any]], hours: float = 24.0) -> BatchStats:
    body = job_stats() | {
        "hours": hours,
        "since": NOW - timedelta(hours=hours),
        "by_job": by_job,
        "failure_patterns": [
            {
                "error": "boom at item #",
                "count": 1,
                "last_seen": NOW,
                "example": "boom at item 3",
                "job_ids": ["sync"],
            }
        ],
    }
    return msgspec.convert(body, BatchStats)


def lock(job_id: str, expired: bool) -> LockStatus:
    return LockStatus(
        job_id=job_id,
        locked=not expired,
        owner="w1",
        acquired_at=NOW - timedelta(hours=1),
        expires_at=NOW + timedelta(hours=-0.5 if expired else 1),
        expired=expired,
        fencing_token=7,
        execution_id=None,
    )


def service_status(ready: bool, lag: int = 0) -> ServiceStatus:
    return msgspec.convert(
        {
            "service": "usage",
            "instance": "i1",
            "version": "1.0",
            "started_at": NOW,
            "uptime_s": 12.0,
            "ready": ready,
            "projections": [
                {
                    "name": "usage",
                    "stream": "STOCKPILOT_USAGE",
                    "last_seq": 40,
                    "lag": lag,
                    "caught_up": lag == 0,
                    "events_applied": 40,
                    "dead_lettered": 2,
                    "snapshot_seq": 0,
                    "snapshot_at": None,
                }
            ],
            "process": {"pid": 1, "rss_mb": 2.0, "cpu_percent": 1.0},
            "alerts_published": 0,
        },
        ServiceStatus,
    )


# ----- services ----------------------------------------------------------------------------


def test_a_silent_service_is_down_and_drops_its_projection_series() -> None:
    found = render(
        fam.service_families(
            {"health": None, "usage": service_status(ready=True), "batch": service_status(False, 5)}
        )
    )
    up = series(found, "stockpilot_service_up")
    assert up == {key(service="health"): 0.0, key(service="usage"): 1.0, key(service="batch"): 1.0}
    state = series(found, "stockpilot_service_state")
    assert state[key(service="health", state="unavailable")] == 1.0
    assert state[key(service="usage", state="up")] == 1.0
    assert state[key(service="batch", state="catching_up")] == 1.0
    assert sum(state.values()) == 3.0
    lag = series(found, "stockpilot_projection_lag_events")
    assert lag == {
        key(service="usage", projection="usage"): 0.0,
        key(service="batch", projection="usage"): 5.0,
    }
    assert found[("stockpilot_process_rss_bytes", key(service="usage"))] == 2.0 * 1024 * 1024
    dead = series(found, "stockpilot_projection_dead_letters_total")
    assert dead[key(service="usage", projection="usage")] == 2.0


# ----- usage -------------------------------------------------------------------------------


def usage_counters(by_model: dict[str, Any], **extra: Any) -> UsageCounters:
    body: dict[str, Any] = {
        "by_model": by_model,
        "by_error_code": {},
        "by_status_code": {},
        "latency_bounds_s": [0.5, 1.0, 5.0],
        "latency_buckets": [0, 0, 0],
        "latency_count": 0,
        "latency_sum_s": 0.0,
        "duplicates": 0,
    }
    return msgspec.convert(body | extra, UsageCounters)


def model_totals(requests: int, failed: int, prompt: int, completion: int, cost: float) -> Any:
    return {
        "requests": requests,
        "failed_requests": failed,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cached_tokens": 0,
        "cost_usd": cost,
    }


def test_calls_tokens_cost_and_errors_are_counters_by_model() -> None:
    counters = usage_counters(
        {
            "gpt-4o": model_totals(3, 1, 300, 30, 0.25),
            "gpt-4o-mini": model_totals(2, 0, 20, 10, 0.001),
        },
        by_error_code={"rate_limit": 1},
        by_status_code={"200": 4, "429": 1},
        duplicates=2,
    )
    families = fam.usage_counter_families(counters)
    assert {f.type for f in families} == {"counter", "histogram"}
    found = render(families)
    assert found[("stockpilot_llm_requests_total", key(model="gpt-4o"))] == 3
    assert found[("stockpilot_llm_failed_requests_total", key(model="gpt-4o"))] == 1
    assert found[("stockpilot_llm_failed_requests_total", key(model="gpt-4o-mini"))] == 0
    tokens = series(found, "stockpilot_llm_tokens_total")
    assert tokens[key(model="gpt-4o", type="prompt")] == 300
    assert tokens[key(model="gpt-4o", type="completion")] == 30
    assert tokens[key(model="gpt-4o-mini", type="cached")] == 0
    assert found[("stockpilot_llm_cost_usd_total", key(model="gpt-4o-mini"))] == 0.001
    assert found[("stockpilot_llm_errors_total", key(error_code="rate_limit"))] == 1
    assert found[("stockpilot_llm_responses_total", key(status_code="429"))] == 1
    assert found[("stockpilot_llm_duplicate_records_total", ())] == 2


def test_llm_response_time_is_a_histogram_in_seconds() -> None:
    counters = usage_counters({}, latency_buckets=[1, 3, 4], latency_count=5, latency_sum_s=12.5)
    found = render(fam.usage_counter_families(counters))
    buckets = series(found, "stockpilot_llm_response_time_seconds_bucket")
    assert buckets == {
        key(le="0.5"): 1.0,
        key(le="1.0"): 3.0,
        key(le="5.0"): 4.0,
        key(le="+Inf"): 5.0,
    }
    assert found[("stockpilot_llm_response_time_seconds_count", ())] == 5
    assert found[("stockpilot_llm_response_time_seconds_sum", ())] == 12.5


def test_no_calls_gives_empty_model_counters_not_zero_series() -> None:
    found = render(fam.usage_counter_families(usage_counters({})))
    assert series(found, "stockpilot_llm_requests_total") == {}
    assert found[("stockpilot_llm_response_time_seconds_count", ())] == 0


def test_todays_error_ratio_is_a_share_and_unpriced_models_are_named() -> None:
    stats = usage_stats(
        {"gpt-4o": breakdown(3, 1, 300, 30, 0.25), "gpt-4o-mini": breakdown(2, 0, 20, 10, 0.0)},
        unpriced_models=["mystery"],
    )
    found = render(fam.usage_today_families(stats))
    assert found[("stockpilot_llm_today_error_ratio", ())] == 0.2
    assert series(found, "stockpilot_llm_unpriced_model") == {key(model="mystery"): 1.0}


def test_budgets_are_gauges_of_the_calendar_period_with_ratios() -> None:
    month_row = {
        "cost_usd": 4.5,
        "requests": 30,
        "prompt_tokens": 3000,
        "completion_tokens": 300,
        "cached_tokens": 100,
    }
    families = fam.usage_budget_families(usage_costs({"gpt-4o": month_row}, daily_budget=10.0))
    assert {f.type for f in families} == {"gauge"}
    found = render(families)
    assert series(found, "stockpilot_llm_budget_usd") == {key(period="today"): 10.0}
    assert series(found, "stockpilot_llm_budget_used_ratio") == {key(period="today"): 0.1}
    assert found[("stockpilot_llm_period_spend_usd", key(period="month"))] == 4.5
    assert found[("stockpilot_llm_period_spend_usd", key(period="today"))] == 1.0
    assert found[("stockpilot_llm_forecast_month_end_usd", ())] == 42.0


def test_alerts_of_the_last_day() -> None:
    summary = msgspec.convert(
        {
            "today": {"requests": 1, "cost_usd": 0.0, "error_rate": 0.0, "budget_used_pct": None},
            "alerts_24h": 4,
        },
        UsageSummary,
    )
    assert render(fam.alert_families(summary)) == {("stockpilot_alerts", key(window="24h")): 4.0}


# ----- health ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "up"),
    [("healthy", 1.0), ("degraded", 1.0), ("unhealthy", 0.0), ("unknown", 0.0)],
)
def test_component_status_is_a_state_set_and_up_means_answering(status: str, up: float) -> None:
    health = comprehensive([component("redis", "redis", status)], status)
    found = render(fam.health_families(health))
    labels = {"component": "redis", "kind": "redis"}
    assert found[("stockpilot_component_up", key(**labels))] == up
    states = series(found, "stockpilot_component_status")
    assert states == {
        key(**labels, status=s): 1.0 if s == status else 0.0
        for s in ("healthy", "degraded", "unhealthy", "unknown")
    }
    overall = series(found, "stockpilot_health_status")
    assert overall[key(status=status)] == 1.0 and sum(overall.values()) == 1.0


def test_latency_and_uptime_only_for_probed_components() -> None:
    health = comprehensive(
        [
            component("database", "database", "healthy", latency=3.25),
            component("openai", "openai", "unknown", latency=None),
            component("external.quotes", "external_api", "degraded", latency=80.0),
        ],
        "degraded",
    )
    found = render(fam.health_families(health))
    latency = series(found, "stockpilot_component_latency_seconds")
    assert latency == {
        key(component="database", kind="database"): 0.00325,
        key(component="external.quotes", kind="external_api"): 0.08,
    }
    uptime = series(found, "stockpilot_component_uptime_ratio")
    assert uptime[key(component="database", kind="database", window="24h")] == 0.5
    assert not any(("component", "openai") in labels for labels in uptime)
    assert len(series(found, "stockpilot_component_up")) == 3  # external API listed once
    assert found[("stockpilot_health_host_cpu_ratio", ())] == 0.125


# ----- batch -------------------------------------------------------------------------------


@pytest.mark.parametrize(("hours", "window"), [(24.0, "24h"), (0.5, "0.5h"), (168, "168h")])
def test_batch_runs_by_job_and_status_name_their_window(hours: float, window: str) -> None:
    stats = batch_stats(
        {"sync": job_stats(succeeded=2, failed=1), "report": job_stats(running=1)}, hours
    )
    found = render(fam.batch_families(stats))
    runs = series(found, "stockpilot_batch_executions")
    assert runs[key(job="sync", status="succeeded", window=window)] == 2
    assert runs[key(job="sync", status="failed", window=window)] == 1
    assert runs[key(job="report", status="running", window=window)] == 1
    assert runs[key(job="report", status="lost", window=window)] == 0
    assert len(runs) == 10
    rate = series(found, "stockpilot_batch_success_ratio")
    assert rate == {key(job="sync", window=window): pytest.approx(2 / 3)}
    assert found[("stockpilot_batch_failure_patterns", key(window=window))] == 1


def test_open_and_expired_locks() -> None:
    held = HeldLocks(locks=[lock("b", expired=True), lock("a", expired=False)], total=2)
    found = render(fam.lock_families(held))
    assert found[("stockpilot_batch_locks_open", ())] == 2
    assert found[("stockpilot_batch_locks_expired", ())] == 1
    assert series(found, "stockpilot_batch_lock_expired") == {key(job="a"): 0.0, key(job="b"): 1.0}
    empty = render(fam.lock_families(HeldLocks(locks=[], total=0)))
    assert empty[("stockpilot_batch_locks_expired", ())] == 0


# ----- alert hooks -------------------------------------------------------------------------


def test_hooks_never_run_are_not_configured() -> None:
    found = render(fam.hook_families(None, NOW))
    assert series(found, "stockpilot_alert_hooks_process") == {
        key(state="up"): 0.0,
        key(state="unavailable"): 0.0,
        key(state="not_configured"): 1.0,
    }
    assert series(found, "stockpilot_alert_hook_deliveries_total") == {}


@pytest.mark.parametrize(("age_s", "process"), [(5.0, "up"), (31.0, "unavailable")])
def test_hook_deliveries_by_outcome_and_state(age_s: float, process: str) -> None:
    status = HooksStatus(
        updated_at=NOW - timedelta(seconds=age_s),
        pid=9,
        hooks=[
            HookStatus(name="slack", state="ok", delivered=5, skipped_duplicates=2, failures=1),
            HookStatus(
                name="pager",
                state="failing",
                failures=4,
                consecutive_failures=4,
                pending=3,
                parked=1,
            ),
        ],
    )
    found = render(fam.hook_families(status, NOW))
    assert found[("stockpilot_alert_hooks_process", key(state=process))] == 1.0
    assert found[("stockpilot_alert_hooks_status_age_seconds", ())] == age_s
    deliveries = series(found, "stockpilot_alert_hook_deliveries_total")
    assert deliveries == {
        key(hook="slack", outcome="delivered"): 5,
        key(hook="slack", outcome="failed"): 1,
        key(hook="slack", outcome="skipped_duplicate"): 2,
        key(hook="slack", outcome="parked"): 0,
        key(hook="pager", outcome="delivered"): 0,
        key(hook="pager", outcome="failed"): 4,
        key(hook="pager", outcome="skipped_duplicate"): 0,
        key(hook="pager", outcome="parked"): 1,
    }
    assert found[("stockpilot_alert_hook_state", key(hook="pager", state="failing"))] == 1.0
    assert found[("stockpilot_alert_hook_state", key(hook="pager", state="ok"))] == 0.0
    assert series(found, "stockpilot_alert_hook_pending_alerts") == {key(hook="pager"): 3}


def test_a_hook_process_that_stopped_is_unavailable_while_its_status_is_fresh() -> None:
    """Its last status, written on the way out (stopped or a loop failed), never says `up`."""
    status = HooksStatus(updated_at=NOW, pid=9, hooks=[], stopped=True, failure="hook-x: boom")
    found = render(fam.hook_families(status, NOW))
    assert found[("stockpilot_alert_hooks_process", key(state="unavailable"))] == 1.0
    assert found[("stockpilot_alert_hooks_process", key(state="up"))] == 0.0


def test_every_family_has_help_and_the_prefix() -> None:
    families = [
        *fam.service_families({"usage": service_status(True)}),
        *fam.usage_today_families(usage_stats({"m": breakdown(1, 0, 1, 1, 0.1)})),
        *fam.health_families(comprehensive([component("redis", "redis", "healthy")], "healthy")),
        *fam.batch_families(batch_stats({"sync": job_stats(succeeded=1)})),
        *fam.lock_families(HeldLocks(locks=[], total=0)),
        *fam.hook_families(None, NOW),
    ]
    for family in families:
        assert family.name.startswith("stockpilot_"), family.name
        assert family.documentation, family.name
