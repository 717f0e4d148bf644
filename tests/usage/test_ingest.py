"""HTTP ingest (`POST /api/v1/usage/records`) publishing through the transport seam, on both
paths (STOCKPILOT_NATS_ACCELERATOR on: the accelerator; off: nats-py's core publish), and
the decisions it rests on (the typed fast path, records too large for a NATS message)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import msgspec
import nats
import pytest
from nats.js import api as js_api

from services.usage.contract import (
    SUBJECT_RECORDED,
    IngestParams,
    UsageRecorded,
    UsageRecordedIn,
)
from services.usage.decide import _complete_events, encode_within, records_to_events, to_event
from services.usage.service import build
from shared.clock import ManualClock
from shared.events import EARLIEST, rfc3339
from shared.streams import provision
from shared.transport import ACCELERATED, NATS_PY, TransportPath
from tests.clocks import NOON
from tests.harness import running_service
from tests.usage.helpers import INGEST, auth, gateway, gateway_settings, recorded, usage_settings

STREAM = "STOCKPILOT_USAGE"


@pytest.fixture(params=[ACCELERATED, NATS_PY])
def path(request: pytest.FixtureRequest) -> TransportPath:
    """The transport path the usage service publishes posted records over."""
    value: TransportPath = request.param
    return value


def accelerator(path: TransportPath) -> str:
    return "on" if path == ACCELERATED else "off"


async def test_a_posted_list_is_stored_once_by_id_and_folded_before_the_answer(
    env: dict[str, str], clock: ManualClock, path: TransportPath
) -> None:
    settings = usage_settings(env, nats_accelerator=accelerator(path))
    now = clock.now()
    good = [msgspec.to_builtins(recorded(i, now - timedelta(minutes=i))) for i in range(300)]
    body = [*good[:100], {"model": "gpt-4o"}, *good[100:]]  # index 100: no status_code
    nc = await nats.connect(env["STOCKPILOT_NATS_URL"])
    async with (
        running_service(build(settings), settings, clock=clock) as runtime,
        gateway(gateway_settings(env), clock) as client,
    ):
        response = await client.post("/api/v1/usage/records", json=body, headers=auth(INGEST))
        assert response.status_code == 202, response.text
        answer = response.json()
        assert (answer["accepted"], answer["duplicates"]) == (300, 0)
        assert [r["index"] for r in answer["rejected"]] == [100]
        assert "status_code" in answer["rejected"][0]["reason"]
        assert answer["ids"] == [f"req-{i}" for i in range(300)]
        # Answered once folded: the statistics count them at once.
        assert (await client.get("/api/v1/usage/stats")).json()["total_requests"] == 300
        # Stored in the posted order, each with Msg-Id = its id.
        js = nc.jetstream()
        info = await js.stream_info(STREAM, subjects_filter=SUBJECT_RECORDED)
        assert (info.state.subjects or {}).get(SUBJECT_RECORDED) == 300
        first = info.state.last_seq - 299
        for offset in (0, 150, 299):
            stored = await js.get_msg(STREAM, first + offset)
            event = msgspec.json.decode(stored.data, type=UsageRecorded)
            assert event.id == f"req-{offset}"
            assert (stored.headers or {}).get("Nats-Msg-Id") == event.id
        again = await client.post("/api/v1/usage/records", json=good, headers=auth(INGEST))
        assert again.status_code == 202
        assert (again.json()["accepted"], again.json()["duplicates"]) == (0, 300)
        assert (await client.get("/api/v1/usage/stats")).json()["total_requests"] == 300
        assert runtime.status().publishers == {"ingest": path}
        status = (await client.get("/api/v1/status")).json()
        assert status["services"]["usage"]["transports"]["ingest"] == path
    await nc.close()


async def test_records_stored_before_are_duplicates_over_the_services_own_request(
    env: dict[str, str], clock: ManualClock, path: TransportPath
) -> None:
    """The ingest endpoint asked over NATS directly (as the gateway asks it): half of the
    records were stored before the service started; only the other half is stored."""
    settings = usage_settings(env, nats_accelerator=accelerator(path))
    now = clock.now()
    events = [recorded(i, now) for i in range(20)]
    nc = await nats.connect(env["STOCKPILOT_NATS_URL"])
    js = nc.jetstream()
    await provision(js)
    for event in events[:10]:
        await js.publish(
            SUBJECT_RECORDED, msgspec.json.encode(event), headers={"Nats-Msg-Id": event.id}
        )
    async with running_service(build(settings), settings, clock=clock):
        params = IngestParams(
            records=msgspec.Raw(msgspec.json.encode(events)), received_at=clock.now()
        )
        msg = await nc.request(
            "stockpilot.svc.usage.ingest", msgspec.json.encode(params), timeout=30
        )
        answer = msgspec.json.decode(msg.data)
    # Stored within JetStream's duplicate window: the acknowledgements say duplicate.
    assert (answer["accepted"], answer["duplicates"]) == (10, 10)
    info = await js.stream_info(STREAM, subjects_filter=SUBJECT_RECORDED)
    assert (info.state.subjects or {}).get(SUBJECT_RECORDED) == 20
    await nc.close()


async def test_a_stream_that_refuses_the_records_is_a_503_with_a_detail_never_a_500(
    env: dict[str, str], clock: ManualClock, path: TransportPath
) -> None:
    settings = usage_settings(env, nats_accelerator=accelerator(path))
    now = clock.now()
    nc = await nats.connect(env["STOCKPILOT_NATS_URL"])
    async with (
        running_service(build(settings), settings, clock=clock),
        gateway(gateway_settings(env), clock) as client,
    ):
        js = nc.jetstream()
        info = await js.stream_info(STREAM)
        # Room for five more, then the stream refuses new messages.
        config = info.config
        config.max_msgs = info.state.messages + 5
        config.discard = js_api.DiscardPolicy.NEW
        await js.update_stream(config)
        body = [msgspec.to_builtins(recorded(i, now)) for i in range(8)]
        response = await client.post("/api/v1/usage/records", json=body, headers=auth(INGEST))
        assert response.status_code == 503, response.text
        detail = response.json()["detail"]
        assert "maximum messages" in detail and "5 of 8 stored" in detail
        # The stream takes writes again: the retry stores the other three, each once.
        config.max_msgs = -1
        await js.update_stream(config)
        retry = await client.post("/api/v1/usage/records", json=body, headers=auth(INGEST))
        assert retry.status_code == 202, retry.text
        assert (retry.json()["accepted"], retry.json()["duplicates"]) == (3, 5)
        assert (await client.get("/api/v1/usage/stats")).json()["total_requests"] == 8
    await nc.close()


def test_a_record_too_large_for_one_nats_message_is_refused_on_its_own() -> None:
    small = recorded(1, NOON)
    large = recorded(2, NOON, error_message="x" * 1000)
    limit = len(msgspec.json.encode(large))  # the large one's payload alone fills it
    window, rejected = encode_within([(0, small), (1, large), (2, recorded(3, NOON))], limit)
    assert [event_id for event_id, _ in window] == ["req-1", "req-3"]
    assert [r.index for r in rejected] == [1]
    assert "max_payload" in rejected[0].reason and str(limit) in rejected[0].reason
    assert msgspec.json.decode(window[0][1], type=UsageRecorded) == small


RECORDS: list[Any] = [
    {"model": "gpt-4o", "status_code": 200, "request_id": "a"},
    {"model": "gpt-4o-mini", "status_code": 200, "prompt_tokens": 12.0, "id": "b"},
    {"model": "m", "status_code": 200, "type": "usage.recorded", "extra": [1], "id": "c"},
    {"model": "m", "status_code": 200, "type": "usage.reset"},
    {"model": "m", "status_code": 1000},
    {"model": "m", "status_code": 200, "prompt_tokens": 1.5},
    {"model": "gpt\r\nX: 1", "status_code": 200},
    "not an object",
    {"model": "m", "status_code": 200, "occurred_at": rfc3339(EARLIEST - timedelta(hours=1))},
    {"model": "m", "status_code": 200, "occurred_at": rfc3339(NOON + timedelta(hours=1))},
    {"model": "m", "status_code": 200, "id": "d", "tags": ["feature:x"], "stream": True},
]


def decided(records: list[Any]) -> tuple[list[tuple[int, UsageRecorded]], list[Any]]:
    params = IngestParams(records=msgspec.Raw(msgspec.json.encode(records)), received_at=NOON)
    return records_to_events(params, lambda: "assigned")


def test_the_typed_fast_path_decides_as_the_record_by_record_one() -> None:
    """An all-valid list is decoded straight into records; one bad record sends the whole list
    record by record. Each record, posted alone and in the mixed list, gets the same event or
    the same reason."""
    events, rejected = decided(RECORDS)
    mixed = {index: event for index, event in events} | {r.index: r.reason for r in rejected}
    assert sorted(mixed) == list(range(len(RECORDS)))
    for index, record in enumerate(RECORDS):
        alone_events, alone_rejected = decided([record])
        alone = alone_events[0][1] if alone_events else alone_rejected[0].reason
        assert alone == mixed[index], record
    accepted = [index for index, _ in events]
    assert accepted == [0, 1, 2, 10]
    assert mixed[1].prompt_tokens == 12  # type: ignore[union-attr]


def converted(record: dict[str, Any]) -> UsageRecorded:
    """The event the record-by-record path makes of a valid record."""
    return to_event(msgspec.convert(record, UsageRecordedIn), NOON, lambda: "assigned")


def test_a_list_of_complete_events_becomes_the_events_the_conversion_makes() -> None:
    """Records that already are events (an id and a time: what the usage client sends) are
    decoded as events, skipping the per-record conversion, with the same result."""
    at = NOON - timedelta(minutes=5)
    complete = [msgspec.to_builtins(recorded(i, at)) for i in range(4)]
    complete[0]["tags"] = ["feature:x", "b"]
    complete[1].pop("type")  # the type may be left out
    complete[2]["added_later"] = {"x": [1]}  # a field it does not know is ignored
    complete[3] |= {"stream": True, "ttft_ms": 120.5, "task_type": "summary"}
    events, rejected = decided(complete)
    assert rejected == []
    assert events == [(index, converted(record)) for index, record in enumerate(complete)]
    posted = IngestParams(records=msgspec.Raw(msgspec.json.encode(complete)), received_at=NOON)
    assert _complete_events(posted) == events  # taken as events, not record by record


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"model": "gpt\r\nX: 1"}, "control characters"),
        ({"occurred_at": rfc3339(NOON + timedelta(hours=1))}, "in the future"),
        ({"occurred_at": rfc3339(EARLIEST - timedelta(hours=1))}, "before"),
        ({"type": "usage.reset"}, "unknown type"),
    ],
)
def test_one_complete_event_the_fold_would_refuse_is_rejected_on_its_own(
    change: dict[str, Any], reason: str
) -> None:
    complete = [msgspec.to_builtins(recorded(i, NOON)) for i in range(3)]
    complete[1] |= change
    events, rejected = decided(complete)
    assert events == [(0, converted(complete[0])), (2, converted(complete[2]))]
    posted = IngestParams(records=msgspec.Raw(msgspec.json.encode(complete)), received_at=NOON)
    assert _complete_events(posted) is None  # record by record, to say which and why
    assert [r.index for r in rejected] == [1]
    assert reason in rejected[0].reason


async def test_past_a_short_duplicate_window_the_views_memory_refuses_posted_ids(
    env: dict[str, str], clock: ManualClock
) -> None:
    """Ingest leaves ids stored within the stream's duplicate window to JetStream; with a
    window too short to count on (an operator's choice), every posted id is looked for in
    the view's memory: ten stored without `Nats-Msg-Id`, which JetStream cannot know, are
    duplicates still, and not stored again."""
    settings = usage_settings(env)
    now = clock.now()
    events = [recorded(i, now) for i in range(20)]
    nc = await nats.connect(env["STOCKPILOT_NATS_URL"])
    js = nc.jetstream()
    async with (
        running_service(build(settings), settings, clock=clock) as runtime,
        gateway(gateway_settings(env), clock) as client,
    ):
        config = (await js.stream_info(STREAM)).config
        config.duplicate_window = 120.0
        await js.update_stream(config)
        for event in events[:10]:
            await js.publish(SUBJECT_RECORDED, msgspec.json.encode(event))
        last = (await js.stream_info(STREAM)).state.last_seq
        view = runtime.tracked["usage"].projection.view
        for _ in range(500):  # the service folds in its own thread
            if view.last_seq >= last:
                break
            await asyncio.sleep(0.02)
        assert view.recorded == 10
        body = [msgspec.to_builtins(event) for event in events]
        response = await client.post("/api/v1/usage/records", json=body, headers=auth(INGEST))
        assert response.status_code == 202, response.text
        assert (response.json()["accepted"], response.json()["duplicates"]) == (10, 10)
    info = await js.stream_info(STREAM, subjects_filter=SUBJECT_RECORDED)
    assert (info.state.subjects or {}).get(SUBJECT_RECORDED) == 20
    await nc.close()
