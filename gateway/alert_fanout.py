"""One JetStream consumer per gateway process for every SSE client of the alert stream.

Each SSE client used to open its own ordered consumer on STOCKPILOT_ALERTS, with an
unbounded buffer behind it: one client could take all the stream's consumer slots, and 50
clients that never read grew the gateway from 60 MB to 659 MB. Now:

- `AlertFanout` reads the stream with one ordered consumer while it has clients (started by
  the first, stopped after the last) and hands every alert to each client's buffer;
- a client's buffer holds at most STOCKPILOT_SSE_CLIENT_BUFFER_BYTES: a client that does not
  read is dropped when it fills (its buffer freed, its connection closed) and resumes with
  Last-Event-ID, losing nothing;
- at most STOCKPILOT_SSE_MAX_CLIENTS clients per process: the next one gets 503.
- A client resuming from before the fan-out's position reads that backlog first, one stored
  message at a time as it sends them (`backlog`: direct reads, no consumer), then the live
  alerts after the position it joined at, so nothing is missed or repeated.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any

from nats.aio.client import Client as Nats
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import NotFoundError

from shared.errors import UnavailableError
from shared.streams import STREAMS

log = logging.getLogger("stockpilot.gateway")

STREAM = STREAMS["alerts"].name
ALERTS_SUBJECT = "stockpilot.alerts.>"
# Per buffered alert, on top of its bytes: the item and its queue slot.
ITEM_OVERHEAD = 64


class StoredAlert:
    """One alert as stored: its stream sequence and its JSON."""

    __slots__ = ("data", "seq")

    def __init__(self, seq: int, data: bytes) -> None:
        self.seq = seq
        self.data = data


class AlertClient:
    """One SSE client's bounded buffer of live alerts."""

    def __init__(self, buffer_bytes: int, on_drop: Callable[[], None] | None) -> None:
        self.buffer_bytes = buffer_bytes
        self.on_drop = on_drop
        self.items: deque[StoredAlert] = deque()
        self.held = 0
        self.dropped = False
        self.closed = False
        self._ready = asyncio.Event()

    def offer(self, item: StoredAlert) -> None:
        """Buffer a live alert; past the bound the client is dropped instead."""
        if self.dropped or self.closed:
            return
        size = len(item.data) + ITEM_OVERHEAD
        if self.held + size > self.buffer_bytes:
            self.dropped = True
            self.items.clear()
            self.held = 0
            self._ready.set()
            if self.on_drop is not None:
                # It does not read: any write to it, even the response's end, would wait on
                # it forever. Close its connection (gateway.http_server.ABORT_EXTENSION).
                self.on_drop()
            return
        self.items.append(item)
        self.held += size
        self._ready.set()

    def close(self) -> None:
        """End the client's stream (the gateway is stopping)."""
        self.closed = True
        self._ready.set()

    async def next(self, timeout: float) -> StoredAlert | None:
        """The next live alert; None after `timeout` s without one or once dropped or closed."""
        if not self.items and not (self.dropped or self.closed):
            self._ready.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), timeout)
        if self.items and not (self.dropped or self.closed):
            item = self.items.popleft()
            self.held -= len(item.data) + ITEM_OVERHEAD
            return item
        return None

    @property
    def ended(self) -> bool:
        """Dropped for not reading, or closed by the gateway."""
        return self.dropped or self.closed


class AlertFanout:
    """The gateway process's one reader of STOCKPILOT_ALERTS and its SSE clients."""

    def __init__(self, max_clients: int, buffer_bytes: int) -> None:
        self.max_clients = max_clients
        self.buffer_bytes = buffer_bytes
        self.clients: set[AlertClient] = set()
        # Sequence of the last alert handed to the clients: a client joining now gets every
        # alert after it live.
        self.position = 0
        self.dropped_total = 0
        self._subscription: Any = None
        self._js: JetStreamContext | None = None
        self._lock = asyncio.Lock()
        self._stopping: set[asyncio.Task[None]] = set()

    async def join(self, nc: Nats, on_drop: Callable[[], None] | None) -> tuple[AlertClient, int]:
        """A new client and the position it gets live alerts after; 503 when full."""
        if len(self.clients) >= self.max_clients:
            raise UnavailableError(self._full())
        async with self._lock:
            if len(self.clients) >= self.max_clients:  # others joined while this one waited
                raise UnavailableError(self._full())
            if self._subscription is None:
                await self._start(nc)
            client = AlertClient(self.buffer_bytes, on_drop)
            self.clients.add(client)
            return client, self.position

    def leave(self, client: AlertClient) -> None:
        """The client's stream ended; the last one out stops the consumer."""
        if client not in self.clients:
            return
        self.clients.discard(client)
        if client.dropped:
            self.dropped_total += 1
        if not self.clients:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return  # the loop is gone: so is the process, and the consumer with it
            task = loop.create_task(self._stop_if_idle())
            self._stopping.add(task)
            task.add_done_callback(self._stopping.discard)

    async def close(self) -> None:
        """End every client's stream and the consumer (the gateway is stopping)."""
        for client in list(self.clients):
            client.close()
        self.clients.clear()
        async with self._lock:
            await self._unsubscribe()
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)

    def _full(self) -> str:
        return (
            f"the alert stream has its maximum of {self.max_clients} clients on this gateway "
            "(STOCKPILOT_SSE_MAX_CLIENTS); retry later, or read stockpilot.alerts.> from NATS"
        )

    async def _start(self, nc: Nats) -> None:
        js = nc.jetstream()
        last = (await js.stream_info(STREAM)).state.last_seq
        self.position = last
        self._js = js
        self._subscription = await js.subscribe(
            ALERTS_SUBJECT,
            stream=STREAM,
            cb=self._deliver,
            ordered_consumer=True,
            config=js_api.ConsumerConfig(
                deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=last + 1
            ),
            idle_heartbeat=5.0,
            # Should the clean-up in _unsubscribe not run (the process dies), the server
            # drops the consumer.
            inactive_threshold=30.0,
        )

    async def _deliver(self, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        if seq <= self.position:
            return  # the ordered consumer restarted and sent it again
        self.position = seq
        item = StoredAlert(seq, msg.data)
        for client in list(self.clients):
            client.offer(item)

    async def _stop_if_idle(self) -> None:
        async with self._lock:
            if not self.clients:
                await self._unsubscribe()

    async def _unsubscribe(self) -> None:
        subscription, js = self._subscription, self._js
        self._subscription = None
        if subscription is None or js is None:
            return
        # Delete the consumer now rather than after its inactive threshold.
        with contextlib.suppress(Exception):
            info = await asyncio.wait_for(subscription.consumer_info(), timeout=1)
            await subscription.unsubscribe()
            await asyncio.wait_for(js.delete_consumer(info.stream_name, info.name), timeout=1)
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()


async def backlog(js: JetStreamContext, after: int, upto: int) -> AsyncIterator[StoredAlert]:
    """The stored alerts with `after` < sequence <= `upto`, read one at a time as consumed."""
    seq = after + 1
    while seq <= upto:
        try:
            msg = await js.get_msg(STREAM, seq, subject=ALERTS_SUBJECT, next=True)
        except NotFoundError:
            return
        if msg.seq is None or msg.seq > upto:
            return
        yield StoredAlert(msg.seq, msg.data or b"")
        seq = msg.seq + 1


async def first_seq_from(nc: Nats, moment: datetime) -> int | None:
    """Sequence of the first alert stored at or after `moment`; None when there is none."""
    request = json.dumps({"start_time": moment.isoformat()}).encode()
    reply = await nc.request(f"$JS.API.STREAM.MSG.GET.{STREAM}", request, timeout=2)
    answer = json.loads(reply.data)
    error = answer.get("error")
    if isinstance(error, dict) and error.get("code") != 404:
        raise UnavailableError(
            f"the alert stream cannot be read from a time: {error.get('description')}"
        )
    message = answer.get("message")
    if not isinstance(message, dict) or not isinstance(message.get("seq"), int):
        return None
    return int(message["seq"])
