"""The health fold: hysteresis, status-change alerts, bounded history, replay equivalence."""

from __future__ import annotations

from datetime import datetime, timedelta

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.health.contract import HealthChecked, HealthEvent, HostSampled, Status
from services.health.projection import (
    FLAP_CHANGES,
    FLAP_WINDOW_S,
    FoldPolicy,
    HealthView,
    apply,
    make_apply,
)
from shared.events import Alert
from shared.projection import FoldError, Projection, decode_snapshot, encode_snapshot
from shared.streams import STREAMS
from tests.clocks import MOMENTS, NOON, Moment

# 09:00 UTC on the day of the run's noon (tests.clocks.NOON): on the hour, never a literal date.
T0 = NOON - timedelta(hours=3)
POLICY = FoldPolicy(down_after=3, up_after=2)
SHORT = {"h": "healthy", "d": "degraded", "u": "unhealthy", "?": "unknown"}


def checked(
    i: int,
    status: Status,
    component: str = "database",
    latency: float | None = 5.0,
    base: datetime = T0,
) -> HealthChecked:
    """The i-th result of a probe every 30 s from `base`."""
    return HealthChecked(
        id=f"hc-{i}-{component}",
        occurred_at=base + timedelta(seconds=30 * i),
        component=component,
        kind="database" if component == "database" else "external_api",
        status=status,
        latency_ms=latency,
        error=None if status == "healthy" else f"{status} on purpose",
    )


def fold(
    statuses: str, policy: FoldPolicy = POLICY, component: str = "database"
) -> tuple[HealthView, list[Alert], list[Status]]:
    """Fold results given as letters; the confirmed status after each, and every alert."""
    view = HealthView()
    alerts: list[Alert] = []
    confirmed: list[Status] = []
    for i, letter in enumerate(statuses):
        event = checked(i, SHORT[letter], component)  # type: ignore[arg-type]
        alerts.extend(apply(view, event, policy))
        confirmed.append(view.components[component].status)
    return view, alerts, confirmed


@pytest.mark.parametrize(
    ("results", "confirmed", "alerts"),
    [
        # The first result is the status: nothing to flap from.
        ("h", "h", []),
        ("u", "u", ["unhealthy"]),
        # Going down takes 3 consecutive results in the new state.
        ("hu", "hh", []),
        ("huu", "hhh", []),
        ("huuu", "hhhu", ["unhealthy"]),
        ("huuuu", "hhhuu", ["unhealthy"]),
        # A flapping target never flips.
        ("huhuhuhu", "hhhhhhhh", []),
        ("huuhuuhuu", "hhhhhhhhh", []),
        # Coming back takes 2.
        ("huuuh", "hhhuu", ["unhealthy"]),
        ("huuuhh", "hhhuuh", ["unhealthy", "healthy"]),
        ("huuuhuhh", "hhhuuuuh", ["unhealthy", "healthy"]),
        # A change needs consecutive results in the *same* new state.
        ("hdud", "hhhh", []),
        ("hddd", "hhhd", ["degraded"]),
        ("hdddu", "hhhdd", ["degraded"]),
        ("hddduuu", "hhhdddu", ["degraded", "unhealthy"]),
        # Better-but-not-healthy is "coming back": 2 results.
        ("huuudd", "hhhuud", ["unhealthy", "degraded"]),
        # Switching a probe off or on follows at once; unknown → healthy is not news.
        ("h?", "h?", []),
        ("?h", "?h", []),
        ("?u", "?u", ["unhealthy"]),
        ("hu?u", "hh?u", ["unhealthy"]),
    ],
)
def test_hysteresis_table(results: str, confirmed: str, alerts: list[str]) -> None:
    _, raised, statuses = fold(results)
    assert "".join(next(k for k, v in SHORT.items() if v == s) for s in statuses) == confirmed
    assert [a.title.rsplit(" ", 1)[1] for a in raised] == alerts


def test_hysteresis_counts_are_configurable() -> None:
    _, alerts, statuses = fold("huh", FoldPolicy(down_after=1, up_after=1))
    assert statuses == ["healthy", "unhealthy", "healthy"]
    assert len(alerts) == 2


def test_a_confirmed_change_gives_exactly_one_alert_with_a_deterministic_id() -> None:
    view, alerts, _ = fold("huuuuuuu")
    [alert] = alerts
    confirming = checked(3, "unhealthy")
    at = (T0 + timedelta(seconds=90)).strftime("%Y-%m-%dT%H:%M:%SZ")  # the 4th result
    assert alert.id == f"health.status_changed:database:{at}"
    assert alert.occurred_at == confirming.occurred_at
    assert alert.kind == "health.status_changed"
    assert alert.source == "health"
    assert alert.severity == "critical"
    assert "healthy to unhealthy after 3 consecutive" in alert.message
    assert "unhealthy on purpose" in alert.message
    assert alert.subject == "stockpilot.alerts.health.status_changed"
    transition = view.components["database"].last_transition
    assert transition is not None and transition.event_id == confirming.id


def test_components_are_independent() -> None:
    view = HealthView()
    for i in range(3):
        apply(view, checked(i, "unhealthy", "external.a"), POLICY)
        apply(view, checked(i, "healthy", "external.b"), POLICY)
    assert view.components["external.a"].status == "unhealthy"
    assert view.components["external.b"].status == "healthy"


def test_latest_result_and_pending_change_are_kept() -> None:
    view, _, _ = fold("huu")
    state = view.components["database"]
    assert state.status == "healthy"
    assert state.latest.status == "unhealthy"
    assert (state.pending, state.streak) == ("unhealthy", 2)
    assert state.since == T0
    assert view.checked_at == T0 + timedelta(seconds=60)


@pytest.mark.parametrize("moment", MOMENTS)
def test_raw_history_is_bounded_by_a_day_and_by_count(moment: Moment) -> None:
    # 25 whole hours (buckets are UTC hours) ending in the hour before the moment's.
    base = moment.at.replace(minute=0, second=0, microsecond=0) - timedelta(hours=25)
    view = HealthView()
    policy = FoldPolicy(max_samples=100, max_hours=5)
    for i in range(3000):  # 25 hours at 30 s
        apply(view, checked(i, "healthy", base=base), policy)
    state = view.components["database"]
    assert len(state.samples) == 100
    assert state.samples[-1].t == checked(2999, "healthy", base=base).occurred_at.timestamp()
    assert len(state.hours) == 5
    assert sum(state.hours[-1].counts) == 120


@pytest.mark.parametrize("moment", MOMENTS)
def test_samples_older_than_a_day_are_dropped(moment: Moment) -> None:
    base = moment.at - timedelta(seconds=30 * (2 * 2880 + 1))  # the second result: the moment
    view = HealthView()
    apply(view, checked(0, "healthy", base=base), POLICY)
    apply(view, checked(2 * 2880 + 1, "unhealthy", base=base), POLICY)  # two days later
    assert len(view.components["database"].samples) == 1


def test_hourly_buckets_count_statuses_and_latency() -> None:
    view = HealthView()
    for i, letter in enumerate("hhduu"):
        apply(view, checked(i, SHORT[letter], latency=10.0 * (i + 1)), POLICY)  # type: ignore[arg-type]
    [bucket] = view.components["database"].hours
    assert bucket.counts == [2, 1, 2, 0]
    assert bucket.latency_n == 5
    assert bucket.latency_sum == 150.0


def test_a_late_result_is_kept_in_time_order() -> None:
    view = HealthView()
    for i in (0, 2, 1):
        apply(view, checked(i, "healthy"), POLICY)
    times = [s.t for s in view.components["database"].samples]
    assert times == sorted(times)
    assert view.components["database"].latest.id == "hc-2-database"


def test_negative_latency_is_refused_and_leaves_the_view_unchanged() -> None:
    view = HealthView()
    apply(view, checked(0, "healthy"), POLICY)
    before = msgspec.msgpack.encode(view)
    with pytest.raises(FoldError, match="latency_ms"):
        apply(view, checked(1, "healthy", latency=-1.0), POLICY)
    assert msgspec.msgpack.encode(view) == before


def test_host_sample_keeps_the_latest() -> None:
    first = HostSampled(
        id="hs-1", occurred_at=T0, cpu_percent=1, memory_percent=2, disk_percent=3, uptime_s=4
    )
    older = HostSampled(
        id="hs-0",
        occurred_at=T0 - timedelta(seconds=1),
        cpu_percent=9,
        memory_percent=9,
        disk_percent=9,
        uptime_s=9,
    )
    view = HealthView()
    fired = [*apply(view, first, POLICY), *apply(view, older, POLICY)]
    assert view.host == first
    assert fired == []


# ----- replay equivalence ----------------------------------------------------------------

statuses = st.sampled_from(["healthy", "degraded", "unhealthy", "unknown"])
components = st.sampled_from(["database", "redis", "external.a"])


@st.composite
def event_lists(draw: st.DrawFn) -> list[HealthEvent]:
    n = draw(st.integers(0, 60))
    events: list[HealthEvent] = []
    for i in range(n):
        if draw(st.integers(0, 9)) == 0:
            events.append(
                HostSampled(
                    id=f"hs-{i}",
                    occurred_at=T0 + timedelta(seconds=30 * i),
                    cpu_percent=1,
                    memory_percent=2,
                    disk_percent=3,
                    uptime_s=i,
                )
            )
        else:
            event = checked(i, draw(statuses), draw(components), draw(st.floats(0, 1e4)))
            events.append(event)
    return events


def projection() -> Projection[HealthView, HealthEvent]:
    from services.health.contract import decode_health_event

    return Projection(
        name="health",
        stream=STREAMS["health"],
        view_type=HealthView,
        decode=decode_health_event,
        apply=make_apply(FoldPolicy(down_after=2, up_after=2, max_samples=20)),
    )


@settings(max_examples=60, deadline=None)
@given(events=event_lists(), cut=st.integers(0, 60))
def test_snapshot_plus_tail_equals_full_replay(events: list[HealthEvent], cut: int) -> None:
    """Folding the JSON from a snapshot at any point gives the same view and the same alerts."""
    encoded = [msgspec.json.encode(e) for e in events]
    full = projection()
    full_alerts = [a for seq, data in enumerate(encoded, 1) for a in full.fold(seq, data)]

    cut = min(cut, len(encoded))
    first = projection()
    alerts = [a for seq, data in enumerate(encoded[:cut], 1) for a in first.fold(seq, data)]
    restored = projection()
    restored.view, _ = decode_snapshot(encode_snapshot(first, T0), HealthView)  # any stamp
    alerts += [
        a for seq, data in enumerate(encoded[cut:], cut + 1) for a in restored.fold(seq, data)
    ]
    assert msgspec.msgpack.encode(restored.view) == msgspec.msgpack.encode(full.view)
    assert [a.id for a in alerts] == [a.id for a in full_alerts]
    assert len({a.id for a in full_alerts}) == len(full_alerts)


def test_snapshot_at_the_largest_bounded_size_round_trips() -> None:
    """13 components, each with a full raw day (5,000 samples) and 90 days of hourly buckets."""
    from services.health.projection import ComponentState, HourBucket, Sample

    view = HealthView(last_seq=10**6)
    for c in range(13):
        latest = checked(0, "healthy", f"external.api{c}")
        state = ComponentState(kind="external_api", latest=latest, status="healthy", since=T0)
        state.samples = [Sample(T0.timestamp() + 17 * i, i % 3, 12.345 + i) for i in range(5000)]
        state.hours = [HourBucket(400_000 + h, [120, 3, 1, 0], 1234.5, 124) for h in range(2160)]
        view.components[latest.component] = state
    health = projection()
    health.view = view
    data = encode_snapshot(health, T0)
    restored, _ = decode_snapshot(data, HealthView)
    assert msgspec.msgpack.encode(restored) == msgspec.msgpack.encode(view)
    assert len(data) < 4 * 1024 * 1024  # the object store chunks it; this keeps restarts quick


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from("hdu"), min_size=1, max_size=40))
def test_no_change_without_enough_consecutive_results(letters: list[str]) -> None:
    """The confirmed status only moves after a run of down_after/up_after equal results."""
    view, alerts, confirmed = fold("".join(letters))
    rank = {"healthy": 0, "degraded": 1, "unhealthy": 2}
    changes = 0
    for i in range(1, len(confirmed)):
        if confirmed[i] != confirmed[i - 1]:
            changes += 1
            needed = 3 if rank[confirmed[i]] > rank[confirmed[i - 1]] else 2
            run = letters[i - needed + 1 : i + 1]
            assert len(run) == needed and all(SHORT[c] == confirmed[i] for c in run)
    # One alert per change, until FLAP_CHANGES within FLAP_WINDOW_S: then one "flapping"
    # alert and silence until a status is kept for the window (then one "settled" alert).
    times = [0.0] if confirmed[0] != "healthy" else []
    expected, flapping = len(times), False
    for i in range(1, len(confirmed)):
        t = 30.0 * i
        if confirmed[i] != confirmed[i - 1]:
            times = [x for x in times if t - x < FLAP_WINDOW_S][-FLAP_CHANGES:] + [t]
            if not flapping:
                expected += 1
                flapping = len(times) >= FLAP_CHANGES
        elif flapping and t - times[-1] >= FLAP_WINDOW_S:
            expected, flapping, times = expected + 1, False, []
    assert len(alerts) == expected
