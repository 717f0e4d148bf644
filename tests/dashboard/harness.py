"""Real pieces for the dashboard tests: headless Chromium, the gateway on a socket, services.

Shared by the tests, one of which also writes the README screenshot.
Nothing is faked: Debian's Chromium driven by Playwright, uvicorn serving `create_app`, the
three services running in-process against a real nats-server.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import typing
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import nats
import pytest
import uvicorn
from litestar import Litestar
from nats.aio.client import Client as NATS

from gateway.app import create_app
from gateway.settings import GatewaySettings
from ops import demo
from shared.clock import SYSTEM_CLOCK, Clock
from shared.events import Event
from shared.runtime import Runtime
from shared.settings import load_settings
from shared.streams import provision
from tests.harness import free_port, running_service

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ADMIN_TOKEN = "dashboard-admin-token"
SERVICES = ("health", "usage", "batch")


def service_module(name: str) -> ModuleType:
    """services.<name>.service, or skip (with the reason) while it is not written yet."""
    module: ModuleType = pytest.importorskip(
        f"services.{name}.service", reason=f"the {name} service is not importable yet"
    )
    return module


def require_routes(app: Litestar, *paths: str) -> None:
    """Skip (with the reason) when the gateway does not serve these routes yet."""
    served = {route.path for route in app.routes}
    missing = [p for p in paths if p not in served]
    if missing:
        pytest.skip(f"the gateway does not serve {', '.join(missing)} yet")


class _Server(uvicorn.Server):
    # The test's loop (and the services in it) keep their own signal handling.
    @contextlib.contextmanager
    def capture_signals(self) -> typing.Iterator[None]:
        yield


@contextlib.asynccontextmanager
async def gateway_server(app: Litestar) -> AsyncIterator[str]:
    """Serve `app` on a free loopback port in this loop; yields its base URL."""
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="on",
        ws="none",
        timeout_graceful_shutdown=2,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve())
    for _ in range(500):
        if server.started or task.done():
            break
        await asyncio.sleep(0.02)
    if task.done():
        task.result()
        raise RuntimeError("the gateway stopped during start-up")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, timeout=15)


@dataclass
class Stack:
    """NATS, the gateway on a socket and the services that are running."""

    env: dict[str, str]
    nc: NATS
    app: Litestar
    url: str
    runtimes: dict[str, Runtime] = field(default_factory=dict)
    stops: dict[str, contextlib.AsyncExitStack] = field(default_factory=dict)
    apis: demo.ExternalApis | None = None
    # The settings with every dependency configured (what `configure_dependencies` switches to).
    configured_env: dict[str, str] = field(default_factory=dict)
    # "Now" for the gateway and every service started here (the test's clock, or the real one).
    clock: Clock = SYSTEM_CLOCK

    async def start_service(self, name: str) -> Runtime:
        """Run services.<name> in this loop (skipped while it is not importable)."""
        module = service_module(name)
        build = module.build
        settings_type = typing.get_type_hints(build)["settings"]
        settings = load_settings(settings_type, self.env)
        stack = contextlib.AsyncExitStack()
        runtime = await stack.enter_async_context(
            running_service(build(settings), settings, clock=self.clock)
        )
        self.runtimes[name] = runtime
        self.stops[name] = stack
        return runtime

    async def stop_service(self, name: str) -> None:
        """Stop a running service (its routes turn 503, /status says unavailable)."""
        await self.stops.pop(name).aclose()
        self.runtimes.pop(name)

    async def configure_dependencies(self) -> None:
        """Restart the health service with every dependency configured (a stack started with
        `configured=False` then probes them all)."""
        self.env = dict(self.configured_env)
        if "health" in self.runtimes:
            await self.stop_service("health")
        await self.start_service("health")

    async def publish(self, events: list[tuple[str, Event]]) -> None:
        """Publish contract events as StockPilot AI's processes would."""
        await demo.publish_all(self.nc.jetstream(), events)


def stack_env(
    env: Mapping[str, str],
    *,
    postgres_url: str,
    redis_url: str,
    apis: demo.ExternalApis,
    configured: bool = True,
) -> dict[str, str]:
    """Settings for every process of the test stack: fast probes, budgets, loopback APIs.

    `configured=False` leaves every dependency unset (nothing for the health service to probe).
    """
    dependencies = {
        "STOCKPILOT_DATABASE_URL": postgres_url,
        "STOCKPILOT_REDIS_URL": redis_url,
        "OPENAI_API_KEY": "sk-dashboard-test",
        "OPENAI_BASE_URL": apis.openai_base_url() or "",
        "STOCKPILOT_EXTERNAL_APIS": apis.setting(),
    }
    return {
        **env,
        **(dependencies if configured else {}),
        "STOCKPILOT_HEALTH_INTERVAL_S": "1",
        "STOCKPILOT_DAILY_BUDGET_USD": "25",
        "STOCKPILOT_MONTHLY_BUDGET_USD": "400",
        "STOCKPILOT_HEARTBEAT_INTERVAL_S": "2",
        "STOCKPILOT_LOST_CHECK_INTERVAL_S": "1",
        "STOCKPILOT_ADMIN_TOKEN": ADMIN_TOKEN,
    }


@contextlib.asynccontextmanager
async def running_stack(
    env: Mapping[str, str],
    *,
    postgres_url: str,
    redis_url: str,
    services: tuple[str, ...] = SERVICES,
    apis: list[demo.FakeApi] | None = None,
    configured: bool = True,
    clock: Clock = SYSTEM_CLOCK,
) -> AsyncIterator[Stack]:
    """Loopback APIs (the demo's, flapping fx included, unless given), NATS streams, the named
    services and the gateway on a real socket; `clock` is their "now" (the real one unless
    given: a test that dates its events from the `clock` fixture hands it over)."""
    apis = apis if apis is not None else [*demo.demo_apis(), demo.fake_openai()]
    async with contextlib.AsyncExitStack() as stack:
        external = await stack.enter_async_context(demo.ExternalApis(first_port=0, apis=apis))
        configured_env = stack_env(
            env, postgres_url=postgres_url, redis_url=redis_url, apis=external
        )
        full_env = (
            configured_env
            if configured
            else stack_env(
                env, postgres_url=postgres_url, redis_url=redis_url, apis=external, configured=False
            )
        )
        gateway_settings = load_settings(GatewaySettings, full_env)
        nc = await nats.connect(gateway_settings.nats_servers)
        stack.push_async_callback(nc.close)
        await provision(nc.jetstream())
        app = create_app(gateway_settings, clock)
        url = await stack.enter_async_context(gateway_server(app))
        result = Stack(
            env=full_env,
            nc=nc,
            app=app,
            url=url,
            apis=external,
            configured_env=configured_env,
            clock=clock,
        )

        async def stop_all() -> None:
            for name in list(result.stops):
                await result.stop_service(name)

        stack.push_async_callback(stop_all)
        for name in services:
            await result.start_service(name)
        yield result


def chromium_installed() -> bool:
    """Whether Debian's Chromium is where the tests expect it."""
    return Path(CHROMIUM).exists()


@contextlib.asynccontextmanager
async def chromium_page(
    profile_dir: Path, *, width: int = 1440, height: int = 1000
) -> AsyncIterator[Any]:
    """A page in Debian's headless Chromium (fresh profile); skips when none can be launched."""
    if not chromium_installed():
        pytest.skip(f"{CHROMIUM} is not installed (scripts/install-chromium.sh installs it)")
    async_api = pytest.importorskip("playwright.async_api", reason="playwright is not installed")
    async with async_api.async_playwright() as playwright:
        try:
            context = await playwright.chromium.launch_persistent_context(
                str(profile_dir),
                executable_path=CHROMIUM,
                headless=True,
                args=CHROMIUM_ARGS,
                viewport={"width": width, "height": height},
                locale="en-US",
                timezone_id="Asia/Seoul",
            )
        except Exception as exc:  # the browser itself: missing libraries, no /dev/shm, …
            pytest.skip(f"Chromium could not be launched: {str(exc).splitlines()[0]}")
        try:
            page = context.pages[0] if context.pages else await context.new_page()
            yield page
        finally:
            await context.close()


def demo_history(
    now: datetime, zone: Any, *, seed: int = 7, calls_per_day: int = 110
) -> list[tuple[str, Event]]:
    """The demo's backfill: 30 days of LLM calls and a day of batch executions."""
    rng = random.Random(seed)
    usage: list[tuple[str, Event]] = [
        (demo.USAGE_SUBJECT, e)
        for e in demo.usage_history(rng, now, zone, calls_per_day=calls_per_day, quiet_minutes=1)
    ]
    return usage + demo.batch_history(rng, now)
