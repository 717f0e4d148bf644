"""Hypothesis-generated usage through NATS and through HTTP; every route figure vs an oracle."""

from __future__ import annotations

import asyncio
import random
import tempfile
from datetime import date, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import nats
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.usage.contract import (
    SUBJECT_RECORDED,
    UsageCosts,
    UsageRecorded,
    UsageStats,
    UsageTimeseries,
)
from services.usage.prices import PriceTable
from services.usage.service import build
from shared.clock import ManualClock
from shared.publish import encode_event
from tests.clocks import NOON
from tests.harness import nats_server, running_service
from tests.usage.helpers import (
    INGEST,
    Oracle,
    auth,
    close,
    gateway,
    gateway_settings,
    hours_in,
    usage_settings,
)

TZ = "Asia/Seoul"
ZONE = ZoneInfo(TZ)
# The services and the gateway run on a clock set here: "today" is this instant's day.
ANCHOR = NOON
MODELS = ["gpt-4o", "gpt-4o-mini", "gpt-4.1-nano", "o4-mini-2025-04-16", "gpt-5", "mystery-model"]
EMPTY_TOML = str(Path(__file__).parents[1] / "empty.toml")

STATUSES = [200, 200, 200, 200, 400, 429, 500, 503]
ERRORS = [None, None, None, None, "rate_limit_exceeded", "timeout"]
ENDPOINTS = ["/api/v1/analysis", "/api/v1/chat", None]
USERS = ["u-1", "u-2", "u-3", None]


def random_row(rng: random.Random) -> tuple[Any, ...]:
    """One call's fields; days cross Seoul midnights (up to 3 days before the anchor)."""
    return (
        rng.randint(0, 3 * 86_400),
        rng.choice(MODELS),
        rng.choice(ENDPOINTS),
        rng.choice(STATUSES),
        rng.choice(ERRORS),
        rng.randint(0, 8_000),
        rng.randint(0, 2_000),
        rng.randint(0, 4_000),
        rng.uniform(0, 0.5) if rng.random() < 0.25 else None,
        rng.uniform(1, 90_000) if rng.random() < 0.9 else None,
        rng.choice(USERS),
    )


class Batch:
    """Generated events and which of them are sent again (a short repr for hypothesis)."""

    def __init__(self, events: list[UsageRecorded], repeats: list[int]) -> None:
        self.events = events
        self.repeats = repeats

    def __repr__(self) -> str:
        return f"Batch(<{len(self.events)} events>, repeats={self.repeats})"


@st.composite
def usage_batches(draw: st.DrawFn) -> Batch:
    # Thousands of events overflow hypothesis' buffer when each field is drawn: a seeded
    # generator (hypothesis-chosen seed and size) makes them, reproducibly.
    size = draw(st.integers(min_value=300, max_value=2500))
    rng = draw(st.randoms(use_true_random=True))
    rows = [random_row(rng) for _ in range(size)]
    events = [
        UsageRecorded(
            id=f"req-{i}",
            request_id=f"req-{i}",
            occurred_at=ANCHOR - timedelta(seconds=row[0]),
            model=row[1],
            endpoint=row[2],
            status_code=row[3],
            error_code=row[4],
            prompt_tokens=row[5],
            completion_tokens=row[6],
            cached_tokens=row[7],
            cost_usd=row[8],
            response_time_ms=row[9],
            user_id=row[10],
        )
        for i, row in enumerate(rows)
    ]
    repeats = [rng.randrange(len(events)) for _ in range(draw(st.integers(0, 60)))]
    return Batch(events, repeats)


def local_days(events: list[UsageRecorded]) -> list[date]:
    return sorted({e.occurred_at.astimezone(ZONE).date() for e in events})


async def check_routes(client: Any, oracle: Oracle, days: list[date]) -> None:
    """Compare /stats (each day and the range), /timeseries (hour and day) and /costs."""
    for day in days:
        got = msgspec.json.decode(
            (await client.get(f"/api/v1/usage/stats?date={day}")).content, type=UsageStats
        )
        want = oracle.days([day])
        assert got.total_requests == want.requests
        assert got.successful_requests == want.requests - want.failures
        assert got.failed_requests == want.failures
        assert got.prompt_tokens == want.prompt
        assert got.completion_tokens == want.completion
        assert abs(got.total_cost_usd - want.cost) < 0.005
        assert close(got.avg_response_time_ms, want.avg(), rel=1e-6)
        assert close(got.p95_response_time_ms, want.quantile(0.95))
        assert close(got.p50_response_time_ms, want.quantile(0.50))
        assert close(got.p99_response_time_ms, want.quantile(0.99))
        models = oracle.by_day_model[day]
        assert set(got.by_model) == set(models)
        for model, totals in models.items():
            assert abs(got.by_model[model].cost_usd - totals.cost) < 0.005
            assert got.by_model[model].requests == totals.requests
            assert got.by_model[model].failed_requests == totals.failures
        for endpoint, totals in oracle.by_day_endpoint[day].items():
            assert got.by_endpoint[endpoint].requests == totals.requests
        assert got.by_status_code == dict(oracle.by_day_status[day])
        assert got.by_error_code == dict(oracle.by_day_error[day])
    start, end = days[0], days[-1]
    ranged = msgspec.json.decode(
        (await client.get(f"/api/v1/usage/stats?start={start}&end={end}")).content,
        type=UsageStats,
    )
    want = oracle.days(days)
    assert ranged.total_requests == want.requests
    assert abs(ranged.total_cost_usd - want.cost) < 0.005
    assert close(ranged.p95_response_time_ms, want.quantile(0.95))

    hourly = msgspec.json.decode(
        (await client.get(f"/api/v1/usage/timeseries?bucket=hour&start={start}&end={end}")).content,
        type=UsageTimeseries,
    )
    assert len(hourly.points) == sum(hours_in(d, ZONE) for d in _every_day(start, end))
    assert hourly.points[0].t.utcoffset() == timedelta(hours=9)
    for point in hourly.points:
        totals = oracle.hour(point.t)
        assert point.requests == (totals.requests if totals else 0)
        assert point.failed == (totals.failures if totals else 0)
        assert point.tokens == (totals.prompt + totals.completion if totals else 0)
        assert abs(point.cost_usd - (totals.cost if totals else 0.0)) < 0.005
        assert close(point.avg_response_time_ms, totals.avg() if totals else 0.0, rel=1e-6)
        assert close(point.p95_response_time_ms, totals.quantile(0.95) if totals else 0.0)
    daily = msgspec.json.decode(
        (await client.get(f"/api/v1/usage/timeseries?bucket=day&start={start}&end={end}")).content,
        type=UsageTimeseries,
    )
    assert [p.t.date() for p in daily.points] == days
    for point in daily.points:
        totals = oracle.days([point.t.date()])
        assert point.requests == totals.requests
        assert abs(point.cost_usd - totals.cost) < 0.005
        assert close(point.p95_response_time_ms, totals.quantile(0.95))

    costs = msgspec.json.decode((await client.get("/api/v1/usage/costs")).content, type=UsageCosts)
    today = ANCHOR.astimezone(ZONE).date()
    month_days = [d for d in oracle.by_day if d.strftime("%Y-%m") == today.strftime("%Y-%m")]
    assert abs(costs.today.cost_usd - oracle.days([today]).cost) < 0.005
    assert abs(costs.month.cost_usd - oracle.days(month_days).cost) < 0.005
    for model in {m for d in month_days for m in oracle.by_day_model[d]}:
        want_cost = sum(oracle.by_day_model[d][model].cost for d in month_days)
        assert abs(costs.by_model[model].cost_usd - want_cost) < 0.005
    assert costs.unpriced_models == sorted(oracle.unpriced)
    assert len(costs.daily) == 30 and costs.daily[-1].date == today
    for entry in costs.daily:
        assert entry.requests == oracle.days([entry.date]).requests


def _every_day(start: date, end: date) -> list[date]:
    return [start + timedelta(days=i) for i in range((end - start).days + 1)]


def run_scenario(through_http: bool, events: list[UsageRecorded], repeats: list[int]) -> None:
    async def scenario(env: dict[str, str]) -> None:
        settings_ = usage_settings(env, tz=TZ)
        oracle = Oracle(events, ZONE, PriceTable.with_overrides({}))
        clock = ManualClock(ANCHOR)
        async with (
            running_service(build(settings_), settings_, clock=clock) as runtime,
            gateway(gateway_settings(env, tz=TZ), clock) as client,
        ):
            if through_http:
                await post_records(client, events, repeats)
            else:
                await publish_records(settings_.nats_servers, events, repeats)
                await caught_up(runtime, len(events) + len(repeats))
            await check_routes(client, oracle, local_days(events))

    with tempfile.TemporaryDirectory() as tmp, nats_server(Path(tmp) / "nats") as server:
        env = {
            "STOCKPILOT_NATS_URL": server.url,
            "STOCKPILOT_DATA_DIR": str(Path(tmp) / "data"),
            "STOCKPILOT_CONFIG": EMPTY_TOML,
        }
        asyncio.run(scenario(env))


async def publish_records(
    servers: list[str], events: list[UsageRecorded], repeats: list[int]
) -> None:
    nc = await nats.connect(servers)
    js = nc.jetstream()
    futures = [
        await js.publish_async(SUBJECT_RECORDED, encode_event(e), headers={"Nats-Msg-Id": e.id})
        for e in events
    ]
    # Copies without Nats-Msg-Id get past JetStream's window: the projection drops them.
    futures += [await js.publish_async(SUBJECT_RECORDED, encode_event(events[i])) for i in repeats]
    await asyncio.gather(*futures)
    await nc.close()


async def caught_up(runtime: Any, stored: int) -> None:
    for _ in range(500):
        usage = [p for p in runtime.status().projections if p.name == "usage"][0]
        if usage.last_seq >= stored:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the usage projection did not catch up")


async def post_records(client: Any, events: list[UsageRecorded], repeats: list[int]) -> None:
    records = [msgspec.to_builtins(e) for e in events]
    for record in records[::3]:
        del record["type"]  # `type` may be left out
    for record in records[1::4]:
        del record["id"]  # id defaults to request_id
    records += [records[i] for i in repeats]
    accepted = duplicates = 0
    for start in range(0, len(records), 1000):
        response = await client.post(
            "/api/v1/usage/records", json=records[start : start + 1000], headers=auth(INGEST)
        )
        assert response.status_code == 202, response.text
        body = response.json()
        assert body["rejected"] == []
        accepted += body["accepted"]
        duplicates += body["duplicates"]
    assert accepted == len(events)
    assert duplicates == len(repeats)


SLOW = settings(
    max_examples=4,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)


@SLOW
@given(usage_batches())
def test_usage_published_on_nats_matches_the_oracle(batch: Batch) -> None:
    run_scenario(False, batch.events, batch.repeats)


@SLOW
@given(usage_batches())
def test_usage_posted_over_http_matches_the_oracle(batch: Batch) -> None:
    run_scenario(True, batch.events, batch.repeats)
