"""Prometheus metric families built from the services' answers: pure, one builder per area.

Why one module of over 300 lines: it is the whole of /metrics' naming, one short builder per
area under the conventions below; keeping them together keeps the names, units and state sets
consistent, and splitting per area would scatter those conventions.

Each builder takes the very answers the REST routes serve (decoded structs) and returns
metric families, so `/metrics` and `/api/v1/...` agree and every builder is table-testable
without NATS. Conventions:

- Everything is prefixed `stockpilot_`; base units are in the names (`_seconds`, `_bytes`,
  `_usd`), shares are `_ratio` from 0 to 1 (Prometheus' naming conventions, which
  `promtool check metrics` enforces).
- What accumulates (LLM calls, tokens, spend, dead letters, deliveries) is a counter
  (`_total`), so `rate()` and `increase()` work; LLM latency is a histogram.
- Figures over a calendar period or a sliding window ("today", "this month", "the last
  24 h") are gauges labelled with it (`period`, `window`): they fall back at midnight or
  slide, so they are not counters.
- A status is exposed as a state set: one series per possible state, 1 for the current one,
  0 for the others (`sum by (component) (...)` is always 1, and `== 1` selects the state).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import get_args

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from services.batch.contract import BatchStats, HeldLocks
from services.health.contract import ComponentHealth, ComprehensiveHealth, Status
from services.usage.contract import UsageCosts, UsageCounters, UsageStats, UsageSummary
from shared.hook_status import STALE_AFTER_S, HooksStatus, HookStateName
from shared.hook_status import hooks_process_state as process_state
from shared.service_status import ServiceStatus
from shared.transport import TransportPath

COMPONENT_STATUSES: tuple[str, ...] = get_args(Status)
HOOK_STATES: tuple[str, ...] = get_args(HookStateName)
SERVICE_STATES = ("up", "catching_up", "unavailable")
HOOKS_PROCESS_STATES = ("up", "unavailable", "not_configured")
TRANSPORT_PATHS: tuple[str, ...] = get_args(TransportPath)
# A component counts as up while it answers, even slowly.
UP_STATUSES = frozenset({"healthy", "degraded"})


def state_set(
    name: str, documentation: str, labels: Sequence[str], state_label: str
) -> GaugeMetricFamily:
    """An empty state-set family: fill it with `add_state`."""
    return GaugeMetricFamily(name, documentation, labels=[*labels, state_label])


def add_state(
    family: GaugeMetricFamily, values: Sequence[str], states: Iterable[str], current: str
) -> None:
    """One series per state, 1 for `current` (added even when not among `states`)."""
    known = list(states)
    if current not in known:
        known.append(current)
    for state in known:
        family.add_metric([*values, state], 1.0 if state == current else 0.0)


# ----- services ----------------------------------------------------------------------------


def service_families(statuses: dict[str, ServiceStatus | None]) -> list[Metric]:
    """Whether each service answers (its `status` endpoint), its projections and its RSS."""
    up = GaugeMetricFamily(
        "stockpilot_service_up",
        "1 when the service answered its status endpoint during this scrape, else 0",
        labels=["service"],
    )
    state = state_set(
        "stockpilot_service_state",
        "The service's state as GET /api/v1/status shows it (1 for the current state)",
        ["service"],
        "state",
    )
    lag = GaugeMetricFamily(
        "stockpilot_projection_lag_events",
        "Events in the stream not yet folded into the projection",
        labels=["service", "projection"],
    )
    last_seq = GaugeMetricFamily(
        "stockpilot_projection_last_seq",
        "Last stream sequence folded into the projection",
        labels=["service", "projection"],
    )
    dead = CounterMetricFamily(
        "stockpilot_projection_dead_letters",
        "Messages refused and dead-lettered since the service process started",
        labels=["service", "projection"],
    )
    rss = GaugeMetricFamily(
        "stockpilot_process_rss_bytes", "Resident memory of the service process", labels=["service"]
    )
    uptime = GaugeMetricFamily(
        "stockpilot_process_uptime_seconds",
        "Seconds since the service process started",
        labels=["service"],
    )
    for name, status in statuses.items():
        up.add_metric([name], 0.0 if status is None else 1.0)
        if status is None:
            add_state(state, [name], SERVICE_STATES, "unavailable")
            continue
        add_state(state, [name], SERVICE_STATES, "up" if status.ready else "catching_up")
        rss.add_metric([name], status.process.rss_mb * 1024 * 1024)
        uptime.add_metric([name], status.uptime_s)
        for projection in status.projections:
            lag.add_metric([name, projection.name], projection.lag)
            last_seq.add_metric([name, projection.name], projection.last_seq)
            dead.add_metric([name, projection.name], projection.dead_lettered)
    return [up, state, lag, last_seq, dead, rss, uptime]


def transport_families(statuses: dict[str, ServiceStatus | None]) -> list[Metric]:
    """Which transport path each projection reads its stream over (shared.transport), as a
    state set: `accelerated` (our own protocol code) or `nats-py` (the reference path)."""
    family = state_set(
        "stockpilot_projection_transport",
        "The transport path the projection reads its stream over (1 for the current one)",
        ["service", "projection"],
        "path",
    )
    for name, status in statuses.items():
        for projection in status.projections if status is not None else ():
            if projection.transport is not None:
                add_state(family, [name, projection.name], TRANSPORT_PATHS, projection.transport)
    return [family]


# ----- usage -------------------------------------------------------------------------------


def usage_counter_families(counters: UsageCounters) -> list[Metric]:
    """Every LLM call ever recorded (GET usage `counters`): counters and a latency histogram.

    Folded from the whole stream and never reset (a usage.reset leaves them alone), so
    `rate()` and `increase()` work and a restart of the usage service does not set them back.
    """
    requests = CounterMetricFamily(
        "stockpilot_llm_requests", "LLM calls recorded, by model", labels=["model"]
    )
    failed = CounterMetricFamily(
        "stockpilot_llm_failed_requests",
        "Failed LLM calls (status code >= 400 or an error code), by model",
        labels=["model"],
    )
    tokens = CounterMetricFamily(
        "stockpilot_llm_tokens",
        "LLM tokens, by model and type (prompt, completion, cached)",
        labels=["model", "type"],
    )
    cost = CounterMetricFamily(
        "stockpilot_llm_cost_usd", "LLM spend in US dollars, by model", labels=["model"]
    )
    for model, row in sorted(counters.by_model.items()):
        requests.add_metric([model], row.requests)
        failed.add_metric([model], row.failed_requests)
        tokens.add_metric([model, "prompt"], row.prompt_tokens)
        tokens.add_metric([model, "completion"], row.completion_tokens)
        tokens.add_metric([model, "cached"], row.cached_tokens)
        cost.add_metric([model], row.cost_usd)
    errors = CounterMetricFamily(
        "stockpilot_llm_errors",
        "LLM calls that reported an error code, by error code",
        labels=["error_code"],
    )
    for code, count in sorted(counters.by_error_code.items()):
        errors.add_metric([code], count)
    responses = CounterMetricFamily(
        "stockpilot_llm_responses",
        "LLM calls by the HTTP status code they reported",
        labels=["status_code"],
    )
    for code, count in sorted(counters.by_status_code.items()):
        responses.add_metric([code], count)
    duplicates = CounterMetricFamily(
        "stockpilot_llm_duplicate_records",
        "Usage records dropped as repeats of an id already counted",
    )
    duplicates.add_metric([], counters.duplicates)
    latency = HistogramMetricFamily(
        "stockpilot_llm_response_time_seconds",
        "LLM response time of the calls that reported one",
    )
    buckets = [
        (repr(float(bound)), float(count))  # "1.0": as prometheus-client writes `le`
        for bound, count in zip(counters.latency_bounds_s, counters.latency_buckets, strict=True)
    ]
    buckets.append(("+Inf", float(counters.latency_count)))
    latency.add_metric([], buckets, counters.latency_sum_s)
    return [requests, failed, tokens, cost, errors, responses, duplicates, latency]


def usage_today_families(stats: UsageStats) -> list[Metric]:
    """Figures of today's statistics that counters cannot give: the calendar day's error
    ratio and the models seen without a price."""
    error_ratio = GaugeMetricFamily(
        "stockpilot_llm_today_error_ratio",
        "Failed LLM calls as a share (0-1) of today's calls, in STOCKPILOT_TZ",
    )
    if stats.error_rate is not None:  # no calls: no ratio, rather than a reassuring 0
        error_ratio.add_metric([], stats.error_rate / 100.0)
    unpriced = GaugeMetricFamily(
        "stockpilot_llm_unpriced_model",
        "1 for each model seen without a price (its calls cost 0)",
        labels=["model"],
    )
    for model in stats.unpriced_models:
        unpriced.add_metric([model], 1.0)
    return [error_ratio, unpriced]


def usage_budget_families(costs: UsageCosts) -> list[Metric]:
    """Spend of the calendar day and month against their budgets (GET /api/v1/usage/costs).

    Gauges labelled `period` (today, month): they fall back to 0 when the period turns, which
    is what a budget counts; use `stockpilot_llm_cost_usd_total` for rates.
    """
    spend = GaugeMetricFamily(
        "stockpilot_llm_period_spend_usd",
        "LLM spend of the calendar period so far (today, month), in STOCKPILOT_TZ",
        labels=["period"],
    )
    budget = GaugeMetricFamily(
        "stockpilot_llm_budget_usd", "The configured budget of the period", labels=["period"]
    )
    used = GaugeMetricFamily(
        "stockpilot_llm_budget_used_ratio",
        "The period's spend as a share of its budget (1 = all spent)",
        labels=["period"],
    )
    for name, use in (("today", costs.today), ("month", costs.month)):
        spend.add_metric([name], use.cost_usd)
        if use.budget_usd is not None:
            budget.add_metric([name], use.budget_usd)
        if use.used_pct is not None:
            used.add_metric([name], use.used_pct / 100.0)
    forecast = GaugeMetricFamily(
        "stockpilot_llm_forecast_month_end_usd",
        "This month's spend extrapolated to its end at the pace so far",
    )
    forecast.add_metric([], costs.forecast.month_end_cost_usd)
    return [spend, budget, used, forecast]


def alert_families(summary: UsageSummary) -> list[Metric]:
    """Alerts raised in the last 24 hours, every source (GET /api/v1/status `alerts_24h`)."""
    alerts = GaugeMetricFamily(
        "stockpilot_alerts", "Alerts raised in the window, every source", labels=["window"]
    )
    alerts.add_metric(["24h"], summary.alerts_24h)
    return [alerts]


# ----- health ------------------------------------------------------------------------------


def health_families(health: ComprehensiveHealth) -> list[Metric]:
    """Components of GET /api/v1/health/comprehensive: up, status, latency, uptime."""
    up = GaugeMetricFamily(
        "stockpilot_component_up",
        "1 when the component is healthy or degraded, 0 when unhealthy or unknown"
        " (unknown: not configured or not probed yet)",
        labels=["component", "kind"],
    )
    status = state_set(
        "stockpilot_component_status",
        "The component's status (1 for the current one: healthy, degraded, unhealthy, unknown)",
        ["component", "kind"],
        "status",
    )
    latency = GaugeMetricFamily(
        "stockpilot_component_latency_seconds",
        "Latency of the component's latest probe",
        labels=["component", "kind"],
    )
    uptime = GaugeMetricFamily(
        "stockpilot_component_uptime_ratio",
        "Share (0-1) of probes in the window that found the component up (unknown ones left out)",
        labels=["component", "kind", "window"],
    )
    checked = GaugeMetricFamily(
        "stockpilot_component_checked_timestamp_seconds",
        "When the component was last probed (Unix time)",
        labels=["component", "kind"],
    )
    components: list[ComponentHealth] = [*health.components]
    seen = {c.name for c in components}
    components.extend(c for c in health.external_apis.apis if c.name not in seen)
    for component in components:
        labels = [component.name, component.kind]
        up.add_metric(labels, 1.0 if component.status in UP_STATUSES else 0.0)
        add_state(status, labels, COMPONENT_STATUSES, component.status)
        if component.latency_ms is not None:
            latency.add_metric(labels, component.latency_ms / 1000.0)
        if component.uptime_pct_1h is not None:
            uptime.add_metric([*labels, "1h"], component.uptime_pct_1h / 100.0)
        if component.uptime_pct_24h is not None:
            uptime.add_metric([*labels, "24h"], component.uptime_pct_24h / 100.0)
        if component.checked_at is not None:
            checked.add_metric(labels, component.checked_at.timestamp())
    overall = state_set(
        "stockpilot_health_status",
        "The overall status: unhealthy if any component is, else degraded if any is",
        [],
        "status",
    )
    add_state(overall, [], COMPONENT_STATUSES, health.status)
    families: list[Metric] = [up, status, latency, uptime, checked, overall]
    if health.system_metrics is not None:
        host = health.system_metrics
        for name, value, what in (
            ("cpu_ratio", host.cpu_percent / 100.0, "CPU use (0-1)"),
            ("memory_ratio", host.memory_percent / 100.0, "memory use (0-1)"),
            ("disk_ratio", host.disk_percent / 100.0, "disk use (0-1)"),
            ("uptime_seconds", host.uptime_s, "uptime"),
        ):
            family = GaugeMetricFamily(
                f"stockpilot_health_host_{name}", f"The health service host's {what}"
            )
            family.add_metric([], value)
            families.append(family)
    return families


# ----- batch -------------------------------------------------------------------------------


def window_label(hours: float) -> str:
    """`24.0` → `24h`, `0.5` → `0.5h`."""
    return f"{hours:g}h"


def batch_families(stats: BatchStats) -> list[Metric]:
    """Executions started in the stats window (GET /api/v1/batch/executions/stats), by job."""
    window = window_label(stats.hours)
    runs = GaugeMetricFamily(
        "stockpilot_batch_executions",
        "Batch executions started in the window, by job and status",
        labels=["job", "status", "window"],
    )
    success = GaugeMetricFamily(
        "stockpilot_batch_success_ratio",
        "Succeeded executions as a share (0-1) of the finished ones in the window",
        labels=["job", "window"],
    )
    avg = GaugeMetricFamily(
        "stockpilot_batch_duration_avg_seconds",
        "Mean duration of the executions finished in the window",
        labels=["job", "window"],
    )
    p95 = GaugeMetricFamily(
        "stockpilot_batch_duration_p95_seconds",
        "95th percentile duration of the executions finished in the window",
        labels=["job", "window"],
    )
    last_started = GaugeMetricFamily(
        "stockpilot_batch_last_started_timestamp_seconds",
        "When the job's newest execution in the window started (Unix time)",
        labels=["job", "window"],
    )
    for job, row in sorted(stats.by_job.items()):
        for status, count in (
            ("succeeded", row.succeeded),
            ("failed", row.failed),
            ("cancelled", row.cancelled),
            ("lost", row.lost),
            ("running", row.running),
        ):
            runs.add_metric([job, status, window], count)
        if row.success_rate is not None:
            success.add_metric([job, window], row.success_rate / 100.0)
        if row.avg_duration_s is not None:
            avg.add_metric([job, window], row.avg_duration_s)
        if row.p95_duration_s is not None:
            p95.add_metric([job, window], row.p95_duration_s)
        if row.last_started_at is not None:
            last_started.add_metric([job, window], row.last_started_at.timestamp())
    patterns = GaugeMetricFamily(
        "stockpilot_batch_failure_patterns",
        "Distinct failure patterns (errors differing only in numbers, ids, paths) in the window",
        labels=["window"],
    )
    patterns.add_metric([window], len(stats.failure_patterns))
    return [runs, success, avg, p95, last_started, patterns]


def lock_families(held: HeldLocks) -> list[Metric]:
    """Job locks not released yet (GET /api/v1/batch/locks), live or expired."""
    open_locks = GaugeMetricFamily(
        "stockpilot_batch_locks_open", "Job locks held and not released yet (live or expired)"
    )
    expired = GaugeMetricFamily(
        "stockpilot_batch_locks_expired",
        "Job locks held past their lifetime and not released (cleanup releases them)",
    )
    per_job = GaugeMetricFamily(
        "stockpilot_batch_lock_expired",
        "One series per open lock: 1 when it has expired, 0 while live",
        labels=["job"],
    )
    expires = GaugeMetricFamily(
        "stockpilot_batch_lock_expires_timestamp_seconds",
        "When the open lock expires (Unix time)",
        labels=["job"],
    )
    open_locks.add_metric([], held.total)
    expired.add_metric([], sum(1 for lock in held.locks if lock.expired))
    for lock in sorted(held.locks, key=lambda lock: lock.job_id):
        per_job.add_metric([lock.job_id], 1.0 if lock.expired else 0.0)
        if lock.expires_at is not None:
            expires.add_metric([lock.job_id], lock.expires_at.timestamp())
    return [open_locks, expired, per_job, expires]


# ----- alert hooks -------------------------------------------------------------------------


def hooks_process_state(status: HooksStatus | None, now: datetime) -> str:
    """`not_configured` (never ran), `up`, or `unavailable` (stopped, failed or stale)."""
    return process_state(status, now)


def hook_families(status: HooksStatus | None, now: datetime) -> list[Metric]:
    """Alert deliveries by hook and outcome, as the hook process last published them."""
    process = state_set(
        "stockpilot_alert_hooks_process",
        "The alert-hook process as GET /api/v1/status shows it"
        f" (unavailable: stopped, or its status is older than {STALE_AFTER_S:g} s)",
        [],
        "state",
    )
    add_state(process, [], HOOKS_PROCESS_STATES, hooks_process_state(status, now))
    families: list[Metric] = [process]
    if status is None:
        return families
    age = GaugeMetricFamily(
        "stockpilot_alert_hooks_status_age_seconds",
        "Seconds since the hook process last published its status",
    )
    age.add_metric([], max(0.0, (now - status.updated_at).total_seconds()))
    deliveries = CounterMetricFamily(
        "stockpilot_alert_hook_deliveries",
        "Alert deliveries since the hook process started, by hook and outcome"
        " (delivered, failed attempts, skipped duplicates)",
        labels=["hook", "outcome"],
    )
    state = state_set(
        "stockpilot_alert_hook_state",
        "The hook's delivery state (1 for the current one)",
        ["hook"],
        "state",
    )
    streak = GaugeMetricFamily(
        "stockpilot_alert_hook_consecutive_failures",
        "Failed delivery attempts in a row",
        labels=["hook"],
    )
    pending = GaugeMetricFamily(
        "stockpilot_alert_hook_pending_alerts", "Alerts not delivered yet", labels=["hook"]
    )
    for hook in sorted(status.hooks, key=lambda hook: hook.name):
        deliveries.add_metric([hook.name, "delivered"], hook.delivered)
        deliveries.add_metric([hook.name, "failed"], hook.failures)
        deliveries.add_metric([hook.name, "skipped_duplicate"], hook.skipped_duplicates)
        deliveries.add_metric([hook.name, "parked"], hook.parked)
        add_state(state, [hook.name], HOOK_STATES, hook.state)
        streak.add_metric([hook.name], hook.consecutive_failures)
        if hook.pending is not None:
            pending.add_metric([hook.name], hook.pending)
    families.extend([age, deliveries, state, streak, pending])
    return families
