"""A usage snapshot is reused only under the fold configuration it was taken with (the time
zone case is tests/usage/test_service.py's; here a budget, and a restart that keeps it)."""

from __future__ import annotations

from datetime import timedelta

import nats

from services.usage.contract import SUBJECT_RECORDED
from services.usage.service import build
from shared.clock import ManualClock
from shared.publish import publish_event
from shared.runtime import Runtime
from shared.service_status import ProjectionStatus
from shared.streams import provision
from tests.harness import running_service
from tests.usage.helpers import recorded, usage_settings

CALLS = 4
# The calls, and the price table the first start publishes.
EVENTS = CALLS + 1


def usage_status(runtime: Runtime) -> ProjectionStatus:
    return next(p for p in runtime.status().projections if p.name == "usage")


async def test_a_snapshot_under_another_budget_is_discarded_and_the_view_rebuilt(
    env: dict[str, str], clock: ManualClock
) -> None:
    nc = await nats.connect(env["STOCKPILOT_NATS_URL"])
    js = nc.jetstream()
    await provision(js)
    for i in range(CALLS):
        await publish_event(js, SUBJECT_RECORDED, recorded(i, clock.now() - timedelta(hours=1)))
    settings_a = usage_settings(env)
    settings_b = usage_settings(env, daily_budget_usd="5")
    async with running_service(build(settings_a), settings_a, clock=clock) as runtime:
        assert usage_status(runtime).last_seq == EVENTS
    # Same settings: the snapshot taken on the way out is reused.
    async with running_service(build(settings_a), settings_a, clock=clock) as runtime:
        status = usage_status(runtime)
        assert (status.snapshot_seq, status.events_applied) == (EVENTS, 0)
    # A budget changes what the fold derives (budget alerts): rebuilt from the first event.
    async with running_service(build(settings_b), settings_b, clock=clock) as runtime:
        status = usage_status(runtime)
        assert (status.snapshot_seq, status.events_applied) == (0, EVENTS)
        assert status.last_seq == EVENTS
    async with running_service(build(settings_b), settings_b, clock=clock) as runtime:
        status = usage_status(runtime)
        assert (status.snapshot_seq, status.events_applied) == (EVENTS, 0)
    await nc.close()
