"""Fixtures of the batch tests: settings, a NATS connection, the running batch service."""

from __future__ import annotations

from collections.abc import AsyncIterator

import nats
import pytest
from nats.aio.client import Client as NATS

from services.batch.service import build
from services.batch.settings import BatchSettings
from shared import bus
from shared.runtime import Runtime
from shared.settings import load_settings
from shared.testing import running_service

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
    await bus.provision(conn.jetstream())
    yield conn
    await conn.close()


@pytest.fixture
async def service(settings: BatchSettings, nc: NATS) -> AsyncIterator[Runtime]:
    """The real batch service running in the test's loop."""
    async with running_service(build(settings), settings) as runtime:
        yield runtime
