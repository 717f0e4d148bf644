"""How the gateway is served: uvicorn, with a header timeout and a way for a route to drop a client.

uvicorn closes an idle keep-alive connection, but never one that is still sending its request
line and headers: 1,100 connections each trickling a partial header held the gateway's sockets
for good (slowloris) and took it down. `GatewayProtocol` (uvicorn's httptools protocol plus a
timer) closes a connection whose headers are not all in STOCKPILOT_HTTP_HEADER_TIMEOUT_S after
it opened, or after the request before it on the same connection.

It also puts an `ABORT_EXTENSION` callable in each request's `scope["extensions"]`: it closes
the connection. The alert stream calls it for a client that stopped reading and whose buffer
is full: every further write to that client, even the end of the response, would wait on it
forever, holding its slot and its buffers.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
from typing import Any

import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from gateway.settings import GatewaySettings

ABORT_EXTENSION = "stockpilot.abort"
# `http` option of uvicorn: an import string, so the worker processes of
# STOCKPILOT_HTTP_WORKERS > 1 (started with spawn) find it too.
PROTOCOL = "gateway.http_server:GatewayProtocol"
DEFAULT_HEADER_TIMEOUT_S = 10.0


class ServerConfig(uvicorn.Config):
    """uvicorn's Config plus the header timeout (pickled with it into worker processes)."""

    def __init__(self, app: Any, *, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(app, **kwargs)
        self.header_timeout_s = header_timeout_s


class GatewayProtocol(HttpToolsProtocol):
    """HTTP/1.1 over httptools; closes a connection whose headers take too long."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.header_timeout_s: float = getattr(config, "header_timeout_s", DEFAULT_HEADER_TIMEOUT_S)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # The next request on a kept-alive connection: uvicorn's keep-alive timer stopped at
        # its first byte, so the rest of its headers get the header timeout.
        if self._header_timer is None:
            self._arm()

    def on_headers_complete(self) -> None:
        self._disarm()
        self.scope["extensions"] = {ABORT_EXTENSION: self._abort}  # type: ignore[dict-item]
        super().on_headers_complete()

    def _arm(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timeout)

    def _disarm(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        # As the keep-alive timeout does; nothing is waiting to be written yet.
        if not self.transport.is_closing():
            self.transport.close()

    def _abort(self) -> None:
        # Not close(): that waits to flush what is buffered, to a peer that does not read.
        self.transport.abort()


def server_config(app: Any, settings: GatewaySettings, **options: Any) -> ServerConfig:
    """The uvicorn configuration the gateway is served with (`stockpilot gateway`).

    `options` are more uvicorn options, or overrides (a test's own loop, say).
    """
    defaults: dict[str, Any] = {
        "host": settings.http_host,
        "port": settings.http_port,
        "loop": "uvloop",
        "http": PROTOCOL,
        "log_level": "warning",
        "access_log": False,
        "timeout_keep_alive": settings.http_keep_alive_timeout_s,
        "timeout_graceful_shutdown": 3,
        "lifespan": "on",
    }
    return ServerConfig(app, header_timeout_s=settings.http_header_timeout_s, **defaults | options)


def raise_open_files_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard one: 1,024 sockets is too few to ride out a flood."""
    with contextlib.suppress(ValueError, OSError):
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
