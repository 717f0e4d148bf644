"""Probes measure what they claim: round-trip time on an open connection, connect time apart."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import msgspec
import nats

from services.health import probes
from services.health.contract import HealthChecked
from services.health.service import build
from services.health.settings import HealthSettings
from shared.clock import ManualClock
from shared.settings import load_settings
from tests.harness import running_service

BASE = {"STOCKPILOT_CONFIG": "tests/empty.toml"}
ROUNDS = 20


def settings(**env: str) -> HealthSettings:
    return load_settings(HealthSettings, BASE | env)


async def test_twenty_redis_rounds_on_an_idle_redis_never_read_degraded(redis_url: str) -> None:
    """Each round opens a new connection, as the health service's rounds do; the connection's
    set-up is reported as connect_ms and never counts as PING latency (the issue's false
    `degraded` on the first round after start)."""
    config = settings(STOCKPILOT_REDIS_URL=redis_url)
    statuses = []
    async with probes.new_http_client() as http:
        for _ in range(ROUNDS):
            found = await probes.probe_all(config, http)
            (result,) = [r for r in found if r.component == "redis"]
            statuses.append(result.status)
            assert isinstance(result.details["connect_ms"], float)
            assert result.latency_ms is not None
    assert statuses == ["healthy"] * ROUNDS, [s for s in statuses if s != "healthy"]


async def test_redis_and_postgres_report_connect_time_apart_from_the_round_trip(
    redis_url: str, postgres_url: str
) -> None:
    config = settings(STOCKPILOT_REDIS_URL=redis_url, STOCKPILOT_DATABASE_URL=postgres_url)
    for probe in (probes.probe_redis, probes.probe_database):
        result = await probe(config)
        assert result.status == "healthy", result.error
        connect_ms = result.details["connect_ms"]
        assert isinstance(connect_ms, float) and connect_ms > 0
        assert result.latency_ms is not None and result.latency_ms > 0
        # Two measurements, not one copied into the other.
        assert result.latency_ms != connect_ms


async def test_twenty_fresh_health_service_starts_never_read_redis_degraded(
    env: dict[str, str], redis_url: str, clock: ManualClock
) -> None:
    """The issue's false alert came from the first round after a start. The health service is
    started twenty times (each its own event loop, HTTP client and Redis connection, as a new
    process has) and the Redis result of each start's first round is read from the stream,
    with the default 100 ms threshold."""
    settings = load_settings(
        HealthSettings,
        env | {"STOCKPILOT_REDIS_URL": redis_url, "STOCKPILOT_HEALTH_INTERVAL_S": "1"},
    )
    assert settings.redis_slow_ms == 100.0
    # A second of test time per start: each start finds its round's slot unclaimed and runs
    # its first round at once (a minute back, so no round is dated after the real now).
    clock.set(clock.now() - timedelta(minutes=1))
    nc = await nats.connect(env["STOCKPILOT_NATS_URL"])
    found: asyncio.Queue[HealthChecked] = asyncio.Queue()

    async def keep(msg: Any) -> None:
        found.put_nowait(msgspec.json.decode(msg.data, type=HealthChecked))

    await nc.subscribe("stockpilot.health.checked.redis", cb=keep)
    firsts: list[HealthChecked] = []
    try:
        for _ in range(ROUNDS):
            clock.advance(timedelta(seconds=1))
            async with running_service(build(settings), settings, clock=clock):
                firsts.append(await asyncio.wait_for(found.get(), timeout=15))
        await nc.flush()
    finally:
        await nc.close()
    assert found.empty(), "a start ran more than one round"
    assert len({r.round_id for r in firsts}) == ROUNDS
    statuses = [r.status for r in firsts]
    assert statuses == ["healthy"] * ROUNDS, [(r.latency_ms, r.error) for r in firsts]
    for result in firsts:
        assert result.latency_ms is not None
        assert isinstance(result.details["connect_ms"], float)
