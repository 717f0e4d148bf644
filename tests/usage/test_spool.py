"""The usage client's spool: what NATS cannot take waits on disk and is stored once, in order.

Real nats-servers throughout: a STOCKPILOT_USAGE stream at its byte limit, a server whose
JetStream store is full, a server that is down when the application stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from pathlib import Path

import msgspec
import nats as nats_py
import pytest
from litestar.testing import AsyncTestClient
from nats.js import api
from nats.js.errors import APIError

from gateway.app import create_app
from gateway.settings import GatewaySettings
from services.usage.client import RecorderSettings, UsageRecorder
from services.usage.spool import Spool, SpoolBusy
from shared import streams
from shared.events import utc_now
from shared.publish import encode_event
from shared.settings import CommonSettings, load_settings
from tests.harness import NatsServer, running_service
from tests.shared import toy
from tests.usage.helpers import recorded

STREAM = "STOCKPILOT_USAGE"


def spool_settings(env: dict[str, str], spool: Path, **more: str) -> RecorderSettings:
    return load_settings(
        RecorderSettings, {**env, "STOCKPILOT_USAGE_SPOOL_DIR": str(spool), **more}
    )


async def stored_ids(url: str) -> list[str]:
    """The ids of every usage event in the stream, in stream order."""
    nc = await nats_py.connect(url)
    js = nc.jetstream()
    count = (await js.stream_info(STREAM)).state.messages
    ids: list[str] = []
    if count:
        sub = await js.subscribe("stockpilot.usage.>", ordered_consumer=True)
        for _ in range(count):
            msg = await sub.next_msg(timeout=5)
            ids.append(msgspec.json.decode(msg.data)["id"])
        await sub.unsubscribe()
    await nc.close()
    return ids


async def set_usage_limit(url: str, max_bytes: int) -> None:
    """Test-only admin: cap the usage stream and make it refuse what goes over (-1: no cap)."""
    nc = await nats_py.connect(url)
    js = nc.jetstream()
    config = (await js.stream_info(STREAM)).config
    config.max_bytes = max_bytes
    config.discard = api.DiscardPolicy.NEW if max_bytes > 0 else api.DiscardPolicy.OLD
    await js.update_stream(config)
    await nc.close()


async def provision(url: str) -> None:
    nc = await nats_py.connect(url)
    await streams.provision(nc.jetstream())
    await nc.close()


async def wait_until_refused(recorder: UsageRecorder) -> None:
    """Until the stream has refused a window (the recorder is retrying)."""
    for _ in range(500):
        if recorder.retries:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the stream never refused a write")


@pytest.mark.parametrize("bare", [True, False], ids=["bare-connection", "nats-py"])
async def test_calls_a_full_stream_refuses_are_spooled_and_stored_once_in_order_after_it_is_freed(
    nats: NatsServer, env: dict[str, str], tmp_path: Path, bare: bool
) -> None:
    await provision(nats.url)
    await set_usage_limit(nats.url, 20_000)  # room for about 60 of the 1,500 calls
    settings = spool_settings(env, tmp_path / "spool")
    now = utc_now()
    calls = 1_500
    # A memory buffer far smaller than the calls: most wait only in the spool.
    recorder = await UsageRecorder.connect(
        settings, publish_timeout=0.5, buffer_size=200, bare=bare
    )
    assert all(recorder.record(recorded(i, now)) for i in range(calls))
    await wait_until_refused(recorder)
    await recorder.close(timeout=0.5)
    assert recorder.dropped == 0
    stored_while_full = await stored_ids(nats.url)
    assert 0 < len(stored_while_full) < calls
    # Unsent: at least what the stream refused (nats-py may not have read every ack in time).
    unsent = recorder.pending
    assert unsent >= calls - len(stored_while_full)

    await set_usage_limit(nats.url, -1)  # the store has room again
    again = await UsageRecorder.connect(settings, publish_timeout=2.0, buffer_size=200, bare=bare)
    assert again.spool_path == recorder.spool_path  # the restart takes over the same spool
    await asyncio.wait_for(again.flush(), timeout=60)
    await again.close()
    assert again.published == calls - len(stored_while_full)
    assert again.published + again.duplicates == unsent
    assert await stored_ids(nats.url) == [f"req-{i}" for i in range(calls)]

    # Everything is acknowledged: a third start has nothing left to send.
    third = await UsageRecorder.connect(settings)
    assert third.pending == 0
    await third.close()
    assert third.published + third.duplicates == 0


async def test_calls_a_full_jetstream_store_refuses_are_stored_once_after_space_is_freed(
    tmp_path: Path,
) -> None:
    """The store itself full (the server's file-store limit, as on a full disk), freed by
    deleting what filled it."""
    config = tmp_path / "nats.conf"
    config.write_text("jetstream { max_file_store: 256KB, max_memory_store: 1MB }\n")
    server = NatsServer(tmp_path / "nats", extra_args=["-c", str(config)]).start()
    try:
        env = {
            "STOCKPILOT_NATS_URL": server.url,
            "STOCKPILOT_DATA_DIR": str(tmp_path / "data"),
            "STOCKPILOT_CONFIG": str(Path(__file__).parent.parent / "empty.toml"),
        }
        await provision(server.url)
        nc = await nats_py.connect(server.url)
        js = nc.jetstream()
        await js.add_stream(name="FILLER", subjects=["filler"], storage=api.StorageType.FILE)
        with pytest.raises(APIError, match="insufficient resources"):
            for i in range(10_000):
                await js.publish("filler", b"x" * 1000, headers={"Nats-Msg-Id": f"f{i}"})
        settings = spool_settings(env, tmp_path / "spool")
        recorder = await UsageRecorder.connect(settings, publish_timeout=0.5)
        now = utc_now()
        calls = 300
        assert all(recorder.record(recorded(i, now)) for i in range(calls))
        await wait_until_refused(recorder)
        await recorder.close(timeout=0.5)
        assert recorder.dropped == 0 and recorder.pending > 0

        await js.delete_stream("FILLER")
        await nc.close()
        again = await UsageRecorder.connect(settings, publish_timeout=2.0)
        await asyncio.wait_for(again.flush(), timeout=60)
        await again.close()
        assert await stored_ids(server.url) == [f"req-{i}" for i in range(calls)]
    finally:
        server.stop()


async def test_calls_unsent_when_nats_is_down_at_close_are_sent_on_the_next_start(
    nats: NatsServer, env: dict[str, str], tmp_path: Path
) -> None:
    await provision(nats.url)
    settings = spool_settings(env, tmp_path / "spool")
    recorder = await UsageRecorder.connect(settings, publish_timeout=0.5)
    now = utc_now()
    for i in range(50):
        recorder.record(recorded(i, now))
    await asyncio.wait_for(recorder.flush(), timeout=30)
    nats.stop()
    for i in range(50, 400):
        assert recorder.record(recorded(i, now))
    await recorder.close(timeout=0.5)
    assert (recorder.published, recorder.pending, recorder.dropped) == (50, 350, 0)

    nats.start()
    again = await UsageRecorder.connect(settings, publish_timeout=2.0)
    await asyncio.wait_for(again.flush(), timeout=60)
    await again.close()
    assert again.published == 350
    assert await stored_ids(nats.url) == [f"req-{i}" for i in range(400)]


async def test_a_spool_at_its_bound_drops_counts_and_says_so_and_keeps_what_it_holds(
    nats: NatsServer, env: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    await provision(nats.url)
    settings = spool_settings(env, tmp_path / "spool", STOCKPILOT_USAGE_SPOOL_MAX_BYTES="65536")
    recorder = await UsageRecorder.connect(settings, publish_timeout=0.5)
    nats.stop()
    now = utc_now()
    with caplog.at_level(logging.ERROR, logger="stockpilot.usage.client"):
        kept = [recorder.record(recorded(i, now)) for i in range(1_000)]
    held = kept.count(True)
    assert 0 < held < 1_000 and kept == [True] * held + [False] * (1_000 - held)
    assert recorder.dropped == recorder.spool_dropped == 1_000 - held
    assert "is full" in caplog.text and "STOCKPILOT_USAGE_SPOOL_MAX_BYTES" in caplog.text
    await recorder.close(timeout=0.2)

    nats.start()
    again = await UsageRecorder.connect(settings, publish_timeout=2.0)
    await asyncio.wait_for(again.flush(), timeout=60)
    await again.close()
    assert await stored_ids(nats.url) == [f"req-{i}" for i in range(held)]


async def test_two_processes_never_share_a_spool(tmp_path: Path) -> None:
    first = Spool.open_slot(tmp_path)
    second = Spool.open_slot(tmp_path)
    assert first.directory != second.directory
    with pytest.raises(SpoolBusy, match="in use by another process"):
        Spool.open(first.directory)
    first.close()
    Spool.open(first.directory).close()  # free again once its holder closed it
    second.close()


def test_the_spool_keeps_order_and_its_cursor_across_reopening_and_cuts_a_torn_line(
    tmp_path: Path,
) -> None:
    spool = Spool.open(tmp_path, max_bytes=64 * 1024)
    positions = [spool.append(b'{"id":"e%d"}' % i) for i in range(10)]
    assert None not in positions
    first = spool.read(4)
    assert [event_id for event_id, _, _ in first] == ["e0", "e1", "e2", "e3"]
    spool.commit(first[-1][2])  # four acknowledged
    spool.close()
    # A crash in the middle of a write leaves half a line at the end.
    segment = max(tmp_path.glob("*.jsonl"))
    with segment.open("ab") as f:
        f.write(b'{"id":"e1')

    reopened = Spool.open(tmp_path, max_bytes=64 * 1024)
    assert reopened.unread == 6
    assert [event_id for event_id, _, _ in reopened.read(100)] == [f"e{i}" for i in range(4, 10)]
    assert reopened.pending
    reopened.commit(reopened.end)
    reopened.close()
    assert not list(tmp_path.glob("*.jsonl"))  # all acknowledged: nothing left on disk


async def test_starts_closed_at_once_again_and_again_store_every_call_once_in_order(
    nats: NatsServer, env: dict[str, str], tmp_path: Path
) -> None:
    """A close that comes while windows are in flight (or acknowledgements arriving) ends, and
    keeps in the spool exactly what is not acknowledged."""
    await provision(nats.url)
    settings = spool_settings(env, tmp_path / "spool")
    now = utc_now()
    recorder = await UsageRecorder.connect(settings, buffer_size=300)
    for i in range(3_000):
        recorder.record(recorded(i, now))
    await asyncio.wait_for(recorder.close(timeout=0), timeout=30)
    for attempt in range(100):
        if not recorder.pending:
            break
        recorder = await UsageRecorder.connect(settings, buffer_size=300)
        await asyncio.sleep(0.01 * (attempt % 4))  # closed at different points of the sending
        await asyncio.wait_for(recorder.close(timeout=0), timeout=30)
    assert recorder.pending == 0
    assert await stored_ids(nats.url) == [f"req-{i}" for i in range(3_000)]


async def test_ready_and_status_name_a_usage_stream_that_refuses_writes(
    nats: NatsServer, env: dict[str, str]
) -> None:
    settings = load_settings(CommonSettings, env)
    app = create_app(load_settings(GatewaySettings, env))
    async with contextlib.AsyncExitStack() as stack:
        for name in ("health", "usage", "batch"):  # three stand-ins on the real runtime
            definition = dataclasses.replace(toy.build()[0], name=name)
            await stack.enter_async_context(running_service(definition, settings))
        client = await stack.enter_async_context(AsyncTestClient(app))
        for _ in range(100):
            if client.app.state.services.connected:
                break
            await asyncio.sleep(0.02)
        ready = await client.get("/api/v1/health/ready")
        assert ready.status_code == 200, ready.json()
        assert ready.json()["detail"] is None

        # The stream fills up (a test-only admin caps it, then writes until it refuses).
        await set_usage_limit(nats.url, 8_000)
        nc = await nats_py.connect(nats.url)
        js = nc.jetstream()
        now = utc_now()
        with pytest.raises(APIError, match="maximum bytes exceeded"):
            for i in range(100):
                await js.publish("stockpilot.usage.recorded", encode_event(recorded(i, now)))
        await nc.close()

        ready = await client.get("/api/v1/health/ready")
        assert ready.status_code == 503
        assert "stream STOCKPILOT_USAGE is full" in ready.json()["detail"]
        status = (await client.get("/api/v1/status")).json()
        assert status["status"] == "unhealthy"
        assert status["usage_stream"]["stream"] == STREAM
        assert status["usage_stream"]["accepting"] is False
        assert "max_bytes" in status["usage_stream"]["detail"]

        await set_usage_limit(nats.url, -1)  # room again: ready again
        ready = await client.get("/api/v1/health/ready")
        assert ready.status_code == 200 and ready.json()["detail"] is None
