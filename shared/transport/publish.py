"""Pipelined JetStream publishes with acknowledgements (what the usage client sends with).

The accelerated path is `shared.bare_publisher` (HPUB frames on a second connection, acks
counted as bytes); the reference path is nats-py's core publish with a reply subject each.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from shared.bare_nats import BareUnavailable
from shared.bare_publisher import Answers, BarePublisher, Batch, Published
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
        self._core: _CorePublisher | None = None
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
        if self._bare is not None and self._bare.closed:
            # Its connection is gone (a server restart): this window opens a new one, so a
            # caller that does not reset (the usage service's ingest) is not refused for ever.
            self._bare = None
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
        return await self._publish_with_nats_py(subject, window)

    def _may_try(self, now: float) -> bool:
        return self._refused_at is None or now - self._refused_at >= self._retry_s

    def reset(self) -> None:
        """Drop the accelerator's connection: what it still owed finishes as not
        acknowledged, and the next window opens a new one."""
        if self._bare is not None:
            self._bare.close()
            self._bare = None
        if self._core is not None:
            self._core.reset()

    close = reset

    async def _publish_with_nats_py(
        self, subject: str, window: Sequence[tuple[str, bytes]]
    ) -> asyncio.Future[Published]:
        if self._core is None:
            self._core = await _CorePublisher.open(self._nc, self._timeout)
        return await self._core.publish(subject, window)


class _CorePublisher:
    """nats-py's core publish with a numbered reply subject per message, one subscription
    for the answers, counted per window (`Answers`).

    Not `publish_async`: it costs a future, a semaphore and a JSON decode per message, and
    nats-py 2.16 never resolves its future when the stream answers with an error (its
    APIError.from_error raises inside the callback), so a refusal would look like a
    timeout. This keeps the accelerator's outcome, reason included, on the reference path.
    """

    def __init__(self, nc: NATS, inbox: str, timeout: float) -> None:
        self._nc = nc
        self._inbox = inbox
        self._timeout = timeout
        self._next = 0
        self.answers = Answers()

    @classmethod
    async def open(cls, nc: NATS, timeout: float) -> _CorePublisher:
        publisher = cls(nc, nc.new_inbox(), timeout)
        await nc.subscribe(publisher._inbox + ".*", cb=publisher._on_answer)
        return publisher

    async def _on_answer(self, msg: Msg) -> None:
        number = int(msg.subject[msg.subject.rfind(".") + 1 :])
        status = (msg.headers or {}).get("Status")
        if status is not None and not msg.data:
            self.answers.status(number, status.encode())
        else:
            self.answers.body(number, msg.data)

    async def publish(
        self, subject: str, window: Sequence[tuple[str, bytes]]
    ) -> asyncio.Future[Published]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Published] = loop.create_future()
        batch = Batch(self._next, len(window), future)
        self._next += len(window)
        if not window:
            batch.finish()
            return future
        self.answers.batches.append(batch)
        for index, (msg_id, payload) in enumerate(window):
            try:
                await self._nc.publish(
                    subject,
                    payload,
                    reply=f"{self._inbox}.{batch.first + index}",
                    headers={"Nats-Msg-Id": msg_id},
                )
            except Exception as exc:  # over max_payload, the connection gone
                batch.refuse_from(index, str(exc) or type(exc).__name__)
                break
        # Answers lost with a connection never come: the window ends as not acknowledged.
        loop.call_later(self._timeout, self._expire, batch)
        return future

    def _expire(self, batch: Batch) -> None:
        if not batch.future.done():
            batch.finish(error="no acknowledgement in time")
        with contextlib.suppress(ValueError):
            self.answers.batches.remove(batch)

    def reset(self) -> None:
        self.answers.fail_all("publisher reset")
