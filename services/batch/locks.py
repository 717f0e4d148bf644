"""Job-lock primitives over JetStream (what `batch_job` and the service's commands build on).

Why one module of over 300 lines: every operation on a lock (read, acquire, renew, release,
check) first folds the same subject and publishes expecting its last sequence; those shared
reads and the operations built on them are one primitive.

A lock is what the events on `stockpilot.batch.lock.<job_id>` decide under the one lock rule
(lockrule.py), which the batch projection applies too: every operation here first folds the
subject (read in batches with JetStream's direct get). Taking the lock publishes `lock.acquired`
with `Nats-Expected-Last-Subject-Sequence` = the subject's last sequence, only when the lock is
free or expired: of any number of racing workers exactly one is stored, and the others get the
server's wrong-last-sequence error, which becomes `LockHeldError` naming the holder. The stored
event's stream sequence is the fencing token. Renewals and releases name that token and expect
the subject's last sequence too, so neither can touch somebody else's newer lock.
"""

from __future__ import annotations

import hashlib
import weakref
from dataclasses import dataclass
from datetime import datetime

import msgspec
import nats.errors
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError as JsNotFoundError

from services.batch.contract import (
    LockEvent,
    ReleaseReason,
    decode_lock_event,
    job_id_problem,
    lock_subject,
)
from services.batch.decide import decide_acquire, release_event, renew_event, why_lost
from services.batch.errors import InvalidJobIdError, LockHeldError, LockLostError, LockStateError
from services.batch.lockrule import LockRead, LockState
from shared.clock import SYSTEM_CLOCK, Clock
from shared.dead_letters import describe_decode_error
from shared.events import admission_problem
from shared.nats_errors import is_nats_error, is_wrong_last_sequence, translate
from shared.publish import publish_event
from shared.streams import STREAMS

EXPECTED_LAST_SUBJECT_SEQ = "Nats-Expected-Last-Subject-Sequence"
BATCH_STREAM = STREAMS["batch"].name
# Messages per direct-get batch when folding a lock subject, and attempts when it keeps moving.
READ_BATCH = 256
ATTEMPTS = 5


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
            f"({describe_decode_error(exc)}); release the lock with the admin route"
        ) from None


async def _subject_messages(
    js: JetStreamContext, subject: str, start_seq: int
) -> list[tuple[int, bytes, datetime | None]]:
    """Every message on `subject` from `start_seq` on: (sequence, data, stored at).

    JetStream's batched direct get (`next_by_subj` + `batch`) answers with up to READ_BATCH
    messages and an end-of-batch status; nats-py has no call for it, so it is asked here with
    the connection's own request machinery (the JetStream context's connection and prefix).
    """
    nc = js._nc  # noqa: SLF001 - nats-py keeps them private; there is no batch call
    prefix = js._prefix  # noqa: SLF001
    found: list[tuple[int, bytes, datetime | None]] = []
    seq = max(1, start_seq)
    while True:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        try:
            request = msgspec.json.encode(
                {"seq": seq, "next_by_subj": subject, "batch": READ_BATCH}
            )
            await nc.publish(f"{prefix}.DIRECT.GET.{BATCH_STREAM}", request, reply=inbox)
            got = 0
            while True:
                msg = await sub.next_msg(timeout=5.0)
                headers = msg.headers or {}
                status = headers.get("Status")
                if status == "404" or status == "204" or (status and not msg.data):
                    break
                msg_seq = int(headers.get("Nats-Sequence", "0"))
                stamp = headers.get("Nats-Time-Stamp")
                found.append((msg_seq, msg.data, _parse_stamp(stamp) if stamp else None))
                seq = msg_seq + 1
                got += 1
        finally:
            await sub.unsubscribe()
        if got < READ_BATCH:
            return found


def _parse_stamp(stamp: str) -> datetime | None:
    try:
        return datetime.fromisoformat(stamp.replace("Z", "+00:00")[:26] + "+00:00")
    except ValueError:
        return None


@dataclass
class _Folded:
    """A lock subject as one connection last folded it, and a digest of its last message."""

    read: LockRead
    last_digest: bytes


# Per connection, the lock subjects it has folded: a read fetches only the messages after the
# last one it saw (a heartbeat's check no longer re-reads a busy job's whole history, which
# cost about 30 us an event: 3 s a read after a year of a job every minute).
_FOLDED: weakref.WeakKeyDictionary[object, dict[str, _Folded]] = weakref.WeakKeyDictionary()


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=16).digest()


async def read_lock_state(js: JetStreamContext, job_id: str) -> LockRead:
    """The job's lock as the one rule decides it from every event on its lock subject.

    What the projection dead-letters is skipped here too (the same admission check): a
    message that does not decode, a lock event naming another job than its subject, one dated
    more than 5 minutes after it was stored. Folding resumes from this connection's last read
    when the subject's message at that read's last sequence is still the one it saw (else,
    say after the stream was recreated, it folds the subject from its first message).
    """
    subject = lock_subject(job_id)
    folded = _FOLDED.setdefault(js._nc, {})  # noqa: SLF001 - the connection, as in _subject_messages
    known = folded.get(job_id)
    try:
        if known is not None and known.read.last_seq > 0:
            messages = await _subject_messages(js, subject, known.read.last_seq)
            if (
                messages
                and messages[0][0] == known.read.last_seq
                and _digest(messages[0][1]) == known.last_digest
            ):
                read, messages = known.read.copy(), messages[1:]
            else:
                read, messages = LockRead(job_id=job_id), await _subject_messages(js, subject, 1)
        else:
            read, messages = LockRead(job_id=job_id), await _subject_messages(js, subject, 1)
    except Exception as exc:
        if is_nats_error(exc):
            raise LockStateError(f"could not read the lock of {job_id}: {exc}") from None
        raise
    for seq, data, stored_at in messages:
        read.last_seq = max(read.last_seq, seq)
        try:
            event = decode_lock_event(data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        stored_ns = int(stored_at.timestamp() * 1e9) if stored_at is not None else None
        if admission_problem(event, subject, stored_ns) is not None:
            continue
        read.apply(event, seq)
    if messages and (known is None or read.last_seq >= known.read.last_seq):
        folded[job_id] = _Folded(read=read.copy(), last_digest=_digest(messages[-1][1]))
    return read


def _held_error(job_id: str, held: LockState) -> LockHeldError:
    return LockHeldError(job_id, held.owner, held.expires_at, held.fencing_token, held.execution_id)


async def _publish_expecting(
    js: JetStreamContext, job_id: str, event: LockEvent, last_seq: int
) -> int | None:
    """Store `event` if the subject's last sequence is still `last_seq`: its sequence, or None
    when the subject moved on (the caller folds it again and decides again)."""
    try:
        ack = await publish_event(
            js, lock_subject(job_id), event, headers={EXPECTED_LAST_SUBJECT_SEQ: str(last_seq)}
        )
    except Exception as exc:
        if is_wrong_last_sequence(exc):
            return None
        if isinstance(exc, nats.errors.TimeoutError | nats.errors.NoRespondersError):
            # The answer may be lost while the event was stored: the fold will tell.
            return None
        if is_nats_error(exc):
            raise LockStateError(f"could not store the lock event of {job_id}: {exc}") from None
        raise
    return int(ack.seq)


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
    for _ in range(ATTEMPTS):
        read = await read_lock_state(js, job_id)
        held = read.held
        if held is not None and held.execution_id == execution_id and held.owner == owner:
            # Our own acquire was stored and its answer lost (or this is a retry).
            return HeldLock(
                job_id=job_id,
                owner=owner,
                execution_id=execution_id,
                fencing_token=held.fencing_token,
                acquired_at=held.acquired_at,
                expires_at=held.expires_at,
            )
        event = decide_acquire(
            held, job_id=job_id, owner=owner, execution_id=execution_id, ttl_s=ttl_s,
            now=clock.now(),
        )  # fmt: skip
        stored = await _publish_expecting(js, job_id, event, read.last_seq)
        if stored is not None:
            return HeldLock(
                job_id=job_id,
                owner=owner,
                execution_id=execution_id,
                fencing_token=stored,
                acquired_at=event.occurred_at,
                expires_at=event.expires_at,
            )
        # The subject moved on (a racing acquirer, or something the rule ignores): fold again.
    raise LockStateError(f"the lock of {job_id} kept changing while it was being taken; try again")


async def release_lock(
    js: JetStreamContext,
    lock: HeldLock,
    *,
    reason: ReleaseReason = "released",
    by: str | None = None,
    clock: Clock = SYSTEM_CLOCK,
) -> bool:
    """Give the lock back; False when it was no longer ours (released, forced, taken over)."""
    for _ in range(ATTEMPTS):
        read = await read_lock_state(js, lock.job_id)
        held = read.held
        if held is None or held.fencing_token != lock.fencing_token or held.owner != lock.owner:
            if held is not None and held.fencing_token == lock.fencing_token:
                return False  # the right token, the wrong owner: not ours to give back
            ended = read.ended_by(lock.fencing_token)
            # Ours already (a retry after a lost answer) counts as released.
            return ended is not None and ended.id.endswith(f".{lock.fencing_token}.released")
        event = release_event(held, reason=reason, by=by or lock.owner, now=clock.now())
        if await _publish_expecting(js, lock.job_id, event, read.last_seq) is not None:
            return True
    raise LockStateError(f"the lock of {lock.job_id} kept changing while it was being released")


async def renew_lock(
    js: JetStreamContext, lock: HeldLock, *, ttl_s: float, clock: Clock = SYSTEM_CLOCK
) -> HeldLock:
    """Extend our lock to now + `ttl_s`; LockLostError when it is no longer ours."""
    for _ in range(ATTEMPTS):
        read = await read_lock_state(js, lock.job_id)
        now = clock.now()
        why = why_lost(read, fencing_token=lock.fencing_token, now=now)
        if why is not None:
            raise LockLostError(lock.job_id, lock.fencing_token, why)
        assert read.held is not None
        if read.held.owner != lock.owner:
            raise LockLostError(
                lock.job_id,
                lock.fencing_token,
                f"it is held by {read.held.owner}, not {lock.owner}",
            )
        event = renew_event(read.held, ttl_s=ttl_s, now=now)
        if await _publish_expecting(js, lock.job_id, event, read.last_seq) is not None:
            return HeldLock(
                job_id=lock.job_id,
                owner=lock.owner,
                execution_id=lock.execution_id,
                fencing_token=lock.fencing_token,
                acquired_at=lock.acquired_at,
                expires_at=event.expires_at,
            )
    raise LockStateError(f"the lock of {lock.job_id} kept changing while it was being renewed")


async def check_lock(
    js: JetStreamContext, lock: HeldLock, clock: Clock = SYSTEM_CLOCK
) -> str | None:
    """Why `lock` is no longer held, or None while it is (expired: by `clock`'s now)."""
    read = await read_lock_state(js, lock.job_id)
    return why_lost(read, fencing_token=lock.fencing_token, now=clock.now())
