"""Projection reads over a bare NATS protocol connection (`shared.bare_nats`).

Why: every service spends its CPU on two things, reading its stream and folding it. nats-py
hands each message through its parser, a `Msg` object, header parsing, the ordered
consumer's sequence checks, a queue and a callback task: about 140k messages/s on the
benchmark machine, while the same frames parse at about 500k/s in Python (measured side by
side over one 300k-event stream; BENCHMARKS.md). With a projection folding at ~150k events/s
that decides whether a replay runs at 0.4 or 0.7 of a raw read, and how much of a core a
service takes from the publishers while following a busy stream.

How: an ephemeral push consumer (no acks, flow control, idle heartbeats every second, in
memory, removed by the server once nobody reads it) delivers from `start_seq` to an inbox of
a second connection opened to the server the main connection uses, with its credentials.
Each message's stream sequence, pending count, subject and payload go straight to `apply`,
in order, inside the socket's read callback, so reading waits while the fold works (no
unbounded buffer). `on_caught_up` is called whenever nothing is pending. Without `follow`
the read ends there; with it, it goes on until cancelled.

Anything unexpected — TLS, credentials other than user/password or a token, an `-ERR`, a gap
in the consumer sequence (also at a heartbeat), a lost socket, silence past `stall_s` —
ends the read with ReadStopped after everything before that point was applied; the caller
reads again (or with nats-py's ordered consumer) from the last sequence it applied, so this
path only ever makes a read cheaper, never different.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from nats.aio.client import Client as NATS
from nats.js import api as js_api

from shared.bare_nats import (
    BareRefused,
    BareUnavailable,
    BareUnreachable,
    FrameProtocol,
    open_bare,
)
from shared.nats_errors import NatsStatus, status_line

log = logging.getLogger("stockpilot.stream_reader")

# apply(stream sequence, messages still pending after it, subject, payload, the time the
# stream stored it in ns since the epoch); the subject is left as bytes for the caller to
# decode only where it needs it.
Apply = Callable[[int, int, bytes, bytes, int], None]

_ACK_PREFIX = b"$JS.ACK."
_LAST_CONSUMER = b"Nats-Last-Consumer:"
_STALLED = b"Nats-Consumer-Stalled:"
_CONTROL = status_line(NatsStatus.CONTROL)
_HEARTBEAT_S = 1.0


def _header(headers: bytes, name: bytes) -> bytes | None:
    """The value of header `name` (given with its colon) in a status message's `headers`."""
    at = headers.find(name)
    if at < 0:
        return None
    return headers[at + len(name) : headers.find(b"\r\n", at)].strip()


class ReadStopped(BareUnavailable):
    """Why a read ended before it was asked to."""


class ServerUnreachable(ReadStopped):
    """The server did not take the read's connection (restarting, lame duck): read later."""


class ReadRefused(ReadStopped):
    """The bare connection cannot work here (TLS, NKeys, credentials it does not speak, a
    server that answered -ERR): reading again the same way would fail the same way."""


class _Reader(FrameProtocol):
    """Hands a push consumer's JetStream messages to `apply`; answers flow control."""

    # Each event is folded in the read callback: after every 64 KB of them (~250 events,
    # a few ms) the service answers its requests and reads its publisher's acknowledgements.
    # Reading on for libuv's 32 reads a turn, a 500k-event replay answered `status` in 750 ms
    # (median) instead of 20 ms; folding a whole 256 KB read a turn, a list posted to HTTP
    # ingest waited a median 24 ms to reach its handler, 8 ms in 64 KB turns
    # (bench/EXPLANATIONS.md).
    turn_every_bytes = 64 * 1024

    def __init__(self, apply: Apply, follow: bool, on_caught_up: Callable[[], None]) -> None:
        super().__init__()
        self.apply = apply
        self.follow = follow
        self.on_caught_up = on_caught_up
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.next_consumer_seq = 1
        self.applied = 0

    def stopped(self, reason: Exception | None) -> None:
        if reason is not None and not isinstance(reason, ReadStopped):
            refused = isinstance(reason, BareRefused)
            reason = (ReadRefused if refused else ReadStopped)(str(reason))
        self._fail_handshake(reason or ReadStopped("ended before the handshake"))
        self.done = True
        if not self.finished.done():
            if reason is None:
                self.finished.set_result(None)
            else:
                self.finished.set_exception(reason)
                self.finished.exception()  # read by read_stream; never "never retrieved"

    # ----- frames ----------------------------------------------------------------------

    def message(self, parts: list[bytes], buffer: bytes, body_start: int, end: int) -> None:
        # Runs for every event read: a stored message is handled here, inline (one Python
        # call less an event is ~1 % of a replay), and anything else by the helpers.
        with_headers = parts[0] == b"HMSG"
        header_size = int(parts[-2]) if with_headers else 0
        reply = parts[3] if len(parts) == (6 if with_headers else 5) else b""
        if not reply.startswith(_ACK_PREFIX):
            if with_headers:  # a status message: heartbeat or flow control request
                self._status(buffer[body_start : body_start + header_size], reply)
            return
        # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>
        tokens = reply.split(b".")
        if len(tokens) != 9:
            raise ReadStopped(f"unexpected reply subject {reply!r}")
        consumer_seq = int(tokens[6])
        if consumer_seq != self.next_consumer_seq:
            raise ReadStopped(
                f"consumer sequence {consumer_seq} after {self.next_consumer_seq - 1}"
            )
        self.next_consumer_seq = consumer_seq + 1
        pending = int(tokens[8])
        self.apply(
            int(tokens[5]),
            pending,
            parts[1],
            buffer[body_start + header_size : end],
            int(tokens[7]),
        )
        self.applied += 1
        if pending == 0:
            self._caught_up()

    def _status(self, headers: bytes, reply: bytes) -> None:
        status = headers.split(b"\r\n", 1)[0]
        if not status.startswith(_CONTROL):
            raise ReadStopped(f"consumer status {status.decode(errors='replace')}")
        if reply:  # flow control: the server waits for this before sending more
            self._answer(reply)
            return
        # An idle heartbeat. While a flow-control answer is owed (the server ignores one that
        # is not for its latest request), it names the subject to answer: unanswered, the
        # consumer sends nothing more, yet its heartbeats go on, so no stall check would fire
        # (nats-py and the Go client answer it too).
        owed = _header(headers, _STALLED)
        if owed:
            self._answer(owed)
        # It names the last consumer sequence sent (a lost tail shows here).
        sent = _header(headers, _LAST_CONSUMER)
        if sent is not None:
            last = int(sent)
            if last != self.next_consumer_seq - 1:
                raise ReadStopped(f"heartbeat says {last} sent, {self.next_consumer_seq - 1} read")
        self._caught_up()

    # ----- helpers ---------------------------------------------------------------------

    def _answer(self, flow_control: bytes) -> None:
        """The empty message a flow-control request (or a stalled heartbeat) waits for."""
        self.write(b"PUB " + flow_control + b" 0\r\n\r\n")

    def _caught_up(self) -> None:
        self.on_caught_up()
        if not self.follow:
            self.stopped(None)


async def read_stream(
    nc: NATS,
    stream: str,
    subject: str,
    start_seq: int,
    apply: Apply,
    *,
    follow: bool = False,
    on_caught_up: Callable[[], None] = lambda: None,
    stall_s: float = 5.0,
) -> int:
    """Deliver `stream`'s messages on `subject` from `start_seq` to `apply`, in order.

    Without `follow`, returns how many were applied once nothing is pending. With it, runs
    until cancelled. Raises ReadStopped (or a NATS error from creating the consumer) when
    the read ended early, after applying everything before that point.
    """
    loop = asyncio.get_running_loop()
    inbox = nc.new_inbox()
    try:
        transport, reader = await open_bare(
            nc, lambda: _Reader(apply, follow, on_caught_up), "stockpilot-stream-reader", inbox
        )
    except ReadStopped:
        raise
    except BareRefused as exc:
        raise ReadRefused(str(exc)) from None
    except BareUnreachable as exc:
        raise ServerUnreachable(str(exc)) from None
    except BareUnavailable as exc:
        raise ReadStopped(str(exc)) from None
    consumer: str | None = None
    try:
        created = await nc.jetstream().add_consumer(
            stream,
            js_api.ConsumerConfig(
                deliver_subject=inbox,
                filter_subject=subject,
                deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE,
                opt_start_seq=start_seq,
                ack_policy=js_api.AckPolicy.NONE,
                flow_control=True,
                idle_heartbeat=_HEARTBEAT_S,
                mem_storage=True,
                num_replicas=1,
                inactive_threshold=30.0,
                description="stockpilot projection read",
            ),
        )
        consumer = created.name
        sent = created.delivered.consumer_seq if created.delivered is not None else 0
        if not created.num_pending and not sent:
            reader._caught_up()  # nothing to read: say so now, not at the first heartbeat
        # Heartbeats arrive every second when the consumer is idle: silence means trouble.
        while not reader.finished.done():
            await asyncio.wait([reader.finished], timeout=1.0)
            if loop.time() - reader.last_read > stall_s:
                raise ReadStopped(f"nothing received for {stall_s:g}s")
        reader.finished.result()
        return reader.applied
    finally:
        transport.close()
        if consumer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.jetstream().delete_consumer(stream, consumer), 2.0)
