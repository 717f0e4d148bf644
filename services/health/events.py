"""Events of the health stream: one probe result per component per round, one host sample."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from shared.events import Event

Status = Literal["healthy", "degraded", "unhealthy", "unknown"]
Kind = Literal["database", "redis", "openai", "external_api"]
# Probe details are small: versions, counts, percentages, the (redacted) target. Any JSON is
# accepted, so a result from another prober with richer details is not refused.
Details = dict[str, Any]

CHECKED_SUBJECT_PREFIX = "stockpilot.health.checked."
HOST_SUBJECT = "stockpilot.health.host"


class HealthChecked(Event, frozen=True, kw_only=True, tag="health.checked"):
    """One probe result of one component (`database`, `redis`, `openai`, `external.<name>`)."""

    component: str
    kind: Kind
    status: Status
    latency_ms: float | None = None
    details: Details = {}
    error: str | None = None
    # The round this result belongs to (results of one round share it).
    round_id: str | None = None

    @property
    def subject(self) -> str:
        """`stockpilot.health.checked.<component>`."""
        return CHECKED_SUBJECT_PREFIX + self.component


class HostSampled(Event, frozen=True, kw_only=True, tag="health.host_sampled"):
    """The health service's host, sampled with psutil once per round."""

    cpu_percent: float
    memory_percent: float
    disk_percent: float
    uptime_s: float
    round_id: str | None = None

    @property
    def subject(self) -> str:
        """`stockpilot.health.host`."""
        return HOST_SUBJECT


HealthEvent = HealthChecked | HostSampled

decode_health_event = msgspec.json.Decoder(HealthEvent).decode
