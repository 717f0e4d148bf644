"""The /api/v1/batch routes: execution history and stats, job locks (contract §5).

A `job_id` is checked against `^[A-Za-z0-9_-]{1,64}$` here, before anything reaches NATS
(it becomes a subject token). Mutating routes need the admin token; their answers reflect
the new state because the batch service waits until its projection has folded the change.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Request, Response, Router, get, post
from litestar.openapi import ResponseSpec
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter
from litestar.status_codes import HTTP_200_OK, HTTP_202_ACCEPTED, HTTP_409_CONFLICT

from gateway.auth import admin_guard, ingest_guard, read_guard
from gateway.response_cache import CACHED
from gateway.services import Services
from services.batch.contract import (
    BatchStats,
    CleanupAnswer,
    CleanupParams,
    ExpiredLocks,
    HeldLocks,
    JobParams,
    JobsAnswer,
    LockAnswer,
    LockBody,
    LockParams,
    LockStatus,
    RecentExecutions,
    RecentParams,
    ReleaseAnswer,
    ReleaseParams,
    RunAnswer,
    RunBody,
    RunParams,
    StatsParams,
    job_id_problem,
)
from shared.errors import InvalidRequestError

# Commands may release several locks, each a JetStream round trip: more time than a query.
COMMAND_TIMEOUT_S = 10.0
ACTOR_HEADER = "x-stockpilot-actor"


class ReleaseBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Optional body of a force release: why (stored with the lock.released event)."""

    reason: Annotated[str, msgspec.Meta(max_length=500)] | None = None


def _job_id(job_id: str, where: str = "path parameter 'job_id'") -> str:
    problem = job_id_problem(job_id)
    if problem is not None:
        raise InvalidRequestError(f"{where}: {problem}")
    return job_id


def _actor(request: Request[Any, Any, Any]) -> str:
    named = request.headers.get(ACTOR_HEADER, "").strip()[:100]
    return f"admin:{named}" if named else "admin"


@get(
    "/batch/executions/recent",
    summary="The newest executions (of one job), newest first",
    guards=[read_guard],
    opt=CACHED,
)
async def recent_executions(
    services: Services,
    limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 50,
    job_id: FromQuery[str | None] = None,
) -> RecentExecutions:
    """`?limit=` 1–1000 (default 50), `?job_id=`."""
    if job_id is not None:
        _job_id(job_id, "query parameter 'job_id'")
    params = RecentParams(limit=limit, job_id=job_id)
    return await services.query("batch", "recent", RecentExecutions, params)


@get(
    "/batch/executions/stats",
    summary="Counts, success rate, durations and failure patterns over a window",
    guards=[read_guard],
    opt=CACHED,
)
async def execution_stats(
    services: Services,
    hours: Annotated[float, QueryParameter(gt=0, le=24 * 400)] = 24.0,
    job_id: FromQuery[str | None] = None,
) -> BatchStats:
    """Executions started in the last `?hours=` (default 24), of `?job_id=` if given."""
    if job_id is not None:
        _job_id(job_id, "query parameter 'job_id'")
    params = StatsParams(hours=hours, job_id=job_id)
    return await services.query("batch", "stats", BatchStats, params)


@get(
    "/batch/jobs/{job_id:str}/lock/status",
    summary="One job's lock",
    guards=[read_guard],
    opt=CACHED,
)
async def lock_status(services: Services, job_id: FromPath[str]) -> LockStatus:
    """Held or not, by whom, until when, expired or not, its fencing token."""
    params = JobParams(job_id=_job_id(job_id))
    return await services.query("batch", "lock_status", LockStatus, params)


@post(
    "/batch/jobs/{job_id:str}/lock/release",
    summary="Force-release a job's lock (admin)",
    guards=[admin_guard],
    status_code=HTTP_200_OK,
)
async def release_lock(
    request: Request[Any, Any, Any],
    services: Services,
    job_id: FromPath[str],
    data: JSONBody[ReleaseBody | None] = None,
) -> ReleaseAnswer:
    """Stores lock.released (reason `forced`); `released` is false when nothing was held."""
    params = ReleaseParams(
        job_id=_job_id(job_id),
        actor=_actor(request),
        reason=data.reason if data is not None else None,
    )
    return await services.query(
        "batch", "release", ReleaseAnswer, params, timeout=COMMAND_TIMEOUT_S
    )


@get(
    "/batch/locks/expired",
    summary="Locks held past their lifetime",
    guards=[read_guard],
    opt=CACHED,
)
async def expired_locks(services: Services) -> ExpiredLocks:
    """Every lock whose `expires_at` has passed and that nobody released yet."""
    return await services.query("batch", "expired_locks", ExpiredLocks)


@get(
    "/batch/locks",
    summary="Every lock not released yet (live or expired)",
    guards=[read_guard],
    opt=CACHED,
)
async def held_locks(services: Services) -> HeldLocks:
    """Beyond the contract: all held locks in one answer (the dashboard's lock panel)."""
    return await services.query("batch", "locks", HeldLocks)


@post(
    "/batch/locks/cleanup",
    summary="Release every expired lock (admin)",
    guards=[admin_guard],
    status_code=HTTP_200_OK,
)
async def cleanup_locks(request: Request[Any, Any, Any], services: Services) -> CleanupAnswer:
    """Stores lock.released (reason `expired`) for each expired lock and alerts once per lock."""
    params = CleanupParams(actor=_actor(request))
    return await services.query(
        "batch", "cleanup", CleanupAnswer, params, timeout=COMMAND_TIMEOUT_S
    )


@get(
    "/batch/jobs",
    summary="Every job: its schedule, state (new|up|running|late|missed|failing), next start",
    guards=[read_guard],
    opt=CACHED,
)
async def list_jobs(services: Services) -> JobsAnswer:
    """Scheduled jobs (STOCKPILOT_JOB_SCHEDULES) and every job in the history."""
    return await services.query("batch", "jobs", JobsAnswer)


# ----- runs and locks over HTTP, for jobs in any language (ingest token; contract §5) ------


@post(
    "/batch/jobs/{job_id:str}/runs",
    summary="Report a run (started, succeeded, failed, cancelled, skipped) over HTTP",
    guards=[ingest_guard],
    status_code=HTTP_202_ACCEPTED,
)
async def report_run(
    services: Services, job_id: FromPath[str], data: JSONBody[RunBody]
) -> RunAnswer:
    """Stored as the run events a Python worker stores; answers the `execution_id` to send
    with the run's end. An end without a start records both."""
    params = RunParams(job_id=_job_id(job_id), **msgspec.structs.asdict(data))
    return await services.query("batch", "report_run", RunAnswer, params, timeout=COMMAND_TIMEOUT_S)


async def _lock_command(
    services: Services, endpoint: str, job_id: str, data: LockBody
) -> Response[LockAnswer]:
    params = LockParams(job_id=_job_id(job_id), **msgspec.structs.asdict(data))
    answer = await services.query("batch", endpoint, LockAnswer, params, timeout=COMMAND_TIMEOUT_S)
    status = HTTP_200_OK if answer.ok else HTTP_409_CONFLICT
    return Response(msgspec.structs.replace(answer, status_code=status), status_code=status)


# A refused lock command answers the same shape (documented, so clients and schemathesis know).
REFUSED = {
    HTTP_409_CONFLICT: ResponseSpec(
        data_container=LockAnswer,
        description="Refused: `detail` says why, `holder` names who holds the lock",
    )
}


@post(
    "/batch/jobs/{job_id:str}/lock/acquire",
    summary="Take a job's lock (200 with fencing_token, or 409 naming the holder)",
    guards=[ingest_guard],
    status_code=HTTP_200_OK,
    responses=REFUSED,
)
async def acquire_job_lock(
    services: Services, job_id: FromPath[str], data: JSONBody[LockBody]
) -> Response[LockAnswer]:
    """Body `{"owner", "ttl_s"?}`; never waits: a held lock answers 409 with the holder."""
    return await _lock_command(services, "lock_acquire", job_id, data)


@post(
    "/batch/jobs/{job_id:str}/lock/renew",
    summary="Extend the caller's lock (200 with the new expires_at, or 409)",
    guards=[ingest_guard],
    status_code=HTTP_200_OK,
    responses=REFUSED,
)
async def renew_job_lock(
    services: Services, job_id: FromPath[str], data: JSONBody[LockBody]
) -> Response[LockAnswer]:
    """Body `{"owner", "fencing_token", "ttl_s"?}`: 409 once the lock is no longer theirs."""
    return await _lock_command(services, "lock_renew", job_id, data)


@post(
    "/batch/jobs/{job_id:str}/lock/release-mine",
    summary="Give back the caller's lock (200, or 409 when it is not theirs)",
    guards=[ingest_guard],
    status_code=HTTP_200_OK,
    responses=REFUSED,
)
async def release_my_job_lock(
    services: Services, job_id: FromPath[str], data: JSONBody[LockBody]
) -> Response[LockAnswer]:
    """Body `{"owner", "fencing_token"}`."""
    return await _lock_command(services, "lock_release_mine", job_id, data)


router = Router(
    path="/api/v1",
    route_handlers=[
        recent_executions,
        execution_stats,
        lock_status,
        release_lock,
        expired_locks,
        held_locks,
        cleanup_locks,
        list_jobs,
        report_run,
        acquire_job_lock,
        renew_job_lock,
        release_my_job_lock,
    ],
)
