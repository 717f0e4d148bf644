"""Pure queries over the batch view, answering in the shapes of `schemas` (contract §5).

Why one module of over 300 lines: it holds every read of the batch view (executions, stats,
failure patterns, locks, jobs, the summary), and they share the one time-dependent rule of
what is lost or expired at `now`; split, that rule would be imported from elsewhere by each.

Time-dependent answers take `now`: a running execution with no heartbeat for three intervals
is `lost`, a lock past its `expires_at` is expired. Nothing here changes the view.
"""

from __future__ import annotations

import math
import re
from datetime import datetime, timedelta

import msgspec

from services.batch.contract import (
    BatchStats,
    BatchSummary,
    ExecutionOut,
    ExecutionStatus,
    ExpiredLock,
    ExpiredLocks,
    FailingJob,
    FailurePattern,
    HeldLocks,
    JobOut,
    JobsAnswer,
    JobStats,
    LockStatus,
    MissedJob,
    RecentExecutions,
    RecentParams,
    StatsParams,
)
from services.batch.decide import expired_locks
from services.batch.projection import (
    BatchView,
    Execution,
    LockState,
    lost_at,
)
from services.batch.schedule import judge

MAX_PATTERNS = 20


# ----- queries ----------------------------------------------------------------------------


def status_at(execution: Execution, now: datetime, default_interval_s: float) -> ExecutionStatus:
    """The execution's status at `now` (a silent running one is `lost`)."""
    deadline = lost_at(execution, default_interval_s)
    if deadline is not None and now > deadline:
        return "lost"
    return execution.status


def execution_out(execution: Execution, now: datetime, default_interval_s: float) -> ExecutionOut:
    """The API shape of one execution at `now`."""
    return ExecutionOut(
        execution_id=execution.execution_id,
        job_id=execution.job_id,
        status=status_at(execution, now, default_interval_s),
        started_at=execution.started_at,
        finished_at=execution.finished_at,
        duration_s=execution.duration_s,
        items_processed=execution.items_processed,
        items_total=execution.items_total,
        progress_pct=execution.progress_pct,
        throughput_per_s=execution.throughput_per_s,
        peak_memory_mb=execution.peak_memory_mb,
        avg_cpu_percent=execution.avg_cpu_percent,
        warnings=list(execution.warnings),
        error=execution.error,
        traceback=execution.traceback,
        host=execution.host,
        pid=execution.pid,
        fencing_token=execution.fencing_token,
        last_heartbeat_at=execution.last_heartbeat_at,
        heartbeat_interval_s=execution.heartbeat_interval_s,
    )


def recent(
    view: BatchView, params: RecentParams, now: datetime, default_interval_s: float
) -> RecentExecutions:
    """The newest `limit` executions (of `job_id` if given), newest first."""
    matching = [
        e for e in view.executions.values() if params.job_id is None or e.job_id == params.job_id
    ]
    newest = matching[::-1][: params.limit]
    return RecentExecutions(
        executions=fit_answer([execution_out(e, now, default_interval_s) for e in newest]),
        total=len(matching),
    )


# An answer is one NATS message (1 MiB by default). A thousand executions that each carry
# the longest error, warnings and traceback the projection keeps are ~16 MB: past this budget
# the older executions lose their traceback and warnings (their error cut short), and if that
# is not enough, the oldest are left out (`total` still counts them).
ANSWER_BUDGET_BYTES = 768 * 1024
SHORT_ERROR_CHARS = 200
_encode = msgspec.json.Encoder().encode


def fit_answer(executions: list[ExecutionOut]) -> list[ExecutionOut]:
    """`executions` (newest first), shortened as little as needed to fit the budget."""
    sizes = [len(_encode(e)) for e in executions]
    total = sum(sizes)
    if total <= ANSWER_BUDGET_BYTES:
        return executions
    for i in reversed(range(len(executions))):
        if total <= ANSWER_BUDGET_BYTES:
            break
        execution = executions[i]
        executions[i] = msgspec.structs.replace(
            execution,
            traceback=None,
            warnings=[],
            error=execution.error[:SHORT_ERROR_CHARS] if execution.error else None,
            host=execution.host[:64],
        )
        size = len(_encode(executions[i]))
        total += size - sizes[i]
        sizes[i] = size
    while total > ANSWER_BUDGET_BYTES and len(executions) > 1:
        total -= sizes.pop()
        executions.pop()
    return executions


def p95(values: list[float]) -> float | None:
    """The nearest-rank 95th percentile."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def _mean(values: list[float]) -> float | None:
    return round(sum(values) / len(values), 3) if values else None


_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
_PATH = re.compile(r"(?:\b[A-Za-z]:)?(?:[/\\][^\s/\\:'\",;()\[\]{}<>]+)+[/\\]?")
_DECIMAL = re.compile(r"\b\d+\.\d+\b")
# Each run of word characters once, then a look for a digit inside it: the same result as
# `[A-Za-z0-9_-]*\d[A-Za-z0-9_-]*`, whose backtracking took quadratic time on a long run
# without a digit (1,000 such errors kept the stats endpoint busy for minutes).
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")
_DIGIT = re.compile(r"\d")


def _token(match: re.Match[str]) -> str:
    token = match.group()
    if _DIGIT.search(token) is None:
        return token
    return "<n>" if token.isdigit() else "<id>"


def error_pattern(error: str) -> str:
    """The error's first line with numbers, ids and paths replaced by placeholders."""
    # The pattern keeps 300 characters; what lies past 1,000 of the first line cannot reach
    # them unless placeholders shorten it a lot, and scanning it costs the stats answer time.
    text = (error.strip().splitlines() or [""])[0][:1000]
    text = _UUID.sub("<id>", text)
    text = _PATH.sub("<path>", text)
    text = _DECIMAL.sub("<n>", text)
    text = _TOKEN.sub(_token, text)
    return text[:300]


def failure_patterns(
    executions: list[tuple[Execution, ExecutionStatus]],
) -> list[FailurePattern]:
    """Failed and lost executions grouped by error pattern, most frequent first."""
    groups: dict[str, FailurePattern] = {}
    for execution, status in executions:
        if status == "failed":
            error = execution.error or "failed without an error message"
            seen = execution.finished_at or execution.started_at
        elif status == "lost":
            error = "execution lost: heartbeats stopped"
            seen = execution.last_heartbeat_at or execution.started_at
        else:
            continue
        key = error_pattern(error)
        group = groups.get(key)
        if group is None:
            groups[key] = FailurePattern(
                error=key, count=1, last_seen=seen, example=error[:500], job_ids=[execution.job_id]
            )
            continue
        group.count += 1
        if seen >= group.last_seen:
            group.last_seen = seen
            group.example = error[:500]
        if execution.job_id not in group.job_ids and len(group.job_ids) < 20:
            group.job_ids.append(execution.job_id)
    ordered = sorted(groups.values(), key=lambda g: (-g.count, -g.last_seen.timestamp(), g.error))
    return ordered[:MAX_PATTERNS]


def _job_stats(executions: list[tuple[Execution, ExecutionStatus]]) -> JobStats:
    counts = dict.fromkeys(("running", "succeeded", "failed", "cancelled", "lost", "skipped"), 0)
    for _, status in executions:
        counts[status] += 1
    # A skipped run never started: it counts, but not as finished, and has no duration.
    finished = len(executions) - counts["running"] - counts["skipped"]
    durations = [
        e.duration_s
        for e, s in executions
        if e.duration_s is not None and s not in ("lost", "skipped")
    ]
    throughputs = [e.throughput_per_s for e, _ in executions if e.throughput_per_s is not None]
    memory = [e.peak_memory_mb for e, _ in executions if e.peak_memory_mb is not None]
    cpu = [e.avg_cpu_percent for e, _ in executions if e.avg_cpu_percent is not None]
    last = executions[-1] if executions else None
    return JobStats(
        total=len(executions),
        succeeded=counts["succeeded"],
        failed=counts["failed"],
        cancelled=counts["cancelled"],
        lost=counts["lost"],
        running=counts["running"],
        success_rate=round(counts["succeeded"] * 100.0 / finished, 2) if finished else None,
        avg_duration_s=_mean(durations),
        p95_duration_s=p95(durations),
        avg_throughput_per_s=_mean(throughputs),
        peak_memory_mb=max(memory) if memory else None,
        avg_cpu_percent=_mean(cpu),
        last_started_at=last[0].started_at if last else None,
        last_status=last[1] if last else None,
        skipped=counts["skipped"],
    )


def stats(
    view: BatchView, params: StatsParams, now: datetime, default_interval_s: float
) -> BatchStats:
    """Counts, rates, durations and failure patterns of executions started in the window."""
    since = now - timedelta(hours=params.hours)
    selected = [
        (e, status_at(e, now, default_interval_s))
        for e in view.executions.values()
        if e.started_at >= since and (params.job_id is None or e.job_id == params.job_id)
    ]
    by_job: dict[str, list[tuple[Execution, ExecutionStatus]]] = {}
    for pair in selected:
        by_job.setdefault(pair[0].job_id, []).append(pair)
    overall = _job_stats(selected)
    return BatchStats(
        **msgspec.structs.asdict(overall),
        hours=params.hours,
        since=since,
        by_job={job: _job_stats(pairs) for job, pairs in sorted(by_job.items())},
        failure_patterns=failure_patterns(selected),
    )


def lock_status(view: BatchView, job_id: str, now: datetime) -> LockStatus:
    """One job's lock at `now`."""
    lock = view.locks.get(job_id)
    if lock is None:
        return LockStatus(
            job_id=job_id,
            locked=False,
            owner=None,
            acquired_at=None,
            expires_at=None,
            expired=False,
            fencing_token=None,
            execution_id=None,
        )
    return _status_of(lock, now)


def _status_of(lock: LockState, now: datetime) -> LockStatus:
    expired = lock.expires_at <= now
    return LockStatus(
        job_id=lock.job_id,
        locked=not expired,
        owner=lock.owner,
        acquired_at=lock.acquired_at,
        expires_at=lock.expires_at,
        expired=expired,
        fencing_token=lock.fencing_token,
        execution_id=lock.execution_id,
        ignored_acquires=lock.ignored_acquires,
    )


def expired(view: BatchView, now: datetime) -> ExpiredLocks:
    """Every lock held past its lifetime at `now`."""
    locks = [_status_of(lock, now) for lock in expired_locks(view, now)]
    return ExpiredLocks(locks=locks, total=len(locks))


def held(view: BatchView, now: datetime) -> HeldLocks:
    """Every lock not released yet at `now` (expired ones included, flagged)."""
    locks = [_status_of(view.locks[job_id], now) for job_id in sorted(view.locks)]
    return HeldLocks(locks=locks, total=len(locks))


def lost_executions(
    view: BatchView, now: datetime, default_interval_s: float
) -> list[tuple[Execution, datetime]]:
    """Running executions that went silent, with the moment they counted as lost."""
    found = []
    for execution in view.executions.values():
        deadline = lost_at(execution, default_interval_s)
        if deadline is not None and now > deadline:
            found.append((execution, deadline))
    return found


def summary(view: BatchView, now: datetime, default_interval_s: float) -> BatchSummary:
    """Running executions, failed (or lost) ones started in the last 24 h, expired locks."""
    since = now - timedelta(hours=24)
    running = failed = 0
    # Per job, the latest run that ended in success or failure (oldest first, so later wins):
    # a failure stays a problem until a later run of the same job succeeds.
    verdicts: dict[str, FailingJob | None] = {}
    for execution in view.executions.values():
        status = status_at(execution, now, default_interval_s)
        if status == "running":
            running += 1
        elif status in ("failed", "lost") and execution.started_at >= since:
            failed += 1
        if status == "succeeded":
            verdicts[execution.job_id] = None
        elif status == "failed" or status == "lost":
            verdicts[execution.job_id] = FailingJob(
                job_id=execution.job_id,
                status=status,
                execution_id=execution.execution_id,
                at=(execution.finished_at or execution.last_heartbeat_at or execution.started_at),
                error=(execution.error[:300] if execution.error else None),
            )
    stale = expired_locks(view, now)
    return BatchSummary(
        running=running,
        failed_24h=failed,
        expired_locks=len(stale),
        failing_jobs=[job for _, job in sorted(verdicts.items()) if job is not None],
        expired=[
            ExpiredLock(job_id=lock.job_id, owner=lock.owner, expires_at=lock.expires_at)
            for lock in stale
        ],
        missed_jobs=missed_jobs(view, now, default_interval_s),
    )


def missed_jobs(view: BatchView, now: datetime, default_interval_s: float) -> list[MissedJob]:
    """Scheduled jobs whose expected start + grace has passed without a run."""
    found = []
    for job_id in sorted(view.schedules):
        job, missed = job_out(view, job_id, now, default_interval_s)
        if job.state == "missed" and job.next_expected_at is not None:
            found.append(
                MissedJob(job_id=job_id, expected_at=job.next_expected_at, missed_slots=len(missed))
            )
    return found


def jobs(view: BatchView, now: datetime, default_interval_s: float) -> JobsAnswer:
    """Every scheduled job and every job in the history, with its state at `now`."""
    out: list[JobOut] = []
    for job_id in sorted(set(view.schedules) | set(view.job_runs)):
        out.append(job_out(view, job_id, now, default_interval_s)[0])
    return JobsAnswer(jobs=out, total=len(out))


def job_out(
    view: BatchView, job_id: str, now: datetime, default_interval_s: float
) -> tuple[JobOut, list[datetime]]:
    """One job at `now`, and its missed slots (newest last)."""
    state = view.schedules.get(job_id)
    runs = [view.executions[e] for e in view.job_runs.get(job_id, []) if e in view.executions]
    runs.sort(key=lambda e: (e.started_at, e.started_seq))
    last = runs[-1] if runs else None
    last_status = status_at(last, now, default_interval_s) if last is not None else None
    finished = None
    for execution in reversed(runs):
        status = status_at(execution, now, default_interval_s)
        if status not in ("running", "skipped"):
            finished = status
            break
    verdict, expected, upcoming, missed = judge(
        state.schedule if state is not None else None,
        state.since if state is not None else None,
        last.started_at if last is not None else None,
        last_status,
        finished,
        now,
    )
    return (
        JobOut(
            job_id=job_id,
            schedule=state.schedule if state is not None else None,
            state=verdict,
            last_execution=(
                execution_out(last, now, default_interval_s) if last is not None else None
            ),
            next_expected_at=expected,
            next_slot_at=upcoming,
            missed_slots=len(missed),
        ),
        missed,
    )
