"""Error-rate alerts that mean something: one per episode, a recovery announced once.

Pure folds, times from the events only: replicas and replays derive the same alerts and ids.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from services.usage.contract import UsageEvent, UsageRecorded, UsageReset, decode_usage_event
from services.usage.prices import PriceTable
from services.usage.projection import make_apply
from services.usage.view import QUIET_S, FoldConfig, UsageView
from shared.events import Alert
from shared.projection import Projection, decode_snapshot, encode_snapshot
from shared.publish import encode_event
from shared.streams import STREAMS
from tests.usage.helpers import T0, recorded

CONFIG = FoldConfig(
    zone=ZoneInfo("UTC"),
    prices=PriceTable.with_overrides({}),
    error_rate_alert_pct=20.0,
    error_rate_min_calls=10,
)


def fold(events: Sequence[UsageEvent]) -> list[Alert]:
    apply = make_apply(CONFIG)
    view = UsageView()
    alerts: list[Alert] = []
    for seq, event in enumerate(events, start=1):
        alerts.extend(apply(view, event, seq))
        view.last_seq = seq
    return [a for a in alerts if a.kind == "usage.error_rate"]


class Calls:
    """Numbered calls at chosen times (ids never repeat)."""

    def __init__(self) -> None:
        self.n = 0

    def at(self, when: datetime, count: int, failed: int = 0) -> list[UsageRecorded]:
        out = []
        for i in range(count):
            self.n += 1
            fields = {"status_code": 500} if i < failed else {}
            out.append(recorded(self.n, when + timedelta(milliseconds=i), **fields))
        return out


def bad(calls: Calls, when: datetime) -> list[UsageRecorded]:
    """Ten calls, five failed: 50 % (over 20 % with the ten calls needed)."""
    return calls.at(when, 10, failed=5)


def good(calls: Calls, when: datetime) -> list[UsageRecorded]:
    """Forty successes: the 5-minute window's rate drops under the threshold."""
    return calls.at(when, 40)


def test_a_condition_back_within_ten_minutes_is_not_raised_again() -> None:
    calls = Calls()
    events = bad(calls, T0) + good(calls, T0 + timedelta(seconds=30))
    events += bad(calls, T0 + timedelta(minutes=6)) + bad(
        calls, T0 + timedelta(minutes=6, seconds=5)
    )
    events += good(calls, T0 + timedelta(minutes=7))
    events += bad(calls, T0 + timedelta(minutes=13)) + bad(
        calls, T0 + timedelta(minutes=13, seconds=5)
    )
    alerts = fold(events)
    assert [a.severity for a in alerts] == ["critical"]


def test_recovery_is_announced_once_after_ten_quiet_minutes_then_a_new_episode_alerts() -> None:
    calls = Calls()
    events = bad(calls, T0) + good(calls, T0 + timedelta(seconds=30))
    # Traffic keeps flowing, all good: the recovery is due once 10 minutes have passed.
    for minute in range(1, 25):
        events += good(calls, T0 + timedelta(seconds=30, minutes=minute))
    events += bad(calls, T0 + timedelta(minutes=40)) + bad(
        calls, T0 + timedelta(minutes=40, seconds=1)
    )
    alerts = fold(events)
    assert [(a.severity, a.title) for a in alerts] == [
        ("critical", "LLM error rate high"),
        ("info", "LLM error rate back to normal"),
        ("critical", "LLM error rate high"),
    ]
    first, recovery, second = alerts
    assert recovery.id == f"{first.id}:recovered"
    assert second.id != first.id
    # Announced at the first call at least QUIET_S after the rate cleared (event time).
    cleared = T0 + timedelta(seconds=30)
    assert cleared + timedelta(seconds=QUIET_S) <= recovery.occurred_at
    assert recovery.occurred_at < cleared + timedelta(seconds=QUIET_S + 61)


def test_a_late_burst_after_a_quiet_gap_announces_recovery_then_alerts_anew() -> None:
    calls = Calls()
    events = bad(calls, T0) + good(calls, T0 + timedelta(seconds=30))
    events += bad(calls, T0 + timedelta(minutes=30))
    alerts = fold(events)
    assert [a.severity for a in alerts] == ["critical", "info", "critical"]


def test_replays_and_replicas_derive_the_same_alerts_and_ids() -> None:
    calls = Calls()
    events: list[UsageEvent] = bad(calls, T0) + good(calls, T0 + timedelta(seconds=30))
    events += [UsageReset(id="r1", occurred_at=T0 + timedelta(minutes=2), actor="ops")]
    events += good(calls, T0 + timedelta(minutes=20))
    events += calls.at(T0 + timedelta(minutes=21), 40, failed=30)
    first = fold(events)
    again = fold(events)
    assert [a.id for a in first] == [a.id for a in again]
    assert [a.severity for a in first] == ["critical", "info", "critical"]


def projection() -> Projection[UsageView, UsageEvent]:
    return Projection(
        name="usage",
        stream=STREAMS["usage"],
        view_type=UsageView,
        decode=decode_usage_event,
        apply=make_apply(CONFIG),
    )


def fold_restarted_at(events: Sequence[UsageEvent], cut: int) -> list[Alert]:
    """The alerts of a service that snapshots after `cut` events, restarts from the snapshot
    and folds the rest (a replica or a restart in the middle of an episode)."""
    encoded = [encode_event(e) for e in events]
    first = projection()
    alerts = [a for seq, data in enumerate(encoded[:cut], 1) for a in first.fold(seq, data)]
    restored = projection()
    restored.view, _ = decode_snapshot(encode_snapshot(first, T0), UsageView)
    alerts += [
        a for seq, data in enumerate(encoded[cut:], cut + 1) for a in restored.fold(seq, data)
    ]
    return [a for a in alerts if a.kind == "usage.error_rate"]


def test_a_restart_anywhere_in_an_episode_neither_repeats_nor_forgets_its_alerts() -> None:
    """Raised, cleared and back within 10 minutes, recovered, raised anew: a snapshot taken at
    any point (mid-episode, in the clear gap, in the quiet minutes) gives the same alerts with
    the same ids as one uninterrupted fold."""
    calls = Calls()
    events: list[UsageEvent] = bad(calls, T0) + good(calls, T0 + timedelta(seconds=30))
    events += bad(calls, T0 + timedelta(minutes=6)) + bad(
        calls, T0 + timedelta(minutes=6, seconds=5)
    )
    events += good(calls, T0 + timedelta(minutes=7))
    for minute in range(8, 20):
        events += calls.at(T0 + timedelta(minutes=minute), 5)
    events += bad(calls, T0 + timedelta(minutes=40)) + bad(
        calls, T0 + timedelta(minutes=40, seconds=1)
    )
    whole = fold_restarted_at(events, len(events))
    assert [a.severity for a in whole] == ["critical", "info", "critical"]
    assert whole[1].id == f"{whole[0].id}:recovered"
    for cut in range(1, len(events), 7):
        again = fold_restarted_at(events, cut)
        assert [(a.id, a.severity) for a in again] == [(a.id, a.severity) for a in whole], cut
