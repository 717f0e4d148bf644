"""Pure queries: overall status, the external-apis aggregate, uptime, p95 and history series."""

from __future__ import annotations

import json
from datetime import datetime, timedelta

import pytest

from services.health import history, queries
from services.health.contract import HealthChecked, HistoryParams, HostSampled, Status
from services.health.projection import FoldPolicy, HealthView, apply
from services.health.settings import HealthSettings
from shared.errors import NotFoundError
from shared.settings import load_settings
from tests.clocks import MOMENTS, NOON, Moment

# 09:00 UTC on the day of the run's noon (tests.clocks.NOON), never a literal date.
T0 = NOON - timedelta(hours=3)
POLICY = FoldPolicy(down_after=1, up_after=1)


def settings(apis: int = 0, **env: str) -> HealthSettings:
    listed = [{"name": f"api{i}", "url": f"http://127.0.0.1:9/{i}"} for i in range(apis)]
    return load_settings(
        HealthSettings,
        {"STOCKPILOT_CONFIG": "tests/empty.toml", "STOCKPILOT_EXTERNAL_APIS": json.dumps(listed)}
        | env,
    )


def result(component: str, status: Status, at: datetime, latency: float = 10.0) -> HealthChecked:
    return HealthChecked(
        id=f"{component}-{at.timestamp()}",
        occurred_at=at,
        component=component,
        kind="external_api" if component.startswith("external.") else "database",
        status=status,
        latency_ms=latency,
    )


def view_of(*events: HealthChecked | HostSampled) -> HealthView:
    view = HealthView()
    for event in events:
        apply(view, event, POLICY)
    return view


@pytest.mark.parametrize(
    ("statuses", "overall"),
    [
        ([], "unknown"),
        (["healthy", "unknown"], "healthy"),
        (["healthy", "degraded", "unknown"], "degraded"),
        (["degraded", "unhealthy", "healthy"], "unhealthy"),
        (["unknown", "unknown"], "unknown"),
    ],
)
def test_overall_status_is_the_worst_known(statuses: list[Status], overall: Status) -> None:
    assert queries.worst(statuses) == overall


@pytest.mark.parametrize(
    ("up", "down", "status"),
    [
        (5, 0, "healthy"),
        (4, 1, "healthy"),
        (3, 2, "degraded"),
        (1, 1, "degraded"),
        (1, 4, "unhealthy"),
    ],
)
def test_external_apis_aggregate_thresholds(up: int, down: int, status: Status) -> None:
    s = settings(up + down)
    events = [
        result(f"external.api{i}", "healthy" if i < up else "unhealthy", T0)
        for i in range(up + down)
    ]
    answer = queries.external_apis(view_of(*events), s, T0, cached=True)
    assert answer.status == status
    assert (answer.reachable, answer.total) == (up, up + down)


def test_unconfigured_and_unchecked_components_do_not_drag_the_overall_status() -> None:
    s = settings(1)
    view = view_of(result("database", "healthy", T0))
    whole = queries.comprehensive(view, s, T0 + timedelta(seconds=5), cached=True)
    assert whole.status == "healthy"
    assert whole.age_s == 5.0
    by_name = {c.name: c for c in whole.components}
    assert by_name["redis"].status == "unknown"
    assert by_name["external.api0"].status == "unknown"
    assert by_name["external.api0"].checked_at is None
    assert whole.external_apis.status == "unknown"
    assert whole.system_metrics is None


@pytest.mark.parametrize("moment", MOMENTS)
def test_uptime_and_p95_over_an_hour_and_a_day(moment: Moment) -> None:
    now = moment.at
    first = now - timedelta(minutes=6 * 239, seconds=1)
    events = [
        result(
            "database", "unhealthy" if i < 10 else "healthy", first + timedelta(minutes=6 * i), i
        )
        for i in range(240)  # 24 h, one result every 6 min; the first hour down
    ]
    one = queries.component_health(view_of(*events), "database", "database", now)
    assert one.uptime_pct_1h == 100.0
    assert one.uptime_pct_24h == pytest.approx(100 * 230 / 240, abs=0.01)
    assert one.latency_p95_ms_1h == 239.0
    assert one.latency_p95_ms_24h == 227.0


def test_component_by_unknown_name_is_404() -> None:
    with pytest.raises(NotFoundError, match="nope"):
        queries.component(HealthView(), settings(), "nope", T0, cached=True)


@pytest.mark.parametrize("moment", MOMENTS)
def test_history_points_and_uptime_of_a_target_going_down_and_up(moment: Moment) -> None:
    pattern = "hhuuuuhhhh"
    letters = {"h": "healthy", "u": "unhealthy"}
    now = moment.at
    first = now - timedelta(minutes=10)
    events = [
        result("external.api0", letters[c], first + timedelta(minutes=i), 5.0 + i)  # type: ignore[arg-type]
        for i, c in enumerate(pattern)
    ]
    answer = history.history(
        view_of(*events),
        settings(1, STOCKPILOT_TZ=moment.zone),
        HistoryParams(component="external.api0", hours=1),
        now,
    )
    [series] = answer.series
    assert [p.status for p in series.points] == [letters[c] for c in pattern]
    assert series.uptime_pct == 60.0
    assert series.points[0].t == first
    assert series.points[-1].latency_ms == 14.0


@pytest.mark.parametrize("moment", MOMENTS)
def test_history_is_bounded_per_component_and_merges_the_worst_status(moment: Moment) -> None:
    first = moment.at - timedelta(hours=1)
    events = [
        result("database", "unhealthy" if i == 7 else "healthy", first + timedelta(seconds=30 * i))
        for i in range(100)
    ]
    s = settings(STOCKPILOT_HISTORY_MAX_POINTS="10", STOCKPILOT_TZ=moment.zone)
    answer = history.history(view_of(*events), s, HistoryParams(component="database"), moment.at)
    [series] = answer.series
    assert len(series.points) == 10
    assert series.checks == 100
    assert [p.status for p in series.points].count("unhealthy") == 1
    assert series.uptime_pct == 99.0


@pytest.mark.parametrize("moment", MOMENTS)
def test_history_beyond_a_day_uses_hourly_buckets(moment: Moment) -> None:
    now = moment.at
    zoned = settings(STOCKPILOT_TZ=moment.zone)  # windows are hours back from now, in any zone
    first = now - timedelta(hours=72)
    # Two results in each of the 72 (UTC) hours before now's: at `first`'s minute of the hour,
    # and halfway from there to the hour's end (on the hour: at :00 and :30).
    rest = timedelta(hours=1) - (first - first.replace(minute=0, second=0, microsecond=0))
    events = [
        result("database", "unhealthy" if h == 1 else "healthy", first + timedelta(hours=h) + d)
        for h in range(72)
        for d in (timedelta(0), rest / 2)
    ]
    answer = history.history(
        view_of(*events), zoned, HistoryParams(component="database", hours=72), now
    )
    [series] = answer.series
    assert len(series.points) == 72
    assert series.points[1].status == "unhealthy"
    assert series.checks == 144
    assert series.uptime_pct == pytest.approx(100 * 142 / 144, abs=0.01)
    day = history.history(view_of(*events), zoned, HistoryParams(component="database"), now)
    assert day.series[0].checks == 48  # raw samples of the last 24 h


def test_history_lists_every_component_and_unknown_names_are_404() -> None:
    view = view_of(result("external.old", "healthy", T0))
    answer = history.history(view, settings(1), HistoryParams(), T0)
    assert [s.component for s in answer.series] == [
        "database",
        "redis",
        "openai",
        "external.api0",
        "external.old",
    ]
    with pytest.raises(NotFoundError):
        history.history(view, settings(), HistoryParams(component="nope"), T0)


def test_summary_matches_the_status_route_shape() -> None:
    view = view_of(result("database", "degraded", T0), result("external.api0", "healthy", T0))
    summary = queries.summary(view, settings(1), T0)
    assert summary.status == "degraded"
    assert summary.components == {
        "database": "degraded",
        "redis": "unknown",
        "openai": "unknown",
        "external.api0": "healthy",
        "external-apis": "healthy",
    }
