"""Kept responses: served as bytes, never after a change, never past the token check."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from types import SimpleNamespace
from typing import Any

import nats
from prometheus_client.parser import text_string_to_metric_families

from gateway.asgi import Message, Scope
from gateway.response_cache import CACHED, MAX_BYTES, ResponseCache
from gateway.services import ServiceClient
from gateway.settings import GatewaySettings
from services.usage.service import build
from shared.clock import ManualClock
from shared.publish import publish_event
from tests.harness import running_service
from tests.usage.helpers import INGEST, auth, gateway, gateway_settings, recorded, usage_settings


async def test_status_is_kept_until_a_change_notice(
    env: dict[str, str], clock: ManualClock
) -> None:
    settings = usage_settings(env)
    async with (
        running_service(build(settings), settings, clock=clock) as runtime,
        gateway(gateway_settings(env, cache_ttl_s="60"), clock) as client,
    ):
        first = await client.get("/api/v1/status")
        second = await client.get("/api/v1/status")
        assert first.status_code == second.status_code == 200
        # The handler stamps `timestamp` on every call: equal bytes mean it was not called.
        assert second.content == first.content
        assert first.json()["usage_today"]["requests"] == 0

        nc = await nats.connect(settings.nats_servers)
        # Dated by the test's clock: "today" is the clock's day, whatever the calendar says.
        await publish_event(
            nc.jetstream(), "stockpilot.usage.recorded", recorded(1, at=clock.now())
        )
        await nc.close()
        body: dict[str, Any] = {}
        for _ in range(200):
            body = (await client.get("/api/v1/status")).json()
            if body["usage_today"]["requests"] == 1:
                break
            await asyncio.sleep(0.02)
        assert body["usage_today"]["requests"] == 1, body
        assert runtime.status().ready

        metrics = (await client.get("/metrics")).text
        served = [
            sample.value
            for family in text_string_to_metric_families(metrics)
            for sample in family.samples
            if sample.name == "stockpilot_gateway_requests_total"
            and sample.labels["path"] == "/api/v1/status"
            and sample.labels["status_code"] == "200"
        ]
        assert sum(served) >= 3  # kept answers are counted like any other


async def test_a_write_through_the_gateway_is_read_back_at_once(
    env: dict[str, str], clock: ManualClock
) -> None:
    # One clock: the gateway stamps the record, the service's "today" is the same day.
    settings = usage_settings(env)
    async with (
        running_service(build(settings), settings, clock=clock),
        gateway(gateway_settings(env, cache_ttl_s="60"), clock) as client,
    ):
        before = await client.get("/api/v1/usage/stats")
        assert before.json()["total_requests"] == 0
        assert (await client.get("/api/v1/usage/stats")).content == before.content
        posted = await client.post(
            "/api/v1/usage/records",
            json=[{"model": "gpt-4o", "prompt_tokens": 10, "status_code": 200}],
            headers=auth(INGEST),
        )
        assert posted.status_code == 202, posted.text
        # No waiting: the ingest command itself drops every kept answer.
        assert (await client.get("/api/v1/usage/stats")).json()["total_requests"] == 1


async def test_a_kept_answer_still_needs_the_read_token(
    env: dict[str, str], clock: ManualClock
) -> None:
    settings = usage_settings(env)
    gateway_ = gateway_settings(env, cache_ttl_s="60", read_token="r-secret")
    async with (
        running_service(build(settings), settings, clock=clock),
        gateway(gateway_, clock) as client,
    ):
        right = await client.get("/api/v1/usage/costs", headers=auth("r-secret"))
        assert right.status_code == 200
        assert (await client.get("/api/v1/usage/costs")).status_code == 401
        assert (await client.get("/api/v1/usage/costs", headers=auth("nope"))).status_code == 403
        again = await client.get("/api/v1/usage/costs", headers=auth("r-secret"))
        assert again.status_code == 200 and again.content == right.content


async def test_a_kept_answer_expires_after_the_ttl(env: dict[str, str], clock: ManualClock) -> None:
    settings = usage_settings(env)
    async with (
        running_service(build(settings), settings, clock=clock),
        gateway(gateway_settings(env, cache_ttl_s="0.2"), clock) as client,
    ):
        first = (await client.get("/api/v1/status")).json()
        # The handler stamps the clock's time: a later stamp means it ran again.
        clock.advance(timedelta(seconds=1))
        await asyncio.sleep(0.3)
        later = (await client.get("/api/v1/status")).json()
        assert later["timestamp"] > first["timestamp"]


class Inner:
    """A stand-in for the framework behind the cache: counts calls, answers `status`."""

    def __init__(
        self, services: ServiceClient, status: int = 200, opt: Any = CACHED, padding: int = 0
    ) -> None:
        self.services = services
        self.padding = padding
        self.status = status
        self.opt = opt
        self.calls = 0
        self.bump_generation = False
        self.gate: asyncio.Event | None = None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        self.calls += 1
        scope["route_handler"] = SimpleNamespace(opt=self.opt)
        scope["path_template"] = "/thing"
        if self.gate is not None:
            await self.gate.wait()
        if self.bump_generation:
            self.services.changed("usage")
        body = f"answer {self.calls}".encode() + b" " * self.padding
        await send({"type": "http.response.start", "status": self.status, "headers": []})
        await send({"type": "http.response.body", "body": body})


async def get(app: ResponseCache, path: str = "/thing") -> bytes:
    scope: Scope = {
        "type": "http",
        "method": "GET",
        "path": path,
        "query_string": b"",
        "headers": [],
    }
    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    async def receive() -> Message:
        return {"type": "http.request", "body": b""}

    await app(scope, receive, send)
    return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def cache_over(inner: Inner, ttl_s: float = 60) -> ResponseCache:
    return ResponseCache(inner, inner.services, GatewaySettings(cache_ttl_s=ttl_s))


async def test_only_opted_in_200_answers_are_kept() -> None:
    services = ServiceClient(1.0)
    kept = Inner(services)
    app = cache_over(kept)
    assert [await get(app), await get(app)] == [b"answer 1", b"answer 1"]
    assert await get(app, "/other") == b"answer 2"  # another path, its own answer

    not_opted = Inner(services, opt={})
    app = cache_over(not_opted)
    assert [await get(app), await get(app)] == [b"answer 1", b"answer 2"]

    failing = Inner(services, status=503)
    app = cache_over(failing)
    assert [await get(app), await get(app)] == [b"answer 1", b"answer 2"]


async def test_an_answer_built_across_a_change_is_not_kept() -> None:
    services = ServiceClient(1.0)
    inner = Inner(services)
    app = cache_over(inner)
    inner.bump_generation = True  # as `?fresh=true` does: the request itself is a command
    assert [await get(app), await get(app)] == [b"answer 1", b"answer 2"]
    inner.bump_generation = False
    assert [await get(app), await get(app)] == [b"answer 3", b"answer 3"]
    services.changed("batch")  # any service's change notice
    assert await get(app) == b"answer 4"


async def test_one_request_rebuilds_an_expired_answer_while_the_others_get_the_old_one() -> None:
    services = ServiceClient(1.0)
    inner = Inner(services)
    app = cache_over(inner, ttl_s=0.05)
    assert await get(app) == b"answer 1"
    await asyncio.sleep(0.1)
    inner.gate = asyncio.Event()
    rebuild = asyncio.create_task(get(app))
    await asyncio.sleep(0.01)
    assert inner.calls == 2  # the rebuild is waiting inside the framework...
    assert await get(app) == b"answer 1"  # ...and meanwhile the old copy is served
    inner.gate.set()
    assert await rebuild == b"answer 2"
    assert await get(app) == b"answer 2"
    assert inner.calls == 2


async def test_distinct_query_strings_cannot_grow_the_kept_bytes_without_bound() -> None:
    services = ServiceClient(1.0)
    inner = Inner(services, padding=1024 * 1024)
    app = cache_over(inner)
    for i in range(100):  # 100 distinct requests of 1 MiB each
        assert (await get(app, f"/thing/{i}")).startswith(f"answer {i + 1} ".encode())
    assert 0 < app.kept_bytes <= MAX_BYTES
    # The newest answers are the ones kept.
    assert await get(app, "/thing/99") == b"answer 100 " + b" " * (1024 * 1024 - 1)
    assert inner.calls == 100
