"""One endless batch job in its own process: `python -m tests.batch.worker URL JOB TTL HB [AT]`.

AT (ISO 8601) sets the worker's clock to the test's: its events and lock are dated from it.
Prints `started <execution_id> <fencing_token>` once it holds the lock, then advances forever
(the test kills it with SIGKILL).
"""

from __future__ import annotations

import asyncio
import sys
from datetime import datetime

import nats

from services.batch.client import batch_job
from shared.clock import SYSTEM_CLOCK, Clock, ManualClock


async def main(url: str, job_id: str, ttl_s: float, heartbeat_s: float, clock: Clock) -> None:
    nc = await nats.connect(url)
    async with batch_job(
        nc,
        job_id,
        items_total=1_000_000,
        ttl_s=ttl_s,
        heartbeat_interval_s=heartbeat_s,
        clock=clock,
    ) as run:
        print(f"started {run.execution_id} {run.fencing_token}", flush=True)
        while True:
            run.advance(1)
            await asyncio.sleep(0.02)


if __name__ == "__main__":
    at = sys.argv[5] if len(sys.argv) > 5 else None
    clock = ManualClock(datetime.fromisoformat(at)) if at else SYSTEM_CLOCK
    asyncio.run(main(sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4]), clock))
