"""`stockpilot up`, `stockpilot service NAME`, `stockpilot gateway`: running the system.

Why one module of over 300 lines: it is the whole of running the system, the three commands
and the supervisor behind `up` (what each child may see, children dying with it, one stack per
data dir); those pieces exist only for the supervisor, so they stay beside it.

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
import ctypes
import fcntl
import importlib
import os
import re
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import msgspec
import psutil

from ops import nats_auth
from ops.embedded_nats import EmbeddedNatsError, embedded_command, port_is_free, url_file
from shared import streams
from shared.connection import ADMIN_USER, connect, drain_or_close, may_administer, redact_url
from shared.nats_errors import NATS_ERRORS
from shared.nats_server import wait_for_port
from shared.settings import (
    CONFIG_FILE_VARIABLE,
    CommonSettings,
    env_name,
    require_nats,
    settings_or_exit,
)
from shared.streams import provision

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
            "processes. Ctrl-C stops them all. With --provision-only: create or update the "
            "streams and buckets on STOCKPILOT_NATS_URL as the ops NATS user, then exit "
            "(compose.yaml runs this once before the services, whose NATS users may not create "
            "streams)."
        ),
    )
    up.add_argument(
        "--provision-only",
        action="store_true",
        help="create or update the streams and buckets on STOCKPILOT_NATS_URL, then exit",
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


def _provision_only() -> int:
    """`up --provision-only`: the stack's provisioning step alone (CONTRACT §2: only `up`,
    `service` and `gateway` create streams, so compose's one-shot is a mode of `up`)."""
    settings = settings_or_exit(CommonSettings)
    require_nats(settings)

    async def run() -> int:
        try:
            nc = await connect(settings, "stockpilot-provision", first_connect_attempts=30)
        except Exception as exc:
            print(f"stockpilot up --provision-only: cannot reach NATS ({exc})", file=sys.stderr)
            return 1
        try:
            await provision(nc.jetstream(), settings.stream_replicas)
        except NATS_ERRORS as exc:
            print(
                f"stockpilot up --provision-only: failed ({exc}); "
                f"the NATS user must be {ADMIN_USER!r}",
                file=sys.stderr,
            )
            return 1
        finally:
            await drain_or_close(nc)
        print("stockpilot up --provision-only: streams and buckets are in place", file=sys.stderr)
        return 0

    return asyncio.run(run())


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
    require_nats(settings)
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
    uvicorn.Server(server_config(create_app(settings, serving=True), settings)).run()
    return 0


# ----- what each child may see -------------------------------------------------------------

# Process basics every child keeps (no secrets among them).
_BASE_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "USER", "LOGNAME")
_PYTHON_ENV = (
    "PYTHONPATH",
    "PYTHONHASHSEED",
    "PYTHONUNBUFFERED",
    "PYTHONDONTWRITEBYTECODE",
    "PYTHONWARNINGS",
    "VIRTUAL_ENV",
    "COVERAGE_PROCESS_START",
)
# Processes that make outgoing TLS connections may be pointed at another CA bundle.
_TLS_ENV = ("SSL_CERT_FILE", "SSL_CERT_DIR")
# Which settings struct each Python child reads (module, class): its fields name the only
# STOCKPILOT_*/OPENAI_* variables it is given.
CHILD_SETTINGS = {
    "health": ("services.health.settings", "HealthSettings"),
    "usage": ("services.usage.settings", "UsageSettings"),
    "batch": ("services.batch.settings", "BatchSettings"),
    "hooks": ("ops.hooks", "HookSettings"),
    "gateway": ("gateway.settings", "GatewaySettings"),
}
_ENV_REFERENCE = re.compile(r"env:([A-Za-z_][A-Za-z0-9_]*)")


def settings_variables(child: str) -> set[str]:
    """The environment variables `child`'s settings struct reads."""
    module, name = CHILD_SETTINGS[child]
    cls: type[msgspec.Struct] = getattr(importlib.import_module(module), name)
    return {env_name(cls, field.name) for field in msgspec.structs.fields(cls)}


def child_environment(child: str, parent: Mapping[str, str]) -> dict[str, str]:
    """The environment `stockpilot up` starts `child` with: an allow-list, not a copy.

    nats-server gets the process basics only; each Python child gets those, the variables
    its own settings struct reads, and the config file's path. So OPENAI_API_KEY reaches the
    health service only, the tokens the gateway only, the webhook secret the hooks only.
    """
    allowed: set[str] = set(_BASE_ENV)
    if child != "nats":
        allowed |= {*_PYTHON_ENV, CONFIG_FILE_VARIABLE, *settings_variables(child)}
    if child in ("health", "hooks"):
        allowed |= set(_TLS_ENV)
    if child == "health":
        # External API headers may name a variable to read (`env:NAME`); that one only.
        sources = [parent.get("STOCKPILOT_EXTERNAL_APIS", "")]
        config = Path(parent.get(CONFIG_FILE_VARIABLE, "stockpilot.toml"))
        with contextlib.suppress(OSError):
            sources.append(config.read_text(encoding="utf-8"))
        for text in sources:
            allowed |= set(_ENV_REFERENCE.findall(text))
    return {name: value for name, value in parent.items() if name in allowed}


# ----- children die with the supervisor -----------------------------------------------------

_PR_SET_PDEATHSIG = 1


def _die_with_parent(signum: int) -> Callable[[], None] | None:
    """A preexec_fn asking Linux to send `signum` to the child when the supervisor dies, even
    by SIGKILL (children run in their own sessions, so nothing else would reach them)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    parent = os.getpid()

    def preexec() -> None:
        libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0)
        if os.getppid() != parent:  # the supervisor died before prctl took effect
            os._exit(1)

    return preexec


# ----- one stack per data dir ---------------------------------------------------------------


class AlreadyRunningError(Exception):
    """An earlier stack still runs under the same data dir."""


def _lock_data_dir(data_dir: Path) -> IO[str]:
    """Hold `data_dir/up.lock` for the supervisor's life (the kernel drops the lock when it
    dies, kill -9 included), and refuse when an earlier stack or its orphans still run."""
    handle = open(data_dir / "up.lock", "a+")  # noqa: SIM115 (held until the process ends)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        pid = handle.read().strip() or "?"
        handle.close()
        raise AlreadyRunningError(
            f"a StockPilot stack is already running with data dir {data_dir} (pid {pid}); "
            "stop it first, or set STOCKPILOT_DATA_DIR to another directory"
        ) from None
    leftovers = _leftover_processes(data_dir)
    if leftovers:
        handle.close()
        raise AlreadyRunningError(
            f"processes of an earlier StockPilot stack still run with data dir {data_dir} "
            f"(pids {', '.join(map(str, leftovers))}); stop them first"
        )
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def _leftover_processes(data_dir: Path) -> list[int]:
    """nats-server processes using this data dir's config (an orphan of an older stack)."""
    config = str(data_dir / "nats-server.conf")
    found = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        cmdline = process.info.get("cmdline") or []
        if config in cmdline and any(Path(part).name == "nats-server" for part in cmdline[:1]):
            found.append(process.info["pid"])
    return found


# ----- the supervisor -----------------------------------------------------------------------


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
        # Per-role NATS passwords: the embedded server's, or an external server's from
        # STOCKPILOT_NATS_<ROLE>_PASSWORD (none: every child uses STOCKPILOT_NATS_USER).
        self.passwords: dict[str, str] = {}
        self._lock: IO[str] | None = None

    def _say(self, message: str) -> None:
        sys.stdout.write(f"{'up':<{self.width}} | {message}\n")
        sys.stdout.flush()

    async def _spawn(self, name: str, command: list[str], env: dict[str, str]) -> Child:
        env = child_environment(name, env)
        if name in self.passwords:
            # The NATS roles (ops.nats_auth): each process under its own user.
            env |= {
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
            # ...and they die with it: a kill -9 of `up` leaves no orphan holding the ports
            # and the store (SIGTERM: a service still snapshots on its way out).
            preexec_fn=_die_with_parent(signal.SIGTERM),
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
        # First: an earlier stack on this data dir is named as such (its ports are taken too).
        try:
            self._lock = _lock_data_dir(data_dir)
        except AlreadyRunningError as exc:
            self._say(f"error: {exc}")
            return 1
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
            elif not await self._use_external_nats(env):
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
        # The streams and buckets are created here, as `ops`: the children's users may not.
        admin = msgspec.structs.replace(
            self.settings, nats_url=url, nats_user=ADMIN_USER, nats_password=passwords["ops"]
        )
        try:
            await self._provision(admin)
        except Exception as exc:
            self._say(f"error: cannot create the streams on the embedded NATS: {exc}")
            return False
        self._say(
            f"embedded NATS with JetStream at {url}, store {data_dir / 'nats'}, "
            f"per-process credentials in {data_dir / 'credentials.json'}"
        )
        return True

    async def _use_external_nats(self, env: dict[str, str]) -> bool:
        """An external NATS (STOCKPILOT_NATS_URL): with STOCKPILOT_NATS_<ROLE>_PASSWORD set,
        as on compose, each child connects as its role and the streams are created as
        `ops`; otherwise every child uses STOCKPILOT_NATS_USER, and `up` creates the streams
        only when that user may."""
        self.passwords = {
            role: env[nats_auth.password_variable(role)]
            for role in nats_auth.ROLES
            if env.get(nats_auth.password_variable(role))
        }
        admin: CommonSettings | None = None
        if ADMIN_USER in self.passwords:
            admin = msgspec.structs.replace(
                self.settings,
                nats_user=ADMIN_USER,
                nats_password=self.passwords[ADMIN_USER],
            )
        elif may_administer(self.settings):
            admin = self.settings
        if admin is None:
            return True
        try:
            await self._provision(admin)
        except Exception as exc:
            where = ", ".join(redact_url(url) for url in self.settings.nats_servers)
            self._say(f"error: cannot create the streams on {where}: {exc}")
            return False
        return True

    async def _provision(self, settings: CommonSettings) -> None:
        nc = await connect(settings, "stockpilot-up", first_connect_attempts=10)
        try:
            await streams.provision(nc.jetstream(), settings.stream_replicas)
        finally:
            await drain_or_close(nc)

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
    if args.provision_only:
        return _provision_only()
    settings = settings_or_exit(CommonSettings)
    data_dir = Path(settings.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(Stack(settings, data_dir).run())
