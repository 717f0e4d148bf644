"""The snapshotter alone, against a real nats-server's object store: snapshot and restore,
the outbox's hold, a snapshot of another fold identity, the shutdown's last snapshots, and a
loop that keeps failing."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import msgspec
import pytest
from nats import connect
from nats.aio.client import Client as NATS
from nats.js.object_store import ObjectStore

from shared.alert_outbox import AlertOutbox
from shared.clock import ManualClock
from shared.projection import Projection
from shared.projection_runner import Tracked
from shared.snapshotter import SNAPSHOT_MAX_FAILURES, Snapshotter
from shared.streams import provision, snapshot_bucket, snapshot_store
from tests.clocks import NOON
from tests.harness import NatsServer
from tests.shared.test_alert_outbox import toy_alert
from tests.shared.toy import Counted, ToyView, build


@pytest.fixture
async def nc(nats: NatsServer) -> AsyncIterator[NATS]:
    client = await connect(nats.url)
    await provision(client.jetstream())
    yield client
    await client.close()


@pytest.fixture
async def store(nc: NATS) -> ObjectStore:
    return await snapshot_store(nc.jetstream(), "usage")


def toy(fingerprint: str = "") -> tuple[Tracked, Projection[ToyView, Counted]]:
    _, projection = build()
    projection.fingerprint = fingerprint
    return Tracked(projection), projection


def fold(tracked: Tracked, *seqs: int) -> None:
    for seq in seqs:
        event = Counted(id=f"e{seq}", occurred_at=NOON, model="m", status_code=200)
        tracked.projection.fold(seq, msgspec.json.encode(event))
        tracked.since_snapshot += 1


def snapshotter(
    nc: NATS, store: ObjectStore, tracked: Tracked, outbox: AlertOutbox | None = None
) -> Snapshotter:
    snapshots = Snapshotter(
        "usage",
        {"toy": tracked},
        ManualClock(NOON),
        outbox or AlertOutbox("usage", None),
        every_s=0.01,
        every_events=1,
    )
    snapshots.attach(nc, store)
    return snapshots


async def test_a_snapshot_restores_into_a_fresh_projection(nc: NATS, store: ObjectStore) -> None:
    tracked, projection = toy()
    fold(tracked, 1, 2, 3)
    assert await snapshotter(nc, store, tracked).snapshot(tracked) is True
    assert (tracked.snapshot_seq, tracked.snapshot_at, tracked.since_snapshot) == (3, NOON, 0)

    fresh, restored = toy()
    await snapshotter(nc, store, fresh).restore(fresh)
    assert restored.view.last_seq == 3
    assert restored.view.ids == ["e1", "e2", "e3"]
    assert (fresh.snapshot_seq, fresh.snapshot_at) == (3, NOON)


async def test_no_snapshot_while_an_alert_waits_to_be_published(
    nc: NATS, store: ObjectStore
) -> None:
    tracked, _ = toy()
    fold(tracked, 1)
    outbox = AlertOutbox("usage", None)
    outbox.queue(toy_alert("a"))
    snapshots = snapshotter(nc, store, tracked, outbox)
    assert await snapshots.snapshot(tracked) is None
    assert tracked.since_snapshot == 1  # still owed
    fresh, restored = toy()
    await snapshots.restore(fresh)
    assert restored.view.last_seq == 0


async def test_a_snapshot_of_another_fold_configuration_is_discarded(
    nc: NATS, store: ObjectStore
) -> None:
    tracked, _ = toy(fingerprint="budget=10")
    fold(tracked, 1, 2)
    assert await snapshotter(nc, store, tracked).snapshot(tracked) is True
    fresh, restored = toy(fingerprint="budget=20")
    await snapshotter(nc, store, fresh).restore(fresh)
    assert restored.view.last_seq == 0
    assert fresh.snapshot_seq == 0


async def test_the_shutdown_snapshots_what_changed_since_the_last(
    nc: NATS, store: ObjectStore
) -> None:
    tracked, _ = toy()
    fold(tracked, 1, 2)
    snapshots = snapshotter(nc, store, tracked)
    await snapshots.final()
    assert tracked.snapshot_seq == 2
    assert tracked.since_snapshot == 0
    later = snapshots.clock
    assert isinstance(later, ManualClock)
    later.advance(timedelta(minutes=1))
    await snapshots.final()  # nothing new: the snapshot is not taken again
    assert tracked.snapshot_at == NOON


async def test_the_loop_fails_when_writes_keep_failing_while_connected(
    nc: NATS, store: ObjectStore
) -> None:
    tracked, _ = toy()
    fold(tracked, 1)
    snapshots = snapshotter(nc, store, tracked)
    await nc.jetstream().delete_object_store(snapshot_bucket("usage"))
    with pytest.raises(RuntimeError, match=f"failed {SNAPSHOT_MAX_FAILURES} times in a row"):
        await snapshots.loop()
    assert tracked.since_snapshot == 1
    assert tracked.snapshot_seq == 0
