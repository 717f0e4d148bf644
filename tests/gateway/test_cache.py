"""The gateway's one cache, at its edge, over a real service: kept until that service changes.

A small Litestar app with one kept route (`GET /count`, the toy service's answer passed
through) behind the gateway's `ResponseCache`, as `create_app` wires it; the toy service
counts the requests it serves ($SRV.STATS), so each test can tell a kept answer from a
new one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import msgspec
import nats
from litestar import Litestar, Response, get
from litestar.types import ASGIApp

from gateway.response_cache import CACHED, ResponseCache, kept_routes
from gateway.services import ServiceClient
from gateway.settings import GatewaySettings
from shared.change_notices import changed_subject
from shared.publish import publish_event
from shared.settings import CommonSettings, load_settings
from tests.clocks import NOON
from tests.harness import running_service
from tests.shared.toy import CountAnswer, Counted, build

T0 = NOON  # any instant at or before now: the toy counts events, it has no days


async def requests_served(nc: nats.NATS) -> int:
    msg = await nc.request("$SRV.STATS.stockpilot-usage", b"", timeout=2)
    stats = msgspec.json.decode(msg.data)
    return sum(e["num_requests"] for e in stats["endpoints"] if e["name"] == "count")


class Edge:
    """The toy service behind a kept route; `gate` holds the route's builds while set.

    Requests are ASGI calls in the test's own loop (the service client's NATS connection
    lives there; Litestar's test client would run the app in another).
    """

    def __init__(self, services: ServiceClient, app: Litestar) -> None:
        self.services = services
        self.app = app
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()

    async def count(self) -> int:
        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "http",
            "path": "/count",
            "raw_path": b"/count",
            "root_path": "",
            "query_string": b"",
            "headers": [(b"host", b"test")],
            "client": ("127.0.0.1", 1),
            "server": ("127.0.0.1", 80),
        }
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b""}

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        await self.app(scope, receive, send)
        assert sent[0]["status"] == 200, sent
        body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
        return msgspec.json.decode(body, type=CountAnswer).count


@asynccontextmanager
async def edge(nc: nats.NATS, ttl_s: float = 60) -> AsyncIterator[Edge]:
    # The toy service has no command; its built-in `digest` stands in for one here.
    services = ServiceClient(2.0, nc, commands={"usage": frozenset({"digest"})})
    await services.watch_changes()
    holder: list[Edge] = []

    @get("/count", opt=CACHED)
    async def count() -> Response[CountAnswer]:
        it = holder[0]
        it.entered.set()
        if it.gate is not None:
            await it.gate.wait()
        return await services.answer("usage", "count")

    app = Litestar([count], openapi_config=None, debug=True)
    settings = GatewaySettings(cache_ttl_s=ttl_s)
    cache = ResponseCache(app.asgi_handler, services, settings, kept_routes(app))
    app.asgi_handler = cast("ASGIApp", cache)
    holder.append(Edge(services, app))
    yield holder[0]


async def publish_one(nc: nats.NATS, id_: str) -> None:
    await publish_event(
        nc.jetstream(),
        "stockpilot.usage.recorded",
        Counted(id=id_, occurred_at=T0, model="m", status_code=200),
    )


async def test_cached_answers_until_the_service_announces_a_change(env: dict[str, str]) -> None:
    definition, projection = build()
    nc = await nats.connect(env["STOCKPILOT_NATS_URL"])
    async with (
        running_service(definition, load_settings(CommonSettings, env)),
        edge(nc) as it,
    ):
        # The very first requests, all at once: one build, one request to the service.
        answers = await asyncio.gather(*(it.count() for _ in range(20)))
        assert set(answers) == {0}
        assert await requests_served(nc) == 1
        answers = await asyncio.gather(*(it.count() for _ in range(50)))
        assert set(answers) == {0}
        assert await requests_served(nc) == 1  # 70 answers, one request

        await publish_one(nc, "a")
        for _ in range(100):
            if await it.count() == 1:
                break
            await asyncio.sleep(0.01)
        assert await it.count() == 1
        assert projection.view.count == 1
        served = await requests_served(nc)
        assert served >= 2

        # A read that is not kept changes nothing...
        await it.services.query_raw("usage", "status")
        await it.count()
        assert await requests_served(nc) == served
        # ...a command to the service drops its kept answers at once.
        await it.services.query_raw("usage", "digest")
        await it.count()
        assert await requests_served(nc) == served + 1
    await nc.close()


async def test_another_services_change_keeps_the_answer(env: dict[str, str]) -> None:
    """Invalidated per service: a health round (its notice) does not drop a usage answer."""
    definition, _ = build()
    nc = await nats.connect(env["STOCKPILOT_NATS_URL"])
    async with (
        running_service(definition, load_settings(CommonSettings, env)),
        edge(nc) as it,
    ):
        assert await it.count() == 0
        before = it.services.generation
        await nc.publish(changed_subject("health"), b"")
        await nc.publish(changed_subject("batch"), b"")
        for _ in range(200):
            if it.services.generation >= before + 2:
                break
            await asyncio.sleep(0.01)
        assert it.services.change_counts.get("health") == 1
        it.services.commanded("batch")  # a command to another service too
        assert await it.count() == 0
        assert await requests_served(nc) == 1
    await nc.close()


async def test_a_stale_answer_is_served_while_one_request_rebuilds_it(
    env: dict[str, str],
) -> None:
    definition, _ = build()
    nc = await nats.connect(env["STOCKPILOT_NATS_URL"])
    async with (
        running_service(definition, load_settings(CommonSettings, env)) as runtime,
        edge(nc) as it,
    ):
        assert await it.count() == 0
        await publish_one(nc, "a")
        for _ in range(200):
            if it.services.change_counts.get("usage", 0) and runtime.status().ready:
                break
            await asyncio.sleep(0.01)
        assert it.services.change_counts.get("usage", 0) >= 1

        it.gate = asyncio.Event()
        it.entered.clear()
        rebuild = asyncio.create_task(it.count())
        await it.entered.wait()  # the rebuild is held inside the route...
        assert await it.count() == 0  # ...and meanwhile the old copy is served
        assert not rebuild.done()
        it.gate.set()
        assert await rebuild == 1  # the request that rebuilt it sees the change
        assert await it.count() == 1
        assert await requests_served(nc) == 2
    await nc.close()


async def test_after_a_command_concurrent_reads_wait_for_one_new_answer(
    env: dict[str, str],
) -> None:
    """No stale copy after a command: they share the one rebuild instead."""
    definition, _ = build()
    nc = await nats.connect(env["STOCKPILOT_NATS_URL"])
    async with (
        running_service(definition, load_settings(CommonSettings, env)),
        edge(nc) as it,
    ):
        assert await it.count() == 0
        await publish_one(nc, "a")
        # Read-your-writes without waiting for the notice: the command drops the answer.
        await it.services.query_raw("usage", "digest")

        it.gate = asyncio.Event()
        it.entered.clear()
        first = asyncio.create_task(it.count())
        await it.entered.wait()
        others = [asyncio.create_task(it.count()) for _ in range(20)]
        await asyncio.sleep(0.05)
        assert not any(task.done() for task in others)  # none was sent the old copy
        it.gate.set()
        counts = await asyncio.gather(first, *others)
        assert len(counts) == 21
        # The one rebuild asked once, after the command, for all 21 (the event is folded by
        # then or not, but every one of them got the same answer).
        assert len(set(counts)) == 1
        assert await requests_served(nc) == 2
    await nc.close()


async def test_an_answer_built_across_a_notice_is_the_copy_served_during_the_next_rebuild(
    env: dict[str, str],
) -> None:
    """Under a stream of notices every build overlaps one: kept as stale, not thrown away."""
    definition, _ = build()
    nc = await nats.connect(env["STOCKPILOT_NATS_URL"])
    async with (
        running_service(definition, load_settings(CommonSettings, env)),
        edge(nc) as it,
    ):
        it.gate = asyncio.Event()
        first = asyncio.create_task(it.count())
        await it.entered.wait()  # the first build is held...
        await nc.publish(changed_subject("usage"), b"")  # ...while its service announces one
        for _ in range(200):
            if it.services.change_counts.get("usage", 0):
                break
            await asyncio.sleep(0.01)
        assert it.services.change_counts.get("usage", 0) == 1
        it.gate.set()
        assert await first == 0

        it.gate = asyncio.Event()
        it.entered.clear()
        second = asyncio.create_task(it.count())  # stale at once: this one rebuilds it
        await it.entered.wait()
        # Served the first build's copy at once, while the second build is still held.
        assert await asyncio.wait_for(it.count(), 5) == 0
        assert not second.done()
        it.gate.set()
        assert await second == 0
        assert await requests_served(nc) == 2
    await nc.close()
