"""`GET /metrics`: Prometheus text format.

Per-route request counts and latency histograms come from `gateway.request_metrics`
(global registry, `stockpilot_gateway_*`), which sees every request, kept answers included.
The system's own figures are gathered at scrape time, concurrently and with a short timeout,
from the same service answers the REST routes serve (through the same client and its
cache), so both agree. A source that does not answer
only drops its own families (`stockpilot_metrics_source_up` says which); the scrape never
fails because of it. The families themselves are built in `gateway.metrics_families`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import TypeVar

import msgspec
from litestar import Response, get
from litestar.router import Router
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from gateway import metrics_families as fam
from gateway.auth import read_guard
from gateway.services import GatewayClock, ServiceClient, Services
from services.batch import contract as batch
from services.health.contract import ComprehensiveHealth
from services.usage.contract import StatsParams, UsageCosts, UsageCounters, UsageStats, UsageSummary
from shared.clock import Clock
from shared.errors import StockpilotError
from shared.hook_status import HooksStatus, read_hooks_status
from shared.nats_errors import NATS_ERRORS
from shared.service_status import ServiceStatus

T = TypeVar("T")

SERVICES = ("health", "usage", "batch")
# A scrape must not hang on a wedged service (Prometheus' own timeout is 10 s by default).
SCRAPE_TIMEOUT_S = 1.5
# Litestar appends "; charset=utf-8" to text media types itself.
CONTENT_TYPE = "text/plain; version=0.0.4"
# The hook status that cannot be read: no answer in time, a NATS error or a garbled value.
_UNREADABLE: tuple[type[Exception], ...] = (TimeoutError, msgspec.DecodeError, *NATS_ERRORS)


class _Families(Collector):
    """A collector over metric families already built for one scrape."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        yield from self.families


class Scrape:
    """One scrape's questions: each answer or None, and which sources answered."""

    def __init__(self, services: ServiceClient, clock: Clock) -> None:
        self.services = services
        self.clock = clock
        self.timeout = min(services.timeout, SCRAPE_TIMEOUT_S)
        self.sources: dict[tuple[str, str], bool] = {}

    async def ask(
        self,
        service: str,
        endpoint: str,
        answer: type[T],
        params: msgspec.Struct | None = None,
    ) -> T | None:
        """The service's answer (what the REST route would serve), or None."""
        try:
            value = await self.services.query(
                service, endpoint, answer, params, timeout=self.timeout
            )
        except StockpilotError:
            self.sources[(service, endpoint)] = False
            return None
        self.sources[(service, endpoint)] = True
        return value

    async def hooks(self) -> tuple[bool, HooksStatus | None]:
        """The hook process's published status (KV): (read, status or None when never run)."""
        nc = self.services.nc
        status: HooksStatus | None = None
        ok = nc is not None and nc.is_connected
        if nc is not None and ok:
            try:
                status = await asyncio.wait_for(read_hooks_status(nc.jetstream()), self.timeout)
            except _UNREADABLE:
                ok = False
        self.sources[("hooks", "status")] = ok
        return ok, status


async def _services(scrape: Scrape) -> list[Metric]:
    statuses = await asyncio.gather(
        *(scrape.ask(name, "status", ServiceStatus) for name in SERVICES)
    )
    by_service = dict(zip(SERVICES, statuses, strict=True))
    return [*fam.service_families(by_service), *fam.transport_families(by_service)]


async def _usage(scrape: Scrape) -> list[Metric]:
    # The same parameters as the REST routes' defaults: the same cached answers.
    counters, stats, costs, summary = await asyncio.gather(
        scrape.ask("usage", "counters", UsageCounters),
        scrape.ask("usage", "stats", UsageStats, StatsParams()),
        scrape.ask("usage", "costs", UsageCosts),
        scrape.ask("usage", "summary", UsageSummary),
    )
    families: list[Metric] = []
    if counters is not None:
        families.extend(fam.usage_counter_families(counters))
    if stats is not None:
        families.extend(fam.usage_today_families(stats))
    if costs is not None:
        families.extend(fam.usage_budget_families(costs))
    if summary is not None:
        families.extend(fam.alert_families(summary))
    return families


async def _health(scrape: Scrape) -> list[Metric]:
    health = await scrape.ask("health", "comprehensive", ComprehensiveHealth)
    return [] if health is None else fam.health_families(health)


async def _batch(scrape: Scrape) -> list[Metric]:
    stats, locks = await asyncio.gather(
        scrape.ask("batch", "stats", batch.BatchStats, batch.StatsParams()),
        scrape.ask("batch", "locks", batch.HeldLocks),
    )
    families: list[Metric] = []
    if stats is not None:
        families.extend(fam.batch_families(stats))
    if locks is not None:
        families.extend(fam.lock_families(locks))
    return families


async def _hooks(scrape: Scrape) -> list[Metric]:
    ok, status = await scrape.hooks()
    return fam.hook_families(status, scrape.clock.now()) if ok else []


# One collector per area, run concurrently at every scrape.
COLLECTORS: tuple[Callable[[Scrape], Awaitable[list[Metric]]], ...] = (
    _services,
    _usage,
    _health,
    _batch,
    _hooks,
)


def _source_family(sources: dict[tuple[str, str], bool]) -> Metric:
    family = GaugeMetricFamily(
        "stockpilot_metrics_source_up",
        "1 when the answer behind a group of families arrived during this scrape, else 0",
        labels=["service", "answer"],
    )
    for (service, answer), ok in sorted(sources.items()):
        family.add_metric([service, answer], 1.0 if ok else 0.0)
    return family


@get(
    "/metrics",
    summary="Prometheus metrics",
    guards=[read_guard],
    media_type=CONTENT_TYPE,
    include_in_schema=True,
)
async def metrics(services: Services, clock: GatewayClock) -> Response[bytes]:
    """The gateway's request metrics plus the system's figures, in the text format."""
    scrape = Scrape(services, clock)
    groups = await asyncio.gather(*(collect(scrape) for collect in COLLECTORS))
    families = [family for group in groups for family in group]
    families.append(_source_family(scrape.sources))
    registry = CollectorRegistry()
    registry.register(_Families(families))
    body = generate_latest(REGISTRY) + generate_latest(registry)
    return Response(body, media_type=CONTENT_TYPE)


router = Router(path="/", route_handlers=[metrics])
