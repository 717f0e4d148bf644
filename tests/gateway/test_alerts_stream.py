"""`GET /api/v1/alerts/stream` served by a real uvicorn on a free port, read with httpx."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
import msgspec
import nats
import pytest
import uvicorn
from nats.js import JetStreamContext

from gateway.app import create_app
from gateway.routes import alerts as alerts_routes
from gateway.settings import GatewaySettings
from shared import bus
from shared.events import Alert
from shared.settings import load_settings
from shared.testing import free_port
from tests.clocks import NOON

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


@contextlib.asynccontextmanager
async def gateway(env: dict[str, str], **extra: str) -> AsyncIterator[str]:
    """The gateway on a real socket; yields its base URL once it reaches NATS."""
    settings = load_settings(GatewaySettings, {**env, **extra})
    port = free_port()
    config = uvicorn.Config(
        create_app(settings),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="on",
        ws="none",
        loop="asyncio",
    )
    server = uvicorn.Server(config)
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    base = f"http://127.0.0.1:{port}"
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
        await bus.provision(js)
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
        await bus.publish_event(js, old.subject, old)
        async with client.stream("GET", "/api/v1/alerts/stream") as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            await asyncio.sleep(0.3)  # the consumer exists once the headers are sent
            new = make_alert(1)
            ack = await bus.publish_event(js, new.subject, new)
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
            await bus.publish_event(js, alert.subject, alert)
        async with client.stream("GET", "/api/v1/alerts/stream?since=0") as response:
            first = await read_events(response.aiter_lines(), 2)
        assert [e.id for e in first] == ["1", "2"]
        for n in range(4, 7):
            alert = make_alert(n)
            await bus.publish_event(js, alert.subject, alert)
        headers = {"Last-Event-ID": first[-1].id or ""}
        async with client.stream("GET", "/api/v1/alerts/stream", headers=headers) as response:
            lines = response.aiter_lines()
            rest = await read_events(lines, 4)
            new = make_alert(7)
            await bus.publish_event(js, new.subject, new)
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
            info = await js.stream_info(bus.STREAMS["alerts"].name)
            assert info.state.consumer_count == 1
        for _ in range(100):
            info = await js.stream_info(bus.STREAMS["alerts"].name)
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
            await bus.publish_event(js, make_alert(n).subject, make_alert(n))
        await asyncio.sleep(0.05)
        # `since` is matched against the time JetStream stored each alert: the machine's.
        moment = datetime.now(UTC)
        await asyncio.sleep(0.05)
        await bus.publish_event(js, make_alert(3).subject, make_alert(3))
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
        await bus.publish_event(js, make_alert(1).subject, make_alert(1))
        headers = {"Last-Event-ID": "500"}
        async with client.stream("GET", "/api/v1/alerts/stream", headers=headers) as response:
            await asyncio.sleep(0.2)
            await bus.publish_event(js, make_alert(2).subject, make_alert(2))
            (event,) = await read_events(response.aiter_lines(), 1)
        assert event.id == "2"
