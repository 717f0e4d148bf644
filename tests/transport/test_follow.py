"""The stream follower's contract (shared.transport.StreamFollower), on both paths.

Every test asserts the same thing in the end: the caller got exactly the followed subject's
stored messages from its start sequence, in order, none twice, and heard that it caught up;
and the path it asked for is still the one in use (the accelerator was not dropped).
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import time
from pathlib import Path

import pytest

from shared.transport import ACCELERATED, NATS_PY, TransportPath
from tests.harness import NatsCluster, NatsServer, free_port, nats_server
from tests.transport.conftest import (
    OTHER,
    STREAM,
    SUBJECT,
    ChoppingProxy,
    Fold,
    config_server,
    connect,
    following,
    make_stream,
    publish,
)


def assert_delivered(fold: Fold, seqs: list[int]) -> None:
    """Exactly these stream sequences, in order, once each, with their own payloads."""
    assert fold.seqs == seqs
    assert all(subject == SUBJECT for _, _, subject, _ in fold.calls)
    assert all(data.startswith(b'{"n":') for _, _, _, data in fold.calls)


async def test_events_arrive_in_order_from_the_start_sequence_and_then_as_published(
    nats: NatsServer, path: TransportPath
) -> None:
    nc = await connect(nats.url)
    await make_stream(nc)
    ours = await publish(nc, 0, 150)
    await publish(nc, 1000, 50, subject=OTHER)  # same stream, not followed
    ours += await publish(nc, 150, 150)
    start = ours[100]
    before = time.time_ns()
    async with following(nc, path, start=start) as (follower, fold):
        await fold.until_seq(ours[-1])
        await fold.until(lambda: fold.caught_up >= 1, "caught up")
        assert_delivered(fold, [seq for seq in ours if seq >= start])
        # Each call says how many are still pending after it: the last, none.
        assert fold.calls[-1][1] == 0 and fold.calls[0][1] == len(fold.calls) - 1
        assert fold.calls[0][3] == b'{"n":100}'
        # The time the stream stored it, in ns since the epoch (a whole minute's slack).
        assert all(abs(ns - before) < 60e9 for ns in fold.stored_ns)
        later = await publish(nc, 300, 20)
        await fold.until_seq(later[-1])
        assert_delivered(fold, [seq for seq in ours + later if seq >= start])
        assert follower.path == path
    await nc.close()


async def test_caught_up_is_said_at_once_for_an_empty_stream_and_again_after_new_events(
    nats: NatsServer, path: TransportPath
) -> None:
    nc = await connect(nats.url)
    await make_stream(nc)
    async with following(nc, path) as (follower, fold):
        await fold.until(lambda: fold.caught_up >= 1, "caught up on an empty stream")
        assert fold.calls == []
        said = fold.caught_up
        seqs = await publish(nc, 0, 5)
        await fold.until_seq(seqs[-1])
        await fold.until(lambda: fold.caught_up > said, "caught up again")
        assert_delivered(fold, seqs)
        assert follower.path == path
    await nc.close()


async def test_frames_cut_into_odd_pieces_are_joined(nats: NatsServer, path: TransportPath) -> None:
    """Through a proxy writing 1..13 bytes at a time; payloads that look like frames too."""
    setup = await connect(nats.url)
    await make_stream(setup)
    js = setup.jetstream()
    tricky = [b"\r\nMSG t.e 1 5\r\nhello\r\n", b"PING\r\n", b"-ERR 'x'\r\n", b"x" * 3000]
    seqs = []
    for i in range(60):
        extra = tricky[i % len(tricky)]
        ack = await js.publish(SUBJECT, b'{"n":%d}' % i + extra, headers={"Nats-Msg-Id": f"m{i}"})
        seqs.append(ack.seq)
    async with ChoppingProxy(nats.port) as proxy:
        nc = await connect(proxy.url)
        async with following(nc, path) as (follower, fold):
            await fold.until_seq(seqs[-1], timeout=60)
            assert_delivered(fold, seqs)
            assert [data for *_, data in fold.calls] == [
                b'{"n":%d}' % i + tricky[i % len(tricky)] for i in range(60)
            ]
            await fold.until(lambda: fold.caught_up >= 1, "caught up")
            assert follower.path == path
        assert proxy.pieces > 5_000  # the stream really was cut up
        await nc.close()
    await setup.close()


async def test_deleted_and_purged_messages_are_passed_over(
    nats: NatsServer, path: TransportPath
) -> None:
    nc = await connect(nats.url)
    await make_stream(nc)
    js = nc.jetstream()
    seqs = await publish(nc, 0, 30)
    for gone in (seqs[9], seqs[10], seqs[19]):
        await js.delete_msg(STREAM, gone)
    kept = [seq for seq in seqs if seq not in (seqs[9], seqs[10], seqs[19])]
    async with following(nc, path) as (follower, fold):
        await fold.until_seq(kept[-1])
        assert_delivered(fold, kept)
        await fold.until(lambda: fold.caught_up >= 1, "caught up")
        await js.purge_stream(STREAM)
        more = await publish(nc, 30, 3)  # after the purge: new sequences, new messages
        await fold.until_seq(more[-1])
        assert_delivered(fold, [*kept, *more])
        assert follower.path == path
    await nc.close()


async def test_a_lost_consumer_is_replaced_from_the_next_sequence(
    nats: NatsServer, path: TransportPath
) -> None:
    """The consumer deleted under the follower (the consumer sequence starts again)."""
    nc = await connect(nats.url)
    await make_stream(nc)
    js = nc.jetstream()
    first = await publish(nc, 0, 20)
    async with following(nc, path) as (follower, fold):
        await fold.until_seq(first[-1])
        for info in await js.consumers_info(STREAM):
            await js.delete_consumer(STREAM, info.name)
        second = await publish(nc, 20, 20)
        await fold.until_seq(second[-1])
        assert_delivered(fold, first + second)
        assert follower.path == path
    await nc.close()


async def test_a_restarted_server_is_followed_again_losing_and_repeating_nothing(
    tmp_path: Path, path: TransportPath
) -> None:
    with nats_server(tmp_path / "nats") as server:
        nc = await connect(server.url)
        await make_stream(nc)
        first = await publish(nc, 0, 100)
        async with following(nc, path) as (follower, fold):
            await fold.until_seq(first[-1])
            server.stop()
            server.start()  # the same port and store
            await fold.until(lambda: nc.is_connected, "reconnected")
            second = await publish(nc, 100, 100)
            await fold.until_seq(second[-1], timeout=60)
            assert_delivered(fold, first + second)
            assert follower.path == path
        await nc.close()


async def test_lame_duck_mode_then_a_new_server_loses_and_repeats_nothing(
    tmp_path: Path, path: TransportPath
) -> None:
    """The server enters lame duck mode (an INFO with `ldm` to every client, no new
    connections, JetStream stopped); then a new one takes over the store."""
    config = {"lame_duck_duration": "30s", "lame_duck_grace_period": "10s"}
    server, _ = config_server(tmp_path / "nats", config)
    try:
        lame = asyncio.Event()

        async def on_lame_duck() -> None:
            lame.set()

        nc = await connect(server.url, lame_duck_mode_cb=on_lame_duck)
        await make_stream(nc)
        first = await publish(nc, 0, 30)
        async with following(nc, path) as (follower, fold):
            await fold.until_seq(first[-1])
            assert server.process is not None
            server.process.send_signal(signal.SIGUSR2)  # nats-server --signal ldm
            await asyncio.wait_for(lame.wait(), 30)
            server.stop()  # (its JetStream stopped as the lame duck mode began)
            server.start()  # the same port and store
            await fold.until(lambda: nc.is_connected, "reconnected")
            after = await publish(nc, 40, 30)
            await fold.until_seq(after[-1], timeout=60)
            assert_delivered(fold, first + after)
            assert follower.path == path
        await nc.close()
    finally:
        server.stop()


async def test_messages_larger_than_the_servers_max_payload_are_still_delivered(
    tmp_path: Path, path: TransportPath
) -> None:
    """Stored under a larger limit, read from a server restarted with a small max_payload."""
    server, _ = config_server(tmp_path / "nats", {})
    nc = await connect(server.url)
    await make_stream(nc)
    js = nc.jetstream()
    big = [(await js.publish(SUBJECT, b'{"n":%d}' % i + b" " * 40_000)).seq for i in range(10)]
    await nc.close()
    server.stop()
    small, _ = config_server(tmp_path / "nats", {"max_payload": 4096}, port=server.port)
    try:
        nc = await connect(small.url)
        assert nc.max_payload == 4096
        async with following(nc, path) as (follower, fold):
            await fold.until_seq(big[-1])
            assert_delivered(fold, big)
            assert all(len(data) > 40_000 for *_, data in fold.calls)
            assert follower.path == path
        await nc.close()
    finally:
        small.stop()


async def test_a_refused_read_is_retried_and_follows_once_permitted(
    tmp_path: Path, path: TransportPath
) -> None:
    """-ERR: the reader's user may not create consumers; the server says so (a permissions
    violation) and nothing is read. Permitted by a configuration reload, the follower reads
    everything, on the path it asked for: retried, not given up."""
    reader_publish = [f"$JS.API.STREAM.INFO.{STREAM}", f"$JS.FC.{STREAM}.>", f"$JS.ACK.{STREAM}.>"]
    granted = [*reader_publish, "$JS.API.CONSUMER.>"]

    def config(allowed: list[str]) -> dict[str, object]:
        return {
            "authorization": {
                "users": [
                    {"user": "admin", "password": "a"},
                    {
                        "user": "reader",
                        "password": "r",
                        "permissions": {
                            "publish": {"allow": allowed},
                            "subscribe": {"allow": ["_INBOX.>"]},
                        },
                    },
                ]
            }
        }

    server, config_path = config_server(tmp_path / "nats", config(reader_publish))
    try:
        host = f"127.0.0.1:{server.port}"
        admin = await connect(f"nats://admin:a@{host}")
        await make_stream(admin)
        seqs = await publish(admin, 0, 25)
        errors: list[str] = []

        async def error_cb(exc: Exception) -> None:
            errors.append(str(exc))

        nc = await connect(f"nats://reader:r@{host}", error_cb=error_cb)
        async with following(nc, path, retry_s=1.0) as (follower, fold):
            await fold.until(
                lambda: any("permissions violation" in e.lower() for e in errors), "-ERR seen"
            )
            assert fold.calls == []
            config_path.write_text(json.dumps(config(granted)), encoding="utf-8")
            assert server.process is not None
            server.process.send_signal(signal.SIGHUP)  # nats-server --signal reload
            await fold.until_seq(seqs[-1], timeout=60)
            assert_delivered(fold, seqs)
            await fold.until(lambda: follower.path == path, f"back on {path}", timeout=30)
            more = await publish(admin, 25, 5)
            await fold.until_seq(more[-1])
            assert_delivered(fold, seqs + more)
        await nc.close()
        await admin.close()
    finally:
        server.stop()


async def test_an_info_update_from_a_growing_cluster_changes_nothing_delivered(
    tmp_path: Path, path: TransportPath
) -> None:
    """A fourth node joins the cluster while the follower reads from the first: the server
    sends every client an INFO with the new connect_urls (nats-py learns the node from it);
    delivery goes on, in order, on the same path."""
    cluster = NatsCluster(tmp_path / "cluster", size=3).start()
    routes = ",".join(f"nats://127.0.0.1:{port}" for port in cluster.cluster_ports)
    joining = NatsServer(
        tmp_path / "cluster" / "n3",
        extra_args=[
            "--server_name", "n3",
            "--cluster_name", "stockpilot",
            "--cluster", f"nats://127.0.0.1:{free_port()}",
            "--routes", routes,
        ],
    )  # fmt: skip
    try:
        nc = await connect(cluster.nodes[0].url)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while True:  # JetStream answers once the nodes have elected a meta leader
            try:
                await make_stream(nc, num_replicas=3)
                break
            except Exception:
                if loop.time() > deadline:
                    raise
                await asyncio.sleep(0.2)
        before = await publish(nc, 0, 30)
        async with following(nc, path) as (follower, fold):
            await fold.until_seq(before[-1])
            joining.start()
            await fold.until(
                lambda: any(u.port == joining.port for u in nc.discovered_servers),
                "the INFO naming the new node",
            )
            after = await publish(nc, 30, 30)
            await fold.until_seq(after[-1])
            assert_delivered(fold, before + after)
            assert follower.path == path
        await nc.close()
    finally:
        joining.stop()
        cluster.stop()


async def test_an_accelerator_the_server_refuses_is_retried_while_nats_py_delivers(
    tmp_path: Path, path: TransportPath, caplog: pytest.LogCaptureFixture
) -> None:
    """-ERR on the accelerator's own connection: the server takes one connection only, so it
    refuses the accelerator's second one ('maximum connections exceeded'). Events come over
    nats-py meanwhile; once the limit is raised (a configuration reload) the accelerator is
    tried again, after its interval, and carries them again."""
    server, config_path = config_server(tmp_path / "nats", {"max_connections": 1})
    try:
        nc = await connect(server.url)
        await make_stream(nc)
        first = await publish(nc, 0, 20)
        caplog.set_level(logging.INFO, logger="stockpilot.transport")
        async with following(nc, path, retry_s=0.5) as (follower, fold):
            await fold.until_seq(first[-1])
            assert follower.path == NATS_PY  # whichever was asked for
            if path == ACCELERATED:
                said = [r.getMessage() for r in caplog.records]
                assert any("maximum connections" in m and "tried again" in m for m in said), said
            config_path.write_text(json.dumps({"max_connections": 10}), encoding="utf-8")
            assert server.process is not None
            server.process.send_signal(signal.SIGHUP)  # nats-server --signal reload
            await fold.until(lambda: follower.path == path, f"back on {path}")
            second = await publish(nc, 20, 20)
            await fold.until_seq(second[-1])
            assert_delivered(fold, first + second)
        await nc.close()
    finally:
        server.stop()
