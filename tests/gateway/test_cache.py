"""The gateway's answer cache: served from memory, dropped on change notices and commands."""

from __future__ import annotations

import asyncio

import msgspec
import nats

from gateway.services import ServiceClient
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


async def test_cached_answers_until_the_service_announces_a_change(env: dict[str, str]) -> None:
    definition, projection = build()
    nc = await nats.connect(env["STOCKPILOT_NATS_URL"])
    js = nc.jetstream()
    # The toy service has no command; its built-in `digest` stands in for one here.
    client = ServiceClient(
        2.0,
        nc,
        cache_ttl_s=60,
        read_endpoints={"usage": frozenset({"count"})},
        commands={"usage": frozenset({"digest"})},
    )
    await client.watch_changes()
    async with running_service(definition, load_settings(CommonSettings, env)):
        first = await client.query("usage", "count", CountAnswer)
        assert first.count == 0
        answers = await asyncio.gather(
            *(client.query("usage", "count", CountAnswer) for _ in range(50))
        )
        assert {a.count for a in answers} == {0}
        assert await requests_served(nc) == 1  # 51 answers, one request

        await publish_event(
            js,
            "stockpilot.usage.recorded",
            Counted(id="a", occurred_at=T0, model="m", status_code=200),
        )
        for _ in range(100):
            if (await client.query("usage", "count", CountAnswer)).count == 1:
                break
            await asyncio.sleep(0.01)
        assert (await client.query("usage", "count", CountAnswer)).count == 1
        assert projection.view.count == 1
        served = await requests_served(nc)
        assert served >= 2

        # A read that is not cached changes nothing...
        await client.query_raw("usage", "status")
        await client.query("usage", "count", CountAnswer)
        assert await requests_served(nc) == served
        # ...a command to the service drops its cached answers at once.
        await client.query_raw("usage", "digest")
        await client.query("usage", "count", CountAnswer)
        assert await requests_served(nc) == served + 1
    await nc.close()
