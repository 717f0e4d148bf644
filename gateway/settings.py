"""Gateway settings."""

from __future__ import annotations

from typing import Annotated

import msgspec

from shared.settings import (
    CommonSettings,
    NonNegativeFloat,
    Port,
    PositiveFloat,
    strip_whitespace,
)


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
    # How long a kept read answer is served before one request rebuilds it (answers also go
    # stale at their services' change notices); a stale copy is served only while it is
    # rebuilt, and never past cache_ttl_s + service_timeout_s (gateway.response_cache).
    cache_ttl_s: Annotated[float, msgspec.Meta(ge=0)] = 1.0
    # Largest request body accepted (POST /usage/records takes up to 1,000 records).
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 1024 * 1024
    # Slowloris: a connection whose request line and headers are not all in after this many
    # seconds is closed (uvicorn has no such timeout of its own, see gateway.http_server).
    http_header_timeout_s: PositiveFloat = 10.0
    # A request whose body is not all in this many seconds after its headers is closed.
    http_body_timeout_s: PositiveFloat = 30.0
    # An idle keep-alive connection is closed after this many seconds.
    http_keep_alive_timeout_s: PositiveFloat = 5.0
    # SSE clients of /api/v1/alerts/stream per gateway process; beyond it 503. They all share
    # one JetStream consumer (gateway.alert_fanout).
    sse_max_clients: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 100
    # Alert bytes buffered for one SSE client that does not keep up: past it the client is
    # dropped (it resumes with Last-Event-ID and loses nothing), so a client that never reads
    # costs the gateway at most this much (plus the socket's own buffer).
    sse_client_buffer_bytes: Annotated[int, msgspec.Meta(ge=4096, le=1 << 30)] = 1 << 20
    # `?fresh=true` (admin token only) runs at most one round of probes per this many seconds;
    # asks inside the window get the round in flight or just done. 0: a round per ask.
    health_fresh_interval_s: NonNegativeFloat = 10.0

    def __post_init__(self) -> None:
        super().__post_init__()
        # A token read from a file ends with a newline no client sends (shared.settings).
        strip_whitespace(self, "admin_token", "ingest_token", "read_token")
