"""Queries over the batch view against oracles, and the snapshot + tail property."""

from __future__ import annotations

import math
import random
import uuid
from datetime import datetime, timedelta

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.batch.contract import BatchEvent, FinishedStatus, RecentParams, StatsParams
from services.batch.projection import BatchView, apply, batch_projection
from services.batch.queries import error_pattern, recent, stats, summary
from shared.projection import decode_snapshot, encode_snapshot, view_digest
from tests.batch.factories import T0, acquired, at, finished, progress, released, started
from tests.clocks import MOMENTS, Moment

INTERVAL = 10.0
TEMPLATES = [
    lambda r: (
        f"TimeoutError: GET https://api.example.com/v1/quotes/{r.randint(1, 9999)} "
        f"timed out after {r.randint(1, 90)}s"
    ),
    lambda r: (
        f"KeyError: 'order-{uuid.UUID(int=r.getrandbits(128))}' missing in "
        f"/var/data/batch/{r.randint(1, 99)}/prices.csv"
    ),
    lambda r: f"ValueError: bad row {r.randint(1, 10**6)} (price {r.random() * 100:.2f})",
]


def fold(events: list[BatchEvent], limit: int = 1000) -> BatchView:
    view = BatchView()
    for seq, event in enumerate(events, start=1):
        apply(view, event, seq, limit)
        view.last_seq = seq
    return view


class Planned(msgspec.Struct, kw_only=True):
    execution_id: str
    job_id: str
    started_s: float
    status: str
    duration_s: float | None = None
    template: int | None = None
    finished_s: float | None = None


def plan_history(seed: int, now: datetime, n: int = 1500) -> tuple[list[BatchEvent], list[Planned]]:
    """n executions over 48 h before `now`, every final status, some still running or lost."""
    base = now - timedelta(hours=48)
    r = random.Random(seed)
    events: list[BatchEvent] = []
    plans: list[Planned] = []
    span = 48 * 3600.0
    for i in range(n):
        job = f"job-{r.randint(0, 4)}"
        eid = f"e{i:05d}"
        t = i * span / n
        plan = Planned(execution_id=eid, job_id=job, started_s=t, status="running")
        events.append(started(eid, job_id=job, t=t, items_total=100, interval=INTERVAL, base=base))
        if i >= n - 10:
            # The newest ten are still running: five heartbeating, five silent (lost).
            beat = span - 1 if i % 2 else t
            plan.status = "running" if i % 2 else "lost"
            if i % 2:
                events.append(progress(eid, job_id=job, t=beat, done=10, base=base))
        else:
            status: FinishedStatus = r.choice(["succeeded", "succeeded", "failed", "cancelled"])
            duration = round(r.uniform(1, 600), 3)
            error = None
            if status == "failed":
                plan.template = r.randrange(len(TEMPLATES))
                error = TEMPLATES[plan.template](r)
            plan.status, plan.duration_s, plan.finished_s = status, duration, t + duration
            events.append(
                finished(
                    eid,
                    job_id=job,
                    t=t + duration,
                    status=status,
                    done=100,
                    duration_s=duration,
                    error=error,
                    base=base,
                )
            )
        plans.append(plan)
    return events, plans


def nearest_rank_p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[math.ceil(len(ordered) * 0.95) - 1]


@pytest.mark.parametrize("moment", MOMENTS)
@pytest.mark.parametrize("seed", [1, 2])
def test_history_keeps_each_jobs_newest_runs_and_stats_match_an_oracle(
    seed: int, moment: Moment
) -> None:
    """1500 runs of five jobs, each job keeping its newest 200 (the per-job bound)."""
    now = moment.at
    base = now - timedelta(hours=48)
    events, plans = plan_history(seed, now)
    view = fold(events, limit=200)
    later: dict[str, int] = {}
    kept: list[Planned] = []
    for plan in reversed(plans):
        later[plan.job_id] = later.get(plan.job_id, 0) + 1
        if later[plan.job_id] <= 200:
            kept.append(plan)
    held = kept[::-1]
    assert len(held) == 1000
    assert list(view.executions) == [p.execution_id for p in held]
    everything = recent(view, RecentParams(limit=1000), now, INTERVAL)
    assert everything.total == 1000
    assert [e.execution_id for e in everything.executions] == [
        p.execution_id for p in reversed(held)
    ]
    assert [e.status for e in everything.executions[:10]] == [
        p.status for p in reversed(held[-10:])
    ]

    for hours, job_id in [(h, j) for h in (1, 24, 48) for j in (None, "job-3")]:
        window = [
            p
            for p in held
            if at(p.started_s, base) >= now - timedelta(hours=hours)
            and (job_id is None or p.job_id == job_id)
        ]
        answer = stats(view, StatsParams(hours=hours, job_id=job_id), now, INTERVAL)
        count = {
            s: sum(1 for p in window if p.status == s)
            for s in ("succeeded", "failed", "cancelled", "running", "lost")
        }
        assert answer.total == len(window)
        assert (answer.succeeded, answer.failed, answer.cancelled) == (
            count["succeeded"],
            count["failed"],
            count["cancelled"],
        )
        assert (answer.running, answer.lost) == (count["running"], count["lost"])
        done = len(window) - count["running"]
        assert answer.success_rate == pytest.approx(count["succeeded"] * 100 / done, abs=0.01)
        durations = [p.duration_s for p in window if p.duration_s is not None]
        assert answer.avg_duration_s == pytest.approx(sum(durations) / len(durations), abs=1e-3)
        assert answer.p95_duration_s == nearest_rank_p95(durations)
        assert set(answer.by_job) == {p.job_id for p in window}
        for job, job_stats in answer.by_job.items():
            assert job_stats.total == sum(1 for p in window if p.job_id == job)

        patterns = {}
        for p in window:
            if p.status == "failed":
                assert p.template is not None and p.finished_s is not None
                seen = patterns.get(p.template, (0, base))
                patterns[p.template] = (seen[0] + 1, max(seen[1], at(p.finished_s, base)))
        lost = [p for p in window if p.status == "lost"]
        # By count, then last seen: within an hour several patterns are seen once.
        expected = sorted(patterns.values(), key=lambda c: (-c[0], c[1]))
        got = [(fp.count, fp.last_seen) for fp in answer.failure_patterns if "lost" not in fp.error]
        assert sorted(got, key=lambda c: (-c[0], c[1])) == expected
        assert sum(fp.count for fp in answer.failure_patterns if "lost" in fp.error) == len(lost)


@pytest.mark.parametrize("moment", MOMENTS)
def test_summary_counts_running_failed_and_lost_in_24h_and_expired_locks(moment: Moment) -> None:
    now = moment.at
    base = now - timedelta(hours=48)
    events, plans = plan_history(3, now, n=200)
    events += [
        acquired(job_id="a", ttl=10, base=base),
        acquired(job_id="b", ttl=10**6, base=base),
    ]
    view = fold(events)
    answer = summary(view, now, INTERVAL)
    window = [p for p in plans if at(p.started_s, base) >= now - timedelta(hours=24)]
    assert answer.running == sum(1 for p in plans if p.status == "running")
    assert answer.failed_24h == sum(1 for p in window if p.status in ("failed", "lost"))
    assert answer.expired_locks == 1


@pytest.mark.parametrize("moment", MOMENTS)
def test_running_execution_turns_lost_after_three_silent_intervals(moment: Moment) -> None:
    # The last heartbeat's three intervals run out at the moment itself.
    base = moment.at - timedelta(seconds=11)
    view = fold([started("e1", interval=2.0, base=base), progress("e1", t=5, base=base)])
    params = RecentParams(limit=1)
    assert recent(view, params, moment.at, INTERVAL).executions[0].status == "running"
    assert recent(view, params, at(11.01, base), INTERVAL).executions[0].status == "lost"
    base = moment.at - timedelta(seconds=30)
    view = fold([started("e1", interval=None, base=base)])
    assert recent(view, params, moment.at, INTERVAL).executions[0].status == "running"
    assert recent(view, params, at(31, base), INTERVAL).executions[0].status == "lost"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("timeout after 30s on /data/1/a.csv", "timeout after 45s on /srv/x/b.csv"),
        (
            "order 3f2a9c1e-1b2c-4d5e-8f90-123456789abc failed",
            "order 00000000-0000-4000-8000-000000000000 failed",
        ),
        ("row 12 of req-7f3a invalid", "row 999 of req-8b1c invalid"),
        ("price 1.25 too low\nTraceback...", "price 100.5 too low\nother"),
    ],
)
def test_errors_differing_only_in_numbers_ids_or_paths_share_a_pattern(a: str, b: str) -> None:
    assert error_pattern(a) == error_pattern(b)


def test_different_errors_keep_different_patterns() -> None:
    assert error_pattern("KeyError: 'price'") != error_pattern("KeyError: 'volume'")
    assert error_pattern("timeout after 30s") != error_pattern("refused after 30s")


# ----- property: a snapshot plus the tail is the full replay --------------------------------

JOBS = st.sampled_from(["j0", "j1", "j2"])
EXECUTIONS = st.sampled_from(["e0", "e1", "e2", "e3"])
OWNERS = st.sampled_from(["w0", "w1"])
TIMES = st.integers(min_value=0, max_value=200)

EVENTS = st.one_of(
    st.builds(
        lambda e, j, t, n: started(e, job_id=j, t=t, items_total=n),
        EXECUTIONS,
        JOBS,
        TIMES,
        st.none() | st.integers(0, 100),
    ),
    st.builds(
        lambda e, j, t, d: progress(e, job_id=j, t=t, done=d, cpu=d / 2, memory_mb=d),
        EXECUTIONS,
        JOBS,
        TIMES,
        st.integers(0, 100),
    ),
    st.builds(
        lambda e, j, t, s, err: finished(e, job_id=j, t=t, status=s, error=err),
        EXECUTIONS,
        JOBS,
        TIMES,
        st.sampled_from(["succeeded", "failed", "cancelled"]),
        st.none() | st.sampled_from(["boom 1", "boom 2", "other"]),
    ),
    st.builds(
        lambda j, o, t, ttl: acquired(job_id=j, owner=o, t=t, ttl=ttl),
        JOBS,
        OWNERS,
        TIMES,
        st.integers(1, 100),
    ),
    st.builds(
        lambda j, o, t, r: released(job_id=j, owner=o, t=t, reason=r, by="x"),
        JOBS,
        OWNERS,
        TIMES,
        st.sampled_from(["released", "forced", "expired"]),
    ),
)
_encode = msgspec.json.Encoder().encode


@settings(max_examples=150, deadline=None)
@given(
    events=st.lists(EVENTS, max_size=40),
    cut=st.integers(min_value=0, max_value=40),
    limit=st.integers(min_value=1, max_value=5),
)
def test_snapshot_plus_tail_equals_full_replay(
    events: list[BatchEvent], cut: int, limit: int
) -> None:
    stored = [_encode(e) for e in events]
    cut = min(cut, len(stored))
    full = batch_projection(limit)
    full_alerts = [a.id for seq, data in enumerate(stored, 1) for a in full.fold(seq, data)]

    head = batch_projection(limit)
    head_alerts = [a.id for seq, data in enumerate(stored[:cut], 1) for a in head.fold(seq, data)]
    resumed = batch_projection(limit)
    resumed.view, _ = decode_snapshot(encode_snapshot(head, T0), BatchView)  # any stamp
    tail_alerts = [
        a.id
        for seq, data in enumerate(stored, 1)
        if seq > resumed.view.last_seq
        for a in resumed.fold(seq, data)
    ]
    assert view_digest(resumed.view) == view_digest(full.view)
    assert resumed.view == full.view
    assert head_alerts + tail_alerts == full_alerts
