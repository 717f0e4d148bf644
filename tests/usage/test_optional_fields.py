"""The optional fields of a usage event (contract §4): tags, task_type, error_message,
stream, ttft_ms; bounded, additive (old events decode), accepted over HTTP."""

from __future__ import annotations

from typing import Any

import msgspec
import nats as nats_py
import pytest

from services.usage.contract import SUBJECT_RECORDED, UsageRecorded, decode_usage_event
from services.usage.service import build
from shared.clock import ManualClock
from shared.publish import encode_event
from tests.harness import running_service
from tests.usage.helpers import INGEST, auth, gateway, gateway_settings, recorded, usage_settings

# An event as producers wrote it before the optional fields existed (fixed history: only
# decoded, never folded into a day, so its date never becomes 'today').
OLD_EVENT = (
    b'{"type":"usage.recorded","id":"req-old",'
    b'"occurred_at":"2026-01-02T09:00:00Z",'  # fixed history
    b'"request_id":"req-old","model":"gpt-4o-mini","endpoint":"/api/v1/analysis",'
    b'"prompt_tokens":812,"completion_tokens":164,"cached_tokens":0,"cost_usd":null,'
    b'"status_code":200,"error_code":null,"response_time_ms":1432.5,"user_id":"u-42"}'
)


def test_an_event_without_the_optional_fields_still_decodes_with_their_defaults() -> None:
    event = decode_usage_event(OLD_EVENT)
    assert isinstance(event, UsageRecorded)
    assert (event.tags, event.task_type, event.error_message) == ((), None, None)
    assert (event.stream, event.ttft_ms) == (False, None)


def test_the_optional_fields_round_trip() -> None:
    event = recorded(
        1,
        tags=("feature:screener", "tier:pro"),
        task_type="summary",
        error_message="Rate limit reached for gpt-4o-mini",
        stream=True,
        ttft_ms=212.5,
    )
    assert decode_usage_event(encode_event(event)) == event


def _with(**fields: Any) -> bytes:
    raw = msgspec.json.decode(OLD_EVENT)
    raw.update(fields)
    return msgspec.json.encode(raw)


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"tags": [f"t{i}" for i in range(17)]}, "tags"),
        ({"tags": ["x" * 65]}, "tags"),
        ({"tags": [""]}, "tags"),
        ({"tags": "feature:screener"}, "tags"),
        ({"task_type": "x" * 129}, "task_type"),
        ({"error_message": "x" * 1001}, "error_message"),
        ({"stream": "yes"}, "stream"),
        ({"ttft_ms": -1}, "ttft_ms"),
        ({"ttft_ms": 1e8}, "ttft_ms"),
    ],
)
def test_an_optional_field_out_of_bounds_does_not_decode(
    fields: dict[str, Any], named: str
) -> None:
    with pytest.raises(msgspec.ValidationError, match=named):
        decode_usage_event(_with(**fields))


def test_the_largest_optional_fields_decode() -> None:
    event = decode_usage_event(
        _with(tags=["x" * 64] * 16, error_message="e" * 1000, ttft_ms=0, task_type="t" * 128)
    )
    assert isinstance(event, UsageRecorded)
    assert len(event.tags) == 16 and len(event.error_message or "") == 1000


def test_a_tag_with_a_control_character_is_refused_where_it_is_stored() -> None:
    event = recorded(1, tags=("ok", "bad\nline"))
    assert event.stored_problem(SUBJECT_RECORDED) is not None
    assert recorded(1, tags=("ok",)).stored_problem(SUBJECT_RECORDED) is None


async def test_http_records_carry_the_optional_fields_into_the_stream(
    env: dict[str, str], clock: ManualClock
) -> None:
    settings = usage_settings(env)
    good = {
        "model": "gpt-4o-mini",
        "status_code": 429,
        "request_id": "r-tagged",
        "occurred_at": clock.now().isoformat(),
        "tags": ["feature:screener", "attempts:3"],
        "task_type": "summary",
        "error_message": "Rate limit reached",
        "stream": True,
        "ttft_ms": 0,
    }
    async with (
        running_service(build(settings), settings, clock=clock),
        gateway(gateway_settings(env), clock) as client,
    ):
        response = await client.post("/api/v1/usage/records", json=good, headers=auth(INGEST))
        assert response.status_code == 202, response.text
        for fields, named in [
            ({"tags": ["t"] * 17}, "tags"),
            ({"error_message": "x" * 1001}, "error_message"),
            ({"ttft_ms": -0.5}, "ttft_ms"),
            ({"tags": ["tab\there"]}, "tags[0]"),
            ({"task_type": "x" * 129}, "task_type"),
        ]:
            refused = await client.post(
                "/api/v1/usage/records",
                json={**good, "request_id": "r-refused", **fields},
                headers=auth(INGEST),
            )
            assert refused.status_code == 422, fields
            assert named in refused.json()["detail"], refused.json()
    nc = await nats_py.connect(env["STOCKPILOT_NATS_URL"])
    js = nc.jetstream()
    info = await js.stream_info("STOCKPILOT_USAGE", subjects_filter=SUBJECT_RECORDED)
    # None of the refused records reached the stream.
    assert info.state.subjects == {SUBJECT_RECORDED: 1}
    msg = await js.get_last_msg("STOCKPILOT_USAGE", SUBJECT_RECORDED)
    await nc.close()
    stored = decode_usage_event(msg.data)
    assert isinstance(stored, UsageRecorded)
    assert stored.id == "r-tagged"
    assert stored.tags == ("feature:screener", "attempts:3")
    assert (stored.task_type, stored.error_message) == ("summary", "Rate limit reached")
    assert (stored.stream, stored.ttft_ms) == (True, 0)
