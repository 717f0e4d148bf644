"""History and stats per job, skipped runs and CPU % against the real service (issue #18)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import psutil
from litestar.testing import AsyncTestClient
from nats.aio.client import Client as NATS

from services.batch.client import batch_job
from services.batch.contract import BatchEvent, run_subject
from services.batch.settings import BatchSettings
from shared.clock import ManualClock
from shared.publish import encode_event
from shared.runtime import Runtime
from tests.batch.conftest import eventually
from tests.batch.factories import finished, started


async def publish_all(nc: NATS, events: list[BatchEvent]) -> None:
    js = nc.jetstream()
    futures = [
        await js.publish_async(
            run_subject(e.job_id), encode_event(e), headers={"Nats-Msg-Id": e.id}
        )
        for e in events
    ]
    await asyncio.gather(*futures)


async def test_a_thousand_runs_of_one_job_never_erase_another_jobs_failures(
    nc: NATS, service: Runtime, api: AsyncTestClient[Any], clock: ManualClock
) -> None:
    base = clock.now().replace(microsecond=0) - timedelta(hours=2)
    events: list[BatchEvent] = []
    for i in range(5):
        events.append(started(f"fail-{i}", job_id="fragile", t=i, base=base))
        events.append(
            finished(
                f"fail-{i}", job_id="fragile", t=i + 1, status="failed",
                error=f"KeyError: 'ticker-{i}'", base=base,
            )
        )  # fmt: skip
    for i in range(1010):
        t = 100 + i
        events.append(started(f"busy-{i}", job_id="busy", t=t, base=base))
        events.append(finished(f"busy-{i}", job_id="busy", t=t + 0.5, base=base))
    await publish_all(nc, events)

    async def folded() -> bool:
        stats = (await api.get("/api/v1/batch/executions/stats")).json()
        return bool(stats["by_job"].get("busy", {}).get("total") == 1000)

    await eventually(folded, timeout=20)
    stats = (await api.get("/api/v1/batch/executions/stats")).json()
    assert stats["by_job"]["fragile"]["failed"] == 5
    assert stats["failed"] == 5
    patterns = {p["error"]: p for p in stats["failure_patterns"]}
    assert patterns["KeyError: '<id>'"]["count"] == 5
    assert patterns["KeyError: '<id>'"]["job_ids"] == ["fragile"]
    recent = (await api.get("/api/v1/batch/executions/recent", params={"job_id": "fragile"})).json()
    assert recent["total"] == 5
    # The busy job kept its own newest 1000: the first ten are the ones it evicted.
    busy = (
        await api.get("/api/v1/batch/executions/recent", params={"job_id": "busy", "limit": 1000})
    ).json()
    assert busy["total"] == 1000
    assert busy["executions"][-1]["execution_id"] == "busy-10"


async def test_short_runs_report_cpu_within_the_cores(
    nc: NATS, service: Runtime, api: AsyncTestClient[Any], clock: ManualClock,
    settings: BatchSettings,
) -> None:  # fmt: skip
    """A 2 ms run reported 323 %: CPU % is now the run's CPU time over its wall time."""
    for _ in range(15):
        async with batch_job(nc, "tiny", items_total=1, settings=settings, clock=clock) as run:
            sum(range(20_000))  # a couple of milliseconds of work
            run.advance(1)

    async def all_in() -> bool:
        answer = await api.get(
            "/api/v1/batch/executions/recent", params={"job_id": "tiny", "limit": 50}
        )
        runs = answer.json()["executions"]
        return len(runs) == 15 and all(r["status"] == "succeeded" for r in runs)

    await eventually(all_in)
    answer = await api.get("/api/v1/batch/executions/recent", params={"job_id": "tiny"})
    ceiling = (psutil.cpu_count() or 1) * 100.0
    cpus = [run["avg_cpu_percent"] for run in answer.json()["executions"]]
    assert all(cpu is not None and 0.0 <= cpu <= ceiling for cpu in cpus), cpus
