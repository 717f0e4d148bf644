"""The gateway's client for the services' request/reply endpoints.

Every route asks a service through here; a service that does not answer in time becomes an
UnavailableError (503), a service error keeps its status and detail.
"""

from __future__ import annotations

from typing import TypeVar

import msgspec
from litestar.di import NamedDependency
from nats.aio.client import Client as NATS
from nats.errors import NoRespondersError, TimeoutError

from shared.errors import StockpilotError, UnavailableError, error_for_status
from shared.runtime import endpoint_subject

T = TypeVar("T")

_ERROR_HEADER = "Nats-Service-Error"
_ERROR_CODE_HEADER = "Nats-Service-Error-Code"
_encode = msgspec.json.Encoder().encode


class ServiceClient:
    """Request/reply to `stockpilot.svc.<service>.<endpoint>` with a timeout."""

    def __init__(self, timeout: float, nc: NATS | None = None) -> None:
        # None until the lifespan's first connection succeeds (the gateway serves meanwhile).
        self.nc = nc
        self.timeout = timeout

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
            if type(exc).__module__.startswith("nats"):
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
        """The service's answer decoded into `response_type`."""
        data = await self.query_raw(service, endpoint, params, timeout=timeout)
        try:
            return msgspec.json.decode(data, type=response_type)
        except msgspec.ValidationError as exc:
            raise StockpilotError(
                f"the {service} service answered {endpoint} in an unexpected shape: {exc}"
            ) from None


# How route handlers ask for the client: `services: Services`.
Services = NamedDependency[ServiceClient]
