"""The runtime survives its broker going away: a NATS restart loses nothing."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import nats

from shared.publish import publish_event
from shared.settings import CommonSettings, load_settings
from tests.clocks import NOON
from tests.harness import NatsServer, running_service
from tests.shared.toy import Counted, build

# Any past instant does, nothing here depends on the day: three hours before the run's noon
# (tests.clocks.NOON), never a literal date.
T0 = NOON - timedelta(hours=3)


async def publish_range(url: str, start: int, stop: int) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    for i in range(start, stop):
        event = Counted(id=f"e{i}", occurred_at=T0, model="m", status_code=200)
        await publish_event(js, "stockpilot.usage.recorded", event)
    await nc.close()


async def test_service_reconnects_and_catches_up_after_nats_restart(
    nats: NatsServer, env: dict[str, str]
) -> None:
    settings = load_settings(CommonSettings, env)
    definition, projection = build()
    async with running_service(definition, settings):
        await publish_range(nats.url, 0, 500)
        nats.stop()
        await asyncio.sleep(1.0)
        nats.start()  # same port, same store: the stream survives
        await publish_range(nats.url, 500, 1000)
        for _ in range(300):
            if projection.view.count == 1000:
                break
            await asyncio.sleep(0.05)
        assert projection.view.count == 1000
        assert projection.view.ids == [f"e{i}" for i in range(1000)]
