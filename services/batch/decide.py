"""Pure lock decisions: may this run take the lock, is it still ours, what a release stores.

The adapters (client.py for workers, service.py for admin commands) read the last event on
`stockpilot.batch.lock.<job_id>` and its sequence, call these, and publish what they return
with `Nats-Expected-Last-Subject-Sequence` so a race loses cleanly instead of double-taking.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from services.batch.errors import LockHeldError
from services.batch.events import LockAcquired, LockEvent, LockReleased, ReleaseReason
from services.batch.projection import BatchView, LockState


def acquire_event_id(job_id: str, execution_id: str) -> str:
    """The id of an execution's lock.acquired (a retried publish is the same event)."""
    return f"lock.{job_id}.acquired.{execution_id}"


def release_event_id(job_id: str, fencing_token: int) -> str:
    """One release per lock, whatever its reason: two racing releases store one."""
    return f"lock.{job_id}.{fencing_token}.released"


def decide_acquire(
    last: LockEvent | None,
    last_seq: int,
    *,
    job_id: str,
    owner: str,
    execution_id: str,
    ttl_s: float,
    now: datetime,
) -> LockAcquired:
    """The lock.acquired to publish (expecting last sequence `last_seq`) or LockHeldError."""
    if isinstance(last, LockAcquired) and last.expires_at > now:
        raise LockHeldError(job_id, last.owner, last.expires_at, last_seq, last.execution_id)
    return LockAcquired(
        id=acquire_event_id(job_id, execution_id),
        occurred_at=now,
        job_id=job_id,
        owner=owner,
        execution_id=execution_id,
        expires_at=now + timedelta(seconds=ttl_s),
    )


def why_lost(
    last: LockEvent | None,
    last_seq: int,
    *,
    fencing_token: int,
    expires_at: datetime,
    now: datetime,
) -> str | None:
    """Why a run holding `fencing_token` no longer holds its lock, or None while it does."""
    if last_seq != fencing_token:
        match last:
            case LockReleased(reason="forced"):
                return f"it was force-released by {last.by}" + (
                    f" ({last.note})" if last.note else ""
                )
            case LockReleased(reason="expired"):
                return f"it expired and was cleaned up by {last.by}"
            case LockReleased():
                return f"it was released by {last.by}"
            case LockAcquired():
                return f"it was taken over by {last.owner} (fencing token {last_seq})"
            case _:
                return f"the lock subject moved on to sequence {last_seq}"
    if now >= expires_at:
        return f"it expired at {expires_at.isoformat()}"
    return None


def release_event(
    lock: LockState, *, reason: ReleaseReason, by: str, now: datetime, note: str | None = None
) -> LockReleased:
    """The lock.released that gives `lock` back."""
    return LockReleased(
        id=release_event_id(lock.job_id, lock.fencing_token),
        occurred_at=now,
        job_id=lock.job_id,
        owner=lock.owner,
        reason=reason,
        by=by,
        note=note,
    )


def expired_locks(view: BatchView, now: datetime) -> list[LockState]:
    """Held locks whose lifetime has passed, earliest expiry first."""
    return sorted(
        (lock for lock in view.locks.values() if lock.expires_at <= now),
        key=lambda lock: (lock.expires_at, lock.job_id),
    )
