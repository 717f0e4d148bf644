"""The usage service against a real nats-server: alerts (two replicas), dead letters, ingest
validation, reset and replay, alert history, the summary the gateway's /status reads."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.js.errors import ObjectNotFoundError

from gateway.routes import system
from services.usage import contract as usage_contract
from services.usage import service as usage_service
from services.usage.contract import (
    SUBJECT_PRICES,
    SUBJECT_RECORDED,
    AlertList,
    PricesChanged,
    UsageCosts,
    UsageRecorded,
    UsageStats,
    UsageTimeseries,
)
from services.usage.prices import PriceTable
from services.usage.service import build
from shared.clock import ManualClock
from shared.dead_letters import DeadLetter
from shared.events import Alert, alert_id, rfc3339
from shared.publish import encode_event, publish_event
from shared.streams import provision, snapshot_bucket
from tests.clocks import MOMENTS, REAL, Moment
from tests.harness import running_service
from tests.usage.helpers import (
    ADMIN,
    INGEST,
    T0,
    Oracle,
    auth,
    gateway,
    gateway_settings,
    hours_in,
    local_midnight,
    recorded,
    usage_settings,
)


async def connect(env: dict[str, str]) -> tuple[NATS, Any]:
    nc = await nats.connect(env["STOCKPILOT_NATS_URL"])
    js = nc.jetstream()
    await provision(js)
    return nc, js


async def publish(js: Any, events: list[UsageRecorded]) -> None:
    for event in events:
        await publish_event(js, SUBJECT_RECORDED, event)


async def wait_for(check: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def folded(runtime: Any, seq: int) -> bool:
    return all(p.last_seq >= seq for p in runtime.status().projections if p.name == "usage")


async def stored_alerts(js: Any) -> list[Alert]:
    info = await js.stream_info("STOCKPILOT_ALERTS")
    alerts = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        if info.state.messages == 0:
            break
        msg = await js.get_msg("STOCKPILOT_ALERTS", seq)
        alerts.append(msgspec.json.decode(msg.data, type=Alert))
    return alerts


@pytest.fixture
def live_clock() -> ManualClock:
    """A clock at the real now, for the tests that expect a budget alert. The fold raises an
    alert about a day or a month only for a call NATS stored (on the real clock) while that
    period was open, plus an hour (issue #17: back-filled calls are silent); calls dated at
    the run's noon (`clock`) are stored up to a day later, so in most hours of the day they
    are back-fills. Dated now, they are stored within the test's own seconds, inside the
    period's hour of grace even when a day ends mid-test."""
    return ManualClock(REAL.now())


async def test_budget_alerts_are_raised_once_even_with_two_replicas(
    env: dict[str, str], live_clock: ManualClock
) -> None:
    clock = live_clock  # periods still open when NATS stores the calls: see live_clock
    settings = usage_settings(
        env, tz="Asia/Seoul", daily_budget_usd="1.0", monthly_budget_usd="100000"
    )
    nc, js = await connect(env)
    now = clock.now()
    async with (
        running_service(build(settings), settings, clock=clock) as one,
        running_service(build(settings), settings, clock=clock) as two,
    ):
        await publish(js, [recorded(i, now, cost_usd=0.1) for i in range(15)])
        await wait_for(lambda: folded(one, 15) and folded(two, 15))
        await asyncio.sleep(0.5)
        alerts = await stored_alerts(js)
    day = now.astimezone(settings.zone).date().isoformat()
    assert sorted(a.id for a in alerts) == [
        alert_id("usage.cost_exceeded", "daily", day),
        alert_id("usage.cost_warning", "daily", day),
    ]
    warning = next(a for a in alerts if a.kind == "usage.cost_warning")
    assert warning.source == "usage" and warning.severity == "warning"
    assert warning.threshold == 0.8 and 0.8 <= warning.value < 0.85
    await nc.close()


async def test_error_rate_alert_that_returns_within_ten_minutes_is_raised_once(
    env: dict[str, str], clock: ManualClock
) -> None:
    settings = usage_settings(env, error_rate_alert_pct="20", error_rate_min_calls="10")
    nc, js = await connect(env)
    # The stream stores these events now: an alert about a 5-minute window is raised only
    # within an hour of its close by stored time, so the calls are the last ten minutes'.
    clock.set(REAL.now())
    t0 = clock.now() - timedelta(minutes=10)
    at = [t0 + timedelta(seconds=i) for i in range(60)]
    events = [recorded(i, at[i], status_code=500 if i < 3 else 200) for i in range(10)]
    events += [recorded(i, at[i]) for i in range(10, 30)]
    events += [recorded(i, at[i], status_code=429, error_code="rate_limit") for i in range(30, 40)]
    async with running_service(build(settings), settings, clock=clock) as runtime:
        await publish(js, events)
        await wait_for(lambda: folded(runtime, len(events)))
        await asyncio.sleep(0.5)
        alerts = [a for a in await stored_alerts(js) if a.kind == "usage.error_rate"]
    # It cleared (3 of 30) and came back seconds later (7 of 34): one episode, one alert.
    assert len(alerts) == 1
    assert alerts[0].value == 30.0 and alerts[0].threshold == 20.0
    assert alerts[0].occurred_at == at[9]
    await nc.close()


async def test_malformed_usage_on_the_subject_is_dead_lettered_with_a_reason(
    env: dict[str, str],
) -> None:
    settings = usage_settings(env)
    nc, js = await connect(env)
    letters: list[DeadLetter] = []

    async def on_letter(msg: Any) -> None:
        letters.append(msgspec.json.decode(msg.data, type=DeadLetter))

    await nc.subscribe("stockpilot.deadletter.usage", cb=on_letter)
    async with running_service(build(settings), settings) as runtime:
        await js.publish(SUBJECT_RECORDED, b"{not json")
        await js.publish(
            SUBJECT_RECORDED,
            b'{"type":"usage.recorded","id":"n1","occurred_at":"%s",'
            b'"model":"gpt-4o","status_code":200,"prompt_tokens":-5}' % rfc3339(T0).encode(),
        )
        await js.publish(SUBJECT_RECORDED, b'{"type":"usage.unheard_of","id":"u1"}')
        await publish(js, [recorded(1)])
        # The service's price table (published at start) comes first.
        await wait_for(lambda: folded(runtime, 5) and len(letters) == 3)
        usage = [p for p in runtime.status().projections if p.name == "usage"][0]
        assert usage.dead_lettered == 3
        assert usage.events_applied == 2
    assert "json" in letters[0].reason.lower()
    assert "prompt_tokens" in letters[1].reason
    assert "usage.unheard_of" in letters[2].reason
    await nc.close()


async def test_http_records_are_validated_one_by_one(
    env: dict[str, str], clock: ManualClock
) -> None:
    settings = usage_settings(env)
    good = msgspec.to_builtins(recorded(1, clock.now()))
    # A time without a zone, and query dates: from the clock's day, never a literal date.
    naive = clock.now().replace(tzinfo=None).isoformat(timespec="seconds")
    today = clock.now().date()
    long_ago = today - timedelta(days=300)
    body = [
        good,
        {"status_code": 200},  # no model
        {"model": "gpt-4o"},  # no status_code
        {"model": "gpt-4o", "status_code": 200, "completion_tokens": -1},
        {"type": "usage.reset", "model": "gpt-4o", "status_code": 200},
        "not an object",
        {"model": "gpt-4o", "status_code": 200, "occurred_at": naive},
        {"model": "gpt-4o", "status_code": 200, "request_id": "r-2", "extra": "ignored"},
        {"model": "gpt-4o", "status_code": 502},  # no id at all: one is assigned
    ]
    async with (
        running_service(build(settings), settings, clock=clock),
        gateway(gateway_settings(env), clock) as client,
    ):
        response = await client.post("/api/v1/usage/records", json=body, headers=auth(INGEST))
        assert response.status_code == 202
        answer = response.json()
        assert answer["accepted"] == 3 and answer["duplicates"] == 0
        reasons = {r["index"]: r["reason"] for r in answer["rejected"]}
        assert sorted(reasons) == [1, 2, 3, 4, 5, 6]
        assert "model" in reasons[1]
        assert "status_code" in reasons[2]
        assert "completion_tokens" in reasons[3]
        assert "usage.reset" in reasons[4]
        assert "object" in reasons[5]
        assert "occurred_at" in reasons[6] or "timezone" in reasons[6].lower()
        assert answer["ids"][:2] == ["req-1", "r-2"]
        # Right after the answer the records are in the statistics.
        stats = (await client.get("/api/v1/usage/stats")).json()
        assert stats["total_requests"] == 3
        single = await client.post(
            "/api/v1/usage/records",
            json={"model": "gpt-4o", "status_code": 200, "request_id": "r-2"},
            headers=auth(INGEST),
        )
        assert single.status_code == 202
        assert single.json()["duplicates"] == 1
        # Whole-body problems.
        bad_json = await client.post("/api/v1/usage/records", content=b"[{", headers=auth(INGEST))
        assert bad_json.status_code == 422 and "JSON" in bad_json.json()["detail"]
        too_many = await client.post(
            "/api/v1/usage/records", json=[good] * 1001, headers=auth(INGEST)
        )
        assert too_many.status_code == 422 and "1000" in too_many.json()["detail"]
        huge = await client.post(
            "/api/v1/usage/records", content=b" " * (1024 * 1024 + 1), headers=auth(INGEST)
        )
        assert huge.status_code == 413
        assert huge.json()["status_code"] == 413 and huge.json()["detail"]
        # Bad query parameters are 422s that name the parameter.
        for path, named in [
            (f"/api/v1/usage/stats?date={today.year}-13-01", "'date'"),
            (f"/api/v1/usage/stats?start={long_ago}&end={today}", "'end'"),
            ("/api/v1/usage/timeseries?bucket=minute", "'bucket'"),
            (f"/api/v1/usage/timeseries?start={long_ago}&end={today}", "'end'"),
        ]:
            refused = await client.get(path)
            assert refused.status_code == 422 and named in refused.json()["detail"], path
        no_token = await client.post("/api/v1/usage/records", json=good)
        assert no_token.status_code == 401
        wrong = await client.post("/api/v1/usage/records", json=good, headers=auth("nope"))
        assert wrong.status_code == 403


async def test_a_body_near_one_mebibyte_is_forwarded_in_parts(
    env: dict[str, str], clock: ManualClock
) -> None:
    settings = usage_settings(env)
    now = clock.now()
    records = [{**msgspec.to_builtins(recorded(i, now)), "note": "x" * 600} for i in range(1000)]
    assert 900 * 1024 < len(msgspec.json.encode(records)) < 1024 * 1024
    async with (
        running_service(build(settings), settings, clock=clock),
        gateway(gateway_settings(env), clock) as client,
    ):
        response = await client.post("/api/v1/usage/records", json=records, headers=auth(ADMIN))
        assert response.status_code == 202, response.text
        assert response.json()["accepted"] == 1000
        stats = (await client.get("/api/v1/usage/stats")).json()
        assert stats["total_requests"] == 1000


async def test_reset_restarts_statistics_and_a_replay_gives_the_same_answers(
    env: dict[str, str], clock: ManualClock
) -> None:
    settings = usage_settings(env, tz="Asia/Seoul")
    now = clock.now()
    nc, js = await connect(env)
    async with (
        running_service(build(settings), settings, clock=clock),
        gateway(gateway_settings(env, tz="Asia/Seoul"), clock) as client,
    ):
        first = [msgspec.to_builtins(recorded(i, now)) for i in range(5)]
        await client.post("/api/v1/usage/records", json=first, headers=auth(INGEST))
        refused = await client.post("/api/v1/usage/reset")
        assert refused.status_code == 401
        reset = await client.post(
            "/api/v1/usage/reset", json={"scope": "all", "reason": "test"}, headers=auth(ADMIN)
        )
        assert reset.status_code == 200
        assert reset.json()["reset"] is True and reset.json()["scope"] == "all"
        assert reset.json()["at"]
        bad_scope = await client.post(
            "/api/v1/usage/reset", json={"scope": "some"}, headers=auth(ADMIN)
        )
        assert bad_scope.status_code == 422
        assert (await client.get("/api/v1/usage/stats")).json()["total_requests"] == 0
        second = [msgspec.to_builtins(recorded(10 + i, now)) for i in range(3)]
        await client.post("/api/v1/usage/records", json=second, headers=auth(INGEST))
        live = (await client.get("/api/v1/usage/stats")).content
        assert msgspec.json.decode(live, type=UsageStats).total_requests == 3
        live_costs = (await client.get("/api/v1/usage/costs")).json()
    stored = await js.get_last_msg("STOCKPILOT_USAGE", "stockpilot.usage.reset")
    assert msgspec.json.decode(stored.data)["actor"] == "admin"
    # A fresh replica without snapshots replays the whole stream to the same answers.
    obs = await js.object_store(snapshot_bucket("usage"))
    for name in ("usage.usage", "usage.alert-history", "usage.usage-alert-ledger"):
        with contextlib.suppress(ObjectNotFoundError):
            await obs.delete(name)
    async with (
        running_service(build(settings), settings, clock=clock),
        gateway(gateway_settings(env, tz="Asia/Seoul"), clock) as client,
    ):
        assert (await client.get("/api/v1/usage/stats")).content == live
        # The clock stood still: even the forecast (it moves with "now") is the same.
        assert (await client.get("/api/v1/usage/costs")).json() == live_costs
    await nc.close()


async def test_a_reset_restarts_the_statistics_never_the_money(
    env: dict[str, str], live_clock: ManualClock
) -> None:
    """Spend, reset, spend more: the budget figure and the exceeded alert as if no reset."""
    clock = live_clock  # periods still open when NATS stores the calls: see live_clock
    settings = usage_settings(env, daily_budget_usd="1.0")
    now = clock.now()
    nc, js = await connect(env)
    async with (
        running_service(build(settings), settings, clock=clock),
        gateway(gateway_settings(env), clock) as client,
    ):
        first = [msgspec.to_builtins(recorded(i, now, cost_usd=0.3)) for i in range(3)]
        await client.post("/api/v1/usage/records", json=first, headers=auth(INGEST))
        reset = await client.post("/api/v1/usage/reset", headers=auth(ADMIN))
        assert reset.status_code == 200
        second = [msgspec.to_builtins(recorded(10 + i, now, cost_usd=0.3)) for i in range(2)]
        await client.post("/api/v1/usage/records", json=second, headers=auth(INGEST))
        costs = msgspec.json.decode(
            (await client.get("/api/v1/usage/costs")).content, type=UsageCosts
        )
        stats = (await client.get("/api/v1/usage/stats")).json()
        status = (await client.get("/api/v1/status")).json()
        await asyncio.sleep(0.5)  # alerts are published after the fold, in the background
        alerts = await stored_alerts(js)
    assert (costs.today.cost_usd, costs.today.requests, costs.today.used_pct) == (1.5, 5, 150.0)
    assert costs.month.cost_usd == 1.5 and costs.daily[-1].cost_usd == 1.5
    assert costs.by_model["gpt-4o-mini"].requests == 5
    assert stats["total_requests"] == 2  # the statistics did restart
    assert status["usage_today"]["budget_used_pct"] == 150.0
    day = now.astimezone(settings.zone).date().isoformat()
    assert sorted(a.id for a in alerts) == [
        alert_id("usage.cost_exceeded", "daily", day),
        alert_id("usage.cost_warning", "daily", day),
    ]
    await nc.close()


def gpt4o_at(usd_per_million: float) -> str:
    return msgspec.json.encode({"gpt-4o": {"input": usd_per_million, "output": 0}}).decode()


async def price_tables(js: Any) -> list[PricesChanged]:
    info = await js.stream_info("STOCKPILOT_USAGE")
    found = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg("STOCKPILOT_USAGE", seq)
        if msg.subject == SUBJECT_PRICES:
            found.append(msgspec.json.decode(msg.data, type=PricesChanged))
    return found


async def test_a_new_price_never_reprices_history_and_a_replay_prices_as_live(
    env: dict[str, str], clock: ManualClock
) -> None:
    """Calls are priced with the table in effect at their occurred_at: a restart with a new
    price publishes a usage.prices_changed and changes only calls from then on, and a
    rebuild from the first event (under yet another price, after a reset and a back-fill)
    gives the same money."""
    nc, js = await connect(env)
    # Two hours before the clock's noon: the hour it moves on stays in the (real) past.
    start = clock.now() - timedelta(hours=2)
    clock.set(start)
    one_dollar = {"model": "gpt-4o", "prompt_tokens": 1_000_000, "completion_tokens": 0}

    async def post(client: Any, *records: UsageRecorded) -> None:
        body = [msgspec.to_builtins(r) for r in records]
        answer = await client.post("/api/v1/usage/records", json=body, headers=auth(INGEST))
        assert answer.json()["accepted"] == len(records)

    async def costs(client: Any) -> UsageCosts:
        return msgspec.json.decode(
            (await client.get("/api/v1/usage/costs")).content, type=UsageCosts
        )

    first = usage_settings(env, prices=gpt4o_at(1.0))
    async with (
        running_service(build(first), first, clock=clock),
        gateway(gateway_settings(env), clock) as client,
    ):
        await post(client, recorded(1, start - timedelta(hours=1), **one_dollar))
        assert (await costs(client)).by_model["gpt-4o"].cost_usd == 1.0
    clock.advance(timedelta(hours=1))
    second = usage_settings(env, prices=gpt4o_at(2.0))
    async with (
        running_service(build(second), second, clock=clock),
        gateway(gateway_settings(env), clock) as client,
    ):
        # History keeps its price; a call from now on costs the new one, and a call dated
        # before the change (back-filled now) the old one.
        assert (await costs(client)).by_model["gpt-4o"].cost_usd == 1.0
        await post(client, recorded(2, clock.now(), **one_dollar))
        await post(client, recorded(3, start + timedelta(minutes=30), **one_dollar))
        # A reset and a back-fill of a closed day: the money stays, the replay agrees.
        reset = await client.post("/api/v1/usage/reset", headers=auth(ADMIN))
        assert reset.status_code == 200
        await post(client, recorded(4, start - timedelta(days=3), **one_dollar))
        live = await costs(client)
    assert live.today.cost_usd == 1.0 + 2.0 + 1.0
    three_days_ago = (start - timedelta(days=3)).astimezone(first.zone).date()
    assert [d.cost_usd for d in live.daily if d.date == three_days_ago] == [1.0]
    tables = await price_tables(js)
    assert [t.prices["gpt-4o"].input for t in tables] == [1.0, 2.0]
    assert [t.occurred_at for t in tables] == [start, start + timedelta(hours=1)]
    assert tables[0].prices["gpt-4"].input == 30.0  # the shipped table comes along
    # The same table again: nothing is published.
    async with running_service(build(second), second, clock=clock):
        pass
    assert len(await price_tables(js)) == 2
    # No snapshots, and yet another price: the rebuild prices every call as the live one did.
    obs = await js.object_store(snapshot_bucket("usage"))
    for name in ("usage.usage", "usage.alert-history", "usage.usage-alert-ledger"):
        with contextlib.suppress(ObjectNotFoundError):
            await obs.delete(name)
    third = usage_settings(env, prices=gpt4o_at(3.0))
    async with (
        running_service(build(third), third, clock=clock),
        gateway(gateway_settings(env), clock) as client,
    ):
        rebuilt = await costs(client)
        from ops.replay import replay_definition

        results = await replay_definition(nc, build(third), "STOCKPILOT_USAGE")
    assert msgspec.json.encode(rebuilt) == msgspec.json.encode(live)
    assert results[0].equal, results[0]
    await nc.close()


async def test_back_filled_calls_of_closed_days_raise_no_budget_alert(
    env: dict[str, str], live_clock: ManualClock
) -> None:
    """An import of older calls counts in the figures silently; today's calls still alert,
    and a replay (deciding from the stored timestamps) agrees."""
    clock = live_clock  # periods still open when NATS stores the calls: see live_clock
    from ops.replay import replay_definition

    settings = usage_settings(env, daily_budget_usd="1.0")
    nc, js = await connect(env)
    now = clock.now()
    old_days = [now - timedelta(days=d) for d in (2, 3, 4)]
    back_fill = [
        recorded(10 * d + i, day + timedelta(seconds=i), cost_usd=0.3)
        for d, day in enumerate(old_days)
        for i in range(5)
    ]
    async with (
        running_service(build(settings), settings, clock=clock) as runtime,
        gateway(gateway_settings(env), clock) as client,
    ):
        body = [msgspec.to_builtins(r) for r in back_fill]
        answer = await client.post("/api/v1/usage/records", json=body, headers=auth(INGEST))
        assert answer.json()["accepted"] == 15
        today = [msgspec.to_builtins(recorded(100 + i, now, cost_usd=0.3)) for i in range(4)]
        await client.post("/api/v1/usage/records", json=today, headers=auth(INGEST))
        costs = msgspec.json.decode(
            (await client.get("/api/v1/usage/costs")).content, type=UsageCosts
        )
        await asyncio.sleep(0.5)  # alerts are published after the fold, in the background
        alerts = await stored_alerts(js)
        silenced = runtime.tracked["usage"].projection.view.alerts_silenced
        results = await replay_definition(nc, build(settings), "STOCKPILOT_USAGE")
    by_day = {d.date: d.cost_usd for d in costs.daily}
    for day in old_days:
        assert by_day[day.astimezone(settings.zone).date()] == 1.5
    assert costs.today.cost_usd == 1.2
    today_key = now.astimezone(settings.zone).date().isoformat()
    assert sorted(a.id for a in alerts) == [
        alert_id("usage.cost_exceeded", "daily", today_key),
        alert_id("usage.cost_warning", "daily", today_key),
    ]
    assert silenced == 6  # a warning and an exceeded for each of the three closed days
    assert results[0].equal, results[0]
    await nc.close()


async def test_a_call_retried_past_the_jetstream_window_is_counted_once(
    env: dict[str, str], clock: ManualClock
) -> None:
    """Stored again without JetStream's help (as past its duplicate window, or after a NATS
    restart), a call id is still counted once; the ingest route says it is a duplicate."""
    settings = usage_settings(env)
    nc, js = await connect(env)
    now = clock.now()
    calls = [recorded(i, now, cost_usd=0.01) for i in range(300)]
    async with (
        running_service(build(settings), settings, clock=clock) as runtime,
        gateway(gateway_settings(env), clock) as client,
    ):
        await publish(js, calls)
        for retried in (calls[0], calls[150]):  # no Nats-Msg-Id: JetStream stores it again
            await js.publish(SUBJECT_RECORDED, encode_event(retried))
        await wait_for(lambda: folded(runtime, 303))  # the price table, 300 calls, 2 retries
        again = await client.post(
            "/api/v1/usage/records", json=msgspec.to_builtins(calls[7]), headers=auth(INGEST)
        )
        costs = msgspec.json.decode(
            (await client.get("/api/v1/usage/costs")).content, type=UsageCosts
        )
    assert again.json()["duplicates"] == 1 and again.json()["accepted"] == 0
    assert costs.today.requests == 300 and costs.today.cost_usd == 3.0
    await nc.close()


BUDGETS = msgspec.json.encode(
    [
        {"scope": "user:u-42", "period": "daily", "usd": 1.0, "enforce": True},
        {"scope": "tag:feature:screener", "period": "monthly", "usd": 5.0},
    ]
).decode()


async def test_scoped_budgets_through_the_gateway(
    env: dict[str, str], live_clock: ManualClock
) -> None:
    """GET /api/v1/usage/budget answers for a call about to be made: allowed until an
    enforced budget covering it is used up; each budget raises its own alerts."""
    clock = live_clock  # periods still open when NATS stores the calls: see live_clock
    settings = usage_settings(env, budgets=BUDGETS)
    nc, js = await connect(env)
    now = clock.now()
    async with (
        running_service(build(settings), settings, clock=clock),
        gateway(gateway_settings(env), clock) as client,
    ):

        async def ask(**query: str) -> dict[str, Any]:
            answer = await client.get("/api/v1/usage/budget", params=query)
            assert answer.status_code == 200, answer.text
            body: dict[str, Any] = answer.json()
            return body

        before = await ask(user_id="u-42", tag="feature:screener")
        assert before["allowed"] is True and before["reason"] is None
        calls = [
            recorded(i, now, user_id="u-42", cost_usd=0.35, tags=["feature:screener"])
            for i in range(3)
        ]
        body = [msgspec.to_builtins(c) for c in calls]
        posted = await client.post("/api/v1/usage/records", json=body, headers=auth(INGEST))
        assert posted.json()["accepted"] == 3
        after = await ask(user_id="u-42", tag="feature:screener")
        other = await ask(user_id="u-7")
        too_long = await client.get("/api/v1/usage/budget", params={"tag": "t" * 65})
        await asyncio.sleep(0.5)  # alerts are published after the fold, in the background
        alerts = await stored_alerts(js)
    assert after["allowed"] is False and "user:u-42" in after["reason"]
    assert [(b["scope"], b["period"], b["used_usd"], b["enforce"]) for b in after["budgets"]] == [
        ("user:u-42", "daily", 1.05, True),
        ("tag:feature:screener", "monthly", 1.05, False),
    ]
    assert other == {"allowed": True, "budgets": [], "reason": None}
    assert too_long.status_code in (400, 422)
    day = now.astimezone(settings.zone).date().isoformat()
    assert sorted(a.id for a in alerts) == [
        alert_id("usage.budget_exceeded", "user:u-42", day),
        alert_id("usage.budget_warning", "user:u-42", day),
    ]
    await nc.close()


def test_a_bad_budget_stops_the_service_naming_the_variable(env: dict[str, str]) -> None:
    from shared.settings import SettingsError

    for bad in (
        '[{"scope": "team:x", "period": "daily", "usd": 1}]',
        '[{"scope": "all", "period": "weekly", "usd": 1}]',
        '[{"scope": "all", "period": "daily", "usd": 0}]',
        '[{"scope": "all", "period": "daily", "usd": 1, "hard": true}]',
    ):
        with pytest.raises(SettingsError, match="STOCKPILOT_BUDGETS"):
            usage_settings(env, budgets=bad)


async def test_a_stream_refusing_writes_does_not_keep_the_service_from_starting(
    env: dict[str, str], clock: ManualClock
) -> None:
    """The price table cannot be stored (the stream at its max_bytes, discard new): the
    start-up step logs it and goes on; a later start that can store it does.

    The step is called on its own: a whole service would re-provision the stream (the
    tests' server has no users, so every process may administer it) and lift the cap."""
    from tests.usage.test_spool import set_usage_limit

    nc, js = await connect(env)
    await publish(js, [recorded(i, clock.now(), cost_usd=0.5) for i in range(3)])
    used = (await js.stream_info("STOCKPILOT_USAGE")).state.bytes
    await set_usage_limit(env["STOCKPILOT_NATS_URL"], used)
    settings = usage_settings(env)
    prepare = usage_service.make_prepare(usage_service.usage_projection(settings), settings)
    await prepare(js, clock)  # does not raise
    assert await price_tables(js) == []
    await set_usage_limit(env["STOCKPILOT_NATS_URL"], -1)
    await prepare(js, clock)
    assert len(await price_tables(js)) == 1
    await nc.close()


async def test_alert_history_holds_every_source_and_feeds_the_summary(
    env: dict[str, str], clock: ManualClock
) -> None:
    settings = usage_settings(env, daily_budget_usd="10")
    nc, js = await connect(env)
    now = clock.now()
    batch_alert = Alert(
        id="batch.job_failed:sync:1",
        occurred_at=now - timedelta(minutes=5),
        source="batch",
        kind="batch.job_failed",
        severity="warning",
        title="job failed",
        message="sync failed",
        metric="failed",
        value=1,
        threshold=1,
    )
    old_alert = msgspec.structs.replace(
        batch_alert, id="batch.job_failed:sync:0", occurred_at=now - timedelta(days=2)
    )
    async with (
        running_service(build(settings), settings, clock=clock),
        gateway(gateway_settings(env), clock) as client,
    ):
        await publish_event(js, batch_alert.subject, old_alert)
        await publish_event(js, batch_alert.subject, batch_alert)
        # The same alert stored again (past the duplicate window) is listed once.
        await js.publish(batch_alert.subject, encode_event(batch_alert))
        await client.post(
            "/api/v1/usage/records",
            json=[msgspec.to_builtins(recorded(i, now, model="mystery")) for i in range(2)]
            + [msgspec.to_builtins(recorded(9, now, cost_usd=2.5))],
            headers=auth(INGEST),
        )

        async def listed() -> AlertList:
            body = (await client.get("/api/v1/usage/alerts?limit=50")).content
            return msgspec.json.decode(body, type=AlertList)

        for _ in range(200):
            if (await listed()).total == 3:
                break
            await asyncio.sleep(0.02)
        alerts = await listed()
        assert alerts.total == 3
        assert [a.id for a in alerts.alerts] == [
            "usage.unpriced_model:mystery:any",
            "batch.job_failed:sync:1",
            "batch.job_failed:sync:0",
        ]
        newest = (await client.get("/api/v1/usage/alerts?limit=1")).json()
        assert len(newest["alerts"]) == 1 and newest["total"] == 3
        assert (await client.get("/api/v1/usage/alerts?limit=0")).status_code == 422
        status = (await client.get("/api/v1/status")).json()
        assert status["alerts_24h"] == 2
        assert status["usage_today"] == {
            "requests": 3,
            "cost_usd": 2.5,
            "error_rate": 0.0,
            "budget_used_pct": 25.0,
        }
    await nc.close()


def test_summary_has_exactly_the_gateway_shape() -> None:
    def shape(cls: Any) -> list[tuple[str, Any]]:
        return [(f.name, f.type) for f in msgspec.structs.fields(cls)]

    assert shape(usage_contract.UsageSummary)[1] == shape(system.UsageSummary)[1]
    assert [n for n, _ in shape(usage_contract.UsageSummary)][:2] == ["today", "alerts_24h"]
    assert shape(usage_contract.UsageToday) == shape(system.UsageToday)
    encoded = msgspec.json.encode(
        usage_contract.UsageSummary(
            today=usage_contract.UsageToday(
                requests=1, cost_usd=0.5, error_rate=0.0, budget_used_pct=None
            ),
            alerts_24h=2,
        )
    )
    assert msgspec.json.decode(encoded, type=system.UsageSummary).alerts_24h == 2


async def test_a_snapshot_from_another_time_zone_is_not_reused(
    env: dict[str, str], clock: ManualClock
) -> None:
    """Days depend on STOCKPILOT_TZ: a changed zone rebuilds from the first event."""
    nc, js = await connect(env)
    # 20:00 UTC the day before the clock's: already the clock's day in Seoul.
    late_evening = (clock.now() - timedelta(days=1)).replace(hour=20, minute=0)
    await publish(js, [recorded(i, late_evening) for i in range(5)])
    utc = usage_settings(env)
    async with running_service(build(utc), utc):
        pass  # stopping takes a snapshot
    seoul = usage_settings(env, tz="Asia/Seoul")
    async with running_service(build(seoul), seoul) as runtime:
        usage = [p for p in runtime.status().projections if p.name == "usage"][0]
        # Five calls and the price table the first start published.
        assert usage.events_applied == 6 and usage.snapshot_seq == 0
        msg = await nc.request(
            "stockpilot.svc.usage.stats",
            msgspec.json.encode({"date": (late_evening + timedelta(days=1)).date().isoformat()}),
            timeout=2,
        )
        assert msgspec.json.decode(msg.data, type=UsageStats).total_requests == 5
    async with running_service(build(seoul), seoul) as runtime:
        usage = [p for p in runtime.status().projections if p.name == "usage"][0]
        assert usage.snapshot_seq == 6 and usage.events_applied == 0
    await nc.close()


async def test_stockpilot_replay_rebuilds_the_same_usage_views(
    env: dict[str, str], clock: ManualClock
) -> None:
    from ops.replay import replay_definition

    settings = usage_settings(env, tz="Asia/Seoul", daily_budget_usd="1", error_rate_min_calls="5")
    nc, js = await connect(env)
    now = clock.now()
    events = [
        recorded(i, now - timedelta(hours=i % 50), status_code=500 if i % 3 else 200, cost_usd=0.05)
        for i in range(60)
    ]
    async with (
        running_service(build(settings), settings) as runtime,
        gateway(gateway_settings(env)) as client,
    ):
        await publish(js, events[:30])
        await js.publish(SUBJECT_RECORDED, b"{broken")
        await client.post("/api/v1/usage/reset", headers=auth(ADMIN))
        await publish(js, events[20:])  # ten repeats JetStream dedupes, fifty new
        await js.publish(SUBJECT_RECORDED, encode_event(events[45]))  # past the window
        await wait_for(lambda: folded(runtime, 64))  # 63 and the price table
        results = await replay_definition(nc, build(settings), "STOCKPILOT_USAGE")
    assert [r.projection for r in results] == ["usage"]
    assert results[0].equal, results[0]
    assert results[0].refused == 1
    await nc.close()


@pytest.mark.parametrize("moment", MOMENTS)
async def test_today_through_the_gateway_at_every_awkward_instant(
    env: dict[str, str], moment: Moment
) -> None:
    """/usage/stats, /usage/costs, /usage/timeseries and /status with the clock set there."""
    clock = ManualClock(moment.at)
    zone = ZoneInfo(moment.zone)
    today = moment.local.date()
    yesterday = today - timedelta(days=1)
    todays = [moment.earlier_today(f) for f in (0.0, 0.05, 0.3, 0.6, 0.95, 1.0)]
    earlier = [moment.day_start - timedelta(seconds=1), moment.day_start - timedelta(days=2)]
    events = [
        recorded(i, at, cost_usd=0.25 * (i + 1), status_code=500 if i == 2 else 200)
        for i, at in enumerate(todays + earlier)
    ]
    oracle = Oracle(events, zone, PriceTable.with_overrides({}))
    month_days = [d for d in oracle.by_day if (d.year, d.month) == (today.year, today.month)]
    settings = usage_settings(env, tz=moment.zone)
    async with (
        running_service(build(settings), settings, clock=clock),
        gateway(gateway_settings(env, tz=moment.zone), clock) as client,
    ):
        posted = await client.post(
            "/api/v1/usage/records",
            json=[msgspec.to_builtins(e) for e in events],
            headers=auth(INGEST),
        )
        assert posted.status_code == 202 and posted.json()["accepted"] == len(events)
        stats = msgspec.json.decode(
            (await client.get("/api/v1/usage/stats")).content, type=UsageStats
        )
        costs = msgspec.json.decode(
            (await client.get("/api/v1/usage/costs")).content, type=UsageCosts
        )
        series = msgspec.json.decode(
            (await client.get("/api/v1/usage/timeseries")).content, type=UsageTimeseries
        )
        status = (await client.get("/api/v1/status")).json()
    assert status["usage_today"]["requests"] == len(todays)
    assert status["usage_today"]["cost_usd"] == pytest.approx(oracle.days([today]).cost)

    assert (stats.period.start, stats.period.end, stats.period.timezone) == (
        today,
        today,
        moment.zone,
    )
    assert stats.total_requests == len(todays) and stats.failed_requests == 1
    assert stats.total_cost_usd == pytest.approx(oracle.days([today]).cost)
    in_window = [at for at in todays if moment.at - timedelta(seconds=300) < at <= moment.at]
    assert stats.requests_per_minute == pytest.approx(len(in_window) / 5)

    assert (costs.today.requests, costs.today.cost_usd) == (
        len(todays),
        pytest.approx(oracle.days([today]).cost),
    )
    assert costs.month.requests == oracle.days(month_days).requests
    assert costs.month.cost_usd == pytest.approx(oracle.days(month_days).cost)
    assert len(costs.daily) == 30
    assert [costs.daily[-1].date, costs.daily[-2].date] == [today, yesterday]
    assert [costs.daily[-1].requests, costs.daily[-2].requests] == [len(todays), 1]
    first = today.replace(day=1)
    month_start = local_midnight(first, zone)
    month = local_midnight((first + timedelta(days=31)).replace(day=1), zone) - month_start
    assert costs.forecast.elapsed_pct == pytest.approx(
        100.0 * (moment.at - month_start) / month, abs=1e-4
    )

    # Every hour of today, as long as the day really is, each with its own calls.
    assert len(series.points) == hours_in(today, zone)
    assert series.points[0].t == moment.day_start
    starts = [p.t.timestamp() for p in series.points]
    assert all(later - earlier == 3600 for earlier, later in zip(starts, starts[1:], strict=False))
    for point in series.points:
        want = oracle.hour(point.t)
        assert point.requests == (want.requests if want else 0), point.t
    assert sum(p.requests for p in series.points) == len(todays)
