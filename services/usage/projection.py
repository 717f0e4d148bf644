"""The usage projection: a pure fold of STOCKPILOT_USAGE into the bounded UsageView.

`apply` also runs the alert state machines (budget crossings, error-rate episodes, unpriced
models) and leaves what the event crossed in `view.fired`; `services.usage.alerting.react`
turns that into alerts with deterministic ids, so every replica and every replay derives
the same ones.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from services.usage import sketch
from services.usage.alerting import make_react
from services.usage.events import UsageEvent, UsageRecorded, UsageReset
from services.usage.sketch import Sketch
from services.usage.view import (
    COST_EPSILON,
    DAY_LIMIT,
    FORECAST_MIN_ELAPSED_S,
    HOUR_LIMIT,
    KEY_LIMIT,
    MONTH_LIMIT,
    NO_ENDPOINT,
    OTHER,
    QUIET_S,
    SEEN_GENERATION,
    UNPRICED_LIMIT,
    USER_LIMIT,
    WINDOW_S,
    Agg,
    Day,
    Fired,
    FoldConfig,
    Hour,
    Month,
    UsageView,
    add_call,
    add_total,
    hour_key,
    month_bounds,
    view_type_for,
)
from shared.events import rfc3339

__all__ = ["FoldConfig", "UsageView", "make_apply", "make_react", "view_type_for"]


_SLOT_S = 900
_SLOT = timedelta(seconds=_SLOT_S)
_SLOT_END = timedelta(seconds=_SLOT_S, microseconds=-1)
_SLOT_LIMIT = 10_000


def _bounded_key(mapping: dict[str, object], key: str, limit: int) -> str:
    return key if key in mapping or len(mapping) < limit else OTHER


def _count_into(mapping: dict[str, Agg], key: str, limit: int) -> Agg:
    key = key if key in mapping or len(mapping) < limit else OTHER
    agg = mapping.get(key)
    if agg is None:
        agg = mapping[key] = Agg()
    return agg


def make_local_keys(zone: ZoneInfo) -> Callable[[datetime, float], tuple[str, int, int, int]]:
    """(local day "YYYY-MM-DD", local hour start in epoch s, local year, month) of an instant."""
    # Local day and hour by 15-minute UTC slot. astimezone + isoformat + hour_key were about
    # a sixth of the fold (docs/profiles/usage-catchup-*.txt). A slot over which the zone's
    # offset is constant and a multiple of 15 minutes (every zone today) lies within one
    # local hour and day, with one fold value, so its keys are the same for every instant in
    # it; any other slot (a transition, an old LMT offset) is computed every time.
    slots: dict[int, tuple[str, int, int, int]] = {}

    def local_keys(occurred_at: datetime, at: float) -> tuple[str, int, int, int]:
        slot = int(at // _SLOT_S)
        keys = slots.get(slot)
        if keys is not None:
            return keys
        local = occurred_at.astimezone(zone)
        keys = (local.date().isoformat(), hour_key(local), local.year, local.month)
        try:
            start = datetime.fromtimestamp(slot * _SLOT_S, UTC)
            first = start.astimezone(zone).utcoffset()
            last = (start + _SLOT_END).astimezone(zone).utcoffset()
        except (OverflowError, ValueError, OSError):  # the ends of datetime's range
            return keys
        if first == last and first is not None and first % _SLOT == timedelta(0):
            if len(slots) >= _SLOT_LIMIT:
                slots.clear()
            slots[slot] = keys
        return keys

    return local_keys


def make_apply(config: FoldConfig) -> Callable[[UsageView, UsageEvent], UsageView]:
    """The fold for this configuration (zone, prices, budgets, thresholds)."""
    zone = config.zone
    prices = config.prices
    warn_pct = config.cost_alert_pct / 100.0
    local_keys = make_local_keys(zone)

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
        add_total(view.totals, event, cost, failed)
        at = event.occurred_at.timestamp()
        day_key, h_key, local_year, local_month = local_keys(event.occurred_at, at)
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
        latency = event.response_time_ms
        latency_at = None if latency is None else sketch.index_of(latency)
        if latency is not None:
            sketch.add_at(day.latency, latency_at)
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
            if latency is not None:
                sketch.add_at(hour.latency, latency_at)

        month_key = day_key[:7]
        month = view.months.get(month_key)
        if month is None:
            start, end = month_bounds(local_year, local_month, zone)
            month = view.months[month_key] = Month(start=start, end=end)
            if len(view.months) > MONTH_LIMIT:
                del view.months[min(view.months)]
        month_cost_before = month.cost_usd
        month.requests += 1
        month.failures += failed
        month.cost_usd += cost
        if at > month.last_at:
            month.last_at = at

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
        # The window holds seconds in (end - WINDOW_S, end]: moving its end to `second`, the
        # seconds up to `second - WINDOW_S` leave it. Popped by range rather than by a scan
        # of every key, which cost ~5 % of a replay where events are seconds apart.
        if second - view.window_end >= WINDOW_S:
            window.clear()
            view.window_calls = 0
            view.window_failures = 0
        else:
            for gone in range(view.window_end - WINDOW_S + 1, second - WINDOW_S + 1):
                slot = window.pop(gone, None)
                if slot is not None:
                    view.window_calls -= slot[0]
                    view.window_failures -= slot[1]
        view.window_end = second
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
    _error_recovery(view, config, fired)
    if view.error_alert_active:
        if rate < threshold:
            view.error_alert_active = False
            view.error_cleared_at = view.window_end
            view.error_cleared_rate = round(rate, 4)
    elif rate >= threshold and view.window_calls >= config.error_rate_min_calls:
        view.error_alert_active = True
        view.error_cleared_at = None
        if view.error_episode is not None:
            return  # back within QUIET_S of clearing: the same episode, not raised again
        view.error_episodes += 1
        period = f"{rfc3339(event.occurred_at.replace(microsecond=0))}#{view.error_episodes}"
        view.error_episode = period
        fired.append(
            Fired(
                kind="usage.error_rate",
                scope="all",
                period=period,
                value=round(rate, 4),
                threshold=threshold,
            )
        )


def _error_recovery(view: UsageView, config: FoldConfig, fired: list[Fired]) -> None:
    """End the open episode once its condition has stayed clear for QUIET_S (event time)."""
    cleared = view.error_cleared_at
    if view.error_episode is None or view.error_alert_active or cleared is None:
        return
    if view.window_end - cleared < QUIET_S:
        return
    fired.append(
        Fired(
            kind="usage.error_rate",
            scope="all",
            period=f"{view.error_episode}:recovered",
            value=view.error_cleared_rate,
            threshold=config.error_rate_alert_pct,
        )
    )
    view.error_episode = None
    view.error_cleared_at = None


def reset(view: UsageView, event: UsageReset) -> None:
    """Statistics restart from zero; de-duplication memory and alert episodes carry on."""
    view.days = {}
    view.hours = {}
    view.months = {}
    view.unpriced = {}
    view.window = {}
    view.window_calls = 0
    view.window_failures = 0
    if view.error_alert_active:
        # Statistics restart: the episode counts as cleared now, so it ends after QUIET_S.
        view.error_cleared_at = max(view.window_end, int(event.occurred_at.timestamp()))
        view.error_cleared_rate = 0.0
    view.error_alert_active = False
    view.resets += 1
    view.reset_at = event.occurred_at.timestamp()
