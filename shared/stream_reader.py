"""Projection reads over a bare NATS protocol connection: several times cheaper per event.

Why: every service spends its CPU on two things, reading its stream and folding it. nats-py
hands each message through its parser, a `Msg` object, header parsing, the ordered
consumer's sequence checks, a queue and a callback task: about 140k messages/s on the
benchmark machine, while the same frames parse at about 500k/s in Python (measured side by
side over one 300k-event stream; BENCHMARKS.md). With a projection folding at ~150k events/s
that decides whether a replay runs at 0.4 or 0.7 of a raw read, and how much of a core a
service takes from the publishers while following a busy stream. nats-core, the NATS team's
lean client, needs Python 3.13 (this project runs 3.11), so the few frames a projection
read needs are parsed here; everything else (requests, publishing, the JetStream API) stays
on nats-py.

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
import json
import logging
from collections.abc import Callable
from typing import Any, cast
from urllib.parse import unquote

from nats.aio.client import Client as NATS
from nats.js import api as js_api

log = logging.getLogger("stockpilot.stream_reader")

# apply(stream sequence, messages still pending after it, subject, payload); the subject is
# left as bytes (decoding it for every message cost more than the rare dead letter needs).
Apply = Callable[[int, int, bytes, bytes], None]

_ACK_PREFIX = b"$JS.ACK."
_LAST_CONSUMER = b"Nats-Last-Consumer:"
_CONNECT_TIMEOUT_S = 5.0
_HEARTBEAT_S = 1.0


class ReadStopped(Exception):
    """Why a read ended before it was asked to."""


class _Reader(asyncio.Protocol):
    """Parses INFO, PING, -ERR, MSG and HMSG frames; hands JetStream messages to `apply`."""

    def __init__(self, apply: Apply, follow: bool, on_caught_up: Callable[[], None]) -> None:
        self.apply = apply
        self.follow = follow
        self.on_caught_up = on_caught_up
        # The unparsed end of the last chunk (a frame cut in two by the socket).
        self.rest = b""
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
        self._end(ReadStopped(f"connection lost: {exc or 'closed by the server'}"))

    def data_received(self, data: bytes) -> None:
        self.last_read = asyncio.get_running_loop().time()
        # Parsed as immutable bytes: slices and splits are then the payloads and fields
        # themselves, with no bytearray-to-bytes copy per message (a fifth of the reader).
        buffer = self.rest + data if self.rest else data
        position = 0
        try:
            while not self.finished.done():
                line_end = buffer.find(b"\r\n", position)
                if line_end < 0:
                    break
                if buffer[position] in (72, 77):  # HMSG / MSG
                    consumed = self._message(buffer, position, line_end)
                    if consumed < 0:
                        break  # the payload has not fully arrived yet
                    position = consumed
                else:
                    line = buffer[position:line_end]
                    position = line_end + 2
                    self._control(line)
        except ReadStopped as exc:
            self._end(exc)
        except Exception as exc:  # a frame this parser cannot read: stop, the caller goes on
            self._end(ReadStopped(f"unreadable frame: {exc!r}"))
        self.rest = buffer[position:]

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
            raise ReadStopped(f"server error: {line[5:].decode(errors='replace')}")
        # +OK and anything else: nothing to do.

    def _message(self, buffer: bytes, position: int, line_end: int) -> int:
        """Handle one MSG/HMSG frame; the position after it, or -1 if it is incomplete."""
        parts = buffer[position:line_end].split(b" ")
        with_headers = parts[0] == b"HMSG"
        total = int(parts[-1])
        header_size = int(parts[-2]) if with_headers else 0
        reply = parts[3] if len(parts) == (6 if with_headers else 5) else b""
        body_start = line_end + 2
        end = body_start + total
        if len(buffer) < end + 2:
            return -1
        if reply.startswith(_ACK_PREFIX):
            self._jetstream_message(parts[1], reply, buffer[body_start + header_size : end])
        elif with_headers:  # a status message: heartbeat or flow control request
            self._status(buffer[body_start : body_start + header_size], reply)
        return end + 2

    def _jetstream_message(self, subject: bytes, reply: bytes, payload: bytes) -> None:
        # $JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>.<consumer seq>.<ts>.<pending>
        tokens = reply.split(b".")
        if len(tokens) != 9:
            raise ReadStopped(f"unexpected reply subject {reply!r}")
        consumer_seq = int(tokens[6])
        if consumer_seq != self.next_consumer_seq:
            raise ReadStopped(
                f"consumer sequence {consumer_seq} after {self.next_consumer_seq - 1}"
            )
        self.next_consumer_seq += 1
        pending = int(tokens[8])
        self.apply(int(tokens[5]), pending, subject, payload)
        self.applied += 1
        if pending == 0:
            self._caught_up()

    def _status(self, headers: bytes, reply: bytes) -> None:
        status = headers.split(b"\r\n", 1)[0]
        if not status.startswith(b"NATS/1.0 100"):
            raise ReadStopped(f"consumer status {status.decode(errors='replace')}")
        if reply:  # flow control: the server waits for this before sending more
            self._write(b"PUB " + reply + b" 0\r\n\r\n")
            return
        # An idle heartbeat: it names the last consumer sequence sent (a lost tail shows here).
        at = headers.find(_LAST_CONSUMER)
        if at >= 0:
            last = int(headers[at + len(_LAST_CONSUMER) : headers.find(b"\r\n", at)])
            if last != self.next_consumer_seq - 1:
                raise ReadStopped(f"heartbeat says {last} sent, {self.next_consumer_seq - 1} read")
        self._caught_up()

    # ----- helpers ---------------------------------------------------------------------

    def _caught_up(self) -> None:
        self.on_caught_up()
        if not self.follow:
            self._end(None)

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _end(self, reason: BaseException | None) -> None:
        for future in (self.info, self.pong):
            if not future.done():
                future.set_exception(reason or ReadStopped("ended before the handshake"))
                future.exception()
        if not self.finished.done():
            if reason is None:
                self.finished.set_result(None)
            else:
                self.finished.set_exception(reason)
                self.finished.exception()  # read by read_stream; never "never retrieved"


def _connect_options(nc: NATS, info: dict[str, Any]) -> bytes:
    url = nc.connected_url
    if url is None:
        raise ReadStopped("not connected")
    if url.scheme not in ("nats", "") or info.get("tls_required"):
        raise ReadStopped("TLS connections are read by nats-py")
    options: dict[str, Any] = {
        "verbose": False,
        "pedantic": False,
        "headers": True,
        "no_responders": True,
        "protocol": 1,
        "name": "stockpilot-stream-reader",
        "lang": "python3",
        "version": "stockpilot",
    }
    # The main connection's credentials: in its URL, or given to nats-py as options.
    given = nc.options
    if given.get("user_credentials") or given.get("nkeys_seed") or given.get("nkeys_seed_str"):
        raise ReadStopped("NKey and JWT credentials are read by nats-py")
    if url.username and url.password is not None:
        options["user"] = unquote(url.username)
        options["pass"] = unquote(url.password)
    elif url.username:
        options["auth_token"] = unquote(url.username)
    elif given.get("user"):
        options["user"] = given["user"]
        options["pass"] = given.get("password") or ""
    elif given.get("token"):
        options["auth_token"] = given["token"]
    elif info.get("auth_required"):
        raise ReadStopped("the server wants credentials this reader does not handle")
    return b"CONNECT " + json.dumps(options).encode() + b"\r\n"


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
    url = nc.connected_url
    if url is None or url.hostname is None:
        raise ReadStopped("not connected")
    loop = asyncio.get_running_loop()
    inbox = nc.new_inbox()
    transport, reader = await asyncio.wait_for(
        loop.create_connection(
            lambda: _Reader(apply, follow, on_caught_up), url.hostname, url.port or 4222
        ),
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
    except TimeoutError:
        raise ReadStopped("no answer from the server while connecting") from None
    finally:
        transport.close()
        if consumer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.jetstream().delete_consumer(stream, consumer), 2.0)
