"""The batch fold, its reactions and the lock decisions: pure, no broker."""

from __future__ import annotations

from datetime import timedelta

import msgspec
import pytest

from services.batch.client import batch_job
from services.batch.contract import BatchEvent, LockEvent
from services.batch.decide import decide_acquire, expired_locks, release_event, why_lost
from services.batch.errors import BatchError, InvalidJobIdError, LockHeldError
from services.batch.lockrule import LockRead
from services.batch.projection import (
    MAX_TRACEBACK_CHARS,
    MAX_WARNING_CHARS,
    MAX_WARNINGS,
    BatchView,
    apply,
    batch_projection,
)
from services.batch.queries import lock_status
from shared.projection import decode_snapshot, encode_snapshot
from tests.batch.factories import (
    T0,
    acquired,
    at,
    finished,
    progress,
    released,
    started,
)
from tests.clocks import MOMENTS, Moment


def fold(events: list[BatchEvent], limit: int = 1000) -> BatchView:
    view = BatchView()
    for seq, event in enumerate(events, start=1):
        apply(view, event, seq, limit)
        view.last_seq = seq
    return view


def test_progress_updates_items_progress_memory_and_cpu() -> None:
    view = fold(
        [
            started("e1", items_total=200),
            progress("e1", t=1, done=50, memory_mb=80, cpu=20),
            progress("e1", t=2, done=150, memory_mb=140, cpu=60),
        ]
    )
    execution = view.executions["e1"]
    assert execution.status == "running"
    assert execution.items_processed == 150
    assert execution.progress_pct == 75.0
    assert execution.peak_memory_mb == 140
    assert execution.avg_cpu_percent == 40.0
    assert execution.last_heartbeat_at == at(2)


def test_progress_can_announce_the_total_late() -> None:
    view = fold([started("e1"), progress("e1", done=5, total=20)])
    assert view.executions["e1"].items_total == 20
    assert view.executions["e1"].progress_pct == 25.0


def test_finished_records_outcome_and_keeps_the_peak_memory() -> None:
    view = fold(
        [
            started("e1", items_total=10),
            progress("e1", done=5, memory_mb=300),
            finished("e1", status="failed", done=5, error="boom", memory_mb=200),
        ]
    )
    execution = view.executions["e1"]
    assert execution.status == "failed"
    assert execution.error == "boom"
    assert execution.peak_memory_mb == 300
    assert execution.progress_pct == 50.0
    assert execution.finished_at == at(10)


def test_events_of_unknown_or_finished_executions_are_counted_not_applied() -> None:
    view = fold(
        [
            progress("ghost"),
            started("e1"),
            finished("e1"),
            progress("e1", t=11, done=99),
            finished("e1", status="failed"),
        ]
    )
    assert view.orphan_events == 3
    assert view.executions["e1"].status == "succeeded"
    assert view.executions["e1"].items_processed == 10


def test_history_keeps_only_the_newest_executions() -> None:
    events: list[BatchEvent] = [started(f"e{i}", t=i) for i in range(1500)]
    view = fold(events, limit=1000)
    assert list(view.executions) == [f"e{i}" for i in range(500, 1500)]
    assert view.evicted == 500


def test_lock_acquired_sets_holder_with_its_sequence_as_fencing_token() -> None:
    view = fold([started("x"), acquired(owner="w1", ttl=60)])
    lock = view.locks["job"]
    assert (lock.owner, lock.fencing_token, lock.expires_at) == ("w1", 2, at(60))


def test_acquire_while_another_lock_is_live_is_ignored_and_counted() -> None:
    view = fold([acquired(owner="w1", ttl=60), acquired(owner="w2", t=30)])
    assert view.locks["job"].owner == "w1"
    assert view.locks["job"].fencing_token == 1
    assert view.ignored_acquires == 1
    assert view.locks["job"].ignored_acquires == 1


@pytest.mark.parametrize("moment", MOMENTS)
def test_acquire_after_expiry_takes_the_lock_with_a_higher_token(moment: Moment) -> None:
    base = moment.at - timedelta(seconds=60)  # the first lock expires at the moment itself
    view = fold([acquired(owner="w1", ttl=60, base=base), acquired(owner="w2", t=60, base=base)])
    assert view.locks["job"].owner == "w2"
    assert view.locks["job"].fencing_token == 2
    assert view.ignored_acquires == 0


def test_release_by_the_holder_frees_the_lock_and_others_are_ignored() -> None:
    view = fold([acquired(owner="w1"), released(owner="w2")])
    assert view.locks["job"].owner == "w1"
    assert view.ignored_releases == 1
    view = fold([acquired(owner="w1"), released(owner="w1")])
    assert "job" not in view.locks
    status = lock_status(view, "job", at(1))
    assert (status.locked, status.owner, status.fencing_token) == (False, None, None)


@pytest.mark.parametrize("moment", MOMENTS)
def test_lock_expiry_is_judged_at_query_time(moment: Moment) -> None:
    base = moment.at - timedelta(seconds=2)  # the lock expires at the moment itself
    view = fold([acquired(owner="w1", ttl=2, base=base)])
    before = lock_status(view, "job", at(1.9, base))
    after = lock_status(view, "job", moment.at)
    assert (before.locked, before.expired) == (True, False)
    assert (after.locked, after.expired) == (False, True)
    assert [lock.job_id for lock in expired_locks(view, moment.at)] == ["job"]
    assert expired_locks(view, at(1, base)) == []


def test_failed_run_raises_job_failed_once_with_a_deterministic_id() -> None:
    view = fold([started("e1", job_id="sync")])
    event = finished("e1", job_id="sync", status="failed", error="boom")
    alerts = apply(view, event, 2)
    assert [a.id for a in alerts] == ["batch.job_failed:sync:e1"]
    assert alerts[0].subject == "stockpilot.alerts.batch.job_failed"
    assert "boom" in alerts[0].message
    ok = finished("e2", job_id="sync")
    assert list(apply(view, ok, 3)) == []


def test_cleanup_release_raises_lock_expired_per_job_and_token() -> None:
    view = fold([acquired(owner="w1", ttl=2)])
    event = released(owner="w1", t=3, reason="expired", by="admin")
    alerts = apply(view, event, 2)
    assert [a.id for a in alerts] == ["batch.lock_expired:job:1"]
    # A forced release alerts too now (issue #18), naming who forced it; a cleanup does not.
    forced = released(owner="w1", t=3, reason="forced", by="admin:ops-anna")
    view2 = fold([acquired(owner="w1", ttl=2)])
    alerts = list(apply(view2, forced, 2))
    assert [a.id for a in alerts] == ["batch.lock_forced:job:1"]
    assert "admin:ops-anna" in alerts[0].title and "w1" in alerts[0].message


def test_an_ignored_forced_release_raises_nothing() -> None:
    view = fold([acquired(owner="w1", ttl=60)])
    forced = released(owner="someone-else", t=3, reason="forced", by="admin")
    assert list(apply(view, forced, 2)) == []
    assert view.locks["job"].owner == "w1"


def held_after(events: list[LockEvent]) -> LockRead:
    """The lock subject `events` (sequences 1, 2, …) folded as a worker folds it."""
    read = LockRead(job_id="job")
    for seq, event in enumerate(events, start=1):
        read.apply(event, seq)
        read.last_seq = seq
    return read


@pytest.mark.parametrize("moment", MOMENTS)
def test_decide_acquire_refuses_a_live_lock_naming_the_holder(moment: Moment) -> None:
    # Taken 59 s before the moment, for 60 s: still live a second before it expires.
    live = held_after([acquired(owner="host:1", ttl=60, base=moment.at - timedelta(seconds=59))])
    with pytest.raises(LockHeldError) as caught:
        decide_acquire(
            live.held, job_id="job", owner="me", execution_id="x", ttl_s=10, now=moment.at
        )
    assert caught.value.owner == "host:1"
    assert caught.value.fencing_token == 1
    assert "host:1" in caught.value.detail
    assert caught.value.status == 409
    assert isinstance(caught.value, BatchError)


@pytest.mark.parametrize("moment", MOMENTS)
def test_decide_acquire_takes_a_free_or_expired_lock(moment: Moment) -> None:
    base = moment.at - timedelta(seconds=60)  # the old lock expires at the moment itself
    histories: list[list[LockEvent]] = [
        [],
        [acquired(base=base), released(base=base)],
        [acquired(ttl=60, base=base)],
    ]
    for history in histories:
        event = decide_acquire(
            held_after(history).held,
            job_id="job",
            owner="me",
            execution_id="x",
            ttl_s=10,
            now=moment.at,
        )
        assert event.owner == "me"
        assert event.occurred_at == moment.at
        assert event.expires_at == at(70, base)


def test_a_non_owner_release_leaves_the_lock_held_for_workers_too() -> None:
    """The last message on the subject is not the lock: the fold of all of them is."""
    read = held_after([acquired(owner="w1", ttl=60), released(owner="mallory", by="mallory")])
    assert read.held is not None and read.held.owner == "w1"
    with pytest.raises(LockHeldError):
        decide_acquire(read.held, job_id="job", owner="me", execution_id="x", ttl_s=1, now=at(5))


@pytest.mark.parametrize("moment", MOMENTS)
def test_why_lost_names_forced_release_takeover_lost_and_expiry(moment: Moment) -> None:
    base = moment.at - timedelta(seconds=60)  # the lock expires at the moment itself
    mine = acquired(owner="w1", ttl=60, base=base)
    forced = released(owner="w1", reason="forced", by="admin", base=base)
    assert "force-released by admin" in (
        why_lost(held_after([mine, forced]), fencing_token=1, now=at(1, base)) or ""
    )
    lost = released(owner="w1", reason="lost", by="batch", base=base)
    assert "declared lost" in (
        why_lost(held_after([mine, lost]), fencing_token=1, now=at(1, base)) or ""
    )
    other = acquired(owner="w2", t=60, base=base)
    assert "taken over by w2" in (
        why_lost(held_after([mine, other]), fencing_token=1, now=at(61, base)) or ""
    )
    assert "expired" in (why_lost(held_after([mine]), fencing_token=1, now=moment.at) or "")
    assert why_lost(held_after([mine]), fencing_token=1, now=at(59, base)) is None


def test_release_event_id_is_one_per_lock() -> None:
    view = fold([acquired(owner="w1")])
    lock = view.locks["job"]
    a = release_event(lock, reason="forced", by="a", now=at(1))
    b = release_event(lock, reason="expired", by="b", now=at(2))
    assert a.id == b.id == "lock.job.1.released"


def test_snapshot_of_the_full_bounded_history_stays_small_and_round_trips() -> None:
    events: list[BatchEvent] = []
    for i in range(1000):
        events.append(started(f"{i:032x}", job_id=f"job-{i % 50}", t=i, items_total=1000))
        big = finished(f"{i:032x}", job_id=f"job-{i % 50}", t=i + 5, status="failed")
        big = msgspec.structs.replace(
            big,
            error="E" * 10_000,
            traceback="T" * 10_000,
            warnings=["W" * 1000] * 100,
        )
        events.append(big)
    projection = batch_projection()
    for seq, event in enumerate(events, start=1):
        apply(projection.view, event, seq)
        projection.view.last_seq = seq
    execution = next(iter(projection.view.executions.values()))
    assert len(execution.warnings) == MAX_WARNINGS
    assert len(execution.warnings[0]) == MAX_WARNING_CHARS
    assert len(execution.traceback or "") == MAX_TRACEBACK_CHARS
    data = encode_snapshot(projection, T0)  # the taken-at stamp only; any instant does
    # Bounded: well under the 1 MiB KV/payload limit even at the largest size.
    assert len(data) < 1024 * 1024
    restored, _ = decode_snapshot(data, BatchView)
    assert restored == projection.view


@pytest.mark.parametrize("job_id", ["a.b", "*", ">", "a b", "x" * 65, "prix-é", ""])
def test_client_refuses_a_bad_job_id_before_touching_nats(job_id: str) -> None:
    with pytest.raises(InvalidJobIdError) as caught:
        batch_job(None, job_id)  # type: ignore[arg-type]
    assert caught.value.status == 422
    assert "job_id" in caught.value.detail
