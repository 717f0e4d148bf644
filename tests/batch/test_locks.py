"""Job locks against a real nats-server: exactly one winner, expiry, cleanup, force release."""

from __future__ import annotations

import asyncio
import sys
from datetime import timedelta
from pathlib import Path

import msgspec
import nats
from litestar.testing import AsyncTestClient
from nats.aio.client import Client as NATS

from services.batch.contract import LockAcquired, LockEvent, LockReleased, lock_subject
from services.batch.locks import (
    BATCH_STREAM,
    acquire_lock,
    read_lock,
    read_lock_state,
    release_lock,
)
from services.batch.settings import BatchSettings
from shared.clock import ManualClock
from shared.publish import publish_event
from shared.runtime import Runtime
from shared.streams import provision
from tests.batch.conftest import ADMIN, alerts_of, eventually
from tests.batch.racer import RoundResult, race

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 20
PER_PROCESS = 25


async def test_exactly_one_of_50_racers_in_two_processes_wins_every_time(
    nc: NATS, settings: object
) -> None:
    js = nc.jetstream()
    url = nc.connected_url.geturl() if nc.connected_url else ""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.batch.racer",
        url,
        str(PER_PROCESS),
        cwd=ROOT,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    assert child.stdin is not None and child.stdout is not None
    try:
        assert (await asyncio.wait_for(child.stdout.readline(), 10)).strip() == b"ready"
        for round_no in range(ROUNDS):
            job_id = f"race-{round_no}"
            child.stdin.write(f"go {job_id}\n".encode())
            await child.stdin.drain()
            here = await race(js, job_id, PER_PROCESS, "parent")
            there = msgspec.json.decode(
                await asyncio.wait_for(child.stdout.readline(), 10), type=RoundResult
            )
            winners = here.winners + there.winners
            assert len(winners) == 1, f"round {round_no}: {winners}"
            owner, token = winners[0]
            # Every loser was told who holds the lock.
            assert here.told_holders + there.told_holders == [owner] * (2 * PER_PROCESS - 1)
            last, seq = await read_lock(js, job_id)
            assert isinstance(last, LockAcquired) and last.owner == owner and seq == token
            info = await js.stream_info(BATCH_STREAM, subjects_filter=lock_subject(job_id))
            assert info.state.subjects == {lock_subject(job_id): 1}
        child.stdin.write(b"stop\n")
        await child.stdin.drain()
        assert await asyncio.wait_for(child.wait(), 10) == 0
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()


async def test_lock_with_2s_lifetime_expires_and_cleanup_releases_it_with_one_alert(
    nc: NATS, service: Runtime, api: AsyncTestClient[object], clock: ManualClock
) -> None:
    js = nc.jetstream()
    lock = await acquire_lock(
        js, "nightly", owner="worker-a", execution_id="x1", ttl_s=2, clock=clock
    )
    status = (await api.get("/api/v1/batch/jobs/nightly/lock/status")).json()
    assert status["locked"] is True and status["expired"] is False
    assert status["owner"] == "worker-a"
    assert status["fencing_token"] == lock.fencing_token
    assert (await api.get("/api/v1/batch/locks/expired")).json() == {"locks": [], "total": 0}

    # The lifetime passes on the service's clock (the lock is dated from it too).
    clock.set(lock.expires_at)
    status = (await api.get("/api/v1/batch/jobs/nightly/lock/status")).json()
    assert status["locked"] is False and status["expired"] is True
    assert (await api.get("/api/v1/batch/locks")).json() == {"locks": [status], "total": 1}
    expired = (await api.get("/api/v1/batch/locks/expired")).json()
    assert expired["total"] == 1
    assert expired["locks"][0]["job_id"] == "nightly"
    assert expired["locks"][0]["fencing_token"] == lock.fencing_token

    refused = await api.post("/api/v1/batch/locks/cleanup")
    assert refused.status_code == 401
    wrong = await api.post("/api/v1/batch/locks/cleanup", headers={"Authorization": "Bearer no"})
    assert wrong.status_code == 403
    assert (await api.get("/api/v1/batch/locks/expired")).json()["total"] == 1

    cleaned = await api.post("/api/v1/batch/locks/cleanup", headers=ADMIN)
    assert cleaned.status_code == 200
    assert cleaned.json() == {"released": ["nightly"], "count": 1}
    assert (await api.get("/api/v1/batch/locks/expired")).json()["total"] == 0
    status = (await api.get("/api/v1/batch/jobs/nightly/lock/status")).json()
    assert status["locked"] is False and status["expired"] is False
    last, _ = await read_lock(js, "nightly")
    assert isinstance(last, LockReleased) and last.reason == "expired"

    again = await api.post("/api/v1/batch/locks/cleanup", headers=ADMIN)
    assert again.json() == {"released": [], "count": 0}

    async def one_alert() -> bool:
        return len(await alerts_of(js, "batch.lock_expired")) >= 1

    await eventually(one_alert)
    await asyncio.sleep(0.3)
    alerts = await alerts_of(js, "batch.lock_expired")
    assert [a.id for a in alerts] == [f"batch.lock_expired:nightly:{lock.fencing_token}"]
    assert alerts[0].source == "batch"


async def test_force_release_needs_the_admin_token_and_then_frees_the_lock(
    nc: NATS, service: Runtime, api: AsyncTestClient[object], clock: ManualClock
) -> None:
    js = nc.jetstream()
    lock = await acquire_lock(
        js, "report-gen", owner="worker-b", execution_id="x2", ttl_s=600, clock=clock
    )
    url = "/api/v1/batch/jobs/report-gen/lock/release"
    before = (await api.get("/api/v1/batch/jobs/report-gen/lock/status")).json()

    assert (await api.post(url)).status_code == 401
    assert (await api.post(url, headers={"Authorization": "Bearer wrong"})).status_code == 403
    assert (await api.get("/api/v1/batch/jobs/report-gen/lock/status")).json() == before
    _, seq = await read_lock(js, "report-gen")
    assert seq == lock.fencing_token

    done = await api.post(
        url, headers={**ADMIN, "X-StockPilot-Actor": "ops"}, json={"reason": "stuck"}
    )
    assert done.status_code == 200
    body = done.json()
    assert body["job_id"] == "report-gen"
    assert body["released"] is True
    assert body["previous_owner"] == "worker-b"
    status = (await api.get("/api/v1/batch/jobs/report-gen/lock/status")).json()
    assert status["locked"] is False and status["owner"] is None
    last, _ = await read_lock(js, "report-gen")
    assert isinstance(last, LockReleased)
    assert (last.reason, last.by, last.note, last.owner) == (
        "forced",
        "admin:ops",
        "stuck",
        "worker-b",
    )

    nothing = await api.post(url, headers=ADMIN)
    assert nothing.status_code == 200
    assert nothing.json()["released"] is False
    assert nothing.json()["previous_owner"] is None
    # Free again: the next worker takes it with a higher fencing token.
    taken = await acquire_lock(
        js, "report-gen", owner="worker-c", execution_id="x3", ttl_s=600, clock=clock
    )
    assert taken.fencing_token > lock.fencing_token


async def test_acquire_stored_without_the_sequence_check_does_not_take_a_live_lock(
    nc: NATS, service: Runtime, api: AsyncTestClient[object], clock: ManualClock
) -> None:
    """A rogue publisher skipping Expected-Last-Subject-Sequence is ignored and counted."""
    js = nc.jetstream()
    lock = await acquire_lock(
        js, "guarded", owner="rightful", execution_id="r1", ttl_s=600, clock=clock
    )
    rogue = LockAcquired(
        id="rogue-1",
        occurred_at=lock.acquired_at,
        job_id="guarded",
        owner="rogue",
        expires_at=lock.expires_at,
    )
    await publish_event(js, lock_subject("guarded"), rogue)

    async def counted() -> bool:
        status = (await api.get("/api/v1/batch/jobs/guarded/lock/status")).json()
        return bool(status["ignored_acquires"] == 1)

    await eventually(counted)
    status = (await api.get("/api/v1/batch/jobs/guarded/lock/status")).json()
    assert (status["owner"], status["fencing_token"]) == ("rightful", lock.fencing_token)


async def test_a_connection_folds_only_new_lock_events_and_notices_a_recreated_stream(
    nc: NATS, settings: BatchSettings, clock: ManualClock
) -> None:
    """A connection resumes its fold of a lock subject from its last read, and agrees with a
    fresh fold; when the stream is recreated (the message at its last sequence is another
    one), it folds the subject again from the first message instead of trusting the old."""
    js = nc.jetstream()
    held = await acquire_lock(js, "inc", owner="w1", execution_id="e1", ttl_s=60, clock=clock)
    first = await read_lock_state(js, "inc")
    assert first.held is not None and first.held.owner == "w1"
    await release_lock(js, held, clock=clock)
    second = await read_lock_state(js, "inc")
    assert second.held is None and second.last_seq > first.last_seq
    assert first.held is not None and first.held.owner == "w1"  # an answer is never changed
    other = await nats.connect(settings.nats_servers)
    try:
        fresh = await read_lock_state(other.jetstream(), "inc")
        assert (fresh.held, fresh.last_seq) == (second.held, second.last_seq)
        await js.delete_stream(BATCH_STREAM)
        await provision(js)
        # The new stream grows past the old last sequence with other messages: w2 holds the
        # lock, and mallory's release and header-less acquire change nothing. Folded on top
        # of the old state from sequence 3, mallory's acquire would look like the holder.
        other_js = other.jetstream()
        w2 = await acquire_lock(
            other_js, "inc", owner="w2", execution_id="e2", ttl_s=60, clock=clock
        )
        now = clock.now()
        junk: list[LockEvent] = [
            LockReleased(
                id="m1", occurred_at=now, job_id="inc", owner="w2", reason="released", by="mallory"
            ),
            LockAcquired(
                id="m2",
                occurred_at=now,
                job_id="inc",
                owner="mallory",
                expires_at=now + timedelta(hours=1),
            ),
        ]
        for event in junk:
            await publish_event(other_js, lock_subject("inc"), event)
    finally:
        await other.close()
    read = await read_lock_state(js, "inc")
    assert read.held is not None
    assert (read.held.owner, read.held.fencing_token, read.last_seq) == ("w2", w2.fencing_token, 3)
