"""The hook runner: every alert of STOCKPILOT_ALERTS to every hook, each at its own pace.

Why one module of over 300 lines: it is one delivery loop and the state it keeps (delivery
marks, retry policy, per-hook status); the at-least-once promise below depends on the order of
mark, ack, retry and park in `_handle`, which reads best in one place.

Each hook has its own durable pull consumer (`stockpilot-hooks-<hook>`) and its own task, so a
hook that keeps failing holds back nobody else. Delivery is at least once, with an idempotency
key (the alert id, in `Idempotency-Key`): an alert is acked only after the hook took it, and
retried with exponential back-off up to `max_attempts` times; one that still fails (or that can
never be sent, e.g. a request that cannot be built from it) is parked on
`stockpilot.deadletter.hooks` with the reason, and the hook goes on with the next alert.

A delivery mark in the marks bucket (`hooks.<hook>.<alert-id>`) is written the moment the hook
returns, before the ack, so a redelivered alert (lost ack, restart, consumer recreated) is not
handed again to a hook that took it. What remains is the window between the receiver's 2xx and
that one KV write: a crash there (kill -9 during a slow reply) delivers the alert a second time,
with the same idempotency key, so a receiver can drop it. Each hook's state is published under
`hooks.status` (STOCKPILOT_STATE) for `GET /api/v1/status` and `stockpilot streams`.

Every task runs under a `shared.supervise.Supervisor`: a worker or the status loop that fails
stops the runner, and `stockpilot hooks` exits non-zero to be restarted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Literal

import msgspec
import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js import api as js_api
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from ops.hook_delivery import AlertHook, HookError, UndeliverableError
from shared.clock import SYSTEM_CLOCK, Clock
from shared.dead_letters import dead_letter, dead_letter_subject, describe_decode_error
from shared.events import Alert, AwareDatetime
from shared.hook_status import (
    STATUS_KEY,
    HooksStatus,
    HookStatus,
)
from shared.streams import HOOK_MARKS_BUCKET, STATE_BUCKET, STREAMS
from shared.supervise import Supervisor

log = logging.getLogger("stockpilot.hooks")

ALERTS_SUBJECT = "stockpilot.alerts.>"
STATUS_EVERY_S = 2.0
# Once `stop` is set the runner returns within this, whatever its hooks do. Workers end what
# they hold (an idle one with its current 1 s fetch, one mid-retry naks its alert at once); a
# delivery still in flight when only the final status's share is left is cancelled.
STOP_TIMEOUT_S = 4.0
_FINAL_STATUS_S = 1.0
# Consecutive failed fetches, while connected, after which a worker fails (its consumer is gone
# or refused to it): the process exits and its restart creates the consumer again.
FETCH_MAX_FAILURES = 10
DEAD_LETTER_SERVICE = "hooks"
PARKED_SUBJECT = dead_letter_subject(DEAD_LETTER_SERVICE)  # stockpilot.deadletter.hooks
_HOOK_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_KEY_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")

_encode = msgspec.json.Encoder().encode
_decode_alert = msgspec.json.Decoder(Alert).decode


# ----- delivery state ------------------------------------------------------------------


def sanitise_key_token(text: str) -> str:
    """An alert id as a KV key token: `[A-Za-z0-9_-]` kept, anything else as `=XX` (injective)."""
    out: list[str] = []
    for char in text:
        if char in _KEY_SAFE:
            out.append(char)
        else:
            out.extend(f"={byte:02X}" for byte in char.encode())
    return "".join(out)


def delivery_key(hook: str, alert_id: str) -> str:
    """Where the mark saying `hook` took `alert_id` lives in the marks bucket."""
    return f"hooks.{hook}.{sanitise_key_token(alert_id)}"


def consumer_name(hook: str) -> str:
    """The durable consumer one hook reads STOCKPILOT_ALERTS through."""
    return f"stockpilot-hooks-{hook}"


class DeliveryMark(msgspec.Struct, kw_only=True):
    """Stored once a hook took an alert, or gave up on it (`parked`)."""

    alert_id: str
    stream_seq: int
    delivered_at: AwareDatetime
    attempts: int
    outcome: Literal["delivered", "parked"] = "delivered"


# ----- the runner ----------------------------------------------------------------------


class RetryPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """Exponential back-off between attempts at one alert."""

    initial_s: float = 0.5
    max_s: float = 60.0
    multiplier: float = 2.0
    # After this many consecutive failures the hook is reported `failing` (not just retrying).
    failing_after: int = 3
    # Attempts at one alert before it is parked on the dead-letter subject.
    max_attempts: int = 10

    def delay(self, attempt: int) -> float:
        """Seconds to wait after the `attempt`-th failure (1-based)."""
        return float(min(self.max_s, self.initial_s * self.multiplier ** (attempt - 1)))


@dataclass
class _Worker:
    hook: AlertHook
    status: HookStatus
    subscription: JetStreamContext.PullSubscription | None = None
    task: asyncio.Task[None] | None = None
    dirty: bool = True


@dataclass
class HookRunner:
    """Delivers every alert of STOCKPILOT_ALERTS to every hook, each at its own pace."""

    js: JetStreamContext
    hooks: Sequence[AlertHook]
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    # A new hook (its consumer does not exist yet) starts with the alerts of this window.
    backfill_s: float = 86_400.0
    status_every_s: float = STATUS_EVERY_S
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    _workers: list[_Worker] = field(default_factory=list, init=False)
    # Where parked alerts are published (core NATS); the JetStream context's connection if unset.
    nc: NATS | None = None
    # "Now" for backfill starts, delivery marks and status stamps (tests set it).
    clock: Clock = SYSTEM_CLOCK
    _kv: KeyValue | None = field(default=None, init=False)
    _marks: KeyValue | None = field(default=None, init=False)
    supervisor: Supervisor = field(init=False)

    def __post_init__(self) -> None:
        names = [hook.name for hook in self.hooks]
        for name in names:
            if not _HOOK_NAME_RE.match(name):
                raise ValueError(f"hook name {name!r} must match {_HOOK_NAME_RE.pattern}")
        if len(set(names)) != len(names):
            raise ValueError(f"hook names must be unique, got {names}")
        self._workers = [
            _Worker(hook, HookStatus(name=hook.name, state="starting")) for hook in self.hooks
        ]
        self.supervisor = Supervisor("hooks", self.stop)

    @property
    def statuses(self) -> list[HookStatus]:
        """Every hook's current state."""
        return [worker.status for worker in self._workers]

    async def run(self) -> None:
        """Run until `stop` is set; then publish the final state and return, in STOP_TIMEOUT_S."""
        self._kv = await self.js.key_value(STATE_BUCKET)
        self._marks = await self.js.key_value(HOOK_MARKS_BUCKET)
        for worker in self._workers:
            worker.subscription = await self._subscribe(worker.hook.name)
        for worker in self._workers:
            worker.task = self.supervisor.start(
                self._work(worker), f"hook-{worker.hook.name}", forever=True
            )
        status_task = self.supervisor.start(self._status_loop(), "hooks-status", forever=True)
        try:
            log.info(
                "delivering alerts to %s",
                ", ".join(w.hook.name for w in self._workers) or "no hook",
            )
            await self.stop.wait()
        finally:
            await self._finish(status_task)

    async def _finish(self, status_task: asyncio.Task[None]) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + STOP_TIMEOUT_S
        # The final status written below replaces the periodic one.
        status_task.cancel()
        tasks = {status_task, *(w.task for w in self._workers if w.task is not None)}
        grace = STOP_TIMEOUT_S - _FINAL_STATUS_S
        # A task that failed was logged, with its traceback, by the supervisor.
        _, busy = await asyncio.wait(tasks, timeout=grace)
        if busy:
            log.warning(
                "hooks: still busy %.1fs after stop, cancelled: %s",
                grace,
                ", ".join(sorted(task.get_name() for task in busy)),
            )
            for task in busy:
                task.cancel()
        for worker in self._workers:
            ended = worker.task
            if ended is not None and ended.done() and not ended.cancelled() and ended.exception():
                worker.status.last_error = f"delivery loop failed: {ended.exception()!r}"[:300]
                worker.status.last_error_at = self.clock.now()
            worker.status.state = "stopped"
            worker.status.next_attempt_at = None
            if worker.subscription is not None:
                # A buffered UNSUB, no round trip: the NATS drain after this then has no pull
                # subscription left to wait for.
                with contextlib.suppress(Exception):
                    await worker.subscription.unsubscribe()
        # The cancelled tasks unwind (naking what they held) while the final status is written.
        publishing = asyncio.create_task(
            self.publish_status(stopped=True), name="hooks-final-status"
        )
        _, late = await asyncio.wait({publishing, *busy}, timeout=max(deadline - loop.time(), 0))
        if publishing in late:
            publishing.cancel()
            log.warning(
                "hooks: final status not written within %.1fs of stop; it still shows the last "
                "periodic one",
                STOP_TIMEOUT_S,
            )
        elif (exc := publishing.exception()) is not None:
            log.warning("hooks: writing the final status failed (%s)", exc)
        if left_behind := late - {publishing}:
            log.warning(
                "hooks: did not end when cancelled, left behind: %s",
                ", ".join(sorted(task.get_name() for task in left_behind)),
            )

    async def _subscribe(self, hook: str) -> JetStreamContext.PullSubscription:
        stream = STREAMS["alerts"].name
        # Long back-offs keep a message in hand; in_progress() is sent before each wait, but
        # the ack wait must still outlast one attempt plus one wait.
        config = js_api.ConsumerConfig(
            durable_name=consumer_name(hook),
            description=f"StockPilot alert hook {hook}",
            deliver_policy=js_api.DeliverPolicy.BY_START_TIME,
            opt_start_time=self.clock.now() - timedelta(seconds=self.backfill_s),
            ack_policy=js_api.AckPolicy.EXPLICIT,
            ack_wait=max(30.0, 2 * self.retry.max_s),
            max_deliver=-1,
            max_ack_pending=1,
            filter_subject=ALERTS_SUBJECT,
        )
        return await self.js.pull_subscribe(
            ALERTS_SUBJECT, durable=consumer_name(hook), stream=stream, config=config
        )

    async def _work(self, worker: _Worker) -> None:
        assert worker.subscription is not None
        worker.status.state = "ok"
        worker.dirty = True
        failed_fetches = 0
        while not self.stop.is_set():
            try:
                msgs = await worker.subscription.fetch(1, timeout=1.0)
            except nats.errors.TimeoutError:
                failed_fetches = 0
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS reconnecting: the consumer survives, keep pulling
                if self._nc.is_connected:
                    failed_fetches += 1
                    if failed_fetches >= FETCH_MAX_FAILURES:
                        # Connected, yet the consumer keeps refusing: it was deleted or its
                        # permission revoked. Say so and exit; the restart recreates it.
                        raise RuntimeError(
                            f"hook {worker.hook.name}: fetching alerts failed "
                            f"{failed_fetches} times in a row while connected: {exc!r}"
                        ) from exc
                log.warning("hook %s: fetching alerts failed (%s); retrying", worker.hook.name, exc)
                await self._sleep(1.0)
                continue
            failed_fetches = 0
            for msg in msgs:
                try:
                    await self._handle(worker, msg)
                except asyncio.CancelledError:
                    # Stopping cut this delivery short: hand the alert back now, or the next
                    # run waits out the ack wait (max_ack_pending=1) before it gets it again.
                    log.warning(
                        "hook %s: delivery of seq %d cut short by stopping; handed back",
                        worker.hook.name,
                        msg.metadata.sequence.stream,
                    )
                    with contextlib.suppress(Exception):
                        await msg.nak()
                    raise

    async def _sleep(self, seconds: float) -> None:
        """Sleep, waking early when the runner stops."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop.wait(), timeout=seconds)

    async def _handle(self, worker: _Worker, msg: Msg) -> None:
        hook, status = worker.hook, worker.status
        seq = msg.metadata.sequence.stream
        try:
            alert = _decode_alert(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.warning(
                "hook %s: seq %d is not an alert (%s); skipped",
                hook.name,
                seq,
                describe_decode_error(exc),
            )
            await _ack(msg)
            return
        key = delivery_key(hook.name, alert.id)
        if await self._is_marked(key):
            status.skipped_duplicates += 1
            status.last_seq = seq
            worker.dirty = True
            await _ack(msg)
            return
        attempt = 0
        while True:
            attempt += 1
            try:
                await hook.deliver(alert)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = self.retry.delay(attempt)
                status.failures += 1
                status.consecutive_failures += 1
                status.last_error = (
                    str(exc)[:300]
                    if isinstance(exc, HookError)
                    else f"{type(exc).__name__}: {exc}"[:300]
                )
                status.last_error_at = self.clock.now()
                status.state = (
                    "failing"
                    if status.consecutive_failures >= self.retry.failing_after
                    else "retrying"
                )
                worker.dirty = True
                if isinstance(exc, UndeliverableError) or attempt >= self.retry.max_attempts:
                    await self._park(worker, msg, alert, attempt, status.last_error)
                    return
                status.next_attempt_at = status.last_error_at + timedelta(seconds=delay)
                log.warning(
                    "hook %s: alert %s attempt %d of %d failed (%s); retrying in %.1fs",
                    hook.name,
                    alert.id,
                    attempt,
                    self.retry.max_attempts,
                    status.last_error,
                    delay,
                )
                with contextlib.suppress(Exception):
                    await msg.in_progress()
                await self._sleep(delay)
                if self.stop.is_set():
                    # Not delivered: hand it back at once so the next run starts with it.
                    with contextlib.suppress(Exception):
                        await msg.nak()
                    return
                continue
            break
        # The receiver took it: the mark goes out first, before anything else is awaited, so
        # the window in which a crash means a second delivery is this one KV write.
        mark = DeliveryMark(
            alert_id=alert.id, stream_seq=seq, delivered_at=self.clock.now(), attempts=attempt
        )
        await self._mark(key, mark)
        await _ack(msg)
        status.delivered += 1
        status.consecutive_failures = 0
        status.state = "ok"
        status.next_attempt_at = None
        status.last_seq = seq
        status.last_alert_id = alert.id
        status.last_delivered_at = mark.delivered_at
        worker.dirty = True
        log.debug(
            "hook %s: delivered alert %s (seq %d, attempt %d)", hook.name, alert.id, seq, attempt
        )

    async def _park(
        self, worker: _Worker, msg: Msg, alert: Alert, attempts: int, error: str
    ) -> None:
        """Give up on `alert` for this hook: dead-letter it with the reason, mark it, ack it.

        The hook then goes on with the next alert; the parked one stays in STOCKPILOT_ALERTS
        and its copy on `stockpilot.deadletter.hooks` says which hook gave up and why.
        """
        hook, status = worker.hook, worker.status
        seq = msg.metadata.sequence.stream
        reason = f"hook {hook.name} gave up after {attempts} attempt(s): {error}"[:500]
        log.error("hook %s: alert %s parked on %s: %s", hook.name, alert.id, PARKED_SUBJECT, reason)
        try:
            await dead_letter(self._nc, DEAD_LETTER_SERVICE, msg.subject, msg.data, reason, seq)
        except Exception as exc:  # the log line above and the mark below still record it
            log.error("hook %s: could not publish parked alert %s (%s)", hook.name, alert.id, exc)
        mark = DeliveryMark(
            alert_id=alert.id,
            stream_seq=seq,
            delivered_at=self.clock.now(),
            attempts=attempts,
            outcome="parked",
        )
        await self._mark(delivery_key(hook.name, alert.id), mark)
        await _ack(msg)
        status.parked += 1
        status.next_attempt_at = None
        status.last_seq = seq
        status.last_parked_alert_id = alert.id
        worker.dirty = True

    @property
    def _nc(self) -> NATS:
        return self.nc if self.nc is not None else self.js._nc

    async def _is_marked(self, key: str) -> bool:
        assert self._marks is not None
        delay = 0.2
        while True:
            try:
                await self._marks.get(key)
                return True
            except KeyNotFoundError:
                return False
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # NATS away: without the answer we could deliver twice
                log.warning("hooks: reading delivery mark %s failed (%s); retrying", key, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)

    async def _mark(self, key: str, mark: DeliveryMark) -> None:
        assert self._marks is not None
        delay = 0.2
        for _ in range(20):
            try:
                await self._marks.put(key, _encode(mark))
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("hooks: writing delivery mark %s failed (%s); retrying", key, exc)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        log.error("hooks: delivery mark %s could not be written; a restart may repeat it", key)

    async def _status_loop(self) -> None:
        last_full = 0.0
        while True:
            now = time.monotonic()
            # Pending counts come from the server: refresh them every few periods.
            # …and the status is rewritten then even when nothing changed, so a reader can
            # tell an idle hook process (fresh `updated_at`) from a dead one (stale).
            full = now - last_full >= 5 * self.status_every_s
            if full:
                await self._refresh_pending()
                last_full = now
            if full or any(w.dirty for w in self._workers):
                with contextlib.suppress(Exception):
                    await self.publish_status()
            await asyncio.sleep(self.status_every_s)

    async def _refresh_pending(self) -> None:
        for worker in self._workers:
            if worker.subscription is None:
                continue
            try:
                info = await worker.subscription.consumer_info()
            except Exception:
                continue
            pending = (info.num_pending or 0) + (info.num_ack_pending or 0)
            if pending != worker.status.pending:
                worker.status.pending = pending
                worker.dirty = True

    async def publish_status(self, stopped: bool = False) -> None:
        """Write every hook's state under `hooks.status` in the state bucket."""
        assert self._kv is not None
        for worker in self._workers:
            worker.dirty = False
        value = HooksStatus(
            updated_at=self.clock.now(),
            pid=os.getpid(),
            hooks=self.statuses,
            stopped=stopped,
            failure=self.supervisor.failure,
        )
        await self._kv.put(STATUS_KEY, _encode(value))


async def _ack(msg: Msg) -> None:
    try:
        await msg.ack_sync(timeout=2.0)
    except Exception as exc:  # the delivery mark covers the redelivery this may cause
        log.warning("hooks: ack of seq %d failed (%s)", msg.metadata.sequence.stream, exc)
