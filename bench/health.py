"""Health: GET /api/v1/health/comprehensive at 64 connections next to a bare Litestar route
serving the very same answer (same struct, same size); and the wall time of a fresh round
whose targets include one that accepts connections and never answers.

`python -m bench.health bare PORT FILE` is the bare route (FILE holds the answer's JSON).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx

from bench.harness import Report, Result, WrkResult, ensure_wrk, log, process
from services.health import probes
from services.health.contract import ComprehensiveHealth
from services.health.settings import HealthSettings
from shared.settings import load_settings
from tests.harness import free_port

HANG_TIMEOUT_S = 1.0
DATABASE_URL = os.environ.get(
    "STOCKPILOT_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("STOCKPILOT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


@contextlib.contextmanager
def silent_server() -> Iterator[int]:
    """A loopback server in its own thread that accepts connections and never answers."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    port = free_port()

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            await reader.read()
        writer.close()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        server = loop.run_until_complete(asyncio.start_server(swallow, "127.0.0.1", port))
        ready.set()
        loop.run_forever()
        server.close()
        loop.close()

    thread = threading.Thread(target=serve, name="silent-server", daemon=True)
    thread.start()
    ready.wait(5)
    try:
        yield port
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)


def health_env(silent_port: int) -> dict[str, str]:
    """Real PostgreSQL and Redis, one external API that answers and one that never does."""
    return {
        "STOCKPILOT_DATABASE_URL": DATABASE_URL,
        "STOCKPILOT_REDIS_URL": REDIS_URL,
        "STOCKPILOT_PROBE_TIMEOUT_S": str(HANG_TIMEOUT_S),
        "STOCKPILOT_EXTERNAL_APIS": json.dumps(
            [
                {"name": "mute", "url": f"http://127.0.0.1:{silent_port}/"},
                {"name": "closed", "url": f"http://127.0.0.1:{free_port()}/"},
            ]
        ),
    }


async def fresh_round(env: dict[str, str]) -> float:
    """Wall time of one round of every probe (in-process), one target hanging: ms."""
    settings = load_settings(HealthSettings, env)
    async with probes.new_http_client() as http:
        started = time.perf_counter()
        results = await probes.probe_all(settings, http)
        elapsed = (time.perf_counter() - started) * 1000
    mute = next(r for r in results if r.component == "external.mute")
    assert mute.status == "unhealthy", mute
    return elapsed


@contextlib.asynccontextmanager
async def health_stack(nats_url: str, workdir: Path, env: dict[str, str]) -> AsyncIterator[int]:
    """The health service and the gateway as processes; the gateway's port."""
    port = free_port()
    common = {
        "STOCKPILOT_NATS_URL": nats_url,
        "STOCKPILOT_DATA_DIR": str(workdir),
        "STOCKPILOT_HTTP_PORT": str(port),
        "STOCKPILOT_LOG_LEVEL": "WARNING",
    }
    with contextlib.ExitStack() as stack:
        stack.enter_context(
            process([sys.executable, "-m", "ops", "service", "health"], common | env, name="health")
        )
        stack.enter_context(
            process([sys.executable, "-m", "ops", "gateway"], common, port, name="gateway")
        )
        yield port


async def comprehensive_answer(base: str) -> bytes:
    """The gateway's answer once the first round is in (as the bare route will serve it)."""
    async with httpx.AsyncClient(base_url=base, trust_env=False) as client:
        deadline = time.monotonic() + 30
        while True:
            response = await client.get("/api/v1/health/comprehensive")
            if response.status_code == 200 and response.json()["checked_at"]:
                return response.content
            if time.monotonic() > deadline:
                raise RuntimeError(f"no health answer: {response.status_code} {response.text}")
            await asyncio.sleep(0.2)


_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0}
_PERCENTILE = re.compile(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", re.MULTILINE)


def wrk(url: str, seconds: int, connections: int = 64) -> WrkResult:
    """wrk's req/s and p50/p99, read from its Latency Distribution block only.

    (bench.harness.wrk's `50%\\s+(\\S+)` also matches a Req/Sec "+/- Stdev" such as 62.50 %,
    common in short one-thread runs, and then fails on the next word.)
    """
    out = subprocess.run(
        [ensure_wrk(), "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    _, _, block = out.partition("Latency Distribution")
    found = {p: float(v) * _UNIT_MS[u] for p, v, u in _PERCENTILE.findall(block)}
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    if rps is None or set(found) != {"50", "99"}:
        raise RuntimeError(f"cannot read wrk's output for {url}:\n{out}")
    return WrkResult(
        rps=float(rps.group(1)),
        p50_ms=found["50"],
        p99_ms=found["99"],
        non_2xx=int(bad.group(1)) if bad else 0,
    )


def load(url: str, runs: int, seconds: int, label: str) -> tuple[list[float], ...]:
    """wrk at 64 connections, `runs` times: (req/s, p50 ms, p99 ms)."""
    wrk(url, seconds=2)  # warm-up
    rps, p50, p99 = [], [], []
    for i in range(runs):
        result = wrk(url, seconds=seconds)
        log(f"  {label} run {i + 1}/{runs}: {result.rps:,.0f} req/s, p99 {result.p99_ms} ms")
        if result.non_2xx:
            raise RuntimeError(f"{label}: {result.non_2xx} non-2xx answers")
        rps.append(result.rps)
        p50.append(result.p50_ms)
        p99.append(result.p99_ms)
    return rps, p50, p99


async def run(report: Report, ctx: object) -> None:
    """Fresh-round wall time; comprehensive route next to the same answer from a bare route."""
    nats_url: str = ctx.nats_url  # type: ignore[attr-defined]
    runs: int = ctx.runs  # type: ignore[attr-defined]
    seconds: int = ctx.http_seconds  # type: ignore[attr-defined]
    workdir: Path = ctx.workdir / "health"  # type: ignore[attr-defined]
    os.makedirs(workdir, exist_ok=True)
    with silent_server() as silent_port:
        env = health_env(silent_port)
        rounds = [await fresh_round(env) for _ in range(runs)]
        log(f"  fresh round with a hanging target: {', '.join(f'{r:.0f}' for r in rounds)} ms")
        report.results.append(
            Result(
                f"health round, one target hanging ({HANG_TIMEOUT_S:g} s timeout)",
                rounds,
                "ms",
                higher_is_better=False,
                target=f"≤ {HANG_TIMEOUT_S * 1000 + 100:.0f} ms (timeout + 100 ms)",
                note="PostgreSQL, Redis, a closed port and a silent port, all at once",
            )
        )
        async with health_stack(nats_url, workdir, env) as port:
            base = f"http://127.0.0.1:{port}"
            answer = await comprehensive_answer(base)
            answer_file = workdir / "comprehensive.json"
            await asyncio.to_thread(answer_file.write_bytes, answer)
            route_rps, route_p50, route_p99 = load(
                base + "/api/v1/health/comprehensive", runs, seconds, "comprehensive"
            )
            # The same gateway's cheapest route (no NATS, tiny body): what its middleware
            # (Prometheus metrics, guards) costs before a health answer is even looked at.
            live_rps, _, _ = load(base + "/api/v1/health/live", runs, seconds, "gateway live")
    bare_port = free_port()
    command = [sys.executable, "-m", "bench.health", "bare", str(bare_port), str(answer_file)]
    with process(command, {}, bare_port, name="health-bare"):
        bare_rps, bare_p50, bare_p99 = load(
            f"http://127.0.0.1:{bare_port}/bare", runs, seconds, "bare comprehensive"
        )
    size = f"{len(answer):,} bytes"
    report.ceilings["health_bare_rps"] = Result(
        f"bare Litestar route returning the same ComprehensiveHealth ({size}), 64 connections",
        bare_rps,
        "req/s",
    )
    report.ceilings["health_bare_p99"] = Result(
        "that bare route's p99 latency", bare_p99, "ms", higher_is_better=False
    )
    report.ceilings["health_bare_p50"] = Result(
        "that bare route's p50 latency", bare_p50, "ms", higher_is_better=False
    )
    report.ceilings["gateway_live_rps"] = Result(
        "the gateway's GET /api/v1/health/live (its middleware, no NATS), 64 connections",
        live_rps,
        "req/s",
    )
    report.results += [
        Result(
            "GET /api/v1/health/comprehensive throughput (same answer as the bare route)",
            route_rps,
            "req/s",
            "health_bare_rps",
            note="answers kept 1 s by the gateway; see gateway_live_rps for its own overhead",
        ),
        Result(
            "GET /api/v1/health/comprehensive throughput vs the gateway's cheapest route",
            route_rps,
            "req/s",
            "gateway_live_rps",
        ),
        Result(
            "GET /api/v1/health/comprehensive p50",
            route_p50,
            "ms",
            "health_bare_p50",
            higher_is_better=False,
        ),
        Result(
            "GET /api/v1/health/comprehensive p99",
            route_p99,
            "ms",
            "health_bare_p99",
            higher_is_better=False,
        ),
    ]


def serve_bare(port: int, answer_file: str) -> None:
    """A bare Litestar route returning the recorded answer as a ComprehensiveHealth struct."""
    import msgspec
    import uvicorn
    from litestar import Litestar, get

    payload = msgspec.json.decode(Path(answer_file).read_bytes(), type=ComprehensiveHealth)

    @get("/bare")
    async def bare() -> ComprehensiveHealth:
        return payload

    uvicorn.run(
        Litestar([bare], openapi_config=None),
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


async def _standalone() -> None:
    """`python -m bench.health`: the two figures alone, printed."""
    from tests.harness import NatsServer

    class Ctx:
        runs = 1
        http_seconds = 4

    report = Report()
    with tempfile.TemporaryDirectory(prefix="stockpilot-bench-health-") as tmp:
        server = NatsServer(Path(tmp) / "nats").start()
        try:
            ctx = Ctx()
            ctx.nats_url = server.url  # type: ignore[attr-defined]
            ctx.workdir = Path(tmp)  # type: ignore[attr-defined]
            await run(report, ctx)
        finally:
            server.stop()
    for result in [*report.ceilings.values(), *report.results]:
        print(f"{result.name}: {result.median:,.2f} {result.unit}")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "bare":
        serve_bare(int(sys.argv[2]), sys.argv[3])
    else:
        asyncio.run(_standalone())
