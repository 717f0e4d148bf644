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
NonEmptyStr = Annotated[str, msgspec.Meta(min_length=1, max_length=512)]


class Event(msgspec.Struct, frozen=True, kw_only=True, tag_field="type"):
    """Common fields of every event: a string tag `type`, a unique `id`, when it happened."""

    id: NonEmptyStr
    occurred_at: AwareDatetime


Severity = Literal["info", "warning", "critical"]
AlertSource = Literal["usage", "batch", "health"]


class Alert(Event, frozen=True, kw_only=True, tag="alert"):
    """An alert on `stockpilot.alerts.<source>.<kind>`; its id is derived from kind+scope+period."""

    source: AlertSource
    kind: str
    severity: Severity
    title: str
    message: str
    metric: str
    value: float
    threshold: float
    # The values in `title` and `message` by name (component, job_id, period, from/to, …), so a
    # reader can say the alert in another language from `kind` + `params` (the dashboard does).
    # Numbers are one JSON type (`float` takes ints too): with `int | float` the OpenAPI schema
    # lists both in a oneOf, and an integral value matches two of its branches (schemathesis).
    params: dict[str, str | bool | float | None] = {}

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
