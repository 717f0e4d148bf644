"""A health snapshot is reused only under the fold configuration it was taken with."""

from __future__ import annotations

from datetime import timedelta

import nats

from services.health.contract import CHECKED_SUBJECT_PREFIX, HealthChecked
from services.health.service import ROUND_KEY, build
from services.health.settings import HealthSettings
from shared.clock import ManualClock
from shared.publish import publish_event
from shared.runtime import Runtime
from shared.service_status import ProjectionStatus
from shared.settings import load_settings
from shared.streams import STATE_BUCKET, provision
from tests.harness import running_service

RESULTS = 6


def health_status(runtime: Runtime) -> ProjectionStatus:
    return next(p for p in runtime.status().projections if p.name == "health")


async def test_a_snapshot_under_other_hysteresis_is_discarded_and_the_view_rebuilt(
    env: dict[str, str], clock: ManualClock
) -> None:
    nc = await nats.connect(env["STOCKPILOT_NATS_URL"])
    js = nc.jetstream()
    await provision(js)
    # No scheduled round while this test runs: the stream holds only the results below.
    kv = await js.key_value(STATE_BUCKET)
    await kv.put(ROUND_KEY, str(2**62).encode())
    for i in range(RESULTS):
        event = HealthChecked(
            id=f"result-{i}",
            occurred_at=clock.now() - timedelta(minutes=RESULTS - i),
            component="database",
            kind="database",
            status="unhealthy" if i % 2 else "healthy",
            latency_ms=1.0,
        )
        await publish_event(js, CHECKED_SUBJECT_PREFIX + "database", event)

    settings_a = load_settings(HealthSettings, env)
    settings_b = load_settings(HealthSettings, env | {"STOCKPILOT_HYSTERESIS_DOWN": "5"})
    async with running_service(build(settings_a), settings_a, clock=clock) as runtime:
        assert health_status(runtime).last_seq == RESULTS
    # Same settings: the snapshot taken on the way out is reused.
    async with running_service(build(settings_a), settings_a, clock=clock) as runtime:
        status = health_status(runtime)
        assert (status.snapshot_seq, status.events_applied) == (RESULTS, 0)
    # Another hysteresis changes what the fold derives: rebuilt from the first event.
    async with running_service(build(settings_b), settings_b, clock=clock) as runtime:
        status = health_status(runtime)
        assert (status.snapshot_seq, status.events_applied) == (0, RESULTS)
        assert status.last_seq == RESULTS
    async with running_service(build(settings_b), settings_b, clock=clock) as runtime:
        status = health_status(runtime)
        assert (status.snapshot_seq, status.events_applied) == (RESULTS, 0)
    await nc.close()
