"""The batch service: the NATS adapter around the batch projection.

Why one module of over 300 lines: it is the service's one NATS adapter, `build` and the
endpoints it closes over; its lock commands (forced release, cleanup, the lease on lost runs,
the HTTP acquire, renew and release) share the same steps: read the lock subject's last
sequence, publish expecting it, wait until the fold has caught up.

Queries answer from the projection with `now`; the two commands (force release, cleanup) read
the lock subject's last sequence, decide from the projection caught up to it, publish with
`Nats-Expected-Last-Subject-Sequence` (so they cannot race a new acquire) and wait until the
projection has folded what they stored. A background task raises `batch.job_failed` for
running executions whose heartbeats stopped.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from datetime import datetime

import msgspec
from nats.js.errors import NotFoundError as JsNotFoundError

from services.batch import contract, queries
from services.batch.contract import (
    JobScheduled,
    job_id_problem,
    lock_subject,
    run_subject,
    schedule_subject,
)
from services.batch.decide import expired_locks, release_event, run_report_events
from services.batch.errors import LockHeldError, LockLostError, LockStateError
from services.batch.lockrule import LockRead, LockState
from services.batch.locks import (
    BATCH_STREAM,
    EXPECTED_LAST_SUBJECT_SEQ,
    HeldLock,
    acquire_lock,
    read_lock_state,
    release_lock,
    renew_lock,
)
from services.batch.projection import (
    BatchProjection,
    Execution,
    batch_projection,
    job_failed_alert,
    job_missed_alert,
    lock_expired_alert,
)
from services.batch.schedule import MAX_MISSED_ALERTS
from services.batch.settings import BatchSettings
from shared.endpoints import Endpoint, NoParams
from shared.errors import ConflictError, InvalidRequestError, UnavailableError
from shared.events import Alert, Event
from shared.nats_errors import is_nats_error, is_wrong_last_sequence, translate
from shared.publish import publish_event
from shared.runtime import Context, ServiceDefinition

RELEASE_ATTEMPTS = 3
log = logging.getLogger("stockpilot.batch")


async def _read_state(ctx: Context, job_id: str) -> LockRead:
    try:
        return await read_lock_state(ctx.js, job_id)
    except LockStateError as exc:
        raise UnavailableError(exc.detail) from None


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
        if is_nats_error(exc):
            raise translate(exc, f"could not read the lock of {job_id}") from None
        raise
    return int(msg.seq or 0)


async def _publish_expecting(ctx: Context, job_id: str, event: Event, seq: int) -> int | None:
    """Store `event` on the lock subject if its last sequence is still `seq`; its sequence."""
    try:
        ack = await publish_event(
            ctx.js, lock_subject(job_id), event, headers={EXPECTED_LAST_SUBJECT_SEQ: str(seq)}
        )
    except Exception as exc:
        if is_wrong_last_sequence(exc):
            return None
        if is_nats_error(exc):
            raise translate(exc, "could not store the event in JetStream") from None
        raise
    return int(ack.seq)


def _check(job_id: str) -> None:
    problem = job_id_problem(job_id)
    if problem is not None:
        raise InvalidRequestError(problem)


# What the fold depends on (see fold_config/fold_policy): reported by `digest` for replay.
FOLD_SETTINGS = ("history_limit",)


def build(settings: BatchSettings) -> ServiceDefinition:
    """The batch service for these settings."""
    batch: BatchProjection = batch_projection(settings.history_limit)
    interval = settings.heartbeat_interval_s

    async def recent(params: contract.RecentParams, ctx: Context) -> contract.RecentExecutions:
        return queries.recent(batch.view, params, ctx.now(), interval)

    async def stats(params: contract.StatsParams, ctx: Context) -> contract.BatchStats:
        return queries.stats(batch.view, params, ctx.now(), interval)

    async def lock_status(params: contract.JobParams, ctx: Context) -> contract.LockStatus:
        return queries.lock_status(batch.view, params.job_id, ctx.now())

    async def expired(_: NoParams, ctx: Context) -> contract.ExpiredLocks:
        return queries.expired(batch.view, ctx.now())

    async def held(_: NoParams, ctx: Context) -> contract.HeldLocks:
        return queries.held(batch.view, ctx.now())

    async def jobs(_: NoParams, ctx: Context) -> contract.JobsAnswer:
        return queries.jobs(batch.view, ctx.now(), interval)

    async def summary(_: NoParams, ctx: Context) -> contract.BatchSummary:
        return queries.summary(batch.view, ctx.now(), interval)

    async def release(params: contract.ReleaseParams, ctx: Context) -> contract.ReleaseAnswer:
        _check(params.job_id)
        for _ in range(RELEASE_ATTEMPTS):
            seq = await _last_seq(ctx, params.job_id)
            await ctx.wait_applied(batch, seq)
            lock = batch.view.locks.get(params.job_id)
            if lock is None:
                return contract.ReleaseAnswer(
                    job_id=params.job_id, released=False, previous_owner=None
                )
            event = release_event(
                lock, reason="forced", by=params.actor, now=ctx.now(), note=params.reason
            )
            stored = await _publish_expecting(ctx, params.job_id, event, seq)
            if stored is not None:
                await ctx.wait_applied(batch, stored)
                return contract.ReleaseAnswer(
                    job_id=params.job_id,
                    released=True,
                    previous_owner=lock.owner,
                    fencing_token=lock.fencing_token,
                )
        raise ConflictError(
            f"the lock of {params.job_id} kept changing while it was being released; try again"
        )

    async def cleanup(params: contract.CleanupParams, ctx: Context) -> contract.CleanupAnswer:
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
        return contract.CleanupAnswer(released=released, count=len(released))

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

    async def store_schedules(ctx: Context) -> None:
        """Store STOCKPILOT_JOB_SCHEDULES as batch.job_scheduled events where it differs from
        the schedules in the stream (a schedule change is an event; replay judges the same)."""
        stored = 0
        wanted = settings.job_schedules
        for job_id in sorted(set(wanted) | set(batch.view.schedules)):
            current = batch.view.schedules.get(job_id)
            spec = wanted.get(job_id)
            if spec is not None and current is not None and current.schedule == spec:
                continue
            if spec is None and current is None:
                continue
            digest = hashlib.sha256(msgspec.json.encode(spec)).hexdigest()[:16]
            event = JobScheduled(
                id=f"schedule.{job_id}.{batch.view.last_seq}.{digest}",
                occurred_at=ctx.now(),
                job_id=job_id,
                cron=spec.cron if spec is not None else None,
                every_s=spec.every_s if spec is not None else None,
                grace_s=spec.grace_s if spec is not None else 0.0,
                tz=spec.tz if spec is not None else "UTC",
                removed=spec is None,
            )
            ack = await ctx.publish(schedule_subject(job_id), event)
            stored = max(stored, int(ack.seq))
        if stored:
            await ctx.wait_applied(batch, stored)

    def missed_alerts(now: datetime) -> list[Alert]:
        alerts = []
        for job_id, state in batch.view.schedules.items():
            _, missed = queries.job_out(batch.view, job_id, now, interval)
            for slot in missed[-MAX_MISSED_ALERTS:]:
                alerts.append(job_missed_alert(job_id, slot, state.schedule.grace_s))
        return alerts

    async def watch_lost(ctx: Context) -> None:
        """Raise `batch.job_failed` once for each running execution that went silent and
        release its lock; raise `batch.lock_expired` once for each lock past its expiry and
        `batch.job_missed` once for each missed slot of a scheduled job."""
        await store_schedules(ctx)
        raised: set[str] = set()
        while not ctx.stopping.is_set():
            alerts = []
            now = ctx.now()
            for alert in missed_alerts(now):
                if alert.id not in raised:
                    alerts.append(alert)
                    raised.add(alert.id)
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

    async def report_run(params: contract.RunParams, ctx: Context) -> contract.RunAnswer:
        """A run reported over HTTP: stored as the run events a Python worker stores."""
        _check(params.job_id)
        execution_id = params.execution_id or uuid.uuid4().hex
        now = ctx.now()
        existing = batch.view.executions.get(execution_id)
        holder = batch.view.locks.get(params.job_id)
        events = run_report_events(params, execution_id, existing, now, holder)
        last = 0
        for event in events:
            ack = await ctx.publish(run_subject(params.job_id), event)
            last = max(last, int(ack.seq))
        if last:
            await ctx.wait_applied(batch, last)
        return contract.RunAnswer(
            job_id=params.job_id, execution_id=execution_id, status=params.status
        )

    def _holder(held: LockState | None) -> contract.LockHolder | None:
        if held is None:
            return None
        return contract.LockHolder(
            owner=held.owner, fencing_token=held.fencing_token, expires_at=held.expires_at
        )

    async def _refused(
        ctx: Context, params: contract.LockParams, detail: str
    ) -> contract.LockAnswer:
        read = await _read_state(ctx, params.job_id)
        live = read.held if read.held is not None and read.held.expires_at > ctx.now() else None
        return contract.LockAnswer(
            job_id=params.job_id, ok=False, owner=params.owner, holder=_holder(live), detail=detail
        )

    async def _settled(ctx: Context, job_id: str) -> None:
        # Read-your-writes: the next lock/status answers what was just stored.
        await ctx.wait_applied(batch, await _last_seq(ctx, job_id))

    async def lock_acquire(params: contract.LockParams, ctx: Context) -> contract.LockAnswer:
        """Take a job's lock for `owner` (HTTP); refused (ok false) while someone holds it."""
        _check(params.job_id)
        try:
            held = await acquire_lock(
                ctx.js,
                params.job_id,
                owner=params.owner,
                execution_id=f"http-{uuid.uuid4().hex}",
                ttl_s=params.ttl_s or settings.lock_ttl_s,
                clock=ctx.clock,
            )
        except LockHeldError as exc:
            return await _refused(ctx, params, exc.detail)
        except LockStateError as exc:
            raise UnavailableError(exc.detail) from None
        await _settled(ctx, params.job_id)
        return _granted(params, held)

    def _granted(params: contract.LockParams, lock: HeldLock) -> contract.LockAnswer:
        return contract.LockAnswer(
            job_id=params.job_id,
            ok=True,
            owner=params.owner,
            fencing_token=lock.fencing_token,
            expires_at=lock.expires_at,
        )

    def _mine(params: contract.LockParams, ctx: Context) -> HeldLock:
        if params.fencing_token is None:
            raise InvalidRequestError(
                "fencing_token is required: send the one lock/acquire answered"
            )
        return HeldLock(
            job_id=params.job_id,
            owner=params.owner,
            execution_id="",
            fencing_token=params.fencing_token,
            acquired_at=ctx.now(),  # unused by renew and release: they fold the subject
            expires_at=ctx.now(),
        )

    async def lock_renew(params: contract.LockParams, ctx: Context) -> contract.LockAnswer:
        """Extend the caller's lock (named by owner and fencing token) to now + ttl_s."""
        _check(params.job_id)
        mine = _mine(params, ctx)
        try:
            renewed = await renew_lock(
                ctx.js, mine, ttl_s=params.ttl_s or settings.lock_ttl_s, clock=ctx.clock
            )
        except LockLostError as exc:
            return await _refused(ctx, params, exc.detail)
        except LockStateError as exc:
            raise UnavailableError(exc.detail) from None
        await _settled(ctx, params.job_id)
        return _granted(params, renewed)

    async def lock_release_mine(params: contract.LockParams, ctx: Context) -> contract.LockAnswer:
        """Give back the caller's lock; refused when it is not (or no longer) theirs."""
        _check(params.job_id)
        mine = _mine(params, ctx)
        try:
            released = await release_lock(ctx.js, mine, clock=ctx.clock)
        except LockStateError as exc:
            raise UnavailableError(exc.detail) from None
        if not released:
            return await _refused(
                ctx,
                params,
                f"{params.owner} does not hold the lock of {params.job_id} with fencing token "
                f"{params.fencing_token}",
            )
        await _settled(ctx, params.job_id)
        return contract.LockAnswer(
            job_id=params.job_id,
            ok=True,
            owner=params.owner,
            fencing_token=params.fencing_token,
            released=True,
        )

    return ServiceDefinition(
        name="batch",
        fold_settings=FOLD_SETTINGS,
        projections=[batch],
        endpoints=[
            Endpoint("recent", contract.RecentParams, recent),
            Endpoint("stats", contract.StatsParams, stats),
            Endpoint("lock_status", contract.JobParams, lock_status),
            Endpoint("expired_locks", NoParams, expired),
            Endpoint("locks", NoParams, held),
            Endpoint("summary", NoParams, summary),
            Endpoint("jobs", NoParams, jobs),
            Endpoint("release", contract.ReleaseParams, release, concurrent=True),
            Endpoint("cleanup", contract.CleanupParams, cleanup, concurrent=True),
            Endpoint("report_run", contract.RunParams, report_run, concurrent=True),
            Endpoint("lock_acquire", contract.LockParams, lock_acquire, concurrent=True),
            Endpoint("lock_renew", contract.LockParams, lock_renew, concurrent=True),
            Endpoint("lock_release_mine", contract.LockParams, lock_release_mine, concurrent=True),
        ],
        background=[watch_lost],
        alert_source="batch",
        description="StockPilot batch executions and job locks",
    )
