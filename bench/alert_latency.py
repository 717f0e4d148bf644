"""Alert latency: the call that crosses a budget → the alert at a webhook on loopback (the
hooks process, `stockpilot hooks`) and at the first SSE client of the gateway's alert stream,
idle and under a background load of 5,000 events/s.

Every sample needs a crossing of its own (an alert is raised once per scope and period), so
each run starts the usage service with fresh scoped budgets (STOCKPILOT_BUDGETS: one daily
`user:<id>` budget of $1 per sample pair) and exact prices (STOCKPILOT_PRICES: $1 per million
input tokens of the bench's model). Each user's first call (900,000 tokens, $0.90) crosses its
80 % warning, the second ($1.80) the budget itself: two samples per budget. The module runs
its own nats-server, so that starting the usage service with new budgets (a new fold
identity: the stream is folded again from the first event) folds only this module's events.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from datetime import UTC, datetime
from pathlib import Path

import nats
from nats.aio.client import Client as NATS

from bench.harness import Report, latency_results, log, percentile
from bench.listeners import SseClient, WebhookReceiver, open_when_serving, webhook_receiver
from bench.load import background_load
from bench.stack import Stack, running_stack, wait_folded
from services.usage.client import UsageRecorder
from services.usage.contract import UsageRecorded
from shared.streams import STREAMS
from tests.harness import NatsServer

LOAD_RATE = 5_000
MODEL = "bench-alert-model"
TOKENS = 900_000  # $0.90 at $1 per million: 90 % of the $1 budget, then 180 %
BUDGET_USD = 1.0
TIMEOUT_S = 15.0


def budget_env(users: list[str]) -> dict[str, str]:
    """Settings of a usage service with a $1 daily budget for each of `users`."""
    return {
        "STOCKPILOT_PRICES": json.dumps({MODEL: {"input": 1.0, "output": 0.0}}),
        "STOCKPILOT_BUDGETS": json.dumps(
            [{"scope": f"user:{u}", "period": "daily", "usd": BUDGET_USD} for u in users]
        ),
    }


def crossing(user: str, step: int) -> tuple[UsageRecorded, str]:
    """The `step`-th call (0 or 1) of `user`, and the title of the alert it raises."""
    event = UsageRecorded(
        id=f"{user}-{step}",
        request_id=f"{user}-{step}",
        occurred_at=datetime.now(UTC),
        model=MODEL,
        endpoint="/api/v1/alert-bench",
        prompt_tokens=TOKENS,
        completion_tokens=0,
        status_code=200,
        response_time_ms=100.0,
        user_id=user,
    )
    title = f"LLM budget user:{user} 80% used" if step == 0 else f"LLM budget user:{user} exceeded"
    return event, title


async def restart_usage(stack: Stack, nc: NATS, users: list[str]) -> None:
    """The usage service (re)started with budgets for `users`, ready at the stream's end."""
    if "usage" in stack.children:
        stack.stop("usage")
    stack.env.update(budget_env(users))
    stack.spawn("usage")
    info = await nc.jetstream().stream_info(STREAMS["usage"].name)
    await wait_folded(nc, int(info.state.last_seq), timeout=300)


async def hooks_ready(recorder: UsageRecorder, hook: WebhookReceiver, sse: SseClient) -> None:
    """One crossing heard by both listeners: the hooks process follows the stream."""
    event, title = crossing("warm-up", 0)
    recorder.record(event)
    await hook.heard.wait_for(title, 60)
    await sse.heard.wait_for(title, 60)


async def samples(
    recorder: UsageRecorder, hook: WebhookReceiver, sse: SseClient, users: list[str]
) -> tuple[list[float], list[float]]:
    """Two crossings per user: ms until the webhook, ms until the SSE client heard each."""
    to_hook, to_sse = [], []
    for step in (0, 1):
        for user in users:
            event, title = crossing(user, step)
            started = time.perf_counter()
            recorder.record(event)
            heard_hook = await hook.heard.wait_for(title, TIMEOUT_S)
            heard_sse = await sse.heard.wait_for(title, TIMEOUT_S)
            to_hook.append((heard_hook - started) * 1000)
            to_sse.append((heard_sse - started) * 1000)
            await asyncio.sleep(random.uniform(0.005, 0.025))
    return to_hook, to_sse


async def run(report: Report, ctx: object) -> None:
    """p50/p99 crossing → webhook and → first SSE client, idle and at LOAD_RATE events/s."""
    runs: int = ctx.runs  # type: ignore[attr-defined]
    workdir: Path = ctx.workdir  # type: ignore[attr-defined]
    quick: bool = ctx.quick  # type: ignore[attr-defined]
    per_run = 25 if quick else 100  # budgets a run (the settings allow 100): 2 samples each
    server = NatsServer(workdir / "alert-nats").start()
    try:
        async with webhook_receiver() as hook:
            env = {"STOCKPILOT_ALERT_WEBHOOK_URL": hook.url, **budget_env(["warm-up"])}
            with running_stack(server.url, workdir / "alerts", ("usage", "gateway"), env) as stack:
                nc = await nats.connect(server.url)
                await wait_folded(nc, 0, timeout=120)
                stack.spawn("hooks")  # after the usage service made the streams
                sse = SseClient()
                await open_when_serving(sse, stack.port)
                recorder = UsageRecorder(nc)
                recorder.start()
                await hooks_ready(recorder, hook, sse)
                for loaded in (False, True):
                    label = f"at {LOAD_RATE:,} events/s" if loaded else "idle"
                    # p50s and p99s of the runs, for the webhook and for the SSE client
                    hook_p: tuple[list[float], list[float]] = ([], [])
                    sse_p: tuple[list[float], list[float]] = ([], [])
                    rates: list[float] = []
                    for i in range(runs):
                        users = [f"a{int(loaded)}r{i}u{n}" for n in range(per_run)]
                        await restart_usage(stack, nc, users)
                        if loaded:
                            with background_load(server.url, LOAD_RATE) as summary:
                                to_hook, to_sse = await samples(recorder, hook, sse, users)
                            rates.append(summary[0].rate if summary else 0.0)
                        else:
                            to_hook, to_sse = await samples(recorder, hook, sse, users)
                        for kept, values in ((hook_p, to_hook), (sse_p, to_sse)):
                            kept[0].append(percentile(values, 50))
                            kept[1].append(percentile(values, 99))
                        log(
                            f"  alerts {label} run {i + 1}/{runs}: webhook p50 "
                            f"{hook_p[0][-1]:.1f} p99 {hook_p[1][-1]:.1f} ms, SSE p50 "
                            f"{sse_p[0][-1]:.1f} p99 {sse_p[1][-1]:.1f} ms "
                            f"({len(to_hook)} samples)"
                        )
                    load_note = (
                        f"; the load process acknowledged {statistics.median(rates):,.0f} "
                        "events/s (median of the runs)"
                        if loaded
                        else ""
                    )
                    note = f"{2 * per_run} crossings a run, one at a time{load_note}"
                    limit = 500.0 if loaded else 100.0
                    report.results.extend(
                        latency_results(
                            f"alert latency {label}: budget-crossing call recorded → webhook "
                            "(`stockpilot hooks`) received it",
                            *hook_p,
                            None,
                            limit,
                            note,
                        )
                        + latency_results(
                            f"alert latency {label}: budget-crossing call recorded → first SSE "
                            "client of /api/v1/alerts/stream received it",
                            *sse_p,
                            None,
                            limit,
                            note,
                        )
                    )
                await sse.close()
                await recorder.close()
                await nc.close()
    finally:
        server.stop()
