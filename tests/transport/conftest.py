"""The transport contract suite's fixtures: every test runs once per path (shared.transport).

`path` is "accelerated" (our own protocol code behind the seam) or "nats-py" (the reference
path); a test that passes on one must pass on the other. Servers are real nats-server
processes (free ports, stores under tmp_path); a `ChoppingProxy` sits in front of one where a
test needs the byte stream cut into odd pieces.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats as nats_py
import pytest
from nats.aio.client import Client as NATS
from nats.js import api as js_api

from shared.nats_errors import is_transient
from shared.transport import ACCELERATED, NATS_PY, StreamFollower, TransportPath
from tests.harness import NatsServer, free_port

STREAM = "T"
SUBJECT = "t.e"
OTHER = "t.other"  # on the same stream, never followed


@pytest.fixture(params=[ACCELERATED, NATS_PY])
def path(request: pytest.FixtureRequest) -> TransportPath:
    """The transport path under test."""
    value: TransportPath = request.param
    return value


async def connect(url: str, **options: Any) -> NATS:
    """A client that reconnects quickly and for ever (restarts are part of the contract)."""
    options.setdefault("reconnect_time_wait", 0.2)
    options.setdefault("max_reconnect_attempts", -1)
    return await nats_py.connect(url, **options)


async def make_stream(nc: NATS, **config: Any) -> None:
    """The test stream: the followed subject and another one beside it."""
    await nc.jetstream().add_stream(js_api.StreamConfig(name=STREAM, subjects=["t.>"], **config))


async def publish(nc: NATS, first: int, count: int, subject: str = SUBJECT) -> list[int]:
    """Messages `{"n": i}` with Msg-Id `m<i>`; their stream sequences.

    Each is retried until stored: right after a server restart JetStream may not answer yet
    (the Msg-Id keeps a retried message from being stored twice).
    """
    js = nc.jetstream()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30  # for them all: a failure shows before pytest's timeout
    seqs = []
    for i in range(first, first + count):
        while True:
            try:
                ack = await js.publish(subject, b'{"n":%d}' % i, headers={"Nats-Msg-Id": f"m{i}"})
                break
            except Exception as exc:
                if not is_transient(exc) or loop.time() > deadline:
                    raise
                await asyncio.sleep(0.1)
        seqs.append(ack.seq)
    return seqs


@dataclass
class Fold:
    """What a follower delivered: every call, in order (repeats kept, to be seen)."""

    calls: list[tuple[int, int, str, bytes]] = field(default_factory=list)
    stored_ns: list[int] = field(default_factory=list)
    caught_up: int = 0
    start: int = 1
    # The fold may skip what it holds (the runtime does); this one keeps it to count it.
    last_seq: int = 0

    def next_seq(self) -> int:
        return max(self.start, self.last_seq + 1)

    def on_event(self, seq: int, pending: int, subject: Any, data: bytes, stored_ns: int) -> None:
        if isinstance(subject, bytes):
            subject = subject.decode()
        self.calls.append((seq, pending, subject, data))
        self.stored_ns.append(stored_ns)
        self.last_seq = max(self.last_seq, seq)

    def on_caught_up(self) -> None:
        self.caught_up += 1

    @property
    def seqs(self) -> list[int]:
        return [call[0] for call in self.calls]

    async def until(self, check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        """Wait (generously: the machine is shared) until `check()` holds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not check():
            if loop.time() > deadline:
                raise AssertionError(f"{what}: not within {timeout:g}s; folded {self.seqs}")
            await asyncio.sleep(0.02)

    async def until_seq(self, seq: int, timeout: float = 30.0) -> None:
        await self.until(lambda: self.last_seq >= seq, f"seq {seq} folded", timeout)


@contextlib.asynccontextmanager
async def following(
    nc: NATS, path: TransportPath, start: int = 1, retry_s: float = 60.0
) -> AsyncIterator[tuple[StreamFollower, Fold]]:
    """A follower of SUBJECT on `path` from `start`, running until the block ends."""
    fold = Fold(start=start)
    follower = StreamFollower(
        nc,
        STREAM,
        SUBJECT,
        fold.next_seq,
        fold.on_event,
        fold.on_caught_up,
        accelerated=path == ACCELERATED,
        retry_s=retry_s,
        name=f"test {path}",
    )
    task = asyncio.create_task(follower.run())
    try:
        yield follower, fold
        assert not task.done(), task  # it follows for ever; it never returns or fails
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def config_server(
    store: Path, config: dict[str, Any], port: int | None = None
) -> tuple[NatsServer, Path]:
    """A nats-server started from a JSON config (nats-server reads JSON) in `store`'s parent."""
    store.mkdir(parents=True, exist_ok=True)
    config_path = store.parent / f"{store.name}.conf"
    config_path.write_text(json.dumps(config), encoding="utf-8")
    server = NatsServer(store, port=port, extra_args=["-c", str(config_path)])
    return server.start(), config_path


class ChoppingProxy:
    """A loopback TCP proxy that hands the server's bytes to the client in odd-sized pieces
    (1, 2, 3, 5, 7, 11, 13 bytes, round and round), each written and flushed on its own.

    So every frame the client reads (INFO, MSG, HMSG, heartbeats, flow control, acks) arrives
    cut at every possible place: the parsers must join them.
    """

    SIZES = (1, 2, 3, 5, 7, 11, 13)

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self.pieces = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    async def __aenter__(self) -> ChoppingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
        await self._server.wait_closed()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers += [client_w, server_w]
        up = asyncio.create_task(self._pump(client_r, server_w, chop=False))
        down = asyncio.create_task(self._pump(server_r, client_w, chop=True))
        self._tasks.update((up, down))
        await asyncio.wait((up, down), return_when=asyncio.FIRST_COMPLETED)
        for task in (up, down):
            task.cancel()
        for writer in (client_w, server_w):
            writer.close()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, chop: bool
    ) -> None:
        sizes = itertools.cycle(self.SIZES)
        while data := await reader.read(65536):
            if not chop:
                writer.write(data)
                await writer.drain()
                continue
            position = 0
            while position < len(data):
                size = next(sizes)
                writer.write(data[position : position + size])
                position += size
                self.pieces += 1
                await writer.drain()
                await asyncio.sleep(0)  # let the client read this piece alone
