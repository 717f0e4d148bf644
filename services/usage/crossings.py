"""What a usage call crossed: budget levels, the error-rate episodes, and which of those
come too late to alert. Pure helpers of the usage fold (services.usage.projection), which
passes the list they append what was crossed to (`Fired`; services.usage.alerting words it).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date, timedelta
from zoneinfo import ZoneInfo

from services.usage.contract import UsageRecorded
from services.usage.prices import base_model
from services.usage.settings import Budget
from services.usage.view import (
    BUDGET_PERIOD_LIMIT,
    COST_EPSILON,
    LATE_ALERT_S,
    QUIET_S,
    WINDOW_S,
    Fired,
    FoldConfig,
    UsageView,
    day_start,
)
from shared.events import rfc3339


def silence_closed_periods(
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


def covers(budget: Budget) -> Callable[[UsageRecorded], bool]:
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


def scoped_spend(
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


def crossings(
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


def error_window(
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
    if view.error_episode is not None:
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
