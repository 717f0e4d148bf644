"""A connection whose frames take long to handle lets the event loop turn between chunks
after a large chunk (FrameProtocol.turn_after_bytes), under uvloop as services run, over a
real socket."""

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

    def __init__(self, turn_after_bytes: int | None) -> None:
        super().__init__()
        self.turn_after_bytes = turn_after_bytes
        self.seen = 0
        self.all_seen: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def message(self, parts: list[bytes], buffer: bytes, body_start: int, end: int) -> None:
        until = time.perf_counter() + 10e-6
        while time.perf_counter() < until:
            pass
        self.seen += 1
        if self.seen == FRAMES and not self.all_seen.done():
            self.all_seen.set_result(None)


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of a TCP connection on loopback, as to nats-server (the kernel lets
    megabytes wait in the socket); ours non-blocking, for the event loop."""
    listener = socket.create_server(("127.0.0.1", 0))
    ours = socket.create_connection(listener.getsockname())
    theirs, _ = listener.accept()
    listener.close()
    ours.setblocking(False)
    return ours, theirs


async def turns_while_reading(turn_after_bytes: int | None) -> tuple[int, int]:
    """How many times the event loop turned while FRAMES frames were read and handled, and
    the most frames handled between two turns; the other end (a thread) keeps the socket as
    full as the kernel allows."""
    ours, theirs = tcp_pair()
    writer = threading.Thread(target=theirs.sendall, args=(FRAME * FRAMES,), daemon=True)
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_connection(
        lambda: SlowFrames(turn_after_bytes), sock=ours
    )
    turns = most = 0

    async def count_turns() -> None:
        nonlocal turns, most
        seen = 0
        while True:
            turns += 1
            most = max(most, protocol.seen - seen)
            seen = protocol.seen
            await asyncio.sleep(0)

    counter = asyncio.create_task(count_turns())
    writer.start()
    await protocol.all_seen
    counter.cancel()
    transport.close()
    writer.join()
    theirs.close()
    return turns, most


def test_the_stream_reader_lets_the_loop_turn_after_each_large_chunk() -> None:
    """libuv reads a socket up to 32 times (256 KB each) before anything else runs: a
    catch-up folding in the read callback held the service's requests and its publisher's
    acknowledgements for tens of thousands of events. With a turn after each large chunk the
    loop turns at least once a read: never more than one read's frames in between."""
    turn_after = _Reader.turn_after_bytes
    assert turn_after is not None and turn_after <= 256 * 1024
    turns, most = uvloop.run(turns_while_reading(turn_after))
    assert most <= 256 * 1024 // len(FRAME) + 1
    assert turns > FRAMES / 2_500


async def reading_after(size: int) -> tuple[bool, bool]:
    """Whether a connection reads on right after a chunk of `size` bytes, and a turn later."""
    ours, theirs = tcp_pair()
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_connection(lambda: SlowFrames(64 * 1024), sock=ours)
    protocol.data_received(FRAME * (size // len(FRAME)))
    at_once = transport.is_reading()
    await asyncio.sleep(0)
    later = transport.is_reading()
    transport.close()
    theirs.close()
    return at_once, later


def test_only_a_large_chunk_pauses_reading_and_only_until_the_next_turn() -> None:
    assert uvloop.run(reading_after(100 * 1024)) == (False, True)
    assert uvloop.run(reading_after(10 * 1024)) == (True, True)
