"""The gateway shell: its own health, readiness and status, with services up, stopped or hung."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timedelta
from typing import Any, Literal

import nats
from litestar.testing import AsyncTestClient
from nats.js import JetStreamContext

from gateway.app import create_app
from gateway.settings import GatewaySettings
from services.batch import service as batch_service
from services.batch.contract import BatchFinished, BatchStarted, LockAcquired
from services.batch.settings import BatchSettings
from services.health import service as health_service
from services.health.settings import HealthSettings
from services.usage import service as usage_service
from services.usage.contract import SUBJECT_RECORDED, UsageRecorded
from services.usage.settings import UsageSettings
from shared.clock import ManualClock
from shared.publish import publish_event
from shared.settings import CommonSettings, load_settings
from shared.streams import provision
from tests.harness import free_port, running_service
from tests.shared.toy import build


async def wait_connected(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    for _ in range(100):
        if client.app.state.services.connected:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("gateway never connected to NATS")


async def test_health_is_200_with_nats(env: dict[str, str], clock: ManualClock) -> None:
    app = create_app(load_settings(GatewaySettings, env), clock)
    async with AsyncTestClient(app) as client:
        await wait_connected(client)
        response = await client.get("/api/v1/health")
        assert response.status_code == 200
        body = response.json()
        assert body["status"] == "healthy"
        assert set(body) >= {"status", "version", "uptime_s", "timestamp"}
        # The gateway tells the time of the clock it was given.
        assert datetime.fromisoformat(body["timestamp"]) == clock.now()
        live = (await client.get("/api/v1/health/live")).json()
        assert datetime.fromisoformat(live["timestamp"]) == clock.now()


async def test_health_is_503_without_nats() -> None:
    settings = GatewaySettings(nats_url=f"nats://127.0.0.1:{free_port()}")
    async with AsyncTestClient(create_app(settings)) as client:
        response = await client.get("/api/v1/health")
        assert response.status_code == 503
        assert response.json()["status"] == "unhealthy"
        status = await client.get("/api/v1/status")
        assert status.status_code == 200
        assert status.json()["services"]["usage"]["status"] == "unavailable"
        live = await client.get("/api/v1/health/live")
        assert live.status_code == 200


async def test_status_shows_stopped_services_unavailable_within_timeout(
    env: dict[str, str],
) -> None:
    app = create_app(load_settings(GatewaySettings, env))
    definition, _ = build()  # a service named "usage" on the real runtime
    async with AsyncTestClient(app) as client:
        await wait_connected(client)
        async with running_service(definition, load_settings(CommonSettings, env)):
            body = (await client.get("/api/v1/status")).json()
            assert body["services"]["usage"]["status"] == "up", body["services"]["usage"]
            assert body["services"]["usage"]["rss_mb"] > 0
            assert body["services"]["health"]["status"] == "unavailable"
            ready = await client.get("/api/v1/health/ready")
            assert ready.status_code == 503
        started = time.monotonic()
        body = (await client.get("/api/v1/status")).json()
        assert time.monotonic() - started < 2.5
        assert body["services"]["usage"]["status"] == "unavailable"
        assert body["status"] == "unhealthy"


async def test_hung_service_turns_into_503_not_a_hang(env: dict[str, str]) -> None:
    settings = load_settings(GatewaySettings, env | {"STOCKPILOT_SERVICE_TIMEOUT_S": "0.5"})
    nc = await nats.connect(env["STOCKPILOT_NATS_URL"])

    async def never_answer(msg: object) -> None:
        await asyncio.sleep(30)

    # Something that takes the request and never replies: a wedged service.
    await nc.subscribe("stockpilot.svc.usage.>", cb=never_answer)
    await nc.flush()  # the server knows the subscription before the gateway asks
    async with AsyncTestClient(create_app(settings)) as client:
        await wait_connected(client)
        started = time.monotonic()
        body = (await client.get("/api/v1/status")).json()
        assert time.monotonic() - started < 2.0
        assert body["services"]["usage"]["status"] == "unavailable"
        assert "did not answer" in body["services"]["usage"]["detail"]
    await nc.close()


async def test_openapi_schema_is_served(env: dict[str, str]) -> None:
    async with AsyncTestClient(create_app(load_settings(GatewaySettings, env))) as client:
        response = await client.get("/schema/openapi.json")
        assert response.status_code == 200
        assert "/api/v1/status" in response.json()["paths"]


# ----- /api/v1/status areas and reasons, through the real services --------------------------


@contextlib.asynccontextmanager
async def stack(
    env: dict[str, str],
    clock: ManualClock,
    run: tuple[str, ...] = ("health", "usage", "batch"),
    **extra: str,
) -> AsyncIterator[tuple[AsyncTestClient[Any], JetStreamContext]]:
    """The real services named in `run` and the gateway, all on `clock`; a JetStream handle."""
    values = env | {f"STOCKPILOT_{k.upper()}": v for k, v in extra.items()}
    builders: dict[str, Any] = {
        "health": (health_service.build, HealthSettings),
        "usage": (usage_service.build, UsageSettings),
        "batch": (batch_service.build, BatchSettings),
    }
    nc = await nats.connect(env["STOCKPILOT_NATS_URL"])
    js = nc.jetstream()
    await provision(js)
    async with contextlib.AsyncExitStack() as services:
        for name in run:
            build_service, settings_type = builders[name]
            settings = load_settings(settings_type, values)
            await services.enter_async_context(
                running_service(build_service(settings), settings, clock=clock)
            )
        app = create_app(load_settings(GatewaySettings, values), clock)
        async with AsyncTestClient(app) as client:
            await wait_connected(client)
            yield client, js
    await nc.close()


async def status_when(
    client: AsyncTestClient[Any], check: Callable[[dict[str, Any]], bool], timeout: float = 10.0
) -> dict[str, Any]:
    """The /status body once `check` holds (services fold asynchronously); fail with the last."""
    deadline = time.monotonic() + timeout
    while True:
        body: dict[str, Any] = (await client.get("/api/v1/status")).json()
        if check(body):
            return body
        if time.monotonic() > deadline:
            raise AssertionError(f"status never matched: {body}")
        await asyncio.sleep(0.1)


def llm_call(i: int, at: datetime, **fields: Any) -> UsageRecorded:
    values: dict[str, Any] = {"model": "gpt-4o-mini", "status_code": 200} | fields
    return UsageRecorded(id=f"call-{i}", occurred_at=at, request_id=f"call-{i}", **values)


def codes(body: dict[str, Any]) -> list[str]:
    return [r["code"] for r in body["reasons"]]


async def test_status_is_unknown_when_nothing_is_configured(
    env: dict[str, str], clock: ManualClock
) -> None:
    async with stack(env, clock) as (client, _):
        body = await status_when(
            client, lambda b: all(s["status"] == "up" for s in b["services"].values())
        )
    assert body["status"] == "unknown"
    deps = body["areas"]["dependencies"]
    assert deps["status"] == "unknown" and "no dependency is configured" in deps["summary"]
    assert codes(body) == ["dependencies.none_configured"]
    assert set(body["areas"]) == {
        "dependencies", "llm_spend", "llm_errors", "batch", "locks", "services", "alert_hooks",
    }  # fmt: skip


async def test_status_is_healthy_only_with_a_healthy_dependency_and_nothing_wrong(
    env: dict[str, str], clock: ManualClock, redis_url: str
) -> None:
    async with stack(env, clock, redis_url=redis_url) as (client, _):
        body = await status_when(client, lambda b: b["components"].get("redis") == "healthy")
        stats = (await client.get("/api/v1/usage/stats")).json()
    assert stats["total_requests"] == 0
    assert stats["success_rate"] is None and stats["error_rate"] is None
    assert body["status"] == "healthy", body["reasons"]
    assert body["reasons"] == []
    assert "not configured: database, openai" in body["areas"]["dependencies"]["summary"]
    # No calls: no rate (null), never a reassuring 0 %.
    assert body["usage_today"]["error_rate"] is None


async def test_status_is_unhealthy_with_the_daily_budget_spent_three_times(
    env: dict[str, str], clock: ManualClock
) -> None:
    async with stack(env, clock, daily_budget_usd="10") as (client, js):
        at = clock.now() - timedelta(minutes=30)
        await publish_event(js, SUBJECT_RECORDED, llm_call(1, at, cost_usd=30.0))
        body = await status_when(client, lambda b: b["areas"]["llm_spend"]["status"] != "healthy")
    assert body["status"] == "unhealthy"
    assert body["areas"]["llm_spend"]["status"] == "unhealthy"
    reason = body["reasons"][0]
    assert reason["area"] == "llm_spend" and reason["severity"] == "critical"
    assert reason["message"] == "daily LLM budget 300 % used: $30.00 of $10.00"


async def test_status_is_degraded_with_half_the_calls_failing(
    env: dict[str, str], clock: ManualClock
) -> None:
    async with stack(env, clock) as (client, js):
        now = clock.now()
        for i in range(20):
            at = now - timedelta(seconds=100 - i)
            fields = {"status_code": 500, "error_code": "server_error"} if i % 2 else {}
            await publish_event(js, SUBJECT_RECORDED, llm_call(i, at, **fields))
        body = await status_when(client, lambda b: b["areas"]["llm_errors"]["status"] != "healthy")
    assert body["status"] == "degraded"
    assert "llm_errors.high" in codes(body)
    errors = body["areas"]["llm_errors"]
    assert errors["params"]["calls"] == 20 and errors["params"]["failed"] == 10
    assert "50.0 % of 20 LLM calls failed" in errors["summary"]


async def test_status_names_a_failed_job_until_it_succeeds_again(
    env: dict[str, str], clock: ManualClock
) -> None:
    async with stack(env, clock) as (client, js):
        t0 = clock.now() - timedelta(minutes=20)

        async def run(n: int, status: Literal["succeeded", "failed"], error: str | None) -> None:
            eid = f"sync-{n}"
            at = t0 + timedelta(minutes=5 * n)
            start = BatchStarted(
                id=f"{eid}.s", occurred_at=at, execution_id=eid, job_id="price_sync",
                host="w", pid=1,
            )  # fmt: skip
            end = BatchFinished(
                id=f"{eid}.f", occurred_at=at + timedelta(seconds=30), execution_id=eid,
                job_id="price_sync", status=status, items_processed=1, duration_s=30.0,
                throughput_per_s=0.1, peak_memory_mb=10.0, avg_cpu_percent=1.0, warnings=[],
                error=error,
            )  # fmt: skip
            for event in (start, end):
                await publish_event(js, "stockpilot.batch.run.price_sync", event)

        await run(0, "failed", "quotes API timed out")
        body = await status_when(client, lambda b: b["areas"]["batch"]["status"] != "healthy")
        assert body["status"] == "degraded"
        reason = next(r for r in body["reasons"] if r["area"] == "batch")
        assert reason["code"] == "batch.job_failed"
        assert "price_sync" in reason["message"] and "quotes API timed out" in reason["message"]
        await run(1, "succeeded", None)
        body = await status_when(client, lambda b: b["areas"]["batch"]["status"] == "healthy")
    assert "batch" not in {r["area"] for r in body["reasons"]}


async def test_status_names_an_expired_lock_still_held(
    env: dict[str, str], clock: ManualClock
) -> None:
    async with stack(env, clock) as (client, js):
        acquired = clock.now() - timedelta(hours=4)
        lock = LockAcquired(
            id="lock-1", occurred_at=acquired, job_id="report", owner="worker-7",
            expires_at=acquired + timedelta(hours=1),
        )  # fmt: skip
        await publish_event(
            js,
            "stockpilot.batch.lock.report",
            lock,
            headers={"Nats-Expected-Last-Subject-Sequence": "0"},
        )
        body = await status_when(client, lambda b: b["areas"]["locks"]["status"] != "healthy")
    assert body["status"] == "degraded"
    reason = next(r for r in body["reasons"] if r["area"] == "locks")
    assert "report expired 3 h ago" in reason["message"] and "worker-7" in reason["message"]


async def test_status_with_a_stopped_service_says_unavailable_not_zero(
    env: dict[str, str], clock: ManualClock
) -> None:
    async with stack(env, clock, run=("health", "batch")) as (client, _):
        body = await status_when(client, lambda b: b["services"]["batch"]["status"] == "up")
    assert body["status"] == "degraded"
    assert body["services"]["usage"]["status"] == "unavailable"
    for area in ("llm_spend", "llm_errors"):
        assert body["areas"][area]["status"] == "unknown"
        assert body["areas"][area]["summary"].startswith("unavailable")
    assert body["usage_today"] is None and body["alerts_24h"] is None
    assert "services.unavailable" in codes(body)
