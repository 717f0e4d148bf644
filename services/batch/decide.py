"""Pure lock decisions: may this run take the lock, is it still ours, what a release stores.

The adapters (locks.py for workers and the HTTP routes, service.py for admin commands) fold
`stockpilot.batch.lock.<job_id>` with the one lock rule (lockrule.py), call these, and publish
what they return with `Nats-Expected-Last-Subject-Sequence` = the subject's last sequence so a
race loses cleanly instead of double-taking.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from services.batch.contract import (
    BatchFinished,
    BatchSkipped,
    BatchStarted,
    LockAcquired,
    LockReleased,
    LockRenewed,
    ReleaseReason,
    RunEvent,
    RunParams,
)
from services.batch.errors import LockHeldError
from services.batch.lockrule import LockRead, LockState
from services.batch.projection import BatchView, Execution
from shared.errors import ConflictError


def acquire_event_id(job_id: str, execution_id: str) -> str:
    """The id of an execution's lock.acquired (a retried publish is the same event)."""
    return f"lock.{job_id}.acquired.{execution_id}"


def release_event_id(job_id: str, fencing_token: int) -> str:
    """One release per lock, whatever its reason: two racing releases store one."""
    return f"lock.{job_id}.{fencing_token}.released"


def decide_acquire(
    held: LockState | None,
    *,
    job_id: str,
    owner: str,
    execution_id: str,
    ttl_s: float,
    now: datetime,
) -> LockAcquired:
    """The lock.acquired to publish, or LockHeldError while `held` is live at `now` (the same
    test `lock_step` applies to the stored event, so what is published is what takes the lock)."""
    if held is not None and held.expires_at > now:
        raise LockHeldError(
            job_id, held.owner, held.expires_at, held.fencing_token, held.execution_id
        )
    return LockAcquired(
        id=acquire_event_id(job_id, execution_id),
        occurred_at=now,
        job_id=job_id,
        owner=owner,
        execution_id=execution_id,
        expires_at=now + timedelta(seconds=ttl_s),
    )


def why_lost(read: LockRead, *, fencing_token: int, now: datetime) -> str | None:
    """Why a run holding `fencing_token` no longer holds its lock, or None while it does."""
    held = read.held
    if held is not None and held.fencing_token == fencing_token:
        if now >= held.expires_at:
            return f"it expired at {held.expires_at.isoformat()}"
        return None
    match read.ended_by(fencing_token):
        case LockReleased(reason="forced") as event:
            return f"it was force-released by {event.by}" + (
                f" ({event.note})" if event.note else ""
            )
        case LockReleased(reason="lost") as event:
            return f"it was released by {event.by}: the run was declared lost (heartbeats stopped)"
        case LockReleased(reason="expired") as event:
            return f"it expired and was cleaned up by {event.by}"
        case LockReleased() as event:
            return f"it was released by {event.by}"
        case LockAcquired() as event:
            return f"it expired and was taken over by {event.owner}"
    if held is not None:
        return f"the lock is held by {held.owner} (fencing token {held.fencing_token})"
    return f"the lock subject holds no lock with fencing token {fencing_token}"


def release_event(
    lock: LockState, *, reason: ReleaseReason, by: str, now: datetime, note: str | None = None
) -> LockReleased:
    """The lock.released that gives `lock` back (naming its fencing token)."""
    return LockReleased(
        id=release_event_id(lock.job_id, lock.fencing_token),
        occurred_at=now,
        job_id=lock.job_id,
        owner=lock.owner,
        reason=reason,
        by=by,
        note=note,
        fencing_token=lock.fencing_token,
    )


def renew_event(lock: LockState, *, ttl_s: float, now: datetime) -> LockRenewed:
    """The lock.renewed that extends `lock` to `now + ttl_s` (one id per lock and instant)."""
    return LockRenewed(
        id=f"lock.{lock.job_id}.{lock.fencing_token}.renewed.{now.timestamp():.6f}",
        occurred_at=now,
        job_id=lock.job_id,
        owner=lock.owner,
        fencing_token=lock.fencing_token,
        expires_at=now + timedelta(seconds=ttl_s),
    )


def expired_locks(view: BatchView, now: datetime) -> list[LockState]:
    """Held locks whose lifetime has passed, earliest expiry first."""
    return sorted(
        (lock for lock in view.locks.values() if lock.expires_at <= now),
        key=lambda lock: (lock.expires_at, lock.job_id),
    )


# Runs reported over HTTP announce no heartbeat cadence by default: this one (silent for three
# of them, an hour and a half, the run is lost) suits a cron job that reports start and end.
HTTP_RUN_INTERVAL_S = 1800.0


def run_report_events(
    params: RunParams,
    execution_id: str,
    existing: Execution | None,
    now: datetime,
    holder: LockState | None = None,
) -> list[RunEvent]:
    """The run events one HTTP report stores (`started`; an end, with its start when the run
    was never reported started; `skipped`). A report repeated as it was stores nothing (a
    crontab's curl may retry); one that contradicts the run as stored is a ConflictError (409):
    the request is well formed, the run's state says no."""
    if existing is not None and existing.job_id != params.job_id:
        raise ConflictError(
            f"execution {execution_id} belongs to job {existing.job_id}, not {params.job_id}"
        )
    host = params.host or "http"
    start = BatchStarted(
        id=f"{execution_id}.started",
        occurred_at=now,
        execution_id=execution_id,
        job_id=params.job_id,
        host=host,
        pid=0,
        items_total=params.items_total,
        heartbeat_interval_s=params.heartbeat_interval_s or HTTP_RUN_INTERVAL_S,
    )
    if params.status == "started":
        return [] if existing is not None else [start]
    if params.status == "skipped":
        if existing is not None and existing.status == "skipped":
            return []
        if existing is not None:
            raise ConflictError(
                f"execution {execution_id} was already reported ({existing.status})"
            )
        return [
            BatchSkipped(
                id=f"{execution_id}.skipped",
                occurred_at=now,
                execution_id=execution_id,
                job_id=params.job_id,
                holder_owner=holder.owner if holder is not None else None,
                holder_fencing_token=holder.fencing_token if holder is not None else None,
            )
        ]
    if existing is not None and existing.status == params.status:
        return []
    if existing is not None and existing.status != "running":
        raise ConflictError(
            f"execution {execution_id} already ended ({existing.status}); report a new run"
        )
    events: list[RunEvent] = [] if existing is not None else [start]
    started_at = existing.started_at if existing is not None else now
    duration = max(0.0, (now - started_at).total_seconds())
    items = params.items_processed
    if items is None:
        items = existing.items_processed if existing is not None else 0
    events.append(
        BatchFinished(
            id=f"{execution_id}.finished",
            occurred_at=now,
            execution_id=execution_id,
            job_id=params.job_id,
            status=params.status,
            items_processed=items,
            duration_s=round(duration, 3),
            throughput_per_s=round(items / duration, 3) if duration > 0 else 0.0,
            peak_memory_mb=0.0,
            avg_cpu_percent=0.0,
            error=params.error,
        )
    )
    return events
