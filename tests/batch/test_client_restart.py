"""The batch client across a NATS restart (issue #19: "the batch client reconnects across a
restart of the stack with nothing lost"): a run whose body ends while NATS is away records
its end and gives its lock back once NATS is back, each once, and the next run is not
skipped."""

from __future__ import annotations

import asyncio
import json
from collections import Counter

import nats
import pytest
from nats.js import JetStreamContext

from services.batch.client import batch_job, until_stored
from services.batch.errors import LockStateError
from shared.streams import STREAMS, provision
from tests.harness import NatsServer

BATCH = STREAMS["batch"].name
RETRIED = "recording its end: NATS did not answer"


async def stored_events(js: JetStreamContext) -> list[dict[str, object]]:
    """Every event of the batch stream, in order."""
    last = (await js.stream_info(BATCH)).state.last_seq
    events = []
    for seq in range(1, last + 1):
        msg = await js.get_msg(BATCH, seq)
        assert msg.data is not None
        events.append(json.loads(msg.data))
    return events


async def test_a_run_ending_while_nats_restarts_is_recorded_once_and_frees_its_lock(
    nats: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    back = asyncio.Event()
    nc = await nats_connect(nats.url, back)
    try:
        await provision(nc.jetstream())
        restarted: asyncio.Task[None] | None = None
        async with batch_job(nc, "nightly", items_total=3, heartbeat_interval_s=600) as run:
            run.advance(2)
            nats.stop()  # the stack goes down while the job works

            async def restart() -> None:
                # NATS stays away until the run's end was refused once (a shorter outage is
                # absorbed by nats-py's reconnect buffer alone); bounded if it never is.
                for _ in range(300):
                    if any(RETRIED in r.getMessage() for r in caplog.records):
                        break
                    await asyncio.sleep(0.1)
                nats.start()  # same port, same store

            restarted = asyncio.create_task(restart())
            run.advance(1)
        # Leaving waited for NATS: the run's end and the release are stored.
        assert restarted is not None
        await restarted
        assert any(RETRIED in r.getMessage() for r in caplog.records)
        await asyncio.wait_for(back.wait(), timeout=30)
        # The next run of the job takes the lock: it was given back, not left to its TTL.
        async with batch_job(nc, "nightly", items_total=1, heartbeat_interval_s=600) as second:
            second.advance(1)
        events = await stored_events(nc.jetstream())
    finally:
        await nc.close()
    ids = Counter(str(event["id"]) for event in events)
    assert [i for i, n in ids.items() if n > 1] == []  # nothing stored twice
    by_run = Counter((event.get("execution_id"), event["type"]) for event in events)
    for execution in (run.execution_id, second.execution_id):
        assert by_run[(execution, "batch.started")] == 1
        assert by_run[(execution, "batch.finished")] == 1
    finished = [e for e in events if e["type"] == "batch.finished"]
    assert [(e["status"], e["items_processed"]) for e in finished] == [
        ("succeeded", 3),
        ("succeeded", 1),
    ]
    types = [str(event["type"]) for event in events if str(event["type"]).startswith("lock.")]
    assert types == ["lock.acquired", "lock.released", "lock.acquired", "lock.released"]
    assert not any(e.get("reason") == "lost" for e in events)


async def nats_connect(url: str, back: asyncio.Event) -> nats.aio.client.Client:
    """A worker's connection as an application configures it: reconnecting forever."""

    async def reconnected() -> None:
        back.set()

    return await nats.connect(
        url, max_reconnect_attempts=-1, reconnect_time_wait=0.2, reconnected_cb=reconnected
    )


async def test_retrying_stops_at_the_deadline_and_never_retries_a_refusal() -> None:
    attempts: list[str] = []

    async def away() -> None:
        attempts.append("away")
        raise LockStateError("could not read the lock of nightly: nats: timeout")

    with pytest.raises(LockStateError):
        await until_stored("test", away, deadline_s=1.0)
    assert len(attempts) >= 2  # tried again while the deadline allowed, then gave up

    refused: list[str] = []

    async def refusal() -> None:
        refused.append("refused")
        raise nats.errors.AuthorizationError  # NATS refusing, not away: it would again

    with pytest.raises(nats.errors.AuthorizationError):
        await until_stored("test", refusal, deadline_s=30)
    assert refused == ["refused"]

    closed: list[str] = []

    async def closed_for_good() -> None:
        closed.append("closed")
        raise nats.errors.ConnectionClosedError

    with pytest.raises(nats.errors.ConnectionClosedError):
        await until_stored("test", closed_for_good, deadline_s=30)
    assert closed == ["closed"]
