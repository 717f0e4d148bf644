"""Pipelined JetStream publishes with acknowledgements (what the usage client sends with).

The accelerated path is `shared.bare_publisher` (HPUB frames on a second connection, acks
counted as bytes); the reference path is nats-py's `publish_async`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from nats.aio.client import Client as NATS

from shared.bare_nats import BareUnavailable
from shared.bare_publisher import BarePublisher, Published
from shared.transport.paths import ACCELERATED, ACCELERATOR_RETRY_S, NATS_PY, TransportPath

log = logging.getLogger("stockpilot.transport")


class JetStreamPublisher:
    """Pipelined JetStream publishes: windows of (Nats-Msg-Id, payload), a future each.

    A window's outcome (`Published`) says how many of its messages, from the first, the
    stream acknowledged and why the rest were not. Nothing is retried here: the caller
    sends the rest again with the same Msg-Ids, which JetStream stores once.
    """

    def __init__(
        self,
        nc: NATS,
        *,
        accelerated: bool = True,
        name: str = "stockpilot-publisher",
        timeout: float = 2.0,
        retry_s: float = ACCELERATOR_RETRY_S,
    ) -> None:
        self._nc = nc
        self._accelerated = accelerated
        self._name = name
        self._timeout = timeout
        self._retry_s = retry_s
        self._bare: BarePublisher | None = None
        self._refused_at: float | None = None
        self._path: TransportPath = ACCELERATED if accelerated else NATS_PY

    @property
    def path(self) -> TransportPath:
        """The path the last window went over (the accelerator's until one went)."""
        return self._path

    async def publish(
        self, subject: str, window: Sequence[tuple[str, bytes]]
    ) -> asyncio.Future[Published]:
        """Send a window; a future of what became of it (never raises for NATS trouble)."""
        loop = asyncio.get_running_loop()
        if not self._nc.is_connected:  # nats-py is reconnecting: the caller retries later
            outcome: asyncio.Future[Published] = loop.create_future()
            outcome.set_result(Published(len(window), 0, 0, "NATS is not connected"))
            return outcome
        if self._accelerated and self._bare is None and self._may_try(loop.time()):
            try:
                self._bare = await BarePublisher.open(self._nc, self._name)
                if self._refused_at is not None:
                    log.info("%s: publishing over the accelerator again", self._name)
                self._refused_at = None
            except BareUnavailable as exc:
                self._refused_at = loop.time()
                log.warning(
                    "%s: publishing with nats-py (%s); the accelerator is tried again in %gs",
                    self._name,
                    exc,
                    self._retry_s,
                )
        if self._bare is not None:
            self._path = ACCELERATED
            return self._bare.publish(subject, window)
        self._path = NATS_PY
        return asyncio.ensure_future(self._publish_with_nats_py(subject, window))

    def _may_try(self, now: float) -> bool:
        return self._refused_at is None or now - self._refused_at >= self._retry_s

    def reset(self) -> None:
        """Drop the accelerator's connection: what it still owed finishes as not
        acknowledged, and the next window opens a new one."""
        if self._bare is not None:
            self._bare.close()
            self._bare = None

    close = reset

    async def _publish_with_nats_py(
        self, subject: str, window: Sequence[tuple[str, bytes]]
    ) -> Published:
        futures: list[asyncio.Future[Any]] = []
        error: str | None = None
        js = self._nc.jetstream()
        try:
            for msg_id, payload in window:
                futures.append(
                    await js.publish_async(subject, payload, headers={"Nats-Msg-Id": msg_id})
                )
        except asyncio.CancelledError:
            for future in futures:
                future.cancel()  # releases the library's in-flight slot
            raise
        except Exception as exc:
            error = str(exc) or type(exc).__name__  # the rest are retried with the window
        if futures:
            _, pending = await asyncio.wait(futures, timeout=self._timeout)
            for future in pending:
                future.cancel()
        acked = duplicates = 0
        for future in futures:
            if future.cancelled() or future.exception() is not None:
                error = error or str(future.exception() if not future.cancelled() else "timeout")
                break
            acked += 1
            duplicates += bool(future.result().duplicate)
        # Read the remaining outcomes so no "exception was never retrieved" is logged.
        for future in futures[acked:]:
            if not future.cancelled():
                future.exception()
        if acked < len(window) and error is None:
            error = "not acknowledged"
        return Published(len(window), acked, duplicates, error)
