"""A batch snapshot is reused only under the history bound it was taken with."""

from __future__ import annotations

from nats.aio.client import Client as NATS

from services.batch.client import acquire_lock
from services.batch.service import build
from services.batch.settings import BatchSettings
from shared.clock import ManualClock
from shared.runtime import Runtime
from shared.service_status import ProjectionStatus
from shared.settings import load_settings
from tests.harness import running_service

JOBS = ("alpha", "beta", "gamma")


def batch_status(runtime: Runtime) -> ProjectionStatus:
    return next(p for p in runtime.status().projections if p.name == "batch")


async def test_a_snapshot_under_another_history_limit_is_discarded_and_the_view_rebuilt(
    nc: NATS, batch_env: dict[str, str], clock: ManualClock
) -> None:
    js = nc.jetstream()
    for job in JOBS:  # one lock.acquired each; held for an hour, so nothing expires meanwhile
        await acquire_lock(js, job, owner="w", execution_id=f"{job}-1", ttl_s=3600, clock=clock)
    events = len(JOBS)
    settings_a = load_settings(BatchSettings, batch_env)
    settings_b = load_settings(BatchSettings, batch_env | {"STOCKPILOT_HISTORY_LIMIT": "10"})
    async with running_service(build(settings_a), settings_a, clock=clock) as runtime:
        assert batch_status(runtime).last_seq == events
    # Same settings: the snapshot taken on the way out is reused.
    async with running_service(build(settings_a), settings_a, clock=clock) as runtime:
        status = batch_status(runtime)
        assert (status.snapshot_seq, status.events_applied) == (events, 0)
    # Another history bound keeps other executions: rebuilt from the first event.
    async with running_service(build(settings_b), settings_b, clock=clock) as runtime:
        status = batch_status(runtime)
        assert (status.snapshot_seq, status.events_applied) == (0, events)
        assert status.last_seq == events
    async with running_service(build(settings_b), settings_b, clock=clock) as runtime:
        status = batch_status(runtime)
        assert (status.snapshot_seq, status.events_applied) == (events, 0)
