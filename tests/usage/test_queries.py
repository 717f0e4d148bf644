"""Query parameters, prices and settings: 422s naming the parameter, overrides, rates."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from services.usage import queries
from services.usage.answers import StatsParams, TimeseriesParams
from services.usage.prices import PriceTable, base_model, shipped_prices
from services.usage.projection import make_apply
from services.usage.settings import ModelPrice, UsageSettings
from services.usage.view import FoldConfig, UsageView
from shared.errors import InvalidRequestError
from shared.settings import SettingsError, load_settings
from tests.usage.helpers import recorded

NOW = datetime(2026, 11, 26, 3, 0, tzinfo=UTC)
SETTINGS = UsageSettings(tz="Asia/Seoul")


@pytest.mark.parametrize(
    ("params", "named"),
    [
        (StatsParams(date="26-11-2026"), "'date'"),
        (StatsParams(date="2026-02-30"), "'date'"),
        (StatsParams(start="2026-11-01", end="nope"), "'end'"),
        (StatsParams(start="yesterday", end="2026-11-26"), "'start'"),
        (StatsParams(start="2026-11-27", end="2026-11-26"), "'start'"),
        (StatsParams(start="2026-01-01", end="2026-11-26"), "'end'"),
        (StatsParams(date="2026-11-26", start="2026-11-25"), "'date'"),
    ],
)
def test_bad_stats_parameters_are_422_naming_the_parameter(params: StatsParams, named: str) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        queries.stats(UsageView(), params, NOW, SETTINGS)
    assert named in raised.value.detail


def test_a_90_day_window_is_allowed() -> None:
    stats = queries.stats(
        UsageView(), StatsParams(start="2026-08-29", end="2026-11-26"), NOW, SETTINGS
    )
    assert (stats.period.start.isoformat(), stats.period.end.isoformat()) == (
        "2026-08-29",
        "2026-11-26",
    )


@pytest.mark.parametrize(
    ("params", "named"),
    [
        (TimeseriesParams(bucket="week"), "'bucket'"),
        (TimeseriesParams(start="2026-01-01", end="2026-11-26"), "'end'"),
        (TimeseriesParams(bucket="day", start="2026-13-01"), "'start'"),
        (TimeseriesParams(start="2026-11-26", end="2026-11-20"), "'start'"),
    ],
)
def test_bad_timeseries_parameters_are_422_naming_the_parameter(
    params: TimeseriesParams, named: str
) -> None:
    with pytest.raises(InvalidRequestError) as raised:
        queries.timeseries(UsageView(), params, NOW, SETTINGS)
    assert named in raised.value.detail


def test_default_timeseries_is_every_hour_of_today_in_the_zone() -> None:
    series = queries.timeseries(UsageView(), TimeseriesParams(), NOW, SETTINGS)
    assert len(series.points) == 24
    assert series.points[0].t.isoformat() == "2026-11-26T00:00:00+09:00"
    assert all(p.requests == 0 and p.p95_response_time_ms == 0 for p in series.points)
    daily = queries.timeseries(UsageView(), TimeseriesParams(bucket="day"), NOW, SETTINGS)
    assert len(daily.points) == 30 and daily.points[-1].t.date().isoformat() == "2026-11-26"


def test_requests_per_minute_is_the_last_five_minutes_today_and_the_day_average_before() -> None:
    apply = make_apply(FoldConfig(zone=SETTINGS.zone, prices=PriceTable.with_overrides({})))
    view = UsageView()
    events = [recorded(i, NOW - timedelta(seconds=30 * i)) for i in range(20)]  # 10 minutes
    events += [recorded(100 + i, NOW - timedelta(days=1)) for i in range(144)]
    for seq, event in enumerate(events, start=1):
        apply(view, event)
        view.last_seq = seq
    today = queries.stats(view, StatsParams(), NOW, SETTINGS)
    assert today.requests_per_minute == 10 / 5  # 10 calls in the last 5 minutes
    yesterday = queries.stats(view, StatsParams(date="2026-11-25"), NOW, SETTINGS)
    assert yesterday.requests_per_minute == pytest.approx(144 / 1440)


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


def test_costs_forecast_extrapolates_the_month_so_far() -> None:
    settings = UsageSettings(tz="Asia/Seoul", monthly_budget_usd=100.0, daily_budget_usd=10.0)
    apply = make_apply(FoldConfig(zone=settings.zone, prices=PriceTable.with_overrides({})))
    view = UsageView()
    # November 2026 in Seoul starts at 2026-10-31T15:00Z; NOW is 25.5 days into its 30.
    for seq, event in enumerate([recorded(i, NOW, cost_usd=9.0) for i in range(10)], start=1):
        apply(view, event)
        view.last_seq = seq
    costs = queries.costs(view, NOW, settings)
    assert costs.currency == "USD"
    assert (costs.today.cost_usd, costs.today.budget_usd, costs.today.used_pct) == (
        90.0,
        10.0,
        900.0,
    )
    assert (costs.month.cost_usd, costs.month.used_pct) == (90.0, 90.0)
    assert costs.forecast.month_end_cost_usd == pytest.approx(90.0 * 30 / 25.5)
    assert costs.forecast.over_budget is True
    assert costs.forecast.elapsed_pct == pytest.approx(85.0)
    assert costs.daily[-1].cost_usd == 90.0 and costs.daily[-2].cost_usd == 0.0
