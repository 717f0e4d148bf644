"""`GET /api/v1/alerts/stream`: new alerts as Server-Sent Events, resumable with Last-Event-ID.

Each event is `id: <stream sequence>`, `event: alert`, `data: <the alert JSON as stored>`.
A client that reconnects with `Last-Event-ID: N` (browsers do it by themselves) gets every
alert after N, in order, without gaps or repeats; `?since=N` does the same for a first
connection (or `?since=<RFC 3339 time>`); with neither it gets the alerts raised from now on.
A comment line every HEARTBEAT_S seconds keeps proxies from closing an idle stream.

Every client of one gateway process shares one JetStream consumer, at most
STOCKPILOT_SSE_MAX_CLIENTS of them (503 beyond), each with a bounded buffer (a client that
stops reading is dropped and resumes with Last-Event-ID): see gateway.alert_fanout.
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import AsyncGenerator
from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Request, Router, get
from litestar.params import Parameter
from litestar.response import ServerSentEvent
from litestar.response.sse import ServerSentEventMessage
from nats.aio.client import Client as Nats

from gateway.alert_fanout import AlertFanout, StoredAlert, backlog, first_seq_from
from gateway.auth import read_guard
from gateway.http_server import ABORT_EXTENSION
from gateway.services import Services
from shared.errors import InvalidRequestError, UnavailableError
from shared.nats_errors import is_nats_error, translate
from shared.streams import STREAMS

log = logging.getLogger("stockpilot.gateway")

HEARTBEAT_S = 15.0


class _Start(msgspec.Struct, frozen=True):
    """Where a client's stream starts: after a sequence, at a time, or now (neither)."""

    after: int | None = None
    at: datetime | None = None


def _start(last_event_id: str | None, since: str | None) -> _Start:
    """Where the client's stream starts."""
    if last_event_id is not None and last_event_id.strip():
        try:
            seq = int(last_event_id.strip())
        except ValueError:
            raise InvalidRequestError(
                f"Last-Event-ID must be an alert stream sequence, got {last_event_id!r}"
            ) from None
        return _after_seq(seq, "Last-Event-ID")
    if since is not None and since.strip():
        text = since.strip()
        if text.isdigit():
            return _after_seq(int(text), "since")
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise InvalidRequestError(
                f"since must be a stream sequence or an RFC 3339 time, got {since!r}"
            ) from None
        if moment.tzinfo is None:
            raise InvalidRequestError("since must carry a time zone (e.g. 2026-11-26T09:00:00Z)")
        return _Start(at=moment)
    return _Start()


def _after_seq(seq: int, what: str) -> _Start:
    if seq < 0:
        raise InvalidRequestError(f"{what} must not be negative")
    return _Start(after=seq)


async def _first_to_send(nc: Nats, start: _Start, live_from: int) -> int:
    """The sequence the client has seen up to: its backlog is what lies after it."""
    if start.after is not None:
        # A Last-Event-ID from before the stream was rebuilt (restored, imported) may lie
        # past its end: start after the last stored alert, not at a sequence to come.
        info = await nc.jetstream().stream_info(STREAMS["alerts"].name)
        last: int = info.state.last_seq
        return min(start.after, max(last, live_from))
    if start.at is not None:
        first = await first_seq_from(nc, start.at)
        return live_from if first is None else min(first - 1, live_from)
    return live_from


def _sse(item: StoredAlert) -> ServerSentEventMessage:
    return ServerSentEventMessage(
        id=item.seq, event="alert", data=item.data.decode("utf-8", errors="replace")
    )


@get(
    "/alerts/stream",
    summary="New alerts as Server-Sent Events (resumable with Last-Event-ID)",
    guards=[read_guard],
    media_type="text/event-stream",
)
async def alert_stream(
    request: Request[Any, Any, Any],
    services: Services,
    since: Annotated[
        str | None,
        Parameter(
            description="Start after this alert stream sequence, or at this RFC 3339 time; "
            "ignored when a Last-Event-ID header is sent"
        ),
    ] = None,
) -> ServerSentEvent:
    """One `alert` event per alert; `id` is its stream sequence; comments as heartbeats."""
    nc = services.nc
    if nc is None or not nc.is_connected:
        raise UnavailableError("the alert stream cannot be followed: NATS is unavailable")
    start = _start(request.headers.get("last-event-id"), since)
    fanout: AlertFanout = request.app.state.alert_fanout
    # gateway.http_server gives a way to close the connection of a client that stopped reading.
    extensions: dict[Any, Any] = request.scope.get("extensions") or {}
    abort = extensions.get(ABORT_EXTENSION)
    if not callable(abort):
        abort = None
    try:
        client, live_from = await fanout.join(nc, abort)
    except Exception as exc:
        if is_nats_error(exc):
            raise translate(exc, "the alert stream cannot be followed") from None
        raise
    try:
        seen = await _first_to_send(nc, start, live_from)
    except Exception as exc:
        fanout.leave(client)
        if is_nats_error(exc):
            raise translate(exc, "the alert stream cannot be followed") from None
        raise
    js = nc.jetstream()

    async def events() -> AsyncGenerator[ServerSentEventMessage, None]:
        sent = seen
        try:
            if sent < live_from:
                try:
                    async for item in backlog(js, sent, live_from):
                        if client.ended:
                            return
                        yield _sse(item)
                        sent = item.seq
                except Exception as exc:
                    if not is_nats_error(exc):
                        raise
                    # End this response; the client resumes after the last event it got.
                    log.warning("alert stream: reading the backlog failed: %s", exc)
                    return
                sent = max(sent, live_from)  # the rest of the backlog was deleted
            while True:
                live = await client.next(HEARTBEAT_S)
                if client.ended:
                    return
                if live is None:
                    yield ServerSentEventMessage(data=None, comment="heartbeat")
                elif live.seq > sent:
                    yield _sse(live)
                    sent = live.seq
        finally:
            fanout.leave(client)

    stream = events()
    # Should the response end before the generator ever runs (the client left at once),
    # its `finally` never runs: give the slot back when the generator goes.
    weakref.finalize(stream, fanout.leave, client).atexit = False
    return ServerSentEvent(stream, headers={"Cache-Control": "no-cache"})


router = Router(path="/api/v1", route_handlers=[alert_stream])
