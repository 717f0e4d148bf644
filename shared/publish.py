"""Publishing an event: its one JSON encoding, stored with `Nats-Msg-Id` = its id."""

from __future__ import annotations

import msgspec
from nats.js import JetStreamContext
from nats.js import api as js_api

from shared.events import Event

_encode = msgspec.json.Encoder().encode


def encode_event(event: Event) -> bytes:
    """An event as its one JSON object."""
    return _encode(event)


async def publish_event(
    js: JetStreamContext,
    subject: str,
    event: Event,
    *,
    headers: dict[str, str] | None = None,
    timeout: float = 5.0,
) -> js_api.PubAck:
    """Publish one event with `Nats-Msg-Id` = its id, so a retry is stored once."""
    all_headers = {"Nats-Msg-Id": event.id}
    if headers:
        all_headers.update(headers)
    return await js.publish(subject, encode_event(event), timeout=timeout, headers=all_headers)
