"""The publisher's contract (shared.transport.JetStreamPublisher), on both paths.

A window's outcome counts exactly the messages the stream acknowledged, from the first, and
says why the rest were not; re-sending the rest with the same Msg-Ids stores each once.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

from nats.js import api as js_api

from shared.transport import ACCELERATED, NATS_PY, JetStreamPublisher, Published, TransportPath
from tests.harness import NatsServer, nats_server
from tests.transport.conftest import STREAM, SUBJECT, config_server, connect

Window = list[tuple[str, bytes]]


def window(first: int, count: int, payload: bytes = b"") -> Window:
    return [(f"m{i}", payload or b'{"n":%d}' % i) for i in range(first, first + count)]


async def send(publisher: JetStreamPublisher, messages: Window) -> Published:
    return await asyncio.wait_for(await publisher.publish(SUBJECT, messages), 30)


async def stored(nc: object, count: int) -> list[bytes]:
    js = nc.jetstream()  # type: ignore[attr-defined]
    return [(await js.get_msg(STREAM, seq)).data for seq in range(1, count + 1)]


async def make_stream(nc: object, **config: object) -> None:
    js = nc.jetstream()  # type: ignore[attr-defined]
    await js.add_stream(js_api.StreamConfig(name=STREAM, subjects=["t.>"], **config))  # type: ignore[arg-type]


async def test_windows_are_stored_in_order_and_acks_counted_exactly(
    nats: NatsServer, path: TransportPath
) -> None:
    nc = await connect(nats.url)
    await make_stream(nc)
    publisher = JetStreamPublisher(nc, accelerated=path == ACCELERATED)
    first = await publisher.publish(SUBJECT, window(0, 1000))
    second = await publisher.publish(SUBJECT, window(990, 20, b"again"))
    one, two = await asyncio.wait_for(asyncio.gather(first, second), 30)
    assert (one.size, one.acked, one.duplicates, one.error) == (1000, 1000, 0, None)
    # m990..m999 were stored by the first window: acknowledged as duplicates, not stored again.
    assert (two.size, two.acked, two.duplicates, two.error) == (20, 20, 10, None)
    # The highest sequence acknowledged: what a caller waits for a projection to fold.
    assert (one.last_seq, two.last_seq) == (1000, 1010)
    js = nc.jetstream()
    assert (await js.stream_info(STREAM)).state.messages == 1010
    first_stored = await js.get_msg(STREAM, 1)
    assert first_stored.data == b'{"n":0}' and first_stored.headers == {"Nats-Msg-Id": "m0"}
    assert (await js.get_msg(STREAM, 1010)).data == b"again"
    empty = await send(publisher, [])
    assert (empty.acked, empty.error) == (0, None)
    assert publisher.path == path
    publisher.close()
    await nc.close()


async def test_a_subject_no_stream_takes_is_not_acknowledged_and_says_why(
    nats: NatsServer, path: TransportPath
) -> None:
    nc = await connect(nats.url)
    publisher = JetStreamPublisher(nc, accelerated=path == ACCELERATED, timeout=5)
    outcome = await asyncio.wait_for(await publisher.publish("no.stream", [("x", b"{}")]), 30)
    assert outcome.acked == 0 and outcome.error
    assert publisher.path == path
    publisher.close()
    await nc.close()


async def test_a_refused_message_stops_the_count_at_the_ones_before_it(
    nats: NatsServer, path: TransportPath
) -> None:
    nc = await connect(nats.url)
    await make_stream(nc, max_msgs=5, discard=js_api.DiscardPolicy.NEW)
    publisher = JetStreamPublisher(nc, accelerated=path == ACCELERATED)
    outcome = await send(publisher, window(0, 8))
    assert (outcome.acked, outcome.duplicates, outcome.last_seq) == (5, 0, 5)
    assert outcome.error is not None and "maximum messages" in outcome.error
    publisher.close()
    await nc.close()


async def test_a_message_over_the_servers_max_payload_is_refused_before_it_is_sent(
    tmp_path: Path, path: TransportPath
) -> None:
    """The ones before it are stored, it and the ones after it are not; the publisher and
    its connection go on (nats-server closes a connection that sends one: -ERR)."""
    server, _ = config_server(tmp_path / "nats", {"max_payload": 2048})
    try:
        nc = await connect(server.url)
        await make_stream(nc)
        publisher = JetStreamPublisher(nc, accelerated=path == ACCELERATED)
        messages = [*window(0, 3), ("big", b"x" * 4096), *window(3, 2)]
        outcome = await send(publisher, messages)
        assert (outcome.size, outcome.acked) == (6, 3)
        assert outcome.error is not None and "payload" in outcome.error.lower()
        after = await send(publisher, window(3, 2))
        assert (after.acked, after.error) == (2, None)
        assert await stored(nc, 5) == [b'{"n":%d}' % i for i in range(5)]
        assert publisher.path == path
        publisher.close()
        await nc.close()
    finally:
        server.stop()


async def test_a_lost_connection_finishes_the_waiting_windows(
    tmp_path: Path, path: TransportPath
) -> None:
    with nats_server(tmp_path / "nats") as server:
        nc = await connect(server.url, allow_reconnect=False)
        await make_stream(nc)
        publisher = JetStreamPublisher(nc, accelerated=path == ACCELERATED, timeout=5)
        done = await send(publisher, [("a", b"{}")])
        assert done.acked == 1
        server.stop(kill=True)
        outcome = await send(publisher, window(0, 100))
        assert outcome.acked == 0 and outcome.error is not None
        publisher.reset()
        late = await send(publisher, [("b", b"{}")])
        assert (late.acked, late.error is not None) == (0, True)
        await nc.close()


async def test_after_a_server_restart_the_next_window_goes_out_without_a_reset(
    tmp_path: Path, path: TransportPath
) -> None:
    """A caller that only retries (the usage service's ingest answers 503 and the client
    posts again) gets its windows stored once the server is back."""
    with nats_server(tmp_path / "nats") as server:
        nc = await connect(server.url)
        await make_stream(nc)
        publisher = JetStreamPublisher(nc, accelerated=path == ACCELERATED, timeout=2)
        assert (await send(publisher, window(0, 10))).acked == 10
        server.stop()
        server.start()  # the same port and store
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while (outcome := await send(publisher, window(10, 10))).error is not None:
            assert loop.time() < deadline, outcome.error
            await asyncio.sleep(0.1)
        assert outcome.acked == 10 and publisher.path == path
        assert (await nc.jetstream().stream_info(STREAM)).state.messages == 20
        publisher.close()
        await nc.close()


async def test_nothing_is_lost_or_stored_twice_over_a_server_restart(
    tmp_path: Path, path: TransportPath
) -> None:
    """Windows re-sent from their first unacknowledged message (as the usage client does)
    while the server restarts: every message stored exactly once, in order."""
    with nats_server(tmp_path / "nats") as server:
        nc = await connect(server.url)
        await make_stream(nc)
        publisher = JetStreamPublisher(nc, accelerated=path == ACCELERATED, timeout=2)
        pending = window(0, 600)
        restarted = False
        attempts = 0
        while pending and attempts < 500:
            attempts += 1
            outcome = await send(publisher, pending[:100])
            pending = pending[outcome.acked :]
            if outcome.error is not None:
                publisher.reset()
                await asyncio.sleep(0.1)
            if not restarted and len(pending) <= 300:
                server.stop()
                server.start()  # the same port and store
                restarted = True
        assert pending == [] and restarted
        js = nc.jetstream()
        assert (await js.stream_info(STREAM)).state.messages == 600
        assert await stored(nc, 600) == [b'{"n":%d}' % i for i in range(600)]
        assert publisher.path == path
        publisher.close()
        await nc.close()


async def test_the_connections_credentials_are_used(tmp_path: Path, path: TransportPath) -> None:
    server = NatsServer(tmp_path / "nats", extra_args=["--user", "ops", "--pass", "s3cret"])
    server.start()
    try:
        url = f"nats://ops:s3cret@127.0.0.1:{server.port}"
        nc = await connect(url)
        await make_stream(nc)
        publisher = JetStreamPublisher(nc, accelerated=path == ACCELERATED)
        outcome = await send(publisher, [("a", b"{}")])
        assert (outcome.acked, outcome.error, publisher.path) == (1, None, path)
        publisher.close()
        await nc.close()
        # Given to nats-py as options instead of in the URL.
        nc = await connect(server.url, user="ops", password="s3cret")
        publisher = JetStreamPublisher(nc, accelerated=path == ACCELERATED)
        outcome = await send(publisher, [("b", b"{}")])
        assert (outcome.acked, outcome.error, publisher.path) == (1, None, path)
        publisher.close()
        await nc.close()
    finally:
        server.stop()


async def test_an_accelerator_the_server_refuses_is_retried_while_nats_py_publishes(
    tmp_path: Path, path: TransportPath
) -> None:
    """The server takes one connection only and answers the accelerator's with -ERR: windows
    go over nats-py, and over the accelerator again once the limit is raised."""
    server, config_path = config_server(tmp_path / "nats", {"max_connections": 1})
    try:
        nc = await connect(server.url)
        await make_stream(nc)
        publisher = JetStreamPublisher(nc, accelerated=path == ACCELERATED, retry_s=0.2)
        outcome = await send(publisher, window(0, 10))
        assert (outcome.acked, outcome.error, publisher.path) == (10, None, NATS_PY)
        config_path.write_text(json.dumps({"max_connections": 10}), encoding="utf-8")
        assert server.process is not None
        server.process.send_signal(signal.SIGHUP)  # nats-server --signal reload
        sent = 10
        for _ in range(200):
            outcome = await send(publisher, window(sent, 10))
            assert (outcome.acked, outcome.error) == (10, None)
            sent += 10
            if publisher.path == path:
                break
            await asyncio.sleep(0.05)
        assert publisher.path == path
        assert await stored(nc, sent) == [b'{"n":%d}' % i for i in range(sent)]
        publisher.close()
        await nc.close()
    finally:
        server.stop()
