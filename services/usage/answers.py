"""Parameters and answers of the usage endpoints (the gateway's response schemas)."""

from __future__ import annotations

from datetime import date
from typing import Annotated, Literal

import msgspec

from shared.events import Alert, AwareDatetime

# ----- parameters --------------------------------------------------------------------------

# A date or an RFC 3339 time is short; the gateway also checks the year's range.
Moment = Annotated[str, msgspec.Meta(max_length=64)]


class StatsParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`?date=` or `?start=&end=` (YYYY-MM-DD in STOCKPILOT_TZ); today by default."""

    date: Moment | None = None
    start: Moment | None = None
    end: Moment | None = None


class TimeseriesParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`?bucket=hour|day&start=&end=`; hourly today by default."""

    bucket: Annotated[str, msgspec.Meta(max_length=16)] = "hour"
    start: Moment | None = None
    end: Moment | None = None


class AlertsParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`?limit=` 1–1000."""

    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100


# ----- answers -----------------------------------------------------------------------------


class StatsPeriod(msgspec.Struct, kw_only=True):
    """The days a statistics answer covers (inclusive, in `timezone`)."""

    start: date
    end: date
    timezone: str


class Breakdown(msgspec.Struct, kw_only=True):
    """Usage of one endpoint, model or user."""

    requests: int
    successful_requests: int
    failed_requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    total_tokens: int
    cost_usd: float
    avg_response_time_ms: float


class UserUsage(msgspec.Struct, kw_only=True):
    """One of the heaviest users."""

    user_id: str
    requests: int
    failed_requests: int
    total_tokens: int
    cost_usd: float


class UsageStats(msgspec.Struct, kw_only=True):
    """`GET /api/v1/usage/stats`; rates are percentages (0–100)."""

    period: StatsPeriod
    total_requests: int
    successful_requests: int
    failed_requests: int
    # null when there were no calls in the period
    success_rate: float | None
    error_rate: float | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    total_tokens: int
    total_cost_usd: float
    avg_response_time_ms: float
    p50_response_time_ms: float
    p95_response_time_ms: float
    p99_response_time_ms: float
    requests_per_minute: float
    by_endpoint: dict[str, Breakdown]
    by_model: dict[str, Breakdown]
    by_error_code: dict[str, int]
    by_status_code: dict[str, int]
    top_users: list[UserUsage]
    unpriced_models: list[str]


class TimePoint(msgspec.Struct, kw_only=True):
    """One bucket of the time series (`t` is its start in STOCKPILOT_TZ)."""

    t: AwareDatetime
    requests: int
    failed: int
    tokens: int
    cost_usd: float
    avg_response_time_ms: float
    p95_response_time_ms: float


class UsageTimeseries(msgspec.Struct, kw_only=True):
    """`GET /api/v1/usage/timeseries`: every bucket of the range, zeros included."""

    bucket: Literal["hour", "day"]
    timezone: str
    start: AwareDatetime
    end: AwareDatetime
    points: list[TimePoint]


class BudgetUse(msgspec.Struct, kw_only=True):
    """Spend against a budget (`budget_usd`/`used_pct` null without a budget)."""

    cost_usd: float
    budget_usd: float | None
    used_pct: float | None
    requests: int


class ModelCost(msgspec.Struct, kw_only=True):
    """One model's spend this month."""

    cost_usd: float
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int


class DailyCost(msgspec.Struct, kw_only=True):
    """One day's spend."""

    date: date
    cost_usd: float
    requests: int


class CostForecast(msgspec.Struct, kw_only=True):
    """This month's spend extrapolated to its end at the pace so far."""

    month_end_cost_usd: float
    budget_usd: float | None
    over_budget: bool
    elapsed_pct: float


class UsageCosts(msgspec.Struct, kw_only=True):
    """`GET /api/v1/usage/costs`."""

    currency: str
    today: BudgetUse
    month: BudgetUse
    by_model: dict[str, ModelCost]
    daily: list[DailyCost]
    unpriced_models: list[str]
    forecast: CostForecast


class AlertList(msgspec.Struct, kw_only=True):
    """`GET /api/v1/usage/alerts`: newest first; `total` alerts held."""

    alerts: list[Alert]
    total: int


# ----- helpers -----------------------------------------------------------------------------


class ModelTotals(msgspec.Struct, kw_only=True):
    """Every call to one model ever recorded (never reset)."""

    requests: int
    failed_requests: int
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    cost_usd: float


class UsageCounters(msgspec.Struct, kw_only=True):
    """The `counters` answer: lifetime totals folded from the whole stream, for /metrics.

    They only grow (a usage.reset does not touch them) and a replay gives the same values, so
    Prometheus can take `rate()` and `increase()` of them. `latency_buckets` are cumulative
    counts of calls with a response time at or under each `latency_bounds_s` bound.
    """

    by_model: dict[str, ModelTotals]
    by_error_code: dict[str, int]
    by_status_code: dict[str, int]
    latency_bounds_s: list[float]
    latency_buckets: list[int]
    latency_count: int
    latency_sum_s: float
    duplicates: int
