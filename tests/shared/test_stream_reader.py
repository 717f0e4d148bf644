"""Reads over the bare connection: the view nats-py's ordered consumer builds, or a fallback."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

import nats
import pytest
from nats.js import JetStreamContext

from shared.projection import view_digest
from shared.publish import encode_event
from shared.settings import CommonSettings, load_settings
from shared.stream_reader import ReadStopped, _Reader, read_stream
from shared.streams import STREAMS, provision, snapshot_bucket
from tests.clocks import NOON
from tests.harness import running_service, tcp_pair
from tests.shared.toy import Counted, build, dead_letters

# Any past instant does, nothing here depends on the day: three hours before the run's noon
# (tests.clocks.NOON), never a literal date.
T0 = NOON - timedelta(hours=3)
SUBJECT = "stockpilot.usage.recorded"
STREAM = STREAMS["usage"].name


async def publish(js: JetStreamContext, first: int, count: int) -> None:
    futures = [
        await js.publish_async(
            SUBJECT,
            encode_event(Counted(id=f"e{i}", occurred_at=T0, model=f"m{i % 7}", status_code=200)),
            headers={"Nats-Msg-Id": f"e{i}"},
        )
        for i in range(first, first + count)
    ]
    await asyncio.gather(*futures)


async def forget_snapshots(js: JetStreamContext) -> None:
    snapshots = await js.object_store(snapshot_bucket("usage"))
    for info in await snapshots.list():
        await snapshots.delete(info.name)


async def test_the_bare_read_folds_what_the_ordered_consumer_folds_and_follows(
    env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    settings = load_settings(CommonSettings, env)
    nc = await nats.connect(settings.nats_servers)
    js = nc.jetstream()
    await provision(js)
    letters = await dead_letters(nc)
    await publish(js, 0, 2_000)
    await js.publish(SUBJECT, b"{not json")  # with no headers: a MSG frame, not HMSG
    await nc.publish("stockpilot.health.checked", b"{}")  # another stream: not in the read
    await publish(js, 2_000, 1_500)
    await nc.flush()

    slow_definition, slow = build()
    async with running_service(slow_definition, settings, bare_reads=False):
        pass
    await forget_snapshots(js)  # the next run starts from the first event too
    caplog.set_level(logging.INFO, logger="stockpilot.runtime")
    fast_definition, fast = build()
    async with running_service(fast_definition, settings, bare_reads=True) as runtime:
        assert any("(3500 events folded)" in r.getMessage() for r in caplog.records), [
            r.getMessage() for r in caplog.records
        ]
        assert fast.view.count == slow.view.count == 3_500
        assert view_digest(fast.view) == view_digest(slow.view)
        # After the catch-up the service follows the stream as usual.
        await publish(js, 3_500, 10)
        for _ in range(200):
            if fast.view.count == 3_510:
                break
            await asyncio.sleep(0.02)
        assert fast.view.count == 3_510
        assert runtime.status().ready
    # Both runs refused the malformed event, each with the reason.
    for _ in range(100):
        if len(letters) == 2:
            break
        await asyncio.sleep(0.02)
    assert [letter.stream_seq for letter in letters] == [2_001, 2_001]
    assert all("json" in letter.reason.lower() for letter in letters)
    await nc.close()


async def test_a_read_that_stops_early_applies_everything_before_the_stop(
    env: dict[str, str],
) -> None:
    nc = await nats.connect(env["STOCKPILOT_NATS_URL"])
    js = nc.jetstream()
    await provision(js)
    await publish(js, 0, 500)
    seen: list[int] = []

    def apply(seq: int, pending: int, subject: bytes, data: bytes, stored_ns: int) -> None:
        if seq == 300:
            raise ValueError("the fold gave up")
        seen.append(seq)

    with pytest.raises(ReadStopped, match="gave up"):
        await read_stream(nc, STREAM, SUBJECT, 1, apply)
    assert seen == list(range(1, 300))
    # The read from a later start picks up where that one stopped, to the end.
    rest: list[int] = []
    count = await read_stream(
        nc, STREAM, SUBJECT, 300, lambda seq, pending, subject, data, stored_ns: rest.append(seq)
    )
    assert count == 201 and rest == list(range(300, 501))
    # Its consumers are gone (deleted at the end of each read).
    assert (await js.stream_info(STREAM)).state.consumer_count == 0
    await nc.close()


def heartbeat(*extra: bytes) -> bytes:
    """An idle heartbeat frame as nats-server sends it to a push consumer's inbox."""
    headers = b"\r\n".join(
        [b"NATS/1.0 100 Idle Heartbeat", b"Nats-Last-Consumer: 0", b"Nats-Last-Stream: 0", *extra]
    )
    headers += b"\r\n\r\n"
    return b"HMSG _INBOX.r 1 %d %d\r\n%s\r\n" % (len(headers), len(headers), headers)


async def test_a_heartbeat_saying_the_consumer_is_stalled_gets_the_flow_control_answer() -> None:
    # A consumer waiting for a flow-control answer sends nothing more but keeps sending
    # heartbeats (so no stall check fires); the heartbeat names the subject to answer.
    ours, theirs = tcp_pair()
    loop = asyncio.get_running_loop()
    transport, reader = await loop.create_connection(
        lambda: _Reader(lambda *_: None, True, lambda: None), sock=ours
    )
    theirs.setblocking(False)
    try:
        reader.data_received(heartbeat())
        await asyncio.sleep(0.05)
        with pytest.raises(BlockingIOError):  # a plain heartbeat is not answered
            theirs.recv(1024)
        reader.data_received(heartbeat(b"Nats-Consumer-Stalled: $JSC.FC.S.C.owed"))
        await asyncio.sleep(0.05)
        assert theirs.recv(1024) == b"PUB $JSC.FC.S.C.owed 0\r\n\r\n"
        assert not reader.done
    finally:
        transport.close()
        theirs.close()
