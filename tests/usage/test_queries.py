"""Query parameters, prices and settings: 422s naming the parameter, overrides, rates."""

from __future__ import annotations

from datetime import datetime, time, timedelta
from pathlib import Path

import pytest

from services.usage import queries
from services.usage.contract import StatsParams, TimeseriesParams
from services.usage.prices import PriceTable, base_model, shipped_prices
from services.usage.projection import make_apply
from services.usage.settings import ModelPrice, UsageSettings
from services.usage.view import FoldConfig, UsageView
from shared.errors import InvalidRequestError
from shared.settings import SettingsError, load_settings
from tests.clocks import MOMENTS, SEOUL, Moment, dst_changes
from tests.usage import helpers
from tests.usage.helpers import Oracle, hours_in, local_midnight, mid_month_noon, recorded

# Noon in Seoul (03:00 UTC) on the test clock's day, and that day.
NOW = helpers.T0 - timedelta(hours=6)
SETTINGS = UsageSettings(tz="Asia/Seoul")
TODAY = NOW.astimezone(SETTINGS.zone).date()


def day(offset: int = 0) -> str:
    """The day `offset` days from today (Seoul), as a query parameter."""
    return (TODAY + timedelta(days=offset)).isoformat()


# A range one day longer than allowed, ending today.
TOO_LONG = day(-queries.MAX_RANGE_DAYS)


@pytest.mark.parametrize(
    ("params", "named"),
    [
        (StatsParams(date=TODAY.strftime("%d-%m-%Y")), "'date'"),
        (StatsParams(date=f"{TODAY.year}-02-30"), "'date'"),
        (StatsParams(start=TODAY.replace(day=1).isoformat(), end="nope"), "'end'"),
        (StatsParams(start="yesterday", end=day()), "'start'"),
        (StatsParams(start=day(1), end=day()), "'start'"),
        (StatsParams(start=TOO_LONG, end=day()), "'end'"),
        (StatsParams(start=day(-300), end=day()), "'end'"),
        (StatsParams(date=day(), start=day(-1)), "'date'"),
    ],
)
def test_bad_stats_parameters_are_422_naming_the_parameter(params: StatsParams, named: str) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        queries.stats(UsageView(), params, NOW, SETTINGS)
    assert named in raised.value.detail


def test_a_90_day_window_is_allowed() -> None:
    start = day(-(queries.MAX_RANGE_DAYS - 1))  # 90 days, today included
    stats = queries.stats(UsageView(), StatsParams(start=start, end=day()), NOW, SETTINGS)
    assert (stats.period.start.isoformat(), stats.period.end.isoformat()) == (start, day())


@pytest.mark.parametrize(
    ("params", "named"),
    [
        (TimeseriesParams(bucket="week"), "'bucket'"),
        (TimeseriesParams(start=TOO_LONG, end=day()), "'end'"),
        (TimeseriesParams(start=day(-300), end=day()), "'end'"),
        (TimeseriesParams(bucket="day", start=f"{TODAY.year}-13-01"), "'start'"),
        (TimeseriesParams(start=day(), end=day(-6)), "'start'"),
    ],
)
def test_bad_timeseries_parameters_are_422_naming_the_parameter(
    params: TimeseriesParams, named: str
) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        queries.timeseries(UsageView(), params, NOW, SETTINGS)
    assert named in raised.value.detail


@pytest.mark.parametrize("moment", MOMENTS)
def test_default_timeseries_is_every_hour_of_today_in_the_zone(moment: Moment) -> None:
    settings = UsageSettings(tz=moment.zone)
    zone = settings.zone
    today = moment.local.date()
    series = queries.timeseries(UsageView(), TimeseriesParams(), moment.at, settings)
    # Every hour the day really has: 23 the day the clocks go forward, 25 when they go back.
    assert len(series.points) == hours_in(today, zone)
    midnight = datetime.combine(today, time(0), tzinfo=zone)
    assert series.points[0].t.isoformat() == midnight.isoformat()
    starts = [p.t.timestamp() for p in series.points]
    assert all(later - earlier == 3600 for earlier, later in zip(starts, starts[1:], strict=False))
    assert series.end == local_midnight(today + timedelta(days=1), zone)
    assert all(p.requests == 0 and p.p95_response_time_ms == 0 for p in series.points)
    daily = queries.timeseries(UsageView(), TimeseriesParams(bucket="day"), moment.at, settings)
    assert len(daily.points) == 30 and daily.points[-1].t.date() == today
    assert [p.t.date() for p in daily.points] == [today - timedelta(days=29 - i) for i in range(30)]
    assert all(p.t == local_midnight(p.t.date(), zone) for p in daily.points)


@pytest.mark.parametrize("moment", MOMENTS)
def test_requests_per_minute_is_the_last_five_minutes_today_and_the_day_average_before(
    moment: Moment,
) -> None:
    settings = UsageSettings(tz=moment.zone)
    now = moment.at
    apply = make_apply(FoldConfig(zone=settings.zone, prices=PriceTable.with_overrides({})))
    view = UsageView()
    events = [recorded(i, now - timedelta(seconds=30 * i)) for i in range(20)]  # 10 minutes
    events += [recorded(100 + i, now - timedelta(days=1)) for i in range(144)]
    for seq, event in enumerate(events, start=1):
        apply(view, event, seq)
        view.last_seq = seq
    today = queries.stats(view, StatsParams(), now, settings)
    assert today.requests_per_minute == 10 / 5  # 10 calls in the last 5 minutes
    yesterday = (now - timedelta(days=1)).astimezone(settings.zone).date()
    assert yesterday == moment.local.date() - timedelta(days=1)
    answer = queries.stats(view, StatsParams(date=yesterday.isoformat()), now, settings)
    # The average over the day's real minutes (1380 or 1500 on a daylight-saving change).
    minutes = hours_in(yesterday, settings.zone) * 60
    assert answer.requests_per_minute == pytest.approx(144 / minutes)
    # Yesterday and today so far: every call over the real minutes since yesterday began.
    both = queries.stats(
        view,
        StatsParams(start=yesterday.isoformat(), end=moment.local.date().isoformat()),
        now,
        settings,
    )
    assert both.total_requests == len(events)
    elapsed = now - local_midnight(yesterday, settings.zone)
    rate = len(events) / (elapsed.total_seconds() / 60)
    assert both.requests_per_minute == pytest.approx(rate, abs=5e-5)  # rounded to 4 places


def test_shipped_prices_cover_current_models_and_dated_names() -> None:
    prices = shipped_prices()
    for model in [
        "gpt-4o", "gpt-4o-mini", "gpt-4.1", "gpt-4.1-mini", "gpt-4.1-nano", "o1", "o3",
        "o3-mini", "o4-mini", "gpt-5", "gpt-5-mini", "gpt-5-nano",
        "text-embedding-3-small", "text-embedding-3-large",
    ]:  # fmt: skip
        assert model in prices
    assert base_model("gpt-4o-2024-08-06") == "gpt-4o"
    assert base_model("o3-mini-2025-01-31") == "o3-mini"
    assert base_model("gpt-4.1") == "gpt-4.1"
    table = PriceTable.with_overrides({})
    assert table.cost("gpt-4o-mini-2024-07-18", 1_000_000, 0, 0) == pytest.approx(0.15)
    assert table.cost("not-a-model", 10, 10, 0) is None


def test_prices_table_in_stockpilot_toml_overrides_the_shipped_one(tmp_path: Path) -> None:
    config = tmp_path / "stockpilot.toml"
    config.write_text(
        '[prices."gpt-4o"]\ninput = 1.0\noutput = 2.0\n\n'
        '[prices."house-model"]\ninput = 3.0\ncached_input = 1.5\noutput = 6.0\n'
    )
    settings = load_settings(UsageSettings, {"STOCKPILOT_CONFIG": str(config)})
    assert settings.prices["house-model"] == ModelPrice(input=3.0, cached_input=1.5, output=6.0)
    table = PriceTable.with_overrides(settings.prices)
    assert table.cost("gpt-4o-2024-08-06", 1_000_000, 1_000_000, 0) == pytest.approx(3.0)
    assert table.cost("house-model", 1_000_000, 0, 500_000) == pytest.approx(2.25)
    assert table.cost("gpt-4o-mini", 1_000_000, 0, 0) == pytest.approx(0.15)


def test_bad_usage_settings_name_the_variable(tmp_path: Path) -> None:
    base = {"STOCKPILOT_CONFIG": str(Path(__file__).parents[1] / "empty.toml")}
    with pytest.raises(SettingsError, match="STOCKPILOT_DAILY_BUDGET_USD"):
        load_settings(UsageSettings, base | {"STOCKPILOT_DAILY_BUDGET_USD": "lots"})
    with pytest.raises(SettingsError, match="STOCKPILOT_COST_ALERT_PCT"):
        load_settings(UsageSettings, base | {"STOCKPILOT_COST_ALERT_PCT": "150"})
    with pytest.raises(SettingsError, match="STOCKPILOT_PRICES"):
        load_settings(UsageSettings, base | {"STOCKPILOT_PRICES": '{"m": {"inpt": 1}}'})
    loaded = load_settings(
        UsageSettings, base | {"STOCKPILOT_DAILY_BUDGET_USD": "", "STOCKPILOT_TZ": "Asia/Seoul"}
    )
    assert loaded.daily_budget_usd is None and loaded.cost_alert_pct == 80


# At least four days before the month's end: $90 spent then projects past a $100 budget.
MID_MONTH = Moment("mid-month", SEOUL, mid_month_noon(SEOUL, days_left=4))


@pytest.mark.parametrize("moment", [pytest.param(MID_MONTH, id="mid-month"), *MOMENTS])
def test_costs_forecast_extrapolates_the_month_so_far(moment: Moment) -> None:
    settings = UsageSettings(tz=moment.zone, monthly_budget_usd=100.0, daily_budget_usd=10.0)
    zone = settings.zone
    now = moment.at
    apply = make_apply(FoldConfig(zone=zone, prices=PriceTable.with_overrides({})))
    view = UsageView()
    for seq, event in enumerate([recorded(i, now, cost_usd=9.0) for i in range(10)], start=1):
        apply(view, event, seq)
        view.last_seq = seq
    first = moment.local.date().replace(day=1)
    month_start = local_midnight(first, zone)
    month = local_midnight((first + timedelta(days=31)).replace(day=1), zone) - month_start
    elapsed = now - month_start
    projected = 90.0 * month / elapsed
    costs = queries.costs(view, now, settings)
    assert costs.currency == "USD"
    assert (costs.today.cost_usd, costs.today.budget_usd, costs.today.used_pct) == (
        90.0,
        10.0,
        900.0,
    )
    assert (costs.month.cost_usd, costs.month.used_pct) == (90.0, 90.0)
    assert costs.forecast.month_end_cost_usd == pytest.approx(projected, abs=1e-6)
    assert costs.forecast.over_budget is (projected > 100.0)
    if moment is MID_MONTH:
        assert costs.forecast.over_budget is True
    assert costs.forecast.elapsed_pct == pytest.approx(100.0 * elapsed / month, abs=1e-4)
    assert costs.daily[-1].cost_usd == 90.0 and costs.daily[-2].cost_usd == 0.0
    assert costs.daily[-1].date == moment.local.date() and len(costs.daily) == 30


HALF_HOUR_ZONE = "Australia/Lord_Howe"  # its clocks move by 30 minutes


@pytest.mark.parametrize(
    "change",
    [pytest.param(c, id=f"lord-howe-{n}") for n, c in enumerate(dst_changes(HALF_HOUR_ZONE))],
)
def test_hourly_buckets_hold_every_call_across_a_half_hour_clock_change(change: datetime) -> None:
    settings = UsageSettings(tz=HALF_HOUR_ZONE)
    zone = settings.zone
    apply = make_apply(FoldConfig(zone=zone, prices=PriceTable.with_overrides({})))
    view = UsageView()
    # A call every ten minutes from six hours before the change to six after it.
    events = [
        recorded(i, change - timedelta(hours=6) + timedelta(minutes=10 * i)) for i in range(73)
    ]
    for seq, event in enumerate(events, start=1):
        apply(view, event, seq)
        view.last_seq = seq
    day = change.astimezone(zone).date()
    series = queries.timeseries(
        view,
        TimeseriesParams(start=day.isoformat(), end=day.isoformat()),
        change + timedelta(hours=7),
        settings,
    )
    oracle = Oracle(events, zone, PriceTable.with_overrides({}))
    assert series.points[0].t == local_midnight(day, zone)
    starts = [p.t.timestamp() for p in series.points]
    assert starts == sorted(set(starts))
    for point in series.points:
        want = oracle.hour(point.t)
        assert point.requests == (want.requests if want else 0), point.t
    assert sum(p.requests for p in series.points) == oracle.days([day]).requests
