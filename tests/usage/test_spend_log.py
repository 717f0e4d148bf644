"""The spend log (`GET /api/v1/usage/records`) against a real nats-server, the real usage
service and the gateway: pages newest first, filters, cursors, the cost each call was charged.
"""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
import nats
import pytest

from services.usage import log_reader, spend_log
from services.usage.contract import (
    SUBJECT_PRICES,
    SUBJECT_RECORDED,
    Price,
    PricesChanged,
    SpendLogParams,
    UsageRecorded,
)
from services.usage.prices import PriceTable, shipped_prices
from services.usage.service import build, usage_projection
from shared.clock import ManualClock
from shared.publish import encode_event, publish_event
from shared.streams import provision
from tests.harness import running_service, stop_process
from tests.security.test_roles import Secured, start_server
from tests.usage.helpers import T0, gateway, gateway_settings, recorded, usage_settings

UTC_ZONE = ZoneInfo("UTC")
# A model's dated name, matched by its base name.
DATED_MODEL = "gpt-4o-2024-08-06"  # fixed history: a name, not a day of the test
CUSTOM = {
    "gpt-4o-mini": Price(input=100.0, output=200.0),
    "gpt-4o": Price(input=300.0, output=400.0),
}


def _events() -> list[UsageRecorded]:
    """Twelve calls over two hours: users, models (one dated, one unpriced), tags, failures,
    a reported cost."""
    events = []
    for i in range(12):
        events.append(
            recorded(
                i,
                at=T0 + timedelta(minutes=10 * i + 5),
                user_id=f"u-{i % 3}",
                model=("gpt-4o-mini", DATED_MODEL, "no-such-model")[i % 3],
                tags=("feature:screener",) if i % 4 == 0 else (),
                status_code=500 if i % 5 == 0 else 200,
                cost_usd=0.25 if i == 7 else None,
            )
        )
    return events


async def _stack(env: dict[str, str], clock: ManualClock) -> Any:
    nc = await nats.connect(env["STOCKPILOT_NATS_URL"])
    js = nc.jetstream()
    await provision(js)
    return nc, js


async def _pages(client: Any, query: str, limit: int) -> list[dict[str, Any]]:
    """Every record of `query`, following next_cursor."""
    records: list[dict[str, Any]] = []
    cursor = None
    for _ in range(100):
        url = f"/api/v1/usage/records?limit={limit}{query}"
        if cursor:
            url += f"&cursor={cursor}"
        response = await client.get(url)
        assert response.status_code == 200, response.text
        body = response.json()
        assert len(body["records"]) <= limit
        records += body["records"]
        cursor = body["next_cursor"]
        if cursor is None:
            return records
    raise AssertionError("the cursor never ended")


async def test_spend_log_lists_every_call_newest_first_with_its_charged_cost(
    env: dict[str, str],
) -> None:
    """Calls priced with the table in effect at their occurred_at, as the fold charged them:
    the log's costs of the day add up to the day's total in /usage/stats."""
    # The service publishes the shipped table when it starts, dated T0 + 90 min; a table
    # published after it, dated T0 + 60 min, is in effect from 60 to 90 min (and, as the
    # earliest table, for calls before it).
    clock = ManualClock(T0 + timedelta(minutes=90))
    settings = usage_settings(env, tz="UTC")
    nc, js = await _stack(env, clock)
    events = _events()
    async with running_service(build(settings), settings, clock=clock):
        await publish_event(
            js,
            SUBJECT_PRICES,
            PricesChanged(
                id="custom-prices", occurred_at=T0 + timedelta(minutes=60), prices=CUSTOM
            ),
        )
        for event in events:
            await publish_event(js, SUBJECT_RECORDED, event)
        async with gateway(gateway_settings(env)) as client:
            listed = await _pages(client, "", limit=5)
            stats = (await client.get(f"/api/v1/usage/stats?date={T0.date()}")).json()
    await nc.close()

    assert [r["id"] for r in listed] == [e.id for e in reversed(events)]
    custom, shipped = PriceTable(CUSTOM), PriceTable(shipped_prices())
    for record, event in zip(listed, reversed(events), strict=True):
        minutes = (event.occurred_at - T0).total_seconds() / 60
        table = custom if minutes < 90 else shipped
        if event.cost_usd is not None:
            assert (record["cost_usd"], record["priced"]) == (event.cost_usd, "reported")
        elif event.model == "no-such-model":
            assert (record["cost_usd"], record["priced"]) == (0.0, "unpriced")
        else:
            expected = table.cost(event.model, event.prompt_tokens, event.completion_tokens, 0)
            assert record["cost_usd"] == pytest.approx(expected)
            assert record["priced"] == "price_table"
        assert record["failed"] == (event.status_code >= 400)
    assert sum(r["cost_usd"] for r in listed) == pytest.approx(stats["total_cost_usd"], abs=1e-6)


async def test_spend_log_filters_by_user_model_tag_status_and_window(env: dict[str, str]) -> None:
    settings = usage_settings(env, tz="UTC")
    nc, js = await _stack(env, ManualClock(T0))
    events = _events()
    async with running_service(build(settings), settings):
        for event in events:
            await publish_event(js, SUBJECT_RECORDED, event)
        async with gateway(gateway_settings(env)) as client:

            async def ids(query: str) -> list[str]:
                return [r["id"] for r in await _pages(client, query, limit=2)]

            newest_first = list(reversed(events))
            assert await ids("&user_id=u-1") == [e.id for e in newest_first if e.user_id == "u-1"]
            # A base model name matches its dated names, as a model budget does.
            assert await ids("&model=gpt-4o") == [
                e.id for e in newest_first if e.model == DATED_MODEL
            ]
            assert await ids("&tag=feature:screener") == [e.id for e in newest_first if e.tags]
            assert await ids("&status=failed") == [
                e.id for e in newest_first if e.status_code >= 400
            ]
            assert await ids("&status=failed&user_id=u-0") == [
                e.id for e in newest_first if e.status_code >= 400 and e.user_id == "u-0"
            ]
            start = T0 + timedelta(minutes=30)
            end = T0 + timedelta(minutes=80)
            z_start = start.isoformat().replace("+00:00", "Z")
            z_end = end.isoformat().replace("+00:00", "Z")
            window = f"&start={z_start}&end={z_end}"
            assert await ids(window) == [e.id for e in newest_first if start <= e.occurred_at < end]
            assert await ids("&user_id=nobody") == []
    await nc.close()


async def test_bad_cursors_are_refused_with_a_detail(env: dict[str, str]) -> None:
    settings = usage_settings(env)
    nc, js = await _stack(env, ManualClock(T0))
    async with running_service(build(settings), settings):
        for event in _events():
            await publish_event(js, SUBJECT_RECORDED, event)
        async with gateway(gateway_settings(env)) as client:
            first = (await client.get("/api/v1/usage/records?limit=2&user_id=u-1")).json()
            cursor = first["next_cursor"]
            assert cursor
            # Altered by one character: refused, not read from somewhere else.
            altered = cursor[:-2] + ("A" if cursor[-2] != "A" else "B") + cursor[-1]
            for bad, says in (
                (altered, "altered"),
                ("bm90LWEtY3Vyc29y", "not a cursor"),
                (cursor, "other filters"),  # the cursor of another query
            ):
                query = "&user_id=u-1" if bad != cursor else "&user_id=u-2"
                response = await client.get(f"/api/v1/usage/records?limit=2&cursor={bad}{query}")
                assert response.status_code == 422, response.text
                assert says in response.json()["detail"]
            for query in (
                "cursor=%00",
                "cursor=" + "A" * 201,
                "limit=0",
                "limit=1001",
                "start=yesterday",
                # A window that ends the day before it starts, dated from T0 (not the calendar).
                f"start={(T0 + timedelta(days=1)).date()}&end={T0.date()}",
            ):
                response = await client.get(f"/api/v1/usage/records?{query}")
                assert response.status_code == 422, query
                assert query.split("=")[0] in response.json()["detail"]
    await nc.close()


async def test_retries_and_dead_letters_are_not_in_the_log(env: dict[str, str]) -> None:
    """A retry stored again past JetStream's duplicate window (another Msg-Id) was counted
    once by the fold, so the log lists it once; a message that is no event is left out."""
    settings = usage_settings(env)
    nc, js = await _stack(env, ManualClock(T0))
    first, second = recorded(1), recorded(2, at=T0 + timedelta(minutes=1))
    async with running_service(build(settings), settings):
        await publish_event(js, SUBJECT_RECORDED, first)
        await js.publish(SUBJECT_RECORDED, b"not json", headers={"Nats-Msg-Id": "junk"})
        await js.publish(
            SUBJECT_RECORDED, encode_event(first), headers={"Nats-Msg-Id": "req-1-again"}
        )
        await publish_event(js, SUBJECT_RECORDED, second)
        async with gateway(gateway_settings(env)) as client:
            for _ in range(200):  # the fold must have seen the retry to know it is one
                status = (await client.get("/api/v1/usage/stats?date=" + str(T0.date()))).json()
                if status["total_requests"] == 2:
                    break
            listed = await _pages(client, "", limit=10)
    await nc.close()
    assert [r["id"] for r in listed] == ["req-2", "req-1"]
    assert listed[1]["seq"] < listed[0]["seq"]


async def test_a_page_reads_a_bounded_part_of_the_stream(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rare matches: each page stops after SCAN_BUDGET events (fewer records, even none) and
    its cursor reads on below, so following it still finds every match."""
    monkeypatch.setattr(spend_log, "SCAN_BUDGET", 40)
    monkeypatch.setattr(spend_log, "FIRST_CHUNK", 8)
    settings = usage_settings(env)
    nc, js = await _stack(env, ManualClock(T0))
    events = [
        recorded(i, at=T0 + timedelta(seconds=i), user_id="rare" if i in (3, 150) else "u")
        for i in range(200)
    ]
    async with running_service(build(settings), settings):
        for event in events:
            await publish_event(js, SUBJECT_RECORDED, event)
        async with gateway(gateway_settings(env)) as client:
            page = (await client.get("/api/v1/usage/records?user_id=rare&limit=5")).json()
            assert page["records"] == [] and page["scanned"] == 40 and page["next_cursor"]
            listed = await _pages(client, "&user_id=rare", limit=5)
    await nc.close()
    assert [r["id"] for r in listed] == ["req-150", "req-3"]


# ----- pure: no servers ------------------------------------------------------------------


def _query(**params: Any) -> spend_log.Query:
    from zoneinfo import ZoneInfo

    from services.usage.contract import SpendLogParams

    return spend_log.read_query(SpendLogParams(**params), ZoneInfo("UTC"))


def test_a_cursor_round_trips_and_any_change_is_refused() -> None:
    from shared.errors import InvalidRequestError

    query = _query(user_id="u-1", limit=10)
    cursor = spend_log.encode_cursor(1234, query, b"STREAM@created")
    assert (
        spend_log.decode_cursor(cursor, _query(user_id="u-1", limit=99), b"STREAM@created") == 1234
    )
    with pytest.raises(InvalidRequestError, match="another usage stream"):
        spend_log.decode_cursor(cursor, query, b"STREAM@recreated")
    with pytest.raises(InvalidRequestError, match="other filters"):
        spend_log.decode_cursor(cursor, _query(user_id="u-2"), b"STREAM@created")


def test_the_byte_prefilter_never_drops_a_call_written_with_escapes() -> None:
    """A producer's JSON may escape "/" or non-ASCII text: such a payload is decoded, not
    judged by its bytes."""
    query = _query(user_id="사용자-1", endpoint="/api/v1/chat", model="gpt-4o", tag="a/b")
    event = recorded(
        1, user_id="사용자-1", endpoint="/api/v1/chat", model=DATED_MODEL, tags=("a/b",)
    )
    assert query.matches(event)
    escaped = json.dumps(msgspec.to_builtins(event)).replace("/", "\\/").encode()
    assert any(needle not in escaped for needle in query.needles())
    assert b"\\" in escaped  # so the log decodes it instead of ruling it out
    plain = msgspec.json.encode(event)
    assert all(needle in plain for needle in query.needles())


async def test_both_read_paths_read_the_same_stretch_of_the_stream(env: dict[str, str]) -> None:
    """The bare reader (stopped past the range's end) and nats-py's ordered consumer (its
    fallback) deliver the same messages, also where the range runs into the stream's end."""
    nc, js = await _stack(env, ManualClock(T0))
    for i in range(300):
        await publish_event(js, SUBJECT_RECORDED, recorded(i))
    try:
        for first, last in ((1, 300), (120, 180), (290, 400), (300, 300)):
            bare, bare_path = await log_reader.read_range(
                js, "STOCKPILOT_USAGE", "stockpilot.usage.>", first, last, bare=True
            )
            plain, plain_path = await log_reader.read_range(
                js, "STOCKPILOT_USAGE", "stockpilot.usage.>", first, last, bare=False
            )
            assert (bare_path, plain_path) == ("bare", "nats-py")
            assert [m[0] for m in bare] == list(range(first, min(last, 300) + 1))
            assert [m[:3] for m in bare] == [m[:3] for m in plain]
            # Stored times agree to the microsecond nats-py keeps (it rounds through a float).
            assert all(abs(b[3] - p[3]) < 2000 for b, p in zip(bare, plain, strict=True))
    finally:
        await nc.close()


@pytest.mark.parametrize("bare", [True, False], ids=["bare", "nats-py"])
async def test_the_usage_role_may_read_its_log_without_new_permissions(
    tmp_path: Path, bare: bool
) -> None:
    """Under the credentials `stockpilot up` gives the usage service (ops.nats_auth), both
    read paths and the start-by-time lookup work, and the server reports no violation."""
    process, port, passwords = start_server(tmp_path)
    stack = Secured(port, passwords)
    try:
        await provision((await stack.connect("ops")).nc.jetstream())
        producer = (await stack.connect("producer")).nc.jetstream()
        events = [recorded(i, at=T0 + timedelta(minutes=i)) for i in range(30)]
        for event in events:
            await publish_event(producer, SUBJECT_RECORDED, event)
        usage = await stack.connect("usage")
        settings = usage_settings({"STOCKPILOT_CONFIG": "tests/empty.toml"}, tz="UTC")
        projection = usage_projection(settings)
        since = T0 + timedelta(minutes=10)
        params = SpendLogParams(limit=7, start=since.isoformat())
        got: list[str] = []
        answer = await spend_log.page(projection, usage.nc.jetstream(), params, UTC_ZONE, bare)
        got += [r.id for r in answer.records]
        while answer.next_cursor:
            params = msgspec.structs.replace(params, cursor=answer.next_cursor)
            answer = await spend_log.page(projection, usage.nc.jetstream(), params, UTC_ZONE, bare)
            got += [r.id for r in answer.records]
        assert got == [e.id for e in reversed(events) if e.occurred_at >= since]
        assert answer.read_path == ("bare" if bare else "nats-py")
        assert usage.errors == []
    finally:
        for nc in stack.opened:
            await nc.close()
        stop_process(process)


def test_a_date_window_is_whole_local_days_and_a_time_window_ends_before_its_end() -> None:
    """`end=YYYY-MM-DD` includes that day (as in /usage/stats), in STOCKPILOT_TZ; an RFC 3339
    `end` is exclusive."""
    from datetime import datetime

    seoul = ZoneInfo("Asia/Seoul")
    day = (T0 - timedelta(days=3)).date()
    query = spend_log.read_query(SpendLogParams(start=day.isoformat(), end=day.isoformat()), seoul)
    midnight = datetime(day.year, day.month, day.day, tzinfo=seoul)
    assert query.start == midnight
    assert query.end == midnight + timedelta(days=1)
    last_second = recorded(1, at=query.end - timedelta(microseconds=1))
    assert query.matches(last_second)
    assert not query.matches(recorded(2, at=query.end))
    assert not query.matches(recorded(3, at=query.start - timedelta(microseconds=1)))
