"""The alert outbox: alerts the folds derive, and those background tasks raise, wait here until
JetStream has stored them, each once (the ledger, `shared.alerts`, knows which are out).

It also counts what is still unpublished: the snapshotter takes no snapshot while anything
is (a crash after such a snapshot would resume past the events that derived the alert, and
never derive it again), and the shutdown waits for the outbox to settle before its final
snapshots.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.js import JetStreamContext

from shared.alerts import AlertLedger
from shared.events import Alert
from shared.projection import Projection
from shared.publish import publish_event

log = logging.getLogger("stockpilot.runtime")

ALERT_QUEUE_MAX = 10_000


class AlertOutbox:
    """Queue and publish one service's alerts; count those not yet settled."""

    def __init__(
        self,
        service: str,
        ledger: Projection[AlertLedger, Alert] | None,
        maxsize: int = ALERT_QUEUE_MAX,
    ) -> None:
        self.service = service
        # The projection of the alerts already published (None: the service raises none).
        self.ledger = ledger
        self._queue: asyncio.Queue[Alert] = asyncio.Queue(maxsize=maxsize)
        # Alerts queued or being published; `idle` is set when there are none.
        self.unpublished = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.published = 0

    def queue(self, alert: Alert) -> None:
        """Queue an alert for publishing unless the ledger already holds its id."""
        if self.ledger is not None and alert.id in self.ledger.view.ids:
            return
        try:
            self._queue.put_nowait(alert)
            self.unpublished += 1
            self.idle.clear()
        except asyncio.QueueFull:
            log.error("%s: alert queue full; dropped alert %s", self.service, alert.id)

    def _settled(self) -> None:
        self.unpublished -= 1
        if self.unpublished == 0:
            self.idle.set()

    async def settle(self, timeout: float) -> bool:
        """Wait until nothing is queued or being published; False after `timeout`."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.idle.wait(), timeout=timeout)
        return self.idle.is_set()

    async def publish_forever(
        self, js: JetStreamContext, after: asyncio.Event | None = None
    ) -> None:
        """Publish queued alerts for ever, retrying each until JetStream stores it.

        `after` is the ledger's caught-up event: alerts wait until the ledger has caught up,
        so a restart does not repeat old ones.
        """
        if after is not None:
            await after.wait()
        while True:
            alert = await self._queue.get()
            if self.ledger is not None and alert.id in self.ledger.view.ids:
                self._settled()
                continue
            delay = 0.2
            while True:
                try:
                    ack = await publish_event(js, alert.subject, alert)
                    if not ack.duplicate:
                        self.published += 1
                        log.info("%s: alert %s (%s)", self.service, alert.id, alert.title)
                    self._settled()
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning(
                        "%s: publishing alert %s failed (%s); retrying",
                        self.service,
                        alert.id,
                        exc,
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 5.0)
