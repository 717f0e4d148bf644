"""The batch service's wire contract: its subjects and events (runs, locks, schedules), the
parameters its endpoints take and the answers they give (the gateway serves them as they are).

This module is the batch package's public face: the gateway, ops, the demo and the bench
import the service's wire types from here (or use the worker client, services.batch.client)
and from nowhere else (tests/test_import_rules.py); each struct is defined here once. It holds
declarations and the validation that belongs to them (bounds, `stored_problem`, a job id's
and a schedule's problems), no logic: decisions, the lock rule, schedules' slots, queries and
the fold stay in their own modules. Why it runs past 300 lines: it is a flat list of
declarations, read top to bottom, and splitting it would scatter the contract again (issue 15).
"""

from __future__ import annotations

from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from croniter import croniter

from shared.events import JOB_ID_RE, AwareDatetime, Event, JobId, wrong_subject

# ===== events: the STOCKPILOT_BATCH stream (contract §4 batch) ===============================

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


# ===== endpoints: parameters and answers (contract §5) =======================================

# An execution's status as the API shows it (`lost` and `skipped` are judged or recorded).
ExecutionStatus = Literal["running", "succeeded", "failed", "cancelled", "lost", "skipped"]
# A job's state by its schedule and its runs (services.batch.schedule.judge).
JobState = Literal["new", "up", "running", "late", "missed", "failing"]


class JobSchedule(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One job's expected starts: `cron` (5 fields, in `tz`) or `every_s`; `grace_s` after
    the expected start before the slot counts as missed."""

    cron: Annotated[str, msgspec.Meta(min_length=1, max_length=200)] | None = None
    every_s: Annotated[float, msgspec.Meta(ge=1, le=YEAR_S)] | None = None
    grace_s: Annotated[float, msgspec.Meta(ge=0, le=YEAR_S)] = 300.0
    tz: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] = "UTC"

    def __post_init__(self) -> None:
        problem = schedule_problem(self)
        if problem is not None:
            raise ValueError(problem)


def schedule_problem(schedule: JobSchedule) -> str | None:
    """Why `schedule` cannot be used, or None."""
    if (schedule.cron is None) == (schedule.every_s is None):
        return 'give exactly one of "cron" (e.g. "0 2 * * *") and "every_s" (e.g. 300)'
    if schedule.cron is not None and (
        len(schedule.cron.split()) != 5 or not croniter.is_valid(schedule.cron)
    ):
        return f'"cron" {schedule.cron!r} is not a 5-field cron expression (e.g. "0 2 * * *")'
    try:
        ZoneInfo(schedule.tz)
    except (ZoneInfoNotFoundError, ValueError):
        return f'"tz" {schedule.tz!r} is not an IANA time zone (e.g. "Europe/Paris")'
    return None


Limit = Annotated[int, msgspec.Meta(ge=1, le=1000)]
Hours = Annotated[float, msgspec.Meta(gt=0, le=24 * 400)]
ReleaseNote = Annotated[str, msgspec.Meta(max_length=500)]
Actor = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]

# ----- parameters (what the gateway sends to the service endpoints) ------------------------


class RecentParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`recent`: the newest executions, optionally of one job."""

    limit: Limit = 50
    job_id: JobId | None = None


class StatsParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`stats`: executions started in the last `hours`, optionally of one job."""

    hours: Hours = 24.0
    job_id: JobId | None = None


class JobParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`lock_status`: one job."""

    job_id: JobId


class ReleaseParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`release`: force-release one job's lock on behalf of `actor`."""

    job_id: JobId
    actor: Actor
    reason: ReleaseNote | None = None


class CleanupParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`cleanup`: release every expired lock on behalf of `actor`."""

    actor: Actor


# ----- answers ----------------------------------------------------------------------------


class ExecutionOut(msgspec.Struct, kw_only=True):
    """One execution as the API shows it (status judged at the time of the query)."""

    execution_id: str
    job_id: str
    status: ExecutionStatus
    started_at: AwareDatetime
    finished_at: AwareDatetime | None
    duration_s: float | None
    items_processed: int
    items_total: int | None
    progress_pct: float | None
    throughput_per_s: float | None
    peak_memory_mb: float | None
    avg_cpu_percent: float | None
    warnings: list[str]
    error: str | None
    traceback: str | None
    host: str
    pid: int
    fencing_token: int | None
    last_heartbeat_at: AwareDatetime | None
    heartbeat_interval_s: float | None


class RecentExecutions(msgspec.Struct, kw_only=True):
    """Newest first; `total` is how many matching executions the history holds."""

    executions: list[ExecutionOut]
    total: int


class FailurePattern(msgspec.Struct, kw_only=True):
    """Errors that differ only in numbers, ids or paths, counted together."""

    error: str
    count: int
    last_seen: AwareDatetime
    example: str
    job_ids: list[str]


class JobStats(msgspec.Struct, kw_only=True):
    """One job's executions in the window."""

    total: int
    succeeded: int
    failed: int
    cancelled: int
    lost: int
    running: int
    success_rate: float | None
    avg_duration_s: float | None
    p95_duration_s: float | None
    avg_throughput_per_s: float | None
    peak_memory_mb: float | None
    avg_cpu_percent: float | None
    last_started_at: AwareDatetime | None
    last_status: ExecutionStatus | None
    # Runs that did not start because the lock was held (batch.skipped); not in success_rate.
    skipped: int = 0


class BatchStats(JobStats, kw_only=True):
    """Executions started in the window. `success_rate` is a percentage of the finished ones
    (succeeded, failed, cancelled, lost); durations are of finished executions."""

    hours: float
    since: AwareDatetime
    by_job: dict[str, JobStats]
    failure_patterns: list[FailurePattern]


class LockStatus(msgspec.Struct, kw_only=True):
    """A job's lock: `locked` while held and live, `expired` once held past `expires_at`."""

    job_id: str
    locked: bool
    owner: str | None
    acquired_at: AwareDatetime | None
    expires_at: AwareDatetime | None
    expired: bool
    fencing_token: int | None
    execution_id: str | None
    # lock.acquired events stored while this lock was live (they did not take it).
    ignored_acquires: int = 0


class ExpiredLocks(msgspec.Struct, kw_only=True):
    """Locks held past their lifetime (cleanup releases them)."""

    locks: list[LockStatus]
    total: int


class HeldLocks(msgspec.Struct, kw_only=True):
    """Every lock not released yet, live or expired, by job id."""

    locks: list[LockStatus]
    total: int


class ReleaseAnswer(msgspec.Struct, kw_only=True):
    """Result of a force release; `released` is false when nothing was held."""

    job_id: str
    released: bool
    previous_owner: str | None
    fencing_token: int | None = None


class CleanupAnswer(msgspec.Struct, kw_only=True):
    """The jobs whose expired locks were released."""

    released: list[str]
    count: int


class FailingJob(msgspec.Struct, kw_only=True):
    """A job whose latest run failed or was lost, with no success of that job since."""

    job_id: str
    status: Literal["failed", "lost"]
    execution_id: str
    at: AwareDatetime
    error: str | None


class MissedJob(msgspec.Struct, kw_only=True):
    """A scheduled job that has not started by its expected time + grace (contract §5)."""

    job_id: str
    expected_at: AwareDatetime
    missed_slots: int


class ExpiredLock(msgspec.Struct, kw_only=True):
    """A lock past its `expires_at` that nobody has released yet."""

    job_id: str
    owner: str
    expires_at: AwareDatetime


class BatchSummary(msgspec.Struct, kw_only=True):
    """The `summary` answer (shown in /api/v1/status): failed counts lost runs."""

    running: int
    failed_24h: int
    expired_locks: int
    failing_jobs: list[FailingJob] = []
    expired: list[ExpiredLock] = []
    missed_jobs: list[MissedJob] = []


# ----- runs and locks over HTTP (contract §5; any language, the ingest token) -------------

RunStatus = Literal["started", "succeeded", "failed", "cancelled", "skipped"]
RunExecutionId = Annotated[
    str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
]
HttpOwner = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Count = Annotated[int, msgspec.Meta(ge=0, lt=10**9)]
TtlS = Annotated[float, msgspec.Meta(gt=0, le=30 * 86_400)]
IntervalS = Annotated[float, msgspec.Meta(gt=0, le=86_400)]
RunErrorText = Annotated[str, msgspec.Meta(max_length=2000)]
Token = Annotated[int, msgspec.Meta(ge=1)]


class RunBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`POST /batch/jobs/{job_id}/runs`: one report of a run (`execution_id` ties a start to
    its end; left out on `started`, one is made and answered)."""

    status: RunStatus
    execution_id: RunExecutionId | None = None
    items_processed: Count | None = None
    items_total: Count | None = None
    error: RunErrorText | None = None
    host: HttpOwner | None = None
    # Beyond the contract: how often this run will report; silent for 3 of them it is lost.
    heartbeat_interval_s: IntervalS | None = None


class RunParams(RunBody, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`report_run`: a RunBody for one job."""

    job_id: JobId


class RunAnswer(msgspec.Struct, kw_only=True):
    """The stored report: pass `execution_id` back with the run's end."""

    job_id: str
    execution_id: str
    status: RunStatus


class LockBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Lock acquire / renew / release-mine over HTTP: who, for how long, which lock."""

    owner: HttpOwner
    ttl_s: TtlS | None = None
    fencing_token: Token | None = None


class LockParams(LockBody, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`lock_acquire`, `lock_renew`, `lock_release_mine`: a LockBody for one job."""

    job_id: JobId


class LockHolder(msgspec.Struct, kw_only=True):
    """Who holds a lock (a 409 names it)."""

    owner: str
    fencing_token: int
    expires_at: AwareDatetime


class LockAnswer(msgspec.Struct, kw_only=True):
    """`ok` with the lock's `fencing_token` and `expires_at`; otherwise (HTTP 409) `detail`
    says why and `holder` names who holds it (null when nobody does)."""

    job_id: str
    ok: bool
    owner: str
    fencing_token: int | None = None
    expires_at: AwareDatetime | None = None
    released: bool = False
    holder: LockHolder | None = None
    detail: str | None = None
    # The HTTP status the gateway answers with (200, or 409 when refused), as errors carry.
    status_code: int = 200


class JobOut(msgspec.Struct, kw_only=True):
    """One job as `GET /batch/jobs` shows it (contract §5)."""

    job_id: str
    # None for a job that runs but has no schedule (it is judged by its runs alone).
    schedule: JobSchedule | None
    state: JobState
    # The newest run (skipped ones included), as `executions/recent` shows it.
    last_execution: ExecutionOut | None
    # The first expected start not yet met (in the past when the job is late or missed).
    next_expected_at: AwareDatetime | None
    # Beyond the contract: the next expected start after now, and how many slots were missed.
    next_slot_at: AwareDatetime | None = None
    missed_slots: int = 0


class JobsAnswer(msgspec.Struct, kw_only=True):
    """`GET /batch/jobs`: every scheduled job and every job with runs in the history."""

    jobs: list[JobOut]
    total: int
