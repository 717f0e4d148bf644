"""Finding the StockPilot stack an ops command talks to, and only that one (CONTRACT §2).

The NATS comes from STOCKPILOT_NATS_URL or, when that is unset, from the embedded server
`stockpilot up` recorded under STOCKPILOT_DATA_DIR (its kept port and the operator's
password). Nothing else: a NATS that happens to answer at 127.0.0.1:4222 is not StockPilot's.
Whatever stands in the way (no stack recorded, the recorded one not running, a NATS without
the StockPilot streams) becomes one `StackError` line naming what to set or run.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError

from shared.connection import connect, drain_or_close
from shared.nats_errors import NATS_ERRORS
from shared.settings import CommonSettings, NoStackError
from shared.streams import STREAMS

# The four streams every StockPilot stack has; a NATS without them is not (yet) StockPilot's.
STOCKPILOT_STREAMS = tuple(spec.name for spec in STREAMS.values())
CONNECT_TIMEOUT_S = 5.0
# What a first connection that opened its socket but was not let in raises (nats-py errors
# recognised through shared.nats_errors).
_LOGIN_REFUSED: tuple[type[Exception], ...] = (OSError, TimeoutError, *NATS_ERRORS)
PROBE_TIMEOUT_S = 1.0


class StackError(Exception):
    """The stack cannot be used; the message is one line saying what to set or run."""


def addresses(servers: list[str]) -> list[tuple[str, int]]:
    """host:port of each server URL (4222 where a URL names no port, as NATS does)."""
    found = []
    for url in servers:
        parts = urlsplit(url if "://" in url else f"nats://{url}")
        found.append((parts.hostname or "127.0.0.1", parts.port or 4222))
    return found


def shown(servers: list[str]) -> str:
    """The servers for a message, without credentials."""
    return ", ".join(f"{host}:{port}" for host, port in addresses(servers))


def accepts(host: str, port: int) -> bool:
    """Whether something accepts TCP connections at host:port."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), PROBE_TIMEOUT_S):
        return True
    return False


def servers_or_raise(settings: CommonSettings) -> list[str]:
    """The stack's NATS URLs, or StackError when none is configured or recorded."""
    try:
        return settings.nats_servers
    except NoStackError as exc:
        raise StackError(str(exc)) from None


def not_running(settings: CommonSettings, servers: list[str]) -> StackError:
    """The error for a NATS that accepts no connection."""
    if settings.nats_url:
        return StackError(
            f"no NATS answers at {shown(servers)} (STOCKPILOT_NATS_URL): start it, or set "
            "STOCKPILOT_NATS_URL to the running stack's NATS"
        )
    return StackError(
        f"the StockPilot NATS at {shown(servers)} ({settings.nats_source}) is not running: "
        "start the stack with `stockpilot up` (it keeps that port and those credentials), "
        "or set STOCKPILOT_DATA_DIR to a running stack's data dir"
    )


async def require_running(settings: CommonSettings, servers: list[str]) -> None:
    """StackError unless one of the servers accepts connections (a quick TCP probe, so a
    stopped stack is named at once instead of after the login timeout)."""
    probes = [asyncio.to_thread(accepts, host, port) for host, port in addresses(servers)]
    if not any(await asyncio.gather(*probes)):
        raise not_running(settings, servers)


async def check_stockpilot(nc: NATS, settings: CommonSettings, servers: list[str]) -> None:
    """StackError unless the four StockPilot streams exist on this NATS."""
    js = nc.jetstream()
    missing = []
    for name in STOCKPILOT_STREAMS:
        try:
            await js.stream_info(name)
        except NotFoundError:
            missing.append(name)
    if not missing:
        return
    what = (
        "none of the StockPilot streams"
        if len(missing) == len(STOCKPILOT_STREAMS)
        else f"no {', '.join(missing)}"
    )
    raise StackError(
        f"the NATS at {shown(servers)} ({settings.nats_source}) has {what}: it is not a "
        "StockPilot stack's NATS, or its stack never started; start the stack with "
        "`stockpilot up`, or point STOCKPILOT_NATS_URL or STOCKPILOT_DATA_DIR at a running one "
        "(a fresh server for a restore: `stockpilot up --provision-only` creates the streams)"
    )


@contextlib.asynccontextmanager
async def connected(
    settings: CommonSettings, name: str = "stockpilot-ops", *, stockpilot_only: bool = True
) -> AsyncIterator[NATS]:
    """A connection to the stack's NATS for a tool, checked to be StockPilot's (the four
    streams exist) unless `stockpilot_only` is false (a restore into a fresh server)."""
    servers = servers_or_raise(settings)
    await require_running(settings, servers)
    # connect retries a first connection that fails after the socket opened (a login
    # refused) forever, as nats-py does with unlimited reconnects: bound it here.
    try:
        nc = await asyncio.wait_for(
            connect(settings, name, first_connect_attempts=2), timeout=CONNECT_TIMEOUT_S
        )
    except _LOGIN_REFUSED as exc:
        raise StackError(
            f"the NATS at {shown(servers)} ({settings.nats_source}) accepts connections but "
            f"did not let this command in within {CONNECT_TIMEOUT_S:g}s "
            f"({type(exc).__name__}): check the user and password it was given"
        ) from None
    try:
        if stockpilot_only:
            await check_stockpilot(nc, settings, servers)
        yield nc
    finally:
        await drain_or_close(nc)
