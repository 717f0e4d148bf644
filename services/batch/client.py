"""The worker-side client: run a batch job under its lock and record the execution.

```python
async with batch_job(nc, "daily-price-sync", items_total=len(tickers)) as run:
    for chunk in chunks(tickers):
        await sync(chunk)
        run.advance(len(chunk))      # raises LockLostError once the lock is gone
```

- Entering takes the job lock (ShedLock semantics): `lock.acquired` is published with
  `Nats-Expected-Last-Subject-Sequence` = the lock subject's last sequence, and only while the
  lock is free or expired, so of any number of racing workers exactly one wins. The others get
  `LockHeldError` naming the holder at once; nobody waits. The stored event's stream sequence
  is the fencing token (`run.fencing_token`): pass it to anything that must reject a stale
  holder's writes.
- While the body runs, a heartbeat task samples the process (RSS, CPU %) with psutil and
  publishes `batch.progress` every `heartbeat_interval_s`, then reads the lock subject. If
  the lock was force-released, cleaned up, taken over or has expired, `run.lock_lost` becomes
  True (`run.lock_lost_reason` says why) and the next `run.advance()` raises `LockLostError`.
- Leaving publishes `batch.finished`: `succeeded`; `failed` with the error and a short
  traceback; `cancelled` on CancelledError/KeyboardInterrupt (re-raised). Then the lock is
  released (reason `released`). A run that lost its lock does not release it, is recorded as
  failed and raises `LockLostError` at exit even when its body finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import traceback
import uuid
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType

import msgspec
import psutil
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import BadRequestError
from nats.js.errors import NotFoundError as JsNotFoundError

from services.batch.decide import decide_acquire, release_event_id, why_lost
from services.batch.errors import InvalidJobIdError, LockHeldError, LockLostError, LockStateError
from services.batch.events import (
    BatchFinished,
    BatchProgress,
    BatchStarted,
    FinishedStatus,
    LockAcquired,
    LockEvent,
    LockReleased,
    ReleaseReason,
    decode_lock_event,
    job_id_problem,
    lock_subject,
    run_subject,
)
from services.batch.settings import BatchSettings
from shared import bus
from shared.events import utc_now

log = logging.getLogger("stockpilot.batch.client")

EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
_WRONG_LAST_SEQUENCE = 10071
BATCH_STREAM = bus.STREAMS["batch"].name
MAX_WARNINGS = 20
TRACEBACK_FRAMES = 5


def _check_job_id(job_id: str) -> None:
    problem = job_id_problem(job_id)
    if problem is not None:
        raise InvalidJobIdError(problem)


@dataclass(frozen=True)
class HeldLock:
    """A lock this process took: `fencing_token` is the stream sequence of its lock.acquired."""

    job_id: str
    owner: str
    execution_id: str
    fencing_token: int
    acquired_at: datetime
    expires_at: datetime


async def read_lock(js: JetStreamContext, job_id: str) -> tuple[LockEvent | None, int]:
    """The last event on the job's lock subject and its sequence ((None, 0) when none)."""
    try:
        msg = await js.get_last_msg(BATCH_STREAM, lock_subject(job_id), direct=True)
    except JsNotFoundError:
        return None, 0
    except Exception as exc:
        if type(exc).__module__.startswith("nats"):
            raise LockStateError(f"could not read the lock of {job_id}: {exc}") from None
        raise
    try:
        return decode_lock_event(msg.data or b""), int(msg.seq or 0)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise LockStateError(
            f"the last message on {lock_subject(job_id)} (seq {msg.seq}) is not a lock event "
            f"({bus.describe_decode_error(exc)}); release the lock with the admin route"
        ) from None


def is_wrong_last_sequence(exc: BaseException) -> bool:
    """Whether a publish failed because the subject moved on (someone else stored first)."""
    return isinstance(exc, BadRequestError) and exc.err_code == _WRONG_LAST_SEQUENCE


def _held_by(job_id: str, last: LockEvent | None, seq: int) -> LockHeldError:
    if isinstance(last, LockAcquired):
        return LockHeldError(job_id, last.owner, last.expires_at, seq, last.execution_id)
    owner = last.owner if last is not None else "another worker"
    return LockHeldError(job_id, owner, None, seq)


async def acquire_lock(
    js: JetStreamContext,
    job_id: str,
    *,
    owner: str,
    execution_id: str,
    ttl_s: float,
) -> HeldLock:
    """Take the job's lock or raise LockHeldError naming the holder (never waits)."""
    _check_job_id(job_id)
    last, seq = await read_lock(js, job_id)
    event = decide_acquire(
        last,
        seq,
        job_id=job_id,
        owner=owner,
        execution_id=execution_id,
        ttl_s=ttl_s,
        now=utc_now(),
    )
    try:
        ack = await bus.publish_event(
            js, lock_subject(job_id), event, headers={EXPECTED_LAST_SUBJECT_SEQ: str(seq)}
        )
        token = int(ack.seq)
    except Exception as exc:
        if not type(exc).__module__.startswith("nats"):
            raise
        # Someone stored something first, or the answer got lost: the subject says who holds it.
        now_last, now_seq = await read_lock(js, job_id)
        if isinstance(now_last, LockAcquired) and now_last.id == event.id:
            token = now_seq
        elif is_wrong_last_sequence(exc):
            raise _held_by(job_id, now_last, now_seq) from None
        else:
            raise LockStateError(f"could not store the lock of {job_id}: {exc}") from None
    return HeldLock(
        job_id=job_id,
        owner=owner,
        execution_id=execution_id,
        fencing_token=token,
        acquired_at=event.occurred_at,
        expires_at=event.expires_at,
    )


async def release_lock(
    js: JetStreamContext,
    lock: HeldLock,
    *,
    reason: ReleaseReason = "released",
    by: str | None = None,
) -> bool:
    """Give the lock back; False when it was no longer ours (someone else moved the subject)."""
    event = LockReleased(
        id=release_event_id(lock.job_id, lock.fencing_token),
        occurred_at=utc_now(),
        job_id=lock.job_id,
        owner=lock.owner,
        reason=reason,
        by=by or lock.owner,
    )
    try:
        await bus.publish_event(
            js,
            lock_subject(lock.job_id),
            event,
            headers={EXPECTED_LAST_SUBJECT_SEQ: str(lock.fencing_token)},
        )
    except BadRequestError as exc:
        if is_wrong_last_sequence(exc):
            return False
        raise
    return True


async def check_lock(js: JetStreamContext, lock: HeldLock) -> str | None:
    """Why `lock` is no longer held, or None while it is."""
    last, seq = await read_lock(js, lock.job_id)
    return why_lost(
        last, seq, fencing_token=lock.fencing_token, expires_at=lock.expires_at, now=utc_now()
    )


class BatchRun:
    """The running execution handed to the `async with` body."""

    def __init__(self, lock: HeldLock, items_total: int | None) -> None:
        self.lock = lock
        self.items_total = items_total
        self.items_processed = 0
        self.warnings: list[str] = []
        self.lock_lost = False
        self.lock_lost_reason: str | None = None

    @property
    def job_id(self) -> str:
        """The job this run belongs to."""
        return self.lock.job_id

    @property
    def execution_id(self) -> str:
        """This execution's id."""
        return self.lock.execution_id

    @property
    def fencing_token(self) -> int:
        """The lock's fencing token (stream sequence of its lock.acquired)."""
        return self.lock.fencing_token

    def advance(self, items: int = 1) -> None:
        """Count processed items; raises LockLostError once the lock is known to be gone."""
        self.raise_if_lock_lost()
        self.items_processed += items

    def set_total(self, items_total: int) -> None:
        """Announce (or correct) how many items this run will process."""
        self.items_total = items_total

    def warn(self, message: str) -> None:
        """Record a warning (kept in batch.finished; the first 20)."""
        if len(self.warnings) < MAX_WARNINGS:
            self.warnings.append(message[:500])

    def raise_if_lock_lost(self) -> None:
        """LockLostError when a heartbeat found the lock gone."""
        if self.lock_lost:
            raise LockLostError(
                self.job_id, self.fencing_token, self.lock_lost_reason or "it is gone"
            )

    def _mark_lost(self, why: str) -> None:
        if not self.lock_lost:
            log.warning(
                "batch job %s (execution %s) lost its lock: %s", self.job_id, self.execution_id, why
            )
        self.lock_lost = True
        self.lock_lost_reason = why


class _Sampler:
    """psutil samples of this process: RSS now and at peak, CPU % averaged over samples."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._process.cpu_percent(None)
        self.peak_mb = 0.0
        self.cpu_sum = 0.0
        self.samples = 0

    def sample(self) -> tuple[float, float]:
        with self._process.oneshot():
            rss_mb = self._process.memory_info().rss / (1024 * 1024)
            cpu = self._process.cpu_percent(None)
        self.peak_mb = max(self.peak_mb, rss_mb)
        self.cpu_sum += cpu
        self.samples += 1
        return round(rss_mb, 2), round(cpu, 2)

    @property
    def avg_cpu(self) -> float:
        return round(self.cpu_sum / self.samples, 2) if self.samples else 0.0


def _traceback_summary(exc: BaseException) -> str:
    summary = traceback.TracebackException.from_exception(exc, limit=-TRACEBACK_FRAMES)
    return "".join(summary.format())[-4000:]


class batch_job:  # lower case: read as a function, `async with batch_job(...) as run`
    """Run one execution of `job_id` under its lock (see the module docstring)."""

    def __init__(
        self,
        nc: NATS,
        job_id: str,
        items_total: int | None = None,
        *,
        ttl_s: float | None = None,
        heartbeat_interval_s: float | None = None,
        owner: str | None = None,
        settings: BatchSettings | None = None,
    ) -> None:
        _check_job_id(job_id)
        defaults = settings or BatchSettings()
        self._js = nc.jetstream()
        self.job_id = job_id
        self.items_total = items_total
        self.ttl_s = ttl_s if ttl_s is not None else defaults.lock_ttl_s
        self.heartbeat_interval_s = heartbeat_interval_s or defaults.heartbeat_interval_s
        self.execution_id = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.owner = owner or f"{self.host}:{self.pid}:{self.execution_id[:8]}"
        self.run: BatchRun | None = None
        self._sampler = _Sampler()
        self._started = 0.0
        self._beats = 0
        self._heartbeat: asyncio.Task[None] | None = None

    async def __aenter__(self) -> BatchRun:
        lock = await acquire_lock(
            self._js,
            self.job_id,
            owner=self.owner,
            execution_id=self.execution_id,
            ttl_s=self.ttl_s,
        )
        run = BatchRun(lock, self.items_total)
        self._started = time.monotonic()
        started = BatchStarted(
            id=f"{self.execution_id}.started",
            occurred_at=utc_now(),
            execution_id=self.execution_id,
            job_id=self.job_id,
            host=self.host,
            pid=self.pid,
            items_total=self.items_total,
            heartbeat_interval_s=self.heartbeat_interval_s,
            fencing_token=lock.fencing_token,
        )
        try:
            await bus.publish_event(self._js, run_subject(self.job_id), started)
        except BaseException:
            with contextlib.suppress(Exception):
                await release_lock(self._js, lock)
            raise
        self.run = run
        self._heartbeat = asyncio.create_task(self._heartbeat_loop(run), name="batch-heartbeat")
        return run

    async def _heartbeat_loop(self, run: BatchRun) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_interval_s)
            try:
                await self._beat(run)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a NATS hiccup must not kill the job
                log.warning("batch job %s: heartbeat failed: %s", self.job_id, exc)

    async def _beat(self, run: BatchRun) -> None:
        memory_mb, cpu = self._sampler.sample()
        self._beats += 1
        progress = BatchProgress(
            id=f"{self.execution_id}.progress.{self._beats}",
            occurred_at=utc_now(),
            execution_id=self.execution_id,
            job_id=self.job_id,
            items_processed=run.items_processed,
            items_total=run.items_total,
            memory_mb=memory_mb,
            cpu_percent=cpu,
        )
        await bus.publish_event(self._js, run_subject(self.job_id), progress)
        if not run.lock_lost:
            why = await check_lock(self._js, run.lock)
            if why is not None:
                run._mark_lost(why)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        run = self.run
        assert run is not None, "__aexit__ without a successful __aenter__"
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        self._sampler.sample()
        lost_error: LockLostError | None = None
        if not run.lock_lost:
            with contextlib.suppress(LockStateError):
                why = await check_lock(self._js, run.lock)
                if why is not None:
                    run._mark_lost(why)
        status: FinishedStatus
        error: str | None = None
        trace: str | None = None
        if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
            status, error = "cancelled", type(exc).__name__
        elif exc is not None:
            status, error, trace = "failed", f"{type(exc).__name__}: {exc}", _traceback_summary(exc)
        elif run.lock_lost:
            lost_error = LockLostError(
                self.job_id, run.fencing_token, run.lock_lost_reason or "it is gone"
            )
            status, error = "failed", f"LockLostError: {lost_error}"
        else:
            status = "succeeded"
        await self._finish(run, status, error, trace)
        if not run.lock_lost:
            try:
                if not await release_lock(self._js, run.lock):
                    run._mark_lost("it was no longer ours when the run released it")
            except Exception as exc_release:
                log.error("batch job %s: could not release its lock: %s", self.job_id, exc_release)
        if lost_error is not None:
            raise lost_error

    async def _finish(
        self, run: BatchRun, status: FinishedStatus, error: str | None, trace: str | None
    ) -> None:
        duration = max(0.0, time.monotonic() - self._started)
        finished = BatchFinished(
            id=f"{self.execution_id}.finished",
            occurred_at=utc_now(),
            execution_id=self.execution_id,
            job_id=self.job_id,
            status=status,
            items_processed=run.items_processed,
            duration_s=round(duration, 3),
            throughput_per_s=round(run.items_processed / duration, 3) if duration > 0 else 0.0,
            peak_memory_mb=round(self._sampler.peak_mb, 2),
            avg_cpu_percent=self._sampler.avg_cpu,
            warnings=list(run.warnings),
            error=error[:2000] if error else None,
            traceback=trace,
        )
        try:
            await bus.publish_event(self._js, run_subject(self.job_id), finished)
        except Exception as exc:
            log.error("batch job %s: could not record its end (%s): %s", self.job_id, status, exc)
