"""When a projection is snapshotted: by time, by event count, and no more often than the
snapshots' own cost allows (shared.snapshotter.snapshot_due, pure)."""

from __future__ import annotations

from shared.snapshotter import SNAPSHOT_BUSY_SHARE, snapshot_due

EVERY_EVENTS = 50_000
EVERY_S = 30.0


def due(events: int, since_last_s: float, last_took_s: float) -> bool:
    return snapshot_due(events, since_last_s, last_took_s, EVERY_EVENTS, EVERY_S)


def test_nothing_folded_is_never_snapshotted() -> None:
    assert not due(0, 10 * EVERY_S, 0.0)


def test_a_snapshot_is_due_after_every_s_whatever_the_count() -> None:
    assert due(1, EVERY_S, 0.0)
    assert not due(1, EVERY_S - 0.5, 0.0)
    # Even a slow snapshot is taken by time: the tail a crash refolds stays bounded.
    assert due(1, EVERY_S, last_took_s=EVERY_S)


def test_a_snapshot_is_due_after_every_events_when_snapshots_are_cheap() -> None:
    assert due(EVERY_EVENTS, 1.0, last_took_s=0.01)
    assert not due(EVERY_EVENTS - 1, 1.0, last_took_s=0.01)


def test_a_costly_snapshot_spaces_the_next_by_its_cost() -> None:
    took = 0.12  # a large usage view
    needed = took / SNAPSHOT_BUSY_SHARE
    assert not due(EVERY_EVENTS, needed * 0.9, took)
    assert not due(10 * EVERY_EVENTS, needed * 0.9, took)
    assert due(EVERY_EVENTS, needed, took)
