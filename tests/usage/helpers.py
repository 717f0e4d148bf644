"""Shared pieces of the usage tests: event builders, settings, the oracle, a gateway client."""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import msgspec
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from gateway.settings import GatewaySettings
from services.usage.contract import UsageRecorded
from services.usage.prices import PriceTable
from services.usage.settings import UsageSettings
from shared.clock import SYSTEM_CLOCK, Clock
from shared.settings import load_settings
from tests.clocks import NOON, recent_noon

ADMIN = "admin-secret"
INGEST = "ingest-secret"
# 09:00 UTC on the day of the test clock (tests.clocks.NOON), never a literal date.
T0 = NOON - timedelta(hours=3)


def usage_settings(env: dict[str, str], **extra: str) -> UsageSettings:
    """Usage settings from the test env plus STOCKPILOT_<KEY> overrides."""
    values = dict(env)
    values.update({f"STOCKPILOT_{k.upper()}": v for k, v in extra.items()})
    return load_settings(UsageSettings, values)


def gateway_settings(env: dict[str, str], **extra: str) -> GatewaySettings:
    """Gateway settings with admin and ingest tokens."""
    values = dict(env)
    values.update({"STOCKPILOT_ADMIN_TOKEN": ADMIN, "STOCKPILOT_INGEST_TOKEN": INGEST})
    values.update({f"STOCKPILOT_{k.upper()}": v for k, v in extra.items()})
    return load_settings(GatewaySettings, values)


@contextlib.asynccontextmanager
async def gateway(
    settings: GatewaySettings, clock: Clock = SYSTEM_CLOCK
) -> AsyncIterator[AsyncTestClient[Any]]:
    """The real gateway app through Litestar's test client, connected to NATS."""
    app = create_app(settings, clock)
    async with AsyncTestClient(app=app) as client:
        services = app.state.services
        for _ in range(200):
            if services.connected:
                break
            import asyncio

            await asyncio.sleep(0.02)
        yield client


def auth(token: str) -> dict[str, str]:
    """An Authorization header."""
    return {"Authorization": f"Bearer {token}"}


def recorded(i: int, at: datetime = T0, **fields: Any) -> UsageRecorded:
    """A usage event with sensible defaults."""
    values: dict[str, Any] = {
        "id": f"req-{i}",
        "occurred_at": at,
        "request_id": f"req-{i}",
        "model": "gpt-4o-mini",
        "endpoint": "/api/v1/analysis",
        "prompt_tokens": 800,
        "completion_tokens": 150,
        "cached_tokens": 0,
        "status_code": 200,
        "response_time_ms": 1000.0,
        "user_id": "u-1",
    }
    values.update(fields)
    return UsageRecorded(**values)


@dataclass
class Totals:
    """What the oracle counts for a set of calls."""

    requests: int = 0
    failures: int = 0
    prompt: int = 0
    completion: int = 0
    cost: float = 0.0
    latencies: list[float] = field(default_factory=list)

    def add(self, event: UsageRecorded, cost: float) -> None:
        self.requests += 1
        self.failures += event.status_code >= 400 or bool(event.error_code)
        self.prompt += event.prompt_tokens
        self.completion += event.completion_tokens
        self.cost += cost
        if event.response_time_ms is not None:
            self.latencies.append(event.response_time_ms)

    def quantile(self, q: float) -> float:
        if not self.latencies:
            return 0.0
        ordered = sorted(self.latencies)
        return ordered[math.floor(q * (len(ordered) - 1))]

    def avg(self) -> float:
        return sum(self.latencies) / len(self.latencies) if self.latencies else 0.0


class Oracle:
    """Usage figures computed the obvious way from a list of events."""

    def __init__(self, events: Iterable[UsageRecorded], zone: ZoneInfo, prices: PriceTable):
        self.zone = zone
        self.by_day: dict[date, Totals] = defaultdict(Totals)
        # Keyed by the hour's start in UTC: two local hours of a night the clocks go back
        # (01:00 EDT and 01:00 EST) are equal and hash alike as aware local datetimes.
        self.by_hour: dict[datetime, Totals] = defaultdict(Totals)
        self.by_day_model: dict[date, dict[str, Totals]] = defaultdict(lambda: defaultdict(Totals))
        self.by_day_endpoint: dict[date, dict[str, Totals]] = defaultdict(
            lambda: defaultdict(Totals)
        )
        self.by_day_status: dict[date, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.by_day_error: dict[date, dict[str, int]] = defaultdict(lambda: defaultdict(int))
        self.unpriced: set[str] = set()
        seen: set[str] = set()
        for event in events:
            if event.id in seen:
                continue
            seen.add(event.id)
            cost = event.cost_usd
            if cost is None:
                cost = prices.cost(
                    event.model, event.prompt_tokens, event.completion_tokens, event.cached_tokens
                )
                if cost is None:
                    self.unpriced.add(event.model)
                    cost = 0.0
            local = event.occurred_at.astimezone(zone)
            day = local.date()
            hour = local.replace(minute=0, second=0, microsecond=0).astimezone(UTC)
            self.by_day[day].add(event, cost)
            self.by_hour[hour].add(event, cost)
            self.by_day_model[day][event.model].add(event, cost)
            self.by_day_endpoint[day][event.endpoint or "(none)"].add(event, cost)
            self.by_day_status[day][str(event.status_code)] += 1
            if event.error_code:
                self.by_day_error[day][event.error_code] += 1

    def hour(self, start: datetime) -> Totals | None:
        """The calls of the local hour that starts at `start` (any zone), if any."""
        return self.by_hour.get(start.astimezone(UTC))

    def days(self, days: Sequence[date]) -> Totals:
        total = Totals()
        for day in days:
            held = self.by_day.get(day)
            if held is None:
                continue
            total.requests += held.requests
            total.failures += held.failures
            total.prompt += held.prompt
            total.completion += held.completion
            total.cost += held.cost
            total.latencies += held.latencies
        return total


def local_midnight(day: date, zone: ZoneInfo) -> datetime:
    """The instant (UTC) at which `day` starts in `zone`."""
    return datetime.combine(day, time(0), tzinfo=zone).astimezone(UTC)


def hours_in(day: date, zone: ZoneInfo) -> int:
    """How long `day` really is in `zone`, in hours: 24, or 23/25 on a daylight-saving change."""
    length = local_midnight(day + timedelta(days=1), zone) - local_midnight(day, zone)
    return round(length.total_seconds() / 3600)


def close(actual: float, expected: float, rel: float = 0.0101, abs_: float = 1e-3) -> bool:
    """Within the sketch's relative error (or a tiny absolute slack near zero)."""
    return abs(actual - expected) <= max(rel * abs(expected), abs_)


def decode(data: bytes, kind: type[Any]) -> Any:
    """Decode a JSON body into a struct."""
    return msgspec.json.decode(data, type=kind)


def mid_month_noon(zone: str, days_left: int, now: datetime | None = None) -> datetime:
    """The latest local noon at or before now (UTC) with at least `days_left` days of its
    month after it: a test that needs room before the month ends, on any day it runs."""
    tz = ZoneInfo(zone)
    noon = recent_noon(zone, now)
    while True:
        day = noon.astimezone(tz).date()
        next_first = (day.replace(day=1) + timedelta(days=31)).replace(day=1)
        if (next_first - day).days - 1 >= days_left:
            return noon
        noon = datetime.combine(day - timedelta(days=1), time(12), tzinfo=tz).astimezone(UTC)
