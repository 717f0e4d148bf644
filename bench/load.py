"""Background load for the latency benchmarks: usage events at a steady rate, in its own process.

    python -m bench.load NATS_URL RATE

records `RATE` calls a second with the usage client (`UsageRecorder`, as StockPilot AI does),
in ticks of 10 ms, until SIGTERM; prints `ready` once connected, and at the end one JSON
line: events recorded, events acknowledged, seconds. Its own process so that the load
generator's CPU is not the measuring process's event loop (a 5 ms stall there would read as
5 ms of latency).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import msgspec
import nats

from bench.harness import ROOT, log
from services.usage.client import UsageRecorder
from services.usage.contract import UsageRecorded

TICK_S = 0.01


class LoadSummary(msgspec.Struct, frozen=True):
    """What the load process did."""

    recorded: int
    published: int
    seconds: float

    @property
    def rate(self) -> float:
        """Events acknowledged a second."""
        return self.published / self.seconds if self.seconds else 0.0


def load_event(i: int, now: datetime, prefix: str = "load") -> UsageRecorded:
    """The `i`-th call of a load, dated `now`."""
    # Users, models and endpoints the measured samples never use: the load only adds work.
    return UsageRecorded(
        id=f"{prefix}-{now:%H%M%S}-{i:09d}",
        request_id=f"{prefix}-{now:%H%M%S}-{i:09d}",
        occurred_at=now,
        model=("gpt-4o-mini", "gpt-4o", "o3-mini")[i % 3],
        endpoint=("/api/v1/analysis", "/api/v1/chat", "/api/v1/report")[i % 3],
        prompt_tokens=812 + i % 100,
        completion_tokens=164 + i % 50,
        status_code=200,
        response_time_ms=1432.5 + i % 1000,
        user_id=f"load-{i % 100}",
    )


async def _main(url: str, rate: float) -> LoadSummary:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    nc = await nats.connect(url.split(","), max_reconnect_attempts=-1)
    recorder = UsageRecorder(nc, buffer_size=1_000_000)
    recorder.start()
    print("ready", flush=True)
    started = time.monotonic()
    recorded = 0
    # Paced against the clock, not by sleeping a fixed tick: a late tick catches up.
    while not stop.is_set():
        due = int((time.monotonic() - started) * rate)
        now = datetime.now(UTC)
        while recorded < due:
            recorder.record(load_event(recorded, now))
            recorded += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), TICK_S)
    seconds = time.monotonic() - started
    await recorder.close(timeout=30)
    await nc.close()
    return LoadSummary(recorded, recorder.published + recorder.duplicates, seconds)


@contextlib.contextmanager
def background_load(url: str, rate: float, name: str = "load") -> Iterator[list[LoadSummary]]:
    """The load process for the block; the list holds its summary once the block ends."""
    summary: list[LoadSummary] = []
    child = subprocess.Popen(
        [sys.executable, "-m", "bench.load", url, str(rate)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        if child.stdout.readline().strip() != b"ready":
            raise RuntimeError("the load process did not start (see its output above)")
        time.sleep(0.5)  # at its rate, and the services with it, before anything is measured
        yield summary
    finally:
        child.send_signal(signal.SIGTERM)
        out, _ = child.communicate(timeout=60)
        if child.returncode == 0 and out.strip():
            summary.append(msgspec.json.decode(out.strip().splitlines()[-1], type=LoadSummary))
            log(
                f"  {name}: {summary[0].published:,} events acknowledged in "
                f"{summary[0].seconds:.1f} s ({summary[0].rate:,.0f}/s)"
            )
        else:
            log(f"  {name}: the load process ended with {child.returncode}")


def main() -> int:
    url, rate = sys.argv[1], float(sys.argv[2])
    summary = asyncio.run(_main(url, rate))
    print(json.dumps(msgspec.to_builtins(summary)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
