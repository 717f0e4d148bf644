"""The usage projection: a pure fold of STOCKPILOT_USAGE into the bounded UsageView.

`apply` also runs the alert state machines (budget crossings, error-rate episodes, unpriced
models) and returns the alerts for what the event crossed (`services.usage.alerting` words
them, with deterministic ids), so every replica and every replay derives the same ones.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Protocol
from zoneinfo import ZoneInfo

from services.usage import dedupe, sketch
from services.usage.alerting import alerts_for
from services.usage.events import Price, PricesChanged, UsageEvent, UsageRecorded, UsageReset
from services.usage.prices import PriceTable, base_model
from services.usage.settings import Budget
from services.usage.sketch import Sketch
from services.usage.view import (
    BUDGET_PERIOD_LIMIT,
    COST_EPSILON,
    DAY_LIMIT,
    FORECAST_MIN_ELAPSED_S,
    HOUR_LIMIT,
    KEY_LIMIT,
    LATE_ALERT_S,
    MONTH_LIMIT,
    NO_ENDPOINT,
    OTHER,
    PRICE_TABLE_LIMIT,
    QUIET_S,
    UNPRICED_LIMIT,
    USER_LIMIT,
    WINDOW_S,
    Agg,
    Day,
    Fired,
    FoldConfig,
    Hour,
    Month,
    PriceEpoch,
    Spend,
    UsageView,
    add_call,
    add_total,
    day_start,
    hour_key,
    month_bounds,
)
from shared.events import Alert, rfc3339
from shared.projection import NOTHING_FIRED, Projection

__all__ = [
    "FoldConfig",
    "UsageApply",
    "UsageProjection",
    "UsageView",
    "make_apply",
]


class UsageApply(Protocol):
    """The usage fold of the event stored at `seq`: the alerts it fired. `stored_at` is the
    stream's timestamp of the event (epoch seconds; None outside the runtime)."""

    def __call__(
        self, view: UsageView, event: UsageEvent, seq: int, stored_at: float | None = None
    ) -> Sequence[Alert]: ...


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


def make_apply(config: FoldConfig) -> UsageApply:
    """The fold for this configuration (zone, first prices, budgets, thresholds)."""
    zone = config.zone
    first_prices = config.prices
    warn_pct = config.cost_alert_pct / 100.0
    local_keys = make_local_keys(zone)
    scoped = [(budget, _covers(budget)) for budget in config.budgets]
    # Lookup tables of the view's price epochs, by event id (rebuilt after a restore).
    tables: dict[str, PriceTable] = {}

    def prices_at(view: UsageView, at: float) -> PriceTable:
        """The table in effect at `at`: the latest that took effect at or before it (the
        earliest for a call older than every table)."""
        epochs = view.prices
        if not epochs:
            return first_prices
        epoch = epochs[-1]
        if at < epoch.since:
            epoch = epochs[max(bisect.bisect_right(epochs, at, key=_since) - 1, 0)]
        table = tables.get(epoch.id)
        if table is None:
            if len(tables) >= PRICE_TABLE_LIMIT:
                tables.clear()
            table = tables[epoch.id] = PriceTable(epoch.prices)
        return table

    def record(
        view: UsageView, event: UsageRecorded, seq: int, stored_at: float | None
    ) -> list[Fired]:
        """Fold one call; what it crossed (usually nothing)."""
        fired: list[Fired] = []
        # Without a stored time (a fold outside the runtime) no generation ends by time.
        remembered_at = view.ids.current.since if stored_at is None else stored_at
        if not dedupe.remember(view.ids, event.id, seq, remembered_at, config.dedupe_exact_limit):
            view.duplicates += 1
            return fired
        at = event.occurred_at.timestamp()
        view.recorded += 1
        failed = event.failed
        cost = event.cost_usd
        if cost is None:
            cost = prices_at(view, at).cost(
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
        day_key, h_key, local_year, local_month = local_keys(event.occurred_at, at)
        spend = view.spend
        day_spend = spend.get(day_key)
        if day_spend is None:
            if len(spend) >= DAY_LIMIT:
                oldest = min(spend)
                if day_key < oldest:
                    view.too_old += 1
                    return fired
                del spend[oldest]
            day_spend = spend[day_key] = Spend()
        day_cost_before = day_spend.cost_usd
        day_spend.requests += 1
        day_spend.cost_usd += cost

        days = view.days
        day = days.get(day_key)
        if day is None:
            if len(days) >= DAY_LIMIT:
                # Statistics restarted by a reset may hold fewer days than the spend, never
                # more: the oldest of them is older than this one.
                del days[min(days)]
            day = days[day_key] = Day(total=Agg(), latency=Sketch(bins={}))
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
        add_call(_count_into(month.by_model, event.model, KEY_LIMIT), event, cost, failed)
        if at > month.last_at:
            month.last_at = at

        if config.daily_budget_usd is not None:
            _crossings(
                fired, "daily", day_key, day_cost_before, day_spend.cost_usd,
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
        for scoped_budget, covers in scoped:
            if covers(event):
                _scoped_spend(view, scoped_budget, day_key, month_key, cost, warn_pct, fired)
        _error_window(view, event, int(at), failed, config, fired)
        if fired and stored_at is not None:
            fired = _silence_closed_periods(view, fired, stored_at, day_key, month.end, at, zone)
        return fired

    def apply(
        view: UsageView, event: UsageEvent, seq: int, stored_at: float | None = None
    ) -> Sequence[Alert]:
        if isinstance(event, UsageRecorded):
            fired = record(view, event, seq, stored_at)
            if fired:
                return alerts_for(fired, event, config)
        elif isinstance(event, UsageReset):
            reset(view, event)
        elif isinstance(event, PricesChanged):
            prices_changed(view, event)
        return NOTHING_FIRED

    return apply


def _since(epoch: PriceEpoch) -> float:
    return epoch.since


def prices_changed(view: UsageView, event: PricesChanged) -> None:
    """A price table takes effect at its occurred_at; calls already folded keep their cost."""
    epochs = view.prices
    if any(epoch.id == event.id for epoch in epochs):
        return  # the same table stored twice (a retry beyond the duplicate window)
    since = event.occurred_at.timestamp()
    # Kept in order of `since` (ties: in stream order), so a replay finds the same tables.
    epochs.insert(
        bisect.bisect_right(epochs, since, key=_since),
        PriceEpoch(id=event.id, since=since, prices=dict(event.prices)),
    )
    if len(epochs) > PRICE_TABLE_LIMIT:
        del epochs[0]


@dataclass
class UsageProjection(Projection[UsageView, UsageEvent]):
    """The usage Projection: its fold also reads the stream's stored time of each event,
    and prices calls older than every price table with the stream's first table."""

    config: FoldConfig | None = None

    def use_first_prices(self, prices: Mapping[str, Price]) -> None:
        """Price calls folded before any `usage.prices_changed` with this table."""
        assert self.config is not None
        self.config = replace(self.config, prices=PriceTable(prices))
        self.apply = make_apply(self.config)

    def fold(
        self,
        seq: int,
        data: bytes,
        subject: str | bytes | None = None,
        stored_ns: int | None = None,
    ) -> Sequence[Alert]:
        """Decode, check and apply one stored message, with the time the stream stored it:
        the alerts it fired."""
        event = self.admit(data, subject, stored_ns)
        apply: UsageApply = self.apply  # type: ignore[assignment]
        view = self.view
        fired = apply(view, event, seq, None if stored_ns is None else stored_ns * 1e-9)
        view.last_seq = seq
        return fired


def _silence_closed_periods(
    view: UsageView,
    fired: list[Fired],
    stored_at: float,
    day_key: str,
    month_end: float,
    at: float,
    zone: ZoneInfo,
) -> list[Fired]:
    """Drop the alerts about a period that had closed (plus LATE_ALERT_S) when the event was
    stored: a back-filled call counts in the figures, silently. The stream's stored time,
    not a clock, decides, so a replay drops the same ones."""
    kept = []
    for one in fired:
        scoped = one.kind.startswith("usage.budget_")
        if one.scope == "daily" or (scoped and len(one.period) == len(day_key)):
            day = date.fromisoformat(day_key) + timedelta(days=1)
            closes = day_start(day, zone).timestamp()
        elif one.scope == "monthly" or scoped:
            closes = month_end
        elif one.kind == "usage.error_rate":
            closes = at  # the 5-minute window ending at this call
        else:
            kept.append(one)  # not about a period (an unpriced model)
            continue
        if stored_at <= closes + LATE_ALERT_S:
            kept.append(one)
        else:
            view.alerts_silenced += 1
    return kept


def _covers(budget: Budget) -> Callable[[UsageRecorded], bool]:
    """Whether a call counts against `budget` (a model scope covers its dated names)."""
    kind, _, value = budget.scope.partition(":")
    if kind == "user":
        return lambda event: event.user_id == value
    if kind == "model":
        return lambda event: event.model == value or base_model(event.model) == value
    if kind == "endpoint":
        return lambda event: event.endpoint == value
    if kind == "tag":
        return lambda event: value in event.tags
    return lambda event: True


def _scoped_spend(
    view: UsageView,
    budget: Budget,
    day_key: str,
    month_key: str,
    cost: float,
    warn_pct: float,
    fired: list[Fired],
) -> None:
    periods = view.budget_spend.get(budget.key)
    if periods is None:
        periods = view.budget_spend[budget.key] = {}
    period = day_key if budget.period == "daily" else month_key
    before = periods.get(period)
    if before is None:
        if len(periods) >= BUDGET_PERIOD_LIMIT:
            oldest = min(periods)
            if period < oldest:
                return  # older than any period still held: nobody asks about it
            del periods[oldest]
        before = 0.0
    after = periods[period] = before + cost
    for kind, level in (
        ("usage.budget_warning", budget.usd * warn_pct),
        ("usage.budget_exceeded", budget.usd),
    ):
        if before < level - COST_EPSILON <= after:
            fired.append(
                Fired(kind=kind, scope=budget.scope, period=period, value=after, threshold=level)
            )


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
    """Statistics restart from zero; money (spend per day, months, unpriced models: what
    budgets, /usage/costs and their alerts count), de-duplication memory and alert episodes
    carry on, so a reset can neither hide spend nor re-arm an alert."""
    view.days = {}
    view.hours = {}
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
