"""The event envelope every stream shares, and the alert event every service raises."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Literal

import msgspec

# Events are always timezone-aware; a naive timestamp would make "which day" ambiguous.
AwareDatetime = Annotated[datetime, msgspec.Meta(tz=True)]

JOB_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"
JOB_ID_RE = re.compile(JOB_ID_PATTERN)
JobId = Annotated[str, msgspec.Meta(pattern=JOB_ID_PATTERN)]
# Every string an event carries has a bound (contract §4): a name, id or label is short; a
# 600 KB value would make every answer that repeats it too big for one NATS message.
NonEmptyStr = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]
# Event ids: request ids, UUIDs, `kind:scope:period` alert ids; all far below this.
EventId = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
# An event may be dated a little after the stream stored it (the producer's clock runs
# ahead); past this it is a dead letter, so nothing dated in the future is ever counted.
MAX_FUTURE_S = 300.0
# Nothing StockPilot records predates this; an event dated near year 1 would only reach the
# ends of datetime's range in time-zone arithmetic.
EARLIEST = datetime(2000, 1, 1, tzinfo=UTC)
_EARLIEST_S = EARLIEST.timestamp()


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Common fields of every event: a string tag `type`, a unique `id`, when it happened."""

    id: EventId
    occurred_at: AwareDatetime

    def stored_problem(self, subject: str) -> str | None:
        """Why this event, stored on `subject`, may not be folded; None when it may.

        Each event type says where it may arrive; a type published on another type's subject
        (a `usage.reset` on `stockpilot.usage.recorded`) must not be folded as if it belonged.
        Also where a type puts checks that would slow every decode down in `__post_init__`.
        """
        return None


def admission_problem(
    event: object, subject: str | bytes | None, stored_ns: int | None
) -> str | None:
    """Why a decoded stored event is a dead letter, or None when it may be folded.

    `subject` is where it was stored and `stored_ns` the stream's own timestamp of the
    message (ns since the epoch, from its JetStream metadata): both replay identically, so a
    replay refuses exactly what the live service refused. None skips that check.
    """
    # Runs for every event folded: the common case (all is well) takes the fewest steps.
    if not isinstance(event, Event):
        return None
    if subject is not None:
        problem = event.stored_problem(subject if isinstance(subject, str) else subject.decode())
        if problem is not None:
            return problem
    if stored_ns is not None:
        # A datetime comparison against the latest time allowed for the stored second is
        # several times cheaper than `occurred_at.timestamp()`; only an event past it (or
        # before EARLIEST) gets the exact check, so the decision is the exact one.
        second = stored_ns // 1_000_000_000
        if second != _latest.second:
            _latest.second = second
            _latest.moment = datetime.fromtimestamp(second + MAX_FUTURE_S, UTC)
        occurred_at = event.occurred_at
        if not EARLIEST <= occurred_at <= _latest.moment:
            return timing_problem(occurred_at, stored_ns * 1e-9)
    return None


class _Latest:
    """The latest `occurred_at` allowed for messages stored in one second (reused while
    the stored second stays the same, as it does for thousands of events in a row)."""

    second = -1
    moment = EARLIEST


_latest = _Latest()


def timing_problem(occurred_at: datetime, stored_at: float) -> str | None:
    """Why an event dated `occurred_at` cannot count when stored (or received) at `stored_at`
    (epoch seconds): more than MAX_FUTURE_S after it, or before EARLIEST; else None."""
    at = occurred_at.timestamp()
    if at - stored_at > MAX_FUTURE_S:
        stored = datetime.fromtimestamp(stored_at, UTC)
        # As given: in UTC, a time near the end of datetime's range may not exist.
        return (
            f"occurred_at {occurred_at.isoformat()} is more than {MAX_FUTURE_S:g} s after the "
            f"event was stored ({rfc3339(stored)}): an event dated in the future is not counted"
        )
    if at < _EARLIEST_S:
        return f"occurred_at {occurred_at.isoformat()} is before {rfc3339(EARLIEST)}"
    return None


def wrong_subject(what: str, subject: str, expected: str) -> str:
    """The reason for an event (`what`, e.g. "a usage.reset event") stored on a subject it
    does not belong to."""
    return f"{what} belongs on {expected}, not on {subject[:200]}"


Severity = Literal["info", "warning", "critical"]
AlertSource = Literal["usage", "batch", "health"]


# Alert texts are written by the services; the bounds refuse only what none of them writes.
AlertKind = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
AlertTitle = Annotated[str, msgspec.Meta(max_length=500)]
AlertMessage = Annotated[str, msgspec.Meta(max_length=10_000)]
MetricName = Annotated[str, msgspec.Meta(max_length=128)]
# Finite: an alert's figures are encoded into JSON answers (where infinity becomes null).
Figure = Annotated[float, msgspec.Meta(ge=-1e300, le=1e300)]
# An alert's params: a few named values of its title and message, each short.
AlertParams = Annotated[
    dict[
        Annotated[str, msgspec.Meta(max_length=64)],
        # No `int` beside the float: a JSON 3 would then match two types of a oneOf.
        Annotated[str, msgspec.Meta(max_length=1000)] | bool | Figure | None,
    ],
    msgspec.Meta(max_length=32),
]


class Alert(Event, frozen=True, kw_only=True, tag="alert"):
    """An alert on `stockpilot.alerts.<source>.<kind>`; its id is derived from kind+scope+period."""

    source: AlertSource
    kind: AlertKind
    severity: Severity
    title: AlertTitle
    message: AlertMessage
    metric: MetricName
    value: Figure
    threshold: Figure

    # The values in `title` and `message` by name (component, job_id, period, from/to, …), so a
    # reader can say the alert in another language from `kind` + `params` (the dashboard does).
    params: AlertParams = {}

    def stored_problem(self, subject: str) -> str | None:
        """An alert belongs on its kind's subject, whose first token is its source."""
        expected = alert_subject(self.kind)
        if subject != expected:
            return wrong_subject(f"an alert of kind {self.kind!r}", subject, expected)
        if not self.kind.startswith(self.source + "."):
            return f"an alert of kind {self.kind!r} cannot come from source {self.source!r}"
        return None

    @property
    def subject(self) -> str:
        """Where the alert is published: the kind already starts with its source."""
        return alert_subject(self.kind)


def alert_subject(kind: str) -> str:
    """`usage.cost_warning` → `stockpilot.alerts.usage.cost_warning`."""
    return f"stockpilot.alerts.{kind}"


def alert_id(kind: str, scope: str, period: str) -> str:
    """A deterministic alert id: the same condition in the same period is stored once."""
    return f"{kind}:{scope}:{period}"


def utc_now() -> datetime:
    """The current time, aware, in UTC (for adapters; folds take time from events)."""
    return datetime.now(UTC)


def rfc3339(moment: datetime) -> str:
    """An aware datetime as RFC 3339 in UTC with a Z suffix."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")
