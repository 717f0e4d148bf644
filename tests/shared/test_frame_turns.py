"""A connection whose frames take long to handle lets the event loop turn after each
turn_every_bytes of frames (FrameProtocol), under uvloop as services run, over a real
socket: a large chunk is handled over several turns, every frame once and in order."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time

import uvloop

from shared.bare_nats import FrameProtocol
from shared.stream_reader import _Reader
from tests.harness import tcp_pair

FRAMES = 30_000
FRAME = b"MSG s 1 200\r\n" + b"x" * 200 + b"\r\n"  # 215 bytes: ~1,200 in a 256 KB read


class SlowFrames(FrameProtocol):
    """Takes ~10 µs of CPU a frame, about what a fold takes an event."""

    def __init__(self, turn_every_bytes: int | None) -> None:
        super().__init__()
        self.turn_every_bytes = turn_every_bytes
        self.seen = 0
        self.order: list[bytes] = []
        self.all_seen: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def message(self, parts: list[bytes], buffer: bytes, body_start: int, end: int) -> None:
        until = time.perf_counter() + 10e-6
        while time.perf_counter() < until:
            pass
        self.seen += 1
        self.order.append(buffer[body_start:end])
        if self.seen == FRAMES and not self.all_seen.done():
            self.all_seen.set_result(None)


async def turns_while_reading(turn_every_bytes: int | None) -> tuple[int, int]:
    """How many times the event loop turned while FRAMES frames were read and handled, and
    the most frames handled between two turns; the other end (a thread) keeps the socket as
    full as the kernel allows."""
    ours, theirs = tcp_pair()
    writer = threading.Thread(target=theirs.sendall, args=(FRAME * FRAMES,), daemon=True)
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_connection(
        lambda: SlowFrames(turn_every_bytes), sock=ours
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


def test_the_stream_reader_lets_the_loop_turn_after_each_turns_worth_of_frames() -> None:
    """libuv reads a socket 256 KB at a time, up to 32 times, before anything else runs: a
    catch-up folding in the read callback held the service's requests and its publisher's
    acknowledgements for tens of thousands of events. The loop now turns after each
    turn_every_bytes of frames: never more than that (and one frame) in between."""
    every = _Reader.turn_every_bytes
    assert every is not None and every <= 256 * 1024
    turns, most = uvloop.run(turns_while_reading(every))
    assert most <= every // len(FRAME) + 1
    assert turns > FRAMES / (every // len(FRAME) + 1)
    # Without a bound, a read's frames (up to 256 KB) go in one turn.
    _, unbounded = uvloop.run(turns_while_reading(None))
    assert unbounded > every // len(FRAME) + 1


async def handled_over_turns(size: int) -> tuple[list[int], list[bool], list[bytes]]:
    """One chunk of `size` bytes of numbered frames handed to a connection that turns every
    64 KB: frames handled by each turn, whether it reads after each, the bodies in order."""
    ours, theirs = tcp_pair()
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.create_connection(lambda: SlowFrames(64 * 1024), sock=ours)
    count = size // len(FRAME)
    frames = b"".join(b"MSG s 1 200\r\n" + b"%0200d" % i + b"\r\n" for i in range(count))
    protocol.data_received(frames + FRAME[:50])  # and the start of a frame still to come
    seen, reading = [protocol.seen], [transport.is_reading()]
    while protocol.seen < count or not transport.is_reading():
        await asyncio.sleep(0)
        seen.append(protocol.seen)
        reading.append(transport.is_reading())
    assert protocol.rest == FRAME[:50]
    transport.close()
    theirs.close()
    return seen, reading, protocol.order


def test_a_large_chunk_is_handled_over_several_turns_then_reading_goes_on() -> None:
    per_turn = 64 * 1024 // len(FRAME) + 1
    seen, reading, order = uvloop.run(handled_over_turns(200 * 1024))
    count = 200 * 1024 // len(FRAME)
    assert order == [b"%0200d" % i for i in range(count)]  # each frame once, in order
    assert seen[0] == per_turn and all(b - a <= per_turn for a, b in itertools.pairwise(seen))
    parts = -(-count // per_turn)
    assert seen[parts - 1] == count  # as many turns as 64 KB parts
    # Reading again one turn after the last part (not in the same turn as the next read).
    assert reading == [False] * parts + [True] and len(seen) == parts + 1


def test_a_small_chunk_is_handled_at_once_without_pausing() -> None:
    seen, reading, _ = uvloop.run(handled_over_turns(10 * 1024))
    assert seen == [10 * 1024 // len(FRAME)] and reading == [True]
