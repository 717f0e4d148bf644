"""The batch service: the NATS adapter around the batch projection.

Queries answer from the projection with `now`; the two commands (force release, cleanup) read
the lock subject's last sequence, decide from the projection caught up to it, publish with
`Nats-Expected-Last-Subject-Sequence` (so they cannot race a new acquire) and wait until the
projection has folded what they stored. A background task raises `batch.job_failed` for
running executions whose heartbeats stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from nats.js.errors import NotFoundError as JsNotFoundError

from services.batch import queries, schemas
from services.batch.decide import expired_locks, release_event
from services.batch.events import job_id_problem, lock_subject
from services.batch.lockrule import LockState
from services.batch.locks import BATCH_STREAM, EXPECTED_LAST_SUBJECT_SEQ, is_wrong_last_sequence
from services.batch.projection import (
    BatchProjection,
    Execution,
    batch_projection,
    job_failed_alert,
    lock_expired_alert,
)
from services.batch.settings import BatchSettings
from shared import bus
from shared.errors import ConflictError, InvalidRequestError, UnavailableError
from shared.events import Event
from shared.runtime import Context, Endpoint, NoParams, ServiceDefinition

RELEASE_ATTEMPTS = 3
log = logging.getLogger("stockpilot.batch")


def _belongs(lock: LockState, execution: Execution) -> bool:
    """Whether `lock` is the one `execution` took (by fencing token, else execution id)."""
    if execution.fencing_token is not None:
        return lock.fencing_token == execution.fencing_token
    return lock.execution_id == execution.execution_id


async def _last_seq(ctx: Context, job_id: str) -> int:
    """The sequence of the last message on the job's lock subject (0 when none)."""
    try:
        msg = await ctx.js.get_last_msg(BATCH_STREAM, lock_subject(job_id), direct=True)
    except JsNotFoundError:
        return 0
    except Exception as exc:
        if type(exc).__module__.startswith("nats"):
            raise UnavailableError(f"could not read the lock of {job_id}: {exc}") from None
        raise
    return int(msg.seq or 0)


async def _publish_expecting(ctx: Context, job_id: str, event: Event, seq: int) -> int | None:
    """Store `event` on the lock subject if its last sequence is still `seq`; its sequence."""
    try:
        ack = await bus.publish_event(
            ctx.js, lock_subject(job_id), event, headers={EXPECTED_LAST_SUBJECT_SEQ: str(seq)}
        )
    except Exception as exc:
        if is_wrong_last_sequence(exc):
            return None
        if type(exc).__module__.startswith("nats"):
            raise UnavailableError(f"could not store the event in JetStream: {exc}") from None
        raise
    return int(ack.seq)


def _check(job_id: str) -> None:
    problem = job_id_problem(job_id)
    if problem is not None:
        raise InvalidRequestError(problem)


def build(settings: BatchSettings) -> ServiceDefinition:
    """The batch service for these settings."""
    batch: BatchProjection = batch_projection(settings.history_limit)
    interval = settings.heartbeat_interval_s

    async def recent(params: schemas.RecentParams, ctx: Context) -> schemas.RecentExecutions:
        return queries.recent(batch.view, params, ctx.now(), interval)

    async def stats(params: schemas.StatsParams, ctx: Context) -> schemas.BatchStats:
        return queries.stats(batch.view, params, ctx.now(), interval)

    async def lock_status(params: schemas.JobParams, ctx: Context) -> schemas.LockStatus:
        return queries.lock_status(batch.view, params.job_id, ctx.now())

    async def expired(_: NoParams, ctx: Context) -> schemas.ExpiredLocks:
        return queries.expired(batch.view, ctx.now())

    async def held(_: NoParams, ctx: Context) -> schemas.HeldLocks:
        return queries.held(batch.view, ctx.now())

    async def summary(_: NoParams, ctx: Context) -> schemas.BatchSummary:
        return queries.summary(batch.view, ctx.now(), interval)

    async def release(params: schemas.ReleaseParams, ctx: Context) -> schemas.ReleaseAnswer:
        _check(params.job_id)
        for _ in range(RELEASE_ATTEMPTS):
            seq = await _last_seq(ctx, params.job_id)
            await ctx.wait_applied(batch, seq)
            lock = batch.view.locks.get(params.job_id)
            if lock is None:
                return schemas.ReleaseAnswer(
                    job_id=params.job_id, released=False, previous_owner=None
                )
            event = release_event(
                lock, reason="forced", by=params.actor, now=ctx.now(), note=params.reason
            )
            stored = await _publish_expecting(ctx, params.job_id, event, seq)
            if stored is not None:
                await ctx.wait_applied(batch, stored)
                return schemas.ReleaseAnswer(
                    job_id=params.job_id,
                    released=True,
                    previous_owner=lock.owner,
                    fencing_token=lock.fencing_token,
                )
        raise ConflictError(
            f"the lock of {params.job_id} kept changing while it was being released; try again"
        )

    async def cleanup(params: schemas.CleanupParams, ctx: Context) -> schemas.CleanupAnswer:
        released: list[str] = []
        last_stored = 0
        for candidate in expired_locks(batch.view, ctx.now()):
            seq = await _last_seq(ctx, candidate.job_id)
            await ctx.wait_applied(batch, seq)
            lock = batch.view.locks.get(candidate.job_id)
            now = ctx.now()
            if lock is None or lock.expires_at > now:
                continue
            event = release_event(lock, reason="expired", by=params.actor, now=now)
            stored = await _publish_expecting(ctx, lock.job_id, event, seq)
            if stored is not None:
                released.append(lock.job_id)
                last_stored = max(last_stored, stored)
        if last_stored:
            await ctx.wait_applied(batch, last_stored)
        return schemas.CleanupAnswer(released=released, count=len(released))

    async def release_lost(ctx: Context, execution: Execution) -> None:
        """The lease: a lost run's lock is released (reason `lost`), fenced like every lock
        event, so the job's next run can start now rather than when the lock expires."""
        for _ in range(RELEASE_ATTEMPTS):
            seq = await _last_seq(ctx, execution.job_id)
            await ctx.wait_applied(batch, seq)
            lock = batch.view.locks.get(execution.job_id)
            if lock is None or not _belongs(lock, execution):
                return
            event = release_event(
                lock,
                reason="lost",
                by="batch",
                now=ctx.now(),
                note=f"execution {execution.execution_id} lost: its heartbeats stopped",
            )
            stored = await _publish_expecting(ctx, execution.job_id, event, seq)
            if stored is not None:
                await ctx.wait_applied(batch, stored)
                return

    async def watch_lost(ctx: Context) -> None:
        """Raise `batch.job_failed` once for each running execution that went silent and
        release its lock; raise `batch.lock_expired` once for each lock past its expiry."""
        raised: set[str] = set()
        while not ctx.stopping.is_set():
            alerts = []
            now = ctx.now()
            for execution, at in queries.lost_executions(batch.view, now, interval):
                lock = batch.view.locks.get(execution.job_id)
                if lock is not None and _belongs(lock, execution):
                    try:
                        await release_lost(ctx, execution)
                    except UnavailableError as exc:
                        log.warning("batch: could not release a lost run's lock: %s", exc)
                alert = job_failed_alert(execution, at, "was lost (its heartbeats stopped)")
                if alert.id not in raised:
                    alerts.append(alert)
                    raised.add(alert.id)
            for lock in expired_locks(batch.view, now):
                alert = lock_expired_alert(lock, lock.expires_at)
                if alert.id not in raised:
                    alerts.append(alert)
                    raised.add(alert.id)
            if alerts:
                await ctx.raise_alerts(alerts)
            if len(raised) > 100_000:
                raised.clear()  # the alert ledger still keeps them from repeating
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(ctx.stopping.wait(), settings.lost_check_interval_s)

    return ServiceDefinition(
        name="batch",
        projections=[batch],
        endpoints=[
            Endpoint("recent", schemas.RecentParams, recent),
            Endpoint("stats", schemas.StatsParams, stats),
            Endpoint("lock_status", schemas.JobParams, lock_status),
            Endpoint("expired_locks", NoParams, expired),
            Endpoint("locks", NoParams, held),
            Endpoint("summary", NoParams, summary),
            Endpoint("release", schemas.ReleaseParams, release, concurrent=True),
            Endpoint("cleanup", schemas.CleanupParams, cleanup, concurrent=True),
        ],
        background=[watch_lost],
        alert_source="batch",
        description="StockPilot batch executions and job locks",
    )
