"""A 3-node NATS cluster: a node killed mid-ingest loses nothing; it rejoins."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import nats
import pytest

from services.usage.client import UsageRecorder
from shared.publish import publish_event
from shared.settings import CommonSettings, load_settings
from shared.streams import provision
from tests.clocks import NOON
from tests.harness import NatsCluster, running_service
from tests.shared.toy import Counted, build
from tests.usage.helpers import recorded

# Any past instant does, nothing here depends on the day: three hours before the run's noon
# (tests.clocks.NOON), never a literal date.
T0 = NOON - timedelta(hours=3)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    nodes = NatsCluster(tmp_path / "cluster").start()
    yield nodes
    nodes.stop()


async def wait_for_jetstream(url: str) -> None:
    """A new cluster needs a moment to elect its meta leader."""
    nc = await nats.connect(url.split(","))
    for _ in range(200):
        try:
            await nc.jetstream().account_info()
            break
        except Exception:
            await asyncio.sleep(0.1)
    await nc.close()


async def cluster_settings(cluster: NatsCluster) -> CommonSettings:
    """Settings for the cluster (streams on all three nodes), once it can serve JetStream."""
    await wait_for_jetstream(cluster.url)
    env = {
        "STOCKPILOT_NATS_URL": cluster.url,
        "STOCKPILOT_STREAM_REPLICAS": "3",
        "STOCKPILOT_CONFIG": str(Path(__file__).parents[1] / "empty.toml"),
    }
    return load_settings(CommonSettings, env)


async def test_node_killed_mid_ingest_loses_nothing_and_rejoins(cluster: NatsCluster) -> None:
    settings = await cluster_settings(cluster)
    definition, projection = build()
    async with running_service(definition, settings):
        nc = await nats.connect(
            settings.nats_servers, max_reconnect_attempts=-1, reconnect_time_wait=0.2
        )
        js = nc.jetstream()
        total = 3_000
        for i in range(total):
            event = Counted(id=f"e{i}", occurred_at=T0, model="m", status_code=200)
            # A killed node may have led the stream: allow for reconnecting and re-election.
            for _attempt in range(300):
                try:
                    # The same Msg-Id on a retry: stored once even if the first ack was lost.
                    await publish_event(js, "stockpilot.usage.recorded", event, timeout=1)
                    break
                except nats.errors.Error:  # no leader yet, timeout, reconnecting
                    await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"event {i} could not be published")
            if i == total // 3:
                cluster.nodes[0].stop(kill=True)
            if i == 2 * total // 3:
                cluster.nodes[0].start()  # the node rejoins with its store
        for _ in range(400):
            if projection.view.count >= total:
                break
            await asyncio.sleep(0.05)
        assert projection.view.ids == [f"e{i}" for i in range(total)]
        answer = await nc.request("stockpilot.svc.usage.count", b"{}", timeout=2)
        assert b'"count":3000' in answer.data
        info = await js.stream_info("STOCKPILOT_USAGE")
        assert info.state.messages == total
        assert info.config.num_replicas == 3
        # The restarted node is back in the stream's replica set and current.
        for _ in range(100):
            info = await js.stream_info("STOCKPILOT_USAGE")
            replicas = info.cluster.replicas or [] if info.cluster else []
            if len(replicas) == 2 and all(r.current for r in replicas):
                break
            await asyncio.sleep(0.1)
        names = {info.cluster.leader, *(r.name for r in info.cluster.replicas or [])}
        assert names == {"n0", "n1", "n2"}
        assert all(r.current for r in info.cluster.replicas or [])
        await nc.close()


async def test_the_usage_client_fails_over_when_its_node_dies(cluster: NatsCluster) -> None:
    settings = await cluster_settings(cluster)
    admin = await nats.connect(settings.nats_servers)
    await provision(admin.jetstream(), replicas=3)
    recorder = await UsageRecorder.connect(settings, publish_timeout=1.0)
    total = 3_000
    for i in range(total):
        recorder.record(recorded(i, T0))
        if i == total // 3:
            await recorder.flush()
            assert recorder.connection == "bare"
            # The node both of the client's connections are on (nats-py's and the bare one).
            url = recorder._nc.connected_url
            assert url is not None
            victim = next(node for node in cluster.nodes if node.port == url.port)
            victim.stop(kill=True)
        if i % 100 == 0:
            await asyncio.sleep(0.02)
    await asyncio.wait_for(recorder.flush(), timeout=60)
    await recorder.close()
    assert recorder.dropped == 0
    assert recorder.published + recorder.duplicates == total
    info = await admin.jetstream().stream_info("STOCKPILOT_USAGE")
    assert info.state.messages == total
    victim.start()
    await admin.close()
