"""The usage fold, pure: days in the zone, duplicates, costs, alerts, resets, bounds, snapshots."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.usage import queries
from services.usage.contract import (
    BudgetParams,
    Price,
    PricesChanged,
    StatsParams,
    TimeseriesParams,
    UsageEvent,
    UsageRecorded,
    UsageReset,
    UsageStats,
    decode_usage_event,
)
from services.usage.prices import PriceTable
from services.usage.projection import make_apply
from services.usage.settings import Budget, UsageSettings
from services.usage.view import DAY_LIMIT, HOUR_LIMIT, FoldConfig, UsageView
from shared.events import Alert
from shared.projection import Projection, decode_snapshot, encode_snapshot, view_digest
from shared.publish import encode_event
from shared.streams import STREAMS
from tests.clocks import MOMENTS, Moment
from tests.usage import helpers
from tests.usage.helpers import Oracle, close, hours_in, local_midnight, recorded

SEOUL = ZoneInfo("Asia/Seoul")
PRICES = PriceTable.with_overrides({})
# Noon in Seoul (03:00 UTC) on the test clock's day; `recorded` defaults to 18:00 that day.
T0 = helpers.T0 - timedelta(hours=6)
TODAY = T0.astimezone(SEOUL).date()


def config(zone: str = "Asia/Seoul", **extra: object) -> FoldConfig:
    return FoldConfig(zone=ZoneInfo(zone), prices=PRICES, **extra)  # type: ignore[arg-type]


def fold(
    events: Sequence[UsageEvent], cfg: FoldConfig | None = None
) -> tuple[UsageView, list[Alert]]:
    cfg = cfg or config()
    apply = make_apply(cfg)
    view = UsageView()
    alerts: list[Alert] = []
    for seq, event in enumerate(events, start=1):
        alerts.extend(apply(view, event, seq))
        view.last_seq = seq
    return view, alerts


def seoul_settings(**extra: object) -> UsageSettings:
    return UsageSettings(tz="Asia/Seoul", **extra)  # type: ignore[arg-type]


def day_stats(view: UsageView, day: date, now: datetime = T0, tz: str = "Asia/Seoul") -> UsageStats:
    return queries.stats(view, StatsParams(date=day.isoformat()), now, UsageSettings(tz=tz))


def test_duplicate_id_is_counted_once() -> None:
    view, _ = fold([recorded(1), recorded(1), recorded(2)])
    assert day_stats(view, TODAY).total_requests == 2
    assert view.duplicates == 1


def test_a_retried_id_is_counted_once_past_any_number_of_newer_ids() -> None:
    """Past a generation's exact ids the rest go to its Bloom filter: never counted twice."""
    cfg = config(dedupe_exact_limit=100)
    events: list[UsageEvent] = [recorded(i, cost_usd=0.01) for i in range(1000)]
    events += [recorded(0, cost_usd=0.01), recorded(500, cost_usd=0.01)]
    view, _ = fold(events, cfg)
    assert view.duplicates == 2 and view.recorded == 1000  # and no new id taken for a retry
    assert view.ids.current.spilled == 900
    assert queries.costs(view, T0, seoul_settings()).today.requests == 1000
    # The Bloom filter survives a snapshot.
    projection = _projection(view)
    restored, _ = decode_snapshot(encode_snapshot(projection, T0), UsageView)
    assert view_digest(restored) == view_digest(view)


def test_ids_are_remembered_for_24_hours_of_stored_time() -> None:
    apply = make_apply(config())
    view = UsageView()
    day = timedelta(hours=24)

    def store(i: int, after: timedelta) -> None:
        apply(view, recorded(i), view.last_seq + 1, (T0 + after).timestamp())
        view.last_seq += 1

    store(1, timedelta(0))
    store(2, day)  # a new generation: id 1 is in the previous one
    store(1, 2 * day - timedelta(minutes=1))  # 47 h 59 min later: still known
    assert (view.recorded, view.duplicates) == (2, 1)
    store(3, 2 * day)  # id 1's generation is forgotten, 48 hours after it began
    store(1, 2 * day + timedelta(minutes=1))
    assert (view.recorded, view.duplicates) == (4, 1)


def test_the_largest_id_memory_snapshots_and_restores() -> None:
    """Two generations of exact ids at their limit and two full Bloom filters."""
    from services.usage import dedupe

    view = UsageView()
    noise = bytearray(range(256)) * (dedupe.BLOOM_BITS // 8 // 256)
    for generation in (view.ids.current, view.ids.previous):
        generation.ids = {
            f"req-{generation is view.ids.current}-{i:032d}": i for i in range(100_000)
        }
        generation.bloom = bytearray(noise)
    data = encode_snapshot(_projection(view), T0)
    restored, _ = decode_snapshot(data, UsageView)
    assert view_digest(restored) == view_digest(view)
    assert len(data) < 64 * 1024 * 1024


@pytest.mark.parametrize("moment", MOMENTS)
def test_days_are_counted_in_the_configured_zone(moment: Moment) -> None:
    before = moment.day_start - timedelta(seconds=1)  # 23:59:59 yesterday, local
    after = moment.day_start  # 00:00 today, local
    today = moment.local.date()
    yesterday = before.astimezone(ZoneInfo(moment.zone)).date()
    assert yesterday == today - timedelta(days=1)
    view, _ = fold(
        [recorded(1, before), recorded(2, after), recorded(3, after)], config(moment.zone)
    )
    assert day_stats(view, yesterday, moment.at, moment.zone).total_requests == 1
    assert day_stats(view, today, moment.at, moment.zone).total_requests == 2


@pytest.mark.parametrize("moment", MOMENTS)
def test_late_event_lands_in_its_own_day(moment: Moment) -> None:
    late = moment.at - timedelta(days=3)
    late_day = late.astimezone(ZoneInfo(moment.zone)).date()
    today = moment.local.date()
    assert late_day == today - timedelta(days=3)
    view, _ = fold([recorded(1, moment.at), recorded(2, late)], config(moment.zone))
    assert day_stats(view, late_day, moment.at, moment.zone).total_requests == 1
    assert day_stats(view, today, moment.at, moment.zone).total_requests == 1


def test_failures_are_status_400_or_more_or_an_error_code() -> None:
    view, _ = fold(
        [
            recorded(1, status_code=200),
            recorded(2, status_code=429),
            recorded(3, status_code=200, error_code="content_filter"),
            recorded(4, status_code=0, error_code="connection_error"),
        ]
    )
    stats = day_stats(view, TODAY)
    assert (stats.successful_requests, stats.failed_requests) == (1, 3)
    assert stats.error_rate == 75.0
    assert stats.by_error_code == {"content_filter": 1, "connection_error": 1}
    assert stats.by_status_code == {"200": 2, "429": 1, "0": 1}


def test_given_cost_wins_and_dated_models_take_the_base_price() -> None:
    view, _ = fold(
        [
            recorded(1, model="gpt-4o-2024-08-06", prompt_tokens=1_000_000, completion_tokens=0),
            recorded(2, model="gpt-4o", cost_usd=0.5),
            recorded(
                3,
                model="gpt-4o",
                prompt_tokens=1_000_000,
                cached_tokens=400_000,
                completion_tokens=100_000,
            ),  # fmt: skip
        ]
    )
    stats = day_stats(view, TODAY)
    assert stats.by_model["gpt-4o-2024-08-06"].cost_usd == 2.5
    assert stats.by_model["gpt-4o"].cost_usd == round(0.5 + (0.6 * 2.5 + 0.4 * 1.25 + 0.1 * 10), 6)


def table(event_id: str, since: datetime, usd: float) -> PricesChanged:
    return PricesChanged(
        id=event_id, occurred_at=since, prices={"gpt-4o": Price(input=usd, output=0.0)}
    )


def test_each_call_is_priced_with_the_table_in_effect_at_its_occurred_at() -> None:
    million = {"model": "gpt-4o", "prompt_tokens": 1_000_000, "completion_tokens": 0}
    hour = timedelta(hours=1)
    events: list[UsageEvent] = [
        recorded(1, T0 - 5 * hour, **million),  # before any table: the configured price
        table("p1", T0 - 4 * hour, 1.0),
        recorded(2, T0 - 3 * hour, **million),  # p1
        recorded(3, T0 - 6 * hour, **million),  # older than every table: the first one, p1
        table("p2", T0 - 2 * hour, 2.0),
        recorded(4, T0 - hour, **million),  # p2
        recorded(5, T0 - 3 * hour, **million),  # back-filled after p2, dated in p1's time
        table("p3", T0 - 3 * hour, 4.0),  # stored late, in effect from before p2
        recorded(6, T0 - 150 * timedelta(minutes=1), **million),  # p3 (after p1, before p2)
        table("p2", T0 - 2 * hour, 2.0),  # the same event again: nothing changes
        recorded(7, T0, **million),  # p2
    ]
    view, _ = fold(events)
    assert [e.id for e in view.prices] == ["p1", "p3", "p2"]
    costs = queries.costs(view, T0, seoul_settings())
    by_day = {d.date: d.cost_usd for d in costs.daily}
    assert sum(by_day.values()) == 2.5 + 1 + 1 + 2 + 1 + 4 + 2


def test_unknown_model_costs_nothing_and_alerts_once() -> None:
    view, alerts = fold([recorded(i, model="mystery-1") for i in range(3)])
    stats = day_stats(view, TODAY)
    assert stats.total_cost_usd == 0
    assert stats.unpriced_models == ["mystery-1"]
    assert [(a.kind, a.severity, a.id) for a in alerts] == [
        ("usage.unpriced_model", "info", "usage.unpriced_model:mystery-1:any")
    ]


@pytest.mark.parametrize("moment", MOMENTS)
def test_budget_crossings_alert_once_each_per_period(moment: Moment) -> None:
    cfg = config(moment.zone, daily_budget_usd=1.0, monthly_budget_usd=100.0)
    # Yesterday's last hour (local), then today up to the moment.
    late_yesterday = moment.day_start - timedelta(hours=1)
    yesterday = late_yesterday.astimezone(ZoneInfo(moment.zone)).date().isoformat()
    today = moment.local.date().isoformat()
    events = [
        recorded(i, cost_usd=0.1, occurred_at=late_yesterday + timedelta(seconds=i))
        for i in range(15)
    ]
    events += [
        recorded(100 + i, moment.earlier_today(0.5 + i / 4), cost_usd=0.45) for i in range(3)
    ]
    _, alerts = fold(events, cfg)
    assert [(a.kind, a.id) for a in alerts] == [
        ("usage.cost_warning", f"usage.cost_warning:daily:{yesterday}"),
        ("usage.cost_exceeded", f"usage.cost_exceeded:daily:{yesterday}"),
        ("usage.cost_warning", f"usage.cost_warning:daily:{today}"),
        ("usage.cost_exceeded", f"usage.cost_exceeded:daily:{today}"),
    ]
    warning = alerts[0]
    assert (warning.source, warning.severity, warning.metric) == (
        "usage",
        "warning",
        "daily_cost_usd",
    )
    assert warning.threshold == 0.8 and warning.value >= 0.8
    assert alerts[1].severity == "critical" and alerts[1].threshold == 1.0


@pytest.mark.parametrize("moment", MOMENTS)
def test_monthly_budget_and_forecast_alerts(moment: Moment) -> None:
    cfg = config(moment.zone, monthly_budget_usd=10.0)
    zone = ZoneInfo(moment.zone)
    # Ten whole days into the moment's month (local), $4 spent: whatever the month's length
    # (28 to 31 days, an hour less or more across a DST change) it would end above $10.
    # The fold reads no clock, so this may lie after the moment in the month's first days.
    first = moment.local.date().replace(day=1)
    month_start = local_midnight(first, zone)
    tenth = local_midnight(first + timedelta(days=10), zone)
    month_end = local_midnight((first + timedelta(days=31)).replace(day=1), zone)
    month = first.isoformat()[:7]
    events = [recorded(i, tenth, cost_usd=1.0) for i in range(4)]
    _, alerts = fold(events, cfg)
    assert [a.id for a in alerts] == [f"usage.cost_forecast:monthly:{month}"]
    assert alerts[0].value > 10.0 and alerts[0].threshold == 10.0
    assert alerts[0].value == round(4.0 * (month_end - month_start) / (tenth - month_start), 6)
    _, more = fold(events + [recorded(10 + i, tenth, cost_usd=1.0) for i in range(6)], cfg)
    assert [a.id for a in more] == [
        f"usage.cost_forecast:monthly:{month}",
        f"usage.cost_warning:monthly:{month}",
        f"usage.cost_exceeded:monthly:{month}",
    ]


def test_error_rate_alert_that_clears_and_returns_within_ten_minutes_is_not_raised_again() -> None:
    cfg = config(error_rate_alert_pct=20.0, error_rate_min_calls=10)
    at = [T0 + timedelta(seconds=i) for i in range(200)]
    events: list[UsageEvent] = []
    events += [recorded(i, at[i], status_code=500 if i < 2 else 200) for i in range(8)]
    # 2 of 8 failed: 25 % but fewer than 10 calls; two more successes: 2/10 = 20 % fires.
    events += [recorded(i, at[i]) for i in range(8, 10)]
    events += [recorded(i, at[i]) for i in range(10, 30)]  # 2/30: recovered
    events += [recorded(i, at[i], status_code=503) for i in range(30, 40)]  # 12/40 returns
    _, alerts = fold(events, cfg)
    kinds = [a for a in alerts if a.kind == "usage.error_rate"]
    assert (
        len(kinds) == 1
    )  # back within seconds: the same episode (tests/usage/test_alert_episodes)
    assert kinds[0].value == 20.0 and kinds[0].metric == "error_rate_pct"


def test_error_rate_window_forgets_calls_older_than_five_minutes() -> None:
    cfg = config(error_rate_alert_pct=20.0, error_rate_min_calls=10)
    old = [recorded(i, T0, status_code=500) for i in range(5)]
    later = [recorded(10 + i, T0 + timedelta(minutes=6)) for i in range(10)]
    view, alerts = fold(old + later, cfg)
    assert not [a for a in alerts if a.kind == "usage.error_rate"]
    assert view.window_calls == 10 and view.window_failures == 0


def test_reset_restarts_statistics_but_remembers_ids() -> None:
    reset = UsageReset(id="r1", occurred_at=T0, actor="admin")
    view, _ = fold([recorded(1), recorded(2), reset, recorded(2), recorded(3)])
    stats = day_stats(view, TODAY)
    assert stats.total_requests == 1
    assert view.resets == 1


def test_lifetime_counters_only_grow_through_resets_and_duplicates() -> None:
    """What /metrics exposes as `_total` counters: every call ever recorded, never reset."""
    reset = UsageReset(id="r1", occurred_at=T0, actor="admin")
    events: list[UsageEvent] = [
        recorded(1, response_time_ms=90.0),
        recorded(2, model="gpt-4o", status_code=429, error_code="rate_limit", cost_usd=0.5),
        reset,
        recorded(2),  # a repeat of an id already counted
        recorded(3, response_time_ms=250_000.0),
    ]
    view, _ = fold(events)
    counters = queries.counters(view)
    assert day_stats(view, TODAY).total_requests == 1  # the statistics did restart
    mini, big = counters.by_model["gpt-4o-mini"], counters.by_model["gpt-4o"]
    assert (mini.requests, mini.failed_requests, mini.prompt_tokens) == (2, 0, 1600)
    assert (big.requests, big.failed_requests, big.cost_usd) == (1, 1, 0.5)
    assert counters.by_error_code == {"rate_limit": 1}
    assert counters.by_status_code == {"200": 2, "429": 1}
    assert counters.duplicates == 1
    # 0.09 s, 1 s and 250 s: cumulative buckets, the last one past every bound.
    bounds = counters.latency_bounds_s
    assert counters.latency_buckets[bounds.index(0.1)] == 1
    assert counters.latency_buckets[bounds.index(1.0)] == 2
    assert counters.latency_buckets[-1] == 2 and counters.latency_count == 3
    assert counters.latency_sum_s == pytest.approx(0.09 + 1.0 + 250.0)


def test_a_reset_never_touches_the_money() -> None:
    """Spend, reset, spend more: costs, budgets and their alerts as if there were no reset."""
    cfg = config(daily_budget_usd=1.0, monthly_budget_usd=1.5)
    before = [recorded(i, cost_usd=0.3, model="gpt-4o") for i in range(3)]  # $0.90: warning
    after = [recorded(10 + i, cost_usd=0.3) for i in range(3)]  # $1.80: exceeded, both
    reset = UsageReset(id="r1", occurred_at=T0, actor="admin")
    view, alerts = fold([*before, reset, *after], cfg)
    plain, plain_alerts = fold([*before, *after], cfg)
    s = seoul_settings(daily_budget_usd=1.0, monthly_budget_usd=1.5)
    costs = queries.costs(view, T0, s)
    assert msgspec.json.encode(costs) == msgspec.json.encode(queries.costs(plain, T0, s))
    assert costs.today.cost_usd == 1.8 and costs.today.requests == 6
    assert costs.today.used_pct == 180.0 and costs.month.cost_usd == 1.8
    assert costs.by_model["gpt-4o"].requests == 3 and costs.by_model["gpt-4o-mini"].requests == 3
    assert [a.id for a in alerts] == [a.id for a in plain_alerts]
    day = TODAY.isoformat()
    assert sorted(a.id for a in alerts if a.kind != "usage.cost_forecast") == [
        f"usage.cost_exceeded:daily:{day}",
        f"usage.cost_exceeded:monthly:{day[:7]}",
        f"usage.cost_warning:daily:{day}",
        f"usage.cost_warning:monthly:{day[:7]}",
    ]
    # The statistics did restart.
    assert day_stats(view, TODAY).total_requests == 3
    assert day_stats(plain, TODAY).total_requests == 6


def fold_stored(
    events: Sequence[tuple[UsageEvent, datetime]], cfg: FoldConfig
) -> tuple[UsageView, list[Alert]]:
    """Fold events with the time the stream stored each."""
    apply = make_apply(cfg)
    view = UsageView()
    alerts: list[Alert] = []
    for seq, (event, stored) in enumerate(events, start=1):
        alerts.extend(apply(view, event, seq, stored.timestamp()))
        view.last_seq = seq
    return view, alerts


def test_back_filled_calls_of_closed_periods_count_silently() -> None:
    cfg = config(daily_budget_usd=1.0, monthly_budget_usd=1.0, error_rate_min_calls=5)
    long_ago = T0 - timedelta(days=40)  # its day and its month closed long before T0
    calls = [
        recorded(i, long_ago + timedelta(seconds=i), cost_usd=0.3, status_code=500)
        for i in range(5)
    ]
    view, alerts = fold_stored([(c, T0) for c in calls], cfg)
    day = long_ago.astimezone(SEOUL).date()
    assert alerts == []
    assert day_stats(view, day).total_requests == 5
    assert view.spend[day.isoformat()].cost_usd == 1.5
    # The same calls stored as they happened alert as ever (and the month's forecast too,
    # unless they fell in its first day).
    _, live = fold_stored([(c, c.occurred_at) for c in calls], cfg)
    assert sorted(a.kind for a in live if a.kind != "usage.cost_forecast") == [
        "usage.cost_exceeded",
        "usage.cost_exceeded",
        "usage.cost_warning",
        "usage.cost_warning",
        "usage.error_rate",
    ]
    assert view.alerts_silenced == len(live)


@pytest.mark.parametrize("moment", MOMENTS)
def test_a_day_alerts_until_an_hour_after_it_closes(moment: Moment) -> None:
    zone = ZoneInfo(moment.zone)
    cfg = config(moment.zone, daily_budget_usd=1.0)
    late_yesterday = moment.day_start - timedelta(hours=1)
    yesterday = late_yesterday.astimezone(zone).date().isoformat()
    calls = [recorded(i, late_yesterday, cost_usd=0.6) for i in range(2)]
    hour = timedelta(hours=1)
    # Yesterday closed at moment.day_start (local midnight, 23 or 25 hours long or not).
    _, in_time = fold_stored([(c, moment.day_start + hour) for c in calls], cfg)
    assert [a.id for a in in_time] == [
        f"usage.cost_warning:daily:{yesterday}",
        f"usage.cost_exceeded:daily:{yesterday}",
    ]
    just_late = moment.day_start + hour + timedelta(seconds=1)
    view, too_late = fold_stored([(c, just_late) for c in calls], cfg)
    assert too_late == [] and view.spend[yesterday].cost_usd == 1.2


def test_scoped_budgets_count_their_calls_alert_and_enforce() -> None:
    budgets = (
        Budget(scope="user:u-42", period="daily", usd=1.0, enforce=True),
        Budget(scope="model:gpt-4o", period="monthly", usd=2.0),
        Budget(scope="tag:feature:screener", period="daily", usd=0.5, enforce=True),
    )
    cfg = config(budgets=budgets)
    events: list[UsageEvent] = [
        recorded(1, user_id="u-42", model="gpt-4o-2024-08-06", cost_usd=0.9),  # 90 %: warning
        recorded(2, user_id="u-7", model="gpt-4o", cost_usd=0.9, tags=["feature:screener"]),
        UsageReset(id="r1", occurred_at=T0, actor="admin"),  # money: nothing re-arms
        recorded(3, user_id="u-42", model="gpt-4o-mini", cost_usd=0.2),  # u-42 exceeded
    ]
    view, alerts = fold(events, cfg)
    day, month = TODAY.isoformat(), TODAY.isoformat()[:7]
    assert [a.id for a in alerts] == [
        f"usage.budget_warning:user:u-42:{day}",
        f"usage.budget_warning:model:gpt-4o:{month}",
        f"usage.budget_warning:tag:feature:screener:{day}",
        f"usage.budget_exceeded:tag:feature:screener:{day}",
        f"usage.budget_exceeded:user:u-42:{day}",
    ]
    assert alerts[-1].severity == "critical" and alerts[-1].metric == "budget_cost_usd"
    s = seoul_settings(budgets=list(budgets), daily_budget_usd=10.0)
    answer = queries.budget(view, BudgetParams(user_id="u-42", model="gpt-4o"), T0, s)
    assert not answer.allowed and "user:u-42" in (answer.reason or "")
    assert [(b.scope, b.period, b.used_usd, b.enforce) for b in answer.budgets] == [
        ("all", "daily", 2.0, False),
        ("user:u-42", "daily", 1.1, True),
        ("model:gpt-4o", "monthly", 1.8, False),
    ]
    other = queries.budget(view, BudgetParams(user_id="u-7", model="gpt-4o"), T0, s)
    assert other.allowed and other.reason is None
    screener = queries.budget(view, BudgetParams(tag="feature:screener"), T0, s)
    assert not screener.allowed
    tomorrow = queries.budget(view, BudgetParams(user_id="u-42"), T0 + timedelta(days=1), s)
    assert tomorrow.allowed and tomorrow.budgets[1].used_usd == 0.0


def test_a_year_of_hourly_events_keeps_the_view_within_its_bounds() -> None:
    hours = 450 * 24
    start = T0 - timedelta(hours=hours)  # the last event an hour before the test's noon
    events = [recorded(i, start + timedelta(hours=i), user_id=f"u{i}") for i in range(hours)]
    view, _ = fold(events)
    assert len(view.days) == DAY_LIMIT
    assert len(view.hours) == HOUR_LIMIT
    last = start + timedelta(hours=hours - 1)
    # Every hour of the last 7 days and every day of the last 400 are still there.
    now = last + timedelta(minutes=30)
    series = queries.timeseries(
        view,
        TimeseriesParams(
            bucket="hour",
            start=(now - timedelta(days=7)).isoformat(),
            end=last.isoformat(),
        ),
        now,
        seoul_settings(),
    )
    assert len(series.points) == 7 * 24 + 1
    assert all(p.requests == 1 for p in series.points)
    oldest_day = (last.astimezone(SEOUL) - timedelta(days=399)).date().isoformat()
    assert oldest_day in view.days
    size = len(encode_snapshot(_projection(view), now))
    assert size < 1024 * 1024


def test_largest_bounded_view_snapshots_and_restores() -> None:
    """Every day full of distinct endpoints, models and users: the snapshot still round-trips."""
    start = T0 - timedelta(days=DAY_LIMIT)
    events = []
    n = 0
    for day in range(DAY_LIMIT):
        at = start + timedelta(days=day)
        for k in range(120):
            n += 1
            events.append(
                recorded(
                    n,
                    at,
                    endpoint=f"/e{k}",
                    model=f"m{k}",
                    user_id=f"u{k}",
                    response_time_ms=float(k * 37 % 5000 + 1),
                )  # fmt: skip
            )
    view, _ = fold(events)
    projection = _projection(view)
    data = encode_snapshot(projection, start)
    restored, _ = decode_snapshot(data, UsageView)
    assert view_digest(restored) == view_digest(view)
    assert len(data) < 64 * 1024 * 1024


def _projection(view: UsageView) -> Projection[UsageView, UsageEvent]:
    cfg = config()
    projection: Projection[UsageView, UsageEvent] = Projection(
        name="usage",
        stream=STREAMS["usage"],
        view_type=UsageView,
        decode=decode_usage_event,
        apply=make_apply(cfg),
    )
    projection.view = view
    return projection


# ----- properties -------------------------------------------------------------------------

MODELS = ["gpt-4o", "gpt-4o-mini", "gpt-4o-2024-08-06", "o3-mini", "gpt-5-nano", "mystery"]


@st.composite
def usage_events(
    draw: st.DrawFn, max_size: int = 120, around: datetime = T0, prices: bool = False
) -> list[UsageEvent]:
    n = draw(st.integers(min_value=0, max_value=max_size))
    events: list[UsageEvent] = []
    for i in range(n):
        if draw(st.integers(0, 40)) == 0:
            events.append(UsageReset(id=f"reset-{i}", occurred_at=around, actor="admin"))
            continue
        if prices and draw(st.integers(0, 20)) == 0:
            offset = draw(st.integers(-3 * 86_400, 3 * 86_400))
            since = around + timedelta(seconds=offset)
            events.append(table(f"prices-{i}", since, draw(st.sampled_from([0.5, 1.0, 7.0]))))
            continue
        ident = draw(st.integers(0, max(n - 1, 0)))  # repeats make duplicates
        offset = draw(st.integers(-3 * 86_400, 3 * 86_400))
        events.append(
            UsageRecorded(
                id=f"req-{ident}",
                occurred_at=around + timedelta(seconds=offset),
                model=draw(st.sampled_from(MODELS)),
                endpoint=draw(st.sampled_from(["/a", "/b", None])),
                status_code=draw(st.sampled_from([200, 200, 200, 400, 429, 500])),
                error_code=draw(st.sampled_from([None, None, None, "timeout"])),
                prompt_tokens=draw(st.integers(0, 5000)),
                completion_tokens=draw(st.integers(0, 2000)),
                cached_tokens=draw(st.integers(0, 3000)),
                cost_usd=draw(st.one_of(st.none(), st.none(), st.floats(0, 2))),
                response_time_ms=draw(st.one_of(st.none(), st.floats(0, 60_000))),
                user_id=draw(st.sampled_from(["u1", "u2", None])),
            )
        )
    return events


def _bytes_fold(
    projection: Projection[UsageView, UsageEvent], events: Sequence[UsageEvent], start: int
) -> None:
    for seq, event in enumerate(events, start=start):
        projection.fold(seq, encode_event(event))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(usage_events(prices=True), st.integers(min_value=0, max_value=120))
def test_snapshot_plus_tail_equals_full_replay(events: list[UsageEvent], cut: int) -> None:
    cut = min(cut, len(events))
    cfg = config(daily_budget_usd=5.0, monthly_budget_usd=50.0)

    def new() -> Projection[UsageView, UsageEvent]:
        return Projection(
            name="usage", stream=STREAMS["usage"], view_type=UsageView,
            decode=decode_usage_event, apply=make_apply(cfg),
        )  # fmt: skip

    full = new()
    _bytes_fold(full, events, 1)
    first = new()
    _bytes_fold(first, events[:cut], 1)
    restored = new()
    restored.view, _ = decode_snapshot(encode_snapshot(first, T0), UsageView)
    _bytes_fold(restored, events[cut:], cut + 1)
    assert view_digest(restored.view) == view_digest(full.view)
    assert msgspec.json.encode(
        queries.stats(restored.view, StatsParams(), T0, seoul_settings())
    ) == msgspec.json.encode(queries.stats(full.view, StatsParams(), T0, seoul_settings()))


@pytest.mark.parametrize("moment", MOMENTS)
def test_stats_and_timeseries_match_the_oracle(moment: Moment) -> None:
    # Three days either side of the moment: across its midnights, month, year, DST change.
    # The ordinary noon keeps its 30 examples; each awkward instant adds 5 of up to 200 calls
    # over those six days (`make test-fast` stays quick; the instants' edges have their own
    # tests above and in test_queries).
    examples = 30 if moment.name == "noon" else 5

    @settings(max_examples=examples, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(usage_events(max_size=200, around=moment.at))
    def check(events: list[UsageEvent]) -> None:
        match_the_oracle(moment, events)

    check()


def match_the_oracle(moment: Moment, events: list[UsageEvent]) -> None:
    now = moment.at
    zone = ZoneInfo(moment.zone)
    last_reset = max((i for i, e in enumerate(events) if isinstance(e, UsageReset)), default=-1)
    # Ids seen before the reset are still duplicates after it.
    seen_before = {e.id for e in events[: last_reset + 1]}
    counted = [
        e
        for e in events[last_reset + 1 :]
        if isinstance(e, UsageRecorded) and e.id not in seen_before
    ]
    view, _ = fold(events, config(moment.zone))
    oracle = Oracle(counted, zone, PRICES)
    s = UsageSettings(tz=moment.zone)
    for day in sorted({(now + timedelta(days=d)).astimezone(zone).date() for d in range(-4, 4)}):
        got = queries.stats(view, StatsParams(date=day.isoformat()), now, s)
        want = oracle.days([day])
        assert got.total_requests == want.requests
        assert got.failed_requests == want.failures
        assert got.total_tokens == want.prompt + want.completion
        assert abs(got.total_cost_usd - want.cost) < 1e-5
        assert close(got.avg_response_time_ms, want.avg(), rel=1e-6)
        assert close(got.p95_response_time_ms, want.quantile(0.95))
        for model, totals in oracle.by_day_model.get(day, {}).items():
            assert abs(got.by_model[model].cost_usd - totals.cost) < 0.005
            assert got.by_model[model].requests == totals.requests
        assert got.by_status_code == dict(oracle.by_day_status.get(day, {}))
    # Yesterday and today: every hour they really have (47 or 49 across a DST change).
    start = (now - timedelta(days=1)).astimezone(zone).date()
    series = queries.timeseries(
        view,
        TimeseriesParams(
            bucket="hour", start=start.isoformat(), end=(start + timedelta(days=1)).isoformat()
        ),
        now,
        s,
    )
    hours = hours_in(start, zone) + hours_in(start + timedelta(days=1), zone)
    assert len(series.points) == hours
    assert series.points[0].t == local_midnight(start, zone)
    starts = [p.t.timestamp() for p in series.points]
    assert all(later - earlier == 3600 for earlier, later in zip(starts, starts[1:], strict=False))
    for point in series.points:
        want = oracle.hour(point.t)
        assert point.requests == (want.requests if want else 0)
        assert point.failed == (want.failures if want else 0)
        assert abs(point.cost_usd - (want.cost if want else 0.0)) < 1e-5
        assert close(point.p95_response_time_ms, want.quantile(0.95) if want else 0.0)
