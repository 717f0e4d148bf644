"""The usage stream stores a retried call id once for 24 hours (issue #19), also across a
restart of NATS and on a stack provisioned before the window was lengthened."""

from __future__ import annotations

from nats import connect
from nats.js import api as js_api

from shared.streams import STREAMS, USAGE_DUPLICATE_WINDOW_S, provision
from tests.harness import NatsServer

USAGE = STREAMS["usage"]


async def test_usage_keeps_ids_24_hours_and_a_restart_does_not_forget_them(
    nats: NatsServer,
) -> None:
    server = nats
    nc = await connect(server.url)
    try:
        js = nc.jetstream()
        # A stack provisioned by an older version: the usage stream with a 20-minute window.
        await js.add_stream(
            js_api.StreamConfig(
                name=USAGE.name, subjects=list(USAGE.subjects), duplicate_window=20 * 60.0
            )
        )
        await provision(js)  # what every start does: the window is lengthened in place
        info = await js.stream_info(USAGE.name)
        assert info.config.duplicate_window == USAGE_DUPLICATE_WINDOW_S == 86_400
        for other in ("health", "batch", "alerts"):
            assert (await js.stream_info(STREAMS[other].name)).config.duplicate_window == 1200
        first = await js.publish(
            "stockpilot.usage.recorded", b"{}", headers={"Nats-Msg-Id": "call-1"}
        )
        assert not first.duplicate
    finally:
        await nc.close()
    server.stop()
    server.start()  # same port, same store
    nc = await connect(server.url)
    try:
        again = await nc.jetstream().publish(
            "stockpilot.usage.recorded", b"{}", headers={"Nats-Msg-Id": "call-1"}
        )
        assert again.duplicate and again.seq == first.seq
        assert (await nc.jetstream().stream_info(USAGE.name)).state.messages == 1
    finally:
        await nc.close()
