"""`GET /api/v1/alerts/stream`: new alerts as Server-Sent Events, resumable with Last-Event-ID.

Each event is `id: <stream sequence>`, `event: alert`, `data: <the alert JSON as stored>`.
A client that reconnects with `Last-Event-ID: N` (browsers do it by themselves) gets every
alert after N, in order, without gaps or repeats; `?since=N` does the same for a first
connection (or `?since=<RFC 3339 time>`); with neither it gets the alerts raised from now on.
A comment line every HEARTBEAT_S seconds keeps proxies from closing an idle stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator
from datetime import datetime
from typing import Annotated, Any

from litestar import Request, Router, get
from litestar.params import Parameter
from litestar.response import ServerSentEvent
from litestar.response.sse import ServerSentEventMessage
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api

from gateway.auth import read_guard
from gateway.services import Services
from shared.bus import STREAMS
from shared.errors import InvalidRequestError, UnavailableError

log = logging.getLogger("stockpilot.gateway")

HEARTBEAT_S = 15.0
# Alerts buffered per client; a client that falls this far behind is disconnected and
# resumes with Last-Event-ID, so it loses nothing.
CLIENT_BUFFER = 10_000
ALERTS_SUBJECT = "stockpilot.alerts.>"
_CLOSE = object()
_releasing: set[asyncio.Task[None]] = set()


def _start_config(last_event_id: str | None, since: str | None) -> js_api.ConsumerConfig:
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
        return js_api.ConsumerConfig(
            deliver_policy=js_api.DeliverPolicy.BY_START_TIME, opt_start_time=moment
        )
    return js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.NEW)


def _after_seq(seq: int, what: str) -> js_api.ConsumerConfig:
    if seq < 0:
        raise InvalidRequestError(f"{what} must not be negative")
    return js_api.ConsumerConfig(
        deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=seq + 1
    )


async def _release(js: JetStreamContext, subscription: Any) -> None:
    """Unsubscribe and delete the client's consumer now rather than after its threshold."""
    with contextlib.suppress(Exception):
        info = await asyncio.wait_for(subscription.consumer_info(), timeout=1)
        await subscription.unsubscribe()
        await asyncio.wait_for(js.delete_consumer(info.stream_name, info.name), timeout=1)
    with contextlib.suppress(Exception):
        await subscription.unsubscribe()


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
    config = _start_config(request.headers.get("last-event-id"), since)
    queue: asyncio.Queue[Msg | object] = asyncio.Queue()

    overflowed = False

    async def on_message(msg: Msg) -> None:
        nonlocal overflowed
        if overflowed:
            return
        if queue.qsize() >= CLIENT_BUFFER:
            overflowed = True
            queue.put_nowait(_CLOSE)
            return
        queue.put_nowait(msg)

    try:
        js = nc.jetstream()
        if config.opt_start_seq is not None:
            # A Last-Event-ID from before the stream was rebuilt (restored, imported) may lie
            # past its end: start after the last stored alert, not at a sequence to come.
            last = (await js.stream_info(STREAMS["alerts"].name)).state.last_seq
            config.opt_start_seq = min(config.opt_start_seq, last + 1)
        subscription = await js.subscribe(
            ALERTS_SUBJECT,
            stream=STREAMS["alerts"].name,
            cb=on_message,
            ordered_consumer=True,
            config=config,
            idle_heartbeat=5.0,
            # Should the clean-up below not run (the process dies), the server drops it.
            inactive_threshold=30.0,
        )
    except Exception as exc:
        if type(exc).__module__.startswith("nats"):
            raise UnavailableError(f"the alert stream cannot be followed: {exc}") from None
        raise

    async def events() -> AsyncGenerator[ServerSentEventMessage, None]:
        try:
            while True:
                try:
                    item = await asyncio.wait_for(queue.get(), timeout=HEARTBEAT_S)
                except TimeoutError:
                    yield ServerSentEventMessage(data=None, comment="heartbeat")
                    continue
                if item is _CLOSE or not isinstance(item, Msg):
                    return
                yield ServerSentEventMessage(
                    id=item.metadata.sequence.stream,
                    event="alert",
                    data=item.data.decode("utf-8", errors="replace"),
                )
        finally:
            # The response's cancel scope cancels every await in here: release in a task.
            task = asyncio.create_task(_release(js, subscription))
            _releasing.add(task)
            task.add_done_callback(_releasing.discard)

    return ServerSentEvent(events(), headers={"Cache-Control": "no-cache"})


router = Router(path="/api/v1", route_handlers=[alert_stream])
