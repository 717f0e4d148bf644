"""The request/reply face of a service, on the `nats.micro` framework.

A service declares `Endpoint`s; `start_service` registers the process with nats.micro
(`$SRV.PING|INFO|STATS` included) and `add_endpoints` answers each on
`stockpilot.svc.<service>.<endpoint>`, queue-grouped so replicas share the load. A handler's
parameters are decoded (and validated) from the request JSON; what it raises reaches the
caller as a micro error with the HTTP status and detail of `shared.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import msgspec
from nats.aio.client import Client as NATS
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.request import ServiceError as MicroServiceError
from nats.micro.service import Service, ServiceConfig

from shared.errors import StockpilotError

if TYPE_CHECKING:  # the handlers' argument; shared.runtime builds it around the Runtime
    from shared.runtime import Context

log = logging.getLogger("stockpilot.runtime")

P = TypeVar("P", bound=msgspec.Struct)


def endpoint_subject(service: str, endpoint: str) -> str:
    """The request subject of one endpoint of one service."""
    return f"stockpilot.svc.{service}.{endpoint}"


def micro_name(service: str) -> str:
    """The nats.micro service name (`$SRV.PING.<name>`)."""
    return f"stockpilot-{service}"


class NoParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Parameters of an endpoint that takes none."""


@dataclass(frozen=True)
class Endpoint(Generic[P]):
    """One request/reply endpoint: its parameters are decoded (and validated) into `params`."""

    name: str
    params: type[P]
    handler: Callable[[P, Context], Awaitable[msgspec.Struct | bytes]]
    # nats-py hands one subscription's messages to its callback one at a time: a slow
    # endpoint (a command waiting for its event to be folded, a fresh probe round) would
    # queue every other request to it. Such endpoints run each request in its own task.
    concurrent: bool = False


async def start_service(nc: NATS, service: str, description: str, version: str) -> Service:
    """Register this process as an instance of `service` with nats.micro (no endpoints yet)."""
    return await add_service(
        nc,
        ServiceConfig(
            name=micro_name(service),
            version=version,
            description=description or f"StockPilot {service} service",
            queue_group=f"stockpilot-{service}",
            metadata={"service": service, "pid": str(os.getpid())},
        ),
    )


async def add_endpoints(
    micro: Service, service: str, endpoints: Sequence[Endpoint[Any]], context: Context
) -> None:
    """Answer each endpoint on its subject; handlers get `context`."""
    for endpoint in endpoints:
        await micro.add_endpoint(
            name=endpoint.name,
            subject=endpoint_subject(service, endpoint.name),
            handler=handler(service, endpoint, context),
        )


def handler(
    service: str, endpoint: Endpoint[Any], context: Context
) -> Callable[[Request], Awaitable[None]]:
    """The nats.micro handler of one endpoint: decode, call, encode, map errors."""
    decoder = msgspec.json.Decoder(endpoint.params)
    encode = msgspec.json.Encoder().encode

    async def handle(request: Request) -> None:
        try:
            params = decoder.decode(request.data or b"{}")
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise MicroServiceError("422", str(exc)) from None
        try:
            result = await endpoint.handler(params, context)
        except StockpilotError as exc:
            raise MicroServiceError(str(exc.status), exc.detail) from None
        except Exception as exc:
            log.exception("%s: endpoint %s failed", service, endpoint.name)
            raise MicroServiceError("500", f"internal error in {endpoint.name}") from exc
        await request.respond(result if isinstance(result, bytes) else encode(result))

    if not endpoint.concurrent:
        return handle
    tasks: set[asyncio.Task[None]] = set()

    async def respond_error(request: Request, error: MicroServiceError) -> None:
        with contextlib.suppress(Exception):
            await request.respond_error(error.code, error.description)

    async def in_its_own_task(request: Request) -> None:
        try:
            await handle(request)
        except MicroServiceError as error:
            await respond_error(request, error)

    async def spawn(request: Request) -> None:
        task = asyncio.create_task(in_its_own_task(request))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    return spawn
