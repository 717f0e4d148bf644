"""Gateway read routes at 64 connections, next to the bare-route ceiling of the same run."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator

import nats

from bench.ceilings import sample_event
from bench.harness import Report, Result, log, process, wrk
from services.usage.budget_client import BudgetChecker
from shared.streams import provision
from tests.harness import free_port

ROUTES = (
    "/api/v1/status",
    "/api/v1/usage/stats",
    "/api/v1/health/comprehensive",
    "/api/v1/batch/executions/recent",
    # The budget check StockPilot AI makes before a call (the client keeps it a second).
    "/api/v1/usage/budget?user_id=u-1&model=gpt-4o",
    # Issue #20: a filtered read and the dashboard's cost-by-model chart (one request).
    "/api/v1/usage/stats?user_id=u-1&model=gpt-4o",
    "/api/v1/usage/timeseries?bucket=day&group_by=model",
)
BUDGET_CHECKS = 200_000


@contextlib.contextmanager
def stack(nats_url: str, data_dir: str) -> Iterator[int]:
    """The three services and the gateway as separate processes; the gateway's port."""
    port = free_port()
    env = {
        "STOCKPILOT_NATS_URL": nats_url,
        "STOCKPILOT_DATA_DIR": data_dir,
        "STOCKPILOT_HTTP_PORT": str(port),
        "STOCKPILOT_LOG_LEVEL": "WARNING",
    }
    with contextlib.ExitStack() as stack_:
        for name in ("health", "usage", "batch"):
            stack_.enter_context(
                process([sys.executable, "-m", "ops", "service", name], env, name=name)
            )
        stack_.enter_context(
            process([sys.executable, "-m", "ops", "gateway"], env, port, name="gateway")
        )
        yield port


async def seed(nats_url: str, count: int) -> None:
    """Some usage history so the routes have something to compute."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await provision(js)  # `--only gateway` runs before anything else made the streams
    for i in range(count):
        await js.publish_async(
            "stockpilot.usage.recorded", sample_event(i), headers={"Nats-Msg-Id": f"seed-{i}"}
        )
    await js.publish_async_completed()
    await nc.close()


async def run(report: Report, ctx: object) -> None:
    """Measure req/s and p50/p99 of each read route."""
    nats_url: str = ctx.nats_url  # type: ignore[attr-defined]
    runs: int = ctx.runs  # type: ignore[attr-defined]
    seconds: int = ctx.http_seconds  # type: ignore[attr-defined]
    await seed(nats_url, 10_000)
    with stack(nats_url, str(ctx.workdir / "gateway-data")) as port:  # type: ignore[attr-defined]
        base = f"http://127.0.0.1:{port}"
        for route in ROUTES:
            wrk(base + route, seconds=2)  # warm-up, and the services catch up
            rps, p50, p99, bad = [], [], [], 0
            for i in range(runs):
                result = wrk(base + route, seconds=seconds)
                log(
                    f"  {route} run {i + 1}/{runs}: {result.rps:,.0f} req/s, "
                    f"p99 {result.p99_ms} ms, non-2xx {result.non_2xx}"
                )
                rps.append(result.rps)
                p50.append(result.p50_ms)
                p99.append(result.p99_ms)
                bad += result.non_2xx
            note = f"{bad} non-2xx answers" if bad else ""
            report.results.append(
                Result(
                    f"GET {route} throughput",
                    rps,
                    "req/s",
                    "bare_rps",
                    target="≥ 0.85",
                    note=note,
                    min_ratio=0.85,
                )
            )
            report.results.append(
                Result(f"GET {route} p50", p50, "ms", "bare_p50", higher_is_better=False)
            )
            report.results.append(
                Result(
                    f"GET {route} p99",
                    p99,
                    "ms",
                    "bare_p99",
                    higher_is_better=False,
                    target="≥ 0.67 (p99 ≤ 1.5×)",
                    min_ratio=1 / 1.5,
                )
            )
        report.results.append(await budget_check_cost(base, runs))


async def budget_check_cost(base: str, runs: int) -> Result:
    """What `check_budget` costs the application per call on its hot path (the answer kept
    for its second): microseconds per call, in this process."""
    budgets = BudgetChecker(base)
    await budgets.check_budget(user_id="u-1", model="gpt-4o")  # fetched once, then kept
    costs = []
    for _ in range(runs):
        started = time.perf_counter()
        for _ in range(BUDGET_CHECKS):
            await budgets.check_budget(user_id="u-1", model="gpt-4o")
        costs.append((time.perf_counter() - started) / BUDGET_CHECKS * 1e6)
        log(f"  check_budget: {costs[-1]:.2f} us per call ({budgets.requests} requests)")
    await budgets.aclose()
    return Result(
        "usage client check_budget per call (answer kept 1 s)",
        costs,
        "us",
        higher_is_better=False,
        # Issue #21: a cached check costs the application at most 10 µs.
        target="≤ 10 us",
        max_value=10.0,
        note="the hot path: a dict lookup and a clock read; one HTTP request a second",
    )
