"""A service asked to stop while NATS is away stops cleanly (contract: SIGINT/SIGTERM → clean)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import nats as nats_py

from tests.faults.stack import digest, service_env, spawn
from tests.harness import NatsServer, stop_process


async def test_sigterm_while_nats_is_away_exits_zero_without_a_traceback(
    nats: NatsServer, tmp_path: Path
) -> None:
    env = service_env(nats.url, tmp_path / "data")
    log = tmp_path / "usage.log"
    process = spawn(["service", "usage"], env, log)
    try:
        nc = await nats_py.connect(nats.url)
        try:
            for _ in range(300):
                if await digest(nc, "usage", timeout=0.5) is not None:
                    break
                await asyncio.sleep(0.1)
        finally:
            await nc.close()
        nats.stop()
        await asyncio.sleep(1.5)  # it is reconnecting now
        process.send_signal(signal.SIGTERM)
        status = await asyncio.to_thread(process.wait, 15)
        output = log.read_text(errors="replace")
        assert "Traceback" not in output, output[-2000:]
        assert status == 0
    finally:
        stop_process(process)
