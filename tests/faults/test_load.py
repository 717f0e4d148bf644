"""Load: 256 concurrent connections on the read routes while ~5k events/s are ingested.

The whole stack runs as real OS processes (nats-server, `stockpilot service health|usage|
batch`, `stockpilot gateway`); wrk (bench/harness.py) loads four read routes with 64
connections each, at the same time. Asserted: no answer other than 2xx (so no 5xx), every
ingested event counted, and the memory (RSS) of the services and the gateway flat between the
end of a warm-up and the end of the run (growth under 20 % or 30 MB, whichever is larger;
nats-server's is printed only: it grows with the events it stores). The p99 of each route is
printed, never asserted.

60 s, as the issue asks (STOCKPILOT_LOAD_SECONDS changes it; the whole suite stays well
inside its 10-minute budget on 2 cores).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
from datetime import timedelta
from pathlib import Path

import httpx
import msgspec
import nats as nats_py
import psutil
import pytest
from nats.js.api import PubAck

from bench.harness import WrkResult, wrk
from tests.clocks import utc_day_start
from tests.faults.stack import gateway_process, service_env, service_process
from tests.harness import NatsServer

SECONDS = int(os.environ.get("STOCKPILOT_LOAD_SECONDS", "60"))
WARMUP_SECONDS = 5
RATE = 5_000  # events per second
ROUTES = [
    "/api/v1/status",
    "/api/v1/usage/stats",
    "/api/v1/health/comprehensive",
    "/api/v1/batch/executions/recent",
]
CONNECTIONS_PER_ROUTE = 256 // len(ROUTES)
GROWTH_PCT = 20.0
GROWTH_MB = 30.0

# 256 connections and 5k events/s take both cores: beside it, another test's probe timeouts
# fail (seen with two pytest workers); make test runs it alone after the others.
pytestmark = pytest.mark.alone


class Ingest:
    """Usage events at RATE per second (contract fields, Nats-Msg-Id), every ack awaited."""

    def __init__(self) -> None:
        self.acked = 0
        self.stop = asyncio.Event()
        # Every event is dated at the start of the (UTC) day the run began, a microsecond
        # apart: the count is asked of that day, which is no longer "today" when the run
        # crosses midnight.
        self.start = utc_day_start()

    async def run(self, url: str) -> None:
        nc = await nats_py.connect(url)
        js = nc.jetstream()
        start = self.start
        tick = 0.05
        per_tick = int(RATE * tick)
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        try:
            while not self.stop.is_set():
                futures: list[asyncio.Future[PubAck]] = []
                for _ in range(per_tick):
                    i = self.acked + len(futures)
                    data = msgspec.json.encode(
                        {
                            "type": "usage.recorded",
                            "id": f"load-{i}",
                            "occurred_at": (start + timedelta(microseconds=i)).isoformat(),
                            "model": "gpt-4o-mini",
                            "status_code": 200 if i % 13 else 500,
                            "prompt_tokens": 120,
                            "completion_tokens": 30,
                            "response_time_ms": float(i % 900),
                            "endpoint": f"/api/v1/e{i % 8}",
                            "user_id": f"u-{i % 50}",
                        }
                    )
                    futures.append(
                        await js.publish_async(
                            "stockpilot.usage.recorded", data, headers={"Nats-Msg-Id": f"load-{i}"}
                        )
                    )
                await asyncio.gather(*futures)
                self.acked += len(futures)
                next_at += tick
                await asyncio.sleep(max(0.0, next_at - loop.time()))
        finally:
            await nc.close()


def rss_mb(processes: dict[str, psutil.Process]) -> dict[str, float]:
    return {name: p.memory_info().rss / 2**20 for name, p in processes.items()}


async def load(base: str, seconds: int) -> dict[str, WrkResult]:
    """Every route loaded at once, CONNECTIONS_PER_ROUTE connections each."""
    results = await asyncio.gather(
        *(
            asyncio.to_thread(wrk, base + route, CONNECTIONS_PER_ROUTE, seconds, 1)
            for route in ROUTES
        )
    )
    return dict(zip(ROUTES, results, strict=True))


@pytest.mark.skipif(
    shutil.which("wrk") is None, reason="wrk is not installed (apt-get install wrk)"
)
@pytest.mark.timeout(SECONDS + WARMUP_SECONDS + 120)
async def test_read_routes_under_256_connections_while_ingesting_no_5xx_flat_memory(
    nats: NatsServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = service_env(nats.url, tmp_path / "data", STOCKPILOT_HEALTH_INTERVAL_S="2")
    with contextlib.ExitStack() as stack:
        children = {
            name: stack.enter_context(service_process(name, env, tmp_path))
            for name in ("health", "usage", "batch")
        }
        base = stack.enter_context(gateway_process(env, tmp_path))
        gateway_pid = next(
            child.pid
            for child in psutil.Process().children(recursive=True)
            if "gateway" in " ".join(child.cmdline())
        )
        assert nats.process is not None
        processes = {name: psutil.Process(child.pid) for name, child in children.items()}
        processes["gateway"] = psutil.Process(gateway_pid)
        processes["nats-server"] = psutil.Process(nats.process.pid)
        async with httpx.AsyncClient(base_url=base, timeout=5) as client:
            for _ in range(300):
                response = await client.get("/api/v1/health/ready")
                if response.status_code == 200:
                    break
                await asyncio.sleep(0.1)
            assert response.status_code == 200, response.text

            ingest = Ingest()
            ingesting = asyncio.create_task(ingest.run(nats.url))
            try:
                warm = await load(base, WARMUP_SECONDS)
                before = rss_mb(processes)
                acked_before = ingest.acked
                results = await load(base, SECONDS)
                after = rss_mb(processes)
                rate = (ingest.acked - acked_before) / SECONDS
            finally:
                ingest.stop.set()
                await ingesting
            total = None
            day = ingest.start.date().isoformat()  # the stack's STOCKPILOT_TZ is UTC
            for _ in range(300):
                response = await client.get("/api/v1/usage/stats", params={"date": day})
                total = response.json()["total_requests"]
                if total == ingest.acked:
                    break
                await asyncio.sleep(0.1)

    # Shown even when the test passes (pytest captures output otherwise).
    with capsys.disabled():
        print(f"\nload: {SECONDS} s, 256 connections, ingest {rate:,.0f} events/s")
        for route, result in results.items():
            print(
                f"  {route:<36} {result.rps:>8,.0f} req/s  p50 {result.p50_ms:8.2f} ms  "
                f"p99 {result.p99_ms:8.2f} ms  non-2xx {result.non_2xx}"
            )
        for name in processes:
            print(f"  RSS {name:<12} {before[name]:7.1f} MB -> {after[name]:7.1f} MB")
    for phase in (warm, results):
        for route, result in phase.items():
            assert result.non_2xx == 0, f"{route}: {result.non_2xx} answers were not 2xx"
    assert total == ingest.acked, "an ingested event was not counted"
    for name in processes:
        if name == "nats-server":
            # Not a per-request cost: its file store caches the blocks it writes and its
            # 24-hour duplicate window keeps every Nats-Msg-Id, so it grows with the
            # ~100k events ingested (about 50 MB here), whatever the HTTP load.
            continue
        allowed = max(before[name] * GROWTH_PCT / 100, GROWTH_MB)
        assert after[name] - before[name] < allowed, (
            f"{name} grew from {before[name]:.1f} MB to {after[name]:.1f} MB"
        )
