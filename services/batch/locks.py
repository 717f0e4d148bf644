"""Job-lock primitives over JetStream (what `batch_job` and the service's commands build on).

A lock is the last event on `stockpilot.batch.lock.<job_id>`. Taking it publishes
`lock.acquired` with `Nats-Expected-Last-Subject-Sequence` = the subject's last sequence, only
when the lock is free or expired: of any number of racing workers exactly one is stored, and
the others get the server's wrong-last-sequence error, which becomes `LockHeldError` naming the
holder. The stored event's stream sequence is the fencing token. Releasing expects the
fencing token as the last sequence, so a release cannot undo somebody else's newer lock.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import BadRequestError
from nats.js.errors import NotFoundError as JsNotFoundError

from services.batch.decide import decide_acquire, release_event_id, why_lost
from services.batch.errors import InvalidJobIdError, LockHeldError, LockStateError
from services.batch.events import (
    LockAcquired,
    LockEvent,
    LockReleased,
    ReleaseReason,
    decode_lock_event,
    job_id_problem,
    lock_subject,
)
from shared import bus
from shared.clock import SYSTEM_CLOCK, Clock
from shared.nats_errors import is_nats_error, is_wrong_last_sequence, translate

EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
BATCH_STREAM = bus.STREAMS["batch"].name


def check_job_id(job_id: str) -> None:
    """InvalidJobIdError (422) unless `job_id` can be a subject token."""
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
        if is_nats_error(exc):
            raise translate(exc, f"could not read the lock of {job_id}", LockStateError) from None
        raise
    try:
        return decode_lock_event(msg.data or b""), int(msg.seq or 0)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise LockStateError(
            f"the last message on {lock_subject(job_id)} (seq {msg.seq}) is not a lock event "
            f"({bus.describe_decode_error(exc)}); release the lock with the admin route"
        ) from None


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
    clock: Clock = SYSTEM_CLOCK,
) -> HeldLock:
    """Take the job's lock or raise LockHeldError naming the holder (never waits)."""
    check_job_id(job_id)
    last, seq = await read_lock(js, job_id)
    event = decide_acquire(
        last,
        seq,
        job_id=job_id,
        owner=owner,
        execution_id=execution_id,
        ttl_s=ttl_s,
        now=clock.now(),
    )
    try:
        ack = await bus.publish_event(
            js, lock_subject(job_id), event, headers={EXPECTED_LAST_SUBJECT_SEQ: str(seq)}
        )
        token = int(ack.seq)
    except Exception as exc:
        if not is_nats_error(exc):
            raise
        # Someone stored something first, or the answer got lost: the subject says who holds it.
        now_last, now_seq = await read_lock(js, job_id)
        if isinstance(now_last, LockAcquired) and now_last.id == event.id:
            token = now_seq
        elif is_wrong_last_sequence(exc):
            raise _held_by(job_id, now_last, now_seq) from None
        else:
            raise translate(exc, f"could not store the lock of {job_id}", LockStateError) from None
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
    clock: Clock = SYSTEM_CLOCK,
) -> bool:
    """Give the lock back; False when it was no longer ours (someone else moved the subject)."""
    event = LockReleased(
        id=release_event_id(lock.job_id, lock.fencing_token),
        occurred_at=clock.now(),
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


async def check_lock(
    js: JetStreamContext, lock: HeldLock, clock: Clock = SYSTEM_CLOCK
) -> str | None:
    """Why `lock` is no longer held, or None while it is (expired: by `clock`'s now)."""
    last, seq = await read_lock(js, lock.job_id)
    return why_lost(
        last, seq, fencing_token=lock.fencing_token, expires_at=lock.expires_at, now=clock.now()
    )
