"""JetStream publishes over a bare NATS protocol connection (`shared.bare_nats`).

Why: the usage client publishes every LLM call StockPilot makes, from the same process and
cores as the application. nats-py's `publish_async` costs a future, a semaphore, a token and
its whole receive path (parser, `Msg`, queue, callback task, JSON decode) per message; with
the services and nats-server on the same two cores that cost is what limited ingest
(BENCHMARKS.md). Here a batch of messages is written as one buffer of HPUB frames, each
with `Nats-Msg-Id` and a reply subject numbering it, and the acknowledgements are read as
bytes in the socket's read callback and counted per batch: one future per batch.

A batch's outcome says how many of its messages, from the first, the stream acknowledged,
how many of those were duplicates, the highest stream sequence acknowledged (what a caller
waits for a projection to fold), and why the rest were not (an error answer, no stream,
a lost connection). Nothing is retried here: the caller sends the rest again with the same
Msg-Ids, which JetStream stores once.
"""

from __future__ import annotations

import asyncio
import collections
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from nats.aio.client import Client as NATS

from shared.bare_nats import BareUnavailable, FrameProtocol, open_bare
from shared.nats_errors import NatsStatus, status_line

# A message's outcome in its batch (bytearray cells).
_WAITING = 0
_OK = 1
_DUPLICATE = 2
_ERROR = 3
# The server writes `"duplicate": true` (with a space) and only when it is true.
_DUPLICATE_FIELD = b'"duplicate"'
_SEQ_FIELD = b'"seq":'
_NO_RESPONDERS = status_line(NatsStatus.NO_RESPONDERS)
# An acknowledgement frame whole, as nats-server writes it for each stored message:
# `MSG <inbox>.<number> <sid> <size>` and `{"stream":"S","seq":12}` (a domain after the
# stream when the server has one; `,"duplicate": true` before the brace for a duplicate).
_PUB_ACK = re.compile(
    rb"MSG [^ \r\n]+\.(\d+) [^ \r\n]+ (\d+)\r\n"
    rb'(\{"stream":"[^"\r\n]*",(?:"domain":"[^"\r\n]*",)?"seq":(\d+)(,"duplicate": ?true)?\})\r\n'
)


@dataclass(frozen=True, slots=True)
class Published:
    """What became of a batch: `acked` of its messages, from the first, are stored."""

    size: int
    acked: int
    duplicates: int
    error: str | None
    # The highest stream sequence among the acknowledgements (a duplicate's is the sequence
    # of the copy stored first); 0 when none came.
    last_seq: int = 0


@dataclass(slots=True)
class Batch:
    first: int  # the number in its first message's reply subject
    size: int
    future: asyncio.Future[Published]
    outcomes: bytearray = field(init=False)
    answered: int = 0
    last_seq: int = 0
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.outcomes = bytearray(self.size)

    def refuse_from(self, index: int, error: str) -> None:
        """Messages from `index` on are not sent: answered now, as errors."""
        for position in range(index, self.size):
            self.outcomes[position] = _ERROR
        self.errors.append(error)
        self.answered += self.size - index
        if self.answered == self.size:
            self.finish()

    def finish(self, error: str | None = None) -> None:
        if self.future.done():
            return
        acked = duplicates = 0
        for outcome in self.outcomes:
            if outcome != _OK and outcome != _DUPLICATE:
                break
            acked += 1
            duplicates += outcome == _DUPLICATE
        if acked < self.size and error is None:
            error = self.errors[0] if self.errors else "not acknowledged"
        self.future.set_result(Published(self.size, acked, duplicates, error, self.last_seq))


class Answers:
    """The windows waiting for their acknowledgements, answered by reply number.

    Both publish paths keep one (shared.transport.publish): this connection's frames, and
    nats-py's core publishes with a reply subject each.
    """

    def __init__(self) -> None:
        self.batches: collections.deque[Batch] = collections.deque()

    def body(self, number: int, body: bytes) -> None:
        """A JSON answer: a PubAck (maybe a duplicate) or an error."""
        if body.startswith(b'{"stream"'):
            outcome = _DUPLICATE if _DUPLICATE_FIELD in body else _OK
            self.answer(number, outcome, None, _seq_of(body))
        else:
            self.answer(number, _ERROR, _error_of(body))

    def status(self, number: int, status: bytes) -> None:
        """A status instead of an answer: 503 when no stream takes the subject."""
        # The status line of a frame (the accelerator) or nats-py's Status header.
        if status.startswith(_NO_RESPONDERS) or status == b"%d" % NatsStatus.NO_RESPONDERS:
            reason = "no stream takes the subject (503)"
        else:
            reason = status.decode(errors="replace")
        self.answer(number, _ERROR, reason)

    def answer(self, number: int, outcome: int, error: str | None, seq: int = 0) -> None:
        for batch in self.batches:
            index = number - batch.first
            if 0 <= index < batch.size:
                batch.outcomes[index] = outcome
                if error is not None:
                    batch.errors.append(error)
                if seq > batch.last_seq:
                    batch.last_seq = seq
                batch.answered += 1
                if batch.answered == batch.size:
                    batch.finish()
                    self.batches.remove(batch)
                return
        # An answer to no batch still waiting (late, after a reset): ignored.

    def fail_all(self, reason: str) -> None:
        """Every window still waiting finishes with what it has, as not acknowledged."""
        while self.batches:
            self.batches.popleft().finish(error=reason)


class _Acks(FrameProtocol):
    """Reads the acknowledgements (MSG) and status answers (HMSG) to `<inbox>.<number>`."""

    def __init__(self) -> None:
        super().__init__()
        self.answers = Answers()
        self.batches = self.answers.batches
        self.lost: str | None = None

    def data_received(self, data: bytes) -> None:
        # The acknowledgements lead every chunk, a thousand for a window of HTTP ingest: each
        # matched whole by one regular expression (~1 us) rather than split and read field by
        # field (~3 us, a twentieth of what the usage service spent on a posted record).
        # Whatever else comes (an error answer, a 503 status, PING, a frame the socket cut in
        # two) and everything after it in the chunk goes through the general parser.
        buffer = self.rest + data if self.rest else data
        position = 0
        match = _PUB_ACK.match
        answer = self.answers.answer
        while (ack := match(buffer, position)) is not None and int(ack[2]) == len(ack[3]):
            answer(int(ack[1]), _DUPLICATE if ack[5] else _OK, None, int(ack[4]))
            position = ack.end()
        self.rest = b""
        super().data_received(buffer[position:] if position else buffer)

    def message(self, parts: list[bytes], buffer: bytes, body_start: int, end: int) -> None:
        number = int(parts[1][parts[1].rfind(b".") + 1 :])
        if parts[0] == b"MSG":
            self.answers.body(number, buffer[body_start:end])
        else:
            status = buffer[body_start : body_start + int(parts[-2])].split(b"\r\n", 1)[0]
            self.answers.status(number, status)

    def stopped(self, reason: Exception | None) -> None:
        self.lost = str(reason or "closed")
        self._fail_handshake(reason or BareUnavailable("closed"))
        self.answers.fail_all(self.lost)


def _seq_of(ack: bytes) -> int:
    """The stream sequence of a PubAck (`{"stream":"S","seq":12,...}`), read from its bytes."""
    start = ack.find(_SEQ_FIELD)
    if start < 0:
        return 0
    start += len(_SEQ_FIELD)
    end = ack.find(b",", start)
    if end < 0:
        end = ack.find(b"}", start)
    try:
        return int(ack[start : end if end >= 0 else len(ack)])  # int() ignores spaces
    except ValueError:
        return 0


def _error_of(body: bytes) -> str:
    try:
        error = json.loads(body).get("error") or {}
        return f"{error.get('description', 'error')} ({error.get('code', '?')})"
    except (ValueError, AttributeError):
        return f"unexpected answer {body[:80]!r}"


class BarePublisher:
    """Publishes batches to JetStream with Nats-Msg-Id; one future per batch."""

    def __init__(self, transport: asyncio.Transport, acks: _Acks, inbox: str) -> None:
        self._transport = transport
        self._acks = acks
        self._reply = inbox[:-1].encode()  # "<inbox>." : numbers follow
        self._next = 0
        # nats-server closes a connection that sends a larger message (-ERR 'Maximum
        # Payload Violation'): such a message is refused here instead, as nats-py does.
        info = acks.info.result() if acks.info.done() else {}
        self._max_payload = int(info.get("max_payload") or 1024 * 1024)

    @classmethod
    async def open(cls, nc: NATS, name: str = "stockpilot-publisher") -> BarePublisher:
        """A publisher on its own connection to `nc`'s server; raises BareUnavailable."""
        inbox = nc.new_inbox() + ".*"
        transport, acks = await open_bare(nc, _Acks, name, inbox)
        return cls(transport, acks, inbox)

    @property
    def closed(self) -> bool:
        """Whether the connection is gone (the caller opens a new publisher)."""
        return self._acks.lost is not None or self._transport.is_closing()

    def publish(
        self, subject: str, messages: Sequence[tuple[str, bytes]]
    ) -> asyncio.Future[Published]:
        """Send (msg id, payload) pairs as one write; the future says what was stored."""
        future: asyncio.Future[Published] = asyncio.get_running_loop().create_future()
        batch = Batch(self._next, len(messages), future)
        if self.closed:
            batch.finish(error=self._acks.lost or "publisher closed")
            return future
        head = b"HPUB " + subject.encode() + b" " + self._reply
        frames = []
        number = self._next
        for index, (msg_id, payload) in enumerate(messages):
            headers = b"NATS/1.0\r\nNats-Msg-Id: " + msg_id.encode() + b"\r\n\r\n"
            size = len(headers)
            if size + len(payload) > self._max_payload:
                # Neither it nor what follows is sent (the stream keeps the window's order).
                batch.refuse_from(
                    index,
                    f"message {msg_id[:80]} is over the server's max_payload "
                    f"({size + len(payload)} > {self._max_payload} bytes)",
                )
                break
            frames.append(
                b"%s%d %d %d\r\n%s%s\r\n"
                % (head, number, size, size + len(payload), headers, payload)
            )
            number += 1
        self._next = self._next + len(messages)
        if frames and not batch.future.done():
            self._acks.batches.append(batch)
            self._transport.write(b"".join(frames))
        elif not frames:
            batch.finish()
        return future

    def close(self) -> None:
        """Close the connection; batches still waiting finish as not acknowledged."""
        self._transport.close()
        self._acks.stopped(None)
