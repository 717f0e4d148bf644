"""The cluster benchmark's failover: the leader of STOCKPILOT_USAGE stopped mid-ingest.

While the usage client records at RATE events/s, the node named by the stream's
`cluster.leader` is stopped (SIGKILL or SIGTERM); recording and polling the gateway's
/usage/stats go on, and the times of what came back are noted (see `Failover`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import msgspec
from nats.aio.client import Client as NATS

from bench.harness import log
from bench.load import load_event
from bench.stack import Stack, wait_folded
from bench.usage_stream import calls_held, last_seq
from services.usage.client import RecorderSettings, UsageRecorder
from services.usage.contract import UsageStats
from shared.settings import load_settings
from shared.streams import STREAMS
from tests.harness import NatsCluster

STREAM = STREAMS["usage"].name
RATE = 5_000  # events/s recorded while the leader is stopped
GIVE_UP_S = 60.0  # the longest a failover run records
_stats = msgspec.json.Decoder(UsageStats).decode


async def recorder_for(url: str, workdir: Path) -> UsageRecorder:
    """A usage client as an application gets it (`UsageRecorder.connect`), without a spool."""
    env = {
        "STOCKPILOT_NATS_URL": url,
        "STOCKPILOT_DATA_DIR": str(workdir),
        "STOCKPILOT_USAGE_SPOOL_DIR": "off",
    }
    settings = load_settings(RecorderSettings, env)
    return await UsageRecorder.connect(settings, buffer_size=1_000_000)


async def total_today(http: httpx.AsyncClient) -> int | None:
    """Today's total_requests through the gateway, None while it does not answer."""
    try:
        response = await http.get("/api/v1/usage/stats", timeout=1.0)
    except httpx.HTTPError:
        return None
    return _stats(response.content).total_requests if response.status_code == 200 else None


@dataclass
class Failover:
    """What one stop of the usage stream's leader did (seconds after the stop)."""

    resumed_s: float  # an event recorded after the stop acknowledged (all before it too)
    fresh_s: float  # /usage/stats through the gateway counts an event recorded after it
    read_gap_s: float  # the longest time without a 200 from /usage/stats after the stop
    leader_s: float  # the stream answers its info with a new leader
    lost: int  # recorded − stored


async def failover(
    cluster: NatsCluster,
    stack: Stack,
    nc: NATS,
    url: str,
    workdir: Path,
    run: int,
    kill: bool,
    seconds: float = 3.0,
) -> Failover:
    """Stop the usage stream's leader mid-ingest (SIGKILL when `kill`, else SIGTERM). The
    usage client records at RATE throughout, and on for `seconds` after everything came back
    (at most GIVE_UP_S); /usage/stats is polled all along."""
    js = nc.jetstream()
    stored_before = await calls_held(js)
    recorder = await recorder_for(url, workdir)
    stopped_at = resumed_at = fresh_at = 0.0
    leader_at: list[float] = []
    recorded = recorded_at_stop = 0
    async with httpx.AsyncClient(base_url=stack.base_url, trust_env=False) as http:
        total_before = await total_today(http) or 0
        started = time.monotonic()
        back_at = last_ok = 0.0
        read_gap = 0.0
        while (elapsed := time.monotonic() - started) < GIVE_UP_S and (
            not back_at or time.monotonic() - back_at < seconds
        ):
            now = datetime.now(UTC)
            while recorded < int(elapsed * RATE):
                recorder.record(load_event(recorded, now, prefix=f"failover{run}"))
                recorded += 1
            total = await total_today(http)
            if total is not None:
                if stopped_at:
                    read_gap = max(read_gap, time.perf_counter() - last_ok)
                last_ok = time.perf_counter()
            if not stopped_at and elapsed >= 1.0:
                info = await js.stream_info(STREAM)
                leader = str(info.cluster.leader if info.cluster else "")
                victim = cluster.nodes[int(leader.removeprefix("n"))]
                stopped_at, recorded_at_stop = time.perf_counter(), recorded
                # In threads: a graceful stop takes a while, and this loop must go on; an
                # info request waits while the stream has no leader.
                stopping = asyncio.create_task(asyncio.to_thread(victim.stop, kill))
                electing = asyncio.create_task(_new_leader(nc, leader, leader_at))
                how = "killed" if kill else "stopped (SIGTERM)"
                log(f"  {how} {leader}, the leader of {STREAM}, after {recorded:,} events")
            elif stopped_at:
                if not resumed_at and recorder.published + recorder.duplicates > recorded_at_stop:
                    resumed_at = time.perf_counter()
                if not fresh_at and (total or 0) > total_before + recorded_at_stop:
                    fresh_at = time.perf_counter()
                if resumed_at and fresh_at and not back_at:
                    back_at = time.monotonic()
            await asyncio.sleep(0.005)
        await asyncio.wait_for(recorder.flush(), timeout=120)
        await wait_folded(nc, await last_seq(js), timeout=300)
        end = time.perf_counter()
    await recorder.close()
    await stopping
    await electing
    lost = recorded - (await calls_held(js) - stored_before)
    victim.start()  # rejoins with its store; current again before the next run
    await _replicas_current(js)
    return Failover(
        resumed_s=(resumed_at or end) - stopped_at,
        fresh_s=(fresh_at or end) - stopped_at,
        read_gap_s=read_gap,
        leader_s=(leader_at[0] if leader_at else end) - stopped_at,
        lost=lost,
    )


async def _new_leader(nc: NATS, old: str, at: list[float]) -> None:
    """Note when the stream answers with a leader other than `old`."""
    js = nc.jetstream(timeout=0.5)  # an info request waits while the stream has no leader
    deadline = time.monotonic() + GIVE_UP_S
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            info = await js.stream_info(STREAM)
            if info.cluster and info.cluster.leader and info.cluster.leader != old:
                at.append(time.perf_counter())
                return
        await asyncio.sleep(0.01)


async def _replicas_current(js: object, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            info = await js.stream_info(STREAM)  # type: ignore[attr-defined]
            replicas = info.cluster.replicas or [] if info.cluster else []
            if len(replicas) == 2 and all(r.current for r in replicas):
                return
        await asyncio.sleep(0.2)
    log("  the restarted node did not catch up in time")
