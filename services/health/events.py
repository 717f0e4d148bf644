"""Events of the health stream: one probe result per component per round, one host sample."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from shared.events import Event, wrong_subject

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
