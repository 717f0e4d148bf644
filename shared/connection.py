"""Connecting to NATS: who this process is (user, inbox prefix), connect with our reconnect
policy, give up when told to stop, and drain or close on the way out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import nats
from nats.aio.client import Client as NATS

from shared.settings import CommonSettings

log = logging.getLogger("stockpilot.bus")

# Who may create and update streams and buckets when NATS has users (ops.nats_auth).
ADMIN_USER = "ops"


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
