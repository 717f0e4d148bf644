"""The worker-side client: run a batch job under its lock and record the execution.

Why one module of over 300 lines: it is `batch_job` and what runs inside it (the run handle,
the process sampler, the heartbeat loop, the finish); the lock primitives already live in
services.batch.locks, and what is left shares one run's state from enter to exit.

```python
async with batch_job(nc, "daily-price-sync", items_total=len(tickers)) as run:
    for chunk in chunks(tickers):
        await sync(chunk)
        run.advance(len(chunk))      # raises LockLostError once the lock is gone
```

- Entering takes the job lock (ShedLock semantics): `lock.acquired` is published with
  `Nats-Expected-Last-Subject-Sequence` = the lock subject's last sequence, and only while the
  lock is free or expired, so of any number of racing workers exactly one wins. The others get
  `LockHeldError` naming the holder at once (and the run is stored as `batch.skipped`, so it
  shows in the history and the stats); nobody waits. The stored event's stream sequence
  is the fencing token (`run.fencing_token`): pass it to anything that must reject a stale
  holder's writes.
- While the body runs, a heartbeat task samples the process (RSS, CPU %) with psutil and
  publishes `batch.progress` every `heartbeat_interval_s`, then folds the lock subject. If
  the lock was force-released, released as lost (the service declares a run lost after three
  silent heartbeat intervals), cleaned up, taken over or has expired, `run.lock_lost` becomes
  True (`run.lock_lost_reason` says why) and the next `run.advance()` raises `LockLostError`.
  The lock is a lease: once less than half of its TTL is left, the heartbeat renews it
  (`lock.renewed`), so a run lives as long as it beats, and a dead one frees it within three
  intervals.
- Leaving publishes `batch.finished`: `succeeded`; `failed` with the error and a short
  traceback; `cancelled` on CancelledError/KeyboardInterrupt (re-raised). Then the lock is
  released (reason `released`). A run that lost its lock does not release it, is recorded as
  failed and raises `LockLostError` at exit even when its body finished.
- NATS away (a restart of the stack): heartbeats that fail are logged and the next one tries
  again; the run's end and the release are retried until stored (for up to
  `record_deadline_s`, 120 s by default), so a run that ends during a restart is recorded once
  and its lock is free for the next run. Give the client a connection that reconnects
  (`max_reconnect_attempts=-1`).
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
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TypeVar

import nats.errors
import psutil
from nats.aio.client import Client as NATS

from services.batch.contract import (
    BatchFinished,
    BatchProgress,
    BatchSkipped,
    BatchStarted,
    FinishedStatus,
    run_subject,
)
from services.batch.errors import LockHeldError, LockLostError, LockStateError
from services.batch.locks import (
    HeldLock,
    acquire_lock,
    check_job_id,
    check_lock,
    read_lock,
    read_lock_state,
    release_lock,
    renew_lock,
)
from services.batch.settings import BatchSettings
from shared.clock import SYSTEM_CLOCK, Clock
from shared.nats_errors import is_transient
from shared.publish import publish_event

# The lock primitives are part of the worker-side API too, and so are the errors a worker
# catches (`except LockHeldError`): callers import all of it from here.
__all__ = [
    "BatchRun",
    "HeldLock",
    "LockHeldError",
    "LockLostError",
    "acquire_lock",
    "batch_job",
    "check_lock",
    "read_lock",
    "read_lock_state",
    "release_lock",
    "renew_lock",
]

log = logging.getLogger("stockpilot.batch.client")

MAX_WARNINGS = 20
TRACEBACK_FRAMES = 5
# How long a run's end (its `batch.finished` and the lock's release) is retried while NATS is
# away: a restart of the stack takes seconds, and an end that is never stored leaves the run
# "running" in the history and its lock held until the TTL, skipping the next runs.
RECORD_DEADLINE_S = 120.0

T = TypeVar("T")


async def until_stored(what: str, attempt: Callable[[], Awaitable[T]], deadline_s: float) -> T:
    """`attempt()` again (backing off up to 2 s) while NATS cannot answer, for `deadline_s`.

    Safe to repeat: every event carries its id as `Nats-Msg-Id` (a retry after a lost answer
    is stored once) and a lock release recognises its own earlier release. A connection closed
    for good is not waited for.
    """
    give_up = time.monotonic() + deadline_s
    delay = 0.1
    while True:
        try:
            return await attempt()
        except nats.errors.ConnectionClosedError:
            raise
        except Exception as exc:
            # LockStateError is how the lock primitives say NATS did not answer them.
            waitable = isinstance(exc, LockStateError) or is_transient(exc)
            if not waitable or time.monotonic() + delay > give_up:
                raise
            log.warning("%s: NATS did not answer (%s); trying again", what, exc or type(exc))
            await asyncio.sleep(delay)
            delay = min(2.0, delay * 2)


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
    """psutil samples of this process: RSS now and at peak, CPU % between samples, and the
    run's own CPU time over its wall time (what `avg_cpu_percent` reports)."""

    def __init__(self) -> None:
        self._process = psutil.Process()
        self._process.cpu_percent(None)
        self.peak_mb = 0.0
        self.cpu_sum = 0.0
        self.samples = 0
        self._cores = psutil.cpu_count() or 1
        self._cpu_start = self._cpu_time()
        self._wall_start = time.monotonic()

    def _cpu_time(self) -> float:
        times = self._process.cpu_times()
        return float(times.user + times.system)

    def sample(self) -> tuple[float, float]:
        with self._process.oneshot():
            rss_mb = self._process.memory_info().rss / (1024 * 1024)
            cpu = min(self._process.cpu_percent(None), self._cores * 100.0)
        self.peak_mb = max(self.peak_mb, rss_mb)
        self.cpu_sum += cpu
        self.samples += 1
        return round(rss_mb, 2), round(cpu, 2)

    @property
    def avg_cpu(self) -> float:
        """CPU time used since the run began over its wall time, at most cores x 100 %.

        Not the mean of psutil's per-interval percentages: over a 2 ms run one sample's
        interval is tiny and its ratio meaningless (323 % was seen).
        """
        wall = time.monotonic() - self._wall_start
        if wall <= 0:
            return 0.0
        used = max(0.0, self._cpu_time() - self._cpu_start)
        return round(min(used / wall * 100.0, self._cores * 100.0), 2)


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
        clock: Clock = SYSTEM_CLOCK,
        record_deadline_s: float = RECORD_DEADLINE_S,
    ) -> None:
        check_job_id(job_id)
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
        self.skipped: LockHeldError | None = None
        # Stamps the run's events and judges lock expiry; durations stay on time.monotonic.
        self._clock = clock
        self._record_deadline_s = record_deadline_s
        self._sampler = _Sampler()
        self._started = 0.0
        self._beats = 0
        self._heartbeat: asyncio.Task[None] | None = None

    async def __aenter__(self) -> BatchRun:
        try:
            lock = await acquire_lock(
                self._js,
                self.job_id,
                owner=self.owner,
                execution_id=self.execution_id,
                ttl_s=self.ttl_s,
                clock=self._clock,
            )
        except LockHeldError as held:
            await self._record_skipped(held)
            raise
        run = BatchRun(lock, self.items_total)
        self._started = time.monotonic()
        self._sampler = _Sampler()
        started = BatchStarted(
            id=f"{self.execution_id}.started",
            occurred_at=self._clock.now(),
            execution_id=self.execution_id,
            job_id=self.job_id,
            host=self.host,
            pid=self.pid,
            items_total=self.items_total,
            heartbeat_interval_s=self.heartbeat_interval_s,
            fencing_token=lock.fencing_token,
        )
        try:
            await publish_event(self._js, run_subject(self.job_id), started)
        except BaseException:
            with contextlib.suppress(Exception):
                await release_lock(self._js, lock, clock=self._clock)
            raise
        self.run = run
        self._beats_stopped = asyncio.Event()
        self._heartbeat = asyncio.create_task(self._heartbeat_loop(run), name="batch-heartbeat")
        return run

    async def _record_skipped(self, held: LockHeldError) -> None:
        """Store `batch.skipped`: the run did not start because the lock was held."""
        self.skipped = held
        skipped = BatchSkipped(
            id=f"{self.execution_id}.skipped",
            occurred_at=self._clock.now(),
            execution_id=self.execution_id,
            job_id=self.job_id,
            holder_owner=held.owner[:200],
            holder_fencing_token=held.fencing_token,
        )
        try:
            await publish_event(self._js, run_subject(self.job_id), skipped)
        except Exception as exc:  # the skip itself is what the caller must hear about
            log.error("batch job %s: could not record a skipped run: %s", self.job_id, exc)

    async def _heartbeat_loop(self, run: BatchRun) -> None:
        while not self._beats_stopped.is_set():
            await asyncio.sleep(self.heartbeat_interval_s)
            if self._beats_stopped.is_set():
                return
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
            occurred_at=self._clock.now(),
            execution_id=self.execution_id,
            job_id=self.job_id,
            items_processed=run.items_processed,
            items_total=run.items_total,
            memory_mb=memory_mb,
            cpu_percent=cpu,
        )
        await publish_event(self._js, run_subject(self.job_id), progress)
        if run.lock_lost:
            return
        why = await check_lock(self._js, run.lock, self._clock)
        if why is not None:
            run._mark_lost(why)
            return
        # The lease: a run that keeps beating keeps its lock, renewed once half of it is gone.
        left = (run.lock.expires_at - self._clock.now()).total_seconds()
        if left < self.ttl_s / 2:
            try:
                run.lock = await renew_lock(self._js, run.lock, ttl_s=self.ttl_s, clock=self._clock)
            except LockLostError as lost:
                run._mark_lost(lost.why)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        run = self.run
        assert run is not None, "__aexit__ without a successful __aenter__"
        if self._heartbeat is not None:
            # nats-py can swallow a CancelledError inside a request, so a single cancel()
            # may not end the loop: flag it to stop too, and cancel until it is done.
            self._beats_stopped.set()
            while not self._heartbeat.done():
                self._heartbeat.cancel()
                await asyncio.wait({self._heartbeat}, timeout=0.2)
            await asyncio.gather(self._heartbeat, return_exceptions=True)
        self._sampler.sample()
        lost_error: LockLostError | None = None
        if not run.lock_lost:
            with contextlib.suppress(LockStateError):
                why = await check_lock(self._js, run.lock, self._clock)
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
                released = await until_stored(
                    f"batch job {self.job_id}: releasing its lock",
                    lambda: release_lock(self._js, run.lock, clock=self._clock),
                    self._record_deadline_s,
                )
                if not released:
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
            occurred_at=self._clock.now(),
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
            await until_stored(
                f"batch job {self.job_id}: recording its end",
                lambda: publish_event(self._js, run_subject(self.job_id), finished),
                self._record_deadline_s,
            )
        except Exception as exc:
            log.error("batch job %s: could not record its end (%s): %s", self.job_id, status, exc)
