"""Reading streams fast, and the JSON-lines form of stored messages (export, import, tail).

Why one module of over 300 lines: it is the one stored-message format and the reading and
writing that use it (export, import, tail, replay); the line format and the stream reads that
produce and consume it must change together.

One exported line per stored message:
`{"stream","seq","subject","time","headers","data"}`, where `data` is the payload itself when
it is one line of UTF-8 JSON (every event is), kept byte for byte; any other payload is
`"data": null, "data_b64": "<base64>"`. Import publishes each line's bytes and headers
(`Nats-Msg-Id` included) to its subject, so `export | import` reproduces a stream.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import sys
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterable
from datetime import datetime
from typing import IO

import msgspec
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api

from shared.events import AwareDatetime

# Publish preconditions, not data: a fresh server's sequences differ, so import drops them.
PRECONDITION_PREFIX = "Nats-Expected-"
_NULL = msgspec.Raw(b"null")


class StoredMessage(msgspec.Struct, kw_only=True):
    """One stored (or, for tail on a core subject, seen) message as a JSON line."""

    stream: str | None
    seq: int | None
    subject: str
    time: AwareDatetime | None
    headers: dict[str, str] | None = None
    data: msgspec.Raw = _NULL
    data_b64: str | None = None

    def payload(self) -> bytes:
        """The message bytes exactly as they were stored."""
        if self.data_b64 is not None:
            return base64.b64decode(self.data_b64)
        return bytes(self.data)


_encode = msgspec.json.Encoder().encode
_decode_line = msgspec.json.Decoder(StoredMessage).decode
_check_json = msgspec.json.Decoder().decode


def _is_one_line_json(data: bytes) -> bool:
    if not data or b"\n" in data or b"\r" in data or data != data.strip():
        return False
    try:
        data.decode("utf-8")
        _check_json(data)
    except (UnicodeDecodeError, msgspec.DecodeError):
        return False
    return True


def stored_message(
    subject: str,
    data: bytes,
    *,
    stream: str | None,
    seq: int | None,
    moment: datetime | None,
    headers: dict[str, str] | None,
) -> StoredMessage:
    """The JSON-lines form of one message."""
    if _is_one_line_json(data):
        return StoredMessage(
            stream=stream,
            seq=seq,
            subject=subject,
            time=moment,
            headers=headers or None,
            data=msgspec.Raw(data),
        )
    return StoredMessage(
        stream=stream,
        seq=seq,
        subject=subject,
        time=moment,
        headers=headers or None,
        data_b64=base64.b64encode(data).decode("ascii"),
    )


def from_msg(msg: Msg) -> StoredMessage:
    """A JetStream (or core) message as a StoredMessage."""
    if msg.reply and msg.reply.startswith("$JS.ACK."):
        meta = msg.metadata
        return stored_message(
            msg.subject,
            msg.data,
            stream=meta.stream,
            seq=meta.sequence.stream,
            moment=meta.timestamp,
            headers=msg.headers,
        )
    return stored_message(
        msg.subject, msg.data, stream=None, seq=None, moment=None, headers=msg.headers
    )


def encode_line(message: StoredMessage) -> bytes:
    """One JSON line, newline included."""
    return _encode(message) + b"\n"


def decode_line(line: bytes) -> StoredMessage:
    """A StoredMessage from one exported line."""
    return _decode_line(line)


class Progress:
    """Progress lines on stderr, at most one a second."""

    def __init__(self, what: str, total: int | None = None, out: IO[str] | None = None) -> None:
        self.what = what
        self.total = total
        self.done = 0
        self._out = out or sys.stderr
        self._started = time.monotonic()
        self._last = self._started

    def tick(self, count: int = 1) -> None:
        """Count work done; print at most once a second."""
        self.done += count
        now = time.monotonic()
        if now - self._last >= 1.0:
            self._last = now
            self._print(now)

    def finish(self, extra: str = "") -> None:
        """The final line."""
        self._print(time.monotonic(), final=True, extra=extra)

    def _print(self, now: float, final: bool = False, extra: str = "") -> None:
        elapsed = max(now - self._started, 1e-6)
        of = f"/{self.total}" if self.total is not None and not final else ""
        rate = self.done / elapsed
        line = f"{self.what}: {self.done}{of} messages in {elapsed:.1f}s ({rate:,.0f}/s){extra}"
        print(line, file=self._out, flush=True)


async def read_stream(
    js: JetStreamContext,
    stream: str,
    on_message: Callable[[Msg], None],
    *,
    subject: str | None = None,
    start: js_api.ConsumerConfig | None = None,
    end_seq: int | None = None,
    stop_at: Callable[[Msg], bool] | None = None,
) -> None:
    """Feed every stored message from `start` up to `end_seq` to `on_message`, in order.

    An ordered push consumer with a callback: the fastest way to read a stream in nats-py
    (see PERF_NOTES). `end_seq` defaults to the stream's last sequence when called;
    `stop_at(msg)` true ends the read before that message.
    """
    if end_seq is None:
        end_seq = (await js.stream_info(stream)).state.last_seq
    if end_seq <= 0:
        return
    done = asyncio.Event()
    failure: list[BaseException] = []

    async def callback(msg: Msg) -> None:
        if done.is_set():
            return
        meta = msg.metadata
        seq = meta.sequence.stream
        if seq > end_seq or (stop_at is not None and stop_at(msg)):
            done.set()
            return
        try:
            on_message(msg)
        except Exception as exc:  # surfaced to the caller, not lost in the client's task
            failure.append(exc)
            done.set()
            return
        if seq >= end_seq or meta.num_pending == 0:
            done.set()

    config = start or js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.ALL)
    subscription = await js.subscribe(
        subject or ">",
        stream=stream,
        cb=callback,
        ordered_consumer=True,
        config=config,
        idle_heartbeat=2.0,
        pending_msgs_limit=-1,
        pending_bytes_limit=256 * 1024 * 1024,
        inactive_threshold=30.0,
    )
    try:
        info = await subscription.consumer_info()
        delivered = info.delivered.consumer_seq if info.delivered is not None else 0
        if info.num_pending == 0 and delivered == 0:
            done.set()  # nothing in range, and nothing on its way
        await done.wait()
    finally:
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()
    if failure:
        raise failure[0]


def start_config(
    since: datetime | None = None, from_seq: int | None = None
) -> js_api.ConsumerConfig:
    """Where an export starts: a time, a sequence, or the first message."""
    if from_seq is not None:
        return js_api.ConsumerConfig(
            deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=max(from_seq, 1)
        )
    if since is not None:
        return js_api.ConsumerConfig(
            deliver_policy=js_api.DeliverPolicy.BY_START_TIME, opt_start_time=since
        )
    return js_api.ConsumerConfig(deliver_policy=js_api.DeliverPolicy.ALL)


async def export_stream(
    js: JetStreamContext,
    stream: str,
    out: IO[bytes],
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    from_seq: int | None = None,
    progress: Progress | None = None,
) -> int:
    """Write the stream's messages as JSON lines; how many were written."""
    buffer: list[bytes] = []
    count = 0

    def on_message(msg: Msg) -> None:
        nonlocal count
        buffer.append(encode_line(from_msg(msg)))
        count += 1
        if len(buffer) >= 1000:
            out.write(b"".join(buffer))
            buffer.clear()
            if progress is not None:
                progress.tick(1000)

    def after_until(msg: Msg) -> bool:
        return until is not None and msg.metadata.timestamp > until

    await read_stream(
        js,
        stream,
        on_message,
        start=start_config(since, from_seq),
        stop_at=after_until if until is not None else None,
    )
    out.write(b"".join(buffer))
    out.flush()
    if progress is not None:
        progress.tick(len(buffer))
    return count


def publish_headers(headers: dict[str, str] | None, keep_preconditions: bool) -> dict[str, str]:
    """The headers to publish an imported message with."""
    if not headers:
        return {}
    if keep_preconditions:
        return dict(headers)
    return {k: v for k, v in headers.items() if not k.startswith(PRECONDITION_PREFIX)}


class ImportReport(msgspec.Struct, kw_only=True):
    """What an import did."""

    published: int
    duplicates: int
    streams: dict[str, int]


async def import_messages(
    js: JetStreamContext,
    batches: AsyncIterable[list[bytes]],
    *,
    keep_preconditions: bool = False,
    progress: Progress | None = None,
) -> ImportReport:
    """Publish every message of `batches` (an async iterable of line lists), in order."""
    pending: list[asyncio.Future[js_api.PubAck]] = []
    report = ImportReport(published=0, duplicates=0, streams={})

    def settle(acks: Iterable[js_api.PubAck]) -> None:
        for ack in acks:
            if ack.duplicate:
                report.duplicates += 1
            else:
                report.published += 1
                report.streams[ack.stream] = report.streams.get(ack.stream, 0) + 1

    number = 0
    async for lines in batches:
        for line in lines:
            number += 1
            if not line.strip():
                continue
            try:
                message = decode_line(line)
            except msgspec.DecodeError as exc:
                raise ValueError(f"line {number} is not an exported message: {exc}") from None
            headers = publish_headers(message.headers, keep_preconditions)
            future = await js.publish_async(
                message.subject, message.payload(), headers=headers or None
            )
            pending.append(future)
            if progress is not None:
                progress.tick()
        if len(pending) >= 4096:
            settle(await asyncio.gather(*pending))
            pending.clear()
    settle(await asyncio.gather(*pending))
    return report


async def stdin_batches(stream: IO[bytes], hint: int = 1 << 20) -> AsyncIterator[list[bytes]]:
    """Lines of a binary stream in batches, read off the event loop."""
    while True:
        lines = await asyncio.to_thread(stream.readlines, hint)
        if not lines:
            return
        yield lines
