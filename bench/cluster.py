"""The usage path on a 3-node NATS cluster with R3 streams (STOCKPILOT_STREAM_REPLICAS=3), each
figure next to a raw R3 ceiling of the same run:

- ingest: the usage client records the raw-publish ceiling's events until the usage process
  has folded them, against nats-py's publish_async of the same count into an R3 stream;
- replay: the usage process started with no snapshot, against an ordered consumer reading the
  same R3 stream just before;
- failover: while the usage client records at 5,000 events/s, the node that leads
  STOCKPILOT_USAGE is killed (SIGKILL); how long until ingest resumed (an event recorded after
  the kill acknowledged, every one before it too), until reads are served again (the gateway's
  /usage/stats counts more than it did before the kill: the usage process folds again), and
  whether anything was lost (the stream holds every recorded event once).

The cluster is the project's nats-server (shared.testing.NatsCluster), on loopback, started by
the bench; every process of the stack gets all three URLs.
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
import nats
from nats.aio.client import Client as NATS

from bench.ceilings import raw_publish, raw_read, sample_event, sample_usage
from bench.harness import Report, Result, log
from bench.load import load_event
from bench.stack import Stack, running_stack, wait_folded
from bench.usage_stream import SNAPSHOTS, SUBJECT, calls_held, last_seq
from services.usage.answers import UsageStats
from services.usage.client import RecorderSettings, UsageRecorder
from shared import bus
from shared.settings import load_settings
from shared.testing import NatsCluster

STREAM = bus.STREAMS["usage"].name
RATE = 5_000  # events/s recorded while the leader is killed
GIVE_UP_S = 60.0  # the longest a failover run records
_stats = msgspec.json.Decoder(UsageStats).decode


async def jetstream_ready(url: str) -> None:
    """Until the new cluster has elected its meta leader and serves JetStream."""
    nc = await nats.connect(url.split(","))
    try:
        for _ in range(300):
            with contextlib.suppress(Exception):
                await nc.jetstream().account_info()
                return
            await asyncio.sleep(0.1)
        raise TimeoutError("the cluster never served JetStream")
    finally:
        await nc.close()


async def recorder_for(url: str, workdir: Path) -> UsageRecorder:
    """A usage client as an application gets it (`UsageRecorder.connect`), without a spool."""
    env = {
        "STOCKPILOT_NATS_URL": url,
        "STOCKPILOT_DATA_DIR": str(workdir),
        "STOCKPILOT_USAGE_SPOOL_DIR": "off",
    }
    settings = load_settings(RecorderSettings, env)
    return await UsageRecorder.connect(settings, buffer_size=1_000_000)


async def ingest(url: str, workdir: Path, nc: NATS, count: int, run: int) -> float:
    """`count` events recorded with the usage client until folded: events/s."""
    events = [sample_usage(n, f"cluster{run}") for n in range(count)]
    recorder = await recorder_for(url, workdir)
    started = time.perf_counter()
    for event in events:
        recorder.record(event)
    await recorder.flush()
    await wait_folded(nc, await last_seq(nc.jetstream()), timeout=600)
    elapsed = time.perf_counter() - started
    await recorder.close()
    if recorder.published + recorder.duplicates != count:
        raise RuntimeError(f"the usage client stored {recorder.published} of {count}")
    return count / elapsed


async def replay(stack: Stack, nc: NATS, url: str) -> tuple[float, float, int]:
    """The usage process started with no snapshot: its events/s, a raw read's just before,
    and the events folded."""
    js = nc.jetstream()
    stack.stop("usage")
    obs = await js.object_store(bus.snapshot_bucket("usage"))
    for name in SNAPSHOTS:
        with contextlib.suppress(Exception):
            await obs.delete(name)
    target = await last_seq(js)
    read = await raw_read(url, await calls_held(js), SUBJECT)
    started = time.perf_counter()
    stack.spawn("usage")
    await wait_folded(nc, target, timeout=600, interval=0.05)
    return target / (time.perf_counter() - started), read, target


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


async def run(report: Report, ctx: object) -> None:
    """R3 ceilings, ingest, replay and failover on a 3-node cluster."""
    runs: int = ctx.runs  # type: ignore[attr-defined]
    workdir: Path = ctx.workdir  # type: ignore[attr-defined]
    count = ctx.count(200_000)  # type: ignore[attr-defined]
    cluster = NatsCluster(workdir / "cluster").start()
    try:
        url = cluster.url
        await jetstream_ready(url)
        payloads = [sample_event(i) for i in range(count)]
        env = {"STOCKPILOT_STREAM_REPLICAS": "3"}
        with running_stack(url, workdir / "cluster-stack", ("usage", "gateway"), env) as stack:
            nc = await nats.connect(url.split(","), max_reconnect_attempts=-1)
            await wait_folded(nc, 0, timeout=120)
            publishes, ingests = [], []
            for i in range(runs):
                publishes.append(await raw_publish(url, count, payloads, replicas=3))
                ingests.append(await ingest(url, workdir, nc, count, i))
                log(
                    f"  R3 run {i + 1}/{runs}: raw publish_async {publishes[-1]:,.0f}, usage "
                    f"client → folded {ingests[-1]:,.0f} events/s"
                )
            replays, reads = [], []
            for i in range(runs):
                rate, read, held = await replay(stack, nc, url)
                replays.append(rate)
                reads.append(read)
                log(
                    f"  R3 replay run {i + 1}/{runs}: {rate:,.0f} events/s (raw read of the "
                    f"same stream just before: {read:,.0f})"
                )
            stops: dict[bool, list[Failover]] = {}
            for kill in (True, False):
                stops[kill] = []
                for i in range(runs):
                    f = await failover(cluster, stack, nc, url, workdir, 2 * i + kill, kill)
                    stops[kill].append(f)
                    log(
                        f"  failover ({'SIGKILL' if kill else 'SIGTERM'}) run {i + 1}/{runs}: "
                        f"new leader {f.leader_s:.2f} s, ingest resumed {f.resumed_s:.2f} s, "
                        f"/usage/stats fresh {f.fresh_s:.2f} s after; longest read gap "
                        f"{f.read_gap_s:.2f} s; {f.lost} lost"
                    )
            await nc.close()
    finally:
        cluster.stop()
    report.ceilings["publish_r3"] = Result(
        f"raw JetStream publish_async with Nats-Msg-Id into an R3 stream, 3-node cluster "
        f"({count:,} events)",
        publishes,
        "events/s",
    )
    report.ceilings["read_r3"] = Result(
        "raw ordered push consumer read of the R3 usage stream (nats-py), just before each "
        "replay run",
        reads,
        "events/s",
    )
    report.results += [
        Result(
            "cluster: usage client ingest → folded by the usage process, R3 streams",
            ingests,
            "events/s",
            ceiling="publish_r3",
            target="≥ 0.8",
            min_ratio=0.8,
            note=f"{count:,} events a run, the ceiling's bytes; until the usage process "
            "folded the last",
        ),
        Result(
            f"cluster: usage process replay from no snapshot, R3 stream of {held:,} events",
            replays,
            "events/s",
            ceiling="read_r3",
            target="≥ 0.7",
            min_ratio=0.7,
            note="from spawning the process to ready at the stream's last sequence",
        ),
    ]
    for kill, results in stops.items():
        how = "killed (SIGKILL)" if kill else "stopped (SIGTERM, a graceful shutdown)"
        target, limit = ("≤ 2 s", 2.0) if kill else ("", None)
        report.results += [
            Result(
                f"cluster: the usage stream has a new leader after its leader was {how}",
                [f.leader_s for f in results],
                "s",
                higher_is_better=False,
                note="the stream's info answered with another leader (nats-server's Raft)",
            ),
            Result(
                f"cluster: ingest resumed after the usage stream's leader was {how}",
                [f.resumed_s for f in results],
                "s",
                higher_is_better=False,
                note=f"usage client at {RATE:,} events/s (publish timeout 2 s, its default); "
                "until an event recorded after the stop is acknowledged",
                target=target,
                max_value=limit,
            ),
            Result(
                f"cluster: reads served again after the usage stream's leader was {how}",
                [f.fresh_s for f in results],
                "s",
                higher_is_better=False,
                note="until the gateway's /usage/stats counts an event recorded after the stop; "
                "longest time without a 200 from it: "
                f"{max(f.read_gap_s for f in results) * 1000:.0f} ms",
                target=target,
                max_value=limit,
            ),
            Result(
                f"cluster: events lost when the usage stream's leader was {how}",
                [float(f.lost) for f in results],
                "events",
                higher_is_better=False,
                target="0",
                max_value=0.0,
                note="recorded − stored (the stream holds a retried event once)",
            ),
        ]
