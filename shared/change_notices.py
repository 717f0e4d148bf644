"""Change notices: after folding, a service tells the gateways its answers changed.

A notice is an empty core-NATS message on `stockpilot.changed.<service>`; the gateways drop
that service's kept answers when one arrives. Folding calls `announce` after every event, so
notices are coalesced: at most one every CHANGE_NOTICE_INTERVAL_S, sent without waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Coroutine
from typing import Any

from nats.aio.client import Client as NATS

# Change notices are coalesced: at most one per service every few milliseconds.
CHANGE_NOTICE_INTERVAL_S = 0.005


def changed_subject(service: str) -> str:
    """Core-NATS subject a service announces projection changes on (gateway caches listen)."""
    return f"stockpilot.changed.{service}"


class ChangeNotifier:
    """Coalesced change notices of one service, sent on the connection it is attached to."""

    def __init__(self, service: str, interval_s: float = CHANGE_NOTICE_INTERVAL_S) -> None:
        self.subject = changed_subject(service)
        self.interval_s = interval_s
        # The notice scheduled and not yet sent. Folding checks `pending is None` before
        # calling `announce`: an attribute read per event rather than a call.
        self.pending: asyncio.TimerHandle | None = None
        self.sent = 0
        # Never sent: the first notice goes at once (the loop's clock may start near 0).
        self._last = float("-inf")
        self._nc: NATS | None = None
        self._sends: set[asyncio.Task[None]] = set()

    def attach(self, nc: NATS) -> None:
        """Send notices on `nc` from now on (the runtime's connection, once it is open)."""
        self._nc = nc

    def announce(self) -> None:
        """Tell the gateways this service's answers changed (coalesced; fire and forget)."""
        if self.pending is not None:
            return
        loop = asyncio.get_running_loop()
        delay = max(0.0, self._last + self.interval_s - loop.time())
        self.pending = loop.call_later(delay, self._send)

    def _send(self) -> None:
        self.pending = None
        self._last = asyncio.get_running_loop().time()
        nc = self._nc
        if nc is not None and nc.is_connected:
            self.sent += 1
            self._send_in_background(nc.publish(self.subject, b""))

    def _send_in_background(self, send: Coroutine[Any, Any, None]) -> None:
        """Run a send without waiting for it; tasks start in creation order, so sends keep it."""
        task = asyncio.get_running_loop().create_task(send)
        self._sends.add(task)
        task.add_done_callback(self._sends.discard)

    async def final(self) -> None:
        """The notice of a stopping service: gateways drop its cached answers (its status
        says it is gone)."""
        if self._nc is None:
            return
        with contextlib.suppress(Exception):
            await self._nc.publish(self.subject, b"")
