"""Real servers on loopback for the probes to talk to: a tiny HTTP/1.1 server and a silent one.

Not doubles of a client library: the probes open real TCP connections to these servers, which
answer real HTTP (or accept and never answer at all).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from dataclasses import dataclass, field


@dataclass
class Reply:
    """What the server answers: a status, a JSON body, after a delay; or nothing ever."""

    status: int = 200
    body: bytes = b"{}"
    delay_s: float = 0.0
    hang: bool = False
    # Answer with this request header's value inside an OpenAI-style error message, as a
    # careless server might (the probes must not pass it on).
    echo_header: str | None = None


@dataclass
class Seen:
    """One request the server received."""

    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)


_REASONS = {200: "OK", 204: "No Content", 401: "Unauthorized", 429: "Too Many Requests"}


class Target:
    """A loopback TCP server; with `reply.hang` (or `silent=True`) it accepts and stays silent.

    It runs in its own thread and event loop, like a server elsewhere: Litestar's
    AsyncTestClient blocks the test's loop while a request is handled.
    """

    def __init__(self, reply: Reply | None = None, *, silent: bool = False) -> None:
        self.reply = reply or Reply()
        self.silent = silent
        self.seen: list[Seen] = []
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        """http://127.0.0.1:<port>."""
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> Target:
        self._loop = asyncio.new_event_loop()
        started = threading.Event()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._start())
            started.set()
            self._loop.run_forever()
            self._loop.close()

        self._thread = threading.Thread(target=run, name=f"target-{id(self)}", daemon=True)
        self._thread.start()
        assert await asyncio.to_thread(started.wait, 5)
        return self

    async def __aexit__(self, *_: object) -> None:
        done = asyncio.run_coroutine_threadsafe(self._stop(), self._loop)
        await asyncio.wrap_future(done)
        self._loop.call_soon_threadsafe(self._loop.stop)
        await asyncio.to_thread(self._thread.join, 5)

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=2)
        await self._server.wait_closed()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.ensure_future(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            if self.silent:
                await reader.read()  # until the client gives up and closes
                return
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, path, _ = line.decode("latin-1").split(" ", 2)
                headers: dict[str, str] = {}
                while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = header.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                length = int(headers.get("content-length", "0"))
                if length:
                    await reader.readexactly(length)
                self.seen.append(Seen(method, path, headers))
                reply = self.reply
                if reply.hang:
                    await reader.read()
                    return
                if reply.delay_s:
                    await asyncio.sleep(reply.delay_s)
                reason = _REASONS.get(reply.status, "Status")
                # 204 and 304 never carry a body: sending one would corrupt the next answer
                # on the kept-alive connection.
                body = b"" if reply.status in (204, 304) else reply.body
                if reply.echo_header is not None:
                    echoed = headers.get(reply.echo_header.lower(), "")
                    body = json.dumps(
                        {"error": {"message": f"Incorrect API key provided: {echoed}"}}
                    ).encode()
                head = (
                    f"HTTP/1.1 {reply.status} {reason}\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n"
                )
                writer.write(head.encode() + (b"" if method == "HEAD" else body))
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()


def models_body(n: int) -> bytes:
    """An OpenAI-shaped model list with `n` models."""
    items = ",".join(f'{{"id":"m{i}","object":"model","owned_by":"t"}}' for i in range(n))
    return f'{{"object":"list","data":[{items}]}}'.encode()
