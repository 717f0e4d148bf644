"""NATS plumbing: connecting, provisioning the streams, publishing events, dead-lettering."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import BadRequestError
from nats.js.object_store import ObjectStore

from shared.events import AwareDatetime, Event, utc_now
from shared.settings import CommonSettings

log = logging.getLogger("stockpilot.bus")

DAY_S = 86_400.0
# The duplicate window of every stream: a retried publish within it is stored once.
DUPLICATE_WINDOW_S = 20 * 60.0
MAX_EVENT_BYTES = 1024 * 1024
# The services whose snapshots and consumers the NATS roles (ops.nats_auth) keep apart.
SERVICES = ("health", "usage", "batch")
STATE_BUCKET = "STOCKPILOT_STATE"
# Which alerts each hook has delivered. A mark only has to outlive the oldest alert a hook
# can be handed again (its backfill, at most HOOK_BACKFILL_MAX_S), so marks expire.
HOOK_MARKS_BUCKET = "STOCKPILOT_HOOK_MARKS"
HOOK_BACKFILL_MAX_S = 30 * DAY_S
HOOK_MARK_TTL_S = 35 * DAY_S

_STREAM_ALREADY_IN_USE = 10058
# Who may create and update streams and buckets when NATS has users (ops.nats_auth).
ADMIN_USER = "ops"


def snapshot_bucket(service: str) -> str:
    """The object store holding one service's projection snapshots.

    One bucket per service: NATS permissions can then give each service its own bucket's
    subjects only (an object store's chunks and its purges cannot be told apart by owner).
    """
    return f"STOCKPILOT_SNAPSHOTS_{service.upper()}"


def inbox_prefix(user: str | None) -> str:
    """The reply-inbox prefix of a connection made as `user`: each NATS user may subscribe
    to its own inboxes only, so nobody reads the answers meant for another."""
    return f"_INBOX.{user}" if user else "_INBOX"


def nats_user(settings: CommonSettings) -> str | None:
    """The NATS user this process connects as: STOCKPILOT_NATS_USER, or the user named in
    the (first) server URL (`nats://ops:…@host:port`, what `nats.url` holds)."""
    if settings.nats_user:
        return settings.nats_user
    for url in settings.nats_servers:
        rest = url.partition("://")[2]
        if "@" in rest:
            return rest.rsplit("@", 1)[0].split(":", 1)[0] or None
    return None


def may_administer(settings: CommonSettings) -> bool:
    """Whether this process's NATS user may create and update streams: `ops`, or any client
    of a server without users (a development server, the tests' throwaway one)."""
    user = nats_user(settings)
    return not user or user == ADMIN_USER


class NotProvisionedError(Exception):
    """A stream or bucket a process needs is missing and its NATS user may not create it."""


class StreamSpec(msgspec.Struct, frozen=True, kw_only=True):
    """One stream and the limits we chose for it (documented in README.md)."""

    name: str
    subjects: tuple[str, ...]
    description: str
    # Event-sourced history is kept; health checks are bounded by age since their
    # projection only ever looks back 24 h (and uptime series a few days).
    max_age_s: float | None = None
    max_bytes: int = -1


STREAMS: dict[str, StreamSpec] = {
    "usage": StreamSpec(
        name="STOCKPILOT_USAGE",
        subjects=("stockpilot.usage.>",),
        description="One event per LLM call, and statistics resets.",
    ),
    "health": StreamSpec(
        name="STOCKPILOT_HEALTH",
        subjects=("stockpilot.health.>",),
        description="Every probe result of every dependency.",
        max_age_s=400 * DAY_S,
    ),
    "batch": StreamSpec(
        name="STOCKPILOT_BATCH",
        subjects=("stockpilot.batch.>",),
        description="Batch-job executions and job-lock lifecycle.",
    ),
    "alerts": StreamSpec(
        name="STOCKPILOT_ALERTS",
        subjects=("stockpilot.alerts.>",),
        description="Alerts raised by the services, each condition once per period.",
    ),
}


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


_encode = msgspec.json.Encoder().encode


def encode_event(event: Event) -> bytes:
    """An event as its one JSON object."""
    return _encode(event)


# How long a closing connection may drain, then how long closing it may take (twice at most).
DRAIN_TIMEOUT_S = 2.0
CLOSE_TIMEOUT_S = 1.0


async def drain_or_close(nc: NATS) -> None:
    """Drain `nc` within DRAIN_TIMEOUT_S; past that (or when it fails) close it as it is.

    Bounded whatever NATS does: a stopping process ends within a supervisor's grace period.
    """
    # Not wait_for(nc.drain()): nats-py's drain takes a cancellation as "stop waiting for the
    # subscriptions", then still flushes (up to 10 s) and closes, so that bounds nothing.
    draining = asyncio.create_task(nc.drain(), name="nats-drain")
    done, _ = await asyncio.wait({draining}, timeout=DRAIN_TIMEOUT_S)
    if not done:
        log.warning("NATS drain not finished within %.1fs; closing the connection", DRAIN_TIMEOUT_S)
    elif (exc := draining.exception()) is not None:
        log.warning("NATS drain failed (%s); closing the connection", exc)
    if not nc.is_closed:
        # With NATS away, close() may fail or stall writing its buffer to a dead transport; a
        # connection left open would outlive the event loop (a ResourceWarning when collected).
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), timeout=CLOSE_TIMEOUT_S)
    # A drain still waiting (for a subscription, a flush) has nothing left to wait for once the
    # connection is closed: cancelled, it ends at once. A no-op when it is done.
    draining.cancel()
    await asyncio.wait({draining}, timeout=CLOSE_TIMEOUT_S)


async def connect(
    settings: CommonSettings,
    name: str,
    *,
    on_closed: Callable[[], Awaitable[None]] | None = None,
    on_reconnected: Callable[[], Awaitable[None]] | None = None,
    first_connect_attempts: int | None = None,
) -> NATS:
    """Connect with explicit reconnect settings: retry forever once connected.

    The first connection is retried too (with a log line each time), so a service started
    before NATS is up waits for it; `first_connect_attempts` bounds that for tools.
    """

    async def error_cb(exc: Exception) -> None:
        log.warning("%s: NATS error: %s", name, exc)

    connected: list[NATS] = []  # the client, once it exists

    async def disconnected_cb() -> None:
        # nats-py calls this when the connection is closed on purpose too (a drain at shutdown).
        if connected and connected[0].is_closed:
            log.info("%s: NATS connection closed", name)
        else:
            log.warning("%s: disconnected from NATS, reconnecting", name)

    async def reconnected_cb() -> None:
        log.info("%s: reconnected to NATS", name)
        if on_reconnected is not None:
            await on_reconnected()

    async def closed_cb() -> None:
        if on_closed is not None:
            await on_closed()

    options: dict[str, Any] = {
        "servers": settings.nats_servers,
        "name": name,
        "allow_reconnect": True,
        "max_reconnect_attempts": -1,
        "reconnect_time_wait": 0.5,
        "connect_timeout": 2,
        "ping_interval": 10,
        "max_outstanding_pings": 3,
        "error_cb": error_cb,
        "disconnected_cb": disconnected_cb,
        "reconnected_cb": reconnected_cb,
        "closed_cb": closed_cb,
        # A service restart must not lose what its client buffered during a NATS outage.
        "pending_size": 64 * 1024 * 1024,
    }
    if settings.nats_user:
        options["user"] = settings.nats_user
        options["password"] = settings.nats_password or ""
    if user := nats_user(settings):
        options["inbox_prefix"] = inbox_prefix(user)
    attempt = 0
    delay = 0.2
    while True:
        attempt += 1
        try:
            client = await nats.connect(**options)
            connected.append(client)
            return client
        except (OSError, nats.errors.NoServersError, nats.errors.TimeoutError) as exc:
            if first_connect_attempts is not None and attempt >= first_connect_attempts:
                raise
            log.warning(
                "%s: NATS at %s not reachable (%s); retrying in %.1fs",
                name,
                ",".join(redact_url(url) for url in settings.nats_servers),
                type(exc).__name__,
                delay,
            )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def connect_unless_stopped(
    stop: asyncio.Event,
    settings: CommonSettings,
    name: str,
    **options: Any,
) -> NATS | None:
    """`connect`, given up when `stop` is set first (None): a process told to stop while NATS
    is still unreachable at its start stops."""
    connecting = asyncio.create_task(connect(settings, name, **options))
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
    stopping.cancel()
    # Python 3.11's wait_for loses a cancellation that arrives just as the awaited operation
    # fails, and nats-py's own connect loop awaits one that fails at once while NATS is down:
    # the cancellation is taken for one more failed attempt and the loop goes on. So cancel
    # until it has ended.
    while not connecting.done():
        connecting.cancel()
        await asyncio.wait({connecting}, timeout=0.1)
    if connecting.cancelled():
        return None
    if stop.is_set():  # connected just as it was told to stop: not going to be used
        await connecting.result().close()
        return None
    return connecting.result()


def redact_url(url: str) -> str:
    """A NATS URL without its credentials, for logs and errors."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    return f"{scheme}://***@{rest.split('@', 1)[1]}"


def _stream_config(spec: StreamSpec, replicas: int) -> js_api.StreamConfig:
    return js_api.StreamConfig(
        name=spec.name,
        subjects=list(spec.subjects),
        description=spec.description,
        storage=js_api.StorageType.FILE,
        retention=js_api.RetentionPolicy.LIMITS,
        duplicate_window=DUPLICATE_WINDOW_S,
        max_age=spec.max_age_s,
        max_bytes=spec.max_bytes,
        max_msg_size=MAX_EVENT_BYTES,
        num_replicas=replicas,
        discard=js_api.DiscardPolicy.OLD,
        allow_direct=True,
    )


async def provision(js: JetStreamContext, replicas: int = 1) -> None:
    """Create or update the four streams and the state buckets; safe to run from every process."""
    for spec in STREAMS.values():
        config = _stream_config(spec, replicas)
        try:
            await js.add_stream(config)
        except BadRequestError as exc:
            if exc.err_code != _STREAM_ALREADY_IN_USE:
                raise
            await js.update_stream(config)
    for service in SERVICES:
        await snapshot_store(js, service, replicas)
    for bucket, description, ttl in (
        (STATE_BUCKET, "Small operational state: health rounds, hook status.", None),
        (HOOK_MARKS_BUCKET, "Which alerts each hook delivered (expire).", HOOK_MARK_TTL_S),
    ):
        try:
            await js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            await js.create_key_value(
                js_api.KeyValueConfig(
                    bucket=bucket,
                    description=description,
                    history=1,
                    ttl=ttl,
                    storage=js_api.StorageType.FILE,
                    replicas=replicas,
                )
            )


async def snapshot_store(
    js: JetStreamContext, service: str, replicas: int = 1, *, create: bool = True
) -> ObjectStore:
    """`service`'s snapshot bucket, created first when missing (and `create`)."""
    bucket = snapshot_bucket(service)
    try:
        return await js.object_store(bucket)
    except nats.js.errors.BucketNotFoundError:
        if not create:
            raise NotProvisionedError(_not_provisioned(f"object store {bucket}")) from None
    return await js.create_object_store(
        bucket,
        config=js_api.ObjectStoreConfig(
            description=f"Projection snapshots of the {service} service, one object each.",
            storage=js_api.StorageType.FILE,
            replicas=replicas,
        ),
    )


def _not_provisioned(what: str) -> str:
    return (
        f"{what} does not exist and this process's NATS user may not create it: start the "
        f"stack with `stockpilot up`, or run `stockpilot provision` as the {ADMIN_USER} user"
    )


async def provision_or_check(
    js: JetStreamContext, settings: CommonSettings, streams: tuple[str, ...]
) -> None:
    """Provision everything when this process administers streams; otherwise only check
    that the streams (or KV_/OBJ_ streams of buckets) it needs exist."""
    if may_administer(settings):
        await provision(js, settings.stream_replicas)
        return
    for name in streams:
        try:
            await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            raise NotProvisionedError(_not_provisioned(f"stream {name}")) from None


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


def describe_decode_error(exc: Exception) -> str:
    """A one-line reason for a message that did not decode or validate."""
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:500]
