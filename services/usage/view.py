"""The usage view: bounded day/hour/month buckets, alert state, and its configuration.

Days, hours and months are those of `occurred_at` in the configured time zone. Everything
held is bounded: hourly buckets (HOUR_LIMIT, more than 7 days), daily buckets (DAY_LIMIT,
more than 400 days), months, breakdown keys per day, users per day, the ids remembered for
de-duplication and the rolling error-rate window.
"""

from __future__ import annotations

import bisect
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime
from zoneinfo import ZoneInfo

import msgspec

from services.usage.contract import Price, UsageRecorded
from services.usage.dedupe import EXACT_LIMIT, IdMemory
from services.usage.prices import PriceTable
from services.usage.settings import Budget
from services.usage.sketch import Sketch
from shared.projection import View

DAY_LIMIT = 410
HOUR_LIMIT = 24 * 9
MONTH_LIMIT = 15
KEY_LIMIT = 100
USER_LIMIT = 200
# Cells (calls by model, endpoint, user and tags: what filters and group_by read) per day and
# per hour; past the limit a new combination is counted coarser (services.usage.projection).
CELL_LIMIT = 1_000
HOUR_CELL_LIMIT = 400
# Days whose cells are kept: the newest ones, beyond the longest range a query may ask for.
CELL_DAYS = 100
UNPRICED_LIMIT = 1_000
# Price tables held (one per `usage.prices_changed`; a few a year in practice).
PRICE_TABLE_LIMIT = 500
# Periods of spend kept per scoped budget (two months of days).
BUDGET_PERIOD_LIMIT = 62
WINDOW_S = 300
# An alert whose condition clears and returns within this long is not raised again.
QUIET_S = 600
# An alert about a period (day, month, 5-minute window) is raised only for an event stored
# before the period closed plus this: later ones (a back-fill) count silently.
LATE_ALERT_S = 3600.0
# A month-end forecast extrapolates only once this much of the month has passed.
FORECAST_MIN_ELAPSED_S = 86_400.0
COST_EPSILON = 1e-9
# Upper bounds, in seconds, of the lifetime LLM response-time histogram (`le` in /metrics):
# from a cached completion to a long generation.
LATENCY_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Bumped when the fold's meaning or the view's layout changes: a snapshot folded by another
# version is not reused and the view is rebuilt from the stream's first event (money-1: a
# reset keeps the money, spend per day and months by model; money-2: prices come from the
# stream's usage.prices_changed events, not from the settings; money-3: ids remembered for
# 24 hours by stored time; totals-1: lifetime counters for /metrics that a reset never touches;
# fired-1: no `fired` in the view, the fold returns its alerts, and an id remembers the stream
# sequence it was stored at, not the view's last_seq + 1; cells-2: calls by model, endpoint,
# user and tags per day and hour, latency sketches per model and endpoint per day, and a
# day's breakdowns and an hour's total added up from its cells; bloom-2: the id filter's
# bits of an id lie in one 64-byte block, ten of them, dedupe.locate; the filter holds its
# generation's exact ids as well; bloom-3: an id's place in the filter from its XXH3 digest).
FOLD_VERSION = "money-3+totals-1+fired-1+cells-2+bloom-3"
OTHER = "(other)"
# The tags of a cell whose calls' tags were not kept apart.
OTHER_TAGS: tuple[str, ...] = (OTHER,)
NO_ENDPOINT = "(none)"


class Agg(msgspec.Struct, kw_only=True, array_like=True):
    """Counters of a set of calls."""

    requests: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    cost_usd: float = 0.0
    latency_n: int = 0
    latency_sum: float = 0.0


class Totals(msgspec.Struct, kw_only=True):
    """Every call ever folded, never reset (a usage.reset included): /metrics' counters.

    Folded from the stream, so a restart or a replay gives the same values and a Prometheus
    counter never goes back except when the stream itself is replaced.
    """

    by_model: dict[str, Agg] = {}
    by_error_code: dict[str, int] = {}
    by_status_code: dict[str, int] = {}
    # Calls by response time: one count per LATENCY_BUCKETS_S bound, then the overflow.
    latency_buckets: list[int] = []
    latency_sum_s: float = 0.0


class Cell(Agg, kw_only=True, array_like=True):
    """The calls of one combination of model, endpoint, user and tags: what a filter or a
    group_by adds up. A day's cells also count their calls by error code and by status code
    (keys bounded like a day's)."""

    errors: dict[str, int] = {}
    statuses: dict[str, int] = {}


# (model, endpoint or NO_ENDPOINT, user_id or "", tags as the call gave them). A coarser cell
# has OTHER for the parts it no longer tells apart (the user first, then the tags, then the
# endpoint, then the model).
CellKey = tuple[str, str, str, tuple[str, ...]]


class Hour(msgspec.Struct, kw_only=True, array_like=True):
    """One hour of calls (in the configured zone); its cells count calls only (the error and
    status codes are a day's)."""

    latency: Sketch
    cells: dict[CellKey, Agg] = {}

    @property
    def total(self) -> Agg:
        """Every call of the hour: its cells added up (each call is in exactly one; not
        counted a second time by the fold, which is the hot path)."""
        total = Agg()
        for cell in self.cells.values():
            merge_agg(total, cell)
        return total


class Day(msgspec.Struct, kw_only=True):
    """One day of calls. Its breakdowns are its cells added up (`day_breakdowns`); a day
    past CELL_DAYS keeps them instead of its cells (keys bounded; the rest under `(other)`)."""

    total: Agg
    latency: Sketch
    by_endpoint: dict[str, Agg] = {}
    by_model: dict[str, Agg] = {}
    by_error_code: dict[str, int] = {}
    by_status_code: dict[str, int] = {}
    by_user: dict[str, Agg] = {}
    cells: dict[CellKey, Cell] = {}
    # Response times per model and per endpoint (keys bounded like the breakdowns).
    latency_by_model: dict[str, Sketch] = {}
    latency_by_endpoint: dict[str, Sketch] = {}


class Month(msgspec.Struct, kw_only=True, array_like=True):
    """Month totals (money: a reset keeps them), and what the forecast needs: where the
    month starts and ends."""

    requests: int = 0
    failures: int = 0
    cost_usd: float = 0.0
    start: float = 0.0
    end: float = 0.0
    last_at: float = 0.0
    forecast_fired: bool = False
    # The month's calls by model (keys bounded; the rest under `(other)`), for /usage/costs.
    by_model: dict[str, Agg] = {}


class Spend(msgspec.Struct, kw_only=True, array_like=True):
    """One day's money: every call of the day, whatever resets came in between."""

    requests: int = 0
    cost_usd: float = 0.0


class PriceEpoch(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """A price table and when it took effect (its event's occurred_at, epoch seconds)."""

    id: str
    since: float
    prices: dict[str, Price]


class Fired(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """A condition an event crossed: what `alerting` words as an alert (never stored)."""

    kind: str
    scope: str
    period: str
    value: float
    threshold: float


class UsageView(View, kw_only=True):
    """Everything the usage routes answer from.

    `days` and `hours` are the statistics a reset restarts; `spend`, `months` and
    `unpriced` are money, which a reset never touches (budgets, /usage/costs and their
    alerts count every call of their period).
    """

    days: dict[str, Day] = {}
    hours: dict[int, Hour] = {}
    spend: dict[str, Spend] = {}
    months: dict[str, Month] = {}
    unpriced: dict[str, int] = {}
    # Every price table of the stream by `since`: a call is priced with the one in effect
    # at its occurred_at, so history is never re-priced.
    prices: list[PriceEpoch] = []
    # Call ids for de-duplication: at least 24 hours by stored time (services.usage.dedupe).
    ids: IdMemory = msgspec.field(default_factory=IdMemory)
    recorded: int = 0
    duplicates: int = 0
    too_old: int = 0
    # Alerts not raised because their period had closed when the event was stored.
    alerts_silenced: int = 0
    # Spend of each scoped budget (Budget.key) by period ("YYYY-MM-DD" or "YYYY-MM"):
    # money, which a reset does not touch.
    budget_spend: dict[str, dict[str, float]] = {}
    # Rolling error-rate window by event time: second → [calls, failures].
    window: dict[int, list[int]] = {}
    window_end: int = 0
    window_calls: int = 0
    window_failures: int = 0
    error_alert_active: bool = False
    error_episodes: int = 0
    # The open episode (alert raised, recovery not announced yet): its alert's period, and
    # when and at what rate the condition last cleared (window seconds). A condition that
    # returns within QUIET_S of clearing continues the episode silently; one that stays clear
    # for QUIET_S ends it with a recovery alert.
    error_episode: str | None = None
    error_cleared_at: int | None = None
    error_cleared_rate: float = 0.0
    resets: int = 0
    reset_at: float | None = None
    totals: Totals = msgspec.field(default_factory=Totals)


@dataclass(frozen=True)
class FoldConfig:
    """What the fold depends on besides the events (fixed for a projection's life)."""

    zone: ZoneInfo
    # For calls folded before any `usage.prices_changed`: the stream's first table (the
    # service reads it at start), else the configured one.
    prices: PriceTable
    daily_budget_usd: float | None = None
    monthly_budget_usd: float | None = None
    cost_alert_pct: float = 80.0
    error_rate_alert_pct: float = 20.0
    error_rate_min_calls: int = 10
    # Ids a de-duplication generation holds exactly (tests lower it to reach the Bloom part).
    dedupe_exact_limit: int = EXACT_LIMIT
    budgets: tuple[Budget, ...] = ()


def config_fingerprint(config: FoldConfig) -> str:
    """A digest of everything the fold's result depends on besides the events and the fold's
    version (UsageProjection.fingerprint: a snapshot taken under another is not reused).

    Not the prices: they come from the stream's `usage.prices_changed` events, so a changed
    price table is an event to fold, not another configuration."""
    parts = [
        config.zone.key,
        repr(config.daily_budget_usd),
        repr(config.monthly_budget_usd),
        repr(config.cost_alert_pct),
        repr(config.error_rate_alert_pct),
        repr(config.error_rate_min_calls),
        repr(config.dedupe_exact_limit),
        repr([(b.scope, b.period, b.usd) for b in config.budgets]),
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def add_call(agg: Agg, event: UsageRecorded, cost: float, failed: bool) -> None:
    """Count one call into `agg`."""
    agg.requests += 1
    if failed:
        agg.failures += 1
    agg.prompt_tokens += event.prompt_tokens
    agg.completion_tokens += event.completion_tokens
    agg.cached_tokens += event.cached_tokens
    agg.cost_usd += cost
    if event.response_time_ms is not None:
        agg.latency_n += 1
        agg.latency_sum += event.response_time_ms


def add_total(totals: Totals, event: UsageRecorded, cost: float, failed: bool) -> None:
    """Count one call into the lifetime totals (keys bounded like a day's breakdowns)."""
    add_call(_bounded_agg(totals.by_model, event.model), event, cost, failed)
    if event.error_code:
        _count_key(totals.by_error_code, event.error_code)
    _count_key(totals.by_status_code, str(event.status_code))
    latency = event.response_time_ms
    if latency is not None:
        seconds = latency / 1000.0
        buckets = totals.latency_buckets
        if not buckets:
            buckets.extend([0] * (len(LATENCY_BUCKETS_S) + 1))
        buckets[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
        totals.latency_sum_s += seconds


def _count_key(counts: dict[str, int], key: str) -> None:
    key = key if key in counts or len(counts) < KEY_LIMIT else OTHER
    counts[key] = counts.get(key, 0) + 1


def _bounded_agg(mapping: dict[str, Agg], key: str) -> Agg:
    key = key if key in mapping or len(mapping) < KEY_LIMIT else OTHER
    agg = mapping.get(key)
    if agg is None:
        agg = mapping[key] = Agg()
    return agg


def merge_agg(target: Agg, other: Agg) -> None:
    """Add `other`'s counters to `target`."""
    target.requests += other.requests
    target.failures += other.failures
    target.prompt_tokens += other.prompt_tokens
    target.completion_tokens += other.completion_tokens
    target.cached_tokens += other.cached_tokens
    target.cost_usd += other.cost_usd
    target.latency_n += other.latency_n
    target.latency_sum += other.latency_sum


def month_bounds(year: int, month: int, zone: ZoneInfo) -> tuple[float, float]:
    """Epoch seconds of a month's first and next month's first midnight in `zone`."""
    start = datetime(year, month, 1, tzinfo=zone)
    end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=zone)
    return start.timestamp(), end.timestamp()


def hour_key(local: datetime) -> int:
    """Epoch seconds of the start of a local hour."""
    return int(local.replace(minute=0, second=0, microsecond=0).timestamp())


def day_start(day: date, zone: ZoneInfo) -> datetime:
    """Midnight at the start of `day` in `zone`."""
    return datetime(day.year, day.month, day.day, tzinfo=zone)


class Breakdowns(msgspec.Struct, kw_only=True):
    """Calls by endpoint, model and user, and by error and status code (a day's, or the
    cells a query adds up)."""

    by_endpoint: dict[str, Agg] = {}
    by_model: dict[str, Agg] = {}
    by_user: dict[str, Agg] = {}
    by_error_code: dict[str, int] = {}
    by_status_code: dict[str, int] = {}


def add_cells(into: Breakdowns, cells: Iterable[tuple[CellKey, Cell]]) -> None:
    """Add each cell to the breakdowns of its model, endpoint and user, and its codes."""
    for (model, endpoint, user, _), cell in cells:
        merge_agg(_agg_of(into.by_model, model), cell)
        merge_agg(_agg_of(into.by_endpoint, endpoint), cell)
        if user:
            merge_agg(_agg_of(into.by_user, user), cell)
        _merge_counts(into.by_error_code, cell.errors)
        _merge_counts(into.by_status_code, cell.statuses)


def add_breakdowns(into: Breakdowns, parts: Breakdowns) -> None:
    """Add `parts` (another day's breakdowns) to `into`."""
    for target, source in (
        (into.by_endpoint, parts.by_endpoint),
        (into.by_model, parts.by_model),
        (into.by_user, parts.by_user),
    ):
        for key, agg in source.items():
            merge_agg(_agg_of(target, key), agg)
    _merge_counts(into.by_error_code, parts.by_error_code)
    _merge_counts(into.by_status_code, parts.by_status_code)


def day_breakdowns(day: Day) -> Breakdowns:
    """The day's breakdowns: its cells added up (bounded like its kept ones), or those it
    kept when its cells went (past CELL_DAYS)."""
    if not day.cells:
        return Breakdowns(
            by_endpoint=day.by_endpoint,
            by_model=day.by_model,
            by_user=day.by_user,
            by_error_code=day.by_error_code,
            by_status_code=day.by_status_code,
        )
    found = Breakdowns()
    add_cells(found, day.cells.items())
    return Breakdowns(
        by_endpoint=_bounded(found.by_endpoint, KEY_LIMIT),
        by_model=_bounded(found.by_model, KEY_LIMIT),
        by_user=_bounded(found.by_user, USER_LIMIT),
        by_error_code=_bounded_counts(found.by_error_code),
        by_status_code=_bounded_counts(found.by_status_code),
    )


def keep_breakdowns(day: Day) -> None:
    """Keep the day's breakdowns in place of its cells (a day past CELL_DAYS)."""
    kept = day_breakdowns(day)
    day.by_endpoint = kept.by_endpoint
    day.by_model = kept.by_model
    day.by_user = kept.by_user
    day.by_error_code = kept.by_error_code
    day.by_status_code = kept.by_status_code
    day.cells = {}


def _agg_of(mapping: dict[str, Agg], key: str) -> Agg:
    agg = mapping.get(key)
    if agg is None:
        agg = mapping[key] = Agg()
    return agg


def _merge_counts(target: dict[str, int], source: dict[str, int]) -> None:
    for key, count in source.items():
        target[key] = target.get(key, 0) + count


def _bounded(mapping: dict[str, Agg], limit: int) -> dict[str, Agg]:
    """At most `limit` keys and `(other)`: the busiest kept, the rest added up under it."""
    if len(mapping) <= limit:
        return mapping
    ranked = sorted(mapping.items(), key=lambda item: (item[0] == OTHER, -item[1].requests))
    kept = dict(ranked[:limit])
    other = kept.pop(OTHER, None) or Agg()
    for _, agg in ranked[limit:]:
        merge_agg(other, agg)
    kept[OTHER] = other
    return kept


def _bounded_counts(counts: dict[str, int]) -> dict[str, int]:
    if len(counts) <= KEY_LIMIT:
        return counts
    ranked = sorted(counts.items(), key=lambda item: (item[0] == OTHER, -item[1]))
    kept = dict(ranked[:KEY_LIMIT])
    kept[OTHER] = kept.pop(OTHER, 0) + sum(count for _, count in ranked[KEY_LIMIT:])
    return kept
