"""The usage client for StockPilot's own code: time an LLM call, record it, never lose it.

Why one module of over 300 lines: it is one object, `UsageRecorder`, whose buffer, sender
loop and spool hand events to one another; the call timing (services.usage.calls) and the
spool (services.usage.spool) already live apart, and what is left shares the recorder's state.

    recorder = await UsageRecorder.connect(settings)
    response = await recorder.track(
        client.chat.completions.create(model="gpt-4o-mini", messages=...),
        model="gpt-4o-mini", endpoint="/api/v1/analysis", user_id=user.id,
    )
    ...
    await recorder.close()

Every call becomes a `usage.recorded` event published to JetStream with `Nats-Msg-Id` = its
id and an acknowledgement awaited. Events wait in a bounded in-memory buffer until their
acknowledgement comes; while NATS is away (a restart, a failover) the sender keeps retrying
from the oldest unacknowledged one with backoff, so an outage shorter than the buffer lasts
loses nothing, and a retried publish is stored once. When the buffer is full the new event
is dropped, counted and logged.

Sending is pipelined: windows of up to SEND_WINDOW events go out one after another, up to
MAX_IN_FLIGHT unacknowledged, through `shared.transport.JetStreamPublisher`: over its
accelerator (a fraction of nats-py's CPU per event, which the application's own process pays)
unless STOCKPILOT_NATS_ACCELERATOR is off or it cannot run here (TLS, NKey or JWT
credentials), else nats-py's `publish_async`.

With a spool (`services.usage.spool`, on by default for `connect`) nothing recorded is lost
to an outage longer than the buffer, a stream that refuses writes (its store full, its
limits reached) or a stop before the acknowledgements came: every event is appended to a
local file as it is recorded, the memory buffer is only the head of it, and what JetStream
has acknowledged is marked done there. What is left at close waits on disk and goes out at
the next start, in order, with the same Msg-Ids. Only a spool at its bound drops (counted,
logged as an error).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import msgspec
from nats.aio.client import Client as NATS

from services.usage.budget_client import BudgetChecker
from services.usage.calls import Call, Labels, current_call, failure_event, success_event
from services.usage.contract import SUBJECT_RECORDED, BudgetAnswer, UsageRecorded
from services.usage.spool import DEFAULT_MAX_BYTES, Position, Spool, SpoolError
from shared import connection
from shared.clock import SYSTEM_CLOCK, Clock
from shared.publish import encode_event
from shared.settings import CommonSettings
from shared.streams import MAX_EVENT_BYTES
from shared.transport import ACCELERATED, JetStreamPublisher, Published, TransportPath

log = logging.getLogger("stockpilot.usage.client")

__all__ = ["RecorderSettings", "UsageRecorder", "failure_event", "open_spool", "success_event"]

T = TypeVar("T")

DEFAULT_BUFFER = 10_000
# Backoff between attempts while NATS is away: short first, never longer than this.
MAX_BACKOFF_S = 2.0
# Events per publish window (one write, one future), and unacknowledged events at most.
SEND_WINDOW = 256
MAX_IN_FLIGHT = 4096
# An encoded event larger than this is not sent (room left for the Nats-Msg-Id header).
MAX_PAYLOAD = MAX_EVENT_BYTES - 1024
# After the accelerator's connection could not be opened, nats-py publishes this long.
BARE_RETRY_S = 30.0
# While events wait in the spool, it is made durable (fsync) at most this often.
SPOOL_SYNC_S = 1.0


class RecorderSettings(CommonSettings, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The common settings plus where the usage client spools what NATS has not taken yet."""

    # STOCKPILOT_USAGE_SPOOL_DIR: unset -> <data dir>/usage-spool; "off" -> no spool.
    usage_spool_dir: str | None = None
    # STOCKPILOT_USAGE_SPOOL_MAX_BYTES: at this size new calls are dropped (counted, logged).
    usage_spool_max_bytes: Annotated[int, msgspec.Meta(ge=64 * 1024)] = DEFAULT_MAX_BYTES


def open_spool(settings: CommonSettings) -> Spool | None:
    """The spool `settings` ask for (a free slot under its directory); None when off or when
    it cannot be opened (logged: the application goes on, unspooled)."""
    spool_dir = getattr(settings, "usage_spool_dir", None)
    max_bytes = getattr(settings, "usage_spool_max_bytes", DEFAULT_MAX_BYTES)
    if spool_dir == "off":
        return None
    root = Path(spool_dir) if spool_dir else Path(settings.data_dir) / "usage-spool"
    try:
        return Spool.open_slot(root, max_bytes)
    except (SpoolError, OSError) as exc:
        log.error(
            "usage client runs without a spool (calls NATS cannot take are dropped): %s; "
            "set STOCKPILOT_USAGE_SPOOL_DIR to a writable directory",
            exc,
        )
        return None


class UsageRecorder:
    """Records LLM calls as usage events; buffered, retried, acknowledged by JetStream."""

    def __init__(
        self,
        nc: NATS,
        *,
        buffer_size: int = DEFAULT_BUFFER,
        publish_timeout: float = 2.0,
        owns_connection: bool = False,
        bare: bool = True,
        clock: Clock = SYSTEM_CLOCK,
        spool: Spool | None = None,
        budgets: BudgetChecker | None = None,
    ) -> None:
        if buffer_size < 1:
            raise ValueError("buffer_size must be at least 1")
        self._nc = nc
        self._js = nc.jetstream()
        # Every event not yet acknowledged, oldest first; the first `_sent` are in flight,
        # in the windows of `_in_flight` (their sizes and outcomes), in order.
        self._buffer: collections.deque[tuple[str, bytes]] = collections.deque()  # id, JSON
        # With a spool: where each buffered event ends in it (acknowledged -> committed).
        self._positions: collections.deque[Position] = collections.deque()
        self._spool = spool
        self._synced_at = 0.0
        self._closed = False
        self._sent = 0
        self._in_flight: collections.deque[tuple[int, asyncio.Future[Published]]] = (
            collections.deque()
        )
        # Publish over the accelerator when it works here (False: nats-py only).
        self._publisher = JetStreamPublisher(
            nc,
            accelerated=bare,
            name="stockpilot-usage-client",
            timeout=publish_timeout,
            retry_s=BARE_RETRY_S,
        )
        self._last_connection = ""
        self._capacity = buffer_size
        self._timeout = publish_timeout
        self._owns = owns_connection
        # Stamps each call's occurred_at (tests hand a ManualClock; durations stay monotonic).
        self._clock = clock
        self._wakeup = asyncio.Event()
        self._idle = asyncio.Event()
        if not self.pending:  # a spool left by an earlier run is something to send
            self._idle.set()
        self._sender: asyncio.Task[None] | None = None
        # The loop and thread the recorder runs on: a call recorded from another thread (a
        # synchronous OpenAI client in a worker thread) is handed over to it.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: int | None = None
        self.published = 0
        self.duplicates = 0
        self.dropped = 0
        self.spool_dropped = 0
        self.retries = 0
        # Budget checks (services.usage.budget_client): answers of the gateway, cached 1 s.
        self.budgets = budgets

    @classmethod
    async def connect(
        cls, settings: CommonSettings, name: str = "stockpilot-usage-client", **options: Any
    ) -> UsageRecorder:
        """A started recorder on its own NATS connection (reconnecting forever), spooling
        under the settings' spool directory (see RecorderSettings) unless `spool` is given."""
        if "spool" not in options:
            options["spool"] = open_spool(settings)
        options.setdefault("bare", settings.nats_accelerator == "on")
        nc = await connection.connect(settings, name)
        recorder = cls(nc, owns_connection=True, **options)
        recorder.start()
        return recorder

    async def check_budget(
        self,
        *,
        user_id: str | None = None,
        model: str | None = None,
        endpoint: str | None = None,
        tag: str | None = None,
    ) -> BudgetAnswer:
        """May such a call be made? Raises BudgetExceeded when an enforced budget covering
        it is used up (see services.usage.budget_client)."""
        if self.budgets is None:
            raise RuntimeError("no budget checker: UsageRecorder(..., budgets=BudgetChecker(...))")
        return await self.budgets.check_budget(
            user_id=user_id, model=model, endpoint=endpoint, tag=tag
        )

    @property
    def connection(self) -> str:
        """What the last window went over: "bare" (the accelerator), "nats-py", or ""
        before the first."""
        return self._last_connection

    @property
    def path(self) -> TransportPath:
        """The transport path publishing now (shared.transport): "accelerated" or "nats-py"."""
        return self._publisher.path

    @property
    def clock(self) -> Clock:
        """The clock that stamps each call's occurred_at."""
        return self._clock

    @property
    def pending(self) -> int:
        """Events waiting to be acknowledged (in memory and in the spool)."""
        return len(self._buffer) + (self._spool.unread if self._spool is not None else 0)

    @property
    def spool_path(self) -> Path | None:
        """The spool directory in use, if any."""
        return self._spool.directory if self._spool is not None else None

    def start(self) -> None:
        """Start the sender task (idempotent)."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_forever(), name="usage-recorder")

    async def close(self, timeout: float = 10.0) -> None:
        """Wait (up to `timeout`) until the buffer is sent, then stop; what is left stays in
        the spool for the next start (without a spool it is lost, and logged)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.flush(), timeout)
        if self._sender is not None:
            # Python 3.11's wait_for loses a cancellation that arrives as the awaited window
            # completes, and the sender then sends on (awaiting it would hang this close).
            # So cancel until it has ended; awaiting it via wait() keeps a cancellation of
            # close itself apart from the sender's.
            while not self._sender.done():
                self._sender.cancel()
                await asyncio.wait({self._sender}, timeout=0.1)
            if not self._sender.cancelled() and self._sender.exception() is not None:
                log.error("usage sender had failed", exc_info=self._sender.exception())
        self._abandon_in_flight()
        unsent = self.pending
        if self._spool is not None:
            self._spool.close()
            if unsent:
                log.warning(
                    "usage recorder closed with %d events unsent: kept in %s, sent at the next "
                    "start",
                    unsent,
                    self._spool.directory,
                )
        elif unsent:
            log.error("usage recorder closed with %d events unsent (no spool: lost)", unsent)
        if self._owns:
            # Bounded and closing even while NATS is away (which is when a close spools).
            await connection.drain_or_close(self._nc)

    async def flush(self) -> None:
        """Wait until every buffered event is acknowledged."""
        await self._idle.wait()

    async def __aenter__(self) -> UsageRecorder:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ----- recording -----------------------------------------------------------------------

    def record(self, event: UsageRecorded) -> bool:
        """Keep one event for sending; False (counted, logged) when there is no room for it.

        Safe from any thread: from another thread than the recorder's the event is handed to
        its loop (and True means handed over)."""
        if self._thread is not None and threading.get_ident() != self._thread:
            assert self._loop is not None
            try:
                self._loop.call_soon_threadsafe(self.record, event)
            except RuntimeError:  # the loop is closed: the recorder is gone
                self.dropped += 1
                log.error("usage call %s recorded after the recorder's loop ended", event.id[:80])
                return False
            return True
        if self._closed:
            self.dropped += 1
            log.error("usage call %s recorded after the recorder was closed", event.id[:80])
            return False
        if self._spool is None and len(self._buffer) >= self._capacity:
            self.dropped += 1
            if self.dropped == 1 or self.dropped % 1000 == 0:
                log.error(
                    "usage buffer full (%d events): dropped %d so far",
                    self._capacity,
                    self.dropped,
                )
            return False
        payload = encode_event(event)
        if len(payload) > MAX_PAYLOAD:
            # The stream would refuse it (and nats-server drop the connection carrying it):
            # sent, it would be retried forever and hold up every event behind it.
            self.dropped += 1
            log.error(
                "usage event %s dropped: %d bytes, over the %d-byte limit of a message",
                event.id[:80],
                len(payload),
                MAX_PAYLOAD,
            )
            return False
        if self._spool is not None:
            # In memory too only when nothing older waits in the spool (order) and there is room.
            held = not self._spool.unread and len(self._buffer) < self._capacity
            position = self._spool.append(payload, held=held)
            if position is None:
                self._spool_full(event)
                return False
            if held:
                self._buffer.append((event.id, payload))
                self._positions.append(position)
        else:
            self._buffer.append((event.id, payload))
        self._idle.clear()
        self._wakeup.set()
        return True

    def _spool_full(self, event: UsageRecorded) -> None:
        assert self._spool is not None
        self.dropped += 1
        self.spool_dropped += 1
        if self.spool_dropped == 1 or self.spool_dropped % 1000 == 0:
            log.error(
                "usage spool %s is full (%d bytes, STOCKPILOT_USAGE_SPOOL_MAX_BYTES): call %s "
                "dropped, %d dropped so far; NATS has not acknowledged %d calls: is the "
                "STOCKPILOT_USAGE stream refusing writes (see /api/v1/health/ready)?",
                self._spool.directory,
                self._spool.max_bytes,
                event.id[:80],
                self.spool_dropped,
                self.pending,
            )

    async def track(
        self,
        call: Awaitable[T],
        *,
        model: str | None = None,
        endpoint: str | None = None,
        user_id: str | None = None,
        request_id: str | None = None,
        tags: tuple[str, ...] = (),
        task_type: str | None = None,
    ) -> T:
        """Await an OpenAI-style call (or any awaitable), record it, return or re-raise.

        A streamed answer (`stream=True`) comes back wrapped: iterate it as the stream itself;
        the call is recorded when it ends (tokens from its final usage chunk, `ttft_ms` from
        its first content), fails or is closed.
        """
        labels = Labels(model, endpoint, user_id, request_id, tuple(tags), task_type)
        timed = Call.begin(self, labels, self._clock)
        token = current_call.set(timed)
        try:
            result = await call
        except Exception as exc:
            timed.failed(exc)
            raise
        finally:
            current_call.reset(token)
        return timed.answered(result)

    def track_sync(
        self,
        call: Callable[[], T],
        *,
        model: str | None = None,
        endpoint: str | None = None,
        user_id: str | None = None,
        request_id: str | None = None,
        tags: tuple[str, ...] = (),
        task_type: str | None = None,
    ) -> T:
        """`track` for a synchronous client: `recorder.track_sync(lambda: client.chat...)`;
        from any thread."""
        labels = Labels(model, endpoint, user_id, request_id, tuple(tags), task_type)
        timed = Call.begin(self, labels, self._clock)
        token = current_call.set(timed)
        try:
            result = call()
        except Exception as exc:
            timed.failed(exc)
            raise
        finally:
            current_call.reset(token)
        return timed.answered(result)

    # ----- sending -------------------------------------------------------------------------

    async def _send_forever(self) -> None:
        backoff = 0.05
        while True:
            self._refill()
            # Keep the pipe full: windows go out while acknowledgements of earlier ones come.
            while self._sent < len(self._buffer) and self._sent < MAX_IN_FLIGHT:
                window = list(itertools.islice(self._buffer, self._sent, self._sent + SEND_WINDOW))
                self._in_flight.append((len(window), await self._start_window(window)))
                self._sent += len(window)
            self._sync_spool()
            if not self._in_flight:
                self._idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            size, outcome = self._in_flight[0]
            try:
                published = await asyncio.wait_for(asyncio.shield(outcome), self._timeout)
            except TimeoutError:
                published = Published(size, 0, 0, "no acknowledgement in time")
            self._in_flight.popleft()
            self._sent -= size
            for _ in range(published.acked):
                self._buffer.popleft()
            if self._spool is not None and published.acked:
                position = self._positions[published.acked - 1]
                for _ in range(published.acked):
                    self._positions.popleft()
                self._spool.commit(position)
            self.published += published.acked - published.duplicates
            self.duplicates += published.duplicates
            if published.error is None:
                backoff = 0.05
                continue
            # Everything after the first unacknowledged event goes again (same Msg-Ids: what
            # was stored meanwhile is stored once), on a new connection, after a pause.
            self._abandon_in_flight()
            self.retries += 1
            if self.retries == 1 or self.retries % 50 == 0:
                log.warning(
                    "usage publish failed (%s); %d events buffered, retrying",
                    published.error,
                    self.pending,
                )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    def _refill(self) -> None:
        """Take the oldest spooled events into the memory buffer while it has room."""
        if self._spool is None or not self._spool.unread:
            return
        room = self._capacity - len(self._buffer)
        if room > 0:
            for event_id, payload, position in self._spool.read(room):
                self._buffer.append((event_id, payload))
                self._positions.append(position)

    def _sync_spool(self) -> None:
        """Hand the spool's new lines to the OS; fsync them while some are only there."""
        if self._spool is None:
            return
        now = time.monotonic()
        if self._spool.unread and now - self._synced_at >= SPOOL_SYNC_S:
            self._spool.sync()
            self._synced_at = now
        else:
            self._spool.flush()

    async def _start_window(self, window: list[tuple[str, bytes]]) -> asyncio.Future[Published]:
        """Publish a window; a future of what became of it."""
        outcome = await self._publisher.publish(SUBJECT_RECORDED, window)
        if self._nc.is_connected:
            self._last_connection = "bare" if self._publisher.path == ACCELERATED else "nats-py"
        return outcome

    def _abandon_in_flight(self) -> None:
        """Stop waiting for the windows in flight (their events are sent again) and drop the
        accelerator's connection: what it still owed is not waited for, the next window opens
        anew."""
        self._publisher.reset()  # its windows finish as not acknowledged
        for _, outcome in self._in_flight:
            outcome.cancel()  # a nats-py window's task: releases the library's slots
        self._in_flight.clear()
        self._sent = 0
