"""What a service reports about itself: the built-in `status` (readiness, where every
projection stands, the process's resources) and `digest` (each view's fingerprint and the
fold settings, what `stockpilot replay` compares) answers, and the reporter that builds them."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

import msgspec
import psutil

from shared.alert_outbox import AlertOutbox
from shared.events import AwareDatetime
from shared.projection import view_digest
from shared.projection_runner import Tracked
from shared.supervise import Supervisor

VERSION = "0.1.0"


class ProjectionStatus(msgspec.Struct, kw_only=True):
    """How far one projection has got."""

    name: str
    stream: str
    last_seq: int
    lag: int
    caught_up: bool
    events_applied: int
    dead_lettered: int
    snapshot_seq: int
    snapshot_at: AwareDatetime | None
    # How its events reach it: "accelerated" or "nats-py" (shared.transport); None from a
    # service that predates the field.
    transport: str | None = None


class ProcessStatus(msgspec.Struct, kw_only=True):
    """The service process itself."""

    pid: int
    rss_mb: float
    cpu_percent: float


class ProjectionDigest(msgspec.Struct, kw_only=True):
    """A projection's state fingerprint at a sequence (what `stockpilot replay` compares)."""

    name: str
    stream: str
    filter_subject: str
    last_seq: int
    digest: str


class DigestAnswer(msgspec.Struct, kw_only=True):
    """Answer of the built-in `digest` endpoint."""

    service: str
    projections: list[ProjectionDigest]
    # The fold-relevant settings the projections were built with (ServiceDefinition
    # .fold_settings), by settings field name; None from a service that predates them.
    settings: dict[str, Any] | None = None


class ServiceStatus(msgspec.Struct, kw_only=True):
    """Answer of every service's built-in `status` endpoint."""

    service: str
    instance: str
    version: str
    started_at: AwareDatetime
    uptime_s: float
    ready: bool
    projections: list[ProjectionStatus]
    process: ProcessStatus
    alerts_published: int
    # How each of the service's publishers sends (shared.transport): "accelerated" or
    # "nats-py" by name (the usage service's "ingest"); None when it has none.
    publishers: dict[str, str] | None = None


class StatusReporter:
    """Builds one service's `status` and `digest` answers from the runtime's parts."""

    def __init__(
        self,
        service: str,
        tracked: Mapping[str, Tracked],
        supervisor: Supervisor,
        outbox: AlertOutbox,
        started_at: datetime,
        publishers: Callable[[], dict[str, str]] | None = None,
    ) -> None:
        self.service = service
        self.publishers = publishers
        self.tracked = tracked
        self.supervisor = supervisor
        self.outbox = outbox
        self.started_at = started_at
        self._started_monotonic = time.monotonic()
        self._process = psutil.Process()
        self._process.cpu_percent()  # the first call only starts psutil's measurement

    def status(self, instance: str) -> ServiceStatus:
        """Where every projection stands and what the process uses."""
        with self._process.oneshot():
            rss = self._process.memory_info().rss / 1024 / 1024
            cpu = self._process.cpu_percent()
        projections = [
            ProjectionStatus(
                name=t.projection.name,
                stream=t.projection.stream.name,
                last_seq=t.projection.view.last_seq,
                lag=t.lag,
                caught_up=t.caught_up.is_set(),
                events_applied=t.events_applied,
                dead_lettered=t.dead_lettered,
                snapshot_seq=t.snapshot_seq,
                snapshot_at=t.snapshot_at,
                transport=t.follower.path if t.follower is not None else None,
            )
            for t in self.tracked.values()
        ]
        return ServiceStatus(
            service=self.service,
            instance=instance,
            version=VERSION,
            started_at=self.started_at,
            uptime_s=round(time.monotonic() - self._started_monotonic, 3),
            # A process whose loop died is on its way out: never "up".
            ready=all(p.caught_up for p in projections) and not self.supervisor.failed,
            projections=projections,
            process=ProcessStatus(pid=os.getpid(), rss_mb=round(rss, 1), cpu_percent=cpu),
            alerts_published=self.outbox.published,
            publishers=self.publishers() if self.publishers is not None else None,
        )

    def digest(self, settings: object, fold_settings: Sequence[str]) -> DigestAnswer:
        """Each projection's fingerprint, and the values of the settings the folds read."""
        return DigestAnswer(
            service=self.service,
            projections=[
                ProjectionDigest(
                    name=t.projection.name,
                    stream=t.projection.stream.name,
                    filter_subject=t.projection.subject,
                    last_seq=t.projection.view.last_seq,
                    digest=view_digest(t.projection.view),
                )
                for t in self.tracked.values()
            ],
            settings={name: msgspec.to_builtins(getattr(settings, name)) for name in fold_settings},
        )
