"""The batch stream's events: execution lifecycle and job-lock lifecycle (contract §4 batch).

`stockpilot.batch.run.<job_id>` carries batch.started/progress/finished and
`stockpilot.batch.lock.<job_id>` carries lock.acquired/released. Fields beyond the contract
(heartbeat_interval_s, fencing_token, traceback, note) are optional, so events stay additive.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from shared.events import JOB_ID_RE, AwareDatetime, Event, JobId

NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
# The longest schedule interval or grace period (a leap year).
YEAR_S = 366 * 86_400

RUN_SUBJECT_PREFIX = "stockpilot.batch.run."
LOCK_SUBJECT_PREFIX = "stockpilot.batch.lock."
SCHEDULE_SUBJECT_PREFIX = "stockpilot.batch.schedule."

FinishedStatus = Literal["succeeded", "failed", "cancelled"]
ReleaseReason = Literal["released", "forced", "expired", "lost"]


def run_subject(job_id: str) -> str:
    """Where a job's execution events go."""
    return RUN_SUBJECT_PREFIX + job_id


def lock_subject(job_id: str) -> str:
    """Where a job's lock events go (one subject per job: Expected-Last-Subject-Sequence)."""
    return LOCK_SUBJECT_PREFIX + job_id


def schedule_subject(job_id: str) -> str:
    """Where a job's schedule changes go."""
    return SCHEDULE_SUBJECT_PREFIX + job_id


def job_id_problem(job_id: str) -> str | None:
    """Why `job_id` is not a valid job id (it becomes a subject token), or None when it is."""
    if JOB_ID_RE.fullmatch(job_id) is not None:
        return None
    if not job_id:
        return "job_id must not be empty"
    if len(job_id) > 64:
        return f"job_id must be at most 64 characters, got {len(job_id)}"
    bad = sorted({c for c in job_id if JOB_ID_RE.fullmatch(c) is None})
    shown = ", ".join(repr(c) for c in bad[:5])
    return (
        f"job_id {job_id[:80]!r} may only contain ASCII letters, digits, '_' and '-' "
        f"(pattern ^[A-Za-z0-9_-]{{1,64}}$); it contains {shown}"
    )


class BatchStarted(Event, frozen=True, kw_only=True, tag="batch.started"):
    """An execution began (its worker holds the job lock)."""

    execution_id: str
    job_id: JobId
    host: str
    pid: int
    items_total: NonNegativeInt | None = None
    heartbeat_interval_s: PositiveFloat | None = None
    fencing_token: int | None = None


class BatchProgress(Event, frozen=True, kw_only=True, tag="batch.progress"):
    """A heartbeat: how far the execution is and what the process uses."""

    execution_id: str
    job_id: JobId
    items_processed: NonNegativeInt
    items_total: NonNegativeInt | None = None
    memory_mb: NonNegativeFloat
    cpu_percent: NonNegativeFloat


class BatchFinished(Event, frozen=True, kw_only=True, tag="batch.finished"):
    """An execution ended: succeeded, failed (with the error) or cancelled."""

    execution_id: str
    job_id: JobId
    status: FinishedStatus
    items_processed: NonNegativeInt
    duration_s: NonNegativeFloat
    throughput_per_s: NonNegativeFloat
    peak_memory_mb: NonNegativeFloat
    avg_cpu_percent: NonNegativeFloat
    warnings: list[str] = []
    error: str | None = None
    traceback: str | None = None


class LockAcquired(Event, frozen=True, kw_only=True, tag="lock.acquired"):
    """A job lock was taken until `expires_at`; its stream sequence is the fencing token."""

    job_id: JobId
    owner: str
    execution_id: str | None = None
    expires_at: AwareDatetime


class LockReleased(Event, frozen=True, kw_only=True, tag="lock.released"):
    """A job lock was given back (released), taken away (forced) or cleaned up (expired)."""

    job_id: JobId
    owner: str
    reason: ReleaseReason
    by: str
    note: str | None = None
    # The lock given back (its lock.acquired's sequence); older events name only the owner.
    fencing_token: int | None = None


class BatchSkipped(Event, frozen=True, kw_only=True, tag="batch.skipped"):
    """A run that did not start because the job's lock was held (history status `skipped`)."""

    execution_id: str
    job_id: JobId
    reason: Literal["locked"] = "locked"
    holder_owner: str | None = None
    holder_fencing_token: int | None = None


class LockRenewed(Event, frozen=True, kw_only=True, tag="lock.renewed"):
    """The holder of lock `fencing_token` extended it until `expires_at` (a lease renewal)."""

    job_id: JobId
    owner: str
    fencing_token: int
    expires_at: AwareDatetime


class JobScheduled(Event, frozen=True, kw_only=True, tag="batch.job_scheduled"):
    """A job's expected starts changed (batch service only; `removed`: no longer scheduled).

    Stored on `stockpilot.batch.schedule.<job_id>` when STOCKPILOT_JOB_SCHEDULES differs from
    the last one stored; slots are counted from its `occurred_at`."""

    job_id: JobId
    cron: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None
    every_s: Annotated[float, msgspec.Meta(gt=0, le=YEAR_S)] | None = None
    grace_s: Annotated[float, msgspec.Meta(ge=0, le=YEAR_S)] = 0.0
    tz: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] = "UTC"
    removed: bool = False


RunEvent = BatchStarted | BatchProgress | BatchFinished | BatchSkipped
LockEvent = LockAcquired | LockReleased | LockRenewed
BatchEvent = (
    BatchStarted
    | BatchProgress
    | BatchFinished
    | LockAcquired
    | LockReleased
    | BatchSkipped
    | LockRenewed
    | JobScheduled
)

decode_batch_event = msgspec.json.Decoder(BatchEvent).decode
decode_lock_event = msgspec.json.Decoder(LockEvent).decode


# Which event types each batch subject carries (contract §4: a type on another subject, or a
# job_id that is not the subject's token, is a dead letter).
_SUBJECT_TYPES: dict[str, tuple[type[Event], ...]] = {
    RUN_SUBJECT_PREFIX: (BatchStarted, BatchProgress, BatchFinished, BatchSkipped),
    LOCK_SUBJECT_PREFIX: (LockAcquired, LockReleased, LockRenewed),
    SCHEDULE_SUBJECT_PREFIX: (JobScheduled,),
}


def subject_problem(subject: str, event: BatchEvent) -> str | None:
    """Why `event` may not be stored on `subject`, or None when it belongs there."""
    for prefix, types in _SUBJECT_TYPES.items():
        if not subject.startswith(prefix):
            continue
        if not isinstance(event, types):
            tag = type(event).__struct_config__.tag
            return f"a {tag} event does not belong on {subject[:200]}"
        token = subject[len(prefix) :]
        if event.job_id != token:
            return f"job_id {event.job_id!r} differs from the subject's job {token[:80]!r}"
        return None
    return f"{subject[:200]} is not a batch run, lock or schedule subject"
