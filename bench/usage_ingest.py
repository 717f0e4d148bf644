"""Usage: the fold in-process, ingest through the service's `ingest` endpoint (1,000-record
batches, each one pipelined window through the transport seam + wait until folded; the HTTP
route in front of it: bench.http_ingest), and the service's start-up catch-up, each next to
the raw JetStream ceiling of the same run."""

from __future__ import annotations

import contextlib
import time
from datetime import timedelta
from pathlib import Path

import msgspec
import nats
import uvloop

from bench.ceilings import raw_read
from bench.harness import Report, Result, log, repeat
from services.usage.contract import SUBJECT_RECORDED, IngestAnswer, IngestParams, UsageRecorded
from services.usage.service import build, usage_projection
from services.usage.settings import UsageSettings
from shared.clock import SYSTEM_CLOCK
from shared.streams import provision, snapshot_bucket
from tests.harness import running_service

# The events span the week before the run's last eight days began: in the past (the ingest
# refuses a record dated after it was received) and recent (within every retention).
T0 = (SYSTEM_CLOCK.now() - timedelta(days=8)).replace(hour=0, minute=0, second=0, microsecond=0)
MODELS = ("gpt-4o", "gpt-4o-mini", "gpt-4.1-nano", "o4-mini", "gpt-5-mini")
_encode = msgspec.json.Encoder().encode


def events(count: int, prefix: str = "bench") -> list[UsageRecorded]:
    """`count` calls over a week, five models, a few endpoints, users and failures."""
    return [
        UsageRecorded(
            id=f"{prefix}-{i:09d}",
            request_id=f"{prefix}-{i:09d}",
            occurred_at=T0 + timedelta(seconds=i * 7 % (7 * 86_400)),
            model=MODELS[i % 5],
            endpoint=f"/api/v1/e{i % 7}",
            prompt_tokens=500 + i % 1000,
            completion_tokens=100 + i % 300,
            cached_tokens=i % 200,
            status_code=500 if i % 23 == 0 else 200,
            error_code="server_error" if i % 23 == 0 else None,
            response_time_ms=200.0 + (i * 37) % 5000,
            user_id=f"u{i % 50}",
        )
        for i in range(count)
    ]


def fold_rate(stored: list[bytes], settings: UsageSettings) -> float:
    """Decode + apply (with the alerts it returns) in-process: events/s."""
    projection = usage_projection(settings)
    started = time.perf_counter()
    for seq, data in enumerate(stored, start=1):
        projection.fold(seq, data)
    return len(stored) / (time.perf_counter() - started)


async def ingest_rate(url: str, settings: UsageSettings, count: int, run: int) -> float:
    """Records/s through `stockpilot.svc.usage.ingest`, 1,000 per request, one at a time."""
    records = [msgspec.to_builtins(e) for e in events(count, prefix=f"ingest{run}")]
    # uvloop, as the service's own process runs it (`service_main`).
    async with running_service(
        build(settings), settings, ready_timeout=600, loop_factory=uvloop.new_event_loop
    ):
        nc = await nats.connect(url)
        started = time.perf_counter()
        accepted = 0
        for start in range(0, count, 1000):
            params = IngestParams(
                records=msgspec.Raw(_encode(records[start : start + 1000])),
                received_at=SYSTEM_CLOCK.now(),
            )
            msg = await nc.request("stockpilot.svc.usage.ingest", _encode(params), timeout=30)
            accepted += msgspec.json.decode(msg.data, type=IngestAnswer).accepted
        elapsed = time.perf_counter() - started
        await nc.close()
    if accepted != count:
        raise RuntimeError(f"ingest accepted {accepted} of {count}")
    return count / elapsed


async def stream_messages(url: str, subject: str | None = None) -> int:
    """How many events the usage stream holds (on `subject` only, when given)."""
    nc = await nats.connect(url)
    info = await nc.jetstream().stream_info("STOCKPILOT_USAGE", subjects_filter=subject)
    await nc.close()
    if subject is None:
        return int(info.state.messages)
    return int((info.state.subjects or {}).get(subject, 0))


async def catch_up(url: str, settings: UsageSettings, stored: int) -> float:
    """The usage service started on the stream of `stored` events, no snapshot: events/s."""
    nc = await nats.connect(url)
    obs = await nc.jetstream().object_store(snapshot_bucket("usage"))
    for name in ("usage.usage", "usage.alert-history", "usage.usage-alert-ledger"):
        with contextlib.suppress(Exception):
            await obs.delete(name)
    await nc.close()
    started = time.perf_counter()
    # uvloop, as the service's own process runs it (`service_main`).
    async with running_service(
        build(settings), settings, ready_timeout=600, loop_factory=uvloop.new_event_loop
    ):
        elapsed = time.perf_counter() - started
    return stored / elapsed


async def run(report: Report, ctx: object) -> None:
    """Fold rate, ingest rate, catch-up rate."""
    url: str = ctx.nats_url  # type: ignore[attr-defined]
    runs: int = ctx.runs  # type: ignore[attr-defined]
    workdir: Path = ctx.workdir  # type: ignore[attr-defined]
    count = ctx.count  # type: ignore[attr-defined]
    settings = UsageSettings(
        nats_url=url,
        data_dir=str(workdir / "usage"),
        log_level="WARNING",
        tz="Asia/Seoul",
        snapshot_every_events=10_000_000,
        snapshot_every_s=3600,
    )

    stored = [_encode(e) for e in events(count(100_000))]
    log(f"usage: in-process fold of {len(stored):,} events")

    async def fold_once() -> float:
        return fold_rate(stored, settings)

    report.results.append(
        Result(
            "usage projection fold (decode + apply + react), in-process",
            await repeat(runs, fold_once),
            "events/s",
            ceiling="read",
        )
    )

    n = count(50_000)
    log(f"usage: ingest of {n:,} records through the service, 1,000 per request")
    run_no = iter(range(1_000_000))

    async def ingest_once() -> float:
        return await ingest_rate(url, settings, n, next(run_no))

    report.results.append(
        Result(
            "usage ingest endpoint: validate, publish as one pipelined window through the "
            "transport seam (accelerator) with Nats-Msg-Id, wait until folded",
            await repeat(runs, ingest_once),
            "records/s",
            ceiling="publish",
            note="service and load generator share one process and one event loop",
        )
    )

    nc = await nats.connect(url)
    js = nc.jetstream()
    await provision(js)
    for event in events(count(100_000), prefix="stored"):
        await js.publish_async(SUBJECT_RECORDED, _encode(event), headers={"Nats-Msg-Id": event.id})
    await js.publish_async_completed()
    await nc.close()
    log("usage: service catch-up over the stored stream, each next to a raw read of it")
    held = await stream_messages(url)  # the start-up runs read it, they add nothing
    # The raw read follows the calls' subject, which holds all but the service's price tables.
    calls = await stream_messages(url, SUBJECT_RECORDED)
    reads, starts = [], []
    for i in range(runs):
        reads.append(await raw_read(url, calls, SUBJECT_RECORDED))
        starts.append(await catch_up(url, settings, held))
        log(f"  run {i + 1}/{runs}: raw read {reads[-1]:,.0f}, start-up {starts[-1]:,.0f} events/s")
    report.ceilings["read_usage"] = Result(
        f"raw ordered push consumer read of the usage stream itself ({held:,} events; "
        "nats-py), just before each start-up run",
        reads,
        "events/s",
    )
    report.results.append(
        Result(
            f"usage service start-up fold of the stream (no snapshot), {held:,} events",
            starts,
            "events/s",
            ceiling="read_usage",
            target="≥ 0.7",
            min_ratio=0.7,
            note="includes connecting, provisioning and the micro service start; the service "
            "runs in its own thread and uvloop loop in the bench process",
        )
    )
