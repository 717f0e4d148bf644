"""Long stream backlogs read over a bare NATS protocol connection, several times faster.

Why: a service starting on a long stream (no snapshot, or a snapshot far behind) spends its
start-up reading. nats-py hands each message through its parser, a `Msg` object, header
parsing, the ordered consumer's sequence checks, a queue and a callback task: about 140k
messages/s on the benchmark machine, while the protocol itself parses at about 500k/s in
Python (measured side by side over the same 300k-event stream; see BENCHMARKS.md). With a
projection folding at ~165k events/s, that difference decides whether a replay runs at 0.5 or
0.8 of a raw read. nats-core, the NATS team's lean client, needs Python 3.13 (this project
runs 3.11), so the few frames a catch-up needs are parsed here.

How: an ephemeral push consumer (no acks, flow control, idle heartbeats, in memory, removed
by the server when idle) delivers from `start_seq` to an inbox of a second connection opened
to the same server with the same credentials. Each message's stream sequence, pending count,
subject and payload go straight to `apply`, in order, inside the socket's read callback (so
reading waits while the fold works: no unbounded buffer). The read ends when a message says
nothing is pending, or when the consumer is idle.

Anything unexpected — TLS, credentials other than user/password or a token, an `-ERR`, a gap
in the consumer sequence, a lost socket, a timeout — ends the read early and is logged; the
caller goes on with the ordered consumer from the last sequence applied, so this path only
ever makes a catch-up faster, never different.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import unquote

from nats.aio.client import Client as NATS
from nats.js import api as js_api

log = logging.getLogger("stockpilot.catch_up")

# apply(stream sequence, messages still pending after it, subject, payload)
Apply = Callable[[int, int, str, bytes], None]

_ACK_PREFIX = b"$JS.ACK."
_CONNECT_TIMEOUT_S = 5.0
_HEARTBEAT_S = 1.0


class CatchUpStopped(Exception):
    """Why a catch-up read ended before the end of the stream."""


class _Reader(asyncio.Protocol):
    """Parses INFO, PING, -ERR, MSG and HMSG frames; hands JetStream messages to `apply`."""

    def __init__(self, sid: bytes, apply: Apply) -> None:
        self.sid = sid
        self.apply = apply
        self.buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        loop = asyncio.get_running_loop()
        self.info: asyncio.Future[dict[str, Any]] = loop.create_future()
        self.pong: asyncio.Future[None] = loop.create_future()
        self.finished: asyncio.Future[None] = loop.create_future()
        self.next_consumer_seq = 1
        self.applied = 0
        self.last_read = loop.time()

    # ----- asyncio.Protocol ------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        self.transport = cast(asyncio.Transport, transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self._end(CatchUpStopped(f"connection lost: {exc or 'closed by the server'}"))

    def data_received(self, data: bytes) -> None:
        self.last_read = asyncio.get_running_loop().time()
        buffer = self.buffer
        buffer += data
        position = 0
        try:
            while not self.finished.done():
                line_end = buffer.find(b"\r\n", position)
                if line_end < 0:
                    break
                first = buffer[position]
                if first in (72, 77):  # HMSG / MSG
                    consumed = self._message(buffer, position, line_end)
                    if consumed < 0:
                        break  # the payload has not fully arrived yet
                    position = consumed
                    continue
                line = bytes(buffer[position:line_end])
                position = line_end + 2
                self._control(line)
        except CatchUpStopped as exc:
            self._end(exc)
        except Exception as exc:  # a frame this parser cannot read: stop, the caller falls back
            self._end(CatchUpStopped(f"unreadable frame: {exc!r}"))
        del buffer[:position]

    # ----- frames ----------------------------------------------------------------------

    def _control(self, line: bytes) -> None:
        if line.startswith(b"PING"):
            self._write(b"PONG\r\n")
        elif line.startswith(b"PONG"):
            if not self.pong.done():
                self.pong.set_result(None)
        elif line.startswith(b"INFO "):
            if not self.info.done():
                self.info.set_result(json.loads(line[5:]))
        elif line.startswith(b"-ERR"):
            self._end(CatchUpStopped(f"server error: {line[5:].decode(errors='replace')}"))
        # +OK and anything else: nothing to do.

    def _message(self, buffer: bytearray, position: int, line_end: int) -> int:
        """Handle one MSG/HMSG frame; the position after it, or -1 if it is incomplete."""
        parts = bytes(buffer[position:line_end]).split(b" ")
        with_headers = parts[0] == b"HMSG"
        total = int(parts[-1])
        header_size = int(parts[-2]) if with_headers else 0
        reply = parts[3] if len(parts) == (6 if with_headers else 5) else b""
        body_start = line_end + 2
        end = body_start + total
        if len(buffer) < end + 2:
            return -1
        if reply.startswith(_ACK_PREFIX):
            self._jetstream_message(parts[1], reply, bytes(buffer[body_start + header_size : end]))
        elif with_headers:  # a status message: heartbeat or flow control request
            status = bytes(buffer[body_start : body_start + header_size]).split(b"\r\n", 1)[0]
            if not status.startswith(b"NATS/1.0 100"):
                raise CatchUpStopped(f"consumer status {status.decode(errors='replace')}")
            if reply:
                self._write(b"PUB " + reply + b" 0\r\n\r\n")  # flow control: keep sending
            else:
                self._end(None)  # idle heartbeat: nothing more to deliver right now
        return end + 2

    def _jetstream_message(self, subject: bytes, reply: bytes, payload: bytes) -> None:
        # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>
        tokens = reply.split(b".")
        if len(tokens) != 9:
            raise CatchUpStopped(f"unexpected reply subject {reply!r}")
        consumer_seq = int(tokens[6])
        if consumer_seq != self.next_consumer_seq:
            raise CatchUpStopped(
                f"consumer sequence {consumer_seq} after {self.next_consumer_seq - 1}"
            )
        self.next_consumer_seq += 1
        pending = int(tokens[8])
        self.apply(int(tokens[5]), pending, subject.decode(), payload)
        self.applied += 1
        if pending == 0:
            self._end(None)

    # ----- helpers ---------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _end(self, reason: BaseException | None) -> None:
        for future in (self.info, self.pong):
            if not future.done():
                future.set_exception(reason or CatchUpStopped("ended before the handshake"))
                future.exception()
        if not self.finished.done():
            if reason is None:
                self.finished.set_result(None)
            else:
                self.finished.set_exception(reason)
                self.finished.exception()  # read by catch_up; never "never retrieved"


def _connect_options(nc: NATS, info: dict[str, Any]) -> bytes:
    url = nc.connected_url
    if url is None:
        raise CatchUpStopped("not connected")
    if url.scheme not in ("nats", "") or info.get("tls_required"):
        raise CatchUpStopped("TLS connections are not read this way")
    options: dict[str, Any] = {
        "verbose": False,
        "pedantic": False,
        "headers": True,
        "no_responders": True,
        "protocol": 1,
        "name": "stockpilot-catch-up",
        "lang": "python3",
        "version": "stockpilot",
    }
    if url.username and url.password is not None:
        options["user"] = unquote(url.username)
        options["pass"] = unquote(url.password)
    elif url.username:
        options["auth_token"] = unquote(url.username)
    elif info.get("auth_required"):
        raise CatchUpStopped("the server wants credentials this reader does not handle")
    return b"CONNECT " + json.dumps(options).encode() + b"\r\n"


async def catch_up(
    nc: NATS,
    stream: str,
    subject: str,
    start_seq: int,
    apply: Apply,
    *,
    stall_s: float = 10.0,
) -> int:
    """Deliver `stream`'s messages on `subject` from `start_seq` to its end to `apply`.

    Returns how many were applied; raises CatchUpStopped (or a NATS error from creating the
    consumer) when the read ended early, after applying everything before that point.
    """
    url = nc.connected_url
    if url is None or url.hostname is None:
        raise CatchUpStopped("not connected")
    loop = asyncio.get_running_loop()
    inbox = nc.new_inbox()
    transport, reader = await asyncio.wait_for(
        loop.create_connection(lambda: _Reader(b"1", apply), url.hostname, url.port or 4222),
        _CONNECT_TIMEOUT_S,
    )
    consumer: str | None = None
    try:
        info = await asyncio.wait_for(reader.info, _CONNECT_TIMEOUT_S)
        transport.write(_connect_options(nc, info))
        transport.write(f"SUB {inbox} 1\r\nPING\r\n".encode())
        await asyncio.wait_for(reader.pong, _CONNECT_TIMEOUT_S)  # connected and subscribed
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
                description="stockpilot catch-up read",
            ),
        )
        consumer = created.name
        # Heartbeats arrive every second when the consumer is idle: silence means trouble.
        while not reader.finished.done():
            await asyncio.wait([reader.finished], timeout=1.0)
            if loop.time() - reader.last_read > stall_s:
                raise CatchUpStopped(f"nothing received for {stall_s:g}s")
        reader.finished.result()
        return reader.applied
    except TimeoutError:
        raise CatchUpStopped("no answer from the server while connecting") from None
    finally:
        transport.close()
        if consumer is not None:
            with contextlib.suppress(Exception):
                await nc.jetstream().delete_consumer(stream, consumer)
