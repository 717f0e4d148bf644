"""Probes measure what they claim: round-trip time on an open connection, connect time apart."""

from __future__ import annotations

from services.health import probes
from services.health.settings import HealthSettings
from shared.settings import load_settings

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
