"""Event builders shared by the batch tests (plain constructors, no test doubles).

Times are seconds after a base instant: `T0` (09:00 UTC on the test clock's day, never a
literal date), or `base=` one computed from an awkward moment (tests.clocks.MOMENTS).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from services.batch.contract import (
    BatchFinished,
    BatchProgress,
    BatchStarted,
    FinishedStatus,
    LockAcquired,
    LockReleased,
    ReleaseReason,
)
from tests.clocks import NOON

# Three hours before the run's noon: events dated from it are in the past of the real clock.
T0 = NOON - timedelta(hours=3)


def at(seconds: float, base: datetime = T0) -> datetime:
    """`base` (T0 unless told) plus some seconds."""
    return base + timedelta(seconds=seconds)


def started(
    execution_id: str,
    job_id: str = "job",
    t: float = 0,
    items_total: int | None = None,
    interval: float | None = 10.0,
    base: datetime = T0,
) -> BatchStarted:
    return BatchStarted(
        id=f"{execution_id}.started",
        occurred_at=at(t, base),
        execution_id=execution_id,
        job_id=job_id,
        host="worker-1",
        pid=4242,
        items_total=items_total,
        heartbeat_interval_s=interval,
    )


def progress(
    execution_id: str,
    job_id: str = "job",
    t: float = 1,
    done: int = 0,
    total: int | None = None,
    memory_mb: float = 100.0,
    cpu: float = 50.0,
    base: datetime = T0,
) -> BatchProgress:
    return BatchProgress(
        id=f"{execution_id}.progress.{t}",
        occurred_at=at(t, base),
        execution_id=execution_id,
        job_id=job_id,
        items_processed=done,
        items_total=total,
        memory_mb=memory_mb,
        cpu_percent=cpu,
    )


def finished(
    execution_id: str,
    job_id: str = "job",
    t: float = 10,
    status: FinishedStatus = "succeeded",
    done: int = 10,
    duration_s: float = 10.0,
    error: str | None = None,
    memory_mb: float = 120.0,
    cpu: float = 40.0,
    base: datetime = T0,
) -> BatchFinished:
    return BatchFinished(
        id=f"{execution_id}.finished",
        occurred_at=at(t, base),
        execution_id=execution_id,
        job_id=job_id,
        status=status,
        items_processed=done,
        duration_s=duration_s,
        throughput_per_s=done / duration_s if duration_s else 0.0,
        peak_memory_mb=memory_mb,
        avg_cpu_percent=cpu,
        warnings=[],
        error=error,
    )


def acquired(
    job_id: str = "job",
    owner: str = "w1",
    t: float = 0,
    ttl: float = 60,
    eid: str = "a",
    base: datetime = T0,
) -> LockAcquired:
    return LockAcquired(
        id=f"acq.{job_id}.{owner}.{t}.{eid}",
        occurred_at=at(t, base),
        job_id=job_id,
        owner=owner,
        execution_id=eid,
        expires_at=at(t + ttl, base),
    )


def released(
    job_id: str = "job",
    owner: str = "w1",
    t: float = 5,
    reason: ReleaseReason = "released",
    by: str = "w1",
    base: datetime = T0,
) -> LockReleased:
    return LockReleased(
        id=f"rel.{job_id}.{owner}.{t}",
        occurred_at=at(t, base),
        job_id=job_id,
        owner=owner,
        reason=reason,
        by=by,
    )
