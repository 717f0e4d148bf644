"""The batch projection: execution history (bounded) and job locks, as a pure fold.

Why one module of over 300 lines: it is the one fold of the batch stream, with the alerts it
returns; the execution history and the locks come from one stream, in one order, and a run
carries its lock's fencing token, so one view and one `apply` keep them consistent.

The fold needs the stream sequence of each event (a lock's fencing token is the sequence of
its `lock.acquired`): `apply(view, event, seq)` takes it, and returns the alerts the event
fired (a failed run, an expired lock cleaned up, a forced release). Nothing here reads a
clock: whether a lock has expired or a running execution is lost is decided at query time
from `expires_at` and `last_heartbeat_at` (see `queries`).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import msgspec

from services.batch.contract import (
    BatchEvent,
    BatchFinished,
    BatchProgress,
    BatchSkipped,
    BatchStarted,
    ExecutionStatus,
    JobSchedule,
    JobScheduled,
    LockAcquired,
    LockReleased,
    LockRenewed,
    ReleaseReason,
    decode_batch_event,
)
from services.batch.lockrule import LockState, lock_step
from shared.events import Alert, AwareDatetime, alert_id
from shared.projection import NOTHING_FIRED, FoldError, Projection, View, fold_fingerprint
from shared.streams import STREAMS

__all__ = ["LockState"]  # re-exported: the lock rule owns it, queries and decide read it here

DEFAULT_HISTORY_LIMIT = 1000
# All jobs together keep at most this many times `history_limit` (bounds the snapshot).
TOTAL_HISTORY_FACTOR = 20
# A running execution is lost once this many heartbeat intervals pass without one.
LOST_AFTER_INTERVALS = 3
# What one execution may hold, so a snapshot of the full history stays bounded.
MAX_WARNINGS = 20
MAX_WARNING_CHARS = 500
MAX_ERROR_CHARS = 2000
MAX_TRACEBACK_CHARS = 4000
# Bumped when the fold's meaning or the view's layout changes (see Projection.version).
# 2: the view no longer holds `last_released` (apply returns the alerts it fired).
FOLD_VERSION = "2"


class Execution(msgspec.Struct, kw_only=True):
    """One execution as folded (status is never `lost` here: that is judged at query time)."""

    execution_id: str
    job_id: str
    status: ExecutionStatus
    started_at: AwareDatetime
    finished_at: AwareDatetime | None = None
    duration_s: float | None = None
    items_processed: int = 0
    items_total: int | None = None
    progress_pct: float | None = None
    throughput_per_s: float | None = None
    peak_memory_mb: float | None = None
    avg_cpu_percent: float | None = None
    warnings: list[str] = []
    error: str | None = None
    traceback: str | None = None
    host: str = ""
    pid: int = 0
    fencing_token: int | None = None
    heartbeat_interval_s: float | None = None
    last_heartbeat_at: AwareDatetime | None = None
    heartbeats: int = 0
    cpu_sum: float = 0.0
    started_seq: int = 0


class ReleasedLock(msgspec.Struct, kw_only=True):
    """The lock the event just folded released (what its alert is about; not kept)."""

    job_id: str
    owner: str
    fencing_token: int
    reason: ReleaseReason
    by: str
    acquired_at: AwareDatetime
    expires_at: AwareDatetime
    released_at: AwareDatetime
    note: str | None = None


class ScheduleState(msgspec.Struct, kw_only=True):
    """A job's schedule and the moment it took effect (slots are counted from then on)."""

    schedule: JobSchedule
    since: AwareDatetime


class BatchView(View, kw_only=True):
    """Executions (oldest first; each job keeps its newest `history_limit`) and held locks."""

    executions: dict[str, Execution] = {}
    # Each job's execution ids, oldest first: a busy job evicts only its own old runs.
    job_runs: dict[str, list[str]] = {}
    # The schedule in force for each scheduled job, and since when.
    schedules: dict[str, ScheduleState] = {}
    locks: dict[str, LockState] = {}
    evicted: int = 0
    ignored_acquires: int = 0
    ignored_releases: int = 0
    ignored_renewals: int = 0
    orphan_events: int = 0


def _pct(done: int, total: int | None) -> float | None:
    if not total:
        return None
    return round(min(100.0, done * 100.0 / total), 2)


def _remember(view: BatchView, execution: Execution, history_limit: int) -> None:
    """Add an execution; evict the oldest of *its own job* past `history_limit` (and, past
    the overall bound, the oldest of the job holding the most)."""
    if not view.job_runs and view.executions:  # a snapshot from before per-job history
        for old in view.executions.values():
            view.job_runs.setdefault(old.job_id, []).append(old.execution_id)
    view.executions[execution.execution_id] = execution
    runs = view.job_runs.setdefault(execution.job_id, [])
    runs.append(execution.execution_id)
    while len(runs) > history_limit:
        del view.executions[runs.pop(0)]
        view.evicted += 1
    while len(view.executions) > history_limit * TOTAL_HISTORY_FACTOR:
        busiest = max(view.job_runs.values(), key=len)
        del view.executions[busiest.pop(0)]
        view.evicted += 1
    for job_id in [job for job, ids in view.job_runs.items() if not ids]:
        del view.job_runs[job_id]


def _started(view: BatchView, event: BatchStarted, seq: int, history_limit: int) -> None:
    if event.execution_id in view.executions:
        view.orphan_events += 1
        return
    execution = Execution(
        execution_id=event.execution_id,
        job_id=event.job_id,
        status="running",
        started_at=event.occurred_at,
        items_total=event.items_total,
        progress_pct=0.0 if event.items_total else None,
        host=event.host,
        pid=event.pid,
        fencing_token=event.fencing_token,
        heartbeat_interval_s=event.heartbeat_interval_s,
        last_heartbeat_at=event.occurred_at,
        started_seq=seq,
    )
    _remember(view, execution, history_limit)


def _skipped(view: BatchView, event: BatchSkipped, seq: int, history_limit: int) -> None:
    if event.execution_id in view.executions:
        view.orphan_events += 1
        return
    holder = event.holder_owner or "another run"
    token = f" (fencing token {event.holder_fencing_token})" if event.holder_fencing_token else ""
    execution = Execution(
        execution_id=event.execution_id,
        job_id=event.job_id,
        status="skipped",
        started_at=event.occurred_at,
        finished_at=event.occurred_at,
        duration_s=0.0,
        error=f"skipped: the lock was held by {holder}{token}"[:MAX_ERROR_CHARS],
        started_seq=seq,
    )
    _remember(view, execution, history_limit)


def _progress(view: BatchView, event: BatchProgress) -> None:
    execution = view.executions.get(event.execution_id)
    if execution is None or execution.status != "running":
        view.orphan_events += 1
        return
    execution.items_processed = event.items_processed
    if event.items_total is not None:
        execution.items_total = event.items_total
    execution.progress_pct = _pct(execution.items_processed, execution.items_total)
    if execution.last_heartbeat_at is None or event.occurred_at > execution.last_heartbeat_at:
        execution.last_heartbeat_at = event.occurred_at
    execution.peak_memory_mb = max(execution.peak_memory_mb or 0.0, event.memory_mb)
    execution.heartbeats += 1
    execution.cpu_sum += event.cpu_percent
    execution.avg_cpu_percent = round(execution.cpu_sum / execution.heartbeats, 2)


def _finished(view: BatchView, event: BatchFinished) -> None:
    execution = view.executions.get(event.execution_id)
    if execution is None or execution.status != "running":
        view.orphan_events += 1
        return
    execution.status = event.status
    execution.finished_at = event.occurred_at
    execution.duration_s = event.duration_s
    execution.items_processed = event.items_processed
    execution.throughput_per_s = event.throughput_per_s
    execution.peak_memory_mb = max(execution.peak_memory_mb or 0.0, event.peak_memory_mb)
    execution.avg_cpu_percent = event.avg_cpu_percent
    execution.warnings = [w[:MAX_WARNING_CHARS] for w in event.warnings[:MAX_WARNINGS]]
    execution.error = event.error[:MAX_ERROR_CHARS] if event.error is not None else None
    execution.traceback = (
        event.traceback[-MAX_TRACEBACK_CHARS:] if event.traceback is not None else None
    )
    pct = _pct(execution.items_processed, execution.items_total)
    execution.progress_pct = 100.0 if pct is None and event.status == "succeeded" else pct


def _scheduled(view: BatchView, event: JobScheduled) -> None:
    if event.removed:
        view.schedules.pop(event.job_id, None)
        return
    try:
        schedule = JobSchedule(
            cron=event.cron, every_s=event.every_s, grace_s=event.grace_s, tz=event.tz
        )
    except ValueError as exc:
        raise FoldError(f"batch.job_scheduled for {event.job_id}: {exc}") from None
    view.schedules[event.job_id] = ScheduleState(schedule=schedule, since=event.occurred_at)


def _lock_event(
    view: BatchView, event: LockAcquired | LockReleased | LockRenewed, seq: int
) -> ReleasedLock | None:
    """Fold a lock event; the lock a release released (None for anything else)."""
    # The same rule the workers fold the lock subject with (services.batch.lockrule).
    step = lock_step(view.locks.get(event.job_id), event, seq)
    if step.held is None:
        view.locks.pop(event.job_id, None)
    else:
        view.locks[event.job_id] = step.held
    if step.outcome == "ignored":
        if isinstance(event, LockAcquired):
            view.ignored_acquires += 1
        elif isinstance(event, LockReleased):
            view.ignored_releases += 1
        else:
            view.ignored_renewals += 1
        return None
    if step.released is None or not isinstance(event, LockReleased):
        return None
    held = step.released
    return ReleasedLock(
        job_id=held.job_id,
        owner=held.owner,
        fencing_token=held.fencing_token,
        reason=event.reason,
        by=event.by,
        acquired_at=held.acquired_at,
        expires_at=held.expires_at,
        released_at=event.occurred_at,
        note=event.note,
    )


def apply(
    view: BatchView, event: BatchEvent, seq: int, history_limit: int = DEFAULT_HISTORY_LIMIT
) -> Sequence[Alert]:
    """Fold one event stored at stream sequence `seq` into the view (in place); the alerts
    it fired: a failed run, an expired lock cleaned up, a forced release."""
    match event:
        case BatchStarted():
            _started(view, event, seq, history_limit)
        case BatchProgress():
            _progress(view, event)
        case BatchFinished():
            _finished(view, event)
            if event.status == "failed":
                execution = view.executions.get(event.execution_id)
                if execution is not None and execution.status == "failed":
                    return [job_failed_alert(execution, event.occurred_at, "failed")]
        case LockAcquired() | LockRenewed():
            _lock_event(view, event, seq)
        case LockReleased():
            released = _lock_event(view, event, seq)
            if released is not None:
                return _release_alerts(released, event)
        case BatchSkipped():
            _skipped(view, event, seq, history_limit)
        case JobScheduled():
            _scheduled(view, event)
    return NOTHING_FIRED


def job_failed_alert(execution: Execution, occurred_at: datetime, why: str) -> Alert:
    """`batch.job_failed` for one execution (one id per execution, whether failed or lost)."""
    return Alert(
        id=alert_id("batch.job_failed", execution.job_id, execution.execution_id),
        occurred_at=occurred_at,
        source="batch",
        kind="batch.job_failed",
        severity="critical",
        title=f"Batch job {execution.job_id} {why}",
        message=(
            f"execution {execution.execution_id} of {execution.job_id} on "
            f"{execution.host or '?'} (pid {execution.pid}) {why}"
            + (f": {execution.error}" if execution.error else "")
        )[:1000],
        metric="failed_executions",
        value=1,
        threshold=1,
        params={
            "job_id": execution.job_id,
            "execution_id": execution.execution_id,
            "lost": why != "failed",
            "error": execution.error[:300] if execution.error else None,
        },
    )


def lost_at(execution: Execution, default_interval_s: float) -> datetime | None:
    """When a running execution counts as lost (3 heartbeat intervals after the last one)."""
    if execution.status != "running":
        return None
    interval = execution.heartbeat_interval_s or default_interval_s
    last = execution.last_heartbeat_at or execution.started_at
    return last + timedelta(seconds=LOST_AFTER_INTERVALS * interval)


def lock_expired_alert(lock: LockState, occurred_at: datetime, by: str | None = None) -> Alert:
    """`batch.lock_expired` for one lock (one id per lock: the service's watch and a cleanup
    store it once between them)."""
    ttl = (lock.expires_at - lock.acquired_at).total_seconds()
    then = f" and was released by {by}" if by else "; nobody has released it yet"
    return Alert(
        id=alert_id("batch.lock_expired", lock.job_id, str(lock.fencing_token)),
        occurred_at=occurred_at,
        source="batch",
        kind="batch.lock_expired",
        severity="warning",
        title=f"Lock of batch job {lock.job_id} expired",
        message=(
            f"the lock of {lock.job_id} held by {lock.owner} (fencing token "
            f"{lock.fencing_token}) expired at {lock.expires_at.isoformat()}{then}"
        )[:1000],
        metric="lock_ttl_s",
        value=ttl,
        threshold=ttl,
        params={
            "job_id": lock.job_id,
            "owner": lock.owner,
            "fencing_token": lock.fencing_token,
            "by": by,
        },
    )


def lock_forced_alert(released: ReleasedLock) -> Alert:
    """`batch.lock_forced`: someone took a job's lock away from its holder, named."""
    why = f" ({released.note})" if released.note else ""
    return Alert(
        id=alert_id("batch.lock_forced", released.job_id, str(released.fencing_token)),
        occurred_at=released.released_at,
        source="batch",
        kind="batch.lock_forced",
        severity="warning",
        title=f"Lock of batch job {released.job_id} force-released by {released.by}",
        message=(
            f"{released.by} force-released the lock of {released.job_id} held by "
            f"{released.owner} (fencing token {released.fencing_token}){why}"
        )[:1000],
        metric="forced_releases",
        value=1,
        threshold=1,
        params={
            "job_id": released.job_id,
            "owner": released.owner,
            "fencing_token": released.fencing_token,
            "by": released.by,
            "note": released.note,
        },
    )


def _release_alerts(released: ReleasedLock, event: LockReleased) -> Sequence[Alert]:
    """A cleanup of an expired lock, or a forced release, is alerted; a normal one is not."""
    if event.reason == "expired":
        lock = LockState(
            job_id=released.job_id,
            owner=released.owner,
            execution_id=None,
            acquired_at=released.acquired_at,
            expires_at=released.expires_at,
            fencing_token=released.fencing_token,
        )
        return [lock_expired_alert(lock, event.occurred_at, released.by)]
    if event.reason == "forced":
        return [lock_forced_alert(released)]
    return NOTHING_FIRED


BatchProjection = Projection[BatchView, BatchEvent]


def batch_projection(history_limit: int = DEFAULT_HISTORY_LIMIT) -> BatchProjection:
    """The projection of the whole STOCKPILOT_BATCH stream. An event on a subject it does not
    belong to (a lock event naming another job, a schedule on a run subject) is refused
    (FoldError: the runtime dead-letters it) and changes nothing."""

    def fold(view: BatchView, event: BatchEvent, seq: int) -> Sequence[Alert]:
        return apply(view, event, seq, history_limit)

    return Projection(
        name="batch",
        stream=STREAMS["batch"],
        view_type=BatchView,
        decode=decode_batch_event,
        apply=fold,
        version=FOLD_VERSION,
        # The history bound decides what the view keeps: another bound, another view.
        fingerprint=fold_fingerprint(history_limit),
    )


def job_missed_alert(job_id: str, slot: datetime, grace_s: float) -> Alert:
    """`batch.job_missed` for one missed slot (one id per job and slot)."""
    return Alert(
        id=alert_id("batch.job_missed", job_id, slot.isoformat()),
        occurred_at=slot + timedelta(seconds=grace_s),
        source="batch",
        kind="batch.job_missed",
        severity="warning",
        title=f"Batch job {job_id} did not start",
        message=(
            f"{job_id} was expected to start at {slot.isoformat()} and had not started "
            f"{grace_s:g} s later (its grace period)"
        ),
        metric="missed_slots",
        value=1,
        threshold=1,
        params={"job_id": job_id, "expected_at": slot.isoformat(), "grace_s": grace_s},
    )
