"""Usage with every service as its own OS process (what `stockpilot up` runs), in this order:

- RSS of each process (health, usage, batch, gateway) once the usage stream holds 1M events;
- ingest end to end: events recorded with the usage client (`UsageRecorder`, the bytes of the
  raw-publish ceiling, Msg-Id = event id) until the usage service's projection reflects the
  last one; and the same with nats-py's `publish_async` loop of the ceiling as the publisher
  (what the service keeps up with when the publisher is not ours);
- projection replay: the usage service started with its snapshots deleted, the stream's
  events (1M + what the ingest runs added) folded from the first (time from spawn to ready);
- restart to serving: the usage service stopped (it snapshots on SIGTERM), a tail of events
  published meanwhile, then the time from spawning it again until its `status` endpoint says
  ready at the stream's last sequence (snapshot + tail);
- RSS of each process again at 3M events (`--quick`: 50k and 150k).
"""

from __future__ import annotations

import contextlib
import statistics
import time
from pathlib import Path

import httpx
import nats
import psutil
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from bench.ceilings import raw_read, sample_event, sample_usage
from bench.harness import Report, Result, log
from bench.stack import running_stack, wait_folded
from services.usage.client import UsageRecorder
from services.usage.contract import UsageRecorded
from shared.streams import provision, snapshot_bucket

STREAM = "STOCKPILOT_USAGE"
SUBJECT = "stockpilot.usage.recorded"
SNAPSHOTS = ("usage.usage", "usage.alert-history", "usage.usage-alert-ledger")
TAIL = 10_000  # events published while the usage service is stopped
READ_ROUTES = (
    "/api/v1/status",
    "/api/v1/usage/stats",
    "/api/v1/health/comprehensive",
    "/api/v1/batch/executions/recent",
)


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


async def last_seq(js: JetStreamContext) -> int:
    """The usage stream's last sequence."""
    return int((await js.stream_info(STREAM)).state.last_seq)


async def calls_held(js: JetStreamContext) -> int:
    """How many calls the usage stream holds: all but the service's price tables."""
    info = await js.stream_info(STREAM, subjects_filter=SUBJECT)
    return int((info.state.subjects or {}).get(SUBJECT, 0))


async def publish(js: JetStreamContext, start: int, stop: int) -> None:
    """Events `start`..`stop-1` with publish_async (the library's own in-flight limit)."""
    for i in range(start, stop):
        await js.publish_async(SUBJECT, sample_event(i), headers={"Nats-Msg-Id": f"stream-{i}"})
    await js.publish_async_completed()


async def record(nc: NATS, events: list[UsageRecorded]) -> None:
    """`events` through the usage client, until all are acknowledged."""
    recorder = UsageRecorder(nc, buffer_size=len(events))
    recorder.start()
    for event in events:
        recorder.record(event)
    await recorder.close(timeout=600)
    if recorder.published != len(events):
        raise RuntimeError(f"the usage client stored {recorder.published} of {len(events)}")


async def fill_to(js: JetStreamContext, target: int, next_id: int) -> int:
    """Publish until the stream holds `target` messages; the next event number."""
    missing = target - int((await js.stream_info(STREAM)).state.messages)
    chunk = 100_000
    while missing > 0:
        n = min(chunk, missing)
        await publish(js, next_id, next_id + n)
        next_id += n
        missing -= n
    return next_id


async def touch_routes(port: int) -> None:
    """Each read route a few times, so the gateway holds its answers when RSS is read."""
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", trust_env=False) as http:
        for _ in range(5):
            for route in READ_ROUTES:
                await http.get(route)


async def run(report: Report, ctx: object) -> None:
    """Ingest end to end, restart to serving, RSS at 1M and 3M events."""
    url: str = ctx.nats_url  # type: ignore[attr-defined]
    runs: int = ctx.runs  # type: ignore[attr-defined]
    workdir: Path = ctx.workdir  # type: ignore[attr-defined]
    count = ctx.count  # type: ignore[attr-defined]
    first, second = count(1_000_000), count(3_000_000)
    ingest_n = count(200_000)

    nc = await nats.connect(url)
    js = nc.jetstream()
    await provision(js)
    next_id = 0
    with running_stack(url, workdir / "stream") as stack:
        await wait_folded(nc, await last_seq(js), timeout=600)

        log(f"usage: filling the stream to {first:,} events")
        started = time.perf_counter()
        next_id = await fill_to(js, first, next_id)
        await wait_folded(nc, await last_seq(js))
        log(f"  filled and folded in {time.perf_counter() - started:.0f} s")
        # Every process has run since the stack started and folded the whole stream: the
        # first RSS mark is taken before the ingest, replay and restart runs below (the last
        # two restart usage).
        await touch_routes(stack.port)
        rss_first = stack.rss_mb()
        # Earlier benchmarks may already have put more than `first` events in the stream.
        at_first = int((await js.stream_info(STREAM)).state.messages)

        usage, me = psutil.Process(stack.children["usage"].pid), psutil.Process()
        server = next(
            (c for c in me.children(recursive=True) if c.name().startswith("nats-server")), me
        )
        publishers = (
            ("usage client", "the usage client (`UsageRecorder`) records", True),
            ("publish_async", "nats-py's publish_async loop (the ceiling's) publishes", False),
        )
        for label, how, ours in publishers:
            rates, busy, lags = [], [], []
            for i in range(runs):
                # Made before the clock starts, as the ceiling's payloads are.
                ids = range(next_id, next_id + ingest_n) if ours else range(0)
                events = [sample_usage(n, "recorded") for n in ids]
                cpu = (_cpu(usage), _cpu(me), _cpu(server))
                started = time.perf_counter()
                if ours:
                    await record(nc, events)
                else:
                    await publish(js, next_id, next_id + ingest_n)
                published = time.perf_counter()
                next_id += ingest_n
                await wait_folded(nc, await last_seq(js))
                elapsed = time.perf_counter() - started
                rates.append(ingest_n / elapsed)
                lags.append(time.perf_counter() - published)
                busy.append(
                    (
                        (_cpu(usage) - cpu[0]) / elapsed,
                        (_cpu(me) - cpu[1]) / elapsed,
                        (_cpu(server) - cpu[2]) / elapsed,
                    )
                )
                log(
                    f"  ingest end to end ({label}) run {i + 1}/{runs}: {rates[-1]:,.0f} "
                    f"events/s (usage process {busy[-1][0]:.0%} of a core, publisher "
                    f"{busy[-1][1]:.0%}, nats-server {busy[-1][2]:.0%}; folded "
                    f"{lags[-1] * 1000:.0f} ms after the last ack)"
                )
            usage_busy, client_busy, server_busy = (
                sorted(b[k] for b in busy)[len(busy) // 2] for k in range(3)
            )
            report.results.append(
                Result(
                    f"usage ingest end to end: {how} → folded by the usage process",
                    rates,
                    "events/s",
                    ceiling="publish",
                    target="≥ 0.9" if ours else "",
                    min_ratio=0.9 if ours else None,
                    note=f"{ingest_n:,} events a run, the ceiling's bytes, Msg-Id = event id; "
                    f"the usage process folds while they are published: it used "
                    f"{usage_busy:.0%} of a core, the publisher {client_busy:.0%}, nats-server "
                    f"{server_busy:.0%} (medians; 2 cores = 200 %); folded "
                    f"{statistics.median(lags) * 1000:.0f} ms after the last ack (median)",
                )
            )

        replays, reads = [], []
        obs = await js.object_store(snapshot_bucket("usage"))
        for i in range(runs):
            stack.stop("usage")
            for name in SNAPSHOTS:
                with contextlib.suppress(Exception):
                    await obs.delete(name)
            target = await last_seq(js)
            # The ceiling: nats-py reading the same stream, just before (the stack is idle).
            reads.append(await raw_read(url, await calls_held(js), SUBJECT))
            started = time.perf_counter()
            stack.spawn("usage")
            await wait_folded(nc, target, timeout=600, interval=0.05)
            replays.append(target / (time.perf_counter() - started))
            log(
                f"  replay of {target:,} events run {i + 1}/{runs}: {replays[-1]:,.0f} events/s "
                f"(raw read of them just before: {reads[-1]:,.0f} events/s)"
            )
        report.ceilings["read_replay"] = Result(
            f"raw ordered push consumer read of the usage stream the replay folds ({target:,} "
            "events; nats-py), just before each replay run",
            reads,
            "events/s",
        )
        report.results.append(
            Result(
                f"usage projection replay: the usage process started on {target:,} events, "
                "no snapshot",
                replays,
                "events/s",
                ceiling="read_replay",
                target="≥ 0.7",
                min_ratio=0.7,
                note="from spawning the process (interpreter start, imports, connect) to ready "
                "at the stream's last sequence; uvloop, as `stockpilot up` runs it",
            )
        )

        restarts = []
        for i in range(runs):
            stack.stop("usage")
            await publish(js, next_id, next_id + TAIL)
            next_id += TAIL
            target = await last_seq(js)
            started = time.perf_counter()
            stack.spawn("usage")
            await wait_folded(nc, target, timeout=300, interval=0.005)
            restarts.append(time.perf_counter() - started)
            log(f"  restart to serving run {i + 1}/{runs}: {restarts[-1]:.2f} s")
        report.results.append(
            Result(
                f"usage restart to serving, {target:,} events in the stream "
                f"(snapshot + {TAIL:,}-event tail)",
                restarts,
                "s",
                higher_is_better=False,
                target="≤ 2 s",
                max_value=2.0,
                note="from spawning the process to its status endpoint saying ready at the "
                "stream's last sequence; includes interpreter start and imports",
            )
        )

        log(f"usage: filling the stream to {second:,} events")
        next_id = await fill_to(js, second, next_id)
        await wait_folded(nc, await last_seq(js))
        await touch_routes(stack.port)
        rss_second = stack.rss_mb()
        at_second = int((await js.stream_info(STREAM)).state.messages)
    await nc.close()

    for name in ("usage", "health", "batch", "gateway"):
        a, b = rss_first[name], rss_second[name]
        growth = 100.0 * (b - a) / a
        log(
            f"  RSS {name}: {a:.1f} MB at {at_first:,}, {b:.1f} MB at {at_second:,} "
            f"({growth:+.1f} %)"
        )
        restarted = (
            " (at the second mark: the process last restarted by the restart runs, which has "
            f"folded {at_second - target:,} events since)"
            if name == "usage"
            else ""
        )
        report.results.append(
            Result(
                f"RSS growth of the {name} process, {at_first:,} → {at_second:,} usage events",
                [growth],
                "%",
                higher_is_better=False,
                target="≤ 10 %",
                max_value=10.0,
                note=f"{a:.1f} MB → {b:.1f} MB{restarted}; one pass",
            )
        )
