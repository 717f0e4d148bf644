"""Where the alert benchmarks hear an alert: a webhook receiver and SSE clients, on loopback.

Both note the `time.perf_counter()` at which each alert's bytes arrived, keyed by the alert's
`title` (the budget benchmarks give every sample its own scope, which the title names), so a
sample's latency is that arrival minus the moment its crossing call was recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import msgspec


class _Alert(msgspec.Struct):
    title: str = ""
    kind: str = ""


_decode_alert = msgspec.json.Decoder(_Alert).decode


@dataclass
class Heard:
    """Arrival times of alerts by title, and an event set at each arrival."""

    at: dict[str, float] = field(default_factory=dict)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def note(self, body: bytes) -> None:
        """One alert's JSON arrived now."""
        now = time.perf_counter()
        try:
            alert = _decode_alert(body)
        except msgspec.DecodeError:
            return
        self.at.setdefault(alert.title, now)
        self.arrived.set()

    async def wait_for(self, title: str, timeout: float) -> float:
        """When the alert titled `title` arrived (waiting for it up to `timeout`)."""
        async with asyncio.timeout(timeout):
            while title not in self.at:
                self.arrived.clear()
                await self.arrived.wait()
        return self.at[title]


@dataclass
class WebhookReceiver:
    """An HTTP/1.1 server on loopback that answers 200 and notes every alert POSTed to it."""

    heard: Heard = field(default_factory=Heard)
    port: int = 0

    @property
    def url(self) -> str:
        """STOCKPILOT_ALERT_WEBHOOK_URL."""
        return f"http://127.0.0.1:{self.port}/hook"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                if not await reader.readline():
                    return
                length = 0
                while line := (await reader.readline()).rstrip(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                self.heard.note(await reader.readexactly(length))
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def webhook_receiver() -> AsyncIterator[WebhookReceiver]:
    """A receiver listening on a free loopback port for the block."""
    receiver = WebhookReceiver()
    server = await asyncio.start_server(receiver._serve, "127.0.0.1", 0)
    receiver.port = server.sockets[0].getsockname()[1]
    async with server:
        yield receiver
        server.close()


class SseClient:
    """One raw-socket client of `GET /api/v1/alerts/stream`: a few KB each, so a thousand fit
    in one process; notes each `data:` line (one alert) as it arrives."""

    def __init__(self, heard: Heard | None = None) -> None:
        self.heard = heard or Heard()
        self.connected = asyncio.Event()
        self.status = 0
        self._task: asyncio.Task[None] | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self, port: int, path: str = "/api/v1/alerts/stream") -> None:
        """Connect and wait for the response headers (the client has joined the fan-out)."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        self._writer = writer
        writer.write(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n".encode()
        )
        status_line = await reader.readline()
        self.status = int(status_line.split()[1])
        while (await reader.readline()).strip():
            pass
        if self.status != 200:
            raise RuntimeError(f"the alert stream answered {self.status}")
        self._task = asyncio.create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        # Lines of the SSE body; chunk-size lines of the chunked encoding are not `data:`.
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while line := await reader.readline():
                if line.startswith(b"data:"):
                    self.heard.note(line[5:].strip())

    async def close(self) -> None:
        """Close the connection."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._writer is not None:
            self._writer.close()


async def open_when_serving(client: SseClient, port: int, timeout: float = 60) -> None:
    """Open `client` once the gateway on `port` serves the alert stream."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            await client.open(port)
            return
        except (OSError, RuntimeError, IndexError, ValueError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
