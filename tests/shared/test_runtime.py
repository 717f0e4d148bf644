"""The service runtime against a real nats-server: fold, dead-letter, snapshot, restore, alerts."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import msgspec
import nats

from shared.events import Alert
from shared.publish import publish_event
from shared.settings import CommonSettings, load_settings
from shared.streams import provision, snapshot_bucket
from tests.clocks import NOON
from tests.harness import running_service
from tests.shared.toy import CountAnswer, Counted, build, dead_letters

# Any past instant does, nothing here depends on the day: three hours before the run's noon
# (tests.clocks.NOON), never a literal date.
T0 = NOON - timedelta(hours=3)


async def publish_counted(js: object, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        event = Counted(id=f"e{i}", occurred_at=T0, model="m" if i % 2 else "n", status_code=200)
        await publish_event(js, "stockpilot.usage.recorded", event)  # type: ignore[arg-type]


async def test_folds_stream_and_answers_queries(env: dict[str, str]) -> None:
    settings = load_settings(CommonSettings, env)
    definition, projection = build()
    nc = await nats.connect(settings.nats_servers)
    js = nc.jetstream()
    await provision(js)
    await publish_counted(js, 5)
    async with running_service(definition, settings):
        msg = await nc.request("stockpilot.svc.usage.count", b"{}", timeout=2)
        answer = msgspec.json.decode(msg.data, type=CountAnswer)
        assert answer.count == 5
        assert answer.by_model == {"n": 3, "m": 2}
        ping = await nc.request("$SRV.PING.stockpilot-usage", b"", timeout=2)
        assert b"stockpilot-usage" in ping.data
    await nc.close()


async def test_malformed_message_is_dead_lettered_and_service_goes_on(env: dict[str, str]) -> None:
    settings = load_settings(CommonSettings, env)
    definition, projection = build()
    nc = await nats.connect(settings.nats_servers)
    js = nc.jetstream()
    await provision(js)
    letters = await dead_letters(nc)
    async with running_service(definition, settings) as runtime:
        await js.publish("stockpilot.usage.recorded", b"{not json")
        await js.publish("stockpilot.usage.recorded", b'{"type":"usage.recorded","id":"x"}')
        bad = Counted(id="neg", occurred_at=T0, model="m", status_code=-1)
        await publish_event(js, "stockpilot.usage.recorded", bad)
        await publish_counted(js, 1)
        for _ in range(100):
            if projection.view.count == 1 and len(letters) == 3:
                break
            await asyncio.sleep(0.05)
        assert projection.view.count == 1
        assert [letter.stream_seq for letter in letters] == [1, 2, 3]
        assert "JSON" in letters[0].reason or "json" in letters[0].reason.lower()
        assert "missing required field" in letters[1].reason
        assert "negative status code" in letters[2].reason
        assert runtime.status().projections[-1].dead_lettered == 3
    await nc.close()


async def test_restart_restores_snapshot_and_folds_tail(env: dict[str, str]) -> None:
    settings = load_settings(CommonSettings, env)
    nc = await nats.connect(settings.nats_servers)
    js = nc.jetstream()
    await provision(js)
    await publish_counted(js, 10)
    definition, projection = build()
    async with running_service(definition, settings):
        assert projection.view.count == 10
    # Shutdown took a snapshot at seq 10; five more arrive while the service is down.
    await publish_counted(js, 5, start=10)
    definition, restarted = build()
    async with running_service(definition, settings) as runtime:
        status = runtime.status().projections[-1]
        assert status.snapshot_seq == 10
        assert status.events_applied == 5
        assert restarted.view.count == 15
        assert restarted.view.ids == [f"e{i}" for i in range(15)]
    await nc.close()


async def test_derived_alert_is_published_once_across_restarts(env: dict[str, str]) -> None:
    settings = load_settings(CommonSettings, env)
    nc = await nats.connect(settings.nats_servers)
    js = nc.jetstream()
    await provision(js)
    await publish_counted(js, 4)
    definition, _ = build()
    async with running_service(definition, settings):
        await asyncio.sleep(0.3)
    # A fresh replica folds from the first event again (no snapshot used) and derives the
    # same alert: the ledger keeps it from being raised twice.
    obs = await js.object_store(snapshot_bucket("usage"))
    for name in ("usage.toy", "usage.usage-alert-ledger"):
        await obs.delete(name)
    definition, _ = build()
    async with running_service(definition, settings):
        await asyncio.sleep(0.3)
    info = await js.stream_info("STOCKPILOT_ALERTS")
    assert info.state.messages == 1
    stored = await js.get_last_msg("STOCKPILOT_ALERTS", "stockpilot.alerts.usage.toy_three")
    alert = msgspec.json.decode(stored.data, type=Alert)
    assert alert.id == "usage.toy_three:all:ever"
    await nc.close()


async def test_a_stop_while_nats_is_still_unreachable_ends_the_service(tmp_path: object) -> None:
    from pathlib import Path

    from shared.runtime import Runtime
    from tests.harness import free_port

    settings = load_settings(
        CommonSettings,
        {
            "STOCKPILOT_NATS_URL": f"nats://127.0.0.1:{free_port()}",
            "STOCKPILOT_CONFIG": str(Path(__file__).parents[1] / "empty.toml"),
        },
    )
    definition, _ = build()
    runtime = Runtime(definition, settings)
    task = asyncio.create_task(runtime.run())
    await asyncio.sleep(0.5)
    assert not task.done()
    runtime.stop.set()
    # Not wait_for: the cancellation it sends at its timeout would end a task that missed `stop`.
    done, _ = await asyncio.wait({task}, timeout=3)
    assert done, "still connecting 3 s after stop"
    assert task.result() == 0


async def test_a_process_runtime_leaves_its_caught_up_views_out_of_collection(
    env: dict[str, str],
) -> None:
    """run_service's runtimes freeze what the catch-up built (full collections walked it
    all, ~2 % of the usage service's CPU under ingest); tests' runtimes do not."""
    import gc

    settings = load_settings(CommonSettings, env)
    definition, _ = build()
    nc = await nats.connect(settings.nats_servers)
    await provision(nc.jetstream())
    await publish_counted(nc.jetstream(), 3)
    assert gc.get_freeze_count() == 0
    try:
        async with running_service(definition, settings, freeze_gc=True):
            for _ in range(250):  # background work starts just after the service is ready
                if gc.get_freeze_count():
                    break
                await asyncio.sleep(0.02)
            assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
    await nc.close()
