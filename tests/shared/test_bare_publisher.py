"""JetStream publishes over the bare connection, against a real nats-server."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats as nats_py
from nats.js import api as js_api

from shared.bare_publisher import BarePublisher, Batch, Published, _Acks
from tests.harness import NatsServer, nats_server

SUBJECT = "bench.bare.events"


async def fresh_stream(
    url: str, reconnect: bool = True, **config: object
) -> tuple[nats_py.NATS, str]:
    nc = await nats_py.connect(url, allow_reconnect=reconnect)
    js = nc.jetstream()
    await js.add_stream(js_api.StreamConfig(name="BARE", subjects=[SUBJECT], **config))  # type: ignore[arg-type]
    return nc, "BARE"


async def test_batches_are_stored_in_order_once_per_msg_id(nats: NatsServer) -> None:
    nc, stream = await fresh_stream(nats.url)
    publisher = await BarePublisher.open(nc)
    first = publisher.publish(SUBJECT, [(f"m{i}", b'{"n":%d}' % i) for i in range(1000)])
    second = publisher.publish(SUBJECT, [(f"m{i}", b"again") for i in range(990, 1010)])
    one, two = await asyncio.wait_for(asyncio.gather(first, second), 10)
    assert (one.size, one.acked, one.duplicates, one.error) == (1000, 1000, 0, None)
    # m990..m999 were stored by the first batch: acknowledged as duplicates, not stored again.
    assert (two.size, two.acked, two.duplicates, two.error) == (20, 20, 10, None)
    js = nc.jetstream()
    assert (await js.stream_info(stream)).state.messages == 1010
    stored = await js.get_msg(stream, 1)
    assert stored.data == b'{"n":0}' and stored.headers == {"Nats-Msg-Id": "m0"}
    assert (await js.get_msg(stream, 1010)).data == b"again"
    empty = await publisher.publish(SUBJECT, [])
    assert (empty.acked, empty.error) == (0, None)
    publisher.close()
    assert publisher.closed
    await nc.close()


async def test_a_subject_no_stream_takes_is_not_acknowledged_and_says_why(
    nats: NatsServer,
) -> None:
    nc = await nats_py.connect(nats.url)
    publisher = await BarePublisher.open(nc)
    outcome = await asyncio.wait_for(publisher.publish("no.stream.here", [("x", b"{}")]), 10)
    assert (outcome.acked, outcome.error) == (0, "no stream takes the subject (503)")
    publisher.close()
    await nc.close()


async def test_a_refused_message_stops_the_count_at_the_ones_before_it(
    nats: NatsServer,
) -> None:
    nc, _ = await fresh_stream(nats.url, max_msgs=5, discard=js_api.DiscardPolicy.NEW)
    publisher = await BarePublisher.open(nc)
    outcome = await asyncio.wait_for(
        publisher.publish(SUBJECT, [(f"m{i}", b"{}") for i in range(8)]), 10
    )
    assert (outcome.acked, outcome.duplicates) == (5, 0)
    assert outcome.error is not None and "maximum messages" in outcome.error
    publisher.close()
    await nc.close()


async def test_a_lost_connection_finishes_the_waiting_batches(tmp_path: Path) -> None:
    with nats_server(tmp_path / "nats") as server:
        nc, _ = await fresh_stream(server.url, reconnect=False)
        publisher = await BarePublisher.open(nc)
        done = await publisher.publish(SUBJECT, [("a", b"{}")])
        assert done.acked == 1
        server.stop(kill=True)
        outcome = await asyncio.wait_for(
            publisher.publish(SUBJECT, [(f"m{i}", b"{}") for i in range(100)]), 10
        )
        assert outcome.acked == 0
        assert outcome.error is not None and "connection lost" in outcome.error
        assert publisher.closed
        late = await publisher.publish(SUBJECT, [("b", b"{}")])
        assert (late.acked, late.error is not None) == (0, True)
        await nc.close()


async def test_the_main_connections_credentials_are_used(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats", extra_args=["--user", "ops", "--pass", "s3cret"])
    server.start()
    try:
        url = f"nats://ops:s3cret@127.0.0.1:{server.port}"
        nc, stream = await fresh_stream(url)
        publisher = await BarePublisher.open(nc)
        outcome = await asyncio.wait_for(publisher.publish(SUBJECT, [("a", b"{}")]), 10)
        assert (outcome.acked, outcome.error) == (1, None)
        publisher.close()
        await nc.close()
        # Given to nats-py as options instead of in the URL.
        nc = await nats_py.connect(server.url, user="ops", password="s3cret")
        publisher = await BarePublisher.open(nc)
        outcome = await asyncio.wait_for(publisher.publish(SUBJECT, [("b", b"{}")]), 10)
        assert (outcome.acked, outcome.error) == (1, None)
        publisher.close()
        await nc.close()
    finally:
        server.stop()


# Answers as nats-server writes them (tests/shared/test_bare_publisher.py's real-server tests
# see the same): stored, stored with a JetStream domain, a duplicate, an error, stored.
ANSWERS = [
    b'{"stream":"S","seq":7}',
    b'{"stream":"S","domain":"hub","seq":8}',
    b'{"stream":"S","seq":7,"duplicate": true}',
    b'{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}',
    b'{"stream":"S","seq":9}',
]


async def test_acknowledgements_read_the_same_wherever_the_socket_cuts_them() -> None:
    """Whole acknowledgements take a fast path; an error answer, a PING and a frame cut in
    two take the general parser: every cut of the bytes gives the same outcome."""
    frames = [b"MSG _INBOX.t.%d 1 %d\r\n%s\r\n" % (n, len(a), a) for n, a in enumerate(ANSWERS)]
    data = b"".join(frames[:2]) + b"PING\r\n" + b"".join(frames[2:])
    expected = Published(5, 3, 1, "maximum messages exceeded (503)", 9)
    loop = asyncio.get_running_loop()
    for cut in range(len(data) + 1):
        acks = _Acks()
        batch = Batch(0, len(ANSWERS), loop.create_future())
        acks.batches.append(batch)
        acks.data_received(data[:cut])
        acks.data_received(data[cut:])
        assert batch.future.done(), f"cut at {cut}"
        assert batch.future.result() == expected, f"cut at {cut}"
        assert not acks.batches and acks.rest == b""
