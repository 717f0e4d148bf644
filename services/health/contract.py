"""The health service's wire contract: its subjects and events, the parameters its endpoints
take and the answers they give (the gateway serves them as they are, contract §5).

This module is the health package's public face: the gateway, ops and the bench import the
service's wire types from here and from nowhere else (tests/test_import_rules.py), and each
struct is defined here once. Declarations only; the queries that fill the answers stay in
queries.py and history.py, the fold in projection.py.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from shared.events import AwareDatetime, Event, wrong_subject

# ===== events: the STOCKPILOT_HEALTH stream (contract §4 health) =============================

Status = Literal["healthy", "degraded", "unhealthy", "unknown"]
Kind = Literal["database", "redis", "openai", "external_api"]
# Probe details are small and flat: versions, counts, percentages, the (redacted) target.
# Values are bounded scalars (or short lists of them): an unbounded one would make every
# answer that repeats it too big for one NATS message, and an integer past 64 bits could no
# longer be snapshotted (msgpack). Integers stay in 64 bits, floats are finite.
DetailKey = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
DetailText = Annotated[str, msgspec.Meta(max_length=1000)]
DetailInt = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
DetailFloat = Annotated[float, msgspec.Meta(ge=-1e15, le=1e15)]
DetailValue = (
    DetailText
    | DetailInt
    | DetailFloat
    | bool
    | None
    | Annotated[
        list[DetailText | DetailInt | DetailFloat | bool | None], msgspec.Meta(max_length=32)
    ]
)
Details = Annotated[dict[DetailKey, DetailValue], msgspec.Meta(max_length=32)]
# A component is a subject token or two (`database`, `external.quotes`; names are ≤ 64).
Component = Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}(\.[A-Za-z0-9_-]{1,64})?$")]
# Probe latencies and uptimes: finite, non-negative (1e8 ms is more than a day).
Millis = Annotated[float, msgspec.Meta(ge=0, lt=1e8)]
Percent = Annotated[float, msgspec.Meta(ge=0, le=100)]
Seconds = Annotated[float, msgspec.Meta(ge=0, lt=1e10)]
# A probe error is a sentence or two (a driver's message, redacted).
MAX_ERROR_CHARS = 4000
ErrorText = Annotated[str, msgspec.Meta(max_length=MAX_ERROR_CHARS)]
RoundId = Annotated[str, msgspec.Meta(max_length=128)]

CHECKED_SUBJECT_PREFIX = "stockpilot.health.checked."
HOST_SUBJECT = "stockpilot.health.host"


class HealthChecked(Event, frozen=True, kw_only=True, tag="health.checked"):
    """One probe result of one component (`database`, `redis`, `openai`, `external.<name>`)."""

    component: Component
    kind: Kind
    status: Status
    latency_ms: Millis | None = None
    details: Details = {}
    error: ErrorText | None = None
    # The round this result belongs to (results of one round share it).
    round_id: RoundId | None = None

    def stored_problem(self, subject: str) -> str | None:
        """A result belongs on its own component's subject: the projection keys it by name."""
        expected = CHECKED_SUBJECT_PREFIX + self.component
        if subject == expected:
            return None
        return wrong_subject(
            f"the health.checked event of component {self.component!r}", subject, expected
        )

    @property
    def subject(self) -> str:
        """`stockpilot.health.checked.<component>`."""
        return CHECKED_SUBJECT_PREFIX + self.component


class HostSampled(Event, frozen=True, kw_only=True, tag="health.host_sampled"):
    """The health service's host, sampled with psutil once per round."""

    cpu_percent: Percent
    memory_percent: Percent
    disk_percent: Percent
    uptime_s: Seconds
    round_id: RoundId | None = None

    def stored_problem(self, subject: str) -> str | None:
        """A host sample belongs on `stockpilot.health.host`."""
        if subject == HOST_SUBJECT:
            return None
        return wrong_subject("a health.host_sampled event", subject, HOST_SUBJECT)

    @property
    def subject(self) -> str:
        """`stockpilot.health.host`."""
        return HOST_SUBJECT


HealthEvent = HealthChecked | HostSampled

decode_health_event = msgspec.json.Decoder(HealthEvent).decode


# ===== endpoints: parameters and answers =====================================================

# ----- parameters ------------------------------------------------------------------------


class FreshParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A `*_fresh` request: answer from a round started no earlier than `requested_at`.

    Requests to one endpoint are handled one after another, so a request that queued behind
    a round is answered by that round instead of starting another one.
    """

    requested_at: AwareDatetime | None = None


class ComponentParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One component by its id (`database`, `redis`, `openai`, `external.<name>`)."""

    name: str
    requested_at: AwareDatetime | None = None


# ----- answers ---------------------------------------------------------------------------


class ComponentHealth(msgspec.Struct, kw_only=True):
    """One component: its (hysteresis) status and its latest probe result."""

    name: str
    kind: Kind
    status: Status
    latency_ms: float | None
    details: Details
    error: str | None
    checked_at: AwareDatetime | None
    # The latest probe's own status; `status` follows it only after the hysteresis.
    last_result: Status
    status_since: AwareDatetime | None
    pending_status: Status | None
    pending_results: int
    uptime_pct_1h: float | None
    uptime_pct_24h: float | None
    latency_p95_ms_1h: float | None
    latency_p95_ms_24h: float | None


class ComponentAnswer(ComponentHealth, kw_only=True):
    """One component as a route answer: with whether it came from the cache and its age."""

    cached: bool
    age_s: float | None


class SystemMetrics(msgspec.Struct, kw_only=True):
    """The health service's host, sampled with psutil each round."""

    cpu_percent: float
    memory_percent: float
    disk_percent: float
    uptime_s: float
    sampled_at: AwareDatetime


class ExternalApisHealth(msgspec.Struct, kw_only=True):
    """The external APIs together: healthy at >= 80 % reachable, degraded at >= 50 %."""

    status: Status
    apis: list[ComponentHealth]
    reachable: int
    total: int
    reachable_pct: float | None
    checked_at: AwareDatetime | None
    cached: bool
    age_s: float | None


class ComprehensiveHealth(msgspec.Struct, kw_only=True):
    """Every component, the overall status and the host's metrics."""

    status: Status
    checked_at: AwareDatetime | None
    cached: bool
    age_s: float | None
    components: list[ComponentHealth]
    external_apis: ExternalApisHealth
    system_metrics: SystemMetrics | None


class ComponentBrief(msgspec.Struct, kw_only=True):
    """One component as /api/v1/status judges it: whether it is configured, and why not healthy."""

    name: str
    kind: Kind
    status: Status
    # False when its setting is unset: `unknown` then means "not probed", not "not checked yet".
    configured: bool
    error: str | None = None


class HealthSummary(msgspec.Struct, kw_only=True):
    """What /api/v1/status shows of health; the gateway's /status decodes it."""

    status: str
    components: dict[str, str]
    checks: list[ComponentBrief] = []


# ----- history (/api/v1/health/history) ---------------------------------------------------

MAX_HOURS = 2160


class HistoryParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Which component (all when absent) over how many hours."""

    component: str | None = None
    hours: Annotated[int, msgspec.Meta(ge=1, le=MAX_HOURS)] = 24


class HistoryPoint(msgspec.Struct, kw_only=True):
    """One point of a series (several results merged into one when the window is long)."""

    t: AwareDatetime
    status: Status
    latency_ms: float | None


class HistorySeries(msgspec.Struct, kw_only=True):
    """A component's results over the window and its uptime there."""

    component: str
    kind: Kind
    uptime_pct: float | None
    checks: int
    points: list[HistoryPoint]


class HealthHistory(msgspec.Struct, kw_only=True):
    """The answer of /api/v1/health/history."""

    hours: int
    start: AwareDatetime
    end: AwareDatetime
    series: list[HistorySeries]
