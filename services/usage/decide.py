"""Pure command handlers: posted records become events (or reasons), a reset becomes an event."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

import msgspec

from services.usage.contract import (
    MAX_RECORDS,
    IngestParams,
    Rejected,
    ResetParams,
    UsageRecorded,
    UsageRecordedIn,
    UsageReset,
)
from shared.dead_letters import describe_decode_error
from shared.errors import InvalidRequestError
from shared.events import timing_problem

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


def records_to_events(
    params: IngestParams, new_id: Callable[[], str]
) -> tuple[list[tuple[int, UsageRecorded]], list[Rejected]]:
    """Validate each record on its own: events to publish (with their index) and rejections."""
    if len(params.records) > MAX_RECORDS:
        raise InvalidRequestError(
            f"body: at most {MAX_RECORDS} records per request, got {len(params.records)}"
        )
    events: list[tuple[int, UsageRecorded]] = []
    rejected: list[Rejected] = []
    for position, raw in enumerate(params.records):
        index = params.offset + position
        if not isinstance(raw, dict):
            rejected.append(Rejected(index=index, reason="a record must be a JSON object"))
            continue
        kind = raw.get("type", "usage.recorded")
        if kind != "usage.recorded":
            rejected.append(
                Rejected(
                    index=index,
                    reason=f"unknown type {kind!r}: only 'usage.recorded' records are accepted",
                )
            )
            continue
        try:
            record = msgspec.convert(_integral_floats_as_ints(raw), UsageRecordedIn)
        except msgspec.ValidationError as exc:
            rejected.append(Rejected(index=index, reason=describe_decode_error(exc)))
            continue
        if record.occurred_at is not None:
            problem = timing_problem(record.occurred_at, params.received_at.timestamp())
            if problem is not None:  # stored, it would only be dead-lettered
                rejected.append(Rejected(index=index, reason=problem))
                continue
        events.append((index, to_event(record, params.received_at, new_id)))
    return events, rejected


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
