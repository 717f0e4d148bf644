"""Following a stream: the caller's fold gets every event from a start sequence, in order.

The accelerated path is `shared.stream_reader` (our own frame parser on a second
connection); the reference path is nats-py's ordered push consumer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api as js_api

from shared.stream_reader import ReadRefused, ServerUnreachable, read_stream
from shared.transport.paths import (
    ACCELERATED,
    ACCELERATOR_RETRY_S,
    MAX_IDLE_READS,
    NATS_PY,
    TransportPath,
)

log = logging.getLogger("stockpilot.transport")

# on_event(stream sequence, messages pending after it, subject, payload, stored time in ns
# since the epoch). The subject is bytes on the accelerated path, str on nats-py's.
OnEvent = Callable[[int, int, Any, bytes, int], None]


def ack_metadata(msg: Msg) -> tuple[int, int, int]:
    """A JetStream message's stream sequence, pending count and stored time (ns since the
    epoch), read from its reply subject.

    `msg.metadata` builds a Metadata, a SequencePair and a datetime for every message: about
    a fifth of the runtime's per-message cost while catching up (docs/profiles/). Only the
    integers are needed; anything unexpected falls back to nats-py's parser.
    """
    tokens = (msg.reply or "").split(".")
    count = len(tokens)
    if tokens[0] == "$JS" and tokens[1:2] == ["ACK"]:
        if count == 9:  # $JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>
            return int(tokens[5]), int(tokens[8]), int(tokens[7])
        if count >= 11:  # v2: $JS.ACK.<domain>.<hash>.<stream>... (+ a random token)
            return int(tokens[7]), int(tokens[10]), int(tokens[9])
    meta = msg.metadata
    return meta.sequence.stream, meta.num_pending, round(meta.timestamp.timestamp() * 1e9)


async def _until_connected(nc: NATS) -> None:
    """Wait while nats-py reconnects (it owns reconnecting and server discovery).

    A connection closed for good is its owner's to act on (the runtime exits): a follower
    on it just waits until it is cancelled.
    """
    # Polled: nats-py's reconnect callbacks are the connection owner's, set at connect.
    while not nc.is_connected:  # noqa: ASYNC110
        await asyncio.sleep(0.1)


class StreamFollower:
    """Folds `subject` of `stream` from `next_seq()` on, in order, for ever.

    `next_seq` is asked at every (re)start, so a follower resumes after the last event its
    caller folded: a restart of NATS, a lost consumer or a switch of path never skips or
    repeats an event the caller has not already skipped (it drops `seq` it already holds).
    `on_caught_up` is called whenever nothing is pending.
    """

    def __init__(
        self,
        nc: NATS,
        stream: str,
        subject: str,
        next_seq: Callable[[], int],
        on_event: OnEvent,
        on_caught_up: Callable[[], None],
        *,
        accelerated: bool = True,
        retry_s: float = ACCELERATOR_RETRY_S,
        name: str = "",
    ) -> None:
        self._nc = nc
        self._stream = stream
        self._subject = subject
        self._next_seq = next_seq
        self._on_event = on_event
        self._on_caught_up = on_caught_up
        self._accelerated = accelerated
        self._retry_s = retry_s
        self._name = name or f"{stream} {subject}"
        self._path: TransportPath = ACCELERATED if accelerated else NATS_PY

    @property
    def path(self) -> TransportPath:
        """The path the events come over now."""
        return self._path

    async def run(self) -> None:
        """Follow until cancelled: accelerated while that works, else nats-py (for a while)."""
        while True:
            if self._accelerated:
                self._path = ACCELERATED
                reason = await self._read_accelerated()
                self._path = NATS_PY
                log.warning(
                    "%s: following with nats-py at seq %d (%s); the accelerator is tried "
                    "again in %gs",
                    self._name,
                    self._next_seq(),
                    reason,
                    self._retry_s,
                )
                await self._follow_nats_py(self._retry_s)
                log.info("%s: trying the accelerator again", self._name)
            else:
                await self._follow_nats_py(None)

    async def _read_accelerated(self) -> str:
        """Read over the bare connection until it cannot work here; why it cannot."""
        idle_reads = 0
        while True:
            await _until_connected(self._nc)
            start = self._next_seq()
            try:
                await read_stream(
                    self._nc,
                    self._stream,
                    self._subject,
                    start,
                    self._on_event,
                    follow=True,
                    on_caught_up=self._on_caught_up,
                )
            except asyncio.CancelledError:
                raise
            except ReadRefused as exc:  # TLS, NKeys, a server that says no
                return str(exc)
            except ServerUnreachable as exc:  # restarting or in lame duck mode: not a verdict
                log.info("%s: %s; reading again once it answers", self._name, exc)
                await asyncio.sleep(0.5)
            except Exception as exc:  # NATS restarted, a consumer lost, a server error
                idle_reads = 0 if self._next_seq() > start else idle_reads + 1
                if idle_reads >= MAX_IDLE_READS:
                    return f"{idle_reads} reads in a row stopped with nothing read: {exc}"
                log.warning(
                    "%s: read stopped at seq %d (%s); reading again",
                    self._name,
                    self._next_seq() - 1,
                    exc,
                )
                await asyncio.sleep(0.1 * idle_reads)

    async def _follow_nats_py(self, for_s: float | None) -> None:
        """nats-py's ordered push consumer from `next_seq()`, for `for_s` seconds or ever.

        nats-py resets the consumer itself after a reconnect or missed heartbeats.
        """
        loop = asyncio.get_running_loop()
        until = None if for_s is None else loop.time() + for_s
        while until is None or loop.time() < until:
            subscription = None
            try:
                await _until_connected(self._nc)
                subscription = await self._subscribe()
                if until is None:
                    await asyncio.Event().wait()  # for ever: nats-py follows
                else:
                    await asyncio.sleep(max(0.0, until - loop.time()))
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS away or refusing: nats-py reconnects, then this works
                log.warning("%s: cannot follow yet (%s)", self._name, exc)
                await asyncio.sleep(1)
            finally:
                if subscription is not None:
                    with contextlib.suppress(Exception):
                        await subscription.unsubscribe()

    async def _subscribe(self) -> Any:
        start = self._next_seq()
        on_event = self._on_event
        on_caught_up = self._on_caught_up

        async def on_message(msg: Msg) -> None:
            seq, pending, stored_ns = ack_metadata(msg)
            on_event(seq, pending, msg.subject, msg.data, stored_ns)
            if pending == 0:
                on_caught_up()

        subscription = await self._nc.jetstream().subscribe(
            self._subject,
            stream=self._stream,
            cb=on_message,
            ordered_consumer=True,
            config=js_api.ConsumerConfig(
                deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start
            ),
            idle_heartbeat=2.0,
            pending_msgs_limit=-1,
            pending_bytes_limit=256 * 1024 * 1024,
        )
        try:
            info = await subscription.consumer_info()
        except BaseException:
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
            raise
        if not info.num_pending and self._next_seq() == start and not subscription.delivered:
            on_caught_up()  # nothing to read: say so now, not at the first message
        return subscription
