"""Hot read routes answered with the bytes last sent for the same request, outside the framework.

Why: on a read route whose service answers are already cached (`gateway.services`), what is
left per request is the framework's own work — routing, the request object, dependency
injection, the guard, calling the handler, encoding the struct, the response object. On two
cores shared with nats-server and three services that held the routes to 0.2–0.3 × a bare
Litestar route (BENCHMARKS.md before this change). A route that opts in (`opt=CACHED`) has
its whole 200 response (status line headers and body) kept here, and the same GET (path and
query string) is answered with those bytes by this ASGI wrapper, before Litestar sees it.

When a kept response is not served:
- any change since it was built: the services' change notices and every command sent
  through the gateway bump `ServiceClient.generation`, so a read after a write sees the
  write, exactly as with the service answers underneath; a response built while the
  generation moved (e.g. `?fresh=true`, which is a command) is never kept;
- after `cache_ttl_s` (answers that depend on the clock: today's date, lock expiry, ages,
  the `timestamp` field, which is the time the kept answer was built). Once expired, one
  request rebuilds it through the framework while concurrent requests still get the
  expired copy, instead of all of them queueing on the same rebuild (the p99 under load);
- a request whose token the read guard would refuse: it goes through the framework, which
  answers 401/403 as always.
"""

from __future__ import annotations

import time
from typing import Any

from gateway.asgi import ASGIApp, Message, Receive, Scope, Send
from gateway.auth import read_allowed
from gateway.services import ServiceClient
from gateway.settings import GatewaySettings

# `opt` for a route handler whose 200 answer depends only on its path, query string, the
# services' state and the clock (never on who asks, beyond passing the read guard).
CACHED: dict[str, Any] = {"cache_response": True}
# Distinct requests kept (path × query string) and their bytes in all: past either, the
# oldest half is dropped (every distinct query string is an entry, so junk parameters
# must not be able to grow the memory without bound).
MAX_ENTRIES = 1024
MAX_BYTES = 32 * 1024 * 1024


class _Kept:
    """One kept 200 response."""

    __slots__ = ("body", "expires", "generation", "headers", "refreshing", "template")

    def __init__(
        self,
        generation: int,
        expires: float,
        template: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
    ) -> None:
        self.generation = generation
        self.expires = expires
        self.template = template
        self.headers = headers
        self.body = body
        self.refreshing = False


class ResponseCache:
    """ASGI wrapper serving kept responses of `CACHED` routes; everything else passes through."""

    def __init__(self, app: ASGIApp, services: ServiceClient, settings: GatewaySettings) -> None:
        self.app = app
        self.services = services
        self.settings = settings
        self.ttl_s = settings.cache_ttl_s
        self._kept: dict[tuple[str, bytes], _Kept] = {}
        self._kept_bytes = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "GET" or self.ttl_s <= 0:
            await self.app(scope, receive, send)
            return
        key = (scope["path"], scope["query_string"])
        kept = self._kept.get(key)
        generation = self.services.generation
        if kept is not None and kept.generation == generation and self._authorised(scope):
            if kept.expires > time.monotonic() or kept.refreshing:
                scope["path_template"] = kept.template  # for the request metrics
                await send({"type": "http.response.start", "status": 200, "headers": kept.headers})
                await send({"type": "http.response.body", "body": kept.body})
                return
            kept.refreshing = True  # this request rebuilds it; the others keep the old copy
        try:
            await self._build(key, generation, scope, receive, send)
        finally:
            if kept is not None:
                kept.refreshing = False

    async def _build(
        self, key: tuple[str, bytes], generation: int, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """Answer through the framework, keeping the response when the route allows it."""
        start: Message | None = None
        body: list[bytes] = []
        complete = False

        async def capture(message: Message) -> None:
            nonlocal start, complete
            if message["type"] == "http.response.start":
                start = message
            elif message["type"] == "http.response.body":
                body.append(message.get("body", b""))
                complete = not message.get("more_body", False)
            await send(message)

        await self.app(scope, receive, capture)
        handler = scope.get("route_handler")
        if (
            start is None
            or not complete
            or start["status"] != 200
            or handler is None
            or not handler.opt.get("cache_response")
            or self.services.generation != generation  # built across a change: maybe stale
        ):
            return
        answer = b"".join(body)
        if len(answer) > MAX_BYTES // 4:
            return  # too large to keep
        replaced = self._kept.pop(key, None)
        if replaced is not None:
            self._kept_bytes -= len(replaced.body)
        if len(self._kept) >= MAX_ENTRIES or self._kept_bytes + len(answer) > MAX_BYTES:
            for old in list(self._kept)[: len(self._kept) // 2 + 1]:
                self._kept_bytes -= len(self._kept.pop(old).body)
        self._kept[key] = _Kept(
            generation,
            time.monotonic() + self.ttl_s,
            str(scope.get("path_template") or scope["path"]),
            list(start.get("headers", [])),
            answer,
        )
        self._kept_bytes += len(answer)

    @property
    def kept_bytes(self) -> int:
        """Bytes of the answers kept now (bounded by MAX_BYTES)."""
        return self._kept_bytes

    def _authorised(self, scope: Scope) -> bool:
        if not self.settings.read_token:
            return True
        for name, value in scope["headers"]:
            if name == b"authorization":
                return read_allowed(value.decode("latin-1"), self.settings)
        return False
