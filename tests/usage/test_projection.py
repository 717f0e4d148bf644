"""The usage fold, pure: days in the zone, duplicates, costs, alerts, resets, bounds, snapshots."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.usage import queries
from services.usage.answers import StatsParams, TimeseriesParams, UsageStats
from services.usage.events import UsageEvent, UsageRecorded, UsageReset, decode_usage_event
from services.usage.prices import PriceTable
from services.usage.projection import make_apply, make_react
from services.usage.settings import UsageSettings
from services.usage.view import DAY_LIMIT, HOUR_LIMIT, FoldConfig, UsageView
from shared.bus import STREAMS, encode_event
from shared.events import Alert
from shared.projection import Projection, decode_snapshot, encode_snapshot, view_digest
from tests.usage.helpers import Oracle, close, recorded

SEOUL = ZoneInfo("Asia/Seoul")
PRICES = PriceTable.with_overrides({})
T0 = datetime(2026, 11, 26, 3, 0, tzinfo=UTC)  # 12:00 in Seoul


def config(**extra: object) -> FoldConfig:
    return FoldConfig(zone=SEOUL, prices=PRICES, **extra)  # type: ignore[arg-type]


def fold(
    events: Sequence[UsageEvent], cfg: FoldConfig | None = None
) -> tuple[UsageView, list[Alert]]:
    cfg = cfg or config()
    apply, react = make_apply(cfg), make_react(cfg)
    view = UsageView()
    alerts: list[Alert] = []
    for seq, event in enumerate(events, start=1):
        view = apply(view, event)
        view.last_seq = seq
        alerts.extend(react(view, event))
    return view, alerts


def seoul_settings(**extra: object) -> UsageSettings:
    return UsageSettings(tz="Asia/Seoul", **extra)  # type: ignore[arg-type]


def day_stats(view: UsageView, day: str) -> UsageStats:
    return queries.stats(view, StatsParams(date=day), T0, seoul_settings())


def test_duplicate_id_is_counted_once() -> None:
    view, _ = fold([recorded(1), recorded(1), recorded(2)])
    assert day_stats(view, "2026-11-26").total_requests == 2
    assert view.duplicates == 1


def test_days_are_counted_in_the_configured_zone() -> None:
    before = datetime(2026, 11, 26, 14, 59, 59, tzinfo=UTC)  # 23:59:59 in Seoul
    after = datetime(2026, 11, 26, 15, 0, 0, tzinfo=UTC)  # 00:00 on the 27th in Seoul
    view, _ = fold([recorded(1, before), recorded(2, after), recorded(3, after)])
    assert day_stats(view, "2026-11-26").total_requests == 1
    assert day_stats(view, "2026-11-27").total_requests == 2


def test_late_event_lands_in_its_own_day() -> None:
    late = T0 - timedelta(days=3)
    view, _ = fold([recorded(1), recorded(2, late)])
    assert day_stats(view, "2026-11-23").total_requests == 1
    assert day_stats(view, "2026-11-26").total_requests == 1


def test_failures_are_status_400_or_more_or_an_error_code() -> None:
    view, _ = fold(
        [
            recorded(1, status_code=200),
            recorded(2, status_code=429),
            recorded(3, status_code=200, error_code="content_filter"),
            recorded(4, status_code=0, error_code="connection_error"),
        ]
    )
    stats = day_stats(view, "2026-11-26")
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
    stats = day_stats(view, "2026-11-26")
    assert stats.by_model["gpt-4o-2024-08-06"].cost_usd == 2.5
    assert stats.by_model["gpt-4o"].cost_usd == round(0.5 + (0.6 * 2.5 + 0.4 * 1.25 + 0.1 * 10), 6)


def test_unknown_model_costs_nothing_and_alerts_once() -> None:
    view, alerts = fold([recorded(i, model="mystery-1") for i in range(3)])
    stats = day_stats(view, "2026-11-26")
    assert stats.total_cost_usd == 0
    assert stats.unpriced_models == ["mystery-1"]
    assert [(a.kind, a.severity, a.id) for a in alerts] == [
        ("usage.unpriced_model", "info", "usage.unpriced_model:mystery-1:any")
    ]


def test_budget_crossings_alert_once_each_per_period() -> None:
    cfg = config(daily_budget_usd=1.0, monthly_budget_usd=100.0)
    events = [recorded(i, cost_usd=0.1, occurred_at=T0 + timedelta(seconds=i)) for i in range(15)]
    events += [recorded(100 + i, T0 + timedelta(days=1), cost_usd=0.45) for i in range(3)]
    _, alerts = fold(events, cfg)
    assert [(a.kind, a.id) for a in alerts] == [
        ("usage.cost_warning", "usage.cost_warning:daily:2026-11-26"),
        ("usage.cost_exceeded", "usage.cost_exceeded:daily:2026-11-26"),
        ("usage.cost_warning", "usage.cost_warning:daily:2026-11-27"),
        ("usage.cost_exceeded", "usage.cost_exceeded:daily:2026-11-27"),
    ]
    warning = alerts[0]
    assert (warning.source, warning.severity, warning.metric) == (
        "usage",
        "warning",
        "daily_cost_usd",
    )
    assert warning.threshold == 0.8 and warning.value >= 0.8
    assert alerts[1].severity == "critical" and alerts[1].threshold == 1.0


def test_monthly_budget_and_forecast_alerts() -> None:
    cfg = config(monthly_budget_usd=10.0)
    # Ten days into November (Seoul), $4 spent: the month would end at $12.
    tenth = datetime(2026, 11, 10, 15, 0, tzinfo=UTC)
    events = [recorded(i, tenth, cost_usd=1.0) for i in range(4)]
    _, alerts = fold(events, cfg)
    assert [a.id for a in alerts] == ["usage.cost_forecast:monthly:2026-11"]
    assert alerts[0].value > 10.0 and alerts[0].threshold == 10.0
    _, more = fold(events + [recorded(10 + i, tenth, cost_usd=1.0) for i in range(6)], cfg)
    assert [a.id for a in more] == [
        "usage.cost_forecast:monthly:2026-11",
        "usage.cost_warning:monthly:2026-11",
        "usage.cost_exceeded:monthly:2026-11",
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
    stats = day_stats(view, "2026-11-26")
    assert stats.total_requests == 1
    assert view.resets == 1


def test_a_year_of_hourly_events_keeps_the_view_within_its_bounds() -> None:
    start = datetime(2025, 6, 1, tzinfo=UTC)
    hours = 450 * 24
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
    start = datetime(2025, 1, 1, 3, tzinfo=UTC)
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
        react=make_react(cfg),
    )
    projection.view = view
    return projection


# ----- properties -------------------------------------------------------------------------

MODELS = ["gpt-4o", "gpt-4o-mini", "gpt-4o-2024-08-06", "o3-mini", "gpt-5-nano", "mystery"]


@st.composite
def usage_events(draw: st.DrawFn, max_size: int = 120) -> list[UsageEvent]:
    n = draw(st.integers(min_value=0, max_value=max_size))
    events: list[UsageEvent] = []
    for i in range(n):
        if draw(st.integers(0, 40)) == 0:
            events.append(UsageReset(id=f"reset-{i}", occurred_at=T0, actor="admin"))
            continue
        ident = draw(st.integers(0, max(n - 1, 0)))  # repeats make duplicates
        offset = draw(st.integers(-3 * 86_400, 3 * 86_400))
        events.append(
            UsageRecorded(
                id=f"req-{ident}",
                occurred_at=T0 + timedelta(seconds=offset),
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
@given(usage_events(), st.integers(min_value=0, max_value=120))
def test_snapshot_plus_tail_equals_full_replay(events: list[UsageEvent], cut: int) -> None:
    cut = min(cut, len(events))
    cfg = config(daily_budget_usd=5.0, monthly_budget_usd=50.0)

    def new() -> Projection[UsageView, UsageEvent]:
        return Projection(
            name="usage", stream=STREAMS["usage"], view_type=UsageView,
            decode=decode_usage_event, apply=make_apply(cfg), react=make_react(cfg),
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


@settings(max_examples=30, deadline=None)
@given(usage_events(max_size=200))
def test_stats_and_timeseries_match_the_oracle(events: list[UsageEvent]) -> None:
    last_reset = max((i for i, e in enumerate(events) if isinstance(e, UsageReset)), default=-1)
    # Ids seen before the reset are still duplicates after it.
    seen_before = {e.id for e in events[: last_reset + 1]}
    counted = [
        e
        for e in events[last_reset + 1 :]
        if isinstance(e, UsageRecorded) and e.id not in seen_before
    ]
    view, _ = fold(events)
    oracle = Oracle(counted, SEOUL, PRICES)
    s = seoul_settings()
    for day in sorted({(T0 + timedelta(days=d)).astimezone(SEOUL).date() for d in range(-4, 4)}):
        got = queries.stats(view, StatsParams(date=day.isoformat()), T0, s)
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
    start = (T0 - timedelta(days=1)).astimezone(SEOUL).date()
    series = queries.timeseries(
        view,
        TimeseriesParams(
            bucket="hour", start=start.isoformat(), end=(start + timedelta(days=1)).isoformat()
        ),
        T0,
        s,
    )
    assert len(series.points) == 48
    for point in series.points:
        want = oracle.by_hour.get(point.t)
        assert point.requests == (want.requests if want else 0)
        assert point.failed == (want.failures if want else 0)
        assert abs(point.cost_usd - (want.cost if want else 0.0)) < 1e-5
        assert close(point.p95_response_time_ms, want.quantile(0.95) if want else 0.0)
