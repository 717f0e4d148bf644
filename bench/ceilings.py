"""Ceilings measured in the same run as the figures: what nats-py and Litestar can do bare."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import nats
from nats.js import api as js_api

from bench.harness import Report, Result, log, process, repeat, serve_bare_route, wrk
from services.usage.contract import UsageRecorded
from shared.publish import encode_event

SUBJECT = "bench.raw.usage"


def sample_usage(i: int, prefix: str = "req") -> UsageRecorded:
    """A usage event of realistic size (what the usage benchmarks publish)."""
    return UsageRecorded(
        id=f"{prefix}-{i:09d}",
        occurred_at=datetime(2026, 11, 26, 9, 0, tzinfo=UTC),
        request_id=f"{prefix}-{i:09d}",
        model=("gpt-4o-mini", "gpt-4o", "o3-mini")[i % 3],
        endpoint=("/api/v1/analysis", "/api/v1/chat", "/api/v1/report")[i % 3],
        prompt_tokens=812 + i % 100,
        completion_tokens=164 + i % 50,
        cached_tokens=0,
        status_code=200 if i % 20 else 500,
        error_code=None if i % 20 else "server_error",
        response_time_ms=1432.5 + i % 1000,
        user_id=f"u-{i % 500}",
    )


def sample_event(i: int) -> bytes:
    """`sample_usage(i)` as the usage client sends it (the same bytes)."""
    return encode_event(sample_usage(i))


async def _fresh_stream(js: object, name: str, subject: str = SUBJECT, replicas: int = 1) -> None:
    try:
        await js.delete_stream(name)  # type: ignore[attr-defined]
    except Exception:
        pass
    await js.add_stream(  # type: ignore[attr-defined]
        js_api.StreamConfig(
            name=name,
            subjects=[subject],
            storage=js_api.StorageType.FILE,
            duplicate_window=1200,
            num_replicas=replicas,
        )
    )


async def raw_publish(url: str, count: int, payloads: list[bytes], replicas: int = 1) -> float:
    """JetStream publish_async with Nats-Msg-Id, the library's own in-flight limit, into a
    stream of `replicas` (`url`: a comma-separated list for a cluster): msgs/s."""
    nc = await nats.connect(url.split(","))
    js = nc.jetstream()
    await _fresh_stream(js, "BENCH_RAW", replicas=replicas)
    started = time.perf_counter()
    for i in range(count):
        await js.publish_async(SUBJECT, payloads[i], headers={"Nats-Msg-Id": f"r{i}"})
    await js.publish_async_completed()
    elapsed = time.perf_counter() - started
    await nc.close()
    return count / elapsed


async def raw_read(url: str, count: int, subject: str = SUBJECT) -> float:
    """Ordered push consumer with a callback over `count` messages on `subject` (by default
    the stream raw_publish filled; `url`: a comma-separated list for a cluster): msgs/s."""
    nc = await nats.connect(url.split(","))
    js = nc.jetstream()
    done = asyncio.Event()
    seen = 0

    async def on_message(msg: object) -> None:
        nonlocal seen
        seen += 1
        if seen >= count:
            done.set()

    started = time.perf_counter()
    sub = await js.subscribe(
        subject,
        cb=on_message,
        ordered_consumer=True,
        pending_msgs_limit=-1,
        pending_bytes_limit=256 * 1024 * 1024,
    )
    await asyncio.wait_for(done.wait(), timeout=300)
    elapsed = time.perf_counter() - started
    await sub.unsubscribe()
    await nc.close()
    return count / elapsed


async def request_reply(url: str, count: int) -> float:
    """Core NATS request/reply, 64 in flight: round trips/s."""
    nc = await nats.connect(url)

    async def echo(msg: object) -> None:
        await msg.respond(b"{}")  # type: ignore[attr-defined]

    await nc.subscribe("bench.echo", cb=echo)
    semaphore = asyncio.Semaphore(64)

    async def one() -> None:
        async with semaphore:
            await nc.request("bench.echo", b"{}", timeout=5)

    started = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    elapsed = time.perf_counter() - started
    await nc.close()
    return count / elapsed


async def js_round_trip(url: str, count: int) -> float:
    """JetStream publish awaiting each ack, one at a time: round trips/s."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    await _fresh_stream(js, "BENCH_RT", "bench.rt")
    started = time.perf_counter()
    for i in range(count):
        await js.publish("bench.rt", b"x" * 200, headers={"Nats-Msg-Id": f"rt{i}"})
    elapsed = time.perf_counter() - started
    await js.delete_stream("BENCH_RT")
    await nc.close()
    return count / elapsed


async def measure(report: Report, url: str, runs: int, events: int, http_seconds: int) -> None:
    """Fill report.ceilings."""
    payloads = [sample_event(i) for i in range(events)]
    log(f"ceiling: raw JetStream publish_async of {events:,} usage events")
    report.ceilings["publish"] = Result(
        "raw JetStream publish_async with Nats-Msg-Id (nats-py)",
        await repeat(runs, raw_publish, url, events, payloads),
        "events/s",
    )
    log(f"ceiling: raw ordered-consumer read of {events:,} events")
    report.ceilings["read"] = Result(
        "raw ordered push consumer read with a callback (nats-py)",
        await repeat(runs, raw_read, url, events),
        "events/s",
    )
    log("ceiling: NATS request/reply, 64 in flight")
    report.ceilings["reqrep"] = Result(
        "core NATS request/reply, 64 in flight",
        await repeat(runs, request_reply, url, 20_000),
        "round trips/s",
    )
    log("ceiling: JetStream publish awaiting each ack")
    report.ceilings["js_rt"] = Result(
        "JetStream publish awaiting its ack, one at a time",
        await repeat(runs, js_round_trip, url, 3_000),
        "round trips/s",
    )
    command, port = serve_bare_route()
    rps, p50, p99 = [], [], []
    with process(command, {}, port, name="bare"):
        wrk(f"http://127.0.0.1:{port}/bare", seconds=2)  # warm-up
        for i in range(runs):
            result = wrk(f"http://127.0.0.1:{port}/bare", seconds=http_seconds)
            log(f"  bare route run {i + 1}/{runs}: {result.rps:,.0f} req/s, p99 {result.p99_ms} ms")
            rps.append(result.rps)
            p50.append(result.p50_ms)
            p99.append(result.p99_ms)
    report.ceilings["bare_rps"] = Result(
        "bare Litestar route, same-size msgspec struct, uvicorn 1 worker, 64 connections",
        rps,
        "req/s",
    )
    report.ceilings["bare_p50"] = Result(
        "bare route p50 latency", p50, "ms", higher_is_better=False
    )
    report.ceilings["bare_p99"] = Result(
        "bare route p99 latency", p99, "ms", higher_is_better=False
    )
