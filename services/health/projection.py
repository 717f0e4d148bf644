"""The health projection: latest result, hysteresis status and bounded history per component.

Why one module of over 300 lines: it is one fold, with its hysteresis, flapping rule and the
alerts it returns; those rules decide together when a status changes and what is said about
it, so they stay beside the view they change.

A pure fold. A component's status changes only after `down_after` consecutive results in a
worse state (`up_after` for a better one), so a flapping target does not flip on one result;
each confirmed change is recorded as the component's `last_transition`, and `apply` returns
exactly one `health.status_changed` alert for the event that confirmed it. A component that
changes FLAP_CHANGES times within FLAP_WINDOW_S is reported once as `health.flapping`, and
once more when it has kept one status for FLAP_WINDOW_S (all judged from event times, so
replicas and replays agree). Raw samples are kept for 24 h (bounded by count), hourly buckets
for `max_hours`, so the view and its snapshot stay bounded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Literal

import msgspec

from services.health.contract import HealthChecked, HealthEvent, HostSampled, Kind, Status
from shared.events import Alert, AwareDatetime, Severity, alert_id, rfc3339
from shared.projection import NOTHING_FIRED, FoldError, View

HOUR_S = 3600.0
DAY_S = 86_400.0
# Bumped when the fold's meaning or the view's layout changes: a snapshot folded by another
# version is not reused and the view is rebuilt from the stream's first event. (Returning
# the alerts from `apply` changed neither: `last_transition` is still recorded as before.)
FOLD_VERSION = "1"
ALERT_KIND = "health.status_changed"
# Status codes stored in samples (a byte each instead of a string).
CODES: dict[Status, int] = {"healthy": 0, "degraded": 1, "unhealthy": 2, "unknown": 3}
STATUSES: tuple[Status, ...] = ("healthy", "degraded", "unhealthy", "unknown")
# How bad a known status is; `unknown` (not configured) is not part of the order.
RANK: dict[Status, int] = {"healthy": 0, "degraded": 1, "unhealthy": 2}


class FoldPolicy(msgspec.Struct, frozen=True, kw_only=True):
    """The fold's configuration (from the settings): hysteresis and history bounds."""

    down_after: int = 3
    up_after: int = 2
    max_samples: int = 5_000
    max_hours: int = 2_160
    window_s: float = DAY_S


class Sample(msgspec.Struct, array_like=True):
    """One result in the raw history: epoch seconds, status code, latency."""

    t: float
    status: int
    latency_ms: float | None


class HourBucket(msgspec.Struct, array_like=True):
    """Counts of one hour of results (epoch hour index)."""

    hour: int
    counts: list[int]  # per status code
    latency_sum: float = 0.0
    latency_n: int = 0


# A component whose status changed this many times within FLAP_WINDOW_S is flapping: it is
# reported once as such, and its changes are not alerted again until it has kept one status
# for FLAP_WINDOW_S (then once more, saying where it settled).
FLAP_CHANGES = 3
FLAP_WINDOW_S = 600.0
FLAP_KIND = "health.flapping"

TransitionNote = Literal["changed", "flapping", "settled"]


class Transition(msgspec.Struct, kw_only=True):
    """A confirmed status change (or the start or end of flapping) and the event that did it."""

    from_status: Status
    to_status: Status
    at: AwareDatetime
    event_id: str
    results: int
    alert: bool
    note: TransitionNote = "changed"


class ComponentState(msgspec.Struct, kw_only=True):
    """Everything known about one component."""

    kind: Kind
    latest: HealthChecked
    status: Status
    since: AwareDatetime
    pending: Status | None = None
    streak: int = 0
    last_transition: Transition | None = None
    # Epoch seconds of the alerted changes within FLAP_WINDOW_S, and since when it flaps.
    changes: list[float] = []
    flapping_since: AwareDatetime | None = None
    samples: list[Sample] = []
    hours: list[HourBucket] = []


class HealthView(View, kw_only=True):
    """Per component state, the latest host sample, and when the latest result came in."""

    components: dict[str, ComponentState] = {}
    host: HostSampled | None = None
    checked_at: AwareDatetime | None = None


def _change(state: ComponentState, event: HealthChecked, results: int) -> Transition:
    old, new = state.status, event.status
    # unknown → healthy is a probe being switched on, not news; anything else is alerted.
    alert = new != "unknown" and (old != "unknown" or new != "healthy")
    note: TransitionNote = "changed"
    if alert:
        t = event.occurred_at.timestamp()
        state.changes = [c for c in state.changes if t - c < FLAP_WINDOW_S][-FLAP_CHANGES:]
        state.changes.append(t)
        if state.flapping_since is not None:
            alert = False  # already reported as flapping
        elif len(state.changes) >= FLAP_CHANGES:
            state.flapping_since = event.occurred_at
            note = "flapping"
    change = state.last_transition = Transition(
        from_status=old,
        to_status=new,
        at=event.occurred_at,
        event_id=event.id,
        results=results,
        alert=alert,
        note=note,
    )
    state.status = new
    state.since = event.occurred_at
    state.pending = None
    state.streak = 0
    return change


def _hysteresis(
    state: ComponentState, event: HealthChecked, policy: FoldPolicy
) -> Transition | None:
    new = event.status
    if new == state.status:
        state.pending = None
        state.streak = 0
        return None
    if new == "unknown" or state.status == "unknown":
        # Switching a probe off or on is configuration, not a flapping target: follow it.
        return _change(state, event, 1)
    if new == state.pending:
        state.streak += 1
    else:
        state.pending = new
        state.streak = 1
    needed = policy.down_after if RANK[new] > RANK[state.status] else policy.up_after
    if state.streak >= needed:
        return _change(state, event, state.streak)
    return None


def _record(state: ComponentState, event: HealthChecked, policy: FoldPolicy) -> None:
    t = event.occurred_at.timestamp()
    code = CODES[event.status]
    samples = state.samples
    sample = Sample(t, code, event.latency_ms)
    if not samples or samples[-1].t <= t:
        samples.append(sample)
    else:  # a late result: keep the history in time order
        index = len(samples)
        while index > 0 and samples[index - 1].t > t:
            index -= 1
        samples.insert(index, sample)
    horizon = samples[-1].t - policy.window_s
    drop = 0
    while drop < len(samples) and samples[drop].t < horizon:
        drop += 1
    drop = max(drop, len(samples) - policy.max_samples)
    if drop:
        del samples[:drop]

    hour = int(t // HOUR_S)
    hours = state.hours
    index = len(hours)
    while index > 0 and hours[index - 1].hour > hour:
        index -= 1
    if index > 0 and hours[index - 1].hour == hour:
        bucket = hours[index - 1]
    else:
        bucket = HourBucket(hour, [0, 0, 0, 0])
        hours.insert(index, bucket)
    bucket.counts[code] += 1
    if event.latency_ms is not None:
        bucket.latency_sum += event.latency_ms
        bucket.latency_n += 1
    if len(hours) > policy.max_hours:
        del hours[: len(hours) - policy.max_hours]


def _checked(
    view: HealthView, event: HealthChecked, policy: FoldPolicy
) -> tuple[ComponentState, Transition | None]:
    """Fold one result: the component's state and the transition the result made, if any."""
    if not event.component or " " in event.component:
        raise FoldError(f"component name {event.component!r} is not valid")
    if event.latency_ms is not None and event.latency_ms < 0:
        raise FoldError(f"latency_ms must not be negative (got {event.latency_ms})")
    state = view.components.get(event.component)
    if state is None:
        state = ComponentState(
            kind=event.kind, latest=event, status="unknown", since=event.occurred_at
        )
        view.components[event.component] = state
        change = None
        if event.status != "unknown":
            # Nothing to flap from: the first result is the status.
            change = _change(state, event, 1)
    else:
        if event.occurred_at >= state.latest.occurred_at:
            state.latest = event
            state.kind = event.kind
        change = _hysteresis(state, event, policy)
        # Settling is recorded after (and instead of) a change by the same result.
        change = _settle(state, event) or change
    _record(state, event, policy)
    if view.checked_at is None or event.occurred_at > view.checked_at:
        view.checked_at = event.occurred_at
    return state, change


def _settle(state: ComponentState, event: HealthChecked) -> Transition | None:
    """A flapping component that has kept one status for FLAP_WINDOW_S has settled."""
    if state.flapping_since is None or not state.changes:
        return None
    if event.occurred_at.timestamp() - state.changes[-1] < FLAP_WINDOW_S:
        return None
    state.flapping_since = None
    state.changes = []
    change = state.last_transition = Transition(
        from_status=state.status,
        to_status=state.status,
        at=event.occurred_at,
        event_id=event.id,
        results=0,
        alert=True,
        note="settled",
    )
    return change


def apply(view: HealthView, event: HealthEvent, policy: FoldPolicy) -> Sequence[Alert]:
    """Fold one event into the view, in place (pure: the event is the only input); the
    alert it fired: `health.status_changed` or `health.flapping` for a result that confirmed
    a change, started or ended flapping."""
    match event:
        case HealthChecked():
            state, change = _checked(view, event, policy)
            if change is not None and change.alert:
                return [_alert(state, change, event)]
        case HostSampled():
            if view.host is None or event.occurred_at >= view.host.occurred_at:
                view.host = event
    return NOTHING_FIRED


def make_apply(policy: FoldPolicy) -> Callable[[HealthView, HealthEvent, int], Sequence[Alert]]:
    """The fold with its configuration bound (what the Projection takes; it needs no
    stream sequence)."""

    def fold(view: HealthView, event: HealthEvent, seq: int) -> Sequence[Alert]:
        return apply(view, event, policy)

    return fold


_SEVERITY: dict[str, Severity] = {"healthy": "info", "degraded": "warning", "unhealthy": "critical"}


def _alert(state: ComponentState, change: Transition, event: HealthChecked) -> Alert:
    """The alert for the change `event` just confirmed (or the flapping it began or ended)."""
    detail = f": {event.error}" if event.error and change.to_status != "healthy" else ""
    minutes = f"{FLAP_WINDOW_S / 60:g}"
    if change.note == "flapping":
        return Alert(
            id=alert_id(FLAP_KIND, event.component, rfc3339(event.occurred_at)),
            occurred_at=event.occurred_at,
            source="health",
            kind=FLAP_KIND,
            severity="warning",
            title=f"{event.component} is flapping",
            message=(
                f"{event.component} changed status {len(state.changes)} times in "
                f"{minutes} minutes, now {change.to_status}{detail}; further changes are "
                f"not alerted until it keeps one status for {minutes} minutes"
            ),
            metric=f"{event.component}.status_changes",
            value=float(len(state.changes)),
            threshold=float(FLAP_CHANGES),
            params={
                "component": event.component,
                "to": change.to_status,
                "changes": len(state.changes),
                "minutes": int(FLAP_WINDOW_S // 60),
                "error": event.error if change.to_status != "healthy" else None,
            },
        )
    if change.note == "settled":
        return Alert(
            id=alert_id(ALERT_KIND, event.component, f"{rfc3339(event.occurred_at)}:settled"),
            occurred_at=event.occurred_at,
            source="health",
            kind=ALERT_KIND,
            severity=_SEVERITY.get(change.to_status, "warning"),
            title=f"{event.component} settled: {change.to_status}",
            message=(
                f"{event.component} stopped flapping: {change.to_status} for "
                f"{minutes} minutes{detail}"
            ),
            metric=f"{event.component}.status_rank",
            value=float(RANK.get(change.to_status, -1)),
            threshold=float(RANK.get(change.to_status, -1)),
            params={
                "component": event.component,
                "to": change.to_status,
                "settled": True,
                "minutes": int(FLAP_WINDOW_S // 60),
                "error": event.error if change.to_status != "healthy" else None,
            },
        )
    return Alert(
        id=alert_id(ALERT_KIND, event.component, rfc3339(event.occurred_at)),
        occurred_at=event.occurred_at,
        source="health",
        kind=ALERT_KIND,
        severity=_SEVERITY.get(change.to_status, "warning"),
        title=f"{event.component} is {change.to_status}",
        message=(
            f"{event.component} went from {change.from_status} to {change.to_status} "
            f"after {change.results} consecutive result(s){detail}"
        ),
        metric=f"{event.component}.status_rank",
        value=float(RANK.get(change.to_status, -1)),
        threshold=float(RANK.get(change.from_status, -1)),
        params={
            "component": event.component,
            "from": change.from_status,
            "to": change.to_status,
            "results": change.results,
            "error": event.error if change.to_status != "healthy" else None,
        },
    )


def status_at(code: int) -> Status:
    """The status a sample's code stands for."""
    return STATUSES[code]


def newest(view: HealthView) -> datetime | None:
    """When the latest result or host sample was taken."""
    times = [t for t in (view.checked_at, view.host.occurred_at if view.host else None) if t]
    return max(times) if times else None
