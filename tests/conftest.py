"""Fixtures shared by every test: a real nats-server per test, settings, PostgreSQL, Redis."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from shared.clock import ManualClock
from tests.clocks import NOON
from tests.harness import NatsServer, nats_server

# PostgreSQL and Redis fixtures (real servers; throwaway ones when none answers).
pytest_plugins = ["tests.dbs"]

# `make test-fast` runs the pure tier only (`-m "not servers"`): folds, decisions, queries,
# settings. A test needs servers when it asks for a fixture that starts one, or when its module
# starts processes or connects by itself (the names below); both are found here, so a new test
# module is sorted without anyone remembering a marker.
SERVER_FIXTURES = frozenset(
    {
        "nats", "env", "postgres_url", "redis_url", "cluster", "secured", "databases", "http",
        "silent", "small_redis", "compose", "batch_env", "nc", "service", "api",
    }
)  # fmt: skip
_STARTS_THINGS = re.compile(
    r"NatsServer\(|nats_server\(|NatsCluster\(|running_service\(|subprocess|nats\.connect\("
    r"|asyncpg\.connect|redis\.|tests\.faults\.stack|tests\.dashboard\.harness|start_server"
)
_module_starts_things: dict[Path, bool] = {}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test that needs real servers `servers` (see SERVER_FIXTURES)."""
    for item in items:
        path = Path(str(item.fspath))
        if path not in _module_starts_things:
            _module_starts_things[path] = bool(_STARTS_THINGS.search(path.read_text()))
        fixtures = set(getattr(item, "fixturenames", ()))
        if _module_starts_things[path] or fixtures & SERVER_FIXTURES:
            item.add_marker(pytest.mark.servers)


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


# `make test-calendar` moves every test's clock this many days back: a test that passes only
# while its calls are stored on the day the clock names is bound to the calendar (the stored
# time is NATS's real clock), and fails there at any hour.
CLOCK_DAYS_BACK = int(os.environ.get("STOCKPILOT_TEST_CLOCK_DAYS_BACK", "0"))


@pytest.fixture
def clock() -> ManualClock:
    """The test's clock, set to the run's noon (tests.clocks.NOON); hand it to services and the
    gateway, date events from it, move it with `set`/`advance`."""
    return ManualClock(NOON - timedelta(days=CLOCK_DAYS_BACK))
