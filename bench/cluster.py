"""The usage path on a 3-node NATS cluster with R3 streams (STOCKPILOT_STREAM_REPLICAS=3), each
figure next to a raw R3 ceiling of the same run:

- ingest: the usage client records the raw-publish ceiling's events until the usage process
  has folded them, against nats-py's publish_async of the same count into an R3 stream;
- replay: the usage process started with no snapshot, against an ordered consumer reading the
  same R3 stream just before;
- failover (bench/failover.py): while the usage client records at 5,000 events/s, the node
  that leads STOCKPILOT_USAGE is killed (SIGKILL; then, as a second row, stopped with
  SIGTERM); how long until the stream has a new leader, until ingest resumed (an event
  recorded after the stop acknowledged, every one before it too), until reads are served
  again (the gateway's /usage/stats counts an event recorded after the stop), and whether
  anything was lost (the stream holds every recorded event once).

The cluster is the project's nats-server (tests.harness.NatsCluster), on loopback, started by
the bench; every process of the stack gets all three URLs.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import nats
from nats.aio.client import Client as NATS

from bench.ceilings import raw_publish, raw_read, sample_event, sample_usage
from bench.failover import RATE, Failover, failover, recorder_for
from bench.harness import Report, Result, log
from bench.stack import Stack, running_stack, wait_folded
from bench.usage_stream import SNAPSHOTS, SUBJECT, calls_held, last_seq
from shared.streams import snapshot_bucket
from tests.harness import NatsCluster


async def _reconnecting(exc: Exception) -> None:
    log(f"  the bench's NATS connection: {exc!r}")


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
    obs = await js.object_store(snapshot_bucket("usage"))
    for name in SNAPSHOTS:
        with contextlib.suppress(Exception):
            await obs.delete(name)
    target = await last_seq(js)
    read = await raw_read(url, await calls_held(js), SUBJECT)
    started = time.perf_counter()
    stack.spawn("usage")
    await wait_folded(nc, target, timeout=600, interval=0.05)
    return target / (time.perf_counter() - started), read, target


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
            # Its own connection loses a node in the failover runs: reconnecting is expected,
            # nats-py's default error callback would print each as a traceback.
            nc = await nats.connect(
                url.split(","), max_reconnect_attempts=-1, error_cb=_reconnecting
            )
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
