"""The usage projection: a pure fold of STOCKPILOT_USAGE into the bounded UsageView.

`apply` also runs the alert state machines (budget crossings, error-rate episodes, unpriced
models) and returns the alerts for what the event crossed (`services.usage.alerting` words
them, with deterministic ids), so every replica and every replay derives the same ones.

Longer than the house's ~300 lines on purpose: `record`, the fold of one call, is the hot
path of every replay and start-up (bench/profile_usage_fold.py, docs/profiles/usage-fold-*),
kept as one closure over its configuration with its steps inline; what an event crossed
(budgets, error-rate episodes, late periods) lives in services.usage.crossings.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Protocol, TypeVar
from zoneinfo import ZoneInfo

from services.usage import dedupe, sketch
from services.usage.alerting import alerts_for
from services.usage.contract import Price, PricesChanged, UsageEvent, UsageRecorded, UsageReset
from services.usage.crossings import (
    covers,
    crossings,
    error_window,
    scoped_spend,
    silence_closed_periods,
)
from services.usage.prices import PriceTable
from services.usage.sketch import Sketch
from services.usage.view import (
    CELL_DAYS,
    CELL_LIMIT,
    DAY_LIMIT,
    FORECAST_MIN_ELAPSED_S,
    HOUR_CELL_LIMIT,
    HOUR_LIMIT,
    KEY_LIMIT,
    LATENCY_BUCKETS_S,
    MONTH_LIMIT,
    NO_ENDPOINT,
    OTHER,
    OTHER_TAGS,
    PRICE_TABLE_LIMIT,
    UNPRICED_LIMIT,
    Agg,
    Cell,
    CellKey,
    Day,
    Fired,
    FoldConfig,
    Hour,
    Month,
    PriceEpoch,
    Spend,
    UsageView,
    hour_key,
    keep_breakdowns,
    month_bounds,
)
from shared.events import Alert
from shared.projection import NOTHING_FIRED, Projection

__all__ = [
    "FoldConfig",
    "UsageApply",
    "UsageProjection",
    "UsageView",
    "make_apply",
]


class UsageApply(Protocol):
    """The usage fold of the event stored at `seq`: the alerts it fired. `stored_at` is the
    stream's timestamp of the event (epoch seconds; None outside the runtime)."""

    def __call__(
        self, view: UsageView, event: UsageEvent, seq: int, stored_at: float | None = None
    ) -> Sequence[Alert]: ...


_SLOT_S = 900
_SLOT = timedelta(seconds=_SLOT_S)
_SLOT_END = timedelta(seconds=_SLOT_S, microseconds=-1)
_SLOT_LIMIT = 10_000
A = TypeVar("A", bound=Agg)
T = TypeVar("T")


def _entry(mapping: dict[str, T], key: str, limit: int, make: Callable[[], T]) -> T:
    """The entry of `key` (made; `(other)`'s once `limit` keys are held)."""
    found = mapping.get(key)
    if found is None:
        if len(mapping) >= limit:
            key = OTHER
            found = mapping.get(key)
        if found is None:
            found = mapping[key] = make()
    return found


def _count_into(mapping: dict[str, Agg], key: str, limit: int) -> Agg:
    """The aggregate of `key` (created; `(other)` once `limit` keys are held)."""
    return _entry(mapping, key, limit, Agg)


def _sketch_of(sketches: dict[str, Sketch], key: str) -> Sketch:
    """The latency sketch of `key` (created; `(other)` once KEY_LIMIT keys are held)."""
    return _entry(sketches, key, KEY_LIMIT, _new_sketch)


def _new_sketch() -> Sketch:
    return Sketch(bins={})


def _cell_into(cells: dict[CellKey, A], key: CellKey, limit: int, make: Callable[[], A]) -> A:
    """The cell of `key` (created), or once `limit` cells are held the finest coarser one:
    the user, then the tags, then the endpoint, then the model counted as `(other)`.

    Coarser cells may take a tenth more room; past that everything new goes to the one
    all-`(other)` cell, so a day holds at most limit * 1.1 + 1 cells."""
    held = len(cells)
    if held < limit:
        cell = cells[key] = make()
        return cell
    model, endpoint, _, tags = key
    for coarser in (
        (model, endpoint, OTHER, tags),
        (model, endpoint, OTHER, OTHER_TAGS),
        (model, OTHER, OTHER, OTHER_TAGS),
    ):
        found = cells.get(coarser)
        if found is not None:
            return found
        if held < limit + limit // 10:
            cell = cells[coarser] = make()
            return cell
    everything = (OTHER, OTHER, OTHER, OTHER_TAGS)
    found = cells.get(everything)
    if found is None:
        found = cells[everything] = make()
    return found


def _keep_newest_cells(days: dict[str, Day]) -> None:
    """Only the CELL_DAYS newest days keep their cells (filters reach no further back); an
    older day keeps its breakdowns, added up from its cells before they go."""
    for key in sorted(days)[:-CELL_DAYS]:
        day = days[key]
        if day.cells:
            keep_breakdowns(day)


def _count_key(counts: dict[str, int], key: str) -> None:
    """Count one of `key` (`(other)` once KEY_LIMIT keys are held)."""
    count = counts.get(key)
    if count is None and len(counts) >= KEY_LIMIT:
        key = OTHER
        count = counts.get(key)
    counts[key] = 1 if count is None else count + 1


def add_calls(
    aggs: list[Agg],
    cost: float,
    failed: bool,
    prompt: int,
    completion: int,
    cached: int,
    latency: float | None,
) -> None:
    """Count one call into each of `aggs` (what view.add_call does, for several at once)."""
    # A Struct's field costs ~45 ns to add to (no specialised store): a count of zero cached
    # tokens (most calls) is not added.
    for agg in aggs:
        agg.requests += 1
        if failed:
            agg.failures += 1
        agg.prompt_tokens += prompt
        agg.completion_tokens += completion
        if cached:
            agg.cached_tokens += cached
        agg.cost_usd += cost
        if latency is not None:
            agg.latency_n += 1
            agg.latency_sum += latency


def make_local_keys(zone: ZoneInfo) -> Callable[[datetime, float], tuple[str, int, int, int]]:
    """(local day "YYYY-MM-DD", local hour start in epoch s, local year, month) of an instant."""
    # Local day and hour by 15-minute UTC slot. astimezone + isoformat + hour_key were about
    # a sixth of the fold (docs/profiles/usage-catchup-*.txt). A slot over which the zone's
    # offset is constant and a multiple of 15 minutes (every zone today) lies within one
    # local hour and day, with one fold value, so its keys are the same for every instant in
    # it; any other slot (a transition, an old LMT offset) is computed every time.
    slots: dict[int, tuple[str, int, int, int]] = {}

    def local_keys(occurred_at: datetime, at: float) -> tuple[str, int, int, int]:
        slot = int(at // _SLOT_S)
        keys = slots.get(slot)
        if keys is not None:
            return keys
        local = occurred_at.astimezone(zone)
        keys = (local.date().isoformat(), hour_key(local), local.year, local.month)
        try:
            start = datetime.fromtimestamp(slot * _SLOT_S, UTC)
            first = start.astimezone(zone).utcoffset()
            last = (start + _SLOT_END).astimezone(zone).utcoffset()
        except (OverflowError, ValueError, OSError):  # the ends of datetime's range
            return keys
        if first == last and first is not None and first % _SLOT == timedelta(0):
            if len(slots) >= _SLOT_LIMIT:
                slots.clear()
            slots[slot] = keys
        return keys

    return local_keys


PricesAt = Callable[[UsageView, float], PriceTable]


def make_prices_at(first_prices: PriceTable) -> PricesAt:
    """`prices_at(view, at)`: the table in effect at `at` (epoch seconds), the latest of the
    view's tables that took effect at or before it (`first_prices` for a call older than
    every table). What the fold prices calls with; the spend log prices them with it too."""
    # Lookup tables of the view's price epochs, by event id (rebuilt after a restore).
    tables: dict[str, PriceTable] = {}

    def prices_at(view: UsageView, at: float) -> PriceTable:
        epochs = view.prices
        if not epochs:
            return first_prices
        epoch = epochs[-1]
        if at < epoch.since:
            # Older than the first table too (history imported from before the service first
            # ran; every call of the benchmarks): the first, as the search finds, without it.
            first = epochs[0]
            if at < first.since:
                epoch = first
            else:
                epoch = epochs[bisect.bisect_right(epochs, at, key=_since) - 1]
        table = tables.get(epoch.id)
        if table is None:
            if len(tables) >= PRICE_TABLE_LIMIT:
                tables.clear()
            table = tables[epoch.id] = PriceTable(epoch.prices)
        return table

    return prices_at


def price_call(
    prices_at: PricesAt, view: UsageView, event: UsageRecorded, at: float
) -> float | None:
    """USD for a call that did not report its cost, from the table in effect at `at` (its
    occurred_at); None for a model without a price."""
    return prices_at(view, at).cost(
        event.model, event.prompt_tokens, event.completion_tokens, event.cached_tokens
    )


def make_apply(config: FoldConfig) -> UsageApply:
    """The fold for this configuration (zone, first prices, budgets, thresholds)."""
    zone = config.zone
    warn_pct = config.cost_alert_pct / 100.0
    local_keys = make_local_keys(zone)
    scoped = [(budget, covers(budget)) for budget in config.budgets]
    prices_at = make_prices_at(config.prices)

    def record(
        view: UsageView, event: UsageRecorded, seq: int, stored_at: float | None
    ) -> list[Fired]:
        """Fold one call; what it crossed (usually nothing)."""
        fired: list[Fired] = []
        # Without a stored time (a fold outside the runtime) no generation ends by time.
        remembered_at = view.ids.current.since if stored_at is None else stored_at
        if not dedupe.remember(view.ids, event.id, seq, remembered_at, config.dedupe_exact_limit):
            view.duplicates += 1
            return fired
        at = event.occurred_at.timestamp()
        view.recorded += 1
        model = event.model
        prompt = event.prompt_tokens
        completion = event.completion_tokens
        cached = event.cached_tokens
        latency = event.response_time_ms
        error_code = event.error_code
        status_code = event.status_code
        failed = status_code >= 400 or bool(error_code)  # UsageRecorded.failed, inlined
        cost = event.cost_usd
        if cost is None:
            # price_call's expression, with the fields already read.
            cost = prices_at(view, at).cost(model, prompt, completion, cached)
            if cost is None:
                cost = 0.0
                unpriced = view.unpriced
                if model not in unpriced:
                    if len(unpriced) < UNPRICED_LIMIT:
                        unpriced[model] = 0
                        fired.append(
                            Fired(
                                kind="usage.unpriced_model",
                                scope=model,
                                period="any",
                                value=1.0,
                                threshold=0.0,
                            )
                        )
                if model in unpriced:
                    unpriced[model] += 1
        # Every call counts into five aggregates (lifetime by model, the day, the day's and
        # the hour's cell, the month's model): gathered here and counted in one loop
        # (add_calls), which was a seventh of the fold as separate calls re-reading the
        # event's fields. A day's breakdowns and an hour's total are their cells added up.
        totals = view.totals
        status_key = str(status_code)
        # `d.get(key) or _count_into(...)`: a held key (nearly every call) without a call.
        by_model = totals.by_model
        aggs = [by_model.get(model) or _count_into(by_model, model, KEY_LIMIT)]
        if error_code:
            _count_key(totals.by_error_code, error_code)
        statuses = totals.by_status_code
        count = statuses.get(status_key)
        if count is None:
            _count_key(statuses, status_key)
        else:
            statuses[status_key] = count + 1
        if latency is not None:
            latency_at = sketch.index_of(latency)
            seconds = latency / 1000.0
            buckets = totals.latency_buckets
            if not buckets:
                buckets.extend([0] * (len(LATENCY_BUCKETS_S) + 1))
            buckets[bisect.bisect_left(LATENCY_BUCKETS_S, seconds)] += 1
            totals.latency_sum_s += seconds
        day_key, h_key, local_year, local_month = local_keys(event.occurred_at, at)
        spend = view.spend
        day_spend = spend.get(day_key)
        if day_spend is None:
            if len(spend) >= DAY_LIMIT:
                oldest = min(spend)
                if day_key < oldest:
                    view.too_old += 1
                    add_calls(aggs, cost, failed, prompt, completion, cached, latency)
                    return fired
                del spend[oldest]
            day_spend = spend[day_key] = Spend()
        day_cost_before = day_spend.cost_usd
        day_spend.requests += 1
        day_spend.cost_usd += cost

        days = view.days
        day = days.get(day_key)
        if day is None:
            if len(days) >= DAY_LIMIT:
                # Statistics restarted by a reset may hold fewer days than the spend, never
                # more: the oldest of them is older than this one.
                del days[min(days)]
            day = days[day_key] = Day(total=Agg(), latency=Sketch(bins={}))
            if len(days) > CELL_DAYS:
                _keep_newest_cells(days)
        aggs.append(day.total)
        endpoint = event.endpoint or NO_ENDPOINT
        if latency is not None:
            by_model_s = day.latency_by_model
            by_endpoint_s = day.latency_by_endpoint
            sketches = [
                day.latency,
                by_model_s.get(model) or _sketch_of(by_model_s, model),
                by_endpoint_s.get(endpoint) or _sketch_of(by_endpoint_s, endpoint),
            ]
        user_id = event.user_id
        tags = event.tags
        # Decoded events hold a tuple; one built in Python may hold a list.
        cell_key = (model, endpoint, user_id or "", tags if type(tags) is tuple else tuple(tags))
        cells = day.cells
        cell = cells.get(cell_key) or _cell_into(cells, cell_key, CELL_LIMIT, Cell)
        aggs.append(cell)
        if error_code:
            _count_key(cell.errors, error_code)
        statuses = cell.statuses
        count = statuses.get(status_key)
        if count is None:
            _count_key(statuses, status_key)
        else:
            statuses[status_key] = count + 1
        # The day's breakdowns (by endpoint, model, user, error and status code) are its
        # cells added up when asked (view.day_breakdowns): counting them here as well was as
        # much work per call as the cell (docs/profiles/usage-fold-3-cells.txt).

        hours = view.hours
        hour = hours.get(h_key)
        if hour is None:
            if len(hours) >= HOUR_LIMIT:
                oldest_hour = min(hours)
                if h_key < oldest_hour:
                    hour = None
                else:
                    del hours[oldest_hour]
                    hour = hours[h_key] = Hour(latency=Sketch(bins={}))
            else:
                hour = hours[h_key] = Hour(latency=Sketch(bins={}))
        if hour is not None:
            if latency is not None:
                sketches.append(hour.latency)
            hour_cells = hour.cells
            aggs.append(
                hour_cells.get(cell_key) or _cell_into(hour_cells, cell_key, HOUR_CELL_LIMIT, Agg)
            )

        month_key = day_key[:7]
        months = view.months
        month = months.get(month_key)
        if month is None:
            start, end = month_bounds(local_year, local_month, zone)
            month = months[month_key] = Month(start=start, end=end)
            if len(months) > MONTH_LIMIT:
                del months[min(months)]
        month_cost_before = month.cost_usd
        month.requests += 1
        month.failures += failed
        month.cost_usd += cost
        by_model = month.by_model
        aggs.append(by_model.get(model) or _count_into(by_model, model, KEY_LIMIT))
        add_calls(aggs, cost, failed, prompt, completion, cached, latency)
        if latency is not None:
            sketch.add_to_each(sketches, latency_at)
        if at > month.last_at:
            month.last_at = at

        if config.daily_budget_usd is not None:
            crossings(
                fired, "daily", day_key, day_cost_before, day_spend.cost_usd,
                config.daily_budget_usd, warn_pct,
            )  # fmt: skip
        if config.monthly_budget_usd is not None:
            budget = config.monthly_budget_usd
            crossings(
                fired, "monthly", month_key, month_cost_before, month.cost_usd, budget, warn_pct
            )
            elapsed = month.last_at - month.start
            if not month.forecast_fired and elapsed >= FORECAST_MIN_ELAPSED_S:
                forecast = month.cost_usd * (month.end - month.start) / elapsed
                if forecast > budget:
                    month.forecast_fired = True
                    fired.append(
                        Fired(
                            kind="usage.cost_forecast",
                            scope="monthly",
                            period=month_key,
                            value=round(forecast, 6),
                            threshold=budget,
                        )
                    )
        for scoped_budget, counts in scoped:
            if counts(event):
                scoped_spend(view, scoped_budget, day_key, month_key, cost, warn_pct, fired)
        error_window(view, event, int(at), failed, config, fired)
        if fired and stored_at is not None:
            fired = silence_closed_periods(view, fired, stored_at, day_key, month.end, at, zone)
        return fired

    def apply(
        view: UsageView, event: UsageEvent, seq: int, stored_at: float | None = None
    ) -> Sequence[Alert]:
        if isinstance(event, UsageRecorded):
            fired = record(view, event, seq, stored_at)
            if fired:
                return alerts_for(fired, event, config)
        elif isinstance(event, UsageReset):
            reset(view, event)
        elif isinstance(event, PricesChanged):
            prices_changed(view, event)
        return NOTHING_FIRED

    return apply


def _since(epoch: PriceEpoch) -> float:
    return epoch.since


def prices_changed(view: UsageView, event: PricesChanged) -> None:
    """A price table takes effect at its occurred_at; calls already folded keep their cost."""
    epochs = view.prices
    if any(epoch.id == event.id for epoch in epochs):
        return  # the same table stored twice (a retry beyond the duplicate window)
    since = event.occurred_at.timestamp()
    # Kept in order of `since` (ties: in stream order), so a replay finds the same tables.
    epochs.insert(
        bisect.bisect_right(epochs, since, key=_since),
        PriceEpoch(id=event.id, since=since, prices=dict(event.prices)),
    )
    if len(epochs) > PRICE_TABLE_LIMIT:
        del epochs[0]


@dataclass
class UsageProjection(Projection[UsageView, UsageEvent]):
    """The usage Projection: its fold also reads the stream's stored time of each event,
    and prices calls older than every price table with the stream's first table."""

    config: FoldConfig | None = None
    # The fold's pricing for readers of the stream (the spend log), made on first use.
    _prices_at: PricesAt | None = field(default=None, init=False, repr=False)

    def use_first_prices(self, prices: Mapping[str, Price]) -> None:
        """Price calls folded before any `usage.prices_changed` with this table."""
        assert self.config is not None
        self.config = replace(self.config, prices=PriceTable(prices))
        self.apply = make_apply(self.config)
        self._prices_at = None

    def charged(self, event: UsageRecorded) -> float | None:
        """What the fold charges `event`: its reported cost, else its price (the fold's own
        pricing, with the view's tables); None for a model without a price."""
        if event.cost_usd is not None:
            return event.cost_usd
        prices_at = self._prices_at
        if prices_at is None:
            assert self.config is not None
            prices_at = self._prices_at = make_prices_at(self.config.prices)
        return price_call(prices_at, self.view, event, event.occurred_at.timestamp())

    def fold(
        self,
        seq: int,
        data: bytes,
        subject: str | bytes | None = None,
        stored_ns: int | None = None,
    ) -> Sequence[Alert]:
        """Decode, check and apply one stored message, with the time the stream stored it:
        the alerts it fired."""
        event = self.admit(data, subject, stored_ns)
        apply: UsageApply = self.apply  # type: ignore[assignment]
        view = self.view
        fired = apply(view, event, seq, None if stored_ns is None else stored_ns * 1e-9)
        view.last_seq = seq
        return fired


def reset(view: UsageView, event: UsageReset) -> None:
    """Statistics restart from zero; money (spend per day, months, unpriced models: what
    budgets, /usage/costs and their alerts count), de-duplication memory and alert episodes
    carry on, so a reset can neither hide spend nor re-arm an alert."""
    view.days = {}
    view.hours = {}
    view.window = {}
    view.window_calls = 0
    view.window_failures = 0
    if view.error_alert_active:
        # Statistics restart: the episode counts as cleared now, so it ends after QUIET_S.
        view.error_cleared_at = max(view.window_end, int(event.occurred_at.timestamp()))
        view.error_cleared_rate = 0.0
    view.error_alert_active = False
    view.resets += 1
    view.reset_at = event.occurred_at.timestamp()
