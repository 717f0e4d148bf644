"""Filters and group_by on /usage/stats and /usage/timeseries, and per-model/per-endpoint
percentiles, against figures computed the obvious way from the same events."""

from __future__ import annotations

import itertools
import math
import random
from datetime import timedelta

import msgspec
import pytest

from services.usage import queries
from services.usage.contract import StatsParams, TimeseriesParams, UsageRecorded
from services.usage.prices import PriceTable, base_model
from services.usage.projection import make_apply
from services.usage.service import build
from services.usage.settings import UsageSettings
from services.usage.slices import GROUP_LIMIT
from services.usage.view import CELL_DAYS, CELL_LIMIT, FoldConfig, UsageView
from shared.clock import ManualClock
from tests.harness import running_service
from tests.usage import helpers
from tests.usage.helpers import INGEST, auth, gateway, gateway_settings, recorded, usage_settings

SETTINGS = UsageSettings(tz="Asia/Seoul")
ZONE = SETTINGS.zone
PRICES = PriceTable.with_overrides({})
# Noon in Seoul on the test clock's day, and the two days before it.
NOON = helpers.T0.astimezone(ZONE).replace(hour=12, minute=0, second=0, microsecond=0)
NOW = NOON + timedelta(hours=6)
TODAY = NOON.date()
# "gpt-4o-2024-08-06" is a dated model name (fixed history: OpenAI's snapshot name, which a
# `model=gpt-4o` filter matches), not a day of the test.
MODELS = ("gpt-4o", "gpt-4o-2024-08-06", "gpt-4o-mini", "o3-mini")  # fixed history: names
ENDPOINTS = ("/api/v1/analysis", "/api/v1/chat", None)
USERS = ("u-1", "u-2", "u-3", None)
TAGS = ((), ("feature:screener",), ("feature:screener", "env:prod"), ("feature:news",))


def mixed_calls(count: int, seed: int = 7) -> list[UsageRecorded]:
    """Calls over the last three days with every combination of the parts filters read."""
    rng = random.Random(seed)
    calls = []
    for i in range(count):
        failed = rng.random() < 0.1
        calls.append(
            recorded(
                i,
                at=NOON - timedelta(minutes=rng.randrange(0, (2 * 24 + 12) * 60)),
                model=rng.choice(MODELS),
                endpoint=rng.choice(ENDPOINTS),
                user_id=rng.choice(USERS),
                tags=rng.choice(TAGS),
                prompt_tokens=rng.randrange(10, 2000),
                completion_tokens=rng.randrange(1, 500),
                response_time_ms=rng.uniform(50, 5000),
                status_code=500 if failed else 200,
                error_code="server_error" if failed else None,
            )
        )
    return calls


def folded(events: list[UsageRecorded]) -> UsageView:
    view = UsageView()
    apply = make_apply(FoldConfig(zone=ZONE, prices=PRICES))
    for seq, event in enumerate(events, start=1):
        apply(view, event, seq)
    return view


def cost_of(event: UsageRecorded) -> float:
    found = PRICES.cost(
        event.model, event.prompt_tokens, event.completion_tokens, event.cached_tokens
    )
    return found or 0.0


def wanted(event: UsageRecorded, filters: dict[str, str]) -> bool:
    model = filters.get("model")
    return (
        (model is None or event.model == model or base_model(event.model) == model)
        and ("endpoint" not in filters or (event.endpoint or "(none)") == filters["endpoint"])
        and ("user_id" not in filters or event.user_id == filters["user_id"])
        and ("tag" not in filters or filters["tag"] in event.tags)
    )


def rank(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[math.floor(q * (len(ordered) - 1))]


CALLS = mixed_calls(3000)
VIEW = folded(CALLS)
START = (TODAY - timedelta(days=2)).isoformat()
END = TODAY.isoformat()
ONE_OF_EACH = {
    "model": "gpt-4o",  # its dated name too
    "endpoint": "/api/v1/chat",
    "user_id": "u-2",
    "tag": "feature:screener",
}
FILTER_SETS = [
    dict(chosen)
    for size in range(1, 5)
    for chosen in itertools.combinations(ONE_OF_EACH.items(), size)
]


@pytest.mark.parametrize("filters", FILTER_SETS, ids=lambda f: "+".join(f))
def test_filtered_stats_count_exactly_the_calls_the_filters_ask_for(
    filters: dict[str, str],
) -> None:
    stats = queries.stats(VIEW, StatsParams(start=START, end=END, **filters), NOW, SETTINGS)
    expected = [event for event in CALLS if wanted(event, filters)]
    assert expected, "the sample must hold calls for every filter set"
    assert stats.total_requests == len(expected)
    assert stats.failed_requests == sum(1 for e in expected if e.failed)
    assert stats.prompt_tokens == sum(e.prompt_tokens for e in expected)
    assert stats.total_cost_usd == pytest.approx(sum(cost_of(e) for e in expected), abs=1e-5)
    assert stats.by_error_code == (
        {"server_error": stats.failed_requests} if stats.failed_requests else {}
    )
    statuses: dict[str, int] = {}
    for event in expected:
        statuses[str(event.status_code)] = statuses.get(str(event.status_code), 0) + 1
    assert stats.by_status_code == statuses
    by_model: dict[str, int] = {}
    for event in expected:
        by_model[event.model] = by_model.get(event.model, 0) + 1
    assert {k: v.requests for k, v in stats.by_model.items()} == by_model
    assert stats.filters.__getattribute__("model") == filters.get("model")
    assert stats.coverage.unattributed_calls == 0
    # Latencies are kept per model and per endpoint, not per user or tag.
    latencies = [e.response_time_ms for e in expected if e.response_time_ms is not None]
    if set(filters) <= {"model"} or set(filters) == {"endpoint"}:
        assert stats.p95_response_time_ms == pytest.approx(rank(latencies, 0.95), rel=0.0101)
        assert stats.coverage.exact
    else:
        assert stats.p95_response_time_ms is None
        assert not stats.coverage.exact
        assert "percentiles" in " ".join(stats.coverage.notes)


def test_unfiltered_stats_give_percentiles_per_model_and_per_endpoint() -> None:
    stats = queries.stats(VIEW, StatsParams(start=START, end=END), NOW, SETTINGS)
    assert stats.coverage.exact and stats.filters.model is None
    for model, answer in stats.by_model.items():
        latencies = [e.response_time_ms or 0.0 for e in CALLS if e.model == model]
        for q, got in (
            (0.50, answer.p50_response_time_ms),
            (0.95, answer.p95_response_time_ms),
            (0.99, answer.p99_response_time_ms),
        ):
            assert got == pytest.approx(rank(latencies, q), rel=0.0101), (model, q)
    for endpoint, answer in stats.by_endpoint.items():
        latencies = [
            e.response_time_ms or 0.0 for e in CALLS if (e.endpoint or "(none)") == endpoint
        ]
        assert answer.p99_response_time_ms == pytest.approx(rank(latencies, 0.99), rel=0.0101)


@pytest.mark.parametrize("bucket", ["hour", "day"])
@pytest.mark.parametrize("group_by", ["model", "endpoint", "user_id", "tag"])
def test_group_by_splits_the_filtered_points_by_key(bucket: str, group_by: str) -> None:
    params = TimeseriesParams(
        bucket=bucket,
        start=START if bucket == "day" else TODAY.isoformat(),
        end=END,
        endpoint="/api/v1/analysis",
        group_by=group_by,  # type: ignore[arg-type]
    )
    answer = queries.timeseries(VIEW, params, NOW, SETTINGS)
    assert answer.series is not None and answer.other_keys == 0
    first = answer.points[0].t
    expected: dict[str, int] = {}
    for event in CALLS:
        if event.endpoint != "/api/v1/analysis" or event.occurred_at < first:
            continue
        keys = {
            "model": [event.model],
            "endpoint": [event.endpoint],
            "user_id": [event.user_id or "(none)"],
            "tag": list(event.tags) or ["(none)"],
        }[group_by]
        for key in keys:
            expected[key] = expected.get(key, 0) + 1
    got = {s.key: sum(p.requests for p in s.points) for s in answer.series}
    assert got == expected
    # The points are the filtered total, whatever the grouping.
    total = sum(1 for e in CALLS if e.endpoint == "/api/v1/analysis" and e.occurred_at >= first)
    assert sum(p.requests for p in answer.points) == total
    assert all(len(s.points) == len(answer.points) for s in answer.series)
    # Largest cost first.
    costs = [sum(p.cost_usd for p in s.points) for s in answer.series]
    assert costs == sorted(costs, reverse=True)


def test_daily_series_by_model_have_each_models_percentiles() -> None:
    params = TimeseriesParams(bucket="day", start=START, end=END, group_by="model")
    answer = queries.timeseries(VIEW, params, NOW, SETTINGS)
    assert answer.coverage.exact and answer.series is not None
    for series in answer.series:
        for point in series.points:
            day = point.t.date()
            latencies = [
                e.response_time_ms or 0.0
                for e in CALLS
                if e.model == series.key and e.occurred_at.astimezone(ZONE).date() == day
            ]
            assert point.p95_response_time_ms == pytest.approx(rank(latencies, 0.95), rel=0.0101)


def test_hourly_points_under_a_user_filter_say_their_percentiles_are_not_kept() -> None:
    params = TimeseriesParams(bucket="hour", user_id="u-1")
    answer = queries.timeseries(VIEW, params, NOW, SETTINGS)
    assert all(p.p95_response_time_ms is None for p in answer.points)
    assert not answer.coverage.exact and answer.coverage.unattributed_calls == 0
    assert answer.filters.user_id == "u-1"


def test_many_keys_become_the_largest_ten_and_other_stated_in_the_answer() -> None:
    calls = [
        recorded(
            i,
            at=NOON - timedelta(minutes=i % 600),
            model=f"model-{i % 25}",
            cost_usd=(i % 25) * 0.01,
        )
        for i in range(500)
    ]
    answer = queries.timeseries(
        folded(calls), TimeseriesParams(bucket="day", group_by="model"), NOW, SETTINGS
    )
    assert answer.series is not None
    keys = [s.key for s in answer.series]
    assert keys[:GROUP_LIMIT] == [f"model-{n}" for n in range(24, 24 - GROUP_LIMIT, -1)]
    assert keys[GROUP_LIMIT:] == ["(other)"]
    assert answer.other_keys == 25 - GROUP_LIMIT
    assert sum(sum(p.requests for p in s.points) for s in answer.series) == 500


def test_past_the_cell_bound_a_user_filter_says_what_it_could_not_tell_apart() -> None:
    users = CELL_LIMIT + 300
    calls = [
        recorded(i, at=NOON - timedelta(seconds=i), user_id=f"user-{i}", model=MODELS[2 + i % 2])
        for i in range(users)
    ]
    view = folded(calls)
    assert len(view.days[TODAY.isoformat()].cells) <= CELL_LIMIT * 1.1 + 1
    late = queries.stats(view, StatsParams(user_id=f"user-{users - 1}"), NOW, SETTINGS)
    # Its call went into a cell whose user is (other): counted in the day, not to the user.
    assert late.total_requests == 0
    assert late.coverage.unattributed_calls == 300 and not late.coverage.exact
    assert "(other)" in late.coverage.notes[0]
    # A filter on the model (kept in the coarser cells) still counts every call.
    by_model = queries.stats(view, StatsParams(model=MODELS[2]), NOW, SETTINGS)
    assert by_model.total_requests == (users + 1) // 2
    assert by_model.coverage.unattributed_calls == 0
    whole = queries.stats(view, StatsParams(), NOW, SETTINGS)
    assert whole.total_requests == users


async def test_filters_and_group_by_through_the_gateway(env: dict[str, str]) -> None:
    settings = usage_settings(env, tz="UTC")
    clock = ManualClock(helpers.T0 + timedelta(hours=2))
    day = helpers.T0.date().isoformat()
    calls = [
        {
            "request_id": f"r-{i}",
            "occurred_at": (helpers.T0 + timedelta(minutes=i)).isoformat(),
            "model": ("gpt-4o", "gpt-4o-mini", "o3-mini")[i % 3],
            "endpoint": ("/api/v1/analysis", "/api/v1/chat")[i % 2],
            "user_id": f"u-{i % 4}",
            "tags": ["feature:screener"] if i % 5 == 0 else [],
            "prompt_tokens": 100 + i,
            "completion_tokens": 10,
            "response_time_ms": 100.0 + 10 * i,
            "status_code": 200 if i % 7 else 429,
        }
        for i in range(60)
    ]
    async with (
        running_service(build(settings), settings, clock=clock),
        gateway(gateway_settings(env), clock) as client,
    ):
        posted = await client.post("/api/v1/usage/records", json=calls, headers=auth(INGEST))
        assert posted.status_code == 202 and posted.json()["accepted"] == 60, posted.text
        stats = await client.get(
            f"/api/v1/usage/stats?date={day}&user_id=u-1&model=gpt-4o-mini&tag=feature:screener"
        )
        assert stats.status_code == 200, stats.text
        body = stats.json()
        expected = [
            c for c in calls if c["user_id"] == "u-1" and c["model"] == "gpt-4o-mini" and c["tags"]
        ]
        assert body["total_requests"] == len(expected) > 0
        assert body["filters"] == {
            "user_id": "u-1",
            "model": "gpt-4o-mini",
            "tag": "feature:screener",
        }
        assert body["p95_response_time_ms"] is None and body["coverage"]["exact"] is False
        by_model = await client.get(f"/api/v1/usage/stats?date={day}&model=o3-mini")
        latencies = [c["response_time_ms"] for c in calls if c["model"] == "o3-mini"]
        answer = by_model.json()
        assert answer["total_requests"] == 20 and answer["coverage"]["exact"] is True
        assert answer["by_model"]["o3-mini"]["p99_response_time_ms"] == pytest.approx(
            rank(latencies, 0.99), rel=0.0101
        )
        series = await client.get(
            f"/api/v1/usage/timeseries?bucket=day&start={day}&end={day}&group_by=model"
        )
        assert series.status_code == 200, series.text
        grouped = series.json()
        assert grouped["group_by"] == "model" and grouped["other_keys"] == 0
        assert {s["key"]: s["points"][0]["requests"] for s in grouped["series"]} == {
            "gpt-4o": 20,
            "gpt-4o-mini": 20,
            "o3-mini": 20,
        }
        for query, named in [
            ("group_by=colour", "group_by"),
            ("model=", "model"),
            ("tag=" + "x" * 65, "tag"),
            ("user_id=" + "u" * 257, "user_id"),
        ]:
            refused = await client.get(f"/api/v1/usage/timeseries?{query}")
            assert refused.status_code in (400, 422), (query, refused.text)
            assert named in refused.text, refused.text


def test_cells_survive_a_snapshot_round_trip() -> None:
    restored = msgspec.msgpack.decode(msgspec.msgpack.encode(VIEW), type=UsageView)
    assert restored == VIEW
    params = TimeseriesParams(
        bucket="day", start=START, end=END, tag="feature:screener", group_by="user_id"
    )
    assert queries.timeseries(restored, params, NOW, SETTINGS) == queries.timeseries(
        VIEW, params, NOW, SETTINGS
    )


def test_a_day_past_the_cell_days_keeps_its_breakdowns_exactly() -> None:
    """Only the newest CELL_DAYS days keep cells; an older day's breakdowns, added up from
    its cells before they go, answer as they did."""
    first = NOON - timedelta(days=CELL_DAYS + 4)
    calls = [
        recorded(
            i,
            at=first + timedelta(days=i // 6),
            model=MODELS[i % 4],
            endpoint=ENDPOINTS[i % 3],
            user_id=USERS[i % 4],
            status_code=(200, 429)[i % 2],
            error_code=(None, "rate_limit")[i % 2],
        )
        for i in range(6 * (CELL_DAYS + 5))
    ]
    oldest = first.astimezone(ZONE).date().isoformat()
    before = queries.stats(folded(calls[:6]), StatsParams(date=oldest), NOW, SETTINGS)
    view = folded(calls)
    assert not view.days[oldest].cells and view.days[TODAY.isoformat()].cells
    after = queries.stats(view, StatsParams(date=oldest), NOW, SETTINGS)
    assert after.by_model.keys() == before.by_model.keys()
    for part in ("by_model", "by_endpoint"):
        assert {k: v.requests for k, v in getattr(after, part).items()} == {
            k: v.requests for k, v in getattr(before, part).items()
        }
    assert after.by_status_code == before.by_status_code == {"200": 3, "429": 3}
    assert after.by_error_code == {"rate_limit": 3}
    assert [u.user_id for u in after.top_users] == [u.user_id for u in before.top_users]
    grouped = queries.timeseries(
        view,
        TimeseriesParams(bucket="day", start=oldest, end=oldest, group_by="model"),
        NOW,
        SETTINGS,
    )
    assert grouped.series is not None and grouped.coverage.exact
    assert sum(s.points[0].requests for s in grouped.series) == 6
    filtered = queries.stats(view, StatsParams(date=oldest, user_id="u-1"), NOW, SETTINGS)
    assert filtered.coverage.unattributed_calls == 6 and "no longer kept" in " ".join(
        filtered.coverage.notes
    )
