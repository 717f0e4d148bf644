"""The gateway's client for the services' request/reply endpoints.

Every route asks a service through here; a service that does not answer in time becomes an
UnavailableError (503), a service error keeps its status and detail.

Read answers are cached (see PERF_NOTES: a NATS round trip per HTTP request costs ~40 % of
the gateway's throughput and multiplies its p99 by four). An answer stays valid while its
service has announced no change (`stockpilot.changed.<service>`, sent within milliseconds
of every fold) and for at most `cache_ttl_s` (answers that depend on the clock: "today",
lock expiry, ages). Any command sent to a service invalidates that service's answers at
once, so a read after a write through the gateway always sees the write. Concurrent misses
for the same answer share one request.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, TypeVar, cast

import msgspec
from litestar.di import NamedDependency
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.errors import NoRespondersError, TimeoutError

from shared.change_notices import changed_subject
from shared.clock import Clock
from shared.endpoints import endpoint_subject
from shared.errors import StockpilotError, UnavailableError, error_for_status
from shared.nats_errors import is_nats_error

T = TypeVar("T")

_ERROR_HEADER = "Nats-Service-Error"
_ERROR_CODE_HEADER = "Nats-Service-Error-Code"
_encode = msgspec.json.Encoder().encode


# Endpoints that only read a projection: their answers may be cached. Everything else
# (commands, fresh health rounds, the built-in status/digest) goes to the service every time.
# The health routes keep their own short-lived answers (they report the answer's age).
# `status` (every service's built-in) is cached too: a service announces its own shutdown.
READ_ENDPOINTS: dict[str, frozenset[str]] = {
    "health": frozenset({"status", "summary"}),
    "usage": frozenset({"status", "stats", "timeseries", "costs", "budget", "alerts", "summary"}),
    "batch": frozenset(
        {"status", "recent", "stats", "summary", "locks", "expired_locks", "lock_status", "jobs"}
    ),
}
# Endpoints that change a service's state: its cached answers are dropped after each one.
# Anything in neither list (digest, …) is asked every time and changes nothing.
COMMANDS: dict[str, frozenset[str]] = {
    "health": frozenset({"comprehensive_fresh", "component_fresh", "external_apis_fresh"}),
    "usage": frozenset({"ingest", "reset"}),
    "batch": frozenset(
        {"release", "cleanup", "report_run", "lock_acquire", "lock_renew", "lock_release_mine"}
    ),
}


class ServiceClient:
    """Request/reply to `stockpilot.svc.<service>.<endpoint>` with a timeout and a cache."""

    def __init__(
        self,
        timeout: float,
        nc: NATS | None = None,
        cache_ttl_s: float = 1.0,
        read_endpoints: dict[str, frozenset[str]] | None = None,
        commands: dict[str, frozenset[str]] | None = None,
    ) -> None:
        # None until the lifespan's first connection succeeds (the gateway serves meanwhile).
        self.nc = nc
        self.timeout = timeout
        self.cache_ttl_s = cache_ttl_s
        self.read_endpoints = READ_ENDPOINTS if read_endpoints is None else read_endpoints
        self.commands = COMMANDS if commands is None else commands
        self._versions: dict[str, int] = {}
        # Bumped on every change of any service: what `gateway.response_cache` keys on.
        self.generation = 0
        self._cache: dict[tuple[str, str, bytes], tuple[int, float, bytes]] = {}
        self._inflight: dict[tuple[str, str, bytes], asyncio.Future[bytes]] = {}
        self._decoded: dict[tuple[str, str, bytes, type[Any]], tuple[bytes, Any]] = {}

    def changed(self, service: str) -> None:
        """Forget a service's cached answers (it announced a change, or got a command)."""
        self._versions[service] = self._versions.get(service, 0) + 1
        self.generation += 1

    def forget_all(self) -> None:
        """Forget every cached answer (after a reconnect notices may have been missed)."""
        for service in list(self._versions):
            self.changed(service)
        self.generation += 1
        self._cache.clear()

    async def watch_changes(self) -> None:
        """Subscribe to the services' change notices."""
        assert self.nc is not None

        async def on_notice(msg: Msg) -> None:
            self.changed(msg.subject.rsplit(".", 1)[-1])

        await self.nc.subscribe(changed_subject("*"), cb=on_notice)

    @property
    def connected(self) -> bool:
        """Whether NATS is reachable right now."""
        return self.nc is not None and self.nc.is_connected

    async def query_raw(
        self,
        service: str,
        endpoint: str,
        params: msgspec.Struct | None = None,
        *,
        timeout: float | None = None,
    ) -> bytes:
        """The service's JSON answer, or a StockpilotError with the status to answer with."""
        if self.nc is None or not self.nc.is_connected:
            raise UnavailableError(f"the {service} service cannot be reached: NATS is unavailable")
        payload = _encode(params) if params is not None else b"{}"
        if endpoint not in self.read_endpoints.get(service, ()):
            if endpoint not in self.commands.get(service, ()):
                return await self._request(service, endpoint, payload, timeout)
            # A command: answers cached before it may be stale now.
            try:
                return await self._request(service, endpoint, payload, timeout)
            finally:
                self.changed(service)
        key = (service, endpoint, payload)
        version = self._versions.get(service, 0)
        now = time.monotonic()
        cached = self._cache.get(key)
        if cached is not None and cached[0] == version and cached[1] > now:
            return cached[2]
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            data = await self._request(service, endpoint, payload, timeout)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                future.cancel()
            else:
                future.set_exception(exc)
                future.exception()  # retrieved: waiters re-raise it, nobody else needs to
            raise
        else:
            future.set_result(data)
            # Stored under the version seen before asking: a change announced meanwhile
            # makes this answer stale at once.
            if len(self._cache) > 10_000:
                self._cache.clear()
                self._decoded.clear()
            self._cache[key] = (version, now + self.cache_ttl_s, data)
            return data
        finally:
            del self._inflight[key]

    async def _request(
        self, service: str, endpoint: str, payload: bytes, timeout: float | None
    ) -> bytes:
        assert self.nc is not None
        wait = self.timeout if timeout is None else timeout
        try:
            msg = await self.nc.request(endpoint_subject(service, endpoint), payload, timeout=wait)
        except TimeoutError:
            raise UnavailableError(
                f"the {service} service did not answer within {wait:g}s"
            ) from None
        except NoRespondersError:
            raise UnavailableError(f"the {service} service is not running") from None
        except Exception as exc:
            if is_nats_error(exc):
                raise UnavailableError(
                    f"the {service} service cannot be reached: NATS is unavailable"
                ) from None
            raise
        headers = msg.headers or {}
        if _ERROR_CODE_HEADER in headers:
            try:
                status = int(headers[_ERROR_CODE_HEADER])
            except ValueError:
                status = 500
            raise error_for_status(status, headers.get(_ERROR_HEADER, "service error"))
        return msg.data

    async def query(
        self,
        service: str,
        endpoint: str,
        response_type: type[T],
        params: msgspec.Struct | None = None,
        *,
        timeout: float | None = None,
    ) -> T:
        """The service's answer decoded into `response_type`.

        A cached answer is decoded once: callers get the same object until it changes, so
        they must not mutate it (copy with msgspec.structs.replace instead).
        """
        data = await self.query_raw(service, endpoint, params, timeout=timeout)
        # One entry per question (not per answer), so the memo never outgrows the cache.
        key = (service, endpoint, _encode(params) if params is not None else b"", response_type)
        decoded = self._decoded.get(key)
        if decoded is not None and decoded[0] is data:
            return cast(T, decoded[1])
        try:
            value = msgspec.json.decode(data, type=response_type)
        except msgspec.ValidationError as exc:
            raise StockpilotError(
                f"the {service} service answered {endpoint} in an unexpected shape: {exc}"
            ) from None
        if endpoint in self.read_endpoints.get(service, ()):
            if len(self._decoded) > 10_000:
                self._decoded.clear()
            self._decoded[key] = (data, value)
        return value


# How route handlers ask for the client: `services: Services`.
Services = NamedDependency[ServiceClient]

# How route handlers ask for the gateway's clock (`create_app(settings, clock)`): `clock:
# GatewayClock`. Every "now" a route stamps or compares comes from it, so tests can set it.
GatewayClock = NamedDependency[Clock]
