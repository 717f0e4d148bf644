"""The spend log: pages of recorded calls read backwards from STOCKPILOT_USAGE itself.

The stream is the log: no second store, no index to keep in step. A page reads the stream
downwards from the newest event (or from its cursor) in growing chunks, each read forwards
from its first sequence to its last (services.usage.log_reader), and keeps the calls that
match, newest first. Calls carry their filter fields only in the payload (every call is on
one subject), so filtering happens here; two things keep a page fast on millions of events:

- `start` is turned into a stream position by JetStream's start-by-time direct get (a call
  dated at `start` cannot have been stored more than MAX_FUTURE_S before it: later-dated
  events are dead letters), so a page never reads below it;
- a page reads at most SCAN_BUDGET events. When that runs out before `limit` matches, the
  page is shorter (even empty) and its cursor continues below what it read: every page costs
  about the same, however rare the matches.

Each record is what the usage fold counted: the same admission check (a dead letter is not in
the log), retries the fold recognised as duplicates left out, and its cost from the fold's own
pricing (`UsageProjection.charged`: the reported cost, else the price table in effect at its
occurred_at).

One module a little past 300 lines: a query, its cursor and its page are read together (a
cursor means nothing without the query it was made for).
"""

from __future__ import annotations

import base64
import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import msgspec
from nats.js import JetStreamContext
from nats.js import api as js_api

from services.usage.contract import (
    SUBJECT_RECORDED,
    Priced,
    SpendLog,
    SpendLogParams,
    SpendRecord,
    UsageRecorded,
)
from services.usage.log_reader import Message, first_stored_at, read_range
from services.usage.prices import base_model
from services.usage.projection import UsageProjection
from services.usage.queries import _parse_moment  # the stats routes' own date/time reading
from shared.errors import InvalidRequestError
from shared.events import MAX_FUTURE_S
from shared.nats_errors import is_nats_error, translate

# Events read per page at most (see the module docstring; bench/spend_log.py times it).
SCAN_BUDGET = 25_000
# Pages read at once by one service process (more wait their turn).
PAGES_AT_ONCE = 2
# The first chunk read; each next one is CHUNK_GROWTH times larger, up to MAX_CHUNK.
FIRST_CHUNK = 256
CHUNK_GROWTH = 4
MAX_CHUNK = 20_000

_SUBJECT = SUBJECT_RECORDED.encode()
_CURSOR_VERSION = 1
# version, the sequence to read below, the query's digest, the cursor's check.
_CURSOR = struct.Struct(">BQ8s8s")


@dataclass(frozen=True)
class Query:
    """A spend-log question with its window read into instants ([start, end), UTC)."""

    start: datetime | None
    end: datetime | None
    user_id: str | None
    model: str | None
    endpoint: str | None
    tag: str | None
    status: str | None
    limit: int
    digest: bytes

    def matches(self, event: UsageRecorded) -> bool:
        """Whether the call is one this query asks for."""
        if self.start is not None and event.occurred_at < self.start:
            return False
        if self.end is not None and event.occurred_at >= self.end:
            return False
        if self.user_id is not None and event.user_id != self.user_id:
            return False
        if self.endpoint is not None and event.endpoint != self.endpoint:
            return False
        if self.tag is not None and self.tag not in event.tags:
            return False
        if self.model is not None and not (
            event.model == self.model or base_model(event.model) == self.model
        ):
            return False
        if self.status is not None and event.failed != (self.status == "failed"):
            return False
        return True

    def needles(self) -> tuple[bytes, ...]:
        """Bytes every matching payload contains when it has no JSON escapes at all: each
        filter value as a JSON string (the model's without its closing quote, so a dated
        name matches too). A payload without a backslash spells its strings literally, so
        one missing needle rules it out without decoding it."""
        found = []
        for value in (self.user_id, self.endpoint, self.tag):
            if value is not None:
                found.append(_json(value))
        if self.model is not None:
            found.append(_json(self.model)[:-1])
        return tuple(found)


_json = msgspec.json.Encoder().encode


def read_query(params: SpendLogParams, zone: ZoneInfo) -> Query:
    """The query `params` ask (422 naming a bad parameter)."""
    start = end = None
    if params.start is not None:
        start = _parse_moment("start", params.start, zone)[0].astimezone(UTC)
    if params.end is not None:
        end, is_day = _parse_moment("end", params.end, zone)
        if is_day:  # a date ends with its day (as in /usage/stats)
            end = _next_local_day(end, zone)
        end = end.astimezone(UTC)
    if start is not None and end is not None and start >= end:
        raise InvalidRequestError(f"query parameter 'start': {params.start} is not before end")
    # The cursor belongs to the question, not to the page size.
    asked = msgspec.structs.replace(params, limit=1, cursor=None)
    return Query(
        start=start,
        end=end,
        user_id=params.user_id,
        model=params.model,
        endpoint=params.endpoint,
        tag=params.tag,
        status=params.status,
        limit=params.limit,
        digest=hashlib.blake2b(_json(asked), digest_size=8).digest(),
    )


def _next_local_day(midnight: datetime, zone: ZoneInfo) -> datetime:
    day = midnight.astimezone(zone).date() + timedelta(days=1)
    return datetime(day.year, day.month, day.day, tzinfo=zone)


# ----- cursors ---------------------------------------------------------------------------


def cursor_key(info: js_api.StreamInfo) -> bytes:
    """What a cursor is checked with: the stream's name and creation time, so a cursor of a
    stream since deleted and recreated (a restore) is refused, not read from elsewhere."""
    created = info.created.isoformat() if info.created else ""
    return f"{info.config.name}@{created}".encode()


def encode_cursor(before: int, query: Query, key: bytes) -> str:
    """An opaque cursor: read below stream sequence `before` for `query`; `key` (the
    stream's identity) makes it refused by another stream and checks it was not altered."""
    body = _CURSOR.pack(_CURSOR_VERSION, before, query.digest, b"\0" * 8)[:-8]
    check = hashlib.blake2b(body, key=key[:64], digest_size=8).digest()
    return base64.urlsafe_b64encode(body + check).rstrip(b"=").decode()


def decode_cursor(cursor: str, query: Query, key: bytes) -> int:
    """The stream sequence a cursor reads below; a 422 saying why for any other cursor."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        version, before, digest, check = _CURSOR.unpack(raw)
    except (ValueError, struct.error):
        raise InvalidRequestError(
            "query parameter 'cursor': not a cursor of this API (pass next_cursor as given)"
        ) from None
    expected = hashlib.blake2b(raw[:-8], key=key[:64], digest_size=8).digest()
    if version != _CURSOR_VERSION or check != expected or before < 1:
        raise InvalidRequestError(
            "query parameter 'cursor': altered, or from another usage stream (pass next_cursor "
            "as given; a recreated stream starts its log again)"
        )
    if digest != query.digest:
        raise InvalidRequestError(
            "query parameter 'cursor': it belongs to a query with other filters or another "
            "window; keep them as they were for the first page"
        )
    return int(before)


# ----- a page ----------------------------------------------------------------------------


async def page(
    usage: UsageProjection,
    js: JetStreamContext,
    params: SpendLogParams,
    zone: ZoneInfo,
    bare: bool = True,
) -> SpendLog:
    """One page of the spend log for `params`, newest first (`bare`: read with the bare
    protocol reader where it can, see services.usage.log_reader)."""
    query = read_query(params, zone)
    stream = usage.stream.name
    try:
        info = await js.stream_info(stream)
        key = cursor_key(info)
        upper = info.state.last_seq
        if params.cursor is not None:
            upper = min(upper, decode_cursor(params.cursor, query, key) - 1)
        lower = max(info.state.first_seq, 1)
        if query.start is not None:
            earliest = query.start - timedelta(seconds=MAX_FUTURE_S)
            found = await first_stored_at(js, stream, earliest)
            lower = upper + 1 if found is None else max(lower, found)
        return await _scan(usage, js, query, key, lower, upper, bare)
    except Exception as exc:
        if is_nats_error(exc):
            raise translate(exc, "could not read the usage stream") from None
        raise


async def _scan(
    usage: UsageProjection,
    js: JetStreamContext,
    query: Query,
    key: bytes,
    lower: int,
    upper: int,
    bare: bool,
) -> SpendLog:
    records: list[SpendRecord] = []
    paths = set()
    pick = _picker(usage, query)
    position = upper
    scanned = 0
    size = max(FIRST_CHUNK, query.limit * 2)
    next_before: int | None = None
    while position >= lower and scanned < SCAN_BUDGET:
        first = max(lower, position - size + 1, position - (SCAN_BUDGET - scanned) + 1)
        chunk, path = await read_range(js, usage.stream.name, usage.subject, first, position, bare)
        paths.add(path)
        scanned += position - first + 1
        found = [record for record in map(pick, chunk) if record is not None]
        for record in reversed(found):
            records.append(record)
            if len(records) == query.limit:
                next_before = record.seq
                break
        position = first - 1
        if next_before is not None:
            break
        size = min(size * CHUNK_GROWTH, MAX_CHUNK)
    if next_before is None and position >= lower:
        next_before = position + 1  # the budget ran out: the next page reads on below
    if next_before is not None and next_before <= lower:
        next_before = None  # nothing left below
    return SpendLog(
        records=records,
        next_cursor=None if next_before is None else encode_cursor(next_before, query, key),
        scanned=scanned,
        scanned_down_to=position + 1 if scanned else None,
        window_start=query.start,
        window_end=query.end,
        read_path="+".join(sorted(paths)) or None,
    )


def _picker(usage: UsageProjection, query: Query) -> Callable[[Message], SpendRecord | None]:
    """The record a stored message is in this query's log, or None."""
    needles = query.needles()
    ids = usage.view.ids

    def pick(message: Message) -> SpendRecord | None:
        seq, subject, data, stored_ns = message
        if subject != _SUBJECT:
            return None  # a reset or a price table
        if needles and b"\\" not in data and not all(needle in data for needle in needles):
            return None
        try:
            event = usage.admit(data, subject.decode(), stored_ns)
        except Exception:
            # Whatever admission raises (bad JSON or UTF-8, out of range, a FoldError), the
            # runtime dead-letters (shared.projection_runner): the fold never counted it.
            return None
        if not isinstance(event, UsageRecorded) or not query.matches(event):
            return None
        remembered = ids.current.ids.get(event.id) or ids.previous.ids.get(event.id)
        if remembered is not None and remembered != seq:
            return None  # a retry of a call stored earlier: the fold counted it once
        return _record(usage, event, seq, stored_ns)

    return pick


def _record(usage: UsageProjection, event: UsageRecorded, seq: int, stored_ns: int) -> SpendRecord:
    cost = usage.charged(event)
    priced: Priced
    if event.cost_usd is not None:
        priced = "reported"
    elif cost is None:
        priced = "unpriced"
    else:
        priced = "price_table"
    return SpendRecord(
        seq=seq,
        id=event.id,
        occurred_at=event.occurred_at,
        stored_at=datetime.fromtimestamp(stored_ns / 1e9, UTC),
        model=event.model,
        status_code=event.status_code,
        failed=event.failed,
        cost_usd=cost or 0.0,
        priced=priced,
        request_id=event.request_id,
        endpoint=event.endpoint,
        user_id=event.user_id,
        prompt_tokens=event.prompt_tokens,
        completion_tokens=event.completion_tokens,
        cached_tokens=event.cached_tokens,
        error_code=event.error_code,
        response_time_ms=event.response_time_ms,
        tags=list(event.tags),
        task_type=event.task_type,
        error_message=event.error_message,
        stream=event.stream,
        ttft_ms=event.ttft_ms,
    )
