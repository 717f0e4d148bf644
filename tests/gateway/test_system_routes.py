"""The gateway shell: its own health, readiness and status, with services up, stopped or hung."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime

import nats
from litestar.testing import AsyncTestClient

from gateway.app import create_app
from gateway.settings import GatewaySettings
from shared.clock import ManualClock
from shared.settings import CommonSettings, load_settings
from shared.testing import free_port, running_service
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
