"""Batch: job-lock round trips next to a bare JetStream publish round trip; fold and catch-up
rates of the batch projection next to the raw ordered-consumer read of the same run."""

from __future__ import annotations

import contextlib
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import nats

from bench.harness import Report, Result, log, repeat
from services.batch.client import acquire_lock, release_lock
from services.batch.contract import BatchEvent, BatchFinished, BatchProgress, BatchStarted
from services.batch.projection import batch_projection
from services.batch.service import build
from services.batch.settings import BatchSettings
from shared.streams import provision, snapshot_bucket
from tests.harness import running_service

T0 = datetime(2026, 11, 26, 9, 0, tzinfo=UTC)
PROGRESS_PER_RUN = 3


def executions(count: int) -> list[tuple[str, BatchEvent]]:
    """`count` events: executions of 20 jobs, each started, 3 heartbeats, finished."""
    out: list[tuple[str, BatchEvent]] = []
    i = 0
    while len(out) < count:
        job = f"bench-job-{i % 20}"
        eid = f"bench-{i:08d}"
        t = T0 + timedelta(seconds=i)
        subject = f"stockpilot.batch.run.{job}"
        out.append(
            (
                subject,
                BatchStarted(
                    id=f"{eid}.s",
                    occurred_at=t,
                    execution_id=eid,
                    job_id=job,
                    host="h",
                    pid=1,
                    items_total=1000,
                    heartbeat_interval_s=10,
                ),
            )
        )
        for k in range(PROGRESS_PER_RUN):
            out.append(
                (
                    subject,
                    BatchProgress(
                        id=f"{eid}.p{k}",
                        occurred_at=t,
                        execution_id=eid,
                        job_id=job,
                        items_processed=250 * (k + 1),
                        items_total=1000,
                        memory_mb=300.0 + k,
                        cpu_percent=40.0,
                    ),
                )
            )
        out.append(
            (
                subject,
                BatchFinished(
                    id=f"{eid}.f",
                    occurred_at=t + timedelta(seconds=9),
                    execution_id=eid,
                    job_id=job,
                    status="failed" if i % 17 == 0 else "succeeded",
                    items_processed=1000,
                    duration_s=9.0,
                    throughput_per_s=111.1,
                    peak_memory_mb=310.0,
                    avg_cpu_percent=40.0,
                    error=f"TimeoutError after {i % 60}s" if i % 17 == 0 else None,
                ),
            )
        )
        i += 1
    return out[:count]


async def lock_round_trips(url: str, count: int) -> float:
    """acquire_lock + release_lock, one after the other on one job: pairs/s."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    await provision(js)
    started = time.perf_counter()
    for _ in range(count):
        lock = await acquire_lock(
            js, "bench-lock", owner="bench", execution_id=uuid.uuid4().hex, ttl_s=60
        )
        await release_lock(js, lock)
    elapsed = time.perf_counter() - started
    await nc.close()
    return count / elapsed


def fold_rate(stored: list[bytes]) -> float:
    """Decode + apply (with the alerts it returns) of stored events in-process: events/s."""
    projection = batch_projection()
    started = time.perf_counter()
    for seq, data in enumerate(stored, start=1):
        projection.fold(seq, data)
    return len(stored) / (time.perf_counter() - started)


async def catch_up(url: str, workdir: Path, count: int) -> float:
    """The batch service started on a stream of `count` events, no snapshot: events/s."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    obs = await js.object_store(snapshot_bucket("batch"))
    for name in ("batch.batch", "batch.batch-alert-ledger"):
        with contextlib.suppress(Exception):
            await obs.delete(name)
    await nc.close()
    settings = BatchSettings(nats_url=url, data_dir=str(workdir / "batch"), log_level="WARNING")
    started = time.perf_counter()
    async with running_service(build(settings), settings, ready_timeout=600):
        elapsed = time.perf_counter() - started
    return count / elapsed


async def run(report: Report, ctx: object) -> None:
    """Lock round trips, fold rate, service catch-up."""
    url: str = ctx.nats_url  # type: ignore[attr-defined]
    runs: int = ctx.runs  # type: ignore[attr-defined]
    workdir: Path = ctx.workdir  # type: ignore[attr-defined]
    count = ctx.count  # type: ignore[attr-defined]

    pairs = count(3_000) // 3
    log(f"batch: {pairs:,} lock acquire+release pairs")
    report.results.append(
        Result(
            "job lock acquire + release (read last, 2 publishes with expected sequence)",
            await repeat(runs, lock_round_trips, url, pairs),
            "pairs/s",
            ceiling="js_rt",
            note="one pair is 3 JetStream round trips, so ~0.33 of the ceiling is the bound",
        )
    )

    events = executions(count(100_000))
    encode = msgspec.json.Encoder().encode
    stored = [encode(event) for _, event in events]
    log(f"batch: in-process fold of {len(stored):,} events")

    async def fold_once() -> float:
        return fold_rate(stored)

    report.results.append(
        Result(
            "batch projection fold (decode + apply + react), in-process",
            await repeat(runs, fold_once),
            "events/s",
            ceiling="read",
        )
    )

    nc = await nats.connect(url)
    js = nc.jetstream()
    await provision(js)
    for subject, event in events:
        await js.publish_async(subject, encode(event), headers={"Nats-Msg-Id": event.id})
    await js.publish_async_completed()
    await nc.close()
    log(f"batch: service catch-up over {len(events):,} stored events")
    report.results.append(
        Result(
            "batch service start-up fold of the stream (no snapshot)",
            await repeat(runs, catch_up, url, workdir, len(events)),
            "events/s",
            ceiling="read",
            note="includes connecting, provisioning and the micro service start",
        )
    )
