"""1,000 SSE clients on one gateway: its resident memory, and how long an alert takes to reach
the first and the last of them.

The usage service and the gateway run as `stockpilot up` runs them, on the module's own
nats-server; the clients are raw sockets in this process (bench.listeners.SseClient, a few KB
each). Each sample records a budget-crossing call with the usage client (the budgets and
prices of bench.alert_latency) and waits until every client has the alert. The gateway's
STOCKPILOT_SSE_MAX_CLIENTS is raised to let 1,000 in (the default is 100).
"""

from __future__ import annotations

import asyncio
import random
import resource
import statistics
import time
from pathlib import Path

import nats
import psutil

from bench.alert_latency import budget_env, crossing
from bench.harness import Report, Result, log, percentile
from bench.listeners import SseClient, open_when_serving
from bench.stack import running_stack, wait_folded
from services.usage.client import UsageRecorder
from tests.harness import NatsServer

CLIENTS = 1_000
CONNECTING = 50  # connections opened at a time
TIMEOUT_S = 30.0


def raise_fd_limit(wanted: int) -> None:
    """Room for `wanted` sockets in this process (up to the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (uvicorn workers), MB."""
    process = psutil.Process(pid)
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        total += child.memory_info().rss
    return total / 1024 / 1024


async def connect_all(port: int, count: int) -> list[SseClient]:
    """`count` clients joined to the alert stream."""
    gate = asyncio.Semaphore(CONNECTING)

    async def one() -> SseClient:
        async with gate:
            client = SseClient()
            await client.open(port)
            return client

    return list(await asyncio.gather(*(one() for _ in range(count))))


async def run(report: Report, ctx: object) -> None:
    """Gateway RSS with CLIENTS SSE clients; alert latency to the first and the last."""
    runs: int = ctx.runs  # type: ignore[attr-defined]
    workdir: Path = ctx.workdir  # type: ignore[attr-defined]
    quick: bool = ctx.quick  # type: ignore[attr-defined]
    per_run = 10 if quick else 15  # budgets a run, two crossings each (100 budgets at most)
    users = [[f"f{r}u{n}" for n in range(per_run)] for r in range(runs)]
    raise_fd_limit(CLIENTS + 1024)
    server = NatsServer(workdir / "fanout-nats").start()
    env = {
        "STOCKPILOT_SSE_MAX_CLIENTS": str(CLIENTS + 100),
        **budget_env([u for run_users in users for u in run_users]),
    }
    base_rss, rss, growth, first_p50, last_p50, last_p99 = [], [], [], [], [], []
    try:
        with running_stack(server.url, workdir / "fanout", ("usage", "gateway"), env) as stack:
            nc = await nats.connect(server.url)
            await wait_folded(nc, 0, timeout=120)
            gateway = stack.children["gateway"].pid
            probe = SseClient()  # the gateway serves the stream: then measure from idle
            await open_when_serving(probe, stack.port)
            await probe.close()
            recorder = UsageRecorder(nc)
            recorder.start()
            for i in range(runs):
                await asyncio.sleep(1.0)  # the probe's or the last run's clients have left
                base_rss.append(rss_mb(gateway))
                clients = await connect_all(stack.port, CLIENTS)
                to_first, to_last = [], []
                for step in (0, 1):
                    for user in users[i]:
                        event, title = crossing(user, step)
                        started = time.perf_counter()
                        recorder.record(event)
                        heard = await asyncio.gather(
                            *(c.heard.wait_for(title, TIMEOUT_S) for c in clients)
                        )
                        to_first.append((min(heard) - started) * 1000)
                        to_last.append((max(heard) - started) * 1000)
                        await asyncio.sleep(random.uniform(0.01, 0.05))
                rss.append(rss_mb(gateway))
                growth.append((rss[-1] - base_rss[-1]) * 1024 / CLIENTS)
                first_p50.append(percentile(to_first, 50))
                last_p50.append(percentile(to_last, 50))
                last_p99.append(percentile(to_last, 99))
                log(
                    f"  {CLIENTS:,} SSE clients run {i + 1}/{runs}: gateway RSS "
                    f"{base_rss[-1]:.1f} → {rss[-1]:.1f} MB; alert to the first client p50 "
                    f"{first_p50[-1]:.1f} ms, to the last p50 {last_p50[-1]:.1f} ms, p99 "
                    f"{last_p99[-1]:.1f} ms ({len(to_last)} alerts)"
                )
                await asyncio.gather(*(c.close() for c in clients))
            await recorder.close()
            await nc.close()
    finally:
        server.stop()
    samples = f"{2 * per_run} alerts a run, one at a time, each heard by all {CLIENTS:,} clients"
    report.results += [
        Result(
            f"gateway RSS with {CLIENTS:,} SSE clients of /api/v1/alerts/stream",
            rss,
            "MB",
            higher_is_better=False,
            note=f"{statistics.median(base_rss):.1f} MB before they connected (median); "
            "measured after the run's alerts reached them all",
        ),
        Result(
            "gateway memory per SSE client",
            growth,
            "KB",
            higher_is_better=False,
            note=f"(RSS with the clients − RSS before) / {CLIENTS:,}",
        ),
        Result(
            f"alert latency to the first of {CLIENTS:,} SSE clients p50",
            first_p50,
            "ms",
            higher_is_better=False,
            note=samples,
        ),
        Result(
            f"alert latency to the last of {CLIENTS:,} SSE clients p50",
            last_p50,
            "ms",
            higher_is_better=False,
            note=samples + "; the clients' reading shares the machine's two cores",
        ),
        Result(
            f"alert latency to the last of {CLIENTS:,} SSE clients p99",
            last_p99,
            "ms",
            higher_is_better=False,
            note=samples,
        ),
    ]
