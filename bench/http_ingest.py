"""HTTP ingest for programs that are not Python (issue #20): `POST /api/v1/usage/records`
with lists of 1,000 records through the gateway, each answered once its records are folded,
next to the raw JetStream publish ceiling of the same run.

The gateway and the usage service run as their own processes (`stockpilot up`'s); the
records are the ceiling's events, Msg-Id = event id, re-dated to the run (the ingest refuses
records from the future and counts days in STOCKPILOT_TZ). A request's answer means its
records are stored and folded, so the time from the first request to the last answer is
"→ folded". Each run posts IN_FLIGHT requests at a time, as a non-Python program with a
small connection pool would, and also one at a time (no target: a request then waits out
its whole round trip before the next starts). The ceiling is the raw publish of the same
number of the same events, measured just before each run (`publish_http`).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from datetime import timedelta
from pathlib import Path

import httpx
import msgspec
import nats
import psutil

from bench.ceilings import raw_publish, sample_event, sample_usage
from bench.harness import Report, Result, log
from bench.stack import running_stack, wait_folded
from shared.clock import SYSTEM_CLOCK
from shared.streams import provision

LIST = 1_000  # records per request (the route's maximum)
IN_FLIGHT = 4
TOKEN = "bench-ingest-token"


def _cpu(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def bodies(count: int, prefix: str) -> list[bytes]:
    """`count` records as JSON lists of LIST, the ceiling's events dated over the last hour."""
    now = SYSTEM_CLOCK.now()
    events = [
        msgspec.structs.replace(
            sample_usage(i, prefix), occurred_at=now - timedelta(seconds=3600 - i % 3600)
        )
        for i in range(count)
    ]
    return [msgspec.json.encode(events[i : i + LIST]) for i in range(0, count, LIST)]


async def post_all(base_url: str, posts: list[bytes], in_flight: int) -> int:
    """Post every body, `in_flight` at a time on as many connections; records accepted."""
    accepted = 0
    queue = iter(posts)
    limits = httpx.Limits(max_connections=in_flight, max_keepalive_connections=in_flight)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    async with httpx.AsyncClient(
        base_url=base_url, limits=limits, timeout=60, trust_env=False
    ) as http:

        async def worker() -> None:
            nonlocal accepted
            for body in queue:
                response = await http.post("/api/v1/usage/records", content=body, headers=headers)
                if response.status_code != 202:
                    raise RuntimeError(f"ingest answered {response.status_code}: {response.text}")
                accepted += msgspec.json.decode(response.content)["accepted"]

        await asyncio.gather(*(worker() for _ in range(in_flight)))
    return accepted


async def run(report: Report, ctx: object) -> None:
    """Records/s through the gateway, IN_FLIGHT requests at a time and one at a time."""
    url: str = ctx.nats_url  # type: ignore[attr-defined]
    runs: int = ctx.runs  # type: ignore[attr-defined]
    workdir: Path = ctx.workdir  # type: ignore[attr-defined]
    count = ctx.count(100_000)  # type: ignore[attr-defined]
    nc = await nats.connect(url)
    js = nc.jetstream()
    await provision(js)
    env = {"STOCKPILOT_INGEST_TOKEN": TOKEN, "STOCKPILOT_TZ": "UTC"}
    with running_stack(url, workdir / "http-ingest", ("usage", "gateway"), env) as stack:
        await wait_folded(nc, (await js.stream_info("STOCKPILOT_USAGE")).state.last_seq, 600)
        usage = psutil.Process(stack.children["usage"].pid)
        gateway = psutil.Process(stack.children["gateway"].pid)
        me = psutil.Process()
        server = next(
            (c for c in me.children(recursive=True) if c.name().startswith("nats-server")), me
        )
        # A warm-up request: connections, the accelerator's connection, first-call imports.
        await post_all(stack.base_url, bodies(LIST, "http-warm"), 1)
        payloads = [sample_event(i) for i in range(count)]
        raws: list[float] = []
        rates: dict[int, list[float]] = {IN_FLIGHT: [], 1: []}
        busy: dict[int, list[list[float]]] = {IN_FLIGHT: [], 1: []}
        for i in range(runs):
            # The ceiling just before (the stack idle): the machine is shared, and its load
            # moves between the start of `make bench` and this module.
            raws.append(await raw_publish(url, count, payloads))
            log(f"  raw publish_async just before, run {i + 1}/{runs}: {raws[-1]:,.0f} events/s")
            for in_flight in (IN_FLIGHT, 1):
                posts = bodies(count, f"http{in_flight}-{i}")  # made before the clock starts
                cpu = (_cpu(usage), _cpu(gateway), _cpu(server), _cpu(me))
                started = time.perf_counter()
                accepted = await post_all(stack.base_url, posts, in_flight)
                elapsed = time.perf_counter() - started
                if accepted != count:
                    raise RuntimeError(f"ingest accepted {accepted} of {count}")
                after = (_cpu(usage), _cpu(gateway), _cpu(server), _cpu(me))
                shares = [(b - a) / elapsed for a, b in zip(cpu, after, strict=True)]
                busy[in_flight].append(shares)
                rates[in_flight].append(count / elapsed)
                log(
                    f"  HTTP ingest, {in_flight} in flight, run {i + 1}/{runs}: "
                    f"{rates[in_flight][-1]:,.0f} records/s (usage {shares[0]:.0%} of a core, "
                    f"gateway {shares[1]:.0%}, nats-server {shares[2]:.0%}, client "
                    f"{shares[3]:.0%})"
                )
        report.ceilings["publish_http"] = Result(
            f"raw JetStream publish_async with Nats-Msg-Id (nats-py) of the same {count:,} "
            "events, just before each HTTP ingest run",
            raws,
            "events/s",
        )
        for in_flight in (IN_FLIGHT, 1):
            shares = [statistics.median(b[k] for b in busy[in_flight]) for k in range(4)]
            ours = in_flight == IN_FLIGHT
            report.results.append(
                Result(
                    f"HTTP ingest: POST /api/v1/usage/records lists of {LIST:,} through the "
                    f"gateway → folded, {in_flight} request{'s' if in_flight > 1 else ''} "
                    "in flight",
                    rates[in_flight],
                    "records/s",
                    ceiling="publish_http",
                    target="≥ 0.8" if ours else "",
                    min_ratio=0.8 if ours else None,
                    note=f"{count:,} records a run, the ceiling's events, Msg-Id = event id; "
                    "each answer after its records are folded; the usage process used "
                    f"{shares[0]:.0%} of a core, the gateway {shares[1]:.0%}, nats-server "
                    f"{shares[2]:.0%}, the HTTP client (httpx, in the bench process) "
                    f"{shares[3]:.0%} (medians; 2 cores = 200 %)",
                )
            )
    await nc.close()
