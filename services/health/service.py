"""The health service's NATS adapter: rounds of probes published as events, queries answered.

Every `health_interval_s` a round runs every probe at once and publishes one `health.checked`
event per component plus one `health.host_sampled`; the projection folds them. `?fresh=true`
runs a round now, and requests arriving while one runs share it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from datetime import datetime

import httpx
from nats.errors import Error as NatsError
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError

from services.health import contract, history, host, probes, queries
from services.health.contract import (
    MAX_ERROR_CHARS,
    HealthChecked,
    HealthEvent,
    HostSampled,
    decode_health_event,
)
from services.health.projection import FOLD_VERSION, FoldPolicy, HealthView, make_apply
from services.health.settings import HealthSettings
from shared.endpoints import Endpoint, NoParams
from shared.errors import StockpilotError
from shared.projection import Projection, fold_fingerprint
from shared.runtime import Context, ServiceDefinition
from shared.streams import STATE_BUCKET, STREAMS

log = logging.getLogger("stockpilot.health")


def fold_policy(settings: HealthSettings) -> FoldPolicy:
    """The projection's configuration from the settings."""
    return FoldPolicy(
        down_after=settings.hysteresis_down,
        up_after=settings.hysteresis_up,
        max_samples=settings.history_max_samples,
        max_hours=settings.history_max_hours,
    )


def health_projection(settings: HealthSettings) -> Projection[HealthView, HealthEvent]:
    """The health projection (what the service and the replay tooling fold with)."""
    return Projection(
        name="health",
        stream=STREAMS["health"],
        view_type=HealthView,
        decode=decode_health_event,
        apply=make_apply(fold_policy(settings)),
        version=FOLD_VERSION,
        # Hysteresis and history bounds shape the view: a snapshot under others is rebuilt.
        fingerprint=fold_fingerprint(fold_policy(settings)),
    )


def round_events(
    results: list[probes.ProbeResult], sample: host.HostMetrics, at: datetime, round_id: str
) -> list[HealthEvent]:
    """The events of one round: a result per component, then the host sample."""
    events: list[HealthEvent] = [
        HealthChecked(
            id=f"hc-{round_id}-{r.component}",
            occurred_at=at,
            component=r.component,
            kind=r.kind,
            status=r.status,
            latency_ms=r.latency_ms,
            details=r.details,
            # A driver's message is short, but one past the event's bound would make the
            # service's own result a dead letter.
            error=r.error[:MAX_ERROR_CHARS] if r.error else r.error,
            round_id=round_id,
        )
        for r in results
    ]
    events.append(
        HostSampled(
            id=f"hs-{round_id}",
            occurred_at=at,
            cpu_percent=sample.cpu_percent,
            memory_percent=sample.memory_percent,
            disk_percent=sample.disk_percent,
            uptime_s=sample.uptime_s,
            round_id=round_id,
        )
    )
    return events


class Rounds:
    """Runs rounds of probes; concurrent callers share the round in flight."""

    def __init__(
        self, settings: HealthSettings, projection: Projection[HealthView, HealthEvent]
    ) -> None:
        self.settings = settings
        self.projection = projection
        self.http: httpx.AsyncClient | None = None
        self._current: asyncio.Task[None] | None = None
        self.completed = 0
        # When the latest round that reached the view had started.
        self.last_started: datetime | None = None
        host.sample_host(settings.data_dir)  # primes psutil's CPU counter

    async def run(self, ctx: Context) -> None:
        """Run a round, or join the one already running; returns once the view has it."""
        if self._current is None or self._current.done():
            self._current = asyncio.create_task(self._round(ctx), name="health-round")
        await asyncio.shield(self._current)

    async def fresh(self, ctx: Context, requested_at: datetime | None) -> None:
        """A round for a request made at `requested_at`: one in flight, or done since, or new."""
        running = self._current is not None and not self._current.done()
        since = requested_at or ctx.now()
        if not running and self.last_started is not None and self.last_started >= since:
            return
        await self.run(ctx)

    async def _round(self, ctx: Context) -> None:
        if self.http is None:
            self.http = probes.new_http_client()
        at = ctx.now()
        round_id = f"{int(at.timestamp() * 1000)}-{uuid.uuid4().hex[:8]}"
        results = await probes.probe_all(self.settings, self.http)
        sample = host.sample_host(self.settings.data_dir)
        last = 0
        for event in round_events(results, sample, at, round_id):
            ack = await ctx.publish(event.subject, event)
            last = max(last, ack.seq)
        await ctx.wait_applied(self.projection, last, timeout=5.0)
        self.completed += 1
        self.last_started = at

    async def close(self) -> None:
        """Close the HTTP client (the service is stopping)."""
        if self._current is not None and not self._current.done():
            self._current.cancel()
            await asyncio.gather(self._current, return_exceptions=True)
        if self.http is not None:
            await self.http.aclose()
            self.http = None


ROUND_KEY = "health.round"


async def claim_round(ctx: Context, slot: int) -> bool:
    """Whether this instance runs the scheduled round of time slot `slot`.

    Replicas (and a restarted service) share the schedule: the slot number is claimed with a
    compare-and-set on a key of the state bucket, so each slot's round runs once. When NATS
    cannot say, the round runs (probing twice beats not probing).
    """
    try:
        kv = await ctx.js.key_value(STATE_BUCKET)
        try:
            entry = await kv.get(ROUND_KEY)
        except KeyNotFoundError:
            await kv.create(ROUND_KEY, str(slot).encode())
            return True
        if int(entry.value or b"0") >= slot:
            return False
        await kv.update(ROUND_KEY, str(slot).encode(), last=entry.revision)
        return True
    except KeyWrongLastSequenceError:
        return False  # another replica claimed it first
    except (ValueError, TimeoutError, OSError, NatsError) as exc:
        log.warning("could not claim health round %d (%s); running it anyway", slot, exc)
        return True


class CurrentBoard:
    """The configured components' answers, computed once per view change.

    Uptime and p95 windows over a day of samples cost milliseconds; recomputing them on every
    request would cap a route at a few hundred answers per second. They are recomputed when
    an event is folded, and every few seconds as the windows slide.
    """

    SLIDE_S = 5.0

    def __init__(
        self, settings: HealthSettings, projection: Projection[HealthView, HealthEvent]
    ) -> None:
        self.settings = settings
        self.projection = projection
        self._key: tuple[int, int] | None = None
        self._board: queries.Board = {}

    def at(self, now: datetime) -> queries.Board:
        """The board as of `now` (at most SLIDE_S old in its windows)."""
        view = self.projection.view
        key = (view.last_seq, int(now.timestamp() // self.SLIDE_S))
        if key != self._key:
            self._board = queries.board(view, self.settings, now)
            self._key = key
        return self._board


# What the fold depends on (see fold_config/fold_policy): reported by `digest` for replay.
FOLD_SETTINGS = ("hysteresis_down", "hysteresis_up", "history_max_samples", "history_max_hours")


def build(settings: HealthSettings) -> ServiceDefinition:
    """The health service: its projection, its query endpoints, its round of probes."""
    health = health_projection(settings)
    rounds = Rounds(settings, health)
    current = CurrentBoard(settings, health)

    async def probe_loop(ctx: Context) -> None:
        interval = settings.health_interval_s
        try:
            while not ctx.stopping.is_set():
                slot = int(ctx.now().timestamp() // interval)
                if await claim_round(ctx, slot):
                    try:
                        await rounds.run(ctx)
                    except StockpilotError as exc:
                        log.warning("health round could not be stored: %s", exc.detail)
                wait = (slot + 1) * interval - ctx.now().timestamp()
                if wait > 0:
                    try:
                        await asyncio.wait_for(ctx.stopping.wait(), wait)
                    except TimeoutError:
                        pass
        finally:
            await rounds.close()

    # Cached answers and fresh ones are separate endpoints: requests to one endpoint are
    # handled one at a time, and a cached answer must never wait behind a round of probes.
    async def summary(_: NoParams, ctx: Context) -> contract.HealthSummary:
        now = ctx.now()
        return queries.summary(health.view, settings, now, current.at(now))

    async def comprehensive(_: NoParams, ctx: Context) -> contract.ComprehensiveHealth:
        now = ctx.now()
        return queries.comprehensive(health.view, settings, now, True, current.at(now))

    async def comprehensive_fresh(
        params: contract.FreshParams, ctx: Context
    ) -> contract.ComprehensiveHealth:
        await rounds.fresh(ctx, params.requested_at)
        now = ctx.now()
        return queries.comprehensive(health.view, settings, now, False, current.at(now))

    async def component(params: contract.ComponentParams, ctx: Context) -> contract.ComponentAnswer:
        now = ctx.now()
        return queries.component(health.view, settings, params.name, now, True, current.at(now))

    async def component_fresh(
        params: contract.ComponentParams, ctx: Context
    ) -> contract.ComponentAnswer:
        queries.component(health.view, settings, params.name, ctx.now(), True)  # 404 first
        await rounds.fresh(ctx, params.requested_at)
        now = ctx.now()
        return queries.component(health.view, settings, params.name, now, False, current.at(now))

    async def external_apis(_: NoParams, ctx: Context) -> contract.ExternalApisHealth:
        now = ctx.now()
        return queries.external_apis(health.view, settings, now, True, current.at(now))

    async def external_apis_fresh(
        params: contract.FreshParams, ctx: Context
    ) -> contract.ExternalApisHealth:
        await rounds.fresh(ctx, params.requested_at)
        now = ctx.now()
        return queries.external_apis(health.view, settings, now, False, current.at(now))

    async def series(params: contract.HistoryParams, ctx: Context) -> contract.HealthHistory:
        return history.history(health.view, settings, params, ctx.now())

    probe_loop.__name__ = "health_probes"
    return ServiceDefinition(
        name="health",
        fold_settings=FOLD_SETTINGS,
        projections=[health],
        endpoints=[
            Endpoint("summary", NoParams, summary),
            Endpoint("comprehensive", NoParams, comprehensive),
            Endpoint(
                "comprehensive_fresh", contract.FreshParams, comprehensive_fresh, concurrent=True
            ),
            Endpoint("component", contract.ComponentParams, component),
            Endpoint("component_fresh", contract.ComponentParams, component_fresh, concurrent=True),
            Endpoint("external_apis", NoParams, external_apis),
            Endpoint(
                "external_apis_fresh", contract.FreshParams, external_apis_fresh, concurrent=True
            ),
            Endpoint("history", contract.HistoryParams, series),
        ],
        background=[probe_loop],
        alert_source="health",
        description="StockPilot dependency health: probes, history, status changes",
    )
