"""`stockpilot up`, `stockpilot service NAME`, `stockpilot gateway`: running the system.

`up` is a small supervisor: the embedded NATS (unless STOCKPILOT_NATS_URL is set), then the
three services, the alert-hook process and the gateway, each a separate OS process whose
output is prefixed with its name. Ctrl-C (SIGINT/SIGTERM) stops them in reverse order within
10 s; a child that dies on its own is reported and brings the whole stack down with a
non-zero status, so there is never a silent half-running system.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ops import nats_auth
from ops.embedded_nats import EmbeddedNatsError, embedded_command, port_is_free, url_file
from shared.settings import CommonSettings, settings_or_exit
from shared.testing import wait_for_port

SERVICES = ("health", "usage", "batch")
STOP_GRACE_S = 8.0


def register(subparsers: Any) -> None:
    """Add `up`, `service` and `gateway`."""
    up = subparsers.add_parser(
        "up",
        help="run everything: embedded NATS, the three services, hooks and the gateway",
        description=(
            "Start the embedded NATS server (unless STOCKPILOT_NATS_URL is set), the health, "
            "usage and batch services, the alert-hook process and the gateway, as separate "
            "processes. Ctrl-C stops them all."
        ),
    )
    up.set_defaults(handler=_up)

    service = subparsers.add_parser(
        "service",
        help="run one service process (what compose.yaml runs)",
        description="Run one service: it folds its stream and answers the gateway over NATS.",
    )
    service.add_argument("name", choices=SERVICES, help="which service")
    service.set_defaults(handler=_service)

    gateway = subparsers.add_parser(
        "gateway",
        help="run the HTTP gateway (the /api/v1 routes and the dashboard)",
        description=(
            "Serve the REST API on STOCKPILOT_HTTP_HOST:STOCKPILOT_HTTP_PORT "
            "(default 127.0.0.1:8000)."
        ),
    )
    gateway.set_defaults(handler=_gateway)


def _service(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"services.{args.name}.__main__")
    status: int = module.main()
    return status


def _gateway(args: argparse.Namespace) -> int:
    del args
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    from gateway.app import create_app
    from gateway.http_server import raise_open_files_limit, server_config
    from gateway.settings import GatewaySettings
    from shared.logs import configure_logging

    settings = settings_or_exit(GatewaySettings)
    configure_logging("gateway", settings.log_level)
    # Header and keep-alive timeouts, uvloop, httptools: gateway.http_server.
    raise_open_files_limit()
    print(
        f"gateway: serving http://{settings.http_host}:{settings.http_port}"
        + (f" with {settings.http_workers} workers" if settings.http_workers > 1 else ""),
        file=sys.stderr,
        flush=True,
    )
    if settings.http_workers > 1:
        # What uvicorn.run does for workers (each starts the app from an import string),
        # with our Config, which uvicorn.run cannot take.
        config = server_config(
            "gateway.app:app_from_environment",
            settings,
            factory=True,
            workers=settings.http_workers,
        )
        Multiprocess(config, sockets=[config.bind_socket()]).run()
        return 0
    uvicorn.Server(server_config(create_app(settings), settings)).run()
    return 0


@dataclass
class Child:
    """One supervised process."""

    name: str
    process: asyncio.subprocess.Process


async def _pump(name: str, stream: asyncio.StreamReader | None, width: int) -> None:
    if stream is None:
        return
    prefix = f"{name:<{width}} | "
    while line := await stream.readline():
        sys.stdout.write(prefix + line.decode(errors="replace"))
        sys.stdout.flush()


class Stack:
    """The supervisor behind `stockpilot up`."""

    def __init__(self, settings: CommonSettings, data_dir: Path) -> None:
        self.settings = settings
        self.data_dir = data_dir
        self.children: list[Child] = []
        self.pumps: list[asyncio.Task[None]] = []
        self.stop = asyncio.Event()
        self.width = 8
        # Per-process NATS passwords when the embedded server runs (none for an external one).
        self.passwords: dict[str, str] = {}

    def _say(self, message: str) -> None:
        sys.stdout.write(f"{'up':<{self.width}} | {message}\n")
        sys.stdout.flush()

    async def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> Child:
        if name in self.passwords:
            env = env | {
                "STOCKPILOT_NATS_USER": name,
                "STOCKPILOT_NATS_PASSWORD": self.passwords[name],
            }
        process = await asyncio.create_subprocess_exec(
            *command,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            # Own process group: Ctrl-C reaches only the supervisor, which stops children
            # in order (gateway first, NATS last).
            start_new_session=True,
        )
        child = Child(name, process)
        self.children.append(child)
        self.pumps.append(asyncio.create_task(_pump(name, process.stdout, self.width)))
        return child

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stop.set)
        env = dict(os.environ)
        data_dir = self.data_dir
        env["STOCKPILOT_DATA_DIR"] = str(data_dir)
        http_host = env.get("STOCKPILOT_HTTP_HOST", "127.0.0.1")
        http_port = int(env.get("STOCKPILOT_HTTP_PORT", "8000") or 8000)
        if not port_is_free(http_port, http_host):
            self._say(
                f"error: {http_host}:{http_port} is taken; set STOCKPILOT_HTTP_PORT to a "
                "free port or stop what listens there"
            )
            return 2
        try:
            if not self.settings.nats_url:
                if not await self._start_nats(data_dir, env):
                    return 1
            python = sys.executable
            for name in SERVICES:
                await self._spawn(name, [python, "-m", "ops", "service", name], env)
            await self._spawn("hooks", [python, "-m", "ops", "hooks"], env)
            await self._spawn("gateway", [python, "-m", "ops", "gateway"], env)
            self._say(f"StockPilot Ops starting: http://{http_host}:{http_port} (Ctrl-C stops)")
            return await self._supervise()
        finally:
            await self._stop_all()

    async def _start_nats(self, data_dir: Path, env: dict[str, str]) -> bool:
        try:
            command, port, passwords = embedded_command(data_dir, self.settings.nats_port)
        except EmbeddedNatsError as exc:
            self._say(f"error: {exc}")
            return False
        child = await self._spawn("nats", command, env)
        deadline = time.monotonic() + 15
        while True:
            if child.process.returncode is not None:
                self._say(f"error: nats-server exited with status {child.process.returncode}")
                return False
            try:
                await asyncio.to_thread(wait_for_port, "127.0.0.1", port, 0.5)
                break
            except TimeoutError:
                if time.monotonic() > deadline:
                    self._say("error: nats-server did not accept connections within 15 s")
                    return False
        url = f"nats://127.0.0.1:{port}"
        # The ops tools find the server (and the operator's credentials) here; 0600.
        nats_auth.write_private(
            url_file(data_dir), f"nats://ops:{passwords['ops']}@127.0.0.1:{port}\n"
        )
        env["STOCKPILOT_NATS_URL"] = url
        self.passwords = passwords
        self._say(
            f"embedded NATS with JetStream at {url}, store {data_dir / 'nats'}, "
            f"per-process credentials in {data_dir / 'credentials.json'}"
        )
        return True

    async def _supervise(self) -> int:
        waits = {asyncio.create_task(child.process.wait()): child for child in self.children}
        stop = asyncio.create_task(self.stop.wait())
        done, _ = await asyncio.wait({stop, *waits}, return_when=asyncio.FIRST_COMPLETED)
        for task in waits:
            if task in done:
                child = waits[task]
                self._say(
                    f"error: {child.name} exited with status {child.process.returncode}; "
                    "stopping everything"
                )
                stop.cancel()
                return 1
        for task in waits:
            task.cancel()
        self._say("stopping")
        return 0

    async def _stop_all(self) -> None:
        deadline = time.monotonic() + STOP_GRACE_S
        # Reverse start order: gateway, hooks, services, then NATS so they can snapshot.
        for child in reversed(self.children):
            if child.process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    child.process.send_signal(signal.SIGTERM)
                if child.name == "nats":
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(
                        child.process.wait(), max(0.1, deadline - time.monotonic() - 1)
                    )
        for child in self.children:
            if child.process.returncode is None:
                try:
                    await asyncio.wait_for(
                        child.process.wait(), max(0.1, deadline - time.monotonic())
                    )
                except TimeoutError:
                    self._say(f"{child.name} did not stop in time; killing it")
                    with contextlib.suppress(ProcessLookupError):
                        child.process.kill()
                    await child.process.wait()
        await asyncio.gather(*self.pumps, return_exceptions=True)


def _up(args: argparse.Namespace) -> int:
    del args
    settings = settings_or_exit(CommonSettings)
    data_dir = Path(settings.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(Stack(settings, data_dir).run())
