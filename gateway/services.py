"""The gateway's client for the services' request/reply endpoints, and what changed where.

Every route asks a service through here; a service that does not answer in time becomes an
UnavailableError (503), a service error keeps its status and detail.

Nothing is cached here: the gateway keeps answers in one place, its edge
(`gateway.response_cache`), which needs two things from this client:
- per service, a count of its changes: bumped by its change notices
  (`stockpilot.changed.<service>`, sent within milliseconds of every fold) and by every
  command sent to it through this client, with a second count of the commands alone (a
  read after a write through the gateway must see the write, never a kept copy);
- which services a request asked (`reading()`), so a kept answer is dropped when one of
  *its* services changes and no other (a health round no longer drops a usage answer).
"""

from __future__ import annotations

import contextvars
from typing import Any, TypeVar

import msgspec
from litestar import MediaType, Response
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

# Endpoints that change a service's state: its kept answers are dropped after each one, at
# once (no stale copy is served after a command). Every other endpoint only reads.
COMMANDS: dict[str, frozenset[str]] = {
    "health": frozenset({"comprehensive_fresh", "component_fresh", "external_apis_fresh"}),
    "usage": frozenset({"ingest", "reset"}),
    "batch": frozenset(
        {"release", "cleanup", "report_run", "lock_acquire", "lock_renew", "lock_release_mine"}
    ),
}

# The services asked while building one answer (set by the edge around each build). A set
# object, not a value: tasks started by the handler (asyncio.gather) copy the context and
# add to the same set.
_asked: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar("asked", default=None)


class ServiceClient:
    """Request/reply to `stockpilot.svc.<service>.<endpoint>` with a timeout."""

    def __init__(
        self,
        timeout: float,
        nc: NATS | None = None,
        commands: dict[str, frozenset[str]] | None = None,
    ) -> None:
        # None until the lifespan's first connection succeeds (the gateway serves meanwhile).
        self.nc = nc
        self.timeout = timeout
        self.commands = COMMANDS if commands is None else commands
        # Per service: every change (notices and commands), and the commands alone.
        self.change_counts: dict[str, int] = {}
        self.command_counts: dict[str, int] = {}
        # Bumped with every service's change: unchanged, nothing kept is stale (the edge's
        # fast path), and what an answer that asked no service depends on.
        self.generation = 0
        # Bumped at every reconnect: nothing kept before it is served after it.
        self.epoch = 0

    def changed(self, service: str) -> None:
        """A service announced a change: its kept answers are stale."""
        self.change_counts[service] = self.change_counts.get(service, 0) + 1
        self.generation += 1

    def commanded(self, service: str) -> None:
        """A command went to a service: its kept answers must not be served at all."""
        self.command_counts[service] = self.command_counts.get(service, 0) + 1
        self.changed(service)

    def forget_all(self) -> None:
        """After a reconnect: notices may have been missed, so nothing kept is served."""
        self.epoch += 1
        self.generation += 1

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
        asked = _asked.get()
        if asked is not None:
            asked.add(service)
        if self.nc is None or not self.nc.is_connected:
            raise UnavailableError(f"the {service} service cannot be reached: NATS is unavailable")
        payload = _encode(params) if params is not None else b"{}"
        if endpoint not in self.commands.get(service, ()):
            return await self._request(service, endpoint, payload, timeout)
        try:
            return await self._request(service, endpoint, payload, timeout)
        finally:
            self.commanded(service)  # even a failed command may have changed something

    async def answer(
        self,
        service: str,
        endpoint: str,
        params: msgspec.Struct | None = None,
        *,
        timeout: float | None = None,
    ) -> Response[Any]:
        """The service's answer as the HTTP response: its JSON bytes, not decoded.

        For routes that return what the service answered unchanged; the route's return
        annotation (`Response[TheAnswer]`) still documents the shape in OpenAPI.
        """
        data = await self.query_raw(service, endpoint, params, timeout=timeout)
        return Response(data, media_type=MediaType.JSON)

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
        """The service's answer decoded into `response_type` (for routes that use it)."""
        data = await self.query_raw(service, endpoint, params, timeout=timeout)
        try:
            return msgspec.json.decode(data, type=response_type)
        except msgspec.ValidationError as exc:
            raise StockpilotError(
                f"the {service} service answered {endpoint} in an unexpected shape: {exc}"
            ) from None


def asking() -> tuple[set[str], contextvars.Token[set[str] | None]]:
    """Start recording the services asked in this context (the edge, around one build)."""
    asked: set[str] = set()
    return asked, _asked.set(asked)


def stop_asking(token: contextvars.Token[set[str] | None]) -> None:
    """Stop the recording `asking()` started."""
    _asked.reset(token)


# How route handlers ask for the client: `services: Services`.
Services = NamedDependency[ServiceClient]

# How route handlers ask for the gateway's clock (`create_app(settings, clock)`): `clock:
# GatewayClock`. Every "now" a route stamps or compares comes from it, so tests can set it.
GatewayClock = NamedDependency[Clock]
