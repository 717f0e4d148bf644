"""Pure command handlers: posted records become events (or reasons), a reset becomes an event."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import msgspec

from services.usage.contract import (
    MAX_RECORDS,
    SUBJECT_RECORDED,
    IngestParams,
    Rejected,
    ResetParams,
    UsageRecorded,
    UsageRecordedIn,
    UsageReset,
)
from shared.dead_letters import DECODE_ERRORS, describe_decode_error, describe_not_utf8
from shared.errors import InvalidRequestError
from shared.events import timing_problem
from shared.publish import encode_event

# JSON does not tell 3 from 3.0, and JSON Schema counts 3.0 as an integer (the published
# OpenAPI schema says `integer`): such values of the integer fields are taken as integers.
_INTEGER_FIELDS = ("status_code", "prompt_tokens", "completion_tokens", "cached_tokens")


def _integral_floats_as_ints(raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` with 3.0 as 3 in the integer fields (a copy only when something changes)."""
    changed: dict[str, Any] | None = None
    for name in _INTEGER_FIELDS:
        value = raw.get(name)
        if type(value) is float and value.is_integer() and abs(value) < 2**63:
            if changed is None:
                changed = dict(raw)
            changed[name] = int(value)
    return raw if changed is None else changed


_decode_complete = msgspec.json.Decoder(list[UsageRecorded]).decode
_decode_all = msgspec.json.Decoder(list[UsageRecordedIn]).decode
_decode_list = msgspec.json.Decoder(list[msgspec.Raw]).decode
_decode_one = msgspec.json.Decoder().decode


def _complete_events(params: IngestParams) -> list[tuple[int, UsageRecorded]] | None:
    """The posted list as events when every record already is one (an id, a time, nothing
    the fold would refuse): what the usage client's bytes and most programs send. None
    otherwise, and the records are taken one by one (records_to_events), with defaults and
    reasons. The same events either way; this way skips a conversion a record (~1 µs)."""
    try:
        events = _decode_complete(params.records)
    except DECODE_ERRORS:
        return None
    if len(events) > MAX_RECORDS:
        return None  # refused, with its reason, below
    received_at = params.received_at.timestamp()
    for event in events:
        if event.stored_problem(SUBJECT_RECORDED) or timing_problem(event.occurred_at, received_at):
            return None
    return list(enumerate(events, start=params.offset))


def records_to_events(
    params: IngestParams, new_id: Callable[[], str]
) -> tuple[list[tuple[int, UsageRecorded]], list[Rejected]]:
    """Validate each record on its own: events to publish (with their index) and rejections."""
    complete = _complete_events(params)
    if complete is not None:
        return complete, []
    try:
        # Most lists are all valid: decoded straight into records, no dict per record.
        records: list[Any] = _decode_all(params.records)
        valid = True
    except DECODE_ERRORS:
        # Some record is not: each one again on its own, to say which and why.
        try:
            records = _decode_list(params.records)
        except DECODE_ERRORS as exc:  # not a list of JSON values
            raise InvalidRequestError(f"records: {exc or type(exc).__name__}") from None
        valid = False
    if len(records) > MAX_RECORDS:
        raise InvalidRequestError(
            f"body: at most {MAX_RECORDS} records per request, got {len(records)}"
        )
    events: list[tuple[int, UsageRecorded]] = []
    rejected: list[Rejected] = []
    received_at = params.received_at.timestamp()
    for position, raw in enumerate(records):
        index = params.offset + position
        if valid:
            record = raw
        else:
            refused = _refusal(raw)
            if isinstance(refused, str):
                rejected.append(Rejected(index=index, reason=refused))
                continue
            record = refused
        if record.occurred_at is not None:
            problem = timing_problem(record.occurred_at, received_at)
            if problem is not None:  # stored, it would only be dead-lettered
                rejected.append(Rejected(index=index, reason=problem))
                continue
        events.append((index, to_event(record, params.received_at, new_id)))
    return events, rejected


def _refusal(posted: msgspec.Raw) -> UsageRecordedIn | str:
    """One posted record as a record, or why it is not one."""
    try:
        raw = _decode_one(posted)
    except UnicodeDecodeError as exc:
        return describe_not_utf8(exc, within=" of the record")
    except (msgspec.DecodeError, RecursionError) as exc:
        return f"not valid JSON ({exc or type(exc).__name__})"
    if not isinstance(raw, dict):
        return "a record must be a JSON object"
    kind = raw.get("type", "usage.recorded")
    if kind != "usage.recorded":
        return f"unknown type {kind!r}: only 'usage.recorded' records are accepted"
    try:
        return msgspec.convert(_integral_floats_as_ints(raw), UsageRecordedIn)
    except msgspec.ValidationError as exc:
        return describe_decode_error(exc)


# What a JetStream publish adds to the payload: its header block with the Msg-Id (the
# server counts headers and payload against max_payload).
_HEADER_BYTES = len(b"NATS/1.0\r\nNats-Msg-Id: \r\n\r\n")


def encode_within(
    events: list[tuple[int, UsageRecorded]], max_payload: int
) -> tuple[list[tuple[str, bytes]], list[Rejected]]:
    """Each event as (Msg-Id, JSON), and the records too large for one NATS message.

    A record the server would refuse on every retry is refused on its own, here, rather
    than failing the request (or, published, closing the publisher's connection).
    """
    window: list[tuple[str, bytes]] = []
    rejected: list[Rejected] = []
    for index, event in events:
        payload = encode_event(event)
        size = _HEADER_BYTES + len(event.id.encode()) + len(payload)
        if size > max_payload:
            rejected.append(
                Rejected(
                    index=index,
                    reason=f"the record is {size} bytes as a NATS message, over the NATS "
                    f"server's max_payload ({max_payload} bytes)",
                )
            )
            continue
        window.append((event.id, payload))
    return window, rejected


def to_event(
    record: UsageRecordedIn, received_at: datetime, new_id: Callable[[], str]
) -> UsageRecorded:
    """The event a valid record stands for (id and occurred_at defaulted)."""
    return UsageRecorded(
        id=record.id or record.request_id or new_id(),
        occurred_at=record.occurred_at or received_at,
        model=record.model,
        status_code=record.status_code,
        request_id=record.request_id,
        endpoint=record.endpoint,
        prompt_tokens=record.prompt_tokens,
        completion_tokens=record.completion_tokens,
        cached_tokens=record.cached_tokens,
        cost_usd=record.cost_usd,
        error_code=record.error_code,
        response_time_ms=record.response_time_ms,
        user_id=record.user_id,
        tags=record.tags,
        task_type=record.task_type,
        error_message=record.error_message,
        stream=record.stream,
        ttft_ms=record.ttft_ms,
    )


def reset_event(params: ResetParams, now: datetime, event_id: str) -> UsageReset:
    """The reset an admin asked for."""
    return UsageReset(
        id=event_id, occurred_at=now, actor=params.actor, scope=params.scope, reason=params.reason
    )
