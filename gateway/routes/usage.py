"""The /api/v1/usage routes: statistics, time series, costs, alerts, reset, record ingest and
the spend log.

The gateway never publishes usage events itself: posted records go to the usage service's
`ingest` endpoint, which validates each one, publishes and waits until they are folded.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, Response, Router, get, post, route
from litestar.enums import MediaType
from litestar.params import FromQuery, QueryParameter
from litestar.status_codes import HTTP_200_OK, HTTP_202_ACCEPTED, HTTP_204_NO_CONTENT

from gateway.auth import admin_guard, ingest_guard, read_guard
from gateway.response_cache import CACHED
from gateway.services import GatewayClock, Services
from services.usage.contract import (
    CURSOR_MAX_LENGTH,
    CURSOR_PATTERN,
    DEFAULT_LIMIT,
    MAX_LIMIT,
    MAX_RECORDS,
    AlertList,
    AlertsParams,
    BudgetAnswer,
    BudgetParams,
    GroupBy,
    IngestAnswer,
    IngestParams,
    Reason,
    Rejected,
    ResetAnswer,
    ResetParams,
    SpendLog,
    SpendLogParams,
    StatsParams,
    StatusFilter,
    TimeseriesParams,
    UsageCosts,
    UsageStats,
    UsageTimeseries,
)
from shared.dead_letters import describe_not_utf8
from shared.errors import InvalidRequestError
from shared.events import EARLIEST

# A NATS message is at most 1 MiB; a posted body near the cap is forwarded in parts.
FORWARD_MAX_BYTES = 900 * 1024
# What a forwarded request holds besides the records (received_at, offset, NATS headers).
FORWARD_HEADROOM_BYTES = 512
INGEST_TIMEOUT_S = 15.0
# A spend-log page reads the stream (bounded, well under a second on 3M events); a loaded
# host gets more room than the projections' 2 s before it turns into a 503.
RECORDS_TIMEOUT_S = 10.0
_encode = msgspec.json.Encoder().encode
# What POST /usage/records accepts: one record (a JSON object) or a list of them.
_BodyShape = list[msgspec.Raw] | dict[str, msgspec.Raw]


class ResetBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Optional body of POST /usage/reset (bounded like the usage.reset event it becomes)."""

    scope: Annotated[str, msgspec.Meta(max_length=64)] = "all"
    reason: Reason | None = None


# The filters of the usage reads (bounded like the record fields they match).
UserQuery = Annotated[str | None, QueryParameter(min_length=1, max_length=256)]
ModelQuery = Annotated[str | None, QueryParameter(min_length=1, max_length=128)]
EndpointQuery = Annotated[str | None, QueryParameter(min_length=1, max_length=512)]
TagQuery = Annotated[str | None, QueryParameter(min_length=1, max_length=64)]

# Days and times asked for must lie where the calendar arithmetic behind them works
# (`?date=9999-12-31` has no next day) and where events can be: from EARLIEST (events before
# it are dead letters) to the year 2999.
LAST_YEAR = 2999


def _moment_param(name: str, value: str | None) -> str | None:
    """A date or time query parameter, refused with a 422 when its year is out of range."""
    if value is None:
        return None
    year = value[:4]
    if len(value) > 64:
        raise InvalidRequestError(
            f"query parameter {name!r}: expected a date YYYY-MM-DD or an RFC 3339 time, "
            f"got {len(value)} characters"
        )
    if year.isdigit() and not EARLIEST.year <= int(year) <= LAST_YEAR:
        raise InvalidRequestError(
            f"query parameter {name!r}: {value!r} is out of range; give a date between "
            f"{EARLIEST.year}-01-01 and {LAST_YEAR}-12-31"
        )
    return value


@get(
    "/usage/stats",
    summary="LLM usage statistics for a day or a range",
    guards=[read_guard],
    opt=CACHED,
)
async def usage_stats(
    services: Services,
    date: FromQuery[str | None] = None,
    start: FromQuery[str | None] = None,
    end: FromQuery[str | None] = None,
    user_id: UserQuery = None,
    model: ModelQuery = None,
    endpoint: EndpointQuery = None,
    tag: TagQuery = None,
) -> Response[UsageStats]:
    """`?date=YYYY-MM-DD` or `?start=&end=` (≤ 90 days) in STOCKPILOT_TZ; today by default.

    `user_id`, `model` (its dated names too), `endpoint` and `tag` narrow it to those calls,
    in any combination; `coverage` says what a filter could not tell apart."""
    params = StatsParams(
        date=_moment_param("date", date),
        start=_moment_param("start", start),
        end=_moment_param("end", end),
        user_id=user_id,
        model=model,
        endpoint=endpoint,
        tag=tag,
    )
    return await services.answer("usage", "stats", params)


@get("/usage/timeseries", summary="Hourly or daily usage buckets", guards=[read_guard], opt=CACHED)
async def usage_timeseries(
    services: Services,
    bucket: FromQuery[str] = "hour",
    start: FromQuery[str | None] = None,
    end: FromQuery[str | None] = None,
    user_id: UserQuery = None,
    model: ModelQuery = None,
    endpoint: EndpointQuery = None,
    tag: TagQuery = None,
    group_by: FromQuery[GroupBy | None] = None,
) -> Response[UsageTimeseries]:
    """Every bucket of the range (zeros included); hourly today by default. Filters as on
    /usage/stats; `group_by=model|endpoint|user_id|tag` adds `series`, the ten largest keys
    by cost and `(other)` for the rest (`other_keys` says how many)."""
    params = TimeseriesParams(
        bucket=bucket,
        start=_moment_param("start", start),
        end=_moment_param("end", end),
        user_id=user_id,
        model=model,
        endpoint=endpoint,
        tag=tag,
        group_by=group_by,
    )
    return await services.answer("usage", "timeseries", params)


@get(
    "/usage/costs",
    summary="Spend against the budgets, by model and day",
    guards=[read_guard],
    opt=CACHED,
)
async def usage_costs(services: Services) -> Response[UsageCosts]:
    """Today, this month, by model, the last 30 days, unpriced models and the forecast."""
    return await services.answer("usage", "costs")


@get(
    "/usage/budget",
    summary="May a call be made? The budgets covering it and whether one is used up",
    guards=[read_guard],
    opt=CACHED,
)
async def usage_budget(
    services: Services,
    user_id: Annotated[str | None, QueryParameter(max_length=256)] = None,
    model: Annotated[str | None, QueryParameter(max_length=128)] = None,
    endpoint: Annotated[str | None, QueryParameter(max_length=512)] = None,
    tag: Annotated[str | None, QueryParameter(max_length=64)] = None,
) -> Response[BudgetAnswer]:
    """`allowed` is false when an enforced budget (STOCKPILOT_BUDGETS) covering the call is
    used up for its current day or month; `reason` names it."""
    params = BudgetParams(user_id=user_id, model=model, endpoint=endpoint, tag=tag)
    return await services.answer("usage", "budget", params)


@get("/usage/alerts", summary="Recent alerts of every source", guards=[read_guard], opt=CACHED)
async def usage_alerts(
    services: Services, limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100
) -> Response[AlertList]:
    """The newest `limit` (1–1000) alerts and how many are held."""
    return await services.answer("usage", "alerts", AlertsParams(limit=limit))


@route("/usage/records", http_method=["OPTIONS"], include_in_schema=False)
async def usage_records_options() -> Response[None]:
    """`Allow` for the path with two handlers (GET the log, POST ingest). Litestar builds the
    automatic OPTIONS answer from the handlers registered before the second one and keeps it
    when that one joins the path, so it would name one method only (schemathesis ST205)."""
    return Response(content=None, status_code=HTTP_204_NO_CONTENT, headers={"Allow": _ALLOW})


_ALLOW = "GET, OPTIONS, POST"


@get(
    "/usage/records",
    summary="The spend log: recorded LLM calls with their cost, newest first",
    guards=[read_guard],
)
async def usage_records_log(
    services: Services,
    start: Annotated[str | None, QueryParameter(max_length=64)] = None,
    end: Annotated[str | None, QueryParameter(max_length=64)] = None,
    user_id: UserQuery = None,
    model: ModelQuery = None,
    endpoint: EndpointQuery = None,
    tag: TagQuery = None,
    status: FromQuery[StatusFilter | None] = None,
    limit: Annotated[int, QueryParameter(ge=1, le=MAX_LIMIT)] = DEFAULT_LIMIT,
    cursor: Annotated[
        str | None,
        QueryParameter(min_length=1, max_length=CURSOR_MAX_LENGTH, pattern=CURSOR_PATTERN),
    ] = None,
) -> Response[SpendLog]:
    """Read from STOCKPILOT_USAGE itself. `start`/`end`: a date (whole days in
    STOCKPILOT_TZ, `end` inclusive) or an RFC 3339 time (`end` exclusive), on occurred_at.
    `model` also matches its dated names. A page reads a bounded part of the stream: it may
    hold fewer than `limit` records; follow `next_cursor` (same filters) until it is null."""
    params = SpendLogParams(
        start=_moment_param("start", start),
        end=_moment_param("end", end),
        user_id=user_id,
        model=model,
        endpoint=endpoint,
        tag=tag,
        status=status,
        limit=limit,
        cursor=cursor,
    )
    return await services.answer("usage", "records", params, timeout=RECORDS_TIMEOUT_S)


@post(
    "/usage/reset",
    summary="Restart usage statistics from zero (admin)",
    guards=[admin_guard],
    status_code=HTTP_200_OK,
)
async def usage_reset(request: Request[Any, Any, Any], services: Services) -> Response[ResetAnswer]:
    """Appends `usage.reset`; the stream keeps every event (replay gives the same state)."""
    body = await request.body()
    # No body: every default; anything else must be a JSON object (whitespace alone is not
    # JSON, as the batch routes' optional bodies answer too).
    reset = _decode_body(body, ResetBody) if body else ResetBody()
    if reset.scope != "all":
        raise InvalidRequestError(
            f"body field 'scope': only 'all' is supported, got {reset.scope!r}"
        )
    params = ResetParams(scope="all", reason=reset.reason, actor="admin")
    return await services.answer("usage", "reset", params)


@post(
    "/usage/records",
    summary="Ingest LLM usage records (one or a list of up to 1,000)",
    guards=[ingest_guard],
    status_code=HTTP_202_ACCEPTED,
)
async def usage_records(
    request: Request[Any, Any, Any], services: Services, clock: GatewayClock
) -> Response[IngestAnswer]:
    """Each record is validated on its own: accepted, duplicates, rejected [{index, reason}].

    A single record (a JSON object, not a list) that is refused makes the request a 422 with
    the reason as `detail`; a list answers 202 and names each refused record.
    """
    received_at = clock.now()
    body = await request.body()
    # Decoded here for what is wrong with the body as a whole (its JSON, its shape, how many
    # records), each record kept as its posted bytes: the service decodes each once. Records
    # decoded into Python objects here cost ~1.1 ms a list of 1,000 (its shape alone 0.24),
    # a third of the gateway's CPU for the request under HTTP ingest.
    shape = _decode_body(
        body, _BodyShape, wrong_type="expected a record (JSON object) or a list of records"
    )
    records = [msgspec.Raw(body)] if isinstance(shape, dict) else shape
    if len(records) > MAX_RECORDS:
        raise InvalidRequestError(
            f"body: at most {MAX_RECORDS} records per request, got {len(records)}"
        )
    limit = _forward_limit(services)
    if isinstance(shape, list) and len(body) <= limit:
        # The usual list: one request, and the service's answer is the HTTP answer.
        params = IngestParams(records=msgspec.Raw(body), received_at=received_at)
        answered = await services.query_raw("usage", "ingest", params, timeout=INGEST_TIMEOUT_S)
        as_posted: Response[Any] = Response(
            answered, status_code=HTTP_202_ACCEPTED, media_type=MediaType.JSON
        )
        return as_posted
    answer = IngestAnswer(accepted=0, duplicates=0, rejected=[], ids=[])
    for part in _parts(records, 0, received_at, limit):
        if isinstance(part, Rejected):
            answer.rejected.append(part)
            continue
        got = await services.query("usage", "ingest", IngestAnswer, part, timeout=INGEST_TIMEOUT_S)
        answer.accepted += got.accepted
        answer.duplicates += got.duplicates
        answer.rejected.extend(got.rejected)
        answer.ids.extend(got.ids)
    if isinstance(shape, dict) and answer.rejected:
        # One record posted on its own is the whole body: refused, the request is a 422.
        raise InvalidRequestError(f"body: {answer.rejected[0].reason}")
    return Response(answer, status_code=HTTP_202_ACCEPTED)


def _decode_body(body: bytes, kind: Any, *, wrong_type: str = "") -> Any:
    """`body` decoded as `kind`; InvalidRequestError saying what is wrong (`wrong_type` for
    valid JSON of the wrong content, when the type's own message would say it less well)."""
    try:
        return msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:  # a DecodeError too: valid JSON, wrong content
        raise InvalidRequestError(f"body: {wrong_type or exc}") from None
    except msgspec.DecodeError as exc:
        raise InvalidRequestError(f"body: not valid JSON ({exc})") from None
    except RecursionError:
        raise InvalidRequestError(
            "body: JSON nested too deeply (thousands of levels); send flat records"
        ) from None
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"body: {describe_not_utf8(exc)}") from None


def _forward_limit(services: Services) -> int:
    """The most bytes of records one forwarded request may carry: FORWARD_MAX_BYTES, less
    on a server whose max_payload is smaller (room left for the rest of the request)."""
    max_payload = services.nc.max_payload if services.nc is not None else 0
    if max_payload <= 0:
        return FORWARD_MAX_BYTES
    return min(FORWARD_MAX_BYTES, max_payload - FORWARD_HEADROOM_BYTES)


def _parts(
    records: list[Any], offset: int, received_at: datetime, limit: int
) -> list[IngestParams | Rejected]:
    """Split so every forwarded request fits in one NATS message; a record too large for one
    on its own is refused here (forwarded, NATS would refuse the request on every retry)."""
    encoded = _encode(records)
    if len(encoded) <= limit:
        part = IngestParams(records=msgspec.Raw(encoded), received_at=received_at, offset=offset)
        return [part]
    if len(records) == 1:
        reason = (
            f"the record is {len(encoded) - 2} bytes, over what one NATS message to the usage "
            f"service carries here ({limit} bytes)"
        )
        return [Rejected(index=offset, reason=reason)]
    half = len(records) // 2
    return [
        *_parts(records[:half], offset, received_at, limit),
        *_parts(records[half:], offset + half, received_at, limit),
    ]


router = Router(
    path="/api/v1",
    route_handlers=[
        usage_stats,
        usage_timeseries,
        usage_costs,
        usage_budget,
        usage_alerts,
        # Before both handlers of the path: see its docstring.
        usage_records_options,
        usage_records_log,
        usage_reset,
        usage_records,
    ],
)
