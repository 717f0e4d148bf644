"""Reading a stretch of STOCKPILOT_USAGE for the spend log: the messages with sequences in
[first, last], and the position of a time.

Two paths, as for the projections' reads (docs/architecture.md "Reading a stream"): the bare
protocol reader of `shared.stream_reader` (about ten times nats-py's rate here: 60–70k
messages/s against 6–10k on the shared 2-core machine, where a page reads up to 50,000),
stopped once it has passed `last`; and nats-py's ordered consumer, which carries the read
whenever the bare one cannot (TLS, NKeys) or stops early, from the first sequence it did not
deliver. The bare path only makes a read cheaper, never different.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

import msgspec
from nats.js import JetStreamContext
from nats.js import api as js_api

from shared.errors import UnavailableError
from shared.stream_reader import ReadStopped, read_stream
from shared.transport import ack_metadata

log = logging.getLogger("stockpilot.usage.spend_log")

Message = tuple[int, bytes, bytes, int]  # sequence, subject, payload, stored (ns)

# A consumer that delivers nothing for this long means the stream is unavailable.
STALL_S = 5.0
BARE = "bare"
NATS_PY = "nats-py"

_json = msgspec.json.Encoder().encode


class _PassedLast(ReadStopped):
    """The bare read reached the end of its range (how a range read stops)."""


async def read_range(
    js: JetStreamContext, stream: str, subject: str, first: int, last: int, bare: bool = True
) -> tuple[list[Message], str]:
    """Every message of `stream` (on `subject`, its subjects) with a sequence in
    [first, last], in order, and the path that read them (BARE or NATS_PY)."""
    got: list[Message] = []
    if bare:
        try:
            await _bare_range(js, stream, subject, first, last, got)
            return got, BARE
        except _PassedLast:
            return got, BARE
        except ReadStopped as exc:
            log.info("spend log: the bare read stopped (%s); nats-py reads on", exc)
    resume = got[-1][0] + 1 if got else first
    if resume <= last:
        got += await _ordered_range(js, stream, subject, resume, last)
    return got, NATS_PY


async def _bare_range(
    js: JetStreamContext, stream: str, subject: str, first: int, last: int, got: list[Message]
) -> None:
    def apply(seq: int, pending: int, msg_subject: bytes, payload: bytes, stored_ns: int) -> None:
        if seq <= last:
            got.append((seq, msg_subject, payload, stored_ns))
        if seq >= last:
            raise _PassedLast(f"passed {last}")

    # Without anything pending (the stream ends within the range) the read ends by itself.
    await read_stream(js._nc, stream, subject, first, apply, stall_s=STALL_S)  # noqa: SLF001


async def _ordered_range(
    js: JetStreamContext, stream: str, subject: str, first: int, last: int
) -> list[Message]:
    got: list[Message] = []
    done = asyncio.Event()

    async def on_message(msg: Any) -> None:
        # The runtime's own parse of the reply subject: the stored time to the nanosecond, as
        # the fold is given it (msg.metadata's datetime keeps microseconds only).
        seq, pending, stored_ns = ack_metadata(msg)
        if seq <= last:
            got.append((seq, msg.subject.encode(), msg.data, stored_ns))
        if seq >= last or not pending:
            done.set()

    sub = await js.subscribe(
        subject,
        stream=stream,
        cb=on_message,
        ordered_consumer=True,
        config=js_api.ConsumerConfig(
            deliver_policy=js_api.DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=first
        ),
        pending_msgs_limit=-1,
        pending_bytes_limit=256 * 1024 * 1024,
    )
    try:
        await asyncio.wait_for(done.wait(), STALL_S)
    except TimeoutError:
        if not got:
            raise UnavailableError(
                f"the usage stream delivered nothing from sequence {first} within {STALL_S:g}s"
            ) from None
    finally:
        await sub.unsubscribe()
    return got


async def first_stored_at(js: JetStreamContext, stream: str, moment: datetime) -> int | None:
    """The sequence of the first message stored at or after `moment` (None: there is none),
    by JetStream's start-by-time direct get."""
    nc = js._nc  # noqa: SLF001 - nats-py has no start-time get; as services.batch.locks does
    request = _json({"start_time": moment.astimezone(UTC).isoformat().replace("+00:00", "Z")})
    subject = f"{js._prefix}.DIRECT.GET.{stream}"  # noqa: SLF001
    msg = await nc.request(subject, request, timeout=STALL_S)
    headers = msg.headers or {}
    if headers.get("Status"):  # 404: nothing stored since
        return None
    return int(headers["Nats-Sequence"])
