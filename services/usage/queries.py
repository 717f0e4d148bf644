"""Pure queries over the usage views: parameters in, response structs out (now is an argument).

Why one module of over 300 lines: it holds every read of the usage view (stats, timeseries,
costs, budgets, alerts, counters), and they share small helpers (rounding, days and moments
in the configured zone, merging aggregates); splitting by endpoint would move those into a
module of their own that every piece imports, for little gain in reading.
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from services.usage import sketch
from services.usage.contract import (
    AlertList,
    AlertsParams,
    Breakdown,
    BudgetAnswer,
    BudgetParams,
    BudgetState,
    BudgetUse,
    CostForecast,
    Coverage,
    DailyCost,
    ModelCost,
    ModelTotals,
    Series,
    StatsParams,
    StatsPeriod,
    TimePoint,
    TimeseriesParams,
    UsageCosts,
    UsageCounters,
    UsageStats,
    UsageTimeseries,
    UserUsage,
)
from services.usage.history import AlertHistory
from services.usage.prices import base_model
from services.usage.settings import UsageSettings
from services.usage.sketch import Sketch
from services.usage.slices import (
    Slice,
    Tally,
    coverage,
    latency_sketch,
    slice_of,
    split,
    tally,
)
from services.usage.view import (
    CELL_DAYS,
    COST_EPSILON,
    LATENCY_BUCKETS_S,
    OTHER,
    Agg,
    Breakdowns,
    Day,
    Hour,
    UsageView,
    add_breakdowns,
    add_cells,
    day_breakdowns,
    day_start,
    hour_key,
    merge_agg,
    month_bounds,
)
from shared.errors import InvalidRequestError

MAX_RANGE_DAYS = 90
COST_DAYS = 30
RATE_WINDOW_S = 300


def _rounded(value: float, digits: int = 6) -> float:
    return round(value, digits)


def _pct(part: float, whole: float) -> float:
    return round(100.0 * part / whole, 4) if whole else 0.0


def parse_day(name: str, value: str) -> date:
    """A YYYY-MM-DD query parameter, or a 422 naming it."""
    try:
        if len(value) != 10:
            raise ValueError
        return date.fromisoformat(value)
    except ValueError:
        raise InvalidRequestError(
            f"query parameter '{name}': expected a date YYYY-MM-DD, got {value!r}"
        ) from None


def _parse_moment(name: str, value: str, zone: ZoneInfo) -> tuple[datetime, bool]:
    """A date (local midnight, True) or an RFC 3339 time (naive = local, False)."""
    if len(value) == 10:
        return day_start(parse_day(name, value), zone), True
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequestError(
            f"query parameter '{name}': expected a date YYYY-MM-DD or an RFC 3339 time, "
            f"got {value!r}"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone)
    return moment.astimezone(zone), False


def day_range(params: StatsParams, today: date) -> tuple[date, date]:
    """The inclusive days a stats request asks for (422 naming the bad parameter)."""
    if params.date is not None:
        if params.start is not None or params.end is not None:
            raise InvalidRequestError(
                "query parameter 'date': give either date or start/end, not both"
            )
        day = parse_day("date", params.date)
        return day, day
    if params.start is None and params.end is None:
        return today, today
    end = parse_day("end", params.end) if params.end is not None else today
    start = parse_day("start", params.start) if params.start is not None else end
    if start > end:
        raise InvalidRequestError(f"query parameter 'start': {start} is after end {end}")
    if (end - start).days + 1 > MAX_RANGE_DAYS:
        raise InvalidRequestError(
            f"query parameter 'end': the range {start}..{end} is longer than {MAX_RANGE_DAYS} days"
        )
    return start, end


def _days(start: date, end: date) -> list[date]:
    return [start + timedelta(days=i) for i in range((end - start).days + 1)]


def _avg(agg: Agg) -> float:
    return _rounded(agg.latency_sum / agg.latency_n, 3) if agg.latency_n else 0.0


def _q(value: Sketch, q: float) -> float:
    found = sketch.quantile(value, q)
    return _rounded(found, 3) if found is not None else 0.0


def breakdown(agg: Agg, latency: Sketch | None = None) -> Breakdown:
    """The answer shape of one counted set of calls (percentiles where its latencies are kept)."""
    return Breakdown(
        requests=agg.requests,
        successful_requests=agg.requests - agg.failures,
        failed_requests=agg.failures,
        prompt_tokens=agg.prompt_tokens,
        completion_tokens=agg.completion_tokens,
        cached_tokens=agg.cached_tokens,
        total_tokens=agg.prompt_tokens + agg.completion_tokens,
        cost_usd=_rounded(agg.cost_usd),
        avg_response_time_ms=_avg(agg),
        p50_response_time_ms=_q(latency, 0.50) if latency is not None else None,
        p95_response_time_ms=_q(latency, 0.95) if latency is not None else None,
        p99_response_time_ms=_q(latency, 0.99) if latency is not None else None,
    )


def _latencies(held_days: list[Day], part: str, wanted: Slice) -> dict[str, Sketch] | None:
    """Response times per model or endpoint over `held_days`, or None where the filters
    narrow the calls below what those latencies describe."""
    if not wanted.only(part):
        return None
    merged: dict[str, Sketch] = {}
    for held in held_days:
        per_key = held.latency_by_model if part == "model" else held.latency_by_endpoint
        for key, found in per_key.items():
            into = merged.get(key)
            if into is None:
                into = merged[key] = Sketch(bins={})
            sketch.merge_into(into, found)
    return merged


# ----- queries -----------------------------------------------------------------------------


def stats(
    view: UsageView, params: StatsParams, now: datetime, settings: UsageSettings
) -> UsageStats:
    """Statistics over one day or a range of days (≤ 90)."""
    zone = settings.zone
    today = now.astimezone(zone).date()
    start, end = day_range(params, today)
    wanted = slice_of(params)
    held_days = [
        held for day in _days(start, end) if (held := view.days.get(day.isoformat())) is not None
    ]
    found = Breakdowns()
    total = Agg()
    counted = Tally()
    if wanted.everything:
        for held in held_days:
            merge_agg(total, held.total)
            add_breakdowns(found, day_breakdowns(held))
    else:
        # The breakdowns, error and status codes of the matching cells.
        for held in held_days:
            add_cells(found, tally(held.cells, wanted, counted, total, held.total.requests))
    latency = latency_sketch(held_days, wanted)
    if start == end == today and wanted.everything:
        rpm = requests_last_minutes(view, now) / (RATE_WINDOW_S / 60)
    else:
        span_start = day_start(start, zone)
        span_end = min(day_start(end + timedelta(days=1), zone), now.astimezone(zone))
        # Timestamps, not a difference of the local datetimes: two datetimes of one zone
        # subtract as wall clocks, an hour off across a daylight-saving change.
        minutes = (span_end.timestamp() - span_start.timestamp()) / 60
        rpm = total.requests / minutes if minutes > 0 else 0.0
    model_latency = _latencies(held_days, "model", wanted)
    endpoint_latency = _latencies(held_days, "endpoint", wanted)
    users = sorted(found.by_user.items(), key=lambda item: (-item[1].requests, item[0]))
    return UsageStats(
        period=StatsPeriod(start=start, end=end, timezone=settings.tz),
        total_requests=total.requests,
        successful_requests=total.requests - total.failures,
        failed_requests=total.failures,
        # No calls: no rate (null, as batch answers), not a reassuring 0 %.
        success_rate=_pct(total.requests - total.failures, total.requests)
        if total.requests
        else None,
        error_rate=_pct(total.failures, total.requests) if total.requests else None,
        prompt_tokens=total.prompt_tokens,
        completion_tokens=total.completion_tokens,
        cached_tokens=total.cached_tokens,
        total_tokens=total.prompt_tokens + total.completion_tokens,
        total_cost_usd=_rounded(total.cost_usd),
        avg_response_time_ms=_avg(total),
        p50_response_time_ms=_q(latency, 0.50) if latency is not None else None,
        p95_response_time_ms=_q(latency, 0.95) if latency is not None else None,
        p99_response_time_ms=_q(latency, 0.99) if latency is not None else None,
        requests_per_minute=_rounded(rpm, 4),
        by_endpoint={
            k: breakdown(v, endpoint_latency.get(k) if endpoint_latency is not None else None)
            for k, v in found.by_endpoint.items()
        },
        by_model={
            k: breakdown(v, model_latency.get(k) if model_latency is not None else None)
            for k, v in found.by_model.items()
        },
        by_error_code=found.by_error_code,
        by_status_code=found.by_status_code,
        top_users=[
            UserUsage(
                user_id=user,
                requests=agg.requests,
                failed_requests=agg.failures,
                total_tokens=agg.prompt_tokens + agg.completion_tokens,
                cost_usd=_rounded(agg.cost_usd),
            )
            for user, agg in users[: settings.top_users]
        ],
        unpriced_models=sorted(view.unpriced),
        filters=wanted.filters(),
        coverage=Coverage()
        if wanted.everything
        else coverage(wanted, counted, percentiles_kept=latency is not None, days_kept=CELL_DAYS),
    )


def calls_last_minutes(view: UsageView, now: datetime) -> tuple[int, int]:
    """(calls, failed calls) whose occurred_at lies in the last five minutes before `now`."""
    end = int(now.timestamp())
    calls = failed = 0
    for second, slot in view.window.items():
        if end - RATE_WINDOW_S < second <= end:
            calls += slot[0]
            failed += slot[1]
    return calls, failed


def requests_last_minutes(view: UsageView, now: datetime) -> int:
    """Calls whose occurred_at lies in the last five minutes before `now`."""
    end = int(now.timestamp())
    return sum(
        slot[0] for second, slot in view.window.items() if end - RATE_WINDOW_S < second <= end
    )


def timeseries(
    view: UsageView, params: TimeseriesParams, now: datetime, settings: UsageSettings
) -> UsageTimeseries:
    """Every hour or day bucket of the range in STOCKPILOT_TZ, zeros included."""
    zone = settings.zone
    if params.bucket not in ("hour", "day"):
        raise InvalidRequestError(
            f"query parameter 'bucket': expected 'hour' or 'day', got {params.bucket!r}"
        )
    today = now.astimezone(zone).date()
    default_start = today if params.bucket == "hour" else today - timedelta(days=COST_DAYS - 1)
    if params.start is not None:
        start, _ = _parse_moment("start", params.start, zone)
    else:
        start = day_start(default_start, zone)
    if params.end is not None:
        end, whole_day = _parse_moment("end", params.end, zone)
        # A date as `end` includes that whole day; a time includes the bucket it falls in.
        end_exclusive = (
            day_start(end.date() + timedelta(days=1), zone)
            if whole_day
            else end + timedelta(microseconds=1)
        )
    else:
        end_exclusive = day_start(today + timedelta(days=1), zone)
    if end_exclusive <= start:
        raise InvalidRequestError("query parameter 'start': it is not before end")
    if end_exclusive - start > timedelta(days=MAX_RANGE_DAYS, hours=1):
        raise InvalidRequestError(
            f"query parameter 'end': the range is longer than {MAX_RANGE_DAYS} days"
        )
    moments: list[datetime] = []
    hours: list[Hour | None] = []
    days: list[Day | None] = []
    if params.bucket == "hour":
        key = int(start.replace(minute=0, second=0, microsecond=0).timestamp())
        stop = end_exclusive.timestamp()
        while key < stop:
            hours.append(view.hours.get(key))
            moments.append(datetime.fromtimestamp(key, zone))
            key = _next_hour(key, zone)
    else:
        day = start.date()
        last = (end_exclusive - timedelta(microseconds=1)).date()
        while day <= last:
            days.append(view.days.get(day.isoformat()))
            moments.append(day_start(day, zone))
            day += timedelta(days=1)
    answer = UsageTimeseries(
        bucket="hour" if params.bucket == "hour" else "day",
        timezone=settings.tz,
        start=moments[0] if moments else start,
        end=end_exclusive,
        points=[],
    )
    wanted = slice_of(params)
    if wanted.everything and params.group_by is None:
        answer.points = [
            _point(moment, held.total, held.latency)
            if held is not None
            else _point(moment, Agg(), None)
            for moment, held in zip(moments, hours or days, strict=True)
        ]
        return answer
    sliced = split(
        hours if params.bucket == "hour" else days, params.bucket == "day", wanted, params.group_by
    )
    answer.points = _points(moments, sliced.totals, sliced.latencies)
    answer.filters = wanted.filters()
    answer.group_by = params.group_by
    if params.group_by is not None:
        answer.series = [
            Series(key=key, points=_points(moments, aggs, latencies))
            for key, (aggs, latencies) in sliced.groups.items()
        ]
        answer.other_keys = sliced.other_keys
    kept = all(found is not None for found in sliced.latencies) and all(
        found is not None
        for key, (_, latencies) in sliced.groups.items()
        if key != OTHER
        for found in latencies
    )
    answer.coverage = coverage(wanted, sliced.counted, percentiles_kept=kept, days_kept=CELL_DAYS)
    return answer


def _points(
    moments: list[datetime], aggs: list[Agg], latencies: list[Sketch | None]
) -> list[TimePoint]:
    """Sliced points: a p95 of null where the view keeps no latencies for their calls."""
    return [
        _point(moment, agg, latency, kept=latency is not None)
        for moment, agg, latency in zip(moments, aggs, latencies, strict=True)
    ]


def _next_hour(key: int, zone: ZoneInfo) -> int:
    """The start (epoch s) of the local hour after the one starting at `key`, as the fold keys it.

    Not simply an hour later: where a zone's clocks move by half an hour (Lord Howe) the
    local hours after the change start at another minute of the UTC hour, and the repeated
    half hour of a fall-back belongs to the local hour before it.
    """
    at = key + 3600
    while (following := hour_key(datetime.fromtimestamp(at, zone))) <= key:
        at += 900
    return following


def _point(moment: datetime, agg: Agg, latency: Sketch | None, *, kept: bool = True) -> TimePoint:
    """One bucket; its p95 is 0 for an empty bucket, null where latencies are not `kept`."""
    return TimePoint(
        t=moment,
        requests=agg.requests,
        failed=agg.failures,
        tokens=agg.prompt_tokens + agg.completion_tokens,
        cost_usd=_rounded(agg.cost_usd),
        avg_response_time_ms=_avg(agg),
        p95_response_time_ms=_q(latency, 0.95) if latency is not None else 0.0 if kept else None,
    )


def _budget(agg_cost: float, requests: int, budget: float | None) -> BudgetUse:
    return BudgetUse(
        cost_usd=_rounded(agg_cost),
        budget_usd=budget,
        used_pct=_pct(agg_cost, budget) if budget else None,
        requests=requests,
    )


def costs(view: UsageView, now: datetime, settings: UsageSettings) -> UsageCosts:
    """Spend today and this month against the budgets, by model, per day, and the forecast.

    Money, not statistics: every call of the period counts, whatever resets came between.
    """
    zone = settings.zone
    local_now = now.astimezone(zone)
    today = local_now.date()
    month_key = today.isoformat()[:7]
    spent_today = view.spend.get(today.isoformat())
    month = view.months.get(month_key)
    month_cost = month.cost_usd if month is not None else 0.0
    by_model = month.by_model if month is not None else {}
    daily = []
    for day_date in _days(today - timedelta(days=COST_DAYS - 1), today):
        spent = view.spend.get(day_date.isoformat())
        daily.append(
            DailyCost(
                date=day_date,
                cost_usd=_rounded(spent.cost_usd) if spent else 0.0,
                requests=spent.requests if spent else 0,
            )
        )
    return UsageCosts(
        currency="USD",
        today=_budget(
            spent_today.cost_usd if spent_today else 0.0,
            spent_today.requests if spent_today else 0,
            settings.daily_budget_usd,
        ),
        month=_budget(month_cost, month.requests if month else 0, settings.monthly_budget_usd),
        by_model={
            name: ModelCost(
                cost_usd=_rounded(agg.cost_usd),
                requests=agg.requests,
                prompt_tokens=agg.prompt_tokens,
                completion_tokens=agg.completion_tokens,
                cached_tokens=agg.cached_tokens,
            )
            for name, agg in sorted(by_model.items(), key=lambda item: -item[1].cost_usd)
        },
        daily=daily,
        unpriced_models=sorted(view.unpriced),
        forecast=forecast(month_cost, local_now, settings),
    )


def budget(
    view: UsageView, params: BudgetParams, now: datetime, settings: UsageSettings
) -> BudgetAnswer:
    """The budgets covering a call about to be made, and whether an enforced one is used up."""
    local = now.astimezone(settings.zone).date()
    day_key, month_key = local.isoformat(), local.isoformat()[:7]
    states: list[BudgetState] = []
    # The daily/monthly budgets of the settings are the `all` scope; they only alert.
    for period, usd in (
        ("daily", settings.daily_budget_usd),
        ("monthly", settings.monthly_budget_usd),
    ):
        if usd is not None:
            if period == "daily":
                used = spent_on(view, local)
            else:
                month = view.months.get(month_key)
                used = month.cost_usd if month is not None else 0.0
            states.append(_state("all", period, usd, used, enforce=False))
    for scoped in settings.budgets:
        if not _covers(scoped.scope, params):
            continue
        periods = view.budget_spend.get(scoped.key, {})
        used = periods.get(day_key if scoped.period == "daily" else month_key, 0.0)
        states.append(_state(scoped.scope, scoped.period, scoped.usd, used, scoped.enforce))
    spent = [s for s in states if s.enforce and s.used_usd >= s.usd - COST_EPSILON]
    reason = None
    if spent:
        first = spent[0]
        reason = (
            f"the {first.period} budget {first.scope} is used up: "
            f"${first.used_usd:,.4f} of ${first.usd:,.2f}"
        )
    return BudgetAnswer(allowed=not spent, budgets=states, reason=reason)


def _covers(scope: str, params: BudgetParams) -> bool:
    kind, _, value = scope.partition(":")
    if kind == "user":
        return params.user_id == value
    if kind == "model":
        return params.model is not None and (
            params.model == value or base_model(params.model) == value
        )
    if kind == "endpoint":
        return params.endpoint == value
    if kind == "tag":
        return params.tag == value
    return True


def _state(scope: str, period: str, usd: float, used: float, enforce: bool) -> BudgetState:
    return BudgetState(
        scope=scope,
        period=period,
        usd=usd,
        used_usd=_rounded(used),
        used_pct=_pct(used, usd),
        enforce=enforce,
    )


def spent_on(view: UsageView, day: date) -> float:
    """Every call's cost on `day` (local), resets or not."""
    spent = view.spend.get(day.isoformat())
    return spent.cost_usd if spent is not None else 0.0


def forecast(month_cost: float, local_now: datetime, settings: UsageSettings) -> CostForecast:
    """The month's spend extrapolated linearly from its start to `now` to its end."""
    start, end = month_bounds(local_now.year, local_now.month, settings.zone)
    elapsed = max(local_now.timestamp() - start, 0.0)
    projected = month_cost * (end - start) / elapsed if elapsed > 0 else month_cost
    budget = settings.monthly_budget_usd
    return CostForecast(
        month_end_cost_usd=_rounded(projected),
        budget_usd=budget,
        over_budget=budget is not None and projected > budget,
        elapsed_pct=_pct(elapsed, end - start),
    )


def alerts(history: AlertHistory, params: AlertsParams) -> AlertList:
    """The newest `limit` alerts of every source."""
    if not 1 <= params.limit <= 1000:
        raise InvalidRequestError(
            f"query parameter 'limit': expected 1 to 1000, got {params.limit}"
        )
    held = list(history.alerts.values())
    newest = sorted(held[-1000:], key=lambda a: a.occurred_at, reverse=True)
    return AlertList(alerts=newest[: params.limit], total=min(len(held), 1000))


def alerts_since(history: AlertHistory, since: datetime) -> int:
    """How many alerts occurred at or after `since`."""
    return sum(1 for a in history.alerts.values() if a.occurred_at >= since)


def counters(view: UsageView) -> UsageCounters:
    """The lifetime totals (never reset) that /metrics exposes as counters and a histogram."""
    totals = view.totals
    cumulative: list[int] = []
    running = 0
    for count in totals.latency_buckets or [0] * (len(LATENCY_BUCKETS_S) + 1):
        running += count
        cumulative.append(running)
    return UsageCounters(
        by_model={
            model: ModelTotals(
                requests=agg.requests,
                failed_requests=agg.failures,
                prompt_tokens=agg.prompt_tokens,
                completion_tokens=agg.completion_tokens,
                cached_tokens=agg.cached_tokens,
                cost_usd=_rounded(agg.cost_usd, 9),
            )
            for model, agg in sorted(totals.by_model.items())
        },
        by_error_code=dict(sorted(totals.by_error_code.items())),
        by_status_code=dict(sorted(totals.by_status_code.items())),
        latency_bounds_s=list(LATENCY_BUCKETS_S),
        latency_buckets=cumulative[:-1],
        latency_count=running,
        latency_sum_s=_rounded(totals.latency_sum_s, 9),
        duplicates=view.duplicates,
    )
