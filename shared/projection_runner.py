"""Folding stored events into a service's projections, and the bookkeeping around it.

Per projection: events applied, dead letters, lag, caught up, snapshot position and the
read-your-writes waiters (`Tracked`). Per event (`apply`): skip what the view already holds,
fold, or refuse and dead-letter with a reason; hand the alerts a fold derives to the outbox;
announce the change; wake whoever waits for that sequence. Reading the stream is not here:
the runtime's read path calls `apply` and `mark_caught_up` for every message it delivers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from nats.aio.client import Client as NATS

from shared.alert_outbox import AlertOutbox
from shared.change_notices import ChangeNotifier
from shared.clock import Clock
from shared.dead_letters import DECODE_ERRORS, dead_letter, describe_decode_error
from shared.projection import FoldError, Projection, SeqWaiters
from shared.transport import StreamFollower

log = logging.getLogger("stockpilot.runtime")


@dataclass
class Tracked:
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
    # What reads its stream (shared.transport): its `path` shows in the status.
    follower: StreamFollower | None = None


class ProjectionRunner:
    """Applies stored events to one service's projections (the alert ledger's included)."""

    def __init__(
        self,
        service: str,
        projections: Sequence[Projection[Any, Any]],
        clock: Clock,
        outbox: AlertOutbox,
        notifier: ChangeNotifier,
    ) -> None:
        self.service = service
        self.clock = clock
        self.outbox = outbox
        # The ledger folds alerts rather than deriving them; the others' alerts go out.
        self.ledger = outbox.ledger
        self.notifier = notifier
        self.tracked = {p.name: Tracked(p) for p in projections}
        self._nc: NATS | None = None
        self._background_sends: set[asyncio.Task[None]] = set()

    def attach(self, nc: NATS) -> None:
        """Send dead letters on `nc` from now on (the runtime's connection, once open)."""
        self._nc = nc

    def apply(
        self, tracked: Tracked, seq: int, subject: str | bytes, data: bytes, stored_ns: int
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
            self._refuse(tracked, subject, data, seq, describe_decode_error(exc))
        except FoldError as exc:
            self._refuse(tracked, subject, data, seq, str(exc))
        except Exception as exc:
            log.exception("%s: %s could not apply seq %d", self.service, projection.name, seq)
            self._refuse(tracked, subject, data, seq, f"could not be applied: {exc!r}"[:500])
        else:
            tracked.events_applied += 1
            tracked.since_snapshot += 1
            if alerts and self.ledger is not None and projection is not self.ledger:
                for alert in alerts:
                    self.outbox.queue(alert)
        if self.notifier.pending is None:
            self.notifier.announce()
        if seq >= tracked.waiters.next_seq:
            for waiter in tracked.waiters.pop_ready(seq):
                if isinstance(waiter, asyncio.Future) and not waiter.done():
                    waiter.set_result(True)

    def mark_caught_up(self, tracked: Tracked) -> None:
        """The projection has folded everything its stream held (logged the first time)."""
        if not tracked.caught_up.is_set():
            # Logged before the event is set: whoever sees the service ready (a test in
            # another thread, reading the log) finds the line already there.
            log.info(
                "%s: %s caught up at seq %d (%d events folded)",
                self.service,
                tracked.projection.name,
                tracked.projection.view.last_seq,
                tracked.events_applied,
            )
            tracked.caught_up.set()

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

    def _refuse(
        self, tracked: Tracked, subject: str | bytes, data: bytes, seq: int, reason: str
    ) -> None:
        if isinstance(subject, bytes):
            subject = subject.decode(errors="replace")
        projection = tracked.projection
        projection.view.last_seq = seq
        tracked.dead_lettered += 1
        log.warning("%s: dead-lettered seq %d on %s: %s", self.service, seq, subject, reason)
        # Folding never waits on NATS.
        self._send_in_background(self._send_dead_letter(subject, data, reason, seq))

    def _send_in_background(self, send: Coroutine[Any, Any, None]) -> None:
        """Run a send without waiting for it; tasks start in creation order, so sends keep it."""
        task = asyncio.get_running_loop().create_task(send)
        self._background_sends.add(task)
        task.add_done_callback(self._background_sends.discard)

    async def _send_dead_letter(self, subject: str, data: bytes, reason: str, seq: int) -> None:
        if self._nc is None:
            return
        with contextlib.suppress(Exception):
            await dead_letter(self._nc, self.service, subject, data, reason, seq, self.clock.now())
