"""The NATS server restarts during an ingest: the client buffers and retries, nothing is lost,
the real usage service and gateway processes reconnect by themselves."""

from __future__ import annotations

import asyncio
import time
from datetime import date, timedelta
from pathlib import Path

import httpx

from services.usage.client import UsageRecorder
from services.usage.contract import UsageRecorded
from shared.settings import CommonSettings, load_settings
from tests.clocks import utc_day_start
from tests.faults.stack import gateway_process, service_env, service_process
from tests.harness import NatsServer

EVENTS = 3_000
OUTAGE_S = 3.0


async def usage_total(client: httpx.AsyncClient, day: date) -> int | None:
    """`day`'s total requests as the gateway reports them (None while it cannot say)."""
    try:
        response = await client.get("/api/v1/usage/stats", params={"date": day.isoformat()})
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    total: int = response.json()["total_requests"]
    return total


async def test_nats_restart_mid_ingest_loses_nothing_and_everything_reconnects(
    nats: NatsServer, tmp_path: Path
) -> None:
    env = service_env(nats.url, tmp_path / "data", STOCKPILOT_CACHE_TTL_S="0")
    with (
        service_process("usage", env, tmp_path) as usage,
        gateway_process(env, tmp_path) as base,
    ):
        async with httpx.AsyncClient(base_url=base, timeout=5) as client:
            # The calls are dated at the start of the (UTC) day the test began, a microsecond
            # apart, and counted on that day: a run crossing midnight asks the same day.
            start = utc_day_start()
            for _ in range(300):
                if await usage_total(client, start.date()) == 0:
                    break
                await asyncio.sleep(0.1)
            recorder = await UsageRecorder.connect(load_settings(CommonSettings, env))
            outage_ends = 0.0
            buffered = 0
            try:
                for i in range(EVENTS):
                    recorder.record(
                        UsageRecorded(
                            id=f"call-{i}",
                            occurred_at=start + timedelta(microseconds=i),
                            model="gpt-4o-mini",
                            status_code=200,
                            prompt_tokens=10,
                            completion_tokens=5,
                        )
                    )
                    if i == EVENTS // 3:
                        await recorder.flush()
                        nats.stop()  # calls keep being recorded while NATS is away
                        outage_ends = time.monotonic() + OUTAGE_S
                    if i > EVENTS // 3 and nats.process is None:
                        buffered = max(buffered, recorder.pending)
                        if time.monotonic() >= outage_ends:
                            nats.start()  # same port, same store
                    if i % 100 == 0:
                        await asyncio.sleep(0.05)
                if nats.process is None:
                    await asyncio.sleep(max(0.0, outage_ends - time.monotonic()))
                    nats.start()
                await asyncio.wait_for(recorder.flush(), timeout=60)
                assert buffered > 0, "nothing waited in the buffer during the outage"
                assert recorder.dropped == 0
                assert recorder.pending == 0
                assert recorder.published + recorder.duplicates == EVENTS
            finally:
                await recorder.close()
            total = None
            for _ in range(600):
                total = await usage_total(client, start.date())
                if total == EVENTS:
                    break
                await asyncio.sleep(0.1)
            assert total == EVENTS
            assert usage.poll() is None, "the usage service exited instead of reconnecting"
