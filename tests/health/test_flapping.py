"""A flapping component is reported once as flapping, not once per flip; then once settled.

Pure fold with times from the events only, so replicas and replays derive the same alerts.
"""

from __future__ import annotations

from datetime import timedelta

import msgspec

from services.health.contract import HealthChecked, HealthEvent, Status, decode_health_event
from services.health.projection import (
    FLAP_KIND,
    FLAP_WINDOW_S,
    FoldPolicy,
    HealthView,
    apply,
    make_apply,
)
from shared.events import Alert
from shared.projection import Projection, decode_snapshot, encode_snapshot
from shared.streams import STREAMS
from tests.clocks import NOON

POLICY = FoldPolicy(down_after=3, up_after=2)
T0 = NOON - timedelta(hours=2)
STEP_S = 5.0


def results(pattern: list[tuple[Status, int]], start: float = 0.0) -> list[HealthChecked]:
    """Probe results every STEP_S seconds: (status, how many in a row), in order."""
    out = []
    t = start
    for status, count in pattern:
        for _ in range(count):
            out.append(
                HealthChecked(
                    id=f"hc-{t:g}",
                    occurred_at=T0 + timedelta(seconds=t),
                    component="external.fx",
                    kind="external_api",
                    status=status,
                    latency_ms=20.0,
                    error=None if status == "healthy" else "answered 503, expected 200",
                )
            )
            t += STEP_S
    return out


def fold(events: list[HealthChecked]) -> list[Alert]:
    view = HealthView()
    alerts: list[Alert] = []
    for event in events:
        alerts.extend(apply(view, event, POLICY))
    return alerts


# fx: up 50 s, down 25 s, repeating (the demo's flapping API), probed every 5 s.
CYCLE: list[tuple[Status, int]] = [("healthy", 10), ("unhealthy", 5)]


def test_a_flapping_api_is_reported_once_as_flapping_not_once_per_flip() -> None:
    events = results([("healthy", 2)] + CYCLE * 8)  # 10 minutes, 16 flips
    alerts = fold(events)
    kinds = [(a.kind, a.severity) for a in alerts]
    assert kinds == [
        ("health.status_changed", "critical"),
        ("health.status_changed", "info"),
        (FLAP_KIND, "warning"),
    ]
    flapping = alerts[-1]
    assert flapping.title == "external.fx is flapping"
    assert flapping.id.startswith(f"{FLAP_KIND}:external.fx:")


def test_a_settled_component_is_announced_once_with_where_it_settled() -> None:
    quiet = int(FLAP_WINDOW_S / STEP_S) + 2
    events = results([("healthy", 2)] + CYCLE * 4 + [("healthy", quiet)])
    alerts = fold(events)
    settled = [a for a in alerts if a.id.endswith(":settled")]
    assert len(settled) == 1
    assert settled[0].severity == "info" and settled[0].title == "external.fx settled: healthy"
    # After settling, a new change is alerted as usual again.
    more = results([("unhealthy", 3)], start=STEP_S * len(events))
    again = fold(events + more)
    assert [a.kind for a in again[len(alerts) :]] == ["health.status_changed"]


def test_replays_derive_the_same_alerts() -> None:
    events = results([("healthy", 2)] + CYCLE * 6)
    assert [a.id for a in fold(events)] == [a.id for a in fold(list(events))]


def projection() -> Projection[HealthView, HealthEvent]:
    return Projection(
        name="health",
        stream=STREAMS["health"],
        view_type=HealthView,
        decode=decode_health_event,
        apply=make_apply(POLICY),
    )


def test_a_restart_while_flapping_reports_it_once_with_the_same_ids() -> None:
    """A snapshot at any point of a flapping stretch and its settling: the restarted fold
    reports flapping once and settling once, with the ids an uninterrupted fold gives."""
    quiet = int(FLAP_WINDOW_S / STEP_S) + 2
    events = results([("healthy", 2)] + CYCLE * 4 + [("healthy", quiet)])
    encoded = [msgspec.json.encode(e) for e in events]
    whole = [a.id for a in fold(events)]
    assert sum(1 for i in whole if i.startswith(f"{FLAP_KIND}:")) == 1
    assert sum(1 for i in whole if i.endswith(":settled")) == 1
    for cut in range(1, len(encoded)):
        first = projection()
        ids = [a.id for seq, data in enumerate(encoded[:cut], 1) for a in first.fold(seq, data)]
        restored = projection()
        restored.view, _ = decode_snapshot(encode_snapshot(first, T0), HealthView)
        ids += [
            a.id
            for seq, data in enumerate(encoded[cut:], cut + 1)
            for a in restored.fold(seq, data)
        ]
        assert ids == whole, cut
