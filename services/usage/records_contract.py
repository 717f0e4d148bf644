"""The spend log's wire structs: `GET /api/v1/usage/records` parameters and answer.

Its own module for now because `services/usage/contract.py` (the service's one public face)
did not exist on main when this was written; the structs move there once it does.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from shared.events import AwareDatetime

# A page holds at most this many records (contract §5: `limit` ≤ 1000).
MAX_LIMIT = 1000
DEFAULT_LIMIT = 50
# A cursor is a few dozen characters; anything longer is not one of ours.
CURSOR_MAX_LENGTH = 200
CURSOR_PATTERN = r"^[A-Za-z0-9_-]+$"

Limit = Annotated[int, msgspec.Meta(ge=1, le=MAX_LIMIT)]
Cursor = Annotated[
    str, msgspec.Meta(min_length=1, max_length=CURSOR_MAX_LENGTH, pattern=CURSOR_PATTERN)
]
# The same bounds as the event's fields (services.usage.events), so a filter can match.
Moment = Annotated[str, msgspec.Meta(max_length=64)]
UserFilter = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
ModelFilter = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
EndpointFilter = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
TagFilter = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
StatusFilter = Literal["succeeded", "failed"]
Priced = Literal["reported", "price_table", "unpriced"]


class SpendLogParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`?start=&end=&user_id=&model=&endpoint=&tag=&status=&limit=&cursor=`.

    `start`/`end` are dates (YYYY-MM-DD, a whole day in STOCKPILOT_TZ; `end` inclusive) or
    RFC 3339 times (`end` exclusive), compared with each call's `occurred_at`. `model`
    matches the name or its base model (`gpt-4o` matches `gpt-4o-2024-08-06`), as a model
    budget does; `tag` matches a call carrying that tag.
    """

    start: Moment | None = None
    end: Moment | None = None
    user_id: UserFilter | None = None
    model: ModelFilter | None = None
    endpoint: EndpointFilter | None = None
    tag: TagFilter | None = None
    status: StatusFilter | None = None
    limit: Limit = DEFAULT_LIMIT
    cursor: Cursor | None = None


class SpendRecord(msgspec.Struct, kw_only=True):
    """One recorded LLM call as the usage fold counted it, with the cost it was charged."""

    seq: int
    id: str
    occurred_at: AwareDatetime
    stored_at: AwareDatetime
    model: str
    status_code: int
    failed: bool
    # What the call was charged: the cost it reported, else the price table in effect at
    # its occurred_at (0 for a model without a price, `priced` says which).
    cost_usd: float
    priced: Priced
    request_id: str | None = None
    endpoint: str | None = None
    user_id: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    error_code: str | None = None
    response_time_ms: float | None = None
    tags: list[str] = []
    task_type: str | None = None
    error_message: str | None = None
    stream: bool = False
    ttft_ms: float | None = None


class SpendLog(msgspec.Struct, kw_only=True):
    """`GET /api/v1/usage/records`: a page of the spend log, newest first.

    A page holds up to `limit` records; it holds fewer (even none) when it stopped after
    reading `scanned` events (the bound that keeps every page fast): follow `next_cursor`
    until it is null, the end of the log for this query.
    """

    records: list[SpendRecord]
    next_cursor: str | None
    scanned: int
    # The oldest stream sequence this page read down to (the next page reads below it).
    scanned_down_to: int | None = None
    window_start: datetime | None = None
    window_end: datetime | None = None
    # How the stream was read: "bare" (the protocol reader), "nats-py" (its fallback).
    read_path: str | None = None
