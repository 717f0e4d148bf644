"""The usage service's wire contract: its subjects and events, the parameters its endpoints
take and the answers they give (the gateway serves most of them as they are).

This module is the usage package's public face: the gateway, ops, the demo and the bench
import the service's wire types from here and from nowhere else (tests/test_import_rules.py),
and each struct is defined here once. It holds declarations and the validation that belongs
to them (bounds, `stored_problem`), no logic: queries, decisions and folds stay in their own
modules. Why it runs past 300 lines: it is a flat list of declarations, read top to bottom,
and splitting it would scatter the contract again (issue 15).
"""

from __future__ import annotations

from datetime import date, datetime
from typing import Annotated, Literal

import msgspec

from shared.events import Alert, AwareDatetime, Event, EventId, wrong_subject

# ===== events: the STOCKPILOT_USAGE stream (contract §4 usage) ===============================

SUBJECT_RECORDED = "stockpilot.usage.recorded"
SUBJECT_RESET = "stockpilot.usage.reset"
SUBJECT_PRICES = "stockpilot.usage.prices_changed"

# Ranges of the contract (§4): what no real LLM call comes near, and what keeps every sum,
# snapshot and answer finite and small (a 1.7e308 cost or a 2^64-1 token count broke them).
# An upper bound on a float also refuses infinity; JSON has no NaN.
TokenCount = Annotated[int, msgspec.Meta(ge=0, lt=10**9)]
CostUsd = Annotated[float, msgspec.Meta(ge=0, lt=1e6)]
Millis = Annotated[float, msgspec.Meta(ge=0, lt=1e8)]
# 0 stands for "no HTTP answer at all" (a connection error; error_code says which).
StatusCode = Annotated[int, msgspec.Meta(ge=0, le=999)]
# Model names are short ("gpt-4o-mini-2024-07-18"); 128 leaves room for fine-tune names.
ModelName = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
# A request id is a UUID or the like; a user id an opaque key of StockPilot AI.
ShortId = Annotated[str, msgspec.Meta(max_length=256)]
# An endpoint is a URL path of StockPilot AI ("/api/v1/analysis").
EndpointPath = Annotated[str, msgspec.Meta(max_length=512)]
# An error code is a label ("rate_limit_exceeded", "timeout").
ErrorCode = Annotated[str, msgspec.Meta(max_length=128)]
# A tag is a short label the caller chooses ("feature:screener"); 16 of them at most, so
# a breakdown by tag stays small and a filter by tag stays cheap.
Tag = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Tags = Annotated[tuple[Tag, ...], msgspec.Meta(max_length=16)]
# A task type is a label too ("summary", "classification").
TaskType = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
# The provider's error text: enough to tell errors apart, not a whole response body.
ErrorMessage = Annotated[str, msgspec.Meta(max_length=1000)]
Actor = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Reason = Annotated[str, msgspec.Meta(max_length=500)]


class UsageRecorded(Event, frozen=True, kw_only=True, tag="usage.recorded"):
    """One LLM call (`stockpilot.usage.recorded`)."""

    model: ModelName
    status_code: StatusCode
    request_id: ShortId | None = None
    endpoint: EndpointPath | None = None
    prompt_tokens: TokenCount = 0
    completion_tokens: TokenCount = 0
    cached_tokens: TokenCount = 0
    cost_usd: CostUsd | None = None
    error_code: ErrorCode | None = None
    response_time_ms: Millis | None = None
    user_id: ShortId | None = None
    # Optional (contract §4), added later: defaults, so events without them still decode.
    tags: Tags = ()
    task_type: TaskType | None = None
    error_message: ErrorMessage | None = None
    stream: bool = False
    # Time to the first content of a streamed call, from its start.
    ttft_ms: Millis | None = None

    def stored_problem(self, subject: str) -> str | None:
        """A recorded call belongs on `stockpilot.usage.recorded` only, and its names are
        printable: they reach alert ids (a Nats-Msg-Id header), logs and webhook texts.

        Checked here rather than in `__post_init__`, which would make every decode half as
        slow again; one expression, as this runs for every event folded.
        """
        if subject != SUBJECT_RECORDED:
            return wrong_subject("a usage.recorded event", subject, SUBJECT_RECORDED)
        if not (
            self.model.isprintable()
            and self.id.isprintable()
            and (self.user_id is None or self.user_id.isprintable())
            and (self.endpoint is None or self.endpoint.isprintable())
            and (self.request_id is None or self.request_id.isprintable())
            and (self.error_code is None or self.error_code.isprintable())
            and (self.task_type is None or self.task_type.isprintable())
            and (not self.tags or all(tag.isprintable() for tag in self.tags))
        ):
            return UNPRINTABLE
        return None

    @property
    def failed(self) -> bool:
        """A call fails with an HTTP status >= 400 or any error code."""
        return self.status_code >= 400 or bool(self.error_code)


UNPRINTABLE = (
    "id, model, request_id, endpoint, user_id, error_code, task_type and tags must not contain "
    "control characters"
)


def printable(value: str, name: str) -> None:
    """Refuse (ValueError: msgspec reports it as a validation error) a name with control or
    other non-printable characters."""
    if not value.isprintable():
        raise ValueError(f"`{name}` must not contain control characters")


class UsageReset(Event, frozen=True, kw_only=True, tag="usage.reset"):
    """Statistics restart from zero (`stockpilot.usage.reset`); the stream keeps everything."""

    actor: Actor
    scope: Literal["all"] = "all"
    reason: Reason | None = None

    def stored_problem(self, subject: str) -> str | None:
        """A reset belongs on `stockpilot.usage.reset` only (which producers may not publish)."""
        if subject == SUBJECT_RESET:
            return None
        return wrong_subject("a usage.reset event", subject, SUBJECT_RESET)


# USD per million tokens; the dearest list price today is in the hundreds.
PriceUsd = Annotated[float, msgspec.Meta(ge=0, lt=1e6)]
# Models in one price table (the shipped one has a few dozen).
PRICE_MODELS_LIMIT = 2_000


class Price(msgspec.Struct, frozen=True, kw_only=True):
    """One model's price in USD per million tokens; cached input costs the input price
    unless given."""

    input: PriceUsd
    output: PriceUsd = 0.0
    cached_input: PriceUsd | None = None


class PricesChanged(Event, frozen=True, kw_only=True, tag="usage.prices_changed"):
    """The price table in effect from `occurred_at` on (`stockpilot.usage.prices_changed`),
    published by the usage service when its configured table differs from the stream's last.
    """

    prices: Annotated[dict[ModelName, Price], msgspec.Meta(max_length=PRICE_MODELS_LIMIT)]

    def stored_problem(self, subject: str) -> str | None:
        """A price table belongs on its own subject (which only the usage service publishes)."""
        if subject == SUBJECT_PRICES:
            return None
        return wrong_subject("a usage.prices_changed event", subject, SUBJECT_PRICES)


UsageEvent = UsageRecorded | UsageReset | PricesChanged

decode_usage_event = msgspec.json.Decoder(UsageEvent).decode


class UsageRecordedIn(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=False):
    """A record posted to `POST /api/v1/usage/records`: the event with lenient defaults.

    `type` may be left out, `id` defaults to `request_id` (assigned when both are missing),
    `occurred_at` defaults to when the gateway received it. Extra fields are ignored, as on
    the subject, so a newer client can post to an older gateway.
    """

    model: ModelName
    status_code: StatusCode
    type: Literal["usage.recorded"] = "usage.recorded"
    id: EventId | None = None
    occurred_at: AwareDatetime | None = None
    request_id: ShortId | None = None
    endpoint: EndpointPath | None = None
    prompt_tokens: TokenCount = 0
    completion_tokens: TokenCount = 0
    cached_tokens: TokenCount = 0
    cost_usd: CostUsd | None = None
    error_code: ErrorCode | None = None
    response_time_ms: Millis | None = None
    user_id: ShortId | None = None
    # Optional (contract §4), added later: defaults, so events without them still decode.
    tags: Tags = ()
    task_type: TaskType | None = None
    error_message: ErrorMessage | None = None
    stream: bool = False
    # Time to the first content of a streamed call, from its start.
    ttft_ms: Millis | None = None

    def __post_init__(self) -> None:
        for name in ("id", "model", "request_id", "endpoint", "user_id", "error_code", "task_type"):
            value = getattr(self, name)
            if value is not None:
                printable(value, name)
        for index, tag in enumerate(self.tags):
            printable(tag, f"tags[{index}]")


# ===== endpoints: parameters and answers (the gateway's response schemas) ====================

# ----- parameters --------------------------------------------------------------------------

# A date or an RFC 3339 time is short; the gateway also checks the year's range.
Moment = Annotated[str, msgspec.Meta(max_length=64)]


# What a statistics or time-series answer may be narrowed to: the calls of one user, model
# (its dated names too), endpoint or tag, in any combination.
UserFilter = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
ModelFilter = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
EndpointFilter = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
TagFilter = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
GroupBy = Literal["model", "endpoint", "user_id", "tag"]


class StatsParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`?date=` or `?start=&end=` (YYYY-MM-DD in STOCKPILOT_TZ); today by default; filters."""

    date: Moment | None = None
    start: Moment | None = None
    end: Moment | None = None
    user_id: UserFilter | None = None
    model: ModelFilter | None = None
    endpoint: EndpointFilter | None = None
    tag: TagFilter | None = None


class TimeseriesParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`?bucket=hour|day&start=&end=`; hourly today by default; filters and `group_by`."""

    bucket: Annotated[str, msgspec.Meta(max_length=16)] = "hour"
    start: Moment | None = None
    end: Moment | None = None
    user_id: UserFilter | None = None
    model: ModelFilter | None = None
    endpoint: EndpointFilter | None = None
    tag: TagFilter | None = None
    group_by: GroupBy | None = None


class AlertsParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`?limit=` 1–1000."""

    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100


# ----- answers -----------------------------------------------------------------------------


class Filters(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The filters an answer applied (none: every call)."""

    user_id: str | None = None
    model: str | None = None
    endpoint: str | None = None
    tag: str | None = None


class Coverage(msgspec.Struct, kw_only=True):
    """How far a filtered or grouped answer is exact.

    Filters and `group_by` add up the view's cells (calls by model, endpoint, user and tags,
    a bounded number per day and hour; the newest 100 days keep them). Past the bound a new
    combination is counted coarser, under `(other)`: those calls count in the totals but no
    filter or key can claim them. `unattributed_calls` says how many calls of the range a
    filter could not tell apart (0: exact), `notes` says why in sentences."""

    exact: bool = True
    unattributed_calls: int = 0
    notes: list[str] = []


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
    # Kept per model and per endpoint (null for a user, or under a filter that narrows the
    # calls below what the model's or endpoint's own latencies describe).
    p50_response_time_ms: float | None = None
    p95_response_time_ms: float | None = None
    p99_response_time_ms: float | None = None


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
    # Null only under a filter the view keeps no latencies for (a user or a tag; `notes`).
    p50_response_time_ms: float | None
    p95_response_time_ms: float | None
    p99_response_time_ms: float | None
    requests_per_minute: float
    by_endpoint: dict[str, Breakdown]
    by_model: dict[str, Breakdown]
    by_error_code: dict[str, int]
    by_status_code: dict[str, int]
    top_users: list[UserUsage]
    unpriced_models: list[str]
    # The filters applied ({} for every call), and what the answer could not tell apart.
    filters: Filters = msgspec.field(default_factory=lambda: Filters())
    coverage: Coverage = msgspec.field(default_factory=lambda: Coverage())


class TimePoint(msgspec.Struct, kw_only=True):
    """One bucket of the time series (`t` is its start in STOCKPILOT_TZ)."""

    t: AwareDatetime
    requests: int
    failed: int
    tokens: int
    cost_usd: float
    avg_response_time_ms: float
    # Null where the view keeps no latencies for the calls the point counts (`notes`).
    p95_response_time_ms: float | None


class Series(msgspec.Struct, kw_only=True):
    """The points of one model, endpoint, user or tag (`group_by`); `(other)` adds up the
    keys past the largest ones, `(none)` the calls without a user, endpoint or tag."""

    key: str
    points: list[TimePoint]


class UsageTimeseries(msgspec.Struct, kw_only=True):
    """`GET /api/v1/usage/timeseries`: every bucket of the range, zeros included.

    `points` are every (filtered) call; with `group_by`, `series` splits them by key."""

    bucket: Literal["hour", "day"]
    timezone: str
    start: AwareDatetime
    end: AwareDatetime
    points: list[TimePoint]
    filters: Filters = msgspec.field(default_factory=lambda: Filters())
    group_by: GroupBy | None = None
    series: list[Series] | None = None
    # Keys added up under the `(other)` series (0: every key has its own series).
    other_keys: int = 0
    coverage: Coverage = msgspec.field(default_factory=lambda: Coverage())


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


class BudgetParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`GET /api/v1/usage/budget`: the call about to be made (bounded like its record)."""

    user_id: Annotated[str, msgspec.Meta(max_length=256)] | None = None
    model: Annotated[str, msgspec.Meta(max_length=128)] | None = None
    endpoint: Annotated[str, msgspec.Meta(max_length=512)] | None = None
    tag: Annotated[str, msgspec.Meta(max_length=64)] | None = None


class BudgetState(msgspec.Struct, kw_only=True):
    """One budget covering the call, and how much of it the current period has used."""

    scope: str
    period: str
    usd: float
    used_usd: float
    used_pct: float
    enforce: bool


class BudgetAnswer(msgspec.Struct, kw_only=True):
    """`GET /api/v1/usage/budget`: may the call be made? `allowed` is false when an enforced
    budget covering it is used up; `reason` says which."""

    allowed: bool
    budgets: list[BudgetState]
    reason: str | None


class AlertList(msgspec.Struct, kw_only=True):
    """`GET /api/v1/usage/alerts`: newest first; `total` alerts held."""

    alerts: list[Alert]
    total: int


# ----- lifetime counters (/metrics) ----------------------------------------------------------


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


# ----- commands: ingest and reset ---------------------------------------------------------

# Records in one `POST /api/v1/usage/records` (a longer list is refused, 422).
MAX_RECORDS = 1_000


class IngestParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """What the gateway forwards: the posted records as they came, and when it received them.

    `records` is the JSON list itself (msgspec.Raw), usually the posted body's own bytes: the
    gateway neither re-encodes it nor does the service decode it twice (services.usage.decide).
    """

    records: msgspec.Raw
    received_at: AwareDatetime
    # Where `records[0]` was in the posted list (the gateway splits very large bodies).
    offset: int = 0


class Rejected(msgspec.Struct, kw_only=True):
    """A posted record that was not accepted, by its index in the posted list."""

    index: int
    reason: str


class IngestAnswer(msgspec.Struct, kw_only=True):
    """`POST /api/v1/usage/records` answer (202)."""

    accepted: int
    duplicates: int
    rejected: list[Rejected]
    ids: list[str] = []


class ResetParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Optional body of `POST /api/v1/usage/reset`."""

    scope: Literal["all"] = "all"
    reason: str | None = None
    actor: str = "admin"


class ResetAnswer(msgspec.Struct, kw_only=True):
    """`POST /api/v1/usage/reset` answer."""

    reset: bool
    scope: str
    at: AwareDatetime
    id: str


# ----- the spend log: GET /api/v1/usage/records (read from the stream itself) ---------------

# A page holds at most this many records (contract §5: `limit` ≤ 1000).
MAX_LIMIT = 1000
DEFAULT_LIMIT = 50
# A cursor is a few dozen characters; anything longer is not one of ours.
CURSOR_MAX_LENGTH = 200
CURSOR_PATTERN = r"^[A-Za-z0-9_-]+$"

Limit = Annotated[int, msgspec.Meta(ge=1, le=MAX_LIMIT)]
Cursor = Annotated[
    str, msgspec.Meta(min_length=1, max_length=CURSOR_MAX_LENGTH, pattern=CURSOR_PATTERN)
]
# The same bounds as the event's fields (above), so a filter can match.
StatusFilter = Literal["succeeded", "failed"]
Priced = Literal["reported", "price_table", "unpriced"]


class SpendLogParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`?start=&end=&user_id=&model=&endpoint=&tag=&status=&limit=&cursor=`.

    `start`/`end` are dates (YYYY-MM-DD, a whole day in STOCKPILOT_TZ; `end` inclusive) or
    RFC 3339 times (`end` exclusive), compared with each call's `occurred_at`. `model`
    matches the name or its base model (`gpt-4o` matches `gpt-4o-2024-08-06`), as a model
    budget does; `tag` matches a call carrying that tag.
    """

    start: Moment | None = None
    end: Moment | None = None
    user_id: UserFilter | None = None
    model: ModelFilter | None = None
    endpoint: EndpointFilter | None = None
    tag: TagFilter | None = None
    status: StatusFilter | None = None
    limit: Limit = DEFAULT_LIMIT
    cursor: Cursor | None = None


class SpendRecord(msgspec.Struct, kw_only=True):
    """One recorded LLM call as the usage fold counted it, with the cost it was charged."""

    seq: int
    id: str
    occurred_at: AwareDatetime
    stored_at: AwareDatetime
    model: str
    status_code: int
    failed: bool
    # What the call was charged: the cost it reported, else the price table in effect at
    # its occurred_at (0 for a model without a price, `priced` says which).
    cost_usd: float
    priced: Priced
    request_id: str | None = None
    endpoint: str | None = None
    user_id: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error_code: str | None = None
    response_time_ms: float | None = None
    tags: list[str] = []
    task_type: str | None = None
    error_message: str | None = None
    stream: bool = False
    ttft_ms: float | None = None


class SpendLog(msgspec.Struct, kw_only=True):
    """`GET /api/v1/usage/records`: a page of the spend log, newest first.

    A page holds up to `limit` records; it holds fewer (even none) when it stopped after
    reading `scanned` events (the bound that keeps every page fast): follow `next_cursor`
    until it is null, the end of the log for this query.
    """

    records: list[SpendRecord]
    next_cursor: str | None
    scanned: int
    # The oldest stream sequence this page read down to (the next page reads below it).
    scanned_down_to: int | None = None
    window_start: datetime | None = None
    window_end: datetime | None = None
    # How the stream was read: "bare" (the protocol reader), "nats-py" (its fallback).
    read_path: str | None = None


# ----- the summary (/api/v1/status) -------------------------------------------------------


class UsageToday(msgspec.Struct, kw_only=True):
    """Today's LLM usage at a glance (the shape of gateway.routes.system.UsageToday)."""

    requests: int
    cost_usd: float
    # null with no calls today
    error_rate: float | None
    budget_used_pct: float | None


class SpendPeriod(msgspec.Struct, kw_only=True):
    """Spend of the current day or month against its budget (None when no budget is set)."""

    period: str
    cost_usd: float
    budget_usd: float | None
    used_pct: float | None


class ErrorWindow(msgspec.Struct, kw_only=True):
    """Failed LLM calls over the alert's rolling window ending now."""

    window_s: int
    calls: int
    failed: int
    # null with no calls in the window
    rate_pct: float | None
    threshold_pct: float
    min_calls: int


class UsageSummary(msgspec.Struct, kw_only=True):
    """The `summary` answer (the shape of gateway.routes.system.UsageSummary)."""

    today: UsageToday
    alerts_24h: int
    # What /api/v1/status judges spend and errors by (defaults: an older service's answer).
    spend: list[SpendPeriod] = []
    cost_alert_pct: float = 80.0
    errors: ErrorWindow | None = None
