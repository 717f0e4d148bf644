"""The usage projection: a pure fold of STOCKPILOT_USAGE into bounded day/hour/month buckets.

Days, hours and months are those of `occurred_at` in the configured time zone, whenever an
event arrives. Everything held is bounded: hourly buckets (HOUR_LIMIT, more than 7 days),
daily buckets (DAY_LIMIT, more than 400 days), months, breakdown keys per day, users per
day, the ids remembered for de-duplication and the rolling error-rate window.

`apply` also runs the alert state machines (budget crossings, error-rate episodes, unpriced
models) and leaves what the event crossed in `view.fired`; `react` turns that into alerts
with deterministic ids, so every replica and every replay derives the same ones.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Annotated, cast
from zoneinfo import ZoneInfo

import msgspec

from services.usage import sketch
from services.usage.events import UsageEvent, UsageRecorded, UsageReset
from services.usage.prices import PriceTable
from services.usage.sketch import Sketch
from shared.events import Alert, Severity, alert_id, rfc3339
from shared.projection import View

DAY_LIMIT = 410
HOUR_LIMIT = 24 * 9
MONTH_LIMIT = 15
KEY_LIMIT = 100
USER_LIMIT = 200
UNPRICED_LIMIT = 1_000
# Ids are remembered for de-duplication in two generations of this many each.
SEEN_GENERATION = 50_000
WINDOW_S = 300
# A month-end forecast extrapolates only once this much of the month has passed.
FORECAST_MIN_ELAPSED_S = 86_400.0
COST_EPSILON = 1e-9
OTHER = "(other)"
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


class Hour(msgspec.Struct, kw_only=True, array_like=True):
    """One hour of calls (in the configured zone)."""

    total: Agg
    latency: Sketch


class Day(msgspec.Struct, kw_only=True):
    """One day of calls with its breakdowns (keys bounded; the rest under `(other)`)."""

    total: Agg
    latency: Sketch
    by_endpoint: dict[str, Agg] = {}
    by_model: dict[str, Agg] = {}
    by_error_code: dict[str, int] = {}
    by_status_code: dict[str, int] = {}
    by_user: dict[str, Agg] = {}


class Month(msgspec.Struct, kw_only=True, array_like=True):
    """Month totals, and what the forecast needs: where the month starts and ends."""

    requests: int = 0
    failures: int = 0
    cost_usd: float = 0.0
    start: float = 0.0
    end: float = 0.0
    last_at: float = 0.0
    forecast_fired: bool = False


class Fired(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """A condition the last event crossed: what `react` turns into an alert."""

    kind: str
    scope: str
    period: str
    value: float
    threshold: float


class UsageView(View, kw_only=True):
    """Everything the usage routes answer from."""

    days: dict[str, Day] = {}
    hours: dict[int, Hour] = {}
    months: dict[str, Month] = {}
    unpriced: dict[str, int] = {}
    seen: dict[str, int] = {}
    seen_prev: dict[str, int] = {}
    recorded: int = 0
    duplicates: int = 0
    too_old: int = 0
    # Rolling error-rate window by event time: second → [calls, failures].
    window: dict[int, list[int]] = {}
    window_end: int = 0
    window_calls: int = 0
    window_failures: int = 0
    error_alert_active: bool = False
    error_episodes: int = 0
    resets: int = 0
    reset_at: float | None = None
    fired: list[Fired] = []


@dataclass(frozen=True)
class FoldConfig:
    """What the fold depends on besides the events (fixed for a projection's life)."""

    zone: ZoneInfo
    prices: PriceTable
    daily_budget_usd: float | None = None
    monthly_budget_usd: float | None = None
    cost_alert_pct: float = 80.0
    error_rate_alert_pct: float = 20.0
    error_rate_min_calls: int = 10


def config_fingerprint(config: FoldConfig) -> str:
    """A digest of everything the fold's result depends on besides the events."""
    parts = [
        config.zone.key,
        config.prices.fingerprint(),
        repr(config.daily_budget_usd),
        repr(config.monthly_budget_usd),
        repr(config.cost_alert_pct),
        repr(config.error_rate_alert_pct),
        repr(config.error_rate_min_calls),
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def view_type_for(config: FoldConfig) -> type[UsageView]:
    """UsageView stamped with the configuration's fingerprint.

    A snapshot folded under another time zone, price table or set of thresholds fails to
    decode into this type (the `config` pattern does not match), and the runtime then
    rebuilds the view from the first event instead of mixing two configurations.
    """
    fingerprint = config_fingerprint(config)
    stamped = msgspec.defstruct(
        "UsageView",
        [("config", Annotated[str, msgspec.Meta(pattern=f"^{fingerprint}$")], fingerprint)],
        bases=(UsageView,),
        kw_only=True,
        module=__name__,
    )
    return cast(type[UsageView], stamped)


def new_agg() -> Agg:
    """Empty counters."""
    return Agg()


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


def _bounded_key(mapping: dict[str, object], key: str, limit: int) -> str:
    return key if key in mapping or len(mapping) < limit else OTHER


def _count_into(mapping: dict[str, Agg], key: str, limit: int) -> Agg:
    key = key if key in mapping or len(mapping) < limit else OTHER
    agg = mapping.get(key)
    if agg is None:
        agg = mapping[key] = Agg()
    return agg


def month_bounds(year: int, month: int, zone: ZoneInfo) -> tuple[float, float]:
    """Epoch seconds of a month's first and next month's first midnight in `zone`."""
    start = datetime(year, month, 1, tzinfo=zone)
    end = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=zone)
    return start.timestamp(), end.timestamp()


def hour_key(local: datetime) -> int:
    """Epoch seconds of the start of a local hour."""
    return int(local.replace(minute=0, second=0, microsecond=0).timestamp())


def make_apply(config: FoldConfig) -> Callable[[UsageView, UsageEvent], UsageView]:
    """The fold for this configuration (zone, prices, budgets, thresholds)."""
    zone = config.zone
    prices = config.prices
    warn_pct = config.cost_alert_pct / 100.0

    def record(view: UsageView, event: UsageRecorded) -> None:
        fired = view.fired
        if event.id in view.seen or event.id in view.seen_prev:
            view.duplicates += 1
            return
        seen = view.seen
        seen[event.id] = view.last_seq + 1
        if len(seen) >= SEEN_GENERATION:
            view.seen_prev = seen
            view.seen = {}
        view.recorded += 1
        failed = event.failed
        cost = event.cost_usd
        if cost is None:
            cost = prices.cost(
                event.model, event.prompt_tokens, event.completion_tokens, event.cached_tokens
            )
            if cost is None:
                cost = 0.0
                if event.model not in view.unpriced:
                    if len(view.unpriced) < UNPRICED_LIMIT:
                        view.unpriced[event.model] = 0
                        fired.append(
                            Fired(
                                kind="usage.unpriced_model",
                                scope=event.model,
                                period="any",
                                value=1.0,
                                threshold=0.0,
                            )
                        )
                if event.model in view.unpriced:
                    view.unpriced[event.model] += 1
        local = event.occurred_at.astimezone(zone)
        day_key = local.date().isoformat()
        days = view.days
        day = days.get(day_key)
        if day is None:
            if len(days) >= DAY_LIMIT:
                oldest = min(days)
                if day_key < oldest:
                    view.too_old += 1
                    return
                del days[oldest]
            day = days[day_key] = Day(total=Agg(), latency=Sketch(bins={}))
        day_cost_before = day.total.cost_usd
        add_call(day.total, event, cost, failed)
        if event.response_time_ms is not None:
            sketch.add(day.latency, event.response_time_ms)
        add_call(
            _count_into(day.by_endpoint, event.endpoint or NO_ENDPOINT, KEY_LIMIT),
            event,
            cost,
            failed,
        )
        add_call(_count_into(day.by_model, event.model, KEY_LIMIT), event, cost, failed)
        if event.user_id:
            add_call(_count_into(day.by_user, event.user_id, USER_LIMIT), event, cost, failed)
        if event.error_code:
            codes = day.by_error_code
            key = _bounded_key(codes, event.error_code, KEY_LIMIT)  # type: ignore[arg-type]
            codes[key] = codes.get(key, 0) + 1
        statuses = day.by_status_code
        status_key = _bounded_key(statuses, str(event.status_code), KEY_LIMIT)  # type: ignore[arg-type]
        statuses[status_key] = statuses.get(status_key, 0) + 1

        hours = view.hours
        h_key = hour_key(local)
        hour = hours.get(h_key)
        if hour is None:
            if len(hours) >= HOUR_LIMIT:
                oldest_hour = min(hours)
                if h_key < oldest_hour:
                    hour = None
                else:
                    del hours[oldest_hour]
                    hour = hours[h_key] = Hour(total=Agg(), latency=Sketch(bins={}))
            else:
                hour = hours[h_key] = Hour(total=Agg(), latency=Sketch(bins={}))
        if hour is not None:
            add_call(hour.total, event, cost, failed)
            if event.response_time_ms is not None:
                sketch.add(hour.latency, event.response_time_ms)

        month_key = day_key[:7]
        month = view.months.get(month_key)
        if month is None:
            start, end = month_bounds(local.year, local.month, zone)
            month = view.months[month_key] = Month(start=start, end=end)
            if len(view.months) > MONTH_LIMIT:
                del view.months[min(view.months)]
        month_cost_before = month.cost_usd
        month.requests += 1
        month.failures += failed
        month.cost_usd += cost
        at = event.occurred_at.timestamp()
        month.last_at = max(month.last_at, at)

        if config.daily_budget_usd is not None:
            _crossings(
                fired, "daily", day_key, day_cost_before, day.total.cost_usd,
                config.daily_budget_usd, warn_pct,
            )  # fmt: skip
        if config.monthly_budget_usd is not None:
            budget = config.monthly_budget_usd
            _crossings(
                fired, "monthly", month_key, month_cost_before, month.cost_usd, budget, warn_pct
            )
            elapsed = month.last_at - month.start
            if not month.forecast_fired and elapsed >= FORECAST_MIN_ELAPSED_S:
                forecast = month.cost_usd * (month.end - month.start) / elapsed
                if forecast > budget:
                    month.forecast_fired = True
                    fired.append(
                        Fired(
                            kind="usage.cost_forecast",
                            scope="monthly",
                            period=month_key,
                            value=round(forecast, 6),
                            threshold=budget,
                        )
                    )
        _error_window(view, event, int(at), failed, config, fired)

    def apply(view: UsageView, event: UsageEvent) -> UsageView:
        if view.fired:
            view.fired = []
        if isinstance(event, UsageRecorded):
            record(view, event)
        elif isinstance(event, UsageReset):
            reset(view, event)
        return view

    return apply


def _crossings(
    fired: list[Fired],
    scope: str,
    period: str,
    before: float,
    after: float,
    budget: float,
    warn_pct: float,
) -> None:
    for kind, level in (("usage.cost_warning", budget * warn_pct), ("usage.cost_exceeded", budget)):
        # Float sums drift (0.1 * 8 < 0.8): a nano-dollar of slack keeps crossings exact.
        if before < level - COST_EPSILON <= after:
            fired.append(Fired(kind=kind, scope=scope, period=period, value=after, threshold=level))


def _error_window(
    view: UsageView,
    event: UsageRecorded,
    second: int,
    failed: bool,
    config: FoldConfig,
    fired: list[Fired],
) -> None:
    window = view.window
    if second > view.window_end:
        view.window_end = second
        cutoff = second - WINDOW_S
        for key in [k for k in window if k <= cutoff]:
            calls, failures = window.pop(key)
            view.window_calls -= calls
            view.window_failures -= failures
    if second <= view.window_end - WINDOW_S:
        return  # older than the rolling window: it counts in its day, not in the rate
    slot = window.get(second)
    if slot is None:
        slot = window[second] = [0, 0]
    slot[0] += 1
    view.window_calls += 1
    if failed:
        slot[1] += 1
        view.window_failures += 1
    rate = 100.0 * view.window_failures / view.window_calls
    threshold = config.error_rate_alert_pct
    if view.error_alert_active:
        if rate < threshold:
            view.error_alert_active = False
    elif rate >= threshold and view.window_calls >= config.error_rate_min_calls:
        view.error_alert_active = True
        view.error_episodes += 1
        fired.append(
            Fired(
                kind="usage.error_rate",
                scope="all",
                period=f"{rfc3339(event.occurred_at.replace(microsecond=0))}#{view.error_episodes}",
                value=round(rate, 4),
                threshold=threshold,
            )
        )


def reset(view: UsageView, event: UsageReset) -> None:
    """Statistics restart from zero; de-duplication memory and alert episodes carry on."""
    view.days = {}
    view.hours = {}
    view.months = {}
    view.unpriced = {}
    view.window = {}
    view.window_calls = 0
    view.window_failures = 0
    view.error_alert_active = False
    view.resets += 1
    view.reset_at = event.occurred_at.timestamp()


_TEXT: dict[str, tuple[Severity, str, str]] = {
    "usage.cost_warning": ("warning", "{scope} LLM cost budget {pct}% used", "{metric}"),
    "usage.cost_exceeded": ("critical", "{scope} LLM cost budget exceeded", "{metric}"),
    "usage.cost_forecast": ("warning", "monthly LLM cost forecast over budget", "{metric}"),
    "usage.error_rate": ("critical", "LLM error rate high", "error_rate_pct"),
    "usage.unpriced_model": ("info", "model without a price", "unpriced_model"),
}


def make_react(config: FoldConfig) -> Callable[[UsageView, UsageEvent], Sequence[Alert]]:
    """Alerts for what the last event crossed (deterministic ids: kind + scope + period)."""

    def react(view: UsageView, event: UsageEvent) -> Sequence[Alert]:
        if not view.fired:
            return ()
        return [_alert(f, event, config) for f in view.fired]

    return react


def _alert(fired: Fired, event: UsageEvent, config: FoldConfig) -> Alert:
    severity, title, metric = _TEXT[fired.kind]
    scope = fired.scope
    metric = metric.format(metric=f"{scope}_cost_usd" if scope in ("daily", "monthly") else "")
    if fired.kind == "usage.cost_forecast":
        metric = "forecast_month_cost_usd"
    if fired.kind in ("usage.cost_warning", "usage.cost_exceeded"):
        message = (
            f"{scope} LLM spend for {fired.period} is {_usd(fired.value)}, "
            f"at or over {_usd(fired.threshold)}"
        )
    elif fired.kind == "usage.cost_forecast":
        message = (
            f"at the current pace {fired.period} ends at {_usd(fired.value)}, "
            f"over the monthly budget of {_usd(fired.threshold)}"
        )
    elif fired.kind == "usage.error_rate":
        message = (
            f"{fired.value:.1f}% of LLM calls failed over the last {WINDOW_S // 60} minutes "
            f"(threshold {fired.threshold:g}%, at least {config.error_rate_min_calls} calls)"
        )
    else:
        message = f"model {scope!r} is not in the price table: its calls are counted at $0"
    return Alert(
        id=alert_id(fired.kind, scope, fired.period),
        occurred_at=event.occurred_at,
        source="usage",
        kind=fired.kind,
        severity=severity,
        title=title.format(scope=scope, pct=f"{config.cost_alert_pct:g}"),
        message=message,
        metric=metric,
        value=round(fired.value, 6),
        threshold=round(fired.threshold, 6),
    )


def _usd(amount: float) -> str:
    return f"${amount:,.2f}" if amount >= 1 else f"${amount:.4f}"


def local_day(moment: datetime, zone: ZoneInfo) -> date:
    """The day a moment falls on in `zone`."""
    return moment.astimezone(zone).date()


def day_start(day: date, zone: ZoneInfo) -> datetime:
    """Midnight at the start of `day` in `zone`."""
    return datetime(day.year, day.month, day.day, tzinfo=zone)


def next_day(day: date) -> date:
    """The day after."""
    return day + timedelta(days=1)
