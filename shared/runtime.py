"""The service runtime the three services share.

A service declares its projections, its query/command endpoints and any background work in a
`ServiceDefinition`; `run_service` does the rest:

- connect to NATS (retry forever; exit non-zero if the connection closes for good),
- provision the streams, restore each projection from its latest snapshot, then fold the
  stream from there and follow it (`shared.transport`: nats-py, or its accelerator where
  that works), skipping `seq <= last_seq`, dead-lettering what does not decode or apply,
- publish the alerts the projections derive (once: see `shared.alerts`),
- snapshot every N events / T seconds and on shutdown,
- run every loop under `shared.supervise`: one that fails ends the process (exit 70),
- answer requests through the `nats.micro` framework (`$SRV.PING|INFO|STATS` included) on
  `stockpilot.svc.<service>.<endpoint>`, queue-grouped so replicas share the load,
- stop cleanly on SIGINT/SIGTERM.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

import msgspec
import psutil
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import NotFoundError as JsNotFoundError
from nats.js.errors import ObjectNotFoundError
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.request import ServiceError as MicroServiceError
from nats.micro.service import ServiceConfig

from shared import bus
from shared.alerts import AlertLedger, alert_ledger
from shared.clock import SYSTEM_CLOCK, Clock
from shared.errors import StockpilotError
from shared.events import Alert, AwareDatetime, Event
from shared.nats_errors import is_nats_error, translate
from shared.projection import (
    FoldError,
    Projection,
    SeqWaiters,
    SnapshotMismatch,
    decode_snapshot,
    encode_snapshot,
    view_digest,
)
from shared.settings import CommonSettings, require_nats
from shared.supervise import Supervisor
from shared.transport import StreamFollower, ack_metadata

log = logging.getLogger("stockpilot.runtime")

VERSION = "0.1.0"
P = TypeVar("P", bound=msgspec.Struct)


def endpoint_subject(service: str, endpoint: str) -> str:
    """The request subject of one endpoint of one service."""
    return f"stockpilot.svc.{service}.{endpoint}"


def changed_subject(service: str) -> str:
    """Core-NATS subject a service announces projection changes on (gateway caches listen)."""
    return f"stockpilot.changed.{service}"


# Consecutive failed snapshot writes, while connected, after which the snapshot loop fails.
SNAPSHOT_MAX_FAILURES = 10

# What a payload that does not decode raises: msgspec's errors, and also a RecursionError
# for JSON nested too deep and a UnicodeDecodeError for invalid UTF-8 inside a string.
DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeDecodeError)

# Change notices are coalesced: at most one per service every few milliseconds.
CHANGE_NOTICE_INTERVAL_S = 0.005


def micro_name(service: str) -> str:
    """The nats.micro service name (`$SRV.PING.<name>`)."""
    return f"stockpilot-{service}"


def ack_position(msg: Msg) -> tuple[int, int]:
    """A JetStream message's stream sequence and pending count, read from its reply subject."""
    seq, pending, _ = ack_metadata(msg)
    return seq, pending


class NoParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Parameters of an endpoint that takes none."""


@dataclass(frozen=True)
class Endpoint(Generic[P]):
    """One request/reply endpoint: its parameters are decoded (and validated) into `params`."""

    name: str
    params: type[P]
    handler: Callable[[P, Context], Awaitable[msgspec.Struct | bytes]]
    # nats-py hands one subscription's messages to its callback one at a time: a slow
    # endpoint (a command waiting for its event to be folded, a fresh probe round) would
    # queue every other request to it. Such endpoints run each request in its own task.
    concurrent: bool = False


Background = Callable[["Context"], Coroutine[Any, Any, None]]
Prepare = Callable[[JetStreamContext, Clock | None], Awaitable[None]]


@dataclass
class ServiceDefinition:
    """What a service is made of; everything else is the runtime's."""

    name: str
    projections: Sequence[Projection[Any, Any]]
    endpoints: Sequence[Endpoint[Any]] = ()
    background: Sequence[Background] = ()
    # Alerts the projections derive are raised under this source (usage|batch|health).
    alert_source: str | None = None
    description: str = ""
    # The settings fields the folds depend on (time zone, budgets, prices, bounds): the
    # `digest` endpoint reports their values, so `stockpilot replay` folds with the live
    # service's configuration, not the shell's. None of them may be a secret.
    fold_settings: Sequence[str] = ()
    # Runs once connected, before any projection folds: reads what the folds need from the
    # streams and, given a clock (the live service; a replay passes None), publishes what
    # the service announces at start (the usage service's price table).
    prepare: Prepare | None = None


class ProjectionStatus(msgspec.Struct, kw_only=True):
    """How far one projection has got."""

    name: str
    stream: str
    last_seq: int
    lag: int
    caught_up: bool
    events_applied: int
    dead_lettered: int
    snapshot_seq: int
    snapshot_at: AwareDatetime | None
    # How its events reach it: "accelerated" or "nats-py" (shared.transport); None from a
    # service that predates the field.
    transport: str | None = None


class ProcessStatus(msgspec.Struct, kw_only=True):
    """The service process itself."""

    pid: int
    rss_mb: float
    cpu_percent: float


class ProjectionDigest(msgspec.Struct, kw_only=True):
    """A projection's state fingerprint at a sequence (what `stockpilot replay` compares)."""

    name: str
    stream: str
    filter_subject: str
    last_seq: int
    digest: str


class DigestAnswer(msgspec.Struct, kw_only=True):
    """Answer of the built-in `digest` endpoint."""

    service: str
    projections: list[ProjectionDigest]
    # The fold-relevant settings the projections were built with (ServiceDefinition
    # .fold_settings), by settings field name; None from a service that predates them.
    settings: dict[str, Any] | None = None


class ServiceStatus(msgspec.Struct, kw_only=True):
    """Answer of every service's built-in `status` endpoint."""

    service: str
    instance: str
    version: str
    started_at: AwareDatetime
    uptime_s: float
    ready: bool
    projections: list[ProjectionStatus]
    process: ProcessStatus
    alerts_published: int


@dataclass
class _Tracked:
    """Runtime bookkeeping of one projection."""

    projection: Projection[Any, Any]
    lag: int = 0
    caught_up: asyncio.Event = field(default_factory=asyncio.Event)
    events_applied: int = 0
    dead_lettered: int = 0
    since_snapshot: int = 0
    snapshot_seq: int = 0
    snapshot_at: datetime | None = None
    waiters: SeqWaiters = field(default_factory=SeqWaiters)
    subscription: Any = None
    reader: asyncio.Task[None] | None = None
    follower: StreamFollower | None = None


class Context:
    """What endpoint handlers and background tasks get: NATS, settings, publishing, time."""

    def __init__(self, runtime: Runtime) -> None:
        self._runtime = runtime

    @property
    def nc(self) -> NATS:
        """The NATS connection."""
        return self._runtime.nc

    @property
    def js(self) -> JetStreamContext:
        """The JetStream context."""
        return self._runtime.js

    @property
    def stopping(self) -> asyncio.Event:
        """Set when the service is shutting down (background loops watch it)."""
        return self._runtime.stop

    @property
    def clock(self) -> Clock:
        """The runtime's clock, for code that takes a Clock (the batch lock primitives)."""
        return self._runtime.clock

    def now(self) -> datetime:
        """The current time from the runtime's clock (handlers pass it to pure queries)."""
        return self._runtime.clock.now()

    async def publish(
        self, subject: str, event: Event, headers: dict[str, str] | None = None
    ) -> js_api.PubAck:
        """Publish an event with `Nats-Msg-Id`; infrastructure errors become UnavailableError."""
        try:
            return await bus.publish_event(self.js, subject, event, headers=headers)
        except StockpilotError:
            raise
        except Exception as exc:
            if is_nats_error(exc):
                raise translate(exc, "could not store the event in JetStream") from None
            raise

    async def wait_applied(
        self, projection: Projection[Any, Any], seq: int, timeout: float = 2.0
    ) -> bool:
        """Wait until `projection` has folded stream sequence `seq` (read-your-writes)."""
        return await self._runtime.wait_applied(projection, seq, timeout)

    async def raise_alerts(self, alerts: Sequence[Alert]) -> None:
        """Publish alerts not already in the ledger (a background task's own alerts)."""
        for alert in alerts:
            self._runtime.queue_alert(alert)


class Runtime:
    """Runs one ServiceDefinition against NATS."""

    def __init__(
        self,
        definition: ServiceDefinition,
        settings: CommonSettings,
        bare_reads: bool = True,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.definition = definition
        self.settings = settings
        # Every "now" of this service (queries, loops, stamps) comes from here; tests set it.
        self.clock = clock
        # Projections read over a bare connection (shared.stream_reader); False: nats-py only.
        self.bare_reads = bare_reads
        self._reconnected = asyncio.Event()
        self.stop = asyncio.Event()
        # Every loop of the process runs under it: one that fails stops the process (exit 70).
        self.supervisor = Supervisor(definition.name, self.stop)
        self.closed_for_good = False
        self.started_at = clock.now()
        self._started_monotonic = time.monotonic()
        self.context = Context(self)
        self._ledger: Projection[AlertLedger, Alert] | None = (
            alert_ledger(definition.alert_source) if definition.alert_source else None
        )
        projections = list(definition.projections)
        if self._ledger is not None:
            projections.insert(0, self._ledger)
        self.tracked = {p.name: _Tracked(p) for p in projections}
        self._alerts: asyncio.Queue[Alert] = asyncio.Queue(maxsize=10_000)
        # Alerts queued or being published; no snapshot is taken while any is (see snapshot).
        self._alerts_unpublished = 0
        self._alerts_idle = asyncio.Event()
        self._alerts_idle.set()
        self.alerts_published = 0
        self._process = psutil.Process()
        self._process.cpu_percent()
        self._notice: asyncio.TimerHandle | None = None
        self._last_notice = 0.0
        self._background_sends: set[asyncio.Task[None]] = set()
        self.nc: NATS
        self.js: JetStreamContext
        self.instance = ""

    # ----- lifecycle -------------------------------------------------------------------

    async def run(self) -> int:
        """Run until a signal or a lost connection; the exit status."""
        loop = asyncio.get_running_loop()
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, self.stop.set)
        name = self.definition.name

        async def on_closed() -> None:
            if not self.stop.is_set():
                log.error("%s: NATS connection closed for good; exiting", name)
                self.closed_for_good = True
                self.stop.set()

        async def on_reconnected() -> None:
            self._reconnected.set()

        nc = await bus.connect_unless_stopped(
            self.stop,
            self.settings,
            f"stockpilot-{name}",
            on_closed=on_closed,
            on_reconnected=on_reconnected,
        )
        if nc is None:
            log.info("%s: stopped before NATS could be reached", name)
            return 0
        self.nc = nc
        self.js = self.nc.jetstream()
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(self._close_connection)
            # Under `stockpilot up` (or compose's provision step) the `ops` user created the
            # streams and this service's user may only check them.
            needed = {t.projection.stream.name for t in self.tracked.values()}
            try:
                await bus.provision_or_check(
                    self.js, self.settings, (*sorted(needed), bus.STREAMS["alerts"].name)
                )
                self._obs = await bus.snapshot_store(
                    self.js,
                    name,
                    self.settings.stream_replicas,
                    create=bus.may_administer(self.settings),
                )
            except bus.NotProvisionedError as exc:
                log.error("%s: %s", name, exc)
                return 1
            if self.definition.prepare is not None:
                await self.definition.prepare(self.js, self.clock)
            stack.push_async_callback(self.supervisor.cancel_all)
            self.supervisor.start(self._publish_alerts(), "alerts", forever=True)
            for tracked in self.tracked.values():
                await self._start_projection(tracked)
            stack.push_async_callback(self._final_snapshots)
            stack.push_async_callback(self._unsubscribe)
            service = await add_service(
                self.nc,
                ServiceConfig(
                    name=micro_name(name),
                    version=VERSION,
                    description=self.definition.description or f"StockPilot {name} service",
                    queue_group=f"stockpilot-{name}",
                    metadata={"service": name, "pid": str(os.getpid())},
                ),
            )
            self.instance = service.id
            stack.push_async_callback(service.stop)
            await self._add_endpoints(service)
            self.supervisor.start(self._snapshot_loop(), "snapshots", forever=True)
            self.supervisor.start(self._start_background(), "background")
            log.info("%s service %s listening on stockpilot.svc.%s.*", name, self.instance, name)
            await self.stop.wait()
            log.info("%s: stopping", name)
            # Gateways drop this service's cached answers (its status says it is gone).
            with contextlib.suppress(Exception):
                await self.nc.publish(changed_subject(name), b"")
        return self.supervisor.exit_status(1 if self.closed_for_good else 0)

    async def _close_connection(self) -> None:
        # With NATS away the drain times out and closing may fail: not a reason to exit
        # non-zero.
        await bus.drain_or_close(self.nc)

    async def _unsubscribe(self) -> None:
        for tracked in self.tracked.values():
            if tracked.reader is not None:
                tracked.reader.cancel()
                with contextlib.suppress(BaseException):
                    await tracked.reader
            if tracked.subscription is not None:
                with contextlib.suppress(Exception):
                    await tracked.subscription.unsubscribe()

    async def _start_background(self) -> None:
        """Background work starts once every projection has caught up with its stream.

        Each runs until the service stops; one that fails (or returns early) stops the
        service, which exits non-zero and is restarted (shared.supervise).
        """
        await asyncio.gather(*(t.caught_up.wait() for t in self.tracked.values()))
        log.info("%s: projections caught up", self.definition.name)
        for work in self.definition.background:
            self.supervisor.start(work(self.context), work.__name__, forever=True)

    # ----- projections -----------------------------------------------------------------

    def _snapshot_name(self, projection: Projection[Any, Any]) -> str:
        return f"{self.definition.name}.{projection.name}"

    async def _restore(self, tracked: _Tracked) -> None:
        projection = tracked.projection
        try:
            result = await self._obs.get(self._snapshot_name(projection))
        except (ObjectNotFoundError, JsNotFoundError):
            log.info(
                "%s: no snapshot of %s; folding from the first event",
                self.definition.name,
                projection.name,
            )
            return
        data = result.data or b""
        try:
            view, taken_at = decode_snapshot(data, projection.view_type, projection)
        except SnapshotMismatch as exc:  # settings or the fold changed since it was taken
            log.warning(
                "%s: snapshot of %s discarded: %s; rebuilding from the first event",
                self.definition.name,
                projection.name,
                exc,
            )
            return
        except Exception as exc:  # a snapshot of an older view shape: rebuild instead
            log.warning(
                "%s: snapshot of %s unusable (%s); folding from the first event",
                self.definition.name,
                projection.name,
                exc,
            )
            return
        projection.view = view
        tracked.snapshot_seq = view.last_seq
        tracked.snapshot_at = taken_at
        log.info(
            "%s: restored %s from snapshot at seq %d (%d bytes)",
            self.definition.name,
            projection.name,
            view.last_seq,
            len(data),
        )

    async def _start_projection(self, tracked: _Tracked) -> None:
        """Restore the projection, then follow its stream (shared.transport) under the
        supervisor, from the view's next sequence on."""
        await self._restore(tracked)
        projection = tracked.projection
        # Until the first event: at most what the stream holds past the view.
        state = (await self.js.stream_info(projection.stream.name)).state
        tracked.lag = max(0, state.last_seq - projection.view.last_seq)

        def on_event(seq: int, pending: int, subject: str | bytes, data: bytes, ns: int) -> None:
            tracked.lag = pending
            self._apply(tracked, seq, subject, data, ns)

        def caught_up() -> None:
            tracked.lag = 0
            self._mark_caught_up(tracked)

        tracked.follower = StreamFollower(
            self.nc,
            projection.stream.name,
            projection.subject,
            lambda: projection.view.last_seq + 1,
            on_event,
            caught_up,
            accelerated=self.bare_reads and self.settings.nats_accelerator == "on",
            name=f"{self.definition.name}: {projection.name}",
        )
        tracked.reader = self.supervisor.start(
            tracked.follower.run(), f"read-{projection.name}", forever=True
        )

    def _mark_caught_up(self, tracked: _Tracked) -> None:
        """The projection has folded everything its stream held (logged the first time)."""
        if not tracked.caught_up.is_set():
            tracked.caught_up.set()
            log.info(
                "%s: %s caught up at seq %d (%d events folded)",
                self.definition.name,
                tracked.projection.name,
                tracked.projection.view.last_seq,
                tracked.events_applied,
            )

    def _apply(
        self, tracked: _Tracked, seq: int, subject: str | bytes, data: bytes, stored_ns: int
    ) -> None:
        """Fold one stored event (or dead-letter it); skip what the view already holds.

        The fold checks the event against the subject it was stored on and the time the
        stream stored it (both from the message itself, so a replay decides alike).
        """
        projection = tracked.projection
        if seq <= projection.view.last_seq:
            return
        try:
            alerts = projection.fold(seq, data, subject, stored_ns)
        except DECODE_ERRORS as exc:
            self._refuse(tracked, subject, data, seq, bus.describe_decode_error(exc))
        except FoldError as exc:
            self._refuse(tracked, subject, data, seq, str(exc))
        except Exception as exc:
            log.exception(
                "%s: %s could not apply seq %d", self.definition.name, projection.name, seq
            )
            self._refuse(tracked, subject, data, seq, f"could not be applied: {exc!r}"[:500])
        else:
            tracked.events_applied += 1
            tracked.since_snapshot += 1
            if alerts and self._ledger is not None and projection is not self._ledger:
                for alert in alerts:
                    self.queue_alert(alert)
        if self._notice is None:
            self._announce_change()
        if tracked.waiters:
            for waiter in tracked.waiters.pop_ready(seq):
                if isinstance(waiter, asyncio.Future) and not waiter.done():
                    waiter.set_result(True)

    def _announce_change(self) -> None:
        """Tell the gateways this service's answers changed (coalesced; fire and forget)."""
        loop = asyncio.get_running_loop()
        delay = max(0.0, self._last_notice + CHANGE_NOTICE_INTERVAL_S - loop.time())
        self._notice = loop.call_later(delay, self._send_change_notice)

    def _send_change_notice(self) -> None:
        self._notice = None
        loop = asyncio.get_running_loop()
        self._last_notice = loop.time()
        if self.nc.is_connected:
            self._send_in_background(self.nc.publish(changed_subject(self.definition.name), b""))

    def _send_in_background(self, send: Coroutine[Any, Any, None]) -> None:
        """Run a send without waiting for it; tasks start in creation order, so sends keep it."""
        task = asyncio.get_running_loop().create_task(send)
        self._background_sends.add(task)
        task.add_done_callback(self._background_sends.discard)

    def _refuse(
        self, tracked: _Tracked, subject: str | bytes, data: bytes, seq: int, reason: str
    ) -> None:
        if isinstance(subject, bytes):
            subject = subject.decode(errors="replace")
        projection = tracked.projection
        projection.view.last_seq = seq
        tracked.dead_lettered += 1
        log.warning(
            "%s: dead-lettered seq %d on %s: %s", self.definition.name, seq, subject, reason
        )
        # Folding never waits on NATS.
        self._send_in_background(self._send_dead_letter(subject, data, reason, seq))

    async def _send_dead_letter(self, subject: str, data: bytes, reason: str, seq: int) -> None:
        with contextlib.suppress(Exception):
            await bus.dead_letter(
                self.nc, self.definition.name, subject, data, reason, seq, self.clock.now()
            )

    async def wait_applied(
        self, projection: Projection[Any, Any], seq: int, timeout: float
    ) -> bool:
        """True once `projection` has folded `seq`; False after `timeout`."""
        if projection.view.last_seq >= seq:
            return True
        tracked = self.tracked[projection.name]
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        tracked.waiters.add(seq, future)
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            return False

    # ----- alerts ----------------------------------------------------------------------

    def queue_alert(self, alert: Alert) -> None:
        """Queue an alert for publishing unless the ledger already holds its id."""
        if self._ledger is not None and alert.id in self._ledger.view.ids:
            return
        try:
            self._alerts.put_nowait(alert)
            self._alerts_unpublished += 1
            self._alerts_idle.clear()
        except asyncio.QueueFull:
            log.error("%s: alert queue full; dropped alert %s", self.definition.name, alert.id)

    def _alert_settled(self) -> None:
        self._alerts_unpublished -= 1
        if self._alerts_unpublished == 0:
            self._alerts_idle.set()

    async def _publish_alerts(self) -> None:
        # Alerts wait until the ledger has caught up, so a restart does not repeat old ones.
        if self._ledger is not None:
            await self.tracked[self._ledger.name].caught_up.wait()
        while True:
            alert = await self._alerts.get()
            if self._ledger is not None and alert.id in self._ledger.view.ids:
                self._alert_settled()
                continue
            delay = 0.2
            while True:
                try:
                    ack = await bus.publish_event(self.js, alert.subject, alert)
                    if not ack.duplicate:
                        self.alerts_published += 1
                        log.info("%s: alert %s (%s)", self.definition.name, alert.id, alert.title)
                    self._alert_settled()
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning(
                        "%s: publishing alert %s failed (%s); retrying",
                        self.definition.name,
                        alert.id,
                        exc,
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)

    # ----- snapshots -------------------------------------------------------------------

    async def _snapshot_loop(self) -> None:
        every_s = self.settings.snapshot_every_s
        every_events = self.settings.snapshot_every_events
        last = {name: time.monotonic() for name in self.tracked}
        failures = dict.fromkeys(self.tracked, 0)
        while True:
            await asyncio.sleep(min(1.0, every_s))
            for name, tracked in self.tracked.items():
                due_by_time = time.monotonic() - last[name] >= every_s
                if tracked.since_snapshot and (
                    due_by_time or tracked.since_snapshot >= every_events
                ):
                    if await self.snapshot(tracked) is False and self.nc.is_connected:
                        # Retried next tick; while connected, a write that keeps failing (the
                        # bucket gone, no permission) is not a blip: without snapshots every
                        # restart refolds more, so the process says so and exits instead.
                        failures[name] += 1
                        if failures[name] >= SNAPSHOT_MAX_FAILURES:
                            raise RuntimeError(
                                f"snapshot of {name} failed {failures[name]} times in a row"
                            )
                        continue
                    failures[name] = 0
                    last[name] = time.monotonic()

    async def snapshot(self, tracked: _Tracked) -> bool | None:
        """Store the projection's view with its last_seq; False when the write failed.

        Not while alerts derived from folded events wait to be published: after a crash the
        service resumes *after* the snapshot and would never derive them again. The next
        tick (or the shutdown, which first waits for them) takes it instead.
        """
        if self._alerts_unpublished:  # queued or being published
            return None
        projection = tracked.projection
        taken_at = self.clock.now()
        data = encode_snapshot(projection, taken_at)
        seq = projection.view.last_seq
        since = tracked.since_snapshot
        tracked.since_snapshot = 0
        try:
            await self._obs.put(self._snapshot_name(projection), data)
        except Exception as exc:
            tracked.since_snapshot += since
            log.warning("%s: snapshot of %s failed: %s", self.definition.name, projection.name, exc)
            return False
        tracked.snapshot_seq = seq
        tracked.snapshot_at = taken_at
        log.debug(
            "%s: snapshot of %s at seq %d (%d bytes)",
            self.definition.name,
            projection.name,
            seq,
            len(data),
        )
        return True

    async def _final_snapshots(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._alerts_idle.wait(), timeout=3)
        for tracked in self.tracked.values():
            if tracked.since_snapshot and self.nc.is_connected:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.snapshot(tracked), timeout=5)

    # ----- requests --------------------------------------------------------------------

    async def _add_endpoints(self, service: Any) -> None:
        builtin = [
            Endpoint("status", NoParams, self._status_endpoint),
            Endpoint("digest", NoParams, self._digest_endpoint),
        ]
        for endpoint in [*builtin, *self.definition.endpoints]:
            await service.add_endpoint(
                name=endpoint.name,
                subject=endpoint_subject(self.definition.name, endpoint.name),
                handler=self._handler(endpoint),
            )

    def _handler(self, endpoint: Endpoint[Any]) -> Callable[[Request], Awaitable[None]]:
        decoder = msgspec.json.Decoder(endpoint.params)
        encode = msgspec.json.Encoder().encode
        context = self.context

        async def handle(request: Request) -> None:
            try:
                params = decoder.decode(request.data or b"{}")
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise MicroServiceError("422", str(exc)) from None
            try:
                result = await endpoint.handler(params, context)
            except StockpilotError as exc:
                raise MicroServiceError(str(exc.status), exc.detail) from None
            except Exception as exc:
                log.exception("%s: endpoint %s failed", self.definition.name, endpoint.name)
                raise MicroServiceError("500", f"internal error in {endpoint.name}") from exc
            await request.respond(result if isinstance(result, bytes) else encode(result))

        if not endpoint.concurrent:
            return handle
        tasks: set[asyncio.Task[None]] = set()

        async def respond_error(request: Request, error: MicroServiceError) -> None:
            with contextlib.suppress(Exception):
                await request.respond_error(error.code, error.description)

        async def in_its_own_task(request: Request) -> None:
            try:
                await handle(request)
            except MicroServiceError as error:
                await respond_error(request, error)

        async def spawn(request: Request) -> None:
            task = asyncio.create_task(in_its_own_task(request))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        return spawn

    async def _status_endpoint(self, _: NoParams, ctx: Context) -> ServiceStatus:
        return self.status()

    async def _digest_endpoint(self, _: NoParams, ctx: Context) -> DigestAnswer:
        return DigestAnswer(
            service=self.definition.name,
            projections=[
                ProjectionDigest(
                    name=t.projection.name,
                    stream=t.projection.stream.name,
                    filter_subject=t.projection.subject,
                    last_seq=t.projection.view.last_seq,
                    digest=view_digest(t.projection.view),
                )
                for t in self.tracked.values()
            ],
            settings={
                name: msgspec.to_builtins(getattr(self.settings, name))
                for name in self.definition.fold_settings
            },
        )

    def status(self) -> ServiceStatus:
        """Where every projection stands and what the process uses."""
        with self._process.oneshot():
            rss = self._process.memory_info().rss / 1024 / 1024
            cpu = self._process.cpu_percent()
        projections = [
            ProjectionStatus(
                name=t.projection.name,
                stream=t.projection.stream.name,
                last_seq=t.projection.view.last_seq,
                lag=t.lag,
                caught_up=t.caught_up.is_set(),
                events_applied=t.events_applied,
                dead_lettered=t.dead_lettered,
                snapshot_seq=t.snapshot_seq,
                snapshot_at=t.snapshot_at,
                transport=t.follower.path if t.follower is not None else None,
            )
            for t in self.tracked.values()
        ]
        return ServiceStatus(
            service=self.definition.name,
            instance=self.instance,
            version=VERSION,
            started_at=self.started_at,
            uptime_s=round(time.monotonic() - self._started_monotonic, 3),
            # A process whose loop died is on its way out: never "up".
            ready=all(p.caught_up for p in projections) and not self.supervisor.failed,
            projections=projections,
            process=ProcessStatus(pid=os.getpid(), rss_mb=round(rss, 1), cpu_percent=cpu),
            alerts_published=self.alerts_published,
        )


async def run_service(definition: ServiceDefinition, settings: CommonSettings) -> int:
    """Run a service until SIGINT/SIGTERM; its exit status."""
    return await Runtime(definition, settings).run()


def service_main(build: Callable[[Any], ServiceDefinition], settings: CommonSettings) -> int:
    """Entry point body of a service process: logging, uvloop, run until stopped."""
    from shared.logs import configure_logging

    configure_logging(
        build.__module__.split(".")[1] if "." in build.__module__ else "service", settings.log_level
    )
    require_nats(settings)
    try:
        import uvloop

        return uvloop.run(run_service(build(settings), settings))
    except ImportError:  # pragma: no cover - uvloop is absent only on Windows
        return asyncio.run(run_service(build(settings), settings))
