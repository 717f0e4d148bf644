"""Dead letters: what a service refused, with the reason, copied to
`stockpilot.deadletter.<service>` (core NATS, not stored in the four streams)."""

from __future__ import annotations

import base64
from datetime import datetime

import msgspec
from nats.aio.client import Client as NATS

from shared.events import AwareDatetime, utc_now

_encode = msgspec.json.Encoder().encode


def dead_letter_subject(service: str) -> str:
    """Where a service copies what it cannot decode or apply."""
    return f"stockpilot.deadletter.{service}"


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """A message a service refused, with the reason, copied to `stockpilot.deadletter.<svc>`."""

    service: str
    subject: str
    stream_seq: int | None
    reason: str
    payload: str
    payload_encoding: str
    occurred_at: AwareDatetime
    # The copy is cut at DEAD_LETTER_PAYLOAD_MAX bytes (a refused event may be as large as
    # the server takes, and the letter must fit in one message too); the original stays in
    # the stream at `stream_seq`.
    payload_bytes: int | None = None
    payload_truncated: bool = False


DEAD_LETTER_PAYLOAD_MAX = 64 * 1024


async def dead_letter(
    nc: NATS,
    service: str,
    subject: str,
    data: bytes,
    reason: str,
    stream_seq: int | None = None,
    now: datetime | None = None,
) -> None:
    """Copy a refused message, with the reason, to `stockpilot.deadletter.<service>`."""
    size = len(data)
    data = data[:DEAD_LETTER_PAYLOAD_MAX]
    try:
        payload, encoding = data.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        payload, encoding = base64.b64encode(data).decode("ascii"), "base64"
    letter = DeadLetter(
        service=service,
        subject=subject,
        stream_seq=stream_seq,
        reason=reason,
        payload=payload,
        payload_encoding=encoding,
        occurred_at=now or utc_now(),
        payload_bytes=size,
        payload_truncated=size > DEAD_LETTER_PAYLOAD_MAX,
    )
    await nc.publish(dead_letter_subject(service), _encode(letter))


# What decoding a JSON payload raises: msgspec's errors, and also a RecursionError for JSON
# nested too deep and a UnicodeDecodeError for invalid UTF-8 inside a string.
DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, RecursionError, UnicodeDecodeError)


def describe_decode_error(exc: Exception) -> str:
    """A one-line reason for a message that did not decode or validate."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:500]


def describe_not_utf8(exc: UnicodeDecodeError, within: str = "") -> str:
    """The reason for JSON with invalid UTF-8 inside a string (msgspec raises
    UnicodeDecodeError): where, and what JSON must be; `within` says of what the byte
    offset is (" of the record")."""
    return f"not valid UTF-8 (byte {exc.start}{within}: {exc.reason}); JSON must be UTF-8"
