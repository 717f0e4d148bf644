"""Fixtures of the batch tests: settings, a NATS connection, the running batch service."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import msgspec
import nats
import pytest
from litestar.testing import AsyncTestClient
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext

from gateway.app import create_app
from gateway.settings import GatewaySettings
from services.batch.service import build
from services.batch.settings import BatchSettings
from shared.clock import ManualClock
from shared.events import Alert
from shared.runtime import Runtime
from shared.settings import load_settings
from shared.streams import provision
from tests.harness import running_service

ADMIN_TOKEN = "test-admin-token"


@pytest.fixture
def batch_env(env: dict[str, str]) -> dict[str, str]:
    """Short heartbeats and lost checks, so lost runs show up within a second."""
    return {
        **env,
        "STOCKPILOT_HEARTBEAT_INTERVAL_S": "0.2",
        "STOCKPILOT_LOST_CHECK_INTERVAL_S": "0.1",
    }


@pytest.fixture
def settings(batch_env: dict[str, str]) -> BatchSettings:
    """Batch settings pointing at the throwaway server."""
    return load_settings(BatchSettings, batch_env)


@pytest.fixture
async def nc(settings: BatchSettings) -> AsyncIterator[NATS]:
    """A worker's NATS connection, the streams provisioned."""
    conn = await nats.connect(settings.nats_servers)
    await provision(conn.jetstream())
    yield conn
    await conn.close()


@pytest.fixture
async def service(settings: BatchSettings, nc: NATS, clock: ManualClock) -> AsyncIterator[Runtime]:
    """The real batch service running in the test's loop, on the test's clock (tests pass the
    same clock to their workers, and move it to expire locks or lose runs)."""
    async with running_service(build(settings), settings, clock=clock) as runtime:
        yield runtime


@pytest.fixture
async def api(
    batch_env: dict[str, str], service: Runtime, clock: ManualClock
) -> AsyncIterator[AsyncTestClient[Any]]:
    """The real gateway (admin token set, the test's clock) in front of the batch service."""
    # No kept answers: their lifetime runs on the real (monotonic) clock, and these tests move
    # the test clock to expire locks and lose runs, then expect the very next answer to see it.
    gateway_settings = load_settings(
        GatewaySettings,
        {**batch_env, "STOCKPILOT_ADMIN_TOKEN": ADMIN_TOKEN, "STOCKPILOT_CACHE_TTL_S": "0"},
    )
    async with AsyncTestClient(app=create_app(gateway_settings, clock)) as client:
        for _ in range(200):
            if (await client.get("/api/v1/health")).status_code == 200:
                break
            await asyncio.sleep(0.02)
        yield client


ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Poll `check` until it holds; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.05)


async def alerts_of(js: JetStreamContext, kind: str) -> list[Alert]:
    """Every alert of `kind` stored in STOCKPILOT_ALERTS."""
    subject = f"stockpilot.alerts.{kind}"
    info = await js.stream_info("STOCKPILOT_ALERTS", subjects_filter=subject)
    found: list[Alert] = []
    if not info.state.subjects:
        return found
    sub = await js.subscribe(subject, ordered_consumer=True)
    count = info.state.subjects.get(subject, 0)
    for _ in range(count):
        msg = await sub.next_msg(timeout=2)
        found.append(msgspec.json.decode(msg.data, type=Alert))
    await sub.unsubscribe()
    return found
