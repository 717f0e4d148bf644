"""The usage service's NATS adapter: projections, query endpoints, ingest and reset commands.

Why one module of over 300 lines: it is the service's one NATS adapter, `build` and the
endpoints it closes over, with the projections it wires up; the queries, decisions and fold
already live in their own modules.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import uuid
from datetime import datetime, timedelta
from typing import Any

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError as JsNotFoundError

from services.usage import decide, dedupe, queries, spend_log
from services.usage.contract import (
    SUBJECT_PRICES,
    SUBJECT_RECORDED,
    SUBJECT_RESET,
    AlertList,
    AlertsParams,
    BudgetAnswer,
    BudgetParams,
    ErrorWindow,
    IngestAnswer,
    IngestParams,
    Price,
    PricesChanged,
    ResetAnswer,
    ResetParams,
    SpendLog,
    SpendLogParams,
    SpendPeriod,
    StatsParams,
    TimeseriesParams,
    UsageCosts,
    UsageCounters,
    UsageStats,
    UsageSummary,
    UsageTimeseries,
    UsageToday,
    decode_usage_event,
)
from services.usage.history import AlertHistory, apply_alert, decode_alert
from services.usage.prices import PriceTable, configured_prices
from services.usage.projection import (
    FoldConfig,
    UsageProjection,
    make_apply,
)
from services.usage.settings import UsageSettings
from services.usage.view import FOLD_VERSION, UsageView, config_fingerprint
from shared.clock import Clock
from shared.endpoints import Endpoint, NoParams
from shared.errors import UnavailableError
from shared.nats_errors import is_nats_error
from shared.projection import Projection
from shared.publish import publish_event
from shared.runtime import Context, Prepare, ServiceDefinition
from shared.streams import STREAMS
from shared.transport import JetStreamPublisher, Published

log = logging.getLogger("stockpilot.usage")

PUBLISH_TIMEOUT_S = 10.0
APPLY_TIMEOUT_S = 5.0
# How often ingest reads the usage stream's duplicate window again (an operator may change
# it), and how much younger than it an id must be for the view not to be asked about it:
# the service's clock against the server's, and a publish still in flight.
WINDOW_READ_EVERY_S = 60.0
WINDOW_MARGIN_S = 3600.0


class DuplicateWindow:
    """The usage stream's duplicate window, as its server has it.

    JetStream refuses an id stored within that window itself (the acknowledgement says
    `duplicate`): a posted id need only be looked for in the view's memory of ids when it
    may have been stored before then. A generation of the memory begun within the window less
    WINDOW_MARGIN_S (with the 24-hour window: the current one, for its first 23 hours) is then
    skipped: its filter test was a tenth of what the usage service spent on a posted record
    (py-spy; bench/EXPLANATIONS.md). Unknown (not read yet, or unreadable): every generation
    is asked.
    """

    def __init__(self) -> None:
        self.window_s = 0.0
        self.read_at = -math.inf

    async def older_than(self, ctx: Context) -> float:
        """Epoch seconds before which a stored id may have left JetStream's window."""
        clock = asyncio.get_running_loop().time()
        if clock - self.read_at >= WINDOW_READ_EVERY_S:
            self.read_at = clock
            try:
                info = await ctx.js.stream_info(STREAMS["usage"].name)
                self.window_s = float(info.config.duplicate_window or 0.0)
            except Exception as exc:
                if not is_nats_error(exc):
                    raise
                log.warning("usage: the stream's duplicate window could not be read: %r", exc)
                self.window_s = 0.0
        if self.window_s <= WINDOW_MARGIN_S:
            return math.inf
        return ctx.now().timestamp() - self.window_s + WINDOW_MARGIN_S


def fold_config(settings: UsageSettings) -> FoldConfig:
    """What the fold needs from the settings."""
    return FoldConfig(
        zone=settings.zone,
        prices=PriceTable.with_overrides(settings.prices),
        daily_budget_usd=settings.daily_budget_usd,
        monthly_budget_usd=settings.monthly_budget_usd,
        cost_alert_pct=settings.cost_alert_pct,
        error_rate_alert_pct=settings.error_rate_alert_pct,
        error_rate_min_calls=settings.error_rate_min_calls,
        budgets=tuple(settings.budgets),
    )


def usage_projection(settings: UsageSettings) -> UsageProjection:
    """The usage statistics projection for these settings."""
    config = fold_config(settings)
    return UsageProjection(
        name="usage",
        stream=STREAMS["usage"],
        view_type=UsageView,
        decode=decode_usage_event,
        apply=make_apply(config),
        version=FOLD_VERSION,
        fingerprint=config_fingerprint(config),
        config=config,
    )


def prices_event(
    prices: dict[str, Price], last: PricesChanged | None, now: datetime
) -> PricesChanged | None:
    """The `usage.prices_changed` to publish at start: None when the stream's last table
    is this one. Its id follows from the table and the one it replaces, so replicas
    starting together store it once."""
    if last is not None and last.prices == prices:
        return None
    digest = hashlib.sha256(msgspec.json.encode(prices)).hexdigest()[:16]
    after = hashlib.sha256((last.id if last else "").encode()).hexdigest()[:8]
    return PricesChanged(id=f"usage-prices-{digest}-{after}", occurred_at=now, prices=prices)


async def _prices_message(js: JetStreamContext, *, first: bool) -> PricesChanged | None:
    """The stream's first or last price table (None when there is none)."""
    stream = STREAMS["usage"].name
    try:
        if first:
            msg = await js.get_msg(stream, seq=1, subject=SUBJECT_PRICES, next=True)
        else:
            msg = await js.get_msg(stream, subject=SUBJECT_PRICES)
    except JsNotFoundError:
        return None
    try:
        return msgspec.json.decode(msg.data or b"", type=PricesChanged)
    except msgspec.DecodeError:  # refused by the fold too: as if it were not there
        return None


def make_prepare(usage: UsageProjection, settings: UsageSettings) -> Prepare:
    """At start: publish the configured price table when it differs from the stream's last,
    then give the fold the stream's first table (for calls stored before any table)."""
    configured = configured_prices(settings.prices)

    async def prepare(js: JetStreamContext, clock: Clock | None) -> None:
        if clock is not None:
            event = prices_event(configured, await _prices_message(js, first=False), clock.now())
            if event is not None:
                try:
                    await publish_event(js, SUBJECT_PRICES, event)
                except Exception as exc:
                    if not is_nats_error(exc):
                        raise
                    # A stream that refuses writes (full, sealed) must not keep the service
                    # from answering; calls keep the stream's last table until a start
                    # that can store the new one.
                    log.error("usage: the price table could not be published: %r", exc)
        first = await _prices_message(js, first=True)
        if first is not None:
            usage.use_first_prices(first.prices)

    return prepare


def history_projection() -> Projection[AlertHistory, Any]:
    """Every alert of every source, newest kept."""
    return Projection(
        name="alert-history",
        stream=STREAMS["alerts"],
        view_type=AlertHistory,
        decode=decode_alert,
        apply=apply_alert,
        filter_subject="stockpilot.alerts.>",
    )


def _new_id() -> str:
    return f"usage-{uuid.uuid4().hex}"


# What the fold depends on (see fold_config/fold_policy): reported by `digest` for replay.
FOLD_SETTINGS = (
    "tz",
    "prices",
    "daily_budget_usd",
    "monthly_budget_usd",
    "budgets",
    "cost_alert_pct",
    "error_rate_alert_pct",
    "error_rate_min_calls",
)


def build(settings: UsageSettings) -> ServiceDefinition:
    """The usage service for these settings."""
    usage = usage_projection(settings)
    history = history_projection()

    # No cache here: the gateway keeps answers at its edge (gateway/response_cache.py) and
    # asks again only after this service's change notice, a command or its TTL.
    async def stats(params: StatsParams, ctx: Context) -> UsageStats:
        return queries.stats(usage.view, params, ctx.now(), settings)

    async def timeseries(params: TimeseriesParams, ctx: Context) -> UsageTimeseries:
        return queries.timeseries(usage.view, params, ctx.now(), settings)

    async def costs(params: NoParams, ctx: Context) -> UsageCosts:
        return queries.costs(usage.view, ctx.now(), settings)

    async def budget(params: BudgetParams, ctx: Context) -> BudgetAnswer:
        return queries.budget(usage.view, params, ctx.now(), settings)

    async def alerts(params: AlertsParams, ctx: Context) -> AlertList:
        return queries.alerts(history.view, params)

    def make_summary(now: datetime) -> UsageSummary:
        today = queries.stats(usage.view, StatsParams(), now, settings)
        # Money from the spend, which a reset does not restart (the budget stays honest).
        money = queries.costs(usage.view, now, settings)
        calls, failed = queries.calls_last_minutes(usage.view, now)
        return UsageSummary(
            today=UsageToday(
                requests=today.total_requests,
                cost_usd=money.today.cost_usd,
                error_rate=today.error_rate,
                budget_used_pct=money.today.used_pct,
            ),
            alerts_24h=queries.alerts_since(history.view, now - timedelta(hours=24)),
            spend=[
                SpendPeriod(
                    period="daily",
                    cost_usd=money.today.cost_usd,
                    budget_usd=money.today.budget_usd,
                    used_pct=money.today.used_pct,
                ),
                SpendPeriod(
                    period="monthly",
                    cost_usd=money.month.cost_usd,
                    budget_usd=money.month.budget_usd,
                    used_pct=money.month.used_pct,
                ),
            ],
            cost_alert_pct=settings.cost_alert_pct,
            errors=ErrorWindow(
                window_s=queries.RATE_WINDOW_S,
                calls=calls,
                failed=failed,
                rate_pct=round(100.0 * failed / calls, 4) if calls else None,
                threshold_pct=settings.error_rate_alert_pct,
                min_calls=settings.error_rate_min_calls,
            ),
        )

    async def summary(params: NoParams, ctx: Context) -> UsageSummary:
        return make_summary(ctx.now())

    async def counters(params: NoParams, ctx: Context) -> UsageCounters:
        return queries.counters(usage.view)

    # A page reads up to SCAN_BUDGET events: a few at a time leave the fold its share of the
    # process (the endpoint is concurrent, so a burst of pages would otherwise all run).
    reading = asyncio.Semaphore(spend_log.PAGES_AT_ONCE)

    async def records(params: SpendLogParams, ctx: Context) -> SpendLog:
        # Read from the stream itself, not the view: never cached, every page is fresh.
        async with reading:
            return await spend_log.page(
                usage, ctx.js, params, settings.zone, bare=settings.nats_accelerator == "on"
            )

    # Posted records go out as one pipelined window through the transport seam, as the usage
    # client publishes (nats-py's publish_async cost ~4 times the CPU an event: BENCHMARKS.md).
    publishers: list[JetStreamPublisher] = []
    stored_window = DuplicateWindow()

    def publisher(ctx: Context) -> JetStreamPublisher:
        if not publishers:
            publishers.append(
                JetStreamPublisher(
                    ctx.nc,
                    accelerated=settings.nats_accelerator == "on",
                    name="stockpilot-usage-ingest",
                    timeout=PUBLISH_TIMEOUT_S,
                )
            )
        return publishers[0]

    async def ingest_publisher(ctx: Context) -> None:
        """Keeps the ingest publisher until the service stops, then closes its connection."""
        try:
            await ctx.stopping.wait()
        finally:
            for opened in publishers:
                opened.close()

    async def ingest(params: IngestParams, ctx: Context) -> IngestAnswer:
        events, rejected = decide.records_to_events(params, _new_id)
        encoded, oversized = decide.encode_within(events, ctx.nc.max_payload)
        if oversized:
            rejected = sorted([*rejected, *oversized], key=lambda r: r.index)
        ids = usage.view.ids
        older_than = await stored_window.older_than(ctx)
        duplicates = 0
        window = []
        for event_id, payload in encoded:
            # Beyond JetStream's duplicate window the projection still knows recent ids.
            if dedupe.has(ids, event_id, older_than):
                duplicates += 1
            else:
                window.append((event_id, payload))
        stored = await _store(publisher(ctx), window)
        duplicates += stored.duplicates
        if stored.last_seq:
            await ctx.wait_applied(usage, stored.last_seq, APPLY_TIMEOUT_S)
        return IngestAnswer(
            accepted=len(encoded) - duplicates,
            duplicates=duplicates,
            rejected=rejected,
            ids=[event_id for event_id, _ in encoded],
        )

    async def reset(params: ResetParams, ctx: Context) -> ResetAnswer:
        event = decide.reset_event(params, ctx.now(), f"usage-reset-{uuid.uuid4().hex}")
        ack = await ctx.publish(SUBJECT_RESET, event)
        await ctx.wait_applied(usage, ack.seq, APPLY_TIMEOUT_S)
        return ResetAnswer(reset=True, scope=event.scope, at=event.occurred_at, id=event.id)

    return ServiceDefinition(
        name="usage",
        fold_settings=FOLD_SETTINGS,
        projections=[usage, history],
        endpoints=[
            Endpoint("stats", StatsParams, stats),
            Endpoint("timeseries", TimeseriesParams, timeseries),
            Endpoint("costs", NoParams, costs),
            Endpoint("budget", BudgetParams, budget),
            Endpoint("alerts", AlertsParams, alerts),
            Endpoint("summary", NoParams, summary),
            Endpoint("counters", NoParams, counters),
            Endpoint("records", SpendLogParams, records, concurrent=True),
            Endpoint("ingest", IngestParams, ingest, concurrent=True),
            Endpoint("reset", ResetParams, reset, concurrent=True),
        ],
        background=[ingest_publisher],
        publishers=lambda: {"ingest": publishers[0].path} if publishers else {},
        alert_source="usage",
        description="StockPilot LLM usage, cost, latency and error statistics, budgets, alerts",
        prepare=make_prepare(usage, settings),
    )


async def _store(publisher: JetStreamPublisher, window: list[tuple[str, bytes]]) -> Published:
    """Publish the window (Msg-Id = event id) and wait for its acknowledgements: what the
    stream stored, or UnavailableError (503) saying why not all of it was."""
    if not window:
        return Published(0, 0, 0, None)
    outcome = await publisher.publish(SUBJECT_RECORDED, window)
    try:
        published = await asyncio.wait_for(asyncio.shield(outcome), PUBLISH_TIMEOUT_S)
    except TimeoutError:
        # What the publisher still owes ends as not acknowledged; the next window opens anew.
        publisher.reset()
        raise UnavailableError(
            "JetStream did not acknowledge the records in time; retry (ids make it safe)"
        ) from None
    if published.error is not None:
        raise UnavailableError(
            f"could not store the records in JetStream: {published.error} "
            f"({published.acked} of {published.size} stored; a retry stores each record "
            "with an id once)"
        )
    return published
