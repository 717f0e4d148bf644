"""The batch service across restarts: snapshot + tail equals a full replay, alerts stay once."""

from __future__ import annotations

import contextlib

import pytest
from nats.aio.client import Client as NATS

from services.batch.client import acquire_lock, batch_job
from services.batch.service import build
from services.batch.settings import BatchSettings
from shared.projection import view_digest
from shared.streams import snapshot_bucket
from tests.batch.conftest import alerts_of
from tests.harness import running_service


async def work(nc: NATS, job_id: str, fail: bool = False) -> None:
    with pytest.raises(RuntimeError) if fail else contextlib.nullcontext():
        async with batch_job(nc, job_id, items_total=3, heartbeat_interval_s=0.05) as run:
            run.advance(3)
            if fail:
                raise RuntimeError(f"{job_id} broke at item 3")


async def test_restart_resumes_from_snapshot_and_matches_a_full_replay(
    nc: NATS, settings: BatchSettings
) -> None:
    js = nc.jetstream()
    async with running_service(build(settings), settings):
        await work(nc, "alpha")
        await work(nc, "beta", fail=True)
        await acquire_lock(js, "held", owner="w", execution_id="h1", ttl_s=600)
    # The service is down; workers keep recording.
    await work(nc, "alpha")
    await work(nc, "gamma", fail=True)

    definition = build(settings)
    async with running_service(definition, settings) as runtime:
        status = runtime.status().projections[-1]
        assert status.snapshot_seq > 0
        assert status.events_applied > 0
        resumed = view_digest(definition.projections[0].view)
        view = definition.projections[0].view
        assert [e.status for e in view.executions.values()] == [
            "succeeded",
            "failed",
            "succeeded",
            "failed",
        ]
        assert list(view.locks) == ["held"]

    obs = await js.object_store(snapshot_bucket("batch"))
    await obs.delete("batch.batch")
    definition = build(settings)
    async with running_service(definition, settings) as runtime:
        assert runtime.status().projections[-1].snapshot_seq == 0
        assert view_digest(definition.projections[0].view) == resumed

    alerts = await alerts_of(js, "batch.job_failed")
    assert sorted(a.title for a in alerts) == [
        "Batch job beta failed",
        "Batch job gamma failed",
    ]
