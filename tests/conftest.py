"""Fixtures shared by every test: a real nats-server per test, settings, PostgreSQL, Redis."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from shared.clock import ManualClock
from shared.testing import NatsServer, nats_server
from tests.clocks import NOON

# PostgreSQL and Redis fixtures (real servers; throwaway ones when none answers).
pytest_plugins = ["tests.dbs"]


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[NatsServer]:
    """A throwaway nats-server with JetStream on a free port, its store in tmp_path."""
    with nats_server(tmp_path / "nats") as server:
        yield server


@pytest.fixture
def env(nats: NatsServer, tmp_path: Path) -> dict[str, str]:
    """A settings environment pointing at the throwaway server, snapshots on demand only."""
    return {
        "STOCKPILOT_NATS_URL": nats.url,
        "STOCKPILOT_DATA_DIR": str(tmp_path / "data"),
        "STOCKPILOT_CONFIG": str(Path(__file__).parent / "empty.toml"),
    }


@pytest.fixture
def clock() -> ManualClock:
    """The test's clock, set to the run's noon (tests.clocks.NOON); hand it to services and the
    gateway, date events from it, move it with `set`/`advance`."""
    return ManualClock(NOON)
