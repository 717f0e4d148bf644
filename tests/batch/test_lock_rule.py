"""One rule for locks: random interleavings on a real nats-server, the API and the workers
checked against a model of the rule (issue #18).

Acquires (through the worker primitive, and raw: with the expected-sequence header, with a
stale one, without), renewals and releases (by the holder and by others, with the right and
the wrong fencing token, with and without the header) and moves of the clock. After each step
the worker's fold of the lock subject and the API's `lock/status` must both say what the model
says.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from litestar.testing import AsyncTestClient
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import BadRequestError

from services.batch.contract import (
    BatchStarted,
    JobScheduled,
    LockAcquired,
    LockEvent,
    LockReleased,
    LockRenewed,
    ReleaseReason,
    lock_subject,
    run_subject,
)
from services.batch.errors import LockHeldError
from services.batch.locks import (
    EXPECTED_LAST_SUBJECT_SEQ,
    acquire_lock,
    read_lock_state,
)
from shared.clock import ManualClock
from shared.dead_letters import DeadLetter, dead_letter_subject
from shared.publish import publish_event
from shared.runtime import Runtime

OWNERS = ["w0", "w1", "mallory"]
JOBS = itertools.count()


@dataclass
class Holder:
    owner: str
    token: int
    expires_at: datetime


@dataclass
class Model:
    """The rule as the contract words it, written apart from services.batch.lockrule."""

    holder: Holder | None = None

    def live(self, now: datetime) -> bool:
        return self.holder is not None and self.holder.expires_at > now

    def acquired(self, owner: str, seq: int, at: datetime, expires_at: datetime) -> None:
        if not self.live(at):  # an acquire stored while the lock is live changes nothing
            self.holder = Holder(owner, seq, expires_at)

    def renewed(self, owner: str, token: int, at: datetime, expires_at: datetime) -> None:
        h = self.holder
        if h is not None and (h.owner, h.token) == (owner, token) and h.expires_at > at:
            h.expires_at = expires_at

    def released(self, owner: str, by: str, reason: str, token: int | None, at: datetime) -> None:
        h = self.holder
        if h is None or h.owner != owner or (token is not None and token != h.token):
            return
        by_holder = reason == "released" and by == owner
        by_service = reason in ("forced", "lost") or (reason == "expired" and h.expires_at <= at)
        if by_holder or by_service:
            self.holder = None


release_step = st.tuples(
    st.just("release"),
    st.sampled_from(["holder", *OWNERS]),  # whose lock it names
    st.sampled_from(["same", *OWNERS]),  # who releases
    st.sampled_from(["released", "forced", "expired", "lost"]),
    st.sampled_from(["right", "wrong", "absent"]),
    st.sampled_from(["current", "none"]),
)
step = st.one_of(
    st.tuples(st.just("acquire"), st.sampled_from(OWNERS), st.integers(1, 6)),
    release_step,
    st.tuples(
        st.just("raw_acquire"),
        st.sampled_from(OWNERS),
        st.integers(1, 6),
        st.sampled_from(["current", "stale", "none"]),
    ),
    st.tuples(
        st.just("renew"),
        st.sampled_from(["holder", *OWNERS]),
        st.booleans(),  # the holder's fencing token (or a wrong one)
        st.integers(1, 6),
        st.sampled_from(["current", "none"]),
    ),
    st.tuples(
        st.just("release"),
        st.sampled_from(["holder", *OWNERS]),  # whose lock it names
        st.sampled_from(["same", *OWNERS]),  # who releases
        st.sampled_from(["released", "forced", "expired", "lost"]),
        st.sampled_from(["right", "wrong", "absent"]),
        st.sampled_from(["current", "none"]),
    ),
    st.tuples(st.just("advance"), st.integers(0, 3000)),
    # A lock event naming another job, stored on this job's subject: a dead letter.
    st.tuples(st.just("foreign"), st.sampled_from(["acquire", "release"])),
)


async def _publish(
    js: JetStreamContext, job_id: str, event: LockEvent, header: str, last_seq: int
) -> int | None:
    """Store `event` raw; its sequence, or None when the server refused the stale header."""
    headers: dict[str, str] = {}
    if header == "current":
        headers[EXPECTED_LAST_SUBJECT_SEQ] = str(last_seq)
    elif header == "stale":
        headers[EXPECTED_LAST_SUBJECT_SEQ] = str(last_seq + 7)
    try:
        ack = await publish_event(js, lock_subject(job_id), event, headers=headers)
    except BadRequestError:
        assert header == "stale"
        return None
    assert header != "stale"
    return int(ack.seq)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=st.lists(step, min_size=1, max_size=14))
async def test_api_and_workers_decide_every_interleaving_as_the_model(
    steps: list[tuple[Any, ...]],
    nc: NATS,
    service: Runtime,
    api: AsyncTestClient[Any],
    clock: ManualClock,
) -> None:
    js = nc.jetstream()
    job_id = f"prop-{next(JOBS)}"
    model = Model()
    projection = service.definition.projections[0]
    n = 0
    for op in steps:
        n += 1
        now = clock.now()
        last_seq = (await read_lock_state(js, job_id)).last_seq
        token = model.holder.token if model.holder is not None else 0
        match op:
            case ("acquire", owner, ttl):
                free = not model.live(now)
                try:
                    held = await acquire_lock(
                        js, job_id, owner=owner, execution_id=f"e{n}", ttl_s=ttl, clock=clock
                    )
                except LockHeldError as refused:
                    assert not free, "the worker was refused a free lock"
                    assert model.holder is not None
                    assert (refused.owner, refused.fencing_token) == (
                        model.holder.owner,
                        model.holder.token,
                    )
                else:
                    assert free, "the worker took a live lock"
                    model.acquired(owner, held.fencing_token, now, held.expires_at)
            case ("raw_acquire", owner, ttl, header):
                expires = now + timedelta(seconds=ttl)
                event = LockAcquired(
                    id=f"{job_id}.raw.{n}",
                    occurred_at=now,
                    job_id=job_id,
                    owner=owner,
                    execution_id=f"r{n}",
                    expires_at=expires,
                )
                seq = await _publish(js, job_id, event, header, last_seq)
                if seq is not None:
                    model.acquired(owner, seq, now, expires)
            case ("renew", owner, right, ttl, header):
                owner = _named(owner, model)
                named = token if right else token + 1000
                expires = now + timedelta(seconds=ttl)
                renewal = LockRenewed(
                    id=f"{job_id}.renew.{n}",
                    occurred_at=now,
                    job_id=job_id,
                    owner=owner,
                    fencing_token=named,
                    expires_at=expires,
                )
                if await _publish(js, job_id, renewal, header, last_seq) is not None:
                    model.renewed(owner, named, now, expires)
            case ("release", owner, by, reason, which, header):
                owner = _named(owner, model)
                by = owner if by == "same" else by
                named_token = {"right": token, "wrong": token + 1000, "absent": None}[which]
                release = LockReleased(
                    id=f"{job_id}.release.{n}",
                    occurred_at=now,
                    job_id=job_id,
                    owner=owner,
                    reason=_reason(reason),
                    by=by,
                    fencing_token=named_token,
                )
                if await _publish(js, job_id, release, header, last_seq) is not None:
                    model.released(owner, by, reason, named_token, now)
            case ("advance", ms):
                clock.advance(timedelta(milliseconds=ms))
            case ("foreign", kind):
                other = f"{job_id}-other"
                foreign: LockEvent = (
                    LockAcquired(
                        id=f"{job_id}.foreign.{n}",
                        occurred_at=now,
                        job_id=other,
                        owner="mallory",
                        expires_at=now + timedelta(hours=1),
                    )
                    if kind == "acquire"
                    else LockReleased(
                        id=f"{job_id}.foreign.{n}",
                        occurred_at=now,
                        job_id=other,
                        owner=model.holder.owner if model.holder else "w0",
                        reason="forced",
                        by="batch",
                    )
                )
                await _publish(js, job_id, foreign, "current", last_seq)  # the model: no change
        await _check(js, api, projection, job_id, model, clock)


def _named(owner: str, model: Model) -> str:
    """ "holder" stands for the model's holder (so the interesting cases come up often)."""
    if owner != "holder":
        return owner
    return model.holder.owner if model.holder is not None else OWNERS[0]


def _reason(reason: str) -> ReleaseReason:
    assert reason in ("released", "forced", "expired", "lost")
    return reason  # type: ignore[return-value]


async def _check(
    js: JetStreamContext,
    api: AsyncTestClient[Any],
    projection: Any,
    job_id: str,
    model: Model,
    clock: ManualClock,
) -> None:
    now = clock.now()
    read = await read_lock_state(js, job_id)
    holder = model.holder
    # The workers' fold.
    if holder is None:
        assert read.held is None
    else:
        assert read.held is not None
        assert (read.held.owner, read.held.fencing_token, read.held.expires_at) == (
            holder.owner,
            holder.token,
            holder.expires_at,
        )
    # The API, once the service has folded the subject's last event.
    for _ in range(200):
        if projection.view.last_seq >= read.last_seq:
            break
        await _sleep()
    status = (await api.get(f"/api/v1/batch/jobs/{job_id}/lock/status")).json()
    if holder is None:
        assert (status["locked"], status["owner"], status["fencing_token"]) == (False, None, None)
    else:
        assert (status["owner"], status["fencing_token"]) == (holder.owner, holder.token)
        assert datetime.fromisoformat(status["expires_at"]) == holder.expires_at
        assert status["locked"] is (holder.expires_at > now)


async def _sleep() -> None:
    await asyncio.sleep(0.01)


async def test_mallory_cannot_release_or_take_the_lock_and_the_api_keeps_the_real_holder(
    nc: NATS, service: Runtime, api: AsyncTestClient[Any], clock: ManualClock
) -> None:
    """The issue's case: a non-owner release and a header-less acquire once made the API name
    "mallory" while the real holder kept its fencing token; now neither changes the lock."""
    js = nc.jetstream()
    held = await acquire_lock(js, "nightly", owner="w1", execution_id="e1", ttl_s=60, clock=clock)
    now = clock.now()
    junk: list[LockEvent] = [
        LockReleased(
            id="m1", occurred_at=now, job_id="nightly", owner="w1", reason="released", by="mallory"
        ),
        LockAcquired(
            id="m2",
            occurred_at=now,
            job_id="nightly",
            owner="mallory",
            expires_at=now + timedelta(hours=1),
        ),
    ]
    for event in junk:
        await publish_event(js, lock_subject("nightly"), event)  # no expected sequence
    read = await read_lock_state(js, "nightly")
    assert read.held is not None
    assert (read.held.owner, read.held.fencing_token) == ("w1", held.fencing_token)
    projection = service.definition.projections[0]
    for _ in range(200):
        if projection.view.last_seq >= read.last_seq:
            break
        await _sleep()
    status = (await api.get("/api/v1/batch/jobs/nightly/lock/status")).json()
    assert (status["owner"], status["fencing_token"], status["locked"]) == (
        "w1",
        held.fencing_token,
        True,
    )
    assert status["ignored_acquires"] == 1
    with pytest.raises(LockHeldError) as refused:
        await acquire_lock(js, "nightly", owner="w2", execution_id="e2", ttl_s=60, clock=clock)
    assert refused.value.owner == "w1"


async def test_batch_events_on_a_subject_they_do_not_belong_to_are_dead_letters(
    nc: NATS, service: Runtime, api: AsyncTestClient[Any], clock: ManualClock
) -> None:
    """Contract §4: a lock event whose job_id is not its subject's token, a run event on a lock
    subject and a schedule on a run subject are dead letters. Before, the projection applied
    them to the job they named (a forced release of "nightly" stored on another job's subject
    freed nightly in the API while the workers still saw w1 holding it)."""
    js = nc.jetstream()
    letters = await nc.subscribe(dead_letter_subject("batch"))
    held = await acquire_lock(js, "nightly", owner="w1", execution_id="e1", ttl_s=60, clock=clock)
    now = clock.now()
    misplaced: list[tuple[str, Any]] = [
        (
            lock_subject("other"),
            LockReleased(
                id="x1",
                occurred_at=now,
                job_id="nightly",
                owner="w1",
                reason="forced",
                by="batch",
                fencing_token=held.fencing_token,
            ),
        ),
        (
            lock_subject("nightly"),
            LockAcquired(
                id="x2",
                occurred_at=now,
                job_id="other",
                owner="mallory",
                expires_at=now + timedelta(hours=1),
            ),
        ),
        (
            lock_subject("nightly"),
            BatchStarted(
                id="x3", occurred_at=now, execution_id="x3", job_id="nightly", host="h", pid=1
            ),
        ),
        (
            run_subject("nightly"),
            JobScheduled(id="x4", occurred_at=now, job_id="nightly", every_s=60),
        ),
    ]
    for subject, event in misplaced:
        await publish_event(js, subject, event)
    reasons = []
    for _ in misplaced:
        letter = msgspec.json.decode((await letters.next_msg(timeout=5)).data, type=DeadLetter)
        reasons.append((letter.subject, letter.reason))
    await letters.unsubscribe()
    nightly, other, run = lock_subject("nightly"), lock_subject("other"), run_subject("nightly")
    assert reasons == [
        (other, f"a lock event of job 'nightly' belongs on {nightly}, not on {other}"),
        (nightly, f"a lock event of job 'other' belongs on {other}, not on {nightly}"),
        (nightly, f"a run event of job 'nightly' belongs on {run}, not on {nightly}"),
        (
            run,
            "a schedule of job 'nightly' belongs on stockpilot.batch.schedule.nightly, "
            f"not on {run}",
        ),
    ]
    read = await read_lock_state(js, "nightly")
    assert read.held is not None and read.held.owner == "w1"
    status = (await api.get("/api/v1/batch/jobs/nightly/lock/status")).json()
    assert (status["owner"], status["fencing_token"], status["locked"]) == (
        "w1",
        held.fencing_token,
        True,
    )
    other = (await api.get("/api/v1/batch/jobs/other/lock/status")).json()
    assert (other["locked"], other["owner"]) == (False, None)
    jobs = (await api.get("/api/v1/batch/jobs")).json()["jobs"]
    assert jobs == []  # no run started and no schedule taken from the run subject
