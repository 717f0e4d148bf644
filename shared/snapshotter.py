"""Snapshots of a service's projections in its object store: restore at start, a snapshot
every N events or T seconds, and a last one at shutdown.

Each projection's view is stored with its `last_seq` (`shared.projection.encode_snapshot`)
under `<service>.<projection>`; start-up resumes from `last_seq + 1`. A snapshot of another
fold identity or an older view shape is discarded and the view rebuilt from the first event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Mapping
from typing import Any

from nats.aio.client import Client as NATS
from nats.js.errors import NotFoundError as JsNotFoundError
from nats.js.errors import ObjectNotFoundError
from nats.js.object_store import ObjectStore

from shared.alert_outbox import AlertOutbox
from shared.clock import Clock
from shared.projection import Projection, SnapshotMismatch, decode_snapshot, encode_snapshot
from shared.projection_runner import Tracked

log = logging.getLogger("stockpilot.runtime")

# Consecutive failed snapshot writes, while connected, after which the snapshot loop fails.
SNAPSHOT_MAX_FAILURES = 10
# A snapshot due by its event count waits until the last one took at most this share of the
# time since it ended. Encoding and compressing a large view is not free (the usage view
# past 100,000 ids a day: ~10 MB, ~0.15 s of zlib, ~0.04 s of zstd since): every 50,000
# events of a 40,000/s ingest, zlib's was ~6 % of the service's CPU (py-spy, live). Bounding
# the share lengthens the tail a crash refolds only while snapshots are slow, and by as much
# as they cost.
SNAPSHOT_BUSY_SHARE = 0.05


def snapshot_due(
    events: int, since_last_s: float, last_took_s: float, every_events: int, every_s: float
) -> bool:
    """Whether to snapshot a projection that folded `events` since its last snapshot, taken
    `since_last_s` ago in `last_took_s`: after `every_s`, or after `every_events` once the
    last one took at most SNAPSHOT_BUSY_SHARE of the time since it."""
    if not events:
        return False
    if since_last_s >= every_s:
        return True
    return events >= every_events and last_took_s <= SNAPSHOT_BUSY_SHARE * since_last_s


class Snapshotter:
    """Stores and restores the snapshots of one service's tracked projections."""

    def __init__(
        self,
        service: str,
        tracked: Mapping[str, Tracked],
        clock: Clock,
        outbox: AlertOutbox,
        *,
        every_s: float,
        every_events: int,
    ) -> None:
        self.service = service
        self.tracked = tracked
        self.clock = clock
        self.outbox = outbox
        self.every_s = every_s
        self.every_events = every_events
        self._nc: NATS | None = None
        self._store: ObjectStore | None = None

    def attach(self, nc: NATS, store: ObjectStore) -> None:
        """Use `store` (the service's snapshot bucket) over `nc` from now on."""
        self._nc = nc
        self._store = store

    @property
    def store(self) -> ObjectStore:
        """The snapshot bucket (attached once connected)."""
        if self._store is None:
            raise RuntimeError("no snapshot store attached yet")
        return self._store

    def _connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    def object_name(self, projection: Projection[Any, Any]) -> str:
        """The snapshot's object name: `<service>.<projection>`."""
        return f"{self.service}.{projection.name}"

    async def restore(self, tracked: Tracked) -> None:
        """Set the projection's view from its snapshot, if there is a usable one."""
        projection = tracked.projection
        try:
            result = await self.store.get(self.object_name(projection))
        except (ObjectNotFoundError, JsNotFoundError):
            log.info(
                "%s: no snapshot of %s; folding from the first event",
                self.service,
                projection.name,
            )
            return
        data = result.data or b""
        try:
            view, taken_at = decode_snapshot(data, projection.view_type, projection)
        except SnapshotMismatch as exc:  # settings or the fold changed since it was taken
            log.warning(
                "%s: snapshot of %s discarded: %s; rebuilding from the first event",
                self.service,
                projection.name,
                exc,
            )
            return
        except Exception as exc:  # a snapshot of an older view shape: rebuild instead
            log.warning(
                "%s: snapshot of %s unusable (%s); folding from the first event",
                self.service,
                projection.name,
                exc,
            )
            return
        projection.view = view
        tracked.snapshot_seq = view.last_seq
        tracked.snapshot_at = taken_at
        log.info(
            "%s: restored %s from snapshot at seq %d (%d bytes)",
            self.service,
            projection.name,
            view.last_seq,
            len(data),
        )

    async def loop(self) -> None:
        """Snapshot each projection every `every_events` events (no more often than
        SNAPSHOT_BUSY_SHARE allows) or `every_s` seconds."""
        every_s = self.every_s
        every_events = self.every_events
        last = {name: time.monotonic() for name in self.tracked}
        took = dict.fromkeys(self.tracked, 0.0)  # how long the last snapshot took
        failures = dict.fromkeys(self.tracked, 0)
        while True:
            await asyncio.sleep(min(1.0, every_s))
            for name, tracked in self.tracked.items():
                since_last = time.monotonic() - last[name]
                if snapshot_due(
                    tracked.since_snapshot, since_last, took[name], every_events, every_s
                ):
                    started = time.monotonic()
                    if await self.snapshot(tracked) is False and self._connected():
                        # Retried next tick; while connected, a write that keeps failing (the
                        # bucket gone, no permission) is not a blip: without snapshots every
                        # restart refolds more, so the process says so and exits instead.
                        failures[name] += 1
                        if failures[name] >= SNAPSHOT_MAX_FAILURES:
                            raise RuntimeError(
                                f"snapshot of {name} failed {failures[name]} times in a row"
                            )
                        continue
                    failures[name] = 0
                    last[name] = time.monotonic()
                    took[name] = last[name] - started

    async def snapshot(self, tracked: Tracked) -> bool | None:
        """Store the projection's view with its last_seq; False when the write failed.

        Not while alerts derived from folded events wait to be published (None): after a
        crash the service resumes *after* the snapshot and would never derive them again.
        The next tick (or the shutdown, which first waits for them) takes it instead.
        """
        if self.outbox.unpublished:  # queued or being published
            return None
        projection = tracked.projection
        taken_at = self.clock.now()
        data = encode_snapshot(projection, taken_at)
        seq = projection.view.last_seq
        since = tracked.since_snapshot
        tracked.since_snapshot = 0
        try:
            await self.store.put(self.object_name(projection), data)
        except Exception as exc:
            tracked.since_snapshot += since
            log.warning("%s: snapshot of %s failed: %s", self.service, projection.name, exc)
            return False
        tracked.snapshot_seq = seq
        tracked.snapshot_at = taken_at
        log.debug(
            "%s: snapshot of %s at seq %d (%d bytes)",
            self.service,
            projection.name,
            seq,
            len(data),
        )
        return True

    async def final(self) -> None:
        """The shutdown's snapshots: once the outbox has settled (3 s at most), every
        projection with events since its last snapshot."""
        await self.outbox.settle(timeout=3)
        for tracked in self.tracked.values():
            if tracked.since_snapshot and self._connected():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self.snapshot(tracked), timeout=5)
