"""Gateway settings."""

from __future__ import annotations

from typing import Annotated

import msgspec

from shared.settings import CommonSettings, Port, PositiveFloat


class GatewaySettings(CommonSettings, frozen=True, kw_only=True):
    """Where the gateway listens, the tokens that guard it, how long it waits for services."""

    http_host: str = "127.0.0.1"
    http_port: Port = 8000
    # Gateway processes sharing the port. Each keeps its own answers, so a second one
    # roughly doubles the read routes' throughput where a core is free for it
    # (BENCHMARKS.md: 36k -> 57k req/s on 2 cores, services idle), at ~60 MB each and at
    # the cost of the CPU the services and nats-server need while events stream in.
    http_workers: Annotated[int, msgspec.Meta(ge=1, le=64)] = 1
    admin_token: str | None = None
    ingest_token: str | None = None
    read_token: str | None = None
    # How long a route waits for a service before answering 503.
    service_timeout_s: PositiveFloat = 2.0
    # Longest a cached read answer is served (answers also expire on every change notice).
    cache_ttl_s: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    # Largest request body accepted (POST /usage/records takes up to 1,000 records).
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 1024 * 1024
