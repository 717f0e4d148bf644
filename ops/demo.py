"""`stockpilot demo`: feed realistic synthetic traffic into a running stack.

Why one module of over 300 lines: it is one command's script, read top to bottom (the
synthetic traffic, the batch runs, the fake external APIs, then the command that sets them
going together); the parts serve only this command (and its tests), so splitting it would
spread one scenario across files without giving any piece a second user.

What it publishes is exactly what StockPilot AI's own processes would (contract §4), so the
dashboard, the alerts and the hooks react as they would in production:

- a backfill of LLM calls over the last 30 days (across models and endpoints, with a few
  percent of errors), then live calls with a rate-limit incident that trips the error-rate
  alert — `usage.recorded` events with `Nats-Msg-Id`;
- batch-job history for the last day, then live executions through the batch worker client
  (`services.batch.client.batch_job`, real locks and heartbeats), one of which fails, and one
  lock taken by a "crashed worker" that is never released, so it expires;
- three external APIs served on loopback (quotes: fast, news: slow, fx: flapping) for the
  health service to probe: the demo prints the STOCKPILOT_EXTERNAL_APIS value to use.

Progress goes to stderr; the run is bounded by --duration and Ctrl-C stops it cleanly.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import random
import signal
import sys
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from ops import locate
from services.batch.client import LockHeldError, acquire_lock, batch_job
from services.batch.contract import BatchFinished, BatchProgress, BatchStarted
from services.usage.contract import SUBJECT_RECORDED, UsageRecorded
from shared.events import Event, utc_now
from shared.publish import publish_event
from shared.settings import CommonSettings, settings_or_exit

USAGE_SUBJECT = SUBJECT_RECORDED
DEFAULT_API_PORT = 18_080


# ----- synthetic LLM traffic (pure: everything comes from `rng` and the arguments) ----------


@dataclass(frozen=True)
class Route:
    """One StockPilot AI endpoint and the model it calls."""

    endpoint: str
    model: str
    weight: float
    prompt: tuple[int, int]  # typical prompt tokens (low, high)
    completion: tuple[int, int]
    latency_ms: float  # median
    # Priced by the demo itself (the service's table may not list embeddings); None lets
    # the usage service price the call from its table.
    usd_per_million: float | None = None


ROUTES: tuple[Route, ...] = (
    Route("/api/v1/chat", "gpt-4o-mini", 0.42, (600, 2400), (120, 600), 1100.0),
    Route("/api/v1/analysis", "gpt-4o", 0.22, (2500, 6500), (400, 1400), 4200.0),
    Route("/api/v1/news/summary", "gpt-4o-mini", 0.14, (1800, 5200), (150, 400), 1600.0),
    Route("/api/v1/reports/daily", "gpt-4o-2024-08-06", 0.06, (5000, 12000), (900, 2200), 9000.0),
    Route("/api/v1/embeddings", "text-embedding-3-small", 0.16, (200, 1200), (0, 0), 160.0, 0.02),
)

# (status, error_code, weight, latency multiplier)
ERRORS: tuple[tuple[int, str, float, float], ...] = (
    (429, "rate_limit_exceeded", 0.5, 0.05),
    (500, "server_error", 0.18, 0.6),
    (504, "timeout", 0.2, 8.0),
    (400, "context_length_exceeded", 0.12, 0.04),
)


def usage_event(
    rng: random.Random, at: datetime, *, error_rate: float = 0.035, event_id: str | None = None
) -> UsageRecorded:
    """One realistic LLM call at `at`; fails with probability `error_rate`."""
    route = rng.choices(ROUTES, weights=[r.weight for r in ROUTES])[0]
    prompt = rng.randint(*route.prompt)
    completion = rng.randint(*route.completion)
    cached = int(prompt * rng.choice((0.0, 0.0, 0.25, 0.5))) if route.completion[1] else 0
    latency = route.latency_ms * math.exp(rng.gauss(0.0, 0.35))
    status, code = 200, None
    if rng.random() < error_rate:
        status, code, _, factor = rng.choices(ERRORS, weights=[e[2] for e in ERRORS])[0]
        latency *= factor
        completion = 0
    request_id = event_id or f"req-{uuid.UUID(int=rng.getrandbits(128)).hex[:16]}"
    cost = None
    if route.usd_per_million is not None:
        cost = round(prompt * route.usd_per_million / 1e6, 8)
    return UsageRecorded(
        id=request_id,
        occurred_at=at,
        request_id=request_id,
        model=route.model,
        endpoint=route.endpoint,
        prompt_tokens=prompt,
        completion_tokens=completion,
        cached_tokens=cached,
        cost_usd=cost,
        status_code=status,
        error_code=code,
        response_time_ms=round(latency, 1),
        user_id=f"u-{rng.randint(1, 240)}",
    )


def _hour_weight(hour: int) -> float:
    """Traffic by local hour: Korean market hours busiest, nights quiet."""
    if 8 <= hour < 16:
        return 1.0
    if 16 <= hour < 23:
        return 0.55
    return 0.12


def usage_history(
    rng: random.Random,
    now: datetime,
    zone: ZoneInfo,
    *,
    days: int = 30,
    calls_per_day: int = 110,
    quiet_minutes: int = 10,
) -> Iterator[UsageRecorded]:
    """Calls over the last `days` days up to `quiet_minutes` before now (deterministic ids).

    Weekends are quieter and traffic grows a little over the month. Nothing falls in the last
    minutes, so a backfill never trips the rolling error-rate alert by itself.
    """
    local_now = now.astimezone(zone)
    end = now - timedelta(minutes=quiet_minutes)
    for back in range(days - 1, -1, -1):
        day = (local_now - timedelta(days=back)).date()
        growth = 1.0 + 0.4 * (days - back) / max(days, 1)
        weekend = 0.45 if day.weekday() >= 5 else 1.0
        count = int(calls_per_day * growth * weekend * rng.uniform(0.8, 1.2))
        start = datetime(day.year, day.month, day.day, tzinfo=zone)
        hours = [_hour_weight(h) for h in range(24)]
        for i in range(count):
            hour = rng.choices(range(24), weights=hours)[0]
            at = start + timedelta(hours=hour, seconds=rng.uniform(0, 3600))
            if at >= end:
                continue
            yield usage_event(rng, at, event_id=f"demo-{day.isoformat()}-{i}")


# ----- batch history (direct contract events) and live runs (the worker client) --------------

JOBS: dict[str, tuple[int, float]] = {
    # job id: (items per run, items per second)
    "price-sync": (4800, 620.0),
    "news-ingest": (900, 75.0),
    "report-generation": (60, 1.6),
    "portfolio-rebalance": (1200, 140.0),
}
STUCK_JOB = "portfolio-rebalance"
FAILING_JOB = "report-generation"
FAILURE = "request to gpt-4o timed out after 3 retries (60.0s each)"


def _run_subject(job_id: str) -> str:
    return f"stockpilot.batch.run.{job_id}"


def batch_history(rng: random.Random, now: datetime, *, hours: int = 20) -> list[tuple[str, Event]]:
    """Finished executions over the last `hours` (all succeeded; the live phase fails one)."""
    out: list[tuple[str, Event]] = []
    every = {"price-sync": 2, "news-ingest": 3, "report-generation": 6, "portfolio-rebalance": 8}
    for job_id, step in every.items():
        items, speed = JOBS[job_id]
        for back in range(hours, 0, -step):
            started = now - timedelta(hours=back, minutes=rng.uniform(0, 40))
            done = int(items * rng.uniform(0.9, 1.1))
            duration = done / (speed * rng.uniform(0.8, 1.15))
            execution_id = f"demo-{job_id}-{started:%Y%m%d%H%M}"
            subject = _run_subject(job_id)
            out.append(
                (
                    subject,
                    BatchStarted(
                        id=f"{execution_id}.started",
                        occurred_at=started,
                        execution_id=execution_id,
                        job_id=job_id,
                        host=f"batch-{rng.randint(1, 3)}",
                        pid=rng.randint(2000, 60000),
                        items_total=done,
                    ),
                )
            )
            out.append(
                (
                    subject,
                    BatchFinished(
                        id=f"{execution_id}.finished",
                        occurred_at=started + timedelta(seconds=duration),
                        execution_id=execution_id,
                        job_id=job_id,
                        status="succeeded",
                        items_processed=done,
                        duration_s=round(duration, 2),
                        throughput_per_s=round(done / duration, 2),
                        peak_memory_mb=round(rng.uniform(180, 900), 1),
                        avg_cpu_percent=round(rng.uniform(15, 85), 1),
                    ),
                )
            )
    out.sort(key=lambda pair: pair[1].occurred_at)
    return out


async def publish_all(
    js: JetStreamContext, events: Sequence[tuple[str, Event]], concurrency: int = 256
) -> int:
    """Publish (subject, event) pairs, `concurrency` in flight at a time; how many were sent."""
    for start in range(0, len(events), concurrency):
        chunk = events[start : start + concurrency]
        await asyncio.gather(*(publish_event(js, s, e) for s, e in chunk))
    return len(events)


async def stuck_lock(nc: NATS, *, ttl_s: float, job_id: str = STUCK_JOB) -> str:
    """A worker takes `job_id`'s lock, starts a run and "crashes": the lock expires unreleased.

    Its run announced a heartbeat interval of at least a minute, longer than the lock's
    lifetime: the lock expires first (`batch.lock_expired`), and only three silent intervals
    later is the run lost and its lock released (the lease, issue #18). With a shorter
    interval the lease would free the lock before it could expire."""
    js = nc.jetstream()
    execution_id = f"demo-stuck-{uuid.uuid4().hex[:10]}"
    owner = "batch-2:4411"
    lock = await acquire_lock(js, job_id, owner=owner, execution_id=execution_id, ttl_s=ttl_s)
    now = utc_now()
    items, _ = JOBS[job_id]
    await publish_event(
        js,
        _run_subject(job_id),
        BatchStarted(
            id=f"{execution_id}.started",
            occurred_at=now,
            execution_id=execution_id,
            job_id=job_id,
            host="batch-2",
            pid=4411,
            items_total=items,
            heartbeat_interval_s=max(60.0, ttl_s),
            fencing_token=lock.fencing_token,
        ),
    )
    await publish_event(
        js,
        _run_subject(job_id),
        BatchProgress(
            id=f"{execution_id}.progress.1",
            occurred_at=now,
            execution_id=execution_id,
            job_id=job_id,
            items_processed=items // 3,
            items_total=items,
            memory_mb=1480.0,
            cpu_percent=97.0,
        ),
    )
    return execution_id


class OpenAITimeoutError(RuntimeError):
    """The failure the demo injects into one batch run (as a report job would see it)."""


async def live_run(
    nc: NATS,
    job_id: str,
    *,
    fail: bool = False,
    seconds: float = 8.0,
    heartbeat_s: float = 2.0,
    stop: asyncio.Event | None = None,
) -> str:
    """One execution of `job_id` through the worker client; `fail` makes it fail half-way."""
    items, _ = JOBS[job_id]
    steps = 20
    try:
        async with batch_job(
            nc, job_id, items_total=items, ttl_s=600, heartbeat_interval_s=heartbeat_s
        ) as run:
            for step in range(steps):
                if stop is not None and stop.is_set():
                    raise asyncio.CancelledError
                if fail and step == steps // 2:
                    raise OpenAITimeoutError(FAILURE)
                await asyncio.sleep(seconds / steps)
                run.advance(items // steps)
            if job_id == "news-ingest":
                run.warn("3 articles skipped: feed returned HTTP 404")
            return "succeeded"
    except OpenAITimeoutError:
        return "failed"
    except LockHeldError:
        return "skipped (lock held)"
    except asyncio.CancelledError:
        return "cancelled"


# ----- external APIs on loopback ------------------------------------------------------------


@dataclass
class FakeApi:
    """One loopback HTTP endpoint with a personality."""

    name: str
    delay_s: float = 0.0
    # Seconds up, seconds down, repeating (0: always up).
    flap: tuple[float, float] = (0.0, 0.0)
    # JSON answered with 200 (default: a small status object).
    body: dict[str, Any] | None = None
    port: int = 0
    requests: int = 0
    started: float = field(default_factory=time.monotonic)

    def status(self) -> int:
        up, down = self.flap
        if not down:
            return 200
        phase = (time.monotonic() - self.started) % (up + down)
        return 200 if phase < up else 503


def demo_apis() -> list[FakeApi]:
    """quotes (fast), news (slow) and fx (down 25 s of every 75)."""
    return [
        FakeApi("quotes", delay_s=0.02),
        FakeApi("news", delay_s=0.45),
        FakeApi("fx", delay_s=0.05, flap=(50.0, 25.0)),
    ]


def fake_openai() -> FakeApi:
    """An OpenAI stand-in answering `GET /v1/models`, for an offline demo."""
    models = ["gpt-4o", "gpt-4o-mini", "gpt-4o-2024-08-06", "text-embedding-3-small"]
    return FakeApi(
        "openai",
        delay_s=0.12,
        body={"object": "list", "data": [{"id": m, "object": "model"} for m in models]},
    )


class ExternalApis:
    """HTTP endpoints on loopback (by default the demo's three), each on its own port."""

    def __init__(
        self, first_port: int = DEFAULT_API_PORT, apis: list[FakeApi] | None = None
    ) -> None:
        self.apis = apis if apis is not None else demo_apis()
        self.first_port = first_port
        self._servers: list[asyncio.Server] = []
        self._connections: dict[asyncio.StreamWriter, asyncio.Task[Any]] = {}

    async def __aenter__(self) -> ExternalApis:
        try:
            for i, api in enumerate(self.apis):
                port = self.first_port + i if self.first_port else 0
                server = await asyncio.start_server(self._handler(api), "127.0.0.1", port)
                api.port = int(server.sockets[0].getsockname()[1])
                self._servers.append(server)
        except BaseException:
            await self.__aexit__()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        for server in self._servers:
            server.close()
        # Close kept-alive connections (a prober's pool) so their handlers end on EOF
        # instead of being cancelled by the event loop's shutdown.
        handlers = list(self._connections.values())
        for writer in list(self._connections):
            writer.close()
        if handlers:
            await asyncio.wait(handlers, timeout=2)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), timeout=2)

    def _handler(self, api: FakeApi) -> Any:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            if task is not None:
                self._connections[writer] = task
            try:
                while True:
                    line = await asyncio.wait_for(reader.readline(), timeout=10)
                    if not line:
                        return
                    while (await asyncio.wait_for(reader.readline(), timeout=10)) not in (
                        b"\r\n",
                        b"\n",
                        b"",
                    ):
                        pass
                    api.requests += 1
                    await asyncio.sleep(api.delay_s)
                    status = api.status()
                    answer = api.body if api.body is not None and status == 200 else None
                    body = json.dumps(answer or {"api": api.name, "ok": status == 200}).encode()
                    reason = "OK" if status == 200 else "Service Unavailable"
                    writer.write(
                        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                        f"Content-Length: {len(body)}\r\n\r\n".encode()
                        + body
                    )
                    await writer.drain()
            except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
                return
            finally:
                self._connections.pop(writer, None)
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()

        return handle

    def setting(self) -> str:
        """The STOCKPILOT_EXTERNAL_APIS value that points the health service at these APIs."""
        return json.dumps(
            [
                {"name": a.name, "url": f"http://127.0.0.1:{a.port}/v1/ping", "timeout_s": 2.0}
                for a in self.apis
                if a.name != "openai"
            ]
        )

    def openai_base_url(self) -> str | None:
        """OPENAI_BASE_URL of the OpenAI stand-in, when one is served."""
        found = [a for a in self.apis if a.name == "openai"]
        return f"http://127.0.0.1:{found[0].port}/v1" if found else None


# ----- the command ---------------------------------------------------------------------------


@dataclass
class Counters:
    """What the demo has sent so far (for the progress lines)."""

    calls: int = 0
    failed: int = 0
    runs: dict[str, int] = field(default_factory=dict)


def _say(message: str) -> None:
    print(f"demo: {message}", file=sys.stderr, flush=True)


async def _live_calls(
    js: JetStreamContext,
    rng: random.Random,
    rate: float,
    duration: float,
    stop: asyncio.Event,
    counters: Counters,
) -> None:
    """LLM calls at about `rate` per second; a rate-limit incident from 15 % to 50 % of the run."""
    begin = time.monotonic()
    while not stop.is_set():
        elapsed = time.monotonic() - begin
        if elapsed >= duration:
            return
        incident = 0.15 * duration <= elapsed < 0.5 * duration
        event = usage_event(rng, utc_now(), error_rate=0.6 if incident else 0.035)
        await publish_event(js, USAGE_SUBJECT, event)
        counters.calls += 1
        counters.failed += event.status_code >= 400
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=rng.expovariate(rate))


async def _live_batch(nc: NATS, duration: float, stop: asyncio.Event, counters: Counters) -> None:
    """Executions back to back: price-sync, report-generation (fails), news-ingest, …"""
    order = ["price-sync", FAILING_JOB, "news-ingest", "price-sync", FAILING_JOB]
    begin = time.monotonic()
    for i in range(1000):
        left = duration - (time.monotonic() - begin)
        if stop.is_set() or left < 4:
            return
        job = order[i % len(order)]
        outcome = await live_run(nc, job, fail=(i == 1), seconds=min(10.0, left - 2), stop=stop)
        counters.runs[outcome] = counters.runs.get(outcome, 0) + 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=3)


async def run_demo(settings: CommonSettings, args: argparse.Namespace) -> int:
    """Seed history, then feed live traffic until --duration or a signal."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    rng = random.Random(args.seed)
    async with contextlib.AsyncExitStack() as stack:
        # Only the stack's own NATS, checked to hold the StockPilot streams: the demo never
        # creates streams (only `stockpilot up` and the services do) nor publishes elsewhere.
        try:
            nc = await stack.enter_async_context(locate.connected(settings, "stockpilot-demo"))
        except locate.StackError as exc:
            _say(str(exc))
            return 2
        # Draining is the end of the run, not an outage worth a "reconnecting" warning.
        stack.callback(logging.getLogger("stockpilot.bus").setLevel, logging.ERROR)
        js = nc.jetstream()
        if args.api_port >= 0:
            try:
                apis = await stack.enter_async_context(
                    ExternalApis(args.api_port, [*demo_apis(), fake_openai()])
                )
            except OSError as exc:
                _say(
                    f"cannot serve the external APIs on ports {args.api_port}-"
                    f"{args.api_port + 3}: {exc.strerror or exc}; "
                    "pick others with --api-port (0: free ports, -1: none)"
                )
                return 1
            print(f"STOCKPILOT_EXTERNAL_APIS='{apis.setting()}'", flush=True)
            print(f"OPENAI_BASE_URL={apis.openai_base_url()} OPENAI_API_KEY=sk-demo", flush=True)
            _say(
                "serving on loopback: "
                + ", ".join(f"{a.name}=:{a.port}" for a in apis.apis)
                + "; start the stack with the STOCKPILOT_EXTERNAL_APIS above for the health "
                "service to probe them (and the OPENAI_* values for an offline OpenAI stand-in)"
            )
        now = utc_now()
        if args.history_days:
            history = [
                (USAGE_SUBJECT, e)
                for e in usage_history(rng, now, settings.zone, days=args.history_days)
            ]
            _say(f"backfilling {len(history)} LLM calls over {args.history_days} days …")
            await publish_all(js, history)
            sent = await publish_all(js, batch_history(rng, now))
            _say(f"backfilled {sent} batch events over the last day")
        try:
            await stuck_lock(nc, ttl_s=args.stuck_lock_ttl)
            _say(
                f"{STUCK_JOB}: a worker took the lock and went silent; "
                f"it expires in {args.stuck_lock_ttl:.0f}s"
            )
        except LockHeldError as exc:
            _say(f"{STUCK_JOB}: lock already held ({exc}); no new stuck lock")
        if stop.is_set():
            _say("interrupted; stopped cleanly")
            return 0
        _say(
            f"live for {args.duration:g}s: about {args.rate:g} LLM calls/s "
            "(a rate-limit incident from 15 % to 50 % of the run) and batch runs"
        )
        counters = Counters()
        tasks = [
            asyncio.create_task(_live_calls(js, rng, args.rate, args.duration, stop, counters)),
            asyncio.create_task(_live_batch(nc, args.duration, stop, counters)),
        ]
        begin = time.monotonic()
        while not all(t.done() for t in tasks):
            await asyncio.wait(tasks, timeout=5)
            left = max(0.0, args.duration - (time.monotonic() - begin))
            runs = ", ".join(f"{n} {k}" for k, n in sorted(counters.runs.items())) or "none yet"
            _say(
                f"{counters.calls} LLM calls ({counters.failed} failed), batch runs: {runs}; "
                + ("stopping" if stop.is_set() else f"{left:.0f}s left")
            )
        for task in tasks:
            task.result()
        _say("interrupted; stopped cleanly" if stop.is_set() else "done")
    return 0


def _demo(args: argparse.Namespace) -> int:
    settings = settings_or_exit(CommonSettings)
    try:
        return asyncio.run(run_demo(settings, args))
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return 130


def register(subparsers: Any) -> None:
    """Add `demo`."""
    demo = subparsers.add_parser(
        "demo",
        help="feed realistic synthetic traffic into a running stack",
        description=(
            "Publish synthetic StockPilot AI traffic to the running stack's NATS "
            "(STOCKPILOT_NATS_URL, or the embedded server recorded under "
            "$STOCKPILOT_DATA_DIR; it must already hold the StockPilot streams, which the "
            "demo never creates): "
            "30 days of LLM calls, then live calls with a rate-limit incident, batch runs "
            "(one fails) and a job lock left to expire. Also serves three external APIs on "
            "loopback and prints the STOCKPILOT_EXTERNAL_APIS value that points the health "
            "service at them. Progress goes to stderr; Ctrl-C stops cleanly."
        ),
    )
    demo.add_argument(
        "--duration", type=float, default=120.0, metavar="S", help="live phase length (120)"
    )
    demo.add_argument(
        "--rate", type=float, default=3.0, metavar="N", help="live LLM calls per second (3)"
    )
    demo.add_argument(
        "--history-days",
        type=int,
        default=30,
        metavar="N",
        help="days of LLM-call history to backfill first; 0 skips the backfill (30)",
    )
    demo.add_argument(
        "--api-port",
        type=int,
        default=DEFAULT_API_PORT,
        metavar="PORT",
        help=(
            f"first of four loopback ports for the external APIs and the OpenAI stand-in "
            f"({DEFAULT_API_PORT}); "
            "0 picks free ports, -1 serves none"
        ),
    )
    demo.add_argument(
        "--stuck-lock-ttl",
        type=float,
        default=30.0,
        metavar="S",
        help="lifetime of the lock the silent worker leaves behind (30)",
    )
    demo.add_argument("--seed", type=int, default=None, help="random seed (repeatable traffic)")
    demo.set_defaults(handler=_demo)
