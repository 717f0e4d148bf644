"""The /api/v1/batch routes: shapes, parameter checks before NATS, the summary endpoint."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any
from urllib.parse import quote

import msgspec
import pytest
from litestar.testing import AsyncTestClient
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from gateway.routes.system import BatchSummary
from services.batch.client import acquire_lock, batch_job
from shared.clock import ManualClock
from shared.runtime import Runtime
from tests.batch.conftest import ADMIN

BAD_JOB_IDS = ["a.b", "*", ">", "a b", "x" * 65, "prix-é"]
EXECUTION_FIELDS = {
    "execution_id",
    "job_id",
    "status",
    "started_at",
    "finished_at",
    "duration_s",
    "items_processed",
    "items_total",
    "progress_pct",
    "throughput_per_s",
    "peak_memory_mb",
    "avg_cpu_percent",
    "warnings",
    "error",
}


@pytest.mark.parametrize("job_id", BAD_JOB_IDS)
async def test_bad_job_id_is_refused_with_422_before_reaching_nats(
    nc: NATS, service: Runtime, api: AsyncTestClient[Any], job_id: str
) -> None:
    seen: list[str] = []

    async def spy(msg: Msg) -> None:
        seen.append(msg.subject)

    sub_svc = await nc.subscribe("stockpilot.svc.batch.>", cb=spy)
    sub_events = await nc.subscribe("stockpilot.batch.>", cb=spy)
    path = quote(job_id, safe="")
    answers = [
        await api.get(f"/api/v1/batch/jobs/{path}/lock/status"),
        await api.post(f"/api/v1/batch/jobs/{path}/lock/release", headers=ADMIN),
        await api.get("/api/v1/batch/executions/recent", params={"job_id": job_id}),
        await api.get("/api/v1/batch/executions/stats", params={"job_id": job_id}),
    ]
    for answer in answers:
        assert answer.status_code == 422, answer.text
        detail = answer.json()["detail"]
        assert "job_id" in detail
        assert ("64" in detail) if len(job_id) > 64 else ("may only contain" in detail)
    await nc.flush()
    await asyncio.sleep(0.1)
    await sub_svc.unsubscribe()
    await sub_events.unsubscribe()
    assert seen == []


@pytest.mark.parametrize("limit", ["0", "1001", "x"])
async def test_limit_outside_1_to_1000_is_422(
    service: Runtime, api: AsyncTestClient[Any], limit: str
) -> None:
    answer = await api.get("/api/v1/batch/executions/recent", params={"limit": limit})
    assert answer.status_code == 422
    assert "limit" in answer.json()["detail"]


async def test_routes_answer_the_contract_shapes(
    nc: NATS, service: Runtime, api: AsyncTestClient[Any], clock: ManualClock
) -> None:
    async with batch_job(nc, "shape-job", items_total=4, clock=clock) as run:
        run.advance(4)
    recent = (await api.get("/api/v1/batch/executions/recent?limit=1")).json()
    assert set(recent) >= {"executions", "total"}
    assert recent["total"] == 1
    assert set(recent["executions"][0]) >= EXECUTION_FIELDS
    assert recent["executions"][0]["status"] == "succeeded"

    stats = (await api.get("/api/v1/batch/executions/stats?hours=1")).json()
    assert set(stats) >= {
        "total",
        "succeeded",
        "failed",
        "running",
        "success_rate",
        "avg_duration_s",
        "p95_duration_s",
        "by_job",
        "failure_patterns",
    }
    assert (stats["total"], stats["succeeded"], stats["success_rate"]) == (1, 1, 100.0)
    assert stats["by_job"]["shape-job"]["total"] == 1

    status = (await api.get("/api/v1/batch/jobs/nobody/lock/status")).json()
    assert status == {
        "job_id": "nobody",
        "locked": False,
        "owner": None,
        "acquired_at": None,
        "expires_at": None,
        "expired": False,
        "fencing_token": None,
        "execution_id": None,
        "ignored_acquires": 0,
    }
    assert (await api.get("/api/v1/batch/locks/expired")).json() == {"locks": [], "total": 0}


async def test_summary_endpoint_answers_exactly_the_gateway_batch_summary(
    nc: NATS, service: Runtime, api: AsyncTestClient[Any], clock: ManualClock
) -> None:
    await acquire_lock(nc.jetstream(), "gone", owner="w", execution_id="e", ttl_s=0.05, clock=clock)
    with pytest.raises(RuntimeError):
        async with batch_job(nc, "broken", clock=clock):
            raise RuntimeError("no data")
    clock.advance(timedelta(seconds=0.1))  # the lock's lifetime is over
    await asyncio.sleep(0.1)  # the service has folded both
    msg = await nc.request("stockpilot.svc.batch.summary", b"{}", timeout=2)
    raw = msgspec.json.decode(msg.data)
    assert set(raw) == set(BatchSummary.__struct_fields__)
    summary = msgspec.json.decode(msg.data, type=BatchSummary)
    assert (summary.running, summary.failed_24h, summary.expired_locks) == (0, 1, 1)
    overall = (await api.get("/api/v1/status")).json()
    # /status shows the batch service's summary as it answered it (with the failing job and
    # the expired lock by name, which its areas and reasons are made of).
    assert overall["batch"] == raw
    assert [job["job_id"] for job in raw["failing_jobs"]] == ["broken"]
    assert [lock["job_id"] for lock in raw["expired"]] == ["gone"]
