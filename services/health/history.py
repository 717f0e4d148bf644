"""The history query (pure): each component's points and uptime over the last hours (issue 8).

Up to 24 h the raw samples are used, beyond that the hourly buckets; either way a series is
merged down to `history_max_points` points (the worst status of the merged results wins).
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

from services.health.contract import (
    HealthHistory,
    HistoryParams,
    HistoryPoint,
    HistorySeries,
    Status,
)
from services.health.projection import CODES, HOUR_S, STATUSES, ComponentState, HealthView
from services.health.queries import configured, window, worst
from services.health.settings import HealthSettings
from shared.errors import NotFoundError


def _merge(points: list[tuple[float, list[int], float, int]], limit: int) -> list[HistoryPoint]:
    """(t, counts per status, latency sum, latency n) merged down to at most `limit` points."""
    size = max(1, math.ceil(len(points) / limit))
    merged: list[HistoryPoint] = []
    for i in range(0, len(points), size):
        chunk = points[i : i + size]
        counts = [sum(p[1][c] for p in chunk) for c in range(len(STATUSES))]
        latency_n = sum(p[3] for p in chunk)
        seen: list[Status] = [STATUSES[c] for c in range(len(STATUSES)) if counts[c]]
        merged.append(
            HistoryPoint(
                t=datetime.fromtimestamp(chunk[0][0], UTC),
                status=worst(seen),
                latency_ms=round(sum(p[2] for p in chunk) / latency_n, 3) if latency_n else None,
            )
        )
    return merged


def _series(
    state: ComponentState, name: str, start: float, hours: int, limit: int
) -> HistorySeries:
    rows: list[tuple[float, list[int], float, int]] = []
    if hours <= 24:
        for s in window(state, start):
            counts = [0, 0, 0, 0]
            counts[s.status] = 1
            latency = s.latency_ms
            rows.append((s.t, counts, latency or 0.0, 0 if latency is None else 1))
    else:
        first_hour = math.floor(start / HOUR_S)
        for b in state.hours:
            if b.hour >= first_hour:
                rows.append((b.hour * HOUR_S, list(b.counts), b.latency_sum, b.latency_n))
    up = sum(r[1][CODES["healthy"]] + r[1][CODES["degraded"]] for r in rows)
    total = up + sum(r[1][CODES["unhealthy"]] for r in rows)
    return HistorySeries(
        component=name,
        kind=state.kind,
        uptime_pct=round(100.0 * up / total, 2) if total else None,
        checks=sum(sum(r[1]) for r in rows),
        points=_merge(rows, limit),
    )


def history(
    view: HealthView, settings: HealthSettings, params: HistoryParams, now: datetime
) -> HealthHistory:
    """Each component's points and uptime over the last `hours` (raw up to 24 h, then hourly)."""
    names = [name for name, _ in configured(settings)]
    names += sorted(n for n in view.components if n not in names)
    if params.component is not None:
        if params.component not in names:
            raise NotFoundError(f"no health component named {params.component!r}")
        names = [params.component]
    start = now - timedelta(hours=params.hours)
    series: list[HistorySeries] = []
    kinds = dict(configured(settings))
    for name in names:
        state = view.components.get(name)
        if state is None:
            series.append(
                HistorySeries(
                    component=name, kind=kinds[name], uptime_pct=None, checks=0, points=[]
                )
            )
            continue
        series.append(
            _series(state, name, start.timestamp(), params.hours, settings.history_max_points)
        )
    return HealthHistory(hours=params.hours, start=start, end=now, series=series)
