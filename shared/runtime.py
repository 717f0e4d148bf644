"""The service runtime the three services share: a small `Runtime` composing the parts.

A service declares its projections, its query/command endpoints and any background work in a
`ServiceDefinition`; `run_service` does the rest. The `Runtime` here owns the lifecycle and
the reading of the streams; each other job is a part, testable alone:

- connect to NATS (retry forever; exit non-zero if the connection closes for good:
  `shared.connection`), provision or check the streams (`shared.streams`),
- restore each projection from its latest snapshot (`shared.snapshotter`), then fold the
  stream from there with one follower per projection (`shared.transport`: nats-py, or its
  accelerator where that works), supervised,
- fold each event, skipping `seq <= last_seq`, dead-lettering what does not decode or apply
  (`shared.projection_runner`), and announce the change (`shared.change_notices`),
- publish the alerts the projections derive, once each (`shared.alert_outbox`,
  `shared.alerts`),
- snapshot every N events / T seconds and on shutdown (`shared.snapshotter`),
- run every loop under `shared.supervise`: one that fails ends the process (exit 70),
- answer requests through the `nats.micro` framework (`$SRV.PING|INFO|STATS` included) on
  `stockpilot.svc.<service>.<endpoint>`, queue-grouped so replicas share the load
  (`shared.endpoints`), the built-in `status` and `digest` included (`shared.service_status`),
- stop cleanly on SIGINT/SIGTERM.

Over ~300 lines: the read methods went behind the transport seam (issue #15), what is left
is `Context` (what handlers and background work see) and the lifecycle composing the parts.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import threading
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api

from shared.alert_outbox import AlertOutbox
from shared.alerts import alert_ledger
from shared.change_notices import ChangeNotifier
from shared.clock import SYSTEM_CLOCK, Clock
from shared.connection import connect_unless_stopped, drain_or_close, may_administer
from shared.endpoints import Endpoint, NoParams, add_endpoints, start_service
from shared.errors import StockpilotError
from shared.events import Alert, Event
from shared.nats_errors import is_nats_error, translate
from shared.projection import Projection
from shared.projection_runner import ProjectionRunner
from shared.projection_runner import Tracked as _Tracked  # the name the read methods use
from shared.publish import publish_event
from shared.service_status import VERSION, DigestAnswer, ServiceStatus, StatusReporter
from shared.settings import CommonSettings, require_nats
from shared.snapshotter import Snapshotter
from shared.streams import STREAMS, NotProvisionedError, provision_or_check, snapshot_store
from shared.supervise import Supervisor
from shared.transport import StreamFollower, ack_metadata

log = logging.getLogger("stockpilot.runtime")


def ack_position(msg: Msg) -> tuple[int, int]:
    """A JetStream message's stream sequence and pending count, read from its reply subject."""
    seq, pending, _ = ack_metadata(msg)
    return seq, pending


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
    # How the service's own publishers send, by name ("accelerated" or "nats-py"), for its
    # `status` answer (shared.transport).
    publishers: Callable[[], dict[str, str]] | None = None


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
            return await publish_event(self.js, subject, event, headers=headers)
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
        return await self._runtime.runner.wait_applied(projection, seq, timeout)

    async def raise_alerts(self, alerts: Sequence[Alert]) -> None:
        """Publish alerts not already in the ledger (a background task's own alerts)."""
        for alert in alerts:
            self._runtime.outbox.queue(alert)


class Runtime:
    """Runs one ServiceDefinition against NATS: the lifecycle, the reads, and the parts."""

    def __init__(
        self,
        definition: ServiceDefinition,
        settings: CommonSettings,
        bare_reads: bool = True,
        clock: Clock = SYSTEM_CLOCK,
        freeze_gc: bool = False,
    ) -> None:
        self.definition = definition
        # Whether the objects of the caught-up views leave the collector's care (run_service's
        # processes; not tests, which run many runtimes in one process).
        self.freeze_gc = freeze_gc
        self.settings = settings
        # Every "now" of this service (queries, loops, stamps) comes from here; tests set it.
        self.clock = clock
        # Projections read over a bare connection (shared.stream_reader); False: nats-py only.
        self.bare_reads = bare_reads
        self.stop = asyncio.Event()
        # Every loop of the process runs under it: one that fails stops the process (exit 70).
        self.supervisor = Supervisor(definition.name, self.stop)
        self.closed_for_good = False
        self.started_at = clock.now()
        self.context = Context(self)
        name = definition.name
        ledger = alert_ledger(definition.alert_source) if definition.alert_source else None
        self.outbox = AlertOutbox(name, ledger)
        self.notifier = ChangeNotifier(name)
        projections = [*([ledger] if ledger is not None else []), *definition.projections]
        self.runner = ProjectionRunner(name, projections, clock, self.outbox, self.notifier)
        self.tracked = self.runner.tracked
        self.snapshots = Snapshotter(
            name,
            self.tracked,
            clock,
            self.outbox,
            every_s=settings.snapshot_every_s,
            every_events=settings.snapshot_every_events,
        )
        self.reporter = StatusReporter(
            name,
            self.tracked,
            self.supervisor,
            self.outbox,
            self.started_at,
            definition.publishers,
        )
        # The read methods below hand each message to the parts under these names.
        self._restore = self.snapshots.restore
        self._apply = self.runner.apply
        self._mark_caught_up = self.runner.mark_caught_up
        self.nc: NATS
        self.js: JetStreamContext
        self.instance = ""

    @property
    def alerts_published(self) -> int:
        """Alerts this process published (not counting ones JetStream already held)."""
        return self.outbox.published

    def status(self) -> ServiceStatus:
        """Where every projection stands and what the process uses."""
        return self.reporter.status(self.instance)

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

        nc = await connect_unless_stopped(
            self.stop,
            self.settings,
            f"stockpilot-{name}",
            on_closed=on_closed,
        )
        if nc is None:
            log.info("%s: stopped before NATS could be reached", name)
            return 0
        self.nc = nc
        self.js = self.nc.jetstream()
        self.runner.attach(nc)
        self.notifier.attach(nc)
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(self._close_connection)
            # Under `stockpilot up` (or compose's provision step) the `ops` user created the
            # streams and this service's user may only check them.
            needed = {t.projection.stream.name for t in self.tracked.values()}
            try:
                await provision_or_check(
                    self.js, self.settings, (*sorted(needed), STREAMS["alerts"].name)
                )
                store = await snapshot_store(
                    self.js,
                    name,
                    self.settings.stream_replicas,
                    create=may_administer(self.settings),
                )
            except NotProvisionedError as exc:
                log.error("%s: %s", name, exc)
                return 1
            self.snapshots.attach(nc, store)
            if self.definition.prepare is not None:
                await self.definition.prepare(self.js, self.clock)
            stack.push_async_callback(self.supervisor.cancel_all)
            ledger = self.outbox.ledger
            ledger_ready = self.tracked[ledger.name].caught_up if ledger is not None else None
            publishing = self.outbox.publish_forever(self.js, after=ledger_ready)
            self.supervisor.start(publishing, "alerts", forever=True)
            for tracked in self.tracked.values():
                await self._start_projection(tracked)
            stack.push_async_callback(self.snapshots.final)
            stack.push_async_callback(self._unsubscribe)
            description = self.definition.description
            service = await start_service(self.nc, name, description, VERSION)
            self.instance = service.id
            stack.push_async_callback(service.stop)
            builtin = [
                Endpoint("status", NoParams, self._status_endpoint),
                Endpoint("digest", NoParams, self._digest_endpoint),
            ]
            await add_endpoints(service, name, [*builtin, *self.definition.endpoints], self.context)
            self.supervisor.start(self.snapshots.loop(), "snapshots", forever=True)
            self.supervisor.start(self._start_background(), "background")
            log.info("%s service %s listening on stockpilot.svc.%s.*", name, self.instance, name)
            await self.stop.wait()
            log.info("%s: stopping", name)
            await self.notifier.final()
        return self.supervisor.exit_status(1 if self.closed_for_good else 0)

    async def _close_connection(self) -> None:
        # With NATS away the drain times out and closing may fail: not a reason to exit
        # non-zero.
        await drain_or_close(self.nc)

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
        if self.freeze_gc:
            # A caught-up view lives as long as the process: each full collection walked it
            # again (the usage service's gen-2 collections during 200k posted records: 0.15 s,
            # 0.06 s frozen). Frozen objects are still freed by reference counting; only a
            # cycle among them that becomes garbage stays.
            gc.collect()
            gc.freeze()
            log.info(
                "%s: %d objects of the caught-up views left out of garbage collection",
                self.definition.name,
                gc.get_freeze_count(),
            )
        for work in self.definition.background:
            self.supervisor.start(work(self.context), work.__name__, forever=True)

    async def _status_endpoint(self, _: NoParams, ctx: Context) -> ServiceStatus:
        return self.status()

    async def _digest_endpoint(self, _: NoParams, ctx: Context) -> DigestAnswer:
        return self.reporter.digest(self.settings, self.definition.fold_settings)

    # ----- reading the streams ---------------------------------------------------------

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


async def run_service(definition: ServiceDefinition, settings: CommonSettings) -> int:
    """Run a service until SIGINT/SIGTERM; its exit status."""
    return await Runtime(definition, settings, freeze_gc=True).run()


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
