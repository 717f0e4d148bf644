"""The health service for real: NATS, PostgreSQL, Redis, loopback HTTP targets, the gateway."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any

import msgspec
import nats
from litestar import Litestar
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from gateway.routes.system import HealthSummary
from gateway.settings import GatewaySettings
from ops.replay import replay_definition
from services.health.contract import (
    ComprehensiveHealth,
    ExternalApisHealth,
    FreshParams,
    HealthChecked,
    HostSampled,
)
from services.health.service import build
from services.health.settings import HealthSettings
from shared.clock import SYSTEM_CLOCK, Clock, ManualClock
from shared.events import Alert, utc_now
from shared.runtime import Runtime
from shared.settings import load_settings
from tests.harness import running_service
from tests.health.targets import Reply, Target, models_body

ADMIN = "a-token"
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}


@asynccontextmanager
async def stack(
    env: dict[str, str],
    extra: dict[str, str],
    gateway: dict[str, str] | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> AsyncIterator[tuple[AsyncTestClient[Litestar], Runtime]]:
    """The health service (rounds only on demand after the first) and the gateway, on `clock`
    (the real one unless told: "fresh" and the schedule need a clock that moves by itself)."""
    settings = load_settings(
        HealthSettings,
        env | {"STOCKPILOT_HEALTH_INTERVAL_S": "3600", "STOCKPILOT_PROBE_TIMEOUT_S": "0.5"} | extra,
    )
    async with running_service(build(settings), settings, clock=clock) as runtime:
        # `?fresh=true` needs the admin token; no fresh window: these tests count rounds.
        fresh_env = {"STOCKPILOT_ADMIN_TOKEN": ADMIN, "STOCKPILOT_HEALTH_FRESH_INTERVAL_S": "0"}
        app = create_app(load_settings(GatewaySettings, env | fresh_env | (gateway or {})), clock)
        async with AsyncTestClient(app) as client:
            deadline = time.monotonic() + 10
            while not app.state.services.connected:
                assert time.monotonic() < deadline, "gateway never connected to NATS"
                await asyncio.sleep(0.02)
            yield client, runtime


def externals(*targets: tuple[str, Target]) -> str:
    return json.dumps([{"name": name, "url": t.url + "/ping"} for name, t in targets])


async def test_comprehensive_reports_real_dependencies(
    env: dict[str, str], postgres_url: str, redis_url: str
) -> None:
    async with (
        Target(Reply(body=models_body(3))) as openai,
        Target(Reply(status=204)) as quotes,
    ):
        extra = {
            "STOCKPILOT_DATABASE_URL": postgres_url,
            "STOCKPILOT_REDIS_URL": redis_url,
            "OPENAI_API_KEY": "sk-test-secret",
            "OPENAI_BASE_URL": openai.url + "/v1",
            "STOCKPILOT_EXTERNAL_APIS": json.dumps(
                [{"name": "quotes", "url": quotes.url + "/q", "expect_status": 204}]
            ),
            # Real dependencies on a busy 2-core machine: judge health, not latency, here
            # (the degraded thresholds have their own tests).
            "STOCKPILOT_REDIS_SLOW_MS": "2000",
            "STOCKPILOT_DATABASE_SLOW_MS": "5000",
        }
        async with stack(env, extra) as (client, _):
            response = await client.get("/api/v1/health/comprehensive?fresh=true", headers=AS_ADMIN)
            assert response.status_code == 200, response.text
            body = response.json()
            assert body["status"] == "healthy", [
                (c["name"], c["error"]) for c in body["components"]
            ]
            assert body["cached"] is False
            by_name = {c["name"]: c for c in body["components"]}
            assert list(by_name) == ["database", "redis", "openai", "external.quotes"]
            assert all(c["status"] == "healthy" for c in by_name.values())
            assert by_name["database"]["details"]["max_connections"] > 0
            assert by_name["database"]["details"]["server_version"]
            assert by_name["redis"]["details"]["version"]
            assert by_name["openai"]["details"]["models"] == 3
            assert openai.seen[-1].headers["authorization"] == "Bearer sk-test-secret"
            assert "sk-test-secret" not in response.text
            metrics = body["system_metrics"]
            assert set(metrics) >= {"cpu_percent", "memory_percent", "disk_percent", "uptime_s"}
            assert 0 <= metrics["memory_percent"] <= 100

            cached = (await client.get("/api/v1/health/comprehensive")).json()
            assert cached["cached"] is True
            assert cached["age_s"] >= 0

            for route, name in (("database", "database"), ("redis", "redis")):
                one = (await client.get(f"/api/v1/health/{route}")).json()
                assert one["name"] == name
                assert one["status"] == "healthy"
                assert one["latency_ms"] > 0
                assert one["checked_at"]
                assert one["error"] is None
            apis = (await client.get("/api/v1/health/external-apis")).json()
            assert apis["status"] == "healthy"
            assert [a["name"] for a in apis["apis"]] == ["external.quotes"]


async def test_unconfigured_components_are_unknown_and_ignored(env: dict[str, str]) -> None:
    async with (
        Target(Reply(status=200)) as up,
        stack(env, {"STOCKPILOT_EXTERNAL_APIS": externals(("up", up))}) as (client, _),
    ):
        body = (
            await client.get("/api/v1/health/comprehensive?fresh=true", headers=AS_ADMIN)
        ).json()
        assert body["status"] == "healthy"
        database = (await client.get("/api/v1/health/database")).json()
        assert database["status"] == "unknown"
        assert "STOCKPILOT_DATABASE_URL" in database["details"]["reason"]
        openai = (await client.get("/api/v1/health/openai")).json()
        assert openai["details"]["enable_with"] == "OPENAI_API_KEY"


async def test_summary_has_the_shape_the_status_route_expects(
    env: dict[str, str], postgres_url: str
) -> None:
    async with stack(env, {"STOCKPILOT_DATABASE_URL": postgres_url}) as (client, _):
        await client.get("/api/v1/health/comprehensive?fresh=true", headers=AS_ADMIN)
        nc = await nats.connect(env["STOCKPILOT_NATS_URL"])
        msg = await nc.request("stockpilot.svc.health.summary", b"{}", timeout=2)
        await nc.close()
        summary = msgspec.json.decode(msg.data, type=HealthSummary)
        assert summary.status == "healthy"
        assert summary.components == {
            "database": "healthy",
            "redis": "unknown",
            "openai": "unknown",
        }
        status = (await client.get("/api/v1/status")).json()
        assert status["components"]["database"] == "healthy"


async def test_a_hanging_target_is_unhealthy_at_its_timeout_and_delays_nothing_else(
    env: dict[str, str], postgres_url: str
) -> None:
    async with (
        Target(silent=True) as silent,
        Target(Reply(status=200)) as fine,
    ):
        extra = {
            "STOCKPILOT_DATABASE_URL": postgres_url,
            "STOCKPILOT_REDIS_URL": f"redis://127.0.0.1:{silent.port}/0",
            "STOCKPILOT_EXTERNAL_APIS": json.dumps(
                [
                    {"name": "fine", "url": fine.url + "/"},
                    {"name": "slowpoke", "url": silent.url + "/", "timeout_s": 0.3},
                ]
            ),
        }
        async with stack(env, extra) as (client, _):
            started = time.monotonic()
            body = (
                await client.get("/api/v1/health/comprehensive?fresh=true", headers=AS_ADMIN)
            ).json()
            elapsed = time.monotonic() - started
            # Not a hang on the silent targets (a bound far above scheduling delays).
            assert elapsed < 0.5 + 5.0, elapsed
            by_name = {c["name"]: c for c in body["components"]}
            assert by_name["redis"]["status"] == "unhealthy"
            assert "within 0.5 s" in by_name["redis"]["error"]
            assert 450 <= by_name["redis"]["latency_ms"] <= 5_500
            assert by_name["external.slowpoke"]["status"] == "unhealthy"
            assert "within 0.3 s" in by_name["external.slowpoke"]["error"]
            assert by_name["database"]["status"] == "healthy"
            assert by_name["external.fine"]["status"] == "healthy"
            assert body["external_apis"]["status"] == "degraded"  # 1 of 2 reachable
            assert body["status"] == "unhealthy"


async def test_concurrent_fresh_requests_share_one_round(env: dict[str, str]) -> None:
    """Five fresh requests at once (straight over NATS: the test client sends one at a time)."""
    async with (
        Target(Reply(status=200, delay_s=0.3)) as slow,
        stack(env, {"STOCKPILOT_EXTERNAL_APIS": externals(("slow", slow))}),
    ):
        nc = await nats.connect(env["STOCKPILOT_NATS_URL"])
        await asyncio.sleep(0.4)  # the start-up round is over
        before = len(slow.seen)
        asked = msgspec.json.encode(FreshParams(requested_at=utc_now()))
        fresh = [
            asyncio.ensure_future(
                nc.request("stockpilot.svc.health.external_apis_fresh", asked, timeout=5)
            )
            for _ in range(3)
        ] + [
            asyncio.ensure_future(
                nc.request("stockpilot.svc.health.comprehensive_fresh", asked, timeout=5)
            )
        ]
        cached = await nc.request("stockpilot.svc.health.external_apis", b"{}", timeout=5)
        # Answered while the round (its target answers after 0.3 s) is still in flight.
        waiting_when_cached = sum(not f.done() for f in fresh)
        answers = await asyncio.gather(*fresh)
        await nc.close()
        assert len(slow.seen) - before == 1
        bodies = [msgspec.json.decode(a.data, type=ExternalApisHealth) for a in answers[:3]]
        assert all(b.cached is False for b in bodies)
        assert len({b.apis[0].checked_at for b in bodies}) == 1
        whole = msgspec.json.decode(answers[3].data, type=ComprehensiveHealth)
        assert whole.components[-1].checked_at == bodies[0].apis[0].checked_at
        # A cached answer does not wait behind the round in flight.
        assert msgspec.json.decode(cached.data, type=ExternalApisHealth).cached is True
        assert waiting_when_cached == len(fresh)


async def test_rounds_publish_checked_and_host_events_on_their_subjects(
    env: dict[str, str],
) -> None:
    nc = await nats.connect(env["STOCKPILOT_NATS_URL"])
    received: list[tuple[str, bytes]] = []

    async def keep(msg: Any) -> None:
        received.append((msg.subject, msg.data))

    await nc.subscribe("stockpilot.health.>", cb=keep)
    async with (
        Target(Reply(status=200)) as quotes,
        stack(env, {"STOCKPILOT_EXTERNAL_APIS": externals(("quotes", quotes))}) as (client, _),
    ):
        await client.get("/api/v1/health/comprehensive?fresh=true", headers=AS_ADMIN)
        await asyncio.sleep(0.1)
    await nc.close()
    subjects = {subject for subject, _ in received}
    assert subjects == {
        "stockpilot.health.checked.database",
        "stockpilot.health.checked.redis",
        "stockpilot.health.checked.openai",
        "stockpilot.health.checked.external.quotes",
        "stockpilot.health.host",
    }
    checked = [
        msgspec.json.decode(data, type=HealthChecked)
        for subject, data in received
        if subject.endswith("external.quotes")
    ]
    raw = json.loads(next(d for s, d in received if s.endswith("external.quotes")))
    assert set(raw) >= {
        "type",
        "id",
        "occurred_at",
        "component",
        "kind",
        "status",
        "latency_ms",
        "details",
        "error",
    }
    assert raw["type"] == "health.checked"
    assert checked[0].kind == "external_api"
    host = msgspec.json.decode(
        next(d for s, d in received if s == "stockpilot.health.host"), type=HostSampled
    )
    assert host.memory_percent > 0


async def test_history_follows_a_target_going_down_and_up(
    env: dict[str, str], clock: ManualClock
) -> None:
    nc = await nats.connect(env["STOCKPILOT_NATS_URL"])
    alerts: list[Alert] = []

    async def keep(msg: Any) -> None:
        alerts.append(msgspec.json.decode(msg.data, type=Alert))

    await nc.subscribe("stockpilot.alerts.health.>", cb=keep)
    async with Target(Reply(status=200)) as flaky:
        flaky_env = {"STOCKPILOT_EXTERNAL_APIS": externals(("flaky", flaky))}
        started = clock.now()
        async with stack(env, flaky_env, clock=clock) as (client, runtime):
            # Round 1 is the start-up round (up): wait for its result, or the first fresh
            # request below would share that round and see the 503 meant for round 2.
            deadline = time.monotonic() + 10
            while "external.flaky" not in runtime.definition.projections[0].view.components:
                assert time.monotonic() < deadline, "the start-up round never finished"
                await asyncio.sleep(0.02)
            # Then 3 down, then 2 up: 6 results.
            # Each round 10 s after the last on the test's clock (rounds are dated from it,
            # and the last hour of history is the clock's).
            for status in (503, 503, 503, 200, 200):
                clock.advance(timedelta(seconds=10))
                flaky.reply = Reply(status=status)
                answer = await client.get(
                    "/api/v1/health/external-apis?fresh=true", headers=AS_ADMIN
                )
                assert answer.status_code == 200
            history = (
                await client.get("/api/v1/health/history?component=external.flaky&hours=1")
            ).json()
            await asyncio.sleep(0.2)
            # `stockpilot replay`: the stream folded from its first event gives the live view.
            settings = load_settings(HealthSettings, env | flaky_env)
            replayed = await replay_definition(nc, build(settings), "STOCKPILOT_HEALTH")
    await nc.close()
    [series] = history["series"]
    assert series["component"] == "external.flaky"
    assert [p["status"] for p in series["points"]] == [
        "healthy",
        "unhealthy",
        "unhealthy",
        "unhealthy",
        "healthy",
        "healthy",
    ]
    assert series["uptime_pct"] == 50.0
    # Each result is dated by the service's clock: the start-up round, then one every 10 s.
    assert [datetime.fromisoformat(p["t"]) for p in series["points"]] == [
        started + timedelta(seconds=10 * k) for k in range(6)
    ]
    assert all(p["latency_ms"] is not None for p in series["points"])
    assert [(a.title, a.severity) for a in alerts] == [
        ("external.flaky is unhealthy", "critical"),
        ("external.flaky is healthy", "info"),
    ]
    assert {r.projection for r in replayed} == {"health"}
    assert all(r.equal for r in replayed), replayed


async def test_history_hours_out_of_range_is_422_naming_the_parameter(
    env: dict[str, str],
) -> None:
    async with stack(env, {}) as (client, _):
        for hours in ("0", "2161", "x"):
            response = await client.get(f"/api/v1/health/history?hours={hours}")
            assert response.status_code == 422, response.text
            assert "hours" in response.json()["detail"]
        unknown = await client.get("/api/v1/health/history?component=nope")
        assert unknown.status_code == 404
        every = (await client.get("/api/v1/health/history")).json()
        assert [s["component"] for s in every["series"]] == ["database", "redis", "openai"]
        assert every["hours"] == 24


async def test_rounds_run_every_interval_and_replicas_share_the_schedule(
    env: dict[str, str],
) -> None:
    async with Target(Reply(status=200)) as api:
        settings = load_settings(
            HealthSettings,
            env
            | {
                "STOCKPILOT_HEALTH_INTERVAL_S": "0.4",
                "STOCKPILOT_EXTERNAL_APIS": externals(("api", api)),
            },
        )
        async with running_service(build(settings), settings):
            await asyncio.sleep(1.5)
            alone = len(api.seen)
            async with running_service(build(settings), settings):
                started = len(api.seen)
                await asyncio.sleep(1.6)
                together = len(api.seen) - started
    # Start-up round plus one every 0.4 s.
    assert 3 <= alone <= 5, alone
    # A second replica sees the first one's rounds and waits for the next one due.
    assert 3 <= together <= 5, together


ROUTES = (
    "/api/v1/health/comprehensive",
    "/api/v1/health/database",
    "/api/v1/health/openai",
    "/api/v1/health/redis",
    "/api/v1/health/external-apis",
    "/api/v1/health/history",
)


async def test_routes_need_the_read_token_when_one_is_set_and_are_documented(
    env: dict[str, str],
) -> None:
    async with stack(env, {}, gateway={"STOCKPILOT_READ_TOKEN": "r-token"}) as (client, _):
        for route in ROUTES:
            assert (await client.get(route)).status_code == 401, route
            allowed = await client.get(route, headers={"Authorization": "Bearer r-token"})
            assert allowed.status_code == 200, (route, allowed.text)
        schema = (await client.get("/schema/openapi.json")).json()
    for route in ROUTES:
        assert "200" in schema["paths"][route]["get"]["responses"], route
    history = schema["paths"]["/api/v1/health/history"]["get"]["parameters"]
    assert {p["name"] for p in history} >= {"component", "hours"}


async def test_gateway_serves_an_answer_for_a_second_then_asks_again(env: dict[str, str]) -> None:
    async with stack(env, {}) as (client, _):
        first = (
            await client.get("/api/v1/health/comprehensive?fresh=true", headers=AS_ADMIN)
        ).json()
        again = (await client.get("/api/v1/health/comprehensive")).json()
        assert (again["cached"], again["checked_at"]) == (True, first["checked_at"])
        # A round the gateway did not ask for (a scheduled one, say).
        nc = await nats.connect(env["STOCKPILOT_NATS_URL"])
        asked = msgspec.json.encode(FreshParams(requested_at=utc_now()))
        await nc.request("stockpilot.svc.health.comprehensive_fresh", asked, timeout=5)
        await nc.close()
        await asyncio.sleep(1.1)
        later = (await client.get("/api/v1/health/comprehensive")).json()
        assert later["cached"] is True
        assert later["checked_at"] > first["checked_at"]
        assert later["age_s"] >= 0
