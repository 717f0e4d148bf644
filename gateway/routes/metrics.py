"""`GET /metrics`: Prometheus text format.

Per-route request counts and latency histograms come from Litestar's Prometheus middleware
(global registry); the system's own figures are gathered from the services at scrape time
into a fresh registry, so they match what the REST routes answer at that moment.
"""

from __future__ import annotations

import asyncio

from litestar import Response, get
from litestar.router import Router
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.services import ServiceClient, Services
from shared.errors import StockpilotError
from shared.runtime import ServiceStatus

SERVICES = ("health", "usage", "batch")
SCRAPE_TIMEOUT_S = 1.5
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _Families(Collector):
    """A collector over metric families already built for one scrape."""

    def __init__(self, families: list[GaugeMetricFamily]) -> None:
        self.families = families

    def collect(self):  # type: ignore[no-untyped-def]
        yield from self.families


async def _service_families(services: ServiceClient) -> list[GaugeMetricFamily]:
    up = GaugeMetricFamily(
        "stockpilot_service_up", "1 when the service answers", labels=["service"]
    )
    lag = GaugeMetricFamily(
        "stockpilot_projection_lag_events",
        "events in the stream not yet folded into the projection",
        labels=["service", "projection"],
    )
    last_seq = GaugeMetricFamily(
        "stockpilot_projection_last_seq",
        "last stream sequence folded",
        labels=["service", "projection"],
    )
    dead = GaugeMetricFamily(
        "stockpilot_projection_dead_lettered",
        "messages refused and dead-lettered since the process started",
        labels=["service", "projection"],
    )
    rss = GaugeMetricFamily("stockpilot_process_rss_bytes", "resident memory", labels=["service"])

    async def one(name: str) -> ServiceStatus | None:
        try:
            return await services.query(name, "status", ServiceStatus, timeout=SCRAPE_TIMEOUT_S)
        except StockpilotError:
            return None

    statuses = await asyncio.gather(*(one(name) for name in SERVICES))
    for name, status in zip(SERVICES, statuses, strict=True):
        up.add_metric([name], 0.0 if status is None else 1.0)
        if status is None:
            continue
        rss.add_metric([name], status.process.rss_mb * 1024 * 1024)
        for projection in status.projections:
            lag.add_metric([name, projection.name], projection.lag)
            last_seq.add_metric([name, projection.name], projection.last_seq)
            dead.add_metric([name, projection.name], projection.dead_lettered)
    return [up, lag, last_seq, dead, rss]


# Each area adds its own families here (usage, health, batch, hooks); see `collectors`.
COLLECTORS: list = []  # type: ignore[type-arg]


@get("/metrics", summary="Prometheus metrics", include_in_schema=True)
async def metrics(services: Services) -> Response[bytes]:
    """The gateway's request metrics plus the system's figures, in the text format."""
    families = await _service_families(services)
    extra = await asyncio.gather(*(collect(services) for collect in COLLECTORS))
    for group in extra:
        families.extend(group)
    scrape = CollectorRegistry()
    scrape.register(_Families(families))
    body = generate_latest(REGISTRY) + generate_latest(scrape)
    return Response(body, media_type=CONTENT_TYPE)


router = Router(path="/", route_handlers=[metrics])
