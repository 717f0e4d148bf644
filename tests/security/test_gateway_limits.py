"""Gateway limits against real sockets: header timeout, SSE fan-out and caps, `?fresh=true`.

The gateway runs as `stockpilot gateway` does (gateway.http_server's uvicorn configuration),
on a free loopback port; the health service and the probe targets are real too.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import nats
import psutil
import uvicorn

from gateway.app import create_app
from gateway.http_server import server_config
from gateway.settings import GatewaySettings
from services.health.service import build
from services.health.settings import HealthSettings
from shared.settings import load_settings
from shared.streams import STREAMS, provision
from tests.harness import free_port, running_service, stop_process
from tests.health.targets import Reply, Target

ADMIN = "admin-secret"
READ = "read-secret"
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}


@contextlib.asynccontextmanager
async def served(env: dict[str, str], **extra: str) -> AsyncIterator[str]:
    """The gateway with its production server options on a real socket; its base URL."""
    # The gateway creates the streams once it reaches NATS, a moment after /health says
    # 200: create them first, or the first stream request may find none (503).
    nc = await nats.connect(env["STOCKPILOT_NATS_URL"])
    await provision(nc.jetstream())
    await nc.close()
    port = free_port()
    settings = load_settings(
        GatewaySettings,
        env | {"STOCKPILOT_HTTP_HOST": "127.0.0.1", "STOCKPILOT_HTTP_PORT": str(port)} | extra,
    )
    server = uvicorn.Server(server_config(create_app(settings), settings))
    server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
    task = asyncio.create_task(server.serve())
    base = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(base_url=base, headers=AS_ADMIN) as client:
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


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """Whether the server closes the connection (EOF) within a bounded wait."""
    try:
        async with asyncio.timeout(15):
            while await reader.read(4096):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return True


# ----- header and keep-alive timeouts ----------------------------------------------------


async def test_slow_header_connections_are_closed_while_others_are_served(
    env: dict[str, str],
) -> None:
    async with served(env, STOCKPILOT_HTTP_HEADER_TIMEOUT_S="1") as base:
        port = int(base.rsplit(":", 1)[1])
        slow: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        for n in range(300):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            if n % 3:  # a partial header; every third connection sends nothing at all
                writer.write(b"GET /api/v1/health/live HTTP/1.1\r\nHost: x\r\nX-Slow: ")
                await writer.drain()
            slow.append((reader, writer))
        async with httpx.AsyncClient(base_url=base) as client:
            live = await client.get("/api/v1/health/live")
        assert live.status_code == 200
        # Still trickling bytes does not help: the deadline is for the whole header.
        for _, writer in slow[1:50:3]:
            writer.write(b"a")
        closed = await asyncio.gather(*(closed_by_server(reader) for reader, _ in slow))
        for _, writer in slow:
            writer.close()
        assert all(closed), f"{closed.count(False)} slow connections left open"


async def test_a_kept_alive_connection_slow_on_its_next_header_is_closed(
    env: dict[str, str],
) -> None:
    async with served(
        env, STOCKPILOT_HTTP_HEADER_TIMEOUT_S="1", STOCKPILOT_HTTP_KEEP_ALIVE_TIMEOUT_S="30"
    ) as base:
        port = int(base.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /api/v1/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        async with asyncio.timeout(10):
            status = await reader.readline()
        assert status.startswith(b"HTTP/1.1 200")
        # The first answer came; the next request never finishes its headers.
        writer.write(b"GET /api/v1/health/live HTTP/1.1\r\nHo")
        await writer.drain()
        assert await closed_by_server(reader)
        writer.close()


async def test_a_body_that_never_finishes_is_closed(env: dict[str, str]) -> None:
    async with served(env, STOCKPILOT_HTTP_BODY_TIMEOUT_S="1", STOCKPILOT_INGEST_TOKEN="i") as base:
        port = int(base.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /api/v1/usage/records HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer i\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n[{"
        )
        await writer.drain()
        assert await closed_by_server(reader)
        writer.close()


async def test_oversized_headers_are_refused_with_431(env: dict[str, str]) -> None:
    async with served(env) as base:
        port = int(base.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /api/v1/health/live HTTP/1.1\r\nHost: x\r\n")
        with contextlib.suppress(ConnectionError):
            for _ in range(100):  # 100 x 1 KiB headers, never ending
                writer.write(b"X-Junk: " + b"j" * 1024 + b"\r\n")
                await writer.drain()
        async with asyncio.timeout(10):
            answer = await reader.read()
        writer.close()
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 431")
        assert b"larger than" in body
        async with httpx.AsyncClient(base_url=base) as client:
            normal = await client.get("/api/v1/health/live", headers={"X-Fine": "f" * 4000})
        assert normal.status_code == 200


async def test_an_idle_keep_alive_connection_is_closed(env: dict[str, str]) -> None:
    async with served(env, STOCKPILOT_HTTP_KEEP_ALIVE_TIMEOUT_S="1") as base:
        port = int(base.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /api/v1/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        assert await closed_by_server(reader)
        writer.close()


# ----- the alert stream (SSE) -----------------------------------------------------------


async def test_sse_clients_beyond_the_cap_get_503_with_a_detail(env: dict[str, str]) -> None:
    async with (
        served(env, STOCKPILOT_SSE_MAX_CLIENTS="3") as base,
        httpx.AsyncClient(base_url=base, timeout=10) as client,
        contextlib.AsyncExitStack() as streams,
    ):
        first = [
            await streams.enter_async_context(client.stream("GET", "/api/v1/alerts/stream"))
            for _ in range(3)
        ]
        assert [r.status_code for r in first] == [200, 200, 200]
        refused = await client.get("/api/v1/alerts/stream")
        assert refused.status_code == 503
        assert "STOCKPILOT_SSE_MAX_CLIENTS" in refused.json()["detail"]
        # A client that leaves gives its place back.
        await first[0].aclose()
        for _ in range(100):
            async with client.stream("GET", "/api/v1/alerts/stream") as again:
                if again.status_code == 200:
                    break
            await asyncio.sleep(0.05)
        assert again.status_code == 200


@contextlib.contextmanager
def gateway_process(env: dict[str, str], tmp: Path, **extra: str) -> Iterator[int]:
    """`stockpilot gateway` as its own process; yields its port once it reaches NATS."""
    port = free_port()
    environment = {**os.environ, **env, **extra}
    environment |= {"STOCKPILOT_HTTP_PORT": str(port), "STOCKPILOT_LOG_LEVEL": "WARNING"}
    log = (tmp / "gateway.log").open("wb")
    process = subprocess.Popen(
        [sys.executable, "-m", "ops", "gateway"], env=environment, stdout=log, stderr=log
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert process.poll() is None, (tmp / "gateway.log").read_text()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"http://127.0.0.1:{port}/api/v1/health").status_code == 200:
                    break
            assert time.monotonic() < deadline, "the gateway did not reach NATS"
            time.sleep(0.1)
        yield process.pid
    finally:
        stop_process(process)
        log.close()


def non_reading_client(port: int) -> socket.socket:
    """An SSE client that never reads, with a receive buffer as small as the kernel allows."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"GET /api/v1/alerts/stream HTTP/1.1\r\nHost: x\r\n\r\n")
    return sock


CLIENTS = 40
BUFFER = 256 * 1024


async def test_sse_clients_that_never_read_do_not_grow_the_gateway(
    env: dict[str, str], tmp_path: Path
) -> None:
    """40 such clients and 12 MB of alerts: without a bound, up to 480 MB of buffers."""
    with gateway_process(env, tmp_path, STOCKPILOT_SSE_CLIENT_BUFFER_BYTES=str(BUFFER)) as pid:
        gateway = psutil.Process(pid)
        port = int(gateway.environ()["STOCKPILOT_HTTP_PORT"])
        nc = await nats.connect(env["STOCKPILOT_NATS_URL"])
        js = nc.jetstream()
        sockets = [non_reading_client(port) for _ in range(CLIENTS)]
        try:
            body = b'{"type":"alert","message":"' + b"x" * 4000 + b'"}'
            for n in range(200):  # warm-up: the allocations every alert needs
                await js.publish(f"stockpilot.alerts.test.n{n % 7}", body)
            await asyncio.sleep(0.5)
            before = gateway.memory_info().rss
            for n in range(3000):
                await js.publish(f"stockpilot.alerts.test.n{n % 7}", body)
            # The most it reaches while the alerts go out (a bounded number of samples).
            after = before
            for _ in range(40):
                after = max(after, gateway.memory_info().rss)
                await asyncio.sleep(0.1)
            # Each was dropped when its buffer filled; the last one out deleted the consumer.
            for _ in range(100):
                info = await js.stream_info(STREAMS["alerts"].name)
                if info.state.consumer_count == 0:
                    break
                await asyncio.sleep(0.1)
            assert info.state.consumer_count == 0
        finally:
            for sock in sockets:
                sock.close()
            await nc.close()
        # Each client may hold its buffer plus what the socket layer keeps (~64 KiB in the
        # transport); 256 KiB of slack per client and 20 MB for the allocator on top.
        bound_mb = CLIENTS * (BUFFER + 256 * 1024) / 1e6 + 20
        grown_mb = (after - before) / 1e6
        assert grown_mb < bound_mb, f"the gateway grew by {grown_mb:.0f} MB"


# ----- ?fresh=true -----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def health_service(env: dict[str, str], target: Target) -> AsyncIterator[None]:
    """The health service probing `target` as an external API; the start-up round done."""
    settings = load_settings(
        HealthSettings,
        env
        | {
            "STOCKPILOT_HEALTH_INTERVAL_S": "3600",
            "STOCKPILOT_PROBE_TIMEOUT_S": "2",
            "STOCKPILOT_EXTERNAL_APIS": f'[{{"name": "quotes", "url": "{target.url}/q"}}]',
        },
    )
    async with running_service(build(settings), settings):
        deadline = time.monotonic() + 10
        while not target.seen:
            assert time.monotonic() < deadline, "the start-up round never reached the target"
            await asyncio.sleep(0.02)
        yield


async def test_fifty_fresh_asks_run_at_most_one_round(env: dict[str, str]) -> None:
    async with (
        Target(Reply(status=200, delay_s=0.2)) as target,
        health_service(env, target),
        served(env, STOCKPILOT_ADMIN_TOKEN=ADMIN, STOCKPILOT_HEALTH_FRESH_INTERVAL_S="600") as base,
        httpx.AsyncClient(base_url=base, headers=AS_ADMIN, timeout=30) as client,
    ):
        before = len(target.seen)
        routes = ["comprehensive", "external-apis", "openai", "database", "redis"]
        asks = [client.get(f"/api/v1/health/{routes[n % 5]}?fresh=true") for n in range(25)]
        answers = await asyncio.gather(*asks)
        # And 25 more one after another, after that round is over.
        for n in range(25):
            answers.append(await client.get(f"/api/v1/health/{routes[n % 5]}?fresh=true"))
        assert [a.status_code for a in answers] == [200] * 50, answers[0].text
        assert len(target.seen) - before == 1
        fresh = answers[0].json()
        assert fresh["cached"] is False
        assert {c["name"] for c in fresh["components"]} >= {"external.quotes"}


async def test_a_fresh_ask_after_the_window_runs_a_new_round(env: dict[str, str]) -> None:
    async with (
        Target(Reply(status=200)) as target,
        health_service(env, target),
        served(env, STOCKPILOT_ADMIN_TOKEN=ADMIN, STOCKPILOT_HEALTH_FRESH_INTERVAL_S="0.5") as base,
        httpx.AsyncClient(base_url=base, headers=AS_ADMIN, timeout=30) as client,
    ):
        before = len(target.seen)
        first = await client.get("/api/v1/health/external-apis?fresh=true")
        await asyncio.sleep(0.6)
        second = await client.get("/api/v1/health/external-apis?fresh=true")
        assert (first.status_code, second.status_code) == (200, 200)
        assert len(target.seen) - before == 2
        assert first.json()["apis"][0]["checked_at"] < second.json()["apis"][0]["checked_at"]


async def test_fresh_needs_the_admin_token(env: dict[str, str]) -> None:
    async with (
        Target(Reply(status=200)) as target,
        health_service(env, target),
        served(env, STOCKPILOT_ADMIN_TOKEN=ADMIN, STOCKPILOT_READ_TOKEN=READ) as base,
        httpx.AsyncClient(base_url=base, timeout=30) as client,
    ):
        before = len(target.seen)
        ok = await client.get("/api/v1/health/comprehensive?fresh=true", headers=AS_ADMIN)
        assert ok.status_code == 200
        as_reader = {"Authorization": f"Bearer {READ}"}
        refused = await client.get("/api/v1/health/comprehensive?fresh=true", headers=as_reader)
        assert refused.status_code == 403, refused.text
        assert "needs the admin token" in refused.json()["detail"]
        wrong = {"Authorization": "Bearer wrong"}
        refused = await client.get("/api/v1/health/comprehensive?fresh=true", headers=wrong)
        assert refused.status_code == 403, refused.text
        # The plain answer is still for readers.
        read = await client.get("/api/v1/health/comprehensive", headers=as_reader)
        assert read.status_code == 200
        assert len(target.seen) - before == 1


async def test_fresh_is_refused_when_no_admin_token_is_configured(env: dict[str, str]) -> None:
    async with served(env) as base, httpx.AsyncClient(base_url=base, timeout=30) as client:
        refused = await client.get("/api/v1/health/openai?fresh=true")
        assert refused.status_code == 403
        assert "STOCKPILOT_ADMIN_TOKEN" in refused.json()["detail"]
