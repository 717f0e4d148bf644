"""`GET /api/v1/alerts/stream` served by a real uvicorn on a free port, read with httpx."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import msgspec
import nats
import pytest
import uvicorn
from nats.js import JetStreamContext

from gateway.alert_fanout import AlertFanout
from gateway.app import create_app
from gateway.http_server import server_config
from gateway.routes import alerts as alerts_routes
from gateway.settings import GatewaySettings
from shared.events import Alert
from shared.publish import publish_event
from shared.settings import load_settings
from shared.streams import STREAMS, provision
from tests.clocks import NOON
from tests.harness import free_port

# When the alerts say they occurred (the stream is read by when they were stored).
T0 = NOON - timedelta(hours=3)


def make_alert(n: int) -> Alert:
    return Alert(
        id=f"batch.job_failed:sync-{n}:exec-{n}",
        occurred_at=T0,
        source="batch",
        kind="batch.job_failed",
        severity="critical",
        title=f"job sync-{n} failed",
        message="price sync failed",
        metric="failed",
        value=1,
        threshold=1,
    )


@dataclass
class SseEvent:
    id: str | None
    event: str | None
    data: str


# The app behind each base URL served by `gateway`.
SERVED: dict[str, Any] = {}


@contextlib.asynccontextmanager
async def gateway(env: dict[str, str], **extra: str) -> AsyncIterator[str]:
    """The gateway on a real socket; yields its base URL once it reaches NATS."""
    # The gateway creates the streams once it reaches NATS, a moment after /health says
    # 200: create them first, or the first stream request may find none (503).
    nc = await nats.connect(env["STOCKPILOT_NATS_URL"])
    await provision(nc.jetstream())
    await nc.close()
    settings = load_settings(GatewaySettings, {**env, **extra})
    port = free_port()
    # The production server options (gateway.http_server), on the test's own loop.
    config = server_config(create_app(settings), settings, port=port, loop="asyncio")
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    base = f"http://127.0.0.1:{port}"
    SERVED[base] = config.app
    try:
        token = extra.get("STOCKPILOT_READ_TOKEN")
        auth = {"Authorization": f"Bearer {token}"} if token else {}
        async with httpx.AsyncClient(base_url=base, headers=auth) as client:
            for _ in range(200):
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get("/api/v1/health")).status_code == 200:
                        break
                await asyncio.sleep(0.05)
            else:
                raise TimeoutError("gateway did not reach NATS")
        yield base
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=10)


async def read_events(
    lines: AsyncIterator[str], count: int, comments: list[str] | None = None
) -> list[SseEvent]:
    """The next `count` events of an SSE response (comments collected on the side)."""
    found: list[SseEvent] = []
    fields: dict[str, str] = {}
    async with asyncio.timeout(10):
        async for line in lines:
            if line == "":
                if "data" in fields:
                    found.append(SseEvent(fields.get("id"), fields.get("event"), fields["data"]))
                    if len(found) == count:
                        return found
                fields = {}
            elif line.startswith(":"):
                if comments is not None:
                    comments.append(line[1:].strip())
                    if count == 0:
                        return found
            else:
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")
    return found


@contextlib.asynccontextmanager
async def jetstream(env: dict[str, str]) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(env["STOCKPILOT_NATS_URL"])
    try:
        js = nc.jetstream()
        await provision(js)
        yield js
    finally:
        await nc.close()


async def test_alert_published_after_connecting_arrives_as_an_event(env: dict[str, str]) -> None:
    async with (
        jetstream(env) as js,
        gateway(env) as base,
        httpx.AsyncClient(base_url=base, timeout=10) as client,
    ):
        old = make_alert(0)
        await publish_event(js, old.subject, old)
        async with client.stream("GET", "/api/v1/alerts/stream") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            await asyncio.sleep(0.3)  # the consumer exists once the headers are sent
            new = make_alert(1)
            ack = await publish_event(js, new.subject, new)
            (event,) = await read_events(response.aiter_lines(), 1)
    assert event.event == "alert"
    assert event.id == str(ack.seq)
    assert msgspec.json.decode(event.data, type=Alert) == new


async def test_resuming_with_last_event_id_has_no_gaps_or_repeats(env: dict[str, str]) -> None:
    async with (
        jetstream(env) as js,
        gateway(env) as base,
        httpx.AsyncClient(base_url=base, timeout=10) as client,
    ):
        for n in range(1, 4):
            alert = make_alert(n)
            await publish_event(js, alert.subject, alert)
        async with client.stream("GET", "/api/v1/alerts/stream?since=0") as response:
            first = await read_events(response.aiter_lines(), 2)
        assert [e.id for e in first] == ["1", "2"]
        for n in range(4, 7):
            alert = make_alert(n)
            await publish_event(js, alert.subject, alert)
        headers = {"Last-Event-ID": first[-1].id or ""}
        async with client.stream("GET", "/api/v1/alerts/stream", headers=headers) as response:
            lines = response.aiter_lines()
            rest = await read_events(lines, 4)
            new = make_alert(7)
            await publish_event(js, new.subject, new)
            rest += await read_events(lines, 1)
    assert [e.id for e in rest] == ["3", "4", "5", "6", "7"]
    ids = [msgspec.json.decode(e.data, type=Alert).id for e in first + rest]
    assert ids == [make_alert(n).id for n in range(1, 8)]


async def test_idle_stream_sends_heartbeat_comments(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(alerts_routes, "HEARTBEAT_S", 0.2)
    async with gateway(env) as base, httpx.AsyncClient(base_url=base, timeout=10) as client:
        async with client.stream("GET", "/api/v1/alerts/stream") as response:
            assert response.status_code == 200
            comments: list[str] = []
            await read_events(response.aiter_lines(), 0, comments)
    assert comments == ["heartbeat"]


async def test_bad_last_event_id_is_refused(env: dict[str, str]) -> None:
    async with gateway(env) as base, httpx.AsyncClient(base_url=base, timeout=10) as client:
        response = await client.get("/api/v1/alerts/stream", headers={"Last-Event-ID": "abc"})
        assert response.status_code == 422
        assert "Last-Event-ID" in response.json()["detail"]


async def test_read_token_guards_the_stream(env: dict[str, str]) -> None:
    async with (
        gateway(env, STOCKPILOT_READ_TOKEN="r") as base,
        httpx.AsyncClient(base_url=base, timeout=10) as client,
    ):
        assert (await client.get("/api/v1/alerts/stream")).status_code == 401
        headers = {"Authorization": "Bearer r"}
        async with client.stream("GET", "/api/v1/alerts/stream", headers=headers) as response:
            assert response.status_code == 200


async def test_stream_answers_503_without_nats(tmp_path: object) -> None:
    from litestar.testing import AsyncTestClient

    settings = load_settings(
        GatewaySettings, {"STOCKPILOT_NATS_URL": f"nats://127.0.0.1:{free_port()}"}
    )
    async with AsyncTestClient(create_app(settings)) as client:
        response = await client.get("/api/v1/alerts/stream")
    assert response.status_code == 503
    assert "NATS" in response.json()["detail"]


async def test_a_client_leaving_releases_its_consumer(env: dict[str, str]) -> None:
    async with (
        jetstream(env) as js,
        gateway(env) as base,
        httpx.AsyncClient(base_url=base, timeout=10) as client,
    ):
        async with client.stream("GET", "/api/v1/alerts/stream") as response:
            assert response.status_code == 200
            await asyncio.sleep(0.2)
            info = await js.stream_info(STREAMS["alerts"].name)
            assert info.state.consumer_count == 1
        for _ in range(100):
            info = await js.stream_info(STREAMS["alerts"].name)
            if info.state.consumer_count == 0:
                break
            await asyncio.sleep(0.05)
        assert info.state.consumer_count == 0


async def test_since_a_time_starts_at_the_first_alert_stored_from_then(env: dict[str, str]) -> None:
    async with (
        jetstream(env) as js,
        gateway(env) as base,
        httpx.AsyncClient(base_url=base, timeout=10) as client,
    ):
        for n in (1, 2):
            await publish_event(js, make_alert(n).subject, make_alert(n))
        await asyncio.sleep(0.05)
        # `since` is matched against the time JetStream stored each alert: the machine's.
        moment = datetime.now(UTC)
        await asyncio.sleep(0.05)
        await publish_event(js, make_alert(3).subject, make_alert(3))
        since = moment.isoformat().replace("+00:00", "Z")
        async with client.stream(
            "GET", "/api/v1/alerts/stream", params={"since": since}
        ) as response:
            (event,) = await read_events(response.aiter_lines(), 1)
        assert event.id == "3"
        bad = await client.get("/api/v1/alerts/stream", params={"since": "yesterday"})
        assert bad.status_code == 422


async def test_a_last_event_id_past_the_end_starts_after_the_last_stored_alert(
    env: dict[str, str],
) -> None:
    """A client that saw a longer, since rebuilt, stream misses nothing stored from now on."""
    async with (
        jetstream(env) as js,
        gateway(env) as base,
        httpx.AsyncClient(base_url=base, timeout=10) as client,
    ):
        await publish_event(js, make_alert(1).subject, make_alert(1))
        headers = {"Last-Event-ID": "500"}
        async with client.stream("GET", "/api/v1/alerts/stream", headers=headers) as response:
            await asyncio.sleep(0.2)
            await publish_event(js, make_alert(2).subject, make_alert(2))
            (event,) = await read_events(response.aiter_lines(), 1)
        assert event.id == "2"


async def consumer_count(js: JetStreamContext) -> int:
    return (await js.stream_info(STREAMS["alerts"].name)).state.consumer_count


async def test_every_client_of_a_gateway_shares_one_consumer(env: dict[str, str]) -> None:
    async with (
        jetstream(env) as js,
        gateway(env) as base,
        httpx.AsyncClient(base_url=base, timeout=10) as client,
        contextlib.AsyncExitStack() as streams,
    ):
        responses = [
            await streams.enter_async_context(client.stream("GET", "/api/v1/alerts/stream"))
            for _ in range(20)
        ]
        assert {r.status_code for r in responses} == {200}
        assert await consumer_count(js) == 1
        alert = make_alert(1)
        ack = await publish_event(js, alert.subject, alert)
        events = await asyncio.gather(*(read_events(r.aiter_lines(), 1) for r in responses))
        assert {e.id for (e,) in events} == {str(ack.seq)}
        assert await consumer_count(js) == 1


async def test_a_client_resuming_from_before_the_shared_position_misses_and_repeats_nothing(
    env: dict[str, str],
) -> None:
    """Its backlog is read first, then the live alerts after the position it joined at."""
    async with (
        jetstream(env) as js,
        gateway(env) as base,
        httpx.AsyncClient(base_url=base, timeout=10) as client,
        client.stream("GET", "/api/v1/alerts/stream") as watcher,  # keeps the fan-out going
    ):
        for n in range(1, 41):
            await publish_event(js, make_alert(n).subject, make_alert(n))
        await read_events(watcher.aiter_lines(), 40)
        headers = {"Last-Event-ID": "10"}
        async with client.stream("GET", "/api/v1/alerts/stream", headers=headers) as response:
            lines = response.aiter_lines()
            for n in range(41, 46):  # live alerts arriving while the backlog is read
                await publish_event(js, make_alert(n).subject, make_alert(n))
            events = await read_events(lines, 35)
        assert await consumer_count(js) == 1
    assert [e.id for e in events] == [str(n) for n in range(11, 46)]
    assert [msgspec.json.decode(e.data, type=Alert).id for e in events] == [
        make_alert(n).id for n in range(11, 46)
    ]


def sse_ids(raw: bytes) -> list[int]:
    """The `id:` of every complete event in raw SSE bytes (a cut-off last event is left out)."""
    ids = []
    for block in raw.replace(b"\r\n", b"\n").split(b"\n\n")[:-1]:
        for line in block.split(b"\n"):
            if line.startswith(b"id:"):
                ids.append(int(line[3:].strip()))
    return ids


async def test_a_client_that_does_not_read_is_dropped_and_resumes_without_loss(
    env: dict[str, str],
) -> None:
    """Its buffer full, the gateway closes its connection; Last-Event-ID picks up after it."""
    async with (
        jetstream(env) as js,
        gateway(env, STOCKPILOT_SSE_CLIENT_BUFFER_BYTES="16384") as base,
        httpx.AsyncClient(base_url=base, timeout=10) as client,
    ):
        port = int(base.rsplit(":", 1)[1])
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.sendall(b"GET /api/v1/alerts/stream HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.sleep(0.3)  # it has joined
        body = "x" * 4000
        total = 0
        for n in range(1, 3001):
            alert = msgspec.structs.replace(make_alert(n), message=body)
            await publish_event(js, alert.subject, alert)
            total = n
            if n % 100 == 0 and (await gateway_dropped(base)):
                break
        assert await gateway_dropped(base), "the non-reading client was never dropped"
        # What it was sent before the drop is still in the socket, then the end of the stream.
        received = await asyncio.to_thread(read_to_eof, sock)
        ids = sse_ids(dechunk(received.split(b"\r\n\r\n", 1)[1]))
        assert ids == list(range(1, len(ids) + 1))
        assert len(ids) < total
        headers = {"Last-Event-ID": str(ids[-1] if ids else 0)}
        async with client.stream("GET", "/api/v1/alerts/stream", headers=headers) as response:
            rest = await read_events(response.aiter_lines(), total - len(ids))
        assert [int(e.id or 0) for e in rest] == list(range(len(ids) + 1, total + 1))


async def gateway_dropped(base: str) -> bool:
    """Whether the gateway's fan-out has dropped a client (read from the app under test)."""
    fanout: AlertFanout = SERVED[base].state.alert_fanout
    return fanout.dropped_total > 0


def read_to_eof(sock: socket.socket) -> bytes:
    """Everything the server sent until it closed the connection (bounded wait)."""
    sock.settimeout(20)
    chunks = []
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    sock.close()
    return b"".join(chunks)


def dechunk(body: bytes) -> bytes:
    """A chunked HTTP body's content, up to where it was cut off."""
    out = bytearray()
    while True:
        size_line, sep, rest = body.partition(b"\r\n")
        if not sep:
            return bytes(out)
        size = int(size_line.split(b";")[0], 16)
        if size == 0 or len(rest) < size:
            return bytes(out + rest[:size])
        out += rest[:size]
        body = rest[size + 2 :]
