"""PostgreSQL and Redis for tests: the configured servers (placeholder; see issue 2)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """A PostgreSQL that answers (STOCKPILOT_TEST_DATABASE_URL or 127.0.0.1:5432)."""
    return os.environ.get(
        "STOCKPILOT_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
    )


@pytest.fixture(scope="session")
def redis_url() -> str:
    """A Redis that answers (STOCKPILOT_TEST_REDIS_URL or 127.0.0.1:6379)."""
    return os.environ.get("STOCKPILOT_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
