"""A real HTTP receiver on loopback for the hook tests: records every request it gets."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field


@dataclass
class Received:
    """One request as it arrived."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Receiver:
    """An HTTP/1.1 server answering `status_for(attempt)` (1-based count of requests)."""

    status_for: Callable[[int], int] = lambda attempt: 200
    requests: list[Received] = field(default_factory=list)
    accepted: list[Received] = field(default_factory=list)
    port: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        """Where to POST."""
        return f"http://127.0.0.1:{self.port}/hook"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request_line = await reader.readline()
                if not request_line:
                    return
                method, path, _ = request_line.decode().split(" ", 2)
                headers: dict[str, str] = {}
                while True:
                    line = (await reader.readline()).decode().rstrip("\r\n")
                    if not line:
                        break
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                received = Received(method, path, headers, body)
                self.requests.append(received)
                status = self.status_for(len(self.requests))
                if 200 <= status < 300:
                    self.accepted.append(received)
                self.arrived.set()
                writer.write(f"HTTP/1.1 {status} X\r\ncontent-length: 0\r\n\r\n".encode("ascii"))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def wait_accepted(self, count: int, timeout: float = 10.0) -> None:
        """Until `count` requests were answered 2xx."""
        async with asyncio.timeout(timeout):
            while len(self.accepted) < count:
                self.arrived.clear()
                await self.arrived.wait()

    async def wait_requests(self, count: int, timeout: float = 10.0) -> None:
        """Until `count` requests arrived, whatever the answer."""
        async with asyncio.timeout(timeout):
            while len(self.requests) < count:
                self.arrived.clear()
                await self.arrived.wait()


@contextlib.asynccontextmanager
async def receiving(
    status_for: Callable[[int], int] = lambda attempt: 200,
) -> AsyncIterator[Receiver]:
    """A Receiver listening on a free loopback port for the duration of the block."""
    receiver = Receiver(status_for=status_for)
    server = await asyncio.start_server(receiver._serve, "127.0.0.1", 0)
    receiver.port = server.sockets[0].getsockname()[1]
    async with server:
        yield receiver
        server.close()
