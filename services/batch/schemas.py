"""What the batch service's endpoints take and answer (the gateway serves the answers as is)."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from services.batch.projection import ExecutionStatus
from services.batch.schedule import JobSchedule, JobState
from shared.events import AwareDatetime, JobId

Limit = Annotated[int, msgspec.Meta(ge=1, le=1000)]
Hours = Annotated[float, msgspec.Meta(gt=0, le=24 * 400)]
Note = Annotated[str, msgspec.Meta(max_length=500)]
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
    reason: Note | None = None


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
ExecutionId = Annotated[
    str, msgspec.Meta(min_length=1, max_length=128, pattern=r"^[A-Za-z0-9_.:-]+$")
]
Owner = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
Count = Annotated[int, msgspec.Meta(ge=0, lt=10**9)]
TtlS = Annotated[float, msgspec.Meta(gt=0, le=30 * 86_400)]
IntervalS = Annotated[float, msgspec.Meta(gt=0, le=86_400)]
ErrorText = Annotated[str, msgspec.Meta(max_length=2000)]
Token = Annotated[int, msgspec.Meta(ge=1)]


class RunBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`POST /batch/jobs/{job_id}/runs`: one report of a run (`execution_id` ties a start to
    its end; left out on `started`, one is made and answered)."""

    status: RunStatus
    execution_id: ExecutionId | None = None
    items_processed: Count | None = None
    items_total: Count | None = None
    error: ErrorText | None = None
    host: Owner | None = None
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

    owner: Owner
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
