"""How the gateway is served: uvicorn, with header and body timeouts and a way to drop a client.

uvicorn closes an idle keep-alive connection, but never one that is still sending its request
line and headers: 1,100 connections each trickling a partial header held the gateway's sockets
for good (slowloris) and took it down. `GatewayProtocol` (uvicorn's httptools protocol plus a
timer) closes a connection whose headers are not all in STOCKPILOT_HTTP_HEADER_TIMEOUT_S after
it opened, or after the request before it on the same connection, and one whose body is not
all in STOCKPILOT_HTTP_BODY_TIMEOUT_S after its headers (the same attack, one step later).

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

import msgspec
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from gateway.settings import GatewaySettings

ABORT_EXTENSION = "stockpilot.abort"
# `http` option of uvicorn: an import string, so the worker processes of
# STOCKPILOT_HTTP_WORKERS > 1 (started with spawn) find it too.
PROTOCOL = "gateway.http_server:GatewayProtocol"
DEFAULT_HEADER_TIMEOUT_S = 10.0
DEFAULT_BODY_TIMEOUT_S = 30.0
# Request line and headers of one request; browsers send a few KiB, cookies included.
MAX_HEADER_BYTES = 64 * 1024
# How long the rest of a refused request is read (and dropped) before the connection closes.
LINGER_S = 2.0


class ServerConfig(uvicorn.Config):
    """uvicorn's Config plus our timeouts (pickled with it into worker processes)."""

    def __init__(
        self, app: Any, *, header_timeout_s: float, body_timeout_s: float, **kwargs: Any
    ) -> None:
        super().__init__(app, **kwargs)
        self.header_timeout_s = header_timeout_s
        self.body_timeout_s = body_timeout_s


class GatewayProtocol(HttpToolsProtocol):
    """HTTP/1.1 over httptools; closes a connection whose headers or body take too long.

    One timer per connection: from its opening (or the first byte of its next request) until
    the headers are in, the header timeout; then, while a body is still coming, the body
    timeout. Headers larger than MAX_HEADER_BYTES are refused with 431 (httptools keeps no
    limit of its own, and uvicorn keeps every header it is sent).
    """

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.header_timeout_s: float = getattr(config, "header_timeout_s", DEFAULT_HEADER_TIMEOUT_S)
        self.body_timeout_s: float = getattr(config, "body_timeout_s", DEFAULT_BODY_TIMEOUT_S)
        self._timer: asyncio.TimerHandle | None = None
        self._reading_headers = False
        self._header_bytes = 0
        self._refused = False

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._expect_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # the rest of a refused request: read and dropped, see _refuse_headers
        super().data_received(data)
        if self._reading_headers and not self.transport.is_closing():
            self._header_bytes += len(data)
            if self._header_bytes > MAX_HEADER_BYTES:
                self._refuse_headers()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # The next request on a kept-alive connection: uvicorn's keep-alive timer stopped at
        # its first byte, so the rest of its headers get the header timeout.
        if self._timer is None:
            self._expect_headers()

    def on_headers_complete(self) -> None:
        self._disarm()
        self.scope["extensions"] = {ABORT_EXTENSION: self._abort}  # type: ignore[dict-item]
        super().on_headers_complete()
        # Until on_message_complete (at once when there is no body).
        self._timer = self.loop.call_later(self.body_timeout_s, self._too_slow)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def _expect_headers(self) -> None:
        self._reading_headers = True
        self._header_bytes = 0
        self._timer = self.loop.call_later(self.header_timeout_s, self._too_slow)

    def _disarm(self) -> None:
        self._reading_headers = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _too_slow(self) -> None:
        self._timer = None
        self._reading_headers = False
        # As the keep-alive timeout does.
        if not self.transport.is_closing():
            self.transport.close()

    def _refuse_headers(self) -> None:
        self._disarm()
        body = msgspec.json.encode(
            {
                "status_code": 431,
                "detail": f"the request's headers are larger than {MAX_HEADER_BYTES} bytes",
            }
        )
        head = (
            b"HTTP/1.1 431 Request Header Fields Too Large\r\n"
            b"content-type: application/json\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
        )
        self.transport.write(head + body)
        # A close now, with the peer's bytes still arriving, would reset the connection and
        # the peer could lose the answer: say we are done, drop what still comes, and close
        # at the peer's end of input or after LINGER_S.
        self._refused = True
        with contextlib.suppress(Exception):
            self.transport.write_eof()
        self._timer = self.loop.call_later(LINGER_S, self._too_slow)

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
    return ServerConfig(
        app,
        header_timeout_s=settings.http_header_timeout_s,
        body_timeout_s=settings.http_body_timeout_s,
        **defaults | options,
    )


def raise_open_files_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard one: 1,024 sockets is too few to ride out a flood."""
    with contextlib.suppress(ValueError, OSError):
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
