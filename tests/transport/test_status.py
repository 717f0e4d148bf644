"""Which transport path each projection is on shows in the service status, the gateway's
/api/v1/status and /metrics; STOCKPILOT_NATS_ACCELERATOR chooses it."""

from __future__ import annotations

import asyncio

from litestar.testing import AsyncTestClient

from gateway import metrics_families as fam
from gateway.app import create_app
from gateway.settings import GatewaySettings
from services.usage import service as usage_service
from services.usage.settings import UsageSettings
from shared.clock import ManualClock
from shared.service_status import ProcessStatus, ProjectionStatus, ServiceStatus
from shared.settings import load_settings
from shared.transport import ACCELERATED, NATS_PY, TransportPath
from tests.clocks import NOON
from tests.harness import running_service


def status_on(paths: list[str | None]) -> ServiceStatus:
    """A usage status whose projections read over `paths`."""
    return ServiceStatus(
        service="usage",
        instance="i1",
        version="1",
        started_at=NOON,
        uptime_s=1.0,
        ready=True,
        projections=[
            ProjectionStatus(
                name=f"p{i}",
                stream="S",
                last_seq=1,
                lag=0,
                caught_up=True,
                events_applied=1,
                dead_lettered=0,
                snapshot_seq=0,
                snapshot_at=None,
                transport=path,
            )
            for i, path in enumerate(paths)
        ],
        process=ProcessStatus(pid=1, rss_mb=1.0, cpu_percent=0.0),
        alerts_published=0,
    )


def test_the_transport_family_is_a_state_set_per_projection() -> None:
    family = fam.transport_families(
        {"usage": status_on([ACCELERATED, NATS_PY, None]), "batch": None}
    )[0]
    samples = {
        (s.labels["service"], s.labels["projection"], s.labels["path"]): s.value
        for s in family.samples
    }
    assert samples == {
        ("usage", "p0", "accelerated"): 1.0,
        ("usage", "p0", "nats-py"): 0.0,
        ("usage", "p1", "accelerated"): 0.0,
        ("usage", "p1", "nats-py"): 1.0,
    }
    assert family.name == "stockpilot_projection_transport" and family.type == "gauge"


async def test_status_and_metrics_say_which_path_each_projection_reads_over(
    env: dict[str, str], path: TransportPath, clock: ManualClock
) -> None:
    env = {**env, "STOCKPILOT_NATS_ACCELERATOR": "on" if path == ACCELERATED else "off"}
    settings = load_settings(UsageSettings, env)
    async with running_service(usage_service.build(settings), settings, clock=clock) as runtime:
        own = runtime.status().projections
        assert own and all(p.transport == path for p in own)
        app = create_app(load_settings(GatewaySettings, env), clock)
        async with AsyncTestClient(app) as client:
            for _ in range(200):
                if client.app.state.services.connected:
                    break
                await asyncio.sleep(0.02)
            body = (await client.get("/api/v1/status")).json()
            usage = body["services"]["usage"]
            assert usage["transports"] == {p.name: path for p in own}
            assert body["services"]["health"].get("transports") is None  # not running
            metrics = (await client.get("/metrics")).text
            for p in own:
                labels = f'path="{path}",projection="{p.name}",service="usage"'
                assert f"stockpilot_projection_transport{{{labels}}} 1.0" in metrics
