"""The gateway's one cache: read answers kept at its edge, as the bytes last sent.

Why here and only here: a NATS round trip per HTTP request costs ~40 % of the gateway's
throughput and multiplies its p99 by four (PERF_NOTES), and with the service answers cached
but the framework still run per request, `/api/v1/status` managed 0.3 × a bare Litestar
route (docs/profiles/gateway-status-after-81ff654.txt: routing, dependency injection, the
handler, encoding). A route that opts in (`opt=CACHED`) has its whole 200 response kept
here, and the same GET (path and query string: the route's service, endpoint and
parameters) is answered with those bytes by this ASGI wrapper, before Litestar sees it.
Where a route returns the service's answer unchanged, those bytes are the service's own
(`ServiceClient.answer`): nothing in the gateway decodes or re-encodes them. No other layer
keeps answers: not the service client, not the routes, not the services.

An answer belongs to the services its build asked (`gateway.services.asking`):
- a change notice of one of them makes it stale: served to concurrent requests only while
  one request rebuilds it (that request waits for the new answer, so a client that reads
  again after it sees the change);
- so does `cache_ttl_s` (answers that depend on the clock: today's date, lock expiry,
  ages, the `timestamp` field, which is the time the kept answer was built);
- a command sent through this gateway to one of them (and a NATS reconnect, which may have
  lost notices) drops it at once: a read after a write sees the write;
- an answer built across a change notice of its services is kept as already stale (so under
  a stream of notices each build still replaces the copy served while the next one runs);
  one built across a command is neither kept nor shared (`?fresh=true` is a command), and
  one that asked no service is dropped at any service's change.
Bounded staleness: no answer is served more than `cache_ttl_s + service_timeout_s` after it
was built (3 s with the defaults), the longest a rebuild may wait for its services; past
that, requests wait for the rebuild in flight.

Concurrent misses share one build: requests to a route that keeps its answers (Litestar's
routing says so, `kept_routes`) that find a build in flight and no copy they may serve wait
for that build and are sent its response (one request to the service for all of them); a
response that cannot be shared (built across a command, a 401/403 that depends on who asks,
cut short) makes each waiter ask through the framework itself. A request whose token the
read guard would refuse never touches the cache: the framework answers 401/403 as always.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from litestar import Litestar
from litestar.exceptions import HTTPException

from gateway.asgi import ASGIApp, Message, Receive, Scope, Send
from gateway.auth import read_allowed
from gateway.services import ServiceClient, asking, stop_asking
from gateway.settings import GatewaySettings

# `opt` for a route handler whose 200 answer depends only on its path, query string, the
# services' state and the clock (never on who asks, beyond passing the read guard).
CACHED: dict[str, Any] = {"cache_response": True}
# Distinct requests kept (path × query string) and their bytes in all: past either, the
# oldest half is dropped (every distinct query string is an entry, so junk parameters
# must not be able to grow the memory without bound).
MAX_ENTRIES = 1024
MAX_BYTES = 32 * 1024 * 1024
# Responses that depend on who asks: never handed to another request.
_PERSONAL = frozenset({401, 403})

_FRESH, _STALE, _GONE = 0, 1, 2


class _Response:
    """A complete response as sent: what a waiter is sent, what a kept entry holds."""

    __slots__ = ("body", "headers", "status", "template")

    def __init__(
        self, status: int, headers: list[tuple[bytes, bytes]], body: bytes, template: str
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.template = template

    async def send(self, scope: Scope, send: Send) -> None:
        scope["path_template"] = self.template  # for the request metrics
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body})


class _Kept:
    """One kept 200 response and what it was built from."""

    __slots__ = ("built", "deps", "epoch", "generation", "response")

    def __init__(
        self,
        response: _Response,
        built: float,
        generation: int,
        epoch: int,
        deps: tuple[tuple[str, int, int], ...] | None,
    ) -> None:
        self.response = response
        self.built = built  # monotonic, when its build started
        self.generation = generation  # a generation at which its services were as built
        self.epoch = epoch
        # (service, changes, commands) of every service asked; None: it asked none.
        self.deps = deps


def kept_routes(app: Litestar) -> Callable[[str], bool]:
    """Whether a GET of this path reaches a `CACHED` route of `app` (Litestar's own routing,
    which it memoises per path): lets the very first concurrent requests share one build."""

    def kept(path: str) -> bool:
        try:
            handler = app.asgi_router.handle_routing(path=path, method="GET")[1]
        except HTTPException:  # 404, 405: not a route that keeps its answers
            return False
        return bool(handler.opt.get("cache_response"))

    return kept


class ResponseCache:
    """ASGI wrapper serving kept responses of `CACHED` routes; everything else passes through."""

    def __init__(
        self,
        app: ASGIApp,
        services: ServiceClient,
        settings: GatewaySettings,
        kept_route: Callable[[str], bool] | None = None,
    ) -> None:
        self.app = app
        self.services = services
        self.settings = settings
        # Without it, a request is known to be kept only once an answer to it was kept.
        self.kept_route = kept_route
        self.ttl_s = settings.cache_ttl_s
        # How long past its TTL a stale copy may still be served while it is rebuilt.
        self.grace_s = settings.service_timeout_s
        self._kept: dict[tuple[str, bytes], _Kept] = {}
        self._kept_bytes = 0
        # Builds in flight, by request: their response once complete (None: not shareable).
        self._flights: dict[tuple[str, bytes], asyncio.Future[_Response | None]] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "GET"
            or self.ttl_s <= 0
            or not self._authorised(scope)
        ):
            await self.app(scope, receive, send)
            return
        key = (scope["path"], scope["query_string"])
        kept = self._kept.get(key)
        if kept is None:  # nothing to serve: share a build in flight, if its route keeps
            flight = self._flights.get(key)
            if flight is None or self.kept_route is None or not self.kept_route(key[0]):
                await self._build(key, scope, receive, send)
            else:
                await self._wait(flight, scope, receive, send)
            return
        state = self._state(kept, time.monotonic())
        if state == _FRESH:
            await kept.response.send(scope, send)
            return
        flight = self._flights.get(key)
        if flight is None:  # this request rebuilds it
            await self._build(key, scope, receive, send)
        elif state == _STALE:  # another request is rebuilding it: the old copy meanwhile
            await kept.response.send(scope, send)
        else:
            await self._wait(flight, scope, receive, send)

    async def _wait(
        self,
        flight: asyncio.Future[_Response | None],
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        """The response of the build in flight, or (not shareable) the framework's own."""
        shared = await asyncio.shield(flight)
        if shared is not None:
            await shared.send(scope, send)
        else:
            await self.app(scope, receive, send)

    def _state(self, kept: _Kept, now: float) -> int:
        """Fresh, stale (may be served while one request rebuilds it) or gone."""
        services = self.services
        if kept.epoch != services.epoch or now >= kept.built + self.ttl_s + self.grace_s:
            return _GONE
        if kept.generation != services.generation:
            if kept.deps is None:
                return _GONE  # it asked no service: any change may be its
            changed = False
            for service, changes, commands in kept.deps:
                if services.command_counts.get(service, 0) != commands:
                    return _GONE
                if services.change_counts.get(service, 0) != changes:
                    changed = True
            if changed:
                return _STALE
            kept.generation = services.generation  # only others changed: the fast path again
        return _FRESH if now < kept.built + self.ttl_s else _STALE

    async def _build(
        self, key: tuple[str, bytes], scope: Scope, receive: Receive, send: Send
    ) -> None:
        """Answer through the framework, keeping the response when the route allows it."""
        flight: asyncio.Future[_Response | None] | None = None
        if key not in self._flights:
            flight = asyncio.get_running_loop().create_future()
            self._flights[key] = flight
        services = self.services
        generation, epoch = services.generation, services.epoch
        changes = dict(services.change_counts)
        commands = dict(services.command_counts)
        built = time.monotonic()
        start: Message | None = None
        body: list[bytes] = []
        complete = False

        async def capture(message: Message) -> None:
            nonlocal start, complete
            if message["type"] == "http.response.start":
                handler = scope.get("route_handler")
                if handler is not None and handler.opt.get("cache_response"):
                    start = message  # else not a kept route: its body (an SSE stream) is not held
            elif start is not None and message["type"] == "http.response.body":
                body.append(message.get("body", b""))
                complete = not message.get("more_body", False)
            await send(message)

        asked, token = asking()
        answer: _Kept | None = None
        try:
            await self.app(scope, receive, capture)
            if start is not None and complete and start["status"] not in _PERSONAL:
                response = _Response(
                    start["status"],
                    list(start.get("headers", [])),
                    b"".join(body),
                    str(scope.get("path_template") or scope["path"]),
                )
                deps = (
                    tuple((s, changes.get(s, 0), commands.get(s, 0)) for s in sorted(asked))
                    if asked
                    else None
                )
                # Judged by the services' counts at its start: built across a change notice
                # it is stale at once (still the best copy while the next rebuild runs; under
                # a stream of notices no build would ever be kept otherwise), across a
                # command or a reconnect it is gone (neither kept nor handed to anyone).
                answer = _Kept(response, built, generation, epoch, deps)
                if self._state(answer, time.monotonic()) == _GONE:
                    answer = None
        finally:
            stop_asking(token)
            if flight is not None:
                del self._flights[key]
                flight.set_result(None if answer is None else answer.response)
        if answer is not None and answer.response.status == 200:
            self._keep(key, answer)

    def _keep(self, key: tuple[str, bytes], kept: _Kept) -> None:
        size = len(kept.response.body)
        if size > MAX_BYTES // 4:
            return  # too large to keep
        replaced = self._kept.pop(key, None)
        if replaced is not None:
            self._kept_bytes -= len(replaced.response.body)
        if len(self._kept) >= MAX_ENTRIES or self._kept_bytes + size > MAX_BYTES:
            for old in list(self._kept)[: len(self._kept) // 2 + 1]:
                self._kept_bytes -= len(self._kept.pop(old).response.body)
        self._kept[key] = kept
        self._kept_bytes += size

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
