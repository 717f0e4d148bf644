"""The bare-route ceiling: a Litestar route returning a same-sized msgspec struct, served by
uvicorn with the gateway's settings (uvloop, httptools, one worker, no access log)."""

from __future__ import annotations

import sys
from datetime import UTC, datetime

import msgspec
import uvicorn
from litestar import Litestar, get


class Payload(msgspec.Struct, kw_only=True):
    """About the size of a /api/v1/status answer (20 fields)."""

    status: str = "healthy"
    timestamp: datetime = datetime(2026, 11, 26, tzinfo=UTC)
    f01: int = 1
    f02: int = 2
    f03: float = 3.5
    f04: float = 4.5
    f05: str = "database"
    f06: str = "redis"
    f07: str = "openai"
    f08: str = "external.quotes"
    f09: int = 9
    f10: int = 10
    f11: float = 11.25
    f12: float = 12.25
    f13: str = "healthy"
    f14: str = "healthy"
    f15: dict[str, str] = msgspec.field(default_factory=lambda: {"health": "up", "usage": "up"})
    f16: list[int] = msgspec.field(default_factory=lambda: [1, 2, 3, 4])
    f17: bool = True
    f18: str | None = None


PAYLOAD = Payload()


@get("/bare")
async def bare() -> Payload:
    """The ceiling route."""
    return PAYLOAD


def main() -> None:
    port = int(sys.argv[1])
    uvicorn.run(
        Litestar([bare], openapi_config=None),
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
