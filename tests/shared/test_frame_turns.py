"""A connection whose frames take long to handle lets the event loop turn between chunks
(FrameProtocol.one_chunk_a_turn), under uvloop as services run, over a real socket."""

from __future__ import annotations

import asyncio
import socket
import threading
import time

import uvloop

from shared.bare_nats import FrameProtocol
from shared.stream_reader import _Reader

FRAMES = 30_000
FRAME = b"MSG s 1 200\r\n" + b"x" * 200 + b"\r\n"  # 215 bytes: ~1,200 in a 256 KB read


class SlowFrames(FrameProtocol):
    """Takes ~10 µs of CPU a frame, about what a fold takes an event."""

    def __init__(self, one_chunk_a_turn: bool) -> None:
        super().__init__()
        self.one_chunk_a_turn = one_chunk_a_turn
        self.seen = 0
        self.all_seen: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def message(self, parts: list[bytes], buffer: bytes, body_start: int, end: int) -> None:
        until = time.perf_counter() + 10e-6
        while time.perf_counter() < until:
            pass
        self.seen += 1
        if self.seen == FRAMES:
            self.all_seen.set_result(None)


async def turns_while_reading(one_chunk_a_turn: bool) -> int:
    """How many times the event loop turned while FRAMES frames were read and handled; the
    other end (a thread) keeps the socket as full as the kernel allows."""
    # TCP on loopback, as to nats-server: the kernel lets megabytes wait in the socket.
    listener = socket.create_server(("127.0.0.1", 0))
    ours = socket.create_connection(listener.getsockname())
    theirs, _ = listener.accept()
    listener.close()
    ours.setblocking(False)
    writer = threading.Thread(target=theirs.sendall, args=(FRAME * FRAMES,), daemon=True)
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_connection(
        lambda: SlowFrames(one_chunk_a_turn), sock=ours
    )
    turns = 0

    async def count_turns() -> None:
        nonlocal turns
        while True:
            turns += 1
            await asyncio.sleep(0)

    counter = asyncio.create_task(count_turns())
    writer.start()
    await protocol.all_seen
    counter.cancel()
    transport.close()
    writer.join()
    theirs.close()
    return turns


def test_the_stream_reader_lets_the_loop_turn_after_each_chunk() -> None:
    """libuv reads a socket up to 32 times (256 KB each) before anything else runs: a
    catch-up folding in the read callback held the service's requests and its publisher's
    acknowledgements for tens of thousands of events. With one chunk a turn the loop turns at
    least once a 256 KB read: 25 times or more for these 6.4 MB (reading on: 8 times)."""
    assert _Reader.one_chunk_a_turn
    turns = uvloop.run(turns_while_reading(one_chunk_a_turn=True))
    assert turns > FRAMES / 2_500, turns
