"""The worker-side client against the real service and gateway: progress, outcomes, lost runs."""

from __future__ import annotations

import asyncio
import signal
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest
from litestar.testing import AsyncTestClient
from nats.aio.client import Client as NATS

from services.batch.client import acquire_lock, batch_job, check_lock, read_lock
from services.batch.contract import LockReleased, RecentExecutions
from services.batch.errors import LockHeldError, LockLostError
from services.batch.settings import BatchSettings
from shared.clock import ManualClock
from shared.runtime import Runtime
from tests.batch.conftest import ADMIN, alerts_of, eventually

ROOT = Path(__file__).resolve().parents[2]


async def recent(api: AsyncTestClient[Any], job_id: str) -> RecentExecutions:
    response = await api.get("/api/v1/batch/executions/recent", params={"job_id": job_id})
    assert response.status_code == 200
    return msgspec.json.decode(response.content, type=RecentExecutions)


async def test_running_job_shows_increasing_progress_while_it_runs(
    nc: NATS,
    service: Runtime,
    api: AsyncTestClient[Any],
    settings: BatchSettings,
    clock: ManualClock,
) -> None:
    seen: list[float] = []
    async with batch_job(
        nc,
        "price-sync",
        items_total=100,
        heartbeat_interval_s=0.1,
        settings=settings,
        clock=clock,
    ) as run:
        for _ in range(20):
            run.advance(5)
            await asyncio.sleep(0.08)
            execution = (await recent(api, "price-sync")).executions[0]
            assert execution.status == "running"
            assert execution.items_total == 100
            if execution.progress_pct is not None:
                seen.append(execution.progress_pct)
    assert seen == sorted(seen)
    assert len(set(seen)) >= 4
    assert any(0 < pct < 100 for pct in seen)

    async def finished() -> bool:
        return (await recent(api, "price-sync")).executions[0].status == "succeeded"

    await eventually(finished)
    execution = (await recent(api, "price-sync")).executions[0]
    assert execution.progress_pct == 100.0
    assert execution.items_processed == 100
    assert execution.fencing_token == run.fencing_token
    assert execution.started_at == clock.now()  # the worker dates its run by its clock
    assert execution.duration_s is not None and execution.duration_s > 1.0
    assert execution.throughput_per_s is not None and execution.throughput_per_s > 0
    assert execution.peak_memory_mb is not None and execution.peak_memory_mb > 1
    last, _ = await read_lock(nc.jetstream(), "price-sync")
    assert isinstance(last, LockReleased) and last.reason == "released"


async def test_second_run_of_a_held_job_is_skipped_naming_the_holder(
    nc: NATS, service: Runtime, api: AsyncTestClient[Any], clock: ManualClock
) -> None:
    async with batch_job(nc, "reports", owner="box-1:77", clock=clock) as run:
        with pytest.raises(LockHeldError) as caught:
            async with batch_job(nc, "reports", owner="box-2:88", clock=clock):
                raise AssertionError("must not run")
        assert caught.value.owner == "box-1:77"
        assert "box-1:77" in str(caught.value)
        assert caught.value.fencing_token == run.fencing_token

    # The skipped run is in the history (issue #18: before, it was recorded nowhere).
    async def both() -> bool:
        return (await recent(api, "reports")).total == 2

    await eventually(both)
    statuses = sorted(e.status for e in (await recent(api, "reports")).executions)
    assert statuses == ["skipped", "succeeded"]
    skipped = next(e for e in (await recent(api, "reports")).executions if e.status == "skipped")
    assert skipped.error is not None and "box-1:77" in skipped.error
    stats = (await api.get("/api/v1/batch/executions/stats")).json()
    assert (stats["skipped"], stats["succeeded"], stats["success_rate"]) == (1, 1, 100.0)
    assert stats["by_job"]["reports"]["skipped"] == 1  # and in the job's own stats


async def test_failed_run_records_error_and_traceback_alerts_once_and_releases(
    nc: NATS, service: Runtime, api: AsyncTestClient[Any], clock: ManualClock
) -> None:
    js = nc.jetstream()
    with pytest.raises(ValueError, match="bad row 17"):
        async with batch_job(nc, "etl", items_total=10, clock=clock) as run:
            run.advance(3)
            run.warn("slow upstream")
            raise ValueError("bad row 17")

    async def failed() -> bool:
        return (await recent(api, "etl")).executions[0].status == "failed"

    await eventually(failed)
    execution = (await recent(api, "etl")).executions[0]
    assert execution.error == "ValueError: bad row 17"
    assert execution.traceback is not None and "raise ValueError" in execution.traceback
    assert execution.warnings == ["slow upstream"]
    assert execution.items_processed == 3
    status = (await api.get("/api/v1/batch/jobs/etl/lock/status")).json()
    assert status["locked"] is False

    async def alerted() -> bool:
        return len(await alerts_of(js, "batch.job_failed")) == 1

    await eventually(alerted)
    alert = (await alerts_of(js, "batch.job_failed"))[0]
    assert alert.id == f"batch.job_failed:etl:{execution.execution_id}"
    stats = (await api.get("/api/v1/batch/executions/stats")).json()
    assert stats["failed"] == 1
    assert stats["failure_patterns"][0]["error"] == "ValueError: bad row <n>"


async def test_cancelled_run_is_recorded_as_cancelled_and_releases_its_lock(
    nc: NATS, service: Runtime, api: AsyncTestClient[Any], clock: ManualClock
) -> None:
    entered = asyncio.Event()

    async def job() -> None:
        async with batch_job(nc, "cancel-me", clock=clock):
            entered.set()
            await asyncio.sleep(60)

    task = asyncio.create_task(job())
    await entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    async def cancelled() -> bool:
        return (await recent(api, "cancel-me")).executions[0].status == "cancelled"

    await eventually(cancelled)
    last, _ = await read_lock(nc.jetstream(), "cancel-me")
    assert isinstance(last, LockReleased) and last.reason == "released"


async def test_run_learns_at_its_next_heartbeat_that_its_lock_was_force_released(
    nc: NATS, service: Runtime, api: AsyncTestClient[Any], clock: ManualClock
) -> None:
    with pytest.raises(LockLostError) as caught:
        async with batch_job(nc, "rebalance", heartbeat_interval_s=0.05, clock=clock) as run:
            run.advance(1)
            forced = await api.post("/api/v1/batch/jobs/rebalance/lock/release", headers=ADMIN)
            assert forced.json()["released"] is True

            async def noticed() -> bool:
                return run.lock_lost

            await eventually(noticed, timeout=2)
            assert "force-released by admin" in (run.lock_lost_reason or "")
            run.advance(1)
    assert caught.value.fencing_token == run.fencing_token

    async def failed() -> bool:
        return (await recent(api, "rebalance")).executions[0].status == "failed"

    await eventually(failed)
    execution = (await recent(api, "rebalance")).executions[0]
    assert execution.error is not None and "LockLostError" in execution.error
    # The run did not release a lock that was no longer its own.
    last, _ = await read_lock(nc.jetstream(), "rebalance")
    assert isinstance(last, LockReleased) and last.reason == "forced"


async def test_killed_worker_releases_its_lock_as_lost_and_the_job_runs_again_within_3_beats(
    nc: NATS, service: Runtime, api: AsyncTestClient[Any], clock: ManualClock
) -> None:
    """The lease (issue #18): a kill -9'd worker's lock (TTL an hour) is released with reason
    `lost` once three heartbeat intervals pass in silence, and the next run starts then."""
    js = nc.jetstream()
    url = nc.connected_url.geturl() if nc.connected_url else ""
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.batch.worker",
        url,
        "doomed",
        "3600",
        "0.1",
        clock.now().isoformat(),  # the worker's clock reads the test's instant
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    assert worker.stdout is not None
    try:
        line = (await asyncio.wait_for(worker.stdout.readline(), 10)).decode().split()
        assert line[0] == "started"
        execution_id, token = line[1], int(line[2])

        async def progressing() -> bool:
            executions = (await recent(api, "doomed")).executions
            return bool(executions) and executions[0].items_processed > 0

        await eventually(progressing)
        worker.send_signal(signal.SIGKILL)
        await worker.wait()
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()
    status = (await api.get("/api/v1/batch/jobs/doomed/lock/status")).json()
    assert (status["locked"], status["fencing_token"]) == (True, token)
    # Its heartbeats are dated from the test's instant: three intervals of 0.1 s and a bit.
    clock.advance(timedelta(seconds=0.31))

    async def released_as_lost() -> bool:
        last, _ = await read_lock(js, "doomed")
        return isinstance(last, LockReleased) and last.reason == "lost"

    await eventually(released_as_lost, timeout=5)
    last, _ = await read_lock(js, "doomed")
    assert isinstance(last, LockReleased)
    assert (last.by, last.fencing_token, last.owner) == ("batch", token, status["owner"])
    execution = (await recent(api, "doomed")).executions[0]
    assert (execution.execution_id, execution.status) == (execution_id, "lost")
    status = (await api.get("/api/v1/batch/jobs/doomed/lock/status")).json()
    assert status["locked"] is False

    # The clock has moved 0.31 s since the kill, not the hour of the lock's TTL.
    async with batch_job(nc, "doomed", clock=clock) as run:
        assert run.fencing_token > token

    async def alerted() -> bool:
        return len(await alerts_of(js, "batch.job_failed")) >= 1

    await eventually(alerted)
    await asyncio.sleep(0.3)  # a second alert for the same run would show by now
    alerts = await alerts_of(js, "batch.job_failed")
    assert [a.id for a in alerts] == [f"batch.job_failed:doomed:{execution_id}"]


async def test_an_expired_lock_alerts_without_anyone_calling_cleanup(
    nc: NATS, service: Runtime, api: AsyncTestClient[Any], clock: ManualClock
) -> None:
    js = nc.jetstream()
    held = await acquire_lock(js, "stale", owner="w1", execution_id="x1", ttl_s=2, clock=clock)
    assert (await alerts_of(js, "batch.lock_expired")) == []
    clock.set(held.expires_at)

    async def alerted() -> bool:
        return len(await alerts_of(js, "batch.lock_expired")) == 1

    await eventually(alerted)
    alert = (await alerts_of(js, "batch.lock_expired"))[0]
    assert alert.id == f"batch.lock_expired:stale:{held.fencing_token}"
    assert "w1" in alert.message
    listed = (await api.get("/api/v1/batch/locks/expired")).json()
    assert [lock["job_id"] for lock in listed["locks"]] == ["stale"]
    # A cleanup afterwards releases it and does not alert a second time.
    cleaned = await api.post("/api/v1/batch/locks/cleanup", headers=ADMIN)
    assert cleaned.json()["released"] == ["stale"]
    await asyncio.sleep(0.3)
    assert len(await alerts_of(js, "batch.lock_expired")) == 1


async def test_force_release_alerts_naming_who_and_the_run_learns_it(
    nc: NATS, service: Runtime, api: AsyncTestClient[Any], clock: ManualClock
) -> None:
    js = nc.jetstream()
    held = await acquire_lock(js, "forced", owner="w1", execution_id="x1", ttl_s=60, clock=clock)
    answer = await api.post(
        "/api/v1/batch/jobs/forced/lock/release",
        headers={**ADMIN, "X-Stockpilot-Actor": "anna"},
        json={"reason": "stuck since Monday"},
    )
    assert answer.json()["released"] is True

    async def alerted() -> bool:
        return len(await alerts_of(js, "batch.lock_forced")) == 1

    await eventually(alerted)
    alert = (await alerts_of(js, "batch.lock_forced"))[0]
    assert "admin:anna" in alert.title
    assert "stuck since Monday" in alert.message
    why = await check_lock(js, held, clock)
    assert why is not None and "force-released by admin:anna" in why


async def test_a_long_run_renews_its_lease_and_keeps_the_lock_past_its_first_ttl(
    nc: NATS, service: Runtime, api: AsyncTestClient[Any], clock: ManualClock
) -> None:
    async with batch_job(nc, "long", ttl_s=0.4, heartbeat_interval_s=0.05, clock=clock) as run:
        first_expiry = run.lock.expires_at
        # Small steps of the clock, each followed by a beat: the run never looks silent (it
        # would be declared lost after 3 intervals) and renews once less than half is left.
        for _ in range(10):
            clock.advance(timedelta(seconds=0.1))

            async def beat_and_renewed() -> bool:
                execution = (await recent(api, "long")).executions[0]
                beat = execution.last_heartbeat_at
                fresh = beat is not None and beat >= clock.now()
                return fresh and run.lock.expires_at - clock.now() >= timedelta(seconds=0.2)

            await eventually(beat_and_renewed)
            run.advance(1)
        assert clock.now() > first_expiry
        assert run.lock.expires_at > clock.now()
        status = (await api.get("/api/v1/batch/jobs/long/lock/status")).json()
        assert (status["locked"], status["fencing_token"]) == (True, run.fencing_token)
        assert datetime.fromisoformat(status["expires_at"]) == run.lock.expires_at
        assert not run.lock_lost
    last, _ = await read_lock(nc.jetstream(), "long")
    assert isinstance(last, LockReleased) and last.reason == "released"


async def test_a_paused_worker_learns_its_lease_was_released_as_lost_and_frees_nothing(
    nc: NATS, service: Runtime, api: AsyncTestClient[Any], clock: ManualClock
) -> None:
    """The lease's other side (issue #18): a worker stopped (SIGSTOP) for three heartbeat
    intervals has its run declared lost and its lock released; another run takes the job.
    Resumed, the old worker learns at its next heartbeat that its lease is gone, stops with
    LockLostError, and leaves the new holder's lock alone."""
    js = nc.jetstream()
    url = nc.connected_url.geturl() if nc.connected_url else ""
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.batch.worker",
        url,
        "paused",
        "3600",
        "0.1",
        clock.now().isoformat(),
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert worker.stdout is not None and worker.stderr is not None
    try:
        line = (await asyncio.wait_for(worker.stdout.readline(), 10)).decode().split()
        assert line[0] == "started"
        old_token = int(line[2])

        async def progressing() -> bool:
            executions = (await recent(api, "paused")).executions
            return bool(executions) and executions[0].items_processed > 0

        await eventually(progressing)
        worker.send_signal(signal.SIGSTOP)
        clock.advance(timedelta(seconds=0.31))

        async def released_as_lost() -> bool:
            last, _ = await read_lock(js, "paused")
            return isinstance(last, LockReleased) and last.reason == "lost"

        await eventually(released_as_lost, timeout=5)
        async with batch_job(nc, "paused", clock=clock) as run:
            assert run.fencing_token > old_token
            worker.send_signal(signal.SIGCONT)
            code = await asyncio.wait_for(worker.wait(), 15)
            stderr = (await worker.stderr.read()).decode()
            assert code != 0
            assert "LockLostError" in stderr
            assert f"fencing token {old_token}) was lost" in stderr
            status = (await api.get("/api/v1/batch/jobs/paused/lock/status")).json()
            assert (status["locked"], status["fencing_token"]) == (True, run.fencing_token)
            assert not run.lock_lost
    finally:
        if worker.returncode is None:
            worker.send_signal(signal.SIGCONT)
            worker.kill()
            await worker.wait()
    last, _ = await read_lock(js, "paused")
    assert isinstance(last, LockReleased)
    assert (last.reason, last.by) == ("released", run.lock.owner)  # the new run gave it back
