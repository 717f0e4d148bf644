"""`stockpilot demo`: its traffic generators, and the command against a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from zoneinfo import ZoneInfo

import httpx
import nats
import pytest
from nats.aio.client import Client as NATS

from ops import demo
from services.batch.contract import BatchFinished, BatchStarted
from shared.streams import STREAMS, provision
from tests.clocks import NOON

NOW = NOON - timedelta(hours=3)  # 09:00 UTC of the run's noon day, never a literal date
SEOUL = ZoneInfo("Asia/Seoul")


@pytest.fixture
async def env(env: dict[str, str]) -> dict[str, str]:
    """The throwaway NATS with the StockPilot streams, as `stockpilot up` leaves it: the demo
    feeds a running stack and never creates streams itself."""
    nc = await nats.connect(env["STOCKPILOT_NATS_URL"])
    try:
        await provision(nc.jetstream())
    finally:
        await nc.close()
    return env


def test_history_is_repeatable_spans_the_month_and_stays_out_of_the_last_minutes() -> None:
    first = list(demo.usage_history(random.Random(1), NOW, SEOUL, days=30))
    again = list(demo.usage_history(random.Random(1), NOW, SEOUL, days=30))
    assert first == again
    assert len({e.id for e in first}) == len(first)
    days = {e.occurred_at.astimezone(SEOUL).date() for e in first}
    assert len(days) == 30
    assert max(e.occurred_at for e in first) < NOW - timedelta(minutes=10)
    failed = sum(e.status_code >= 400 for e in first) / len(first)
    assert 0.01 < failed < 0.08
    assert {e.model for e in first} >= {"gpt-4o", "gpt-4o-mini", "text-embedding-3-small"}
    assert all(e.error_code for e in first if e.status_code >= 400)


def test_incident_traffic_fails_often_enough_to_trip_the_error_rate_alert() -> None:
    rng = random.Random(2)
    calls = [demo.usage_event(rng, NOW, error_rate=0.6) for _ in range(400)]
    assert sum(c.status_code >= 400 for c in calls) / len(calls) > 0.5


def test_batch_history_pairs_every_start_with_a_finish() -> None:
    events = demo.batch_history(random.Random(3), NOW)
    started = {e.execution_id for _, e in events if isinstance(e, BatchStarted)}
    finished = {e.execution_id for _, e in events if isinstance(e, BatchFinished)}
    assert started == finished and len(started) > 20
    assert all(s.startswith("stockpilot.batch.run.") for s, _ in events)


async def test_loopback_apis_answer_and_the_printed_setting_points_at_them() -> None:
    async with demo.ExternalApis(0, [*demo.demo_apis(), demo.fake_openai()]) as apis:
        listed = json.loads(apis.setting())
        assert [a["name"] for a in listed] == ["quotes", "news", "fx"]
        async with httpx.AsyncClient() as client:
            for api in listed:
                answer = await client.get(api["url"])
                assert answer.status_code == 200
            models = await client.get(f"{apis.openai_base_url()}/models")
            assert {m["id"] for m in models.json()["data"]} >= {"gpt-4o"}


@contextlib.asynccontextmanager
async def demo_process(
    env: dict[str, str], *args: str
) -> AsyncIterator[asyncio.subprocess.Process]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "ops",
        "demo",
        *args,
        env={**env, "PATH": "/usr/bin:/bin"},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_help_describes_the_options(env: dict[str, str]) -> None:
    async with demo_process(env, "--help") as process:
        out, _ = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 0
    for option in ("--duration", "--rate", "--history-days", "--api-port", "--seed"):
        assert option in out.decode()


async def _count(nc: NATS, stream: str, subject: str | None = None) -> int:
    info = await nc.jetstream().stream_info(stream, subjects_filter=subject)
    if subject is None:
        return int(info.state.messages)
    return sum((info.state.subjects or {}).values())


async def test_a_short_run_feeds_usage_batch_and_a_lock_then_exits(env: dict[str, str]) -> None:
    async with demo_process(
        env,
        "--duration=7",
        "--rate=25",
        "--history-days=2",
        "--api-port=0",
        "--stuck-lock-ttl=2",
        "--seed=5",
    ) as process:
        out, err = await asyncio.wait_for(process.communicate(), timeout=45)
    assert process.returncode == 0, err.decode()
    assert "STOCKPILOT_EXTERNAL_APIS='[" in out.decode()
    progress = err.decode()
    assert "backfilling" in progress and "LLM calls" in progress and "done" in progress
    nc = await nats.connect(env["STOCKPILOT_NATS_URL"])
    try:
        usage = await _count(nc, STREAMS["usage"].name)
        assert usage > 100
        locks = await _count(nc, STREAMS["batch"].name, "stockpilot.batch.lock.>")
        assert locks >= 3  # the stuck lock, and a live run's acquire + release
        runs = await _count(nc, STREAMS["batch"].name, "stockpilot.batch.run.>")
        assert runs > 40
    finally:
        await nc.close()


async def test_ctrl_c_stops_the_demo_cleanly(env: dict[str, str]) -> None:
    async with demo_process(
        env, "--duration=120", "--history-days=0", "--api-port=0", "--rate=10"
    ) as process:
        assert process.stderr is not None
        seen = b""
        while b"LLM calls" not in seen:
            line = await asyncio.wait_for(process.stderr.readline(), timeout=30)
            assert line, "the demo stopped before its first progress line"
            seen += line
        process.send_signal(signal.SIGINT)
        _, rest = await asyncio.wait_for(process.communicate(), timeout=15)
    assert process.returncode == 0
    assert b"stopped cleanly" in seen + rest


async def test_a_busy_port_is_reported_in_one_line(env: dict[str, str]) -> None:
    async with demo.ExternalApis(0, [demo.FakeApi("busy")]) as taken:
        port = str(taken.apis[0].port)
        async with demo_process(env, f"--api-port={port}", "--duration=1") as process:
            _, err = await asyncio.wait_for(process.communicate(), timeout=30)
    assert process.returncode == 1
    assert f"cannot serve the external APIs on ports {port}-" in err.decode()
    assert "Traceback" not in err.decode()


async def test_kept_alive_connections_end_quietly_when_the_apis_stop() -> None:
    async with demo.ExternalApis(0, [demo.FakeApi("quotes")]) as apis:
        url = f"http://127.0.0.1:{apis.apis[0].port}/v1/ping"
        client = httpx.AsyncClient()
        assert (await client.get(url)).status_code == 200
    # The server side closed the pooled connection: the client sees a closed socket,
    # and no handler was left for the loop to cancel.
    assert apis._connections == {}
    await client.aclose()
