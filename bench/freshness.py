"""Freshness: a call recorded by the usage client → visible in `GET /api/v1/usage/stats`
through the gateway, idle and under a background load of 5,000 events/s.

The usage service and the gateway run as `stockpilot up` runs them (their own processes). Each
sample records one call with the usage client in this process and polls the gateway until
the call is counted. The sample calls are dated on a day nothing else writes (PROBE_DAYS
back), so `?date=` of that day counts them and nothing else: the background load (today's
calls, from its own process, bench.load) adds work to every process on the path without
moving the figure the sample waits for.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import msgspec
import nats
from nats.aio.client import Client as NATS

from bench.harness import Report, latency_results, log, percentile
from bench.load import background_load
from bench.stack import running_stack, usage_seq, usage_status
from services.usage.client import UsageRecorder
from services.usage.contract import UsageCounters, UsageRecorded, UsageStats
from shared.endpoints import endpoint_subject

LOAD_RATE = 5_000
PROBE_DAYS = 40
POLL_S = 0.001  # between polls: a round trip or two of resolution, without a busy loop
_stats = msgspec.json.Decoder(UsageStats).decode


def probe_event(n: int, day: datetime) -> UsageRecorded:
    """The sample call: one request on the probe day."""
    return UsageRecorded(
        id=f"fresh-{day:%Y%m%d}-{time.time_ns()}-{n}",
        request_id=f"fresh-{n}",
        occurred_at=day,
        model="gpt-4o-mini",
        endpoint="/api/v1/fresh",
        prompt_tokens=10,
        completion_tokens=5,
        status_code=200,
        response_time_ms=100.0,
        user_id="fresh",
    )


async def counted(http: httpx.AsyncClient, day: str) -> int:
    """The probe day's total_requests, as the gateway answers it."""
    response = await http.get("/api/v1/usage/stats", params={"date": day})
    response.raise_for_status()
    return _stats(response.content).total_requests


async def samples(
    http: httpx.AsyncClient,
    recorder_nc: NATS,
    recorder: UsageRecorder,
    day: datetime,
    count: int,
) -> tuple[list[float], int]:
    """`count` freshness samples, ms each, and how many probes the id memory took for retries
    (never counted: see below); TimeoutError saying where any other call stopped."""
    key = day.strftime("%Y-%m-%d")
    seen = await counted(http, key)
    retries = await taken_for_retries(recorder_nc)
    latencies = []
    lost = 0
    for n in range(count):
        started = time.perf_counter()
        recorder.record(probe_event(n, day))
        while await counted(http, key) <= seen:
            if time.perf_counter() - started > 10:
                # Every probe's id is new, but past the id memory's stated bound (a million
                # calls a day past its first 100,000; the stream here holds ~3M of the last
                # hour) its Bloom filter takes about one new id in 6,500 for a retry, and the
                # call is not counted (README, "Duplicates"). Such a probe is told by the
                # service's duplicates counter, reported, and left out; anything else stops.
                now = await taken_for_retries(recorder_nc)
                if now > retries:
                    retries = now
                    lost += 1
                    log(f"  probe {n}: taken for a retry by the usage service's id memory")
                    break
                raise TimeoutError(
                    "a recorded call was not visible in /usage/stats within 10 s: "
                    + await where_it_stopped(recorder_nc, recorder)
                )
            await asyncio.sleep(POLL_S)
        else:
            latencies.append((time.perf_counter() - started) * 1000)
            seen += 1
        # Samples apart, at no fixed phase to the load's 10 ms ticks or the 5 ms notices.
        await asyncio.sleep(random.uniform(0.005, 0.025))
    return latencies, lost


async def taken_for_retries(nc: NATS) -> int:
    """Calls the usage fold has not counted as already seen (its `duplicates` counter)."""
    answer = await nc.request(endpoint_subject("usage", "counters"), b"{}", timeout=5.0)
    return msgspec.json.decode(answer.data, type=UsageCounters).duplicates


async def where_it_stopped(nc: NATS, recorder: UsageRecorder) -> str:
    """Which step a call that never showed is at: the client (unacknowledged), the usage
    service (stored but not folded), or the gateway's answer (folded)."""
    last = (await nc.jetstream().stream_info("STOCKPILOT_USAGE")).state.last_seq
    status = await usage_status(nc, timeout=2.0)
    folded = "no answer" if status is None else f"{usage_seq(status)} (ready {status.ready})"
    return (
        f"client {recorder.pending} unacknowledged over {recorder.connection or 'nothing yet'}; "
        f"the usage stream's last sequence {last}, the usage service folded {folded}"
    )


async def run(report: Report, ctx: object) -> None:
    """p50/p99 of record → visible, idle and at LOAD_RATE events/s."""
    url: str = ctx.nats_url  # type: ignore[attr-defined]
    runs: int = ctx.runs  # type: ignore[attr-defined]
    workdir: Path = ctx.workdir  # type: ignore[attr-defined]
    quick: bool = ctx.quick  # type: ignore[attr-defined]
    count = 50 if quick else 200
    day = (datetime.now(UTC) - timedelta(days=PROBE_DAYS)).replace(hour=12, minute=0, second=0)
    with running_stack(url, workdir / "freshness", ("usage", "gateway")) as stack:
        nc = await nats.connect(url)
        recorder = UsageRecorder(nc)
        recorder.start()
        async with httpx.AsyncClient(base_url=stack.base_url, trust_env=False) as http:
            await _until_serving(http)
            await samples(http, nc, recorder, day, 3)  # warm-up: the client's bare connection
            for loaded in (False, True):
                label = f"at {LOAD_RATE:,} events/s" if loaded else "idle"
                p50, p99, rates = [], [], []
                lost = 0
                for i in range(runs):
                    if loaded:
                        with background_load(url, LOAD_RATE) as summary:
                            values, missed = await samples(http, nc, recorder, day, count)
                        rates.append(summary[0].rate if summary else 0.0)
                    else:
                        values, missed = await samples(http, nc, recorder, day, count)
                    lost += missed
                    p50.append(percentile(values, 50))
                    p99.append(percentile(values, 99))
                    log(
                        f"  freshness {label} run {i + 1}/{runs}: p50 {p50[-1]:.1f} ms, "
                        f"p99 {p99[-1]:.1f} ms, max {max(values):.1f} ms ({count} samples)"
                    )
                load_note = (
                    f"; the load process acknowledged {statistics.median(rates):,.0f} events/s "
                    "(median of the runs)"
                    if loaded
                    else ""
                )
                report.results.extend(
                    latency_results(
                        f"freshness {label}: usage client record → counted in GET "
                        "/api/v1/usage/stats (gateway)",
                        p50,
                        p99,
                        50.0,
                        250.0,
                        f"{count} samples a run, one at a time; polled every ~{POLL_S * 1000:g} ms "
                        f"plus a round trip{load_note}{lost_note(lost)}",
                    )
                )
        await recorder.close()
        await nc.close()


def lost_note(lost: int) -> str:
    """The row's word on probes left out (not counted within 10 s while the fold's duplicates
    counter grew: taken for retries by the id memory past its stated bound)."""
    if not lost:
        return ""
    return (
        f"; {lost} probe{'s' if lost > 1 else ''} left out: not counted within 10 s while the "
        "usage fold's duplicates counter grew (new ids taken for retries by its id memory, "
        "~3M ids of the last hour here, past the README's bound)"
    )


async def _until_serving(http: httpx.AsyncClient, timeout: float = 600) -> None:
    # After `usage_stream` the shared stream holds millions of events: the usage service may
    # still be restoring its snapshot and folding the tail (503 meanwhile).
    deadline = time.monotonic() + timeout
    while True:
        try:
            if (await http.get("/api/v1/usage/stats")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("the gateway did not serve /api/v1/usage/stats")
        await asyncio.sleep(0.1)
