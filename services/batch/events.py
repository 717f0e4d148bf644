"""The batch stream's events: execution lifecycle and job-lock lifecycle (contract §4 batch).

`stockpilot.batch.run.<job_id>` carries batch.started/progress/finished and
`stockpilot.batch.lock.<job_id>` carries lock.acquired/released. Fields beyond the contract
(heartbeat_interval_s, fencing_token, traceback, note) are optional, so events stay additive.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from shared.events import JOB_ID_RE, AwareDatetime, Event, JobId, wrong_subject

# Ranges (contract §4): far beyond any real run, small enough that sums, rates and snapshots
# stay finite and fit in 64 bits. An upper bound on a float also refuses infinity.
ItemCount = Annotated[int, msgspec.Meta(ge=0, lt=10**15)]
Megabytes = Annotated[float, msgspec.Meta(ge=0, lt=1e9)]
# Percent of one core: a process on many cores goes past 100.
CpuPercent = Annotated[float, msgspec.Meta(ge=0, lt=1e5)]
Seconds = Annotated[float, msgspec.Meta(ge=0, lt=1e9)]
PerSecond = Annotated[float, msgspec.Meta(ge=0, lt=1e12)]
HeartbeatInterval = Annotated[float, msgspec.Meta(gt=0, le=86_400)]
Pid = Annotated[int, msgspec.Meta(ge=0, lt=2**32)]
# A stream sequence (fencing tokens are stream sequences).
FencingToken = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
# Strings: an execution id is a UUID or the like; a host name is at most 253 characters
# (DNS); an owner or actor names a worker or a person. Errors, warnings and tracebacks are
# kept shortened by the projection; these bounds only refuse what no worker sends.
ExecutionId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
HostName = Annotated[str, msgspec.Meta(max_length=255)]
Owner = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
WarningText = Annotated[str, msgspec.Meta(max_length=1000)]
Warnings = Annotated[list[WarningText], msgspec.Meta(max_length=100)]
ErrorText = Annotated[str, msgspec.Meta(max_length=10_000)]
TracebackText = Annotated[str, msgspec.Meta(max_length=100_000)]
Note = Annotated[str, msgspec.Meta(max_length=1000)]
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


class _RunEventBase(Event, frozen=True, kw_only=True):
    """What every execution event shares: it belongs on its own job's run subject."""

    job_id: JobId

    def stored_problem(self, subject: str) -> str | None:
        """`stockpilot.batch.run.<job_id>`, the job of the event itself."""
        expected = run_subject(self.job_id)
        if subject == expected:
            return None
        return wrong_subject(f"a run event of job {self.job_id!r}", subject, expected)


class _LockEventBase(Event, frozen=True, kw_only=True):
    """What every lock event shares: it belongs on its own job's lock subject.

    The expected-sequence header guards one lock subject; a lock event of job A stored on
    job B's subject would slip past that guard and change A's lock.
    """

    job_id: JobId

    def stored_problem(self, subject: str) -> str | None:
        """`stockpilot.batch.lock.<job_id>`, the job of the event itself."""
        expected = lock_subject(self.job_id)
        if subject == expected:
            return None
        return wrong_subject(f"a lock event of job {self.job_id!r}", subject, expected)


class BatchStarted(_RunEventBase, frozen=True, kw_only=True, tag="batch.started"):
    """An execution began (its worker holds the job lock)."""

    execution_id: ExecutionId
    host: HostName
    pid: Pid
    items_total: ItemCount | None = None
    heartbeat_interval_s: HeartbeatInterval | None = None
    fencing_token: FencingToken | None = None


class BatchProgress(_RunEventBase, frozen=True, kw_only=True, tag="batch.progress"):
    """A heartbeat: how far the execution is and what the process uses."""

    execution_id: ExecutionId
    items_processed: ItemCount
    items_total: ItemCount | None = None
    memory_mb: Megabytes
    cpu_percent: CpuPercent


class BatchFinished(_RunEventBase, frozen=True, kw_only=True, tag="batch.finished"):
    """An execution ended: succeeded, failed (with the error) or cancelled."""

    execution_id: ExecutionId
    status: FinishedStatus
    items_processed: ItemCount
    duration_s: Seconds
    throughput_per_s: PerSecond
    peak_memory_mb: Megabytes
    avg_cpu_percent: CpuPercent
    warnings: Warnings = []
    error: ErrorText | None = None
    traceback: TracebackText | None = None


class LockAcquired(_LockEventBase, frozen=True, kw_only=True, tag="lock.acquired"):
    """A job lock was taken until `expires_at`; its stream sequence is the fencing token."""

    owner: Owner
    execution_id: ExecutionId | None = None
    expires_at: AwareDatetime


class LockReleased(_LockEventBase, frozen=True, kw_only=True, tag="lock.released"):
    """A job lock was given back (released), taken away (forced) or cleaned up (expired)."""

    owner: Owner
    reason: ReleaseReason
    by: Owner
    note: Note | None = None
    # The lock given back (its lock.acquired's sequence); older events name only the owner.
    fencing_token: FencingToken | None = None


class BatchSkipped(_RunEventBase, frozen=True, kw_only=True, tag="batch.skipped"):
    """A run that did not start because the job's lock was held (history status `skipped`)."""

    execution_id: ExecutionId
    reason: Literal["locked"] = "locked"
    holder_owner: Owner | None = None
    holder_fencing_token: FencingToken | None = None


class LockRenewed(_LockEventBase, frozen=True, kw_only=True, tag="lock.renewed"):
    """The holder of lock `fencing_token` extended it until `expires_at` (a lease renewal)."""

    owner: Owner
    fencing_token: FencingToken
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

    def stored_problem(self, subject: str) -> str | None:
        """`stockpilot.batch.schedule.<job_id>`: a schedule on a run subject (which producers
        may publish) must not change what the service expects."""
        expected = schedule_subject(self.job_id)
        if subject == expected:
            return None
        return wrong_subject(f"a schedule of job {self.job_id!r}", subject, expected)


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
