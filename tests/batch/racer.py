"""A second process that races for job locks: `python -m tests.batch.racer NATS_URL N`.

Reads `go <job_id>` lines on stdin; for each, N tasks try to take that job's lock at once;
prints one JSON line: the winners' owners and fencing tokens, and the holders losers were told.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid

import msgspec
import nats

from services.batch.errors import LockHeldError
from services.batch.locks import acquire_lock


class RoundResult(msgspec.Struct, kw_only=True):
    """What one process saw in one round."""

    winners: list[tuple[str, int]]
    told_holders: list[str]


async def attempt(js: object, job_id: str, owner: str) -> tuple[str, int] | str:
    """(owner, fencing token) when this attempt won, else the holder it was told about."""
    try:
        lock = await acquire_lock(
            js,  # type: ignore[arg-type]
            job_id,
            owner=owner,
            execution_id=uuid.uuid4().hex,
            ttl_s=600,
        )
    except LockHeldError as exc:
        return exc.owner
    return (lock.owner, lock.fencing_token)


async def race(js: object, job_id: str, n: int, prefix: str) -> RoundResult:
    """N concurrent attempts on one job."""
    outcomes = await asyncio.gather(*(attempt(js, job_id, f"{prefix}-{i}") for i in range(n)))
    return RoundResult(
        winners=[o for o in outcomes if isinstance(o, tuple)],
        told_holders=[o for o in outcomes if isinstance(o, str)],
    )


async def main(url: str, n: int) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    loop = asyncio.get_running_loop()
    print("ready", flush=True)
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line.startswith("go "):
            break
        result = await race(js, line.split()[1], n, f"child{os.getpid()}")
        print(msgspec.json.encode(result).decode(), flush=True)
    await nc.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
