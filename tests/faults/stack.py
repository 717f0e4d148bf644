"""Real OS processes for the fault tests: services and the gateway as `python -m ops …`.

Nothing here fakes anything: each helper starts the production entry point with a settings
environment, and the waits ask the live services over NATS (their built-in `digest`).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import msgspec
import nats
from nats.aio.client import Client as NATS

from shared.endpoints import endpoint_subject
from shared.runtime import Runtime
from shared.service_status import DigestAnswer
from shared.settings import CommonSettings, load_settings
from shared.streams import STREAMS
from tests.harness import free_port, running_service, stop_process, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
EMPTY_TOML = str(ROOT / "tests" / "empty.toml")


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`python -m ops ARGS` with `env` over the test's environment, output to `log`."""
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "ops", *args],
            env=os.environ | env,
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


@contextlib.contextmanager
def service_process(
    name: str, env: dict[str, str], log_dir: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """`stockpilot service NAME` for the block."""
    process = spawn(["service", name], env, log_dir / f"{name}.log")
    try:
        yield process
    finally:
        stop_process(process)


@contextlib.contextmanager
def gateway_process(env: dict[str, str], log_dir: Path) -> Iterator[str]:
    """`stockpilot gateway` on a free port for the block; its base URL."""
    port = free_port()
    process = spawn(
        ["gateway"],
        env | {"STOCKPILOT_HTTP_PORT": str(port), "STOCKPILOT_HTTP_HOST": "127.0.0.1"},
        log_dir / "gateway.log",
    )
    try:
        wait_for_port("127.0.0.1", port, timeout=60)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(process)


async def digest(nc: NATS, service: str, timeout: float = 2.0) -> DigestAnswer | None:
    """The live service's digest answer, or None when nobody answers (yet)."""
    try:
        msg = await nc.request(endpoint_subject(service, "digest"), b"{}", timeout=timeout)
    except nats.errors.Error:
        return None
    if msg.headers and "Nats-Service-Error" in msg.headers:
        return None
    return msgspec.json.decode(msg.data, type=DigestAnswer)


async def stream_last_seq(nc: NATS, stream: str) -> int:
    """The last sequence of `stream`."""
    return int((await nc.jetstream().stream_info(stream)).state.last_seq)


async def wait_caught_up(
    nc: NATS, service: str, stream: str, timeout: float = 60.0
) -> DigestAnswer:
    """Poll the live `digest` until its projections of the whole `stream` reached its last seq.

    (An alert ledger folds only its own source's alerts: its last seq may stay below.)
    """
    whole = next(spec.subjects[0] for spec in STREAMS.values() if spec.name == stream)
    deadline = time.monotonic() + timeout
    last: DigestAnswer | None = None
    while time.monotonic() < deadline:
        target = await stream_last_seq(nc, stream)
        last = await digest(nc, service)
        if last is not None:
            mine = [p for p in last.projections if p.filter_subject == whole]
            if mine and all(p.last_seq >= target for p in mine):
                return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"{service} did not catch up with {stream} in {timeout}s: {last}")


def service_env(nats_url: str, data_dir: Path, **extra: str) -> dict[str, str]:
    """The settings environment of a process of the stack."""
    return {
        "STOCKPILOT_NATS_URL": nats_url,
        "STOCKPILOT_DATA_DIR": str(data_dir),
        "STOCKPILOT_CONFIG": EMPTY_TOML,
        "STOCKPILOT_LOG_LEVEL": "WARNING",
        **extra,
    }


@contextlib.asynccontextmanager
async def in_process_services(
    env: dict[str, str], names: tuple[str, ...] = ("health", "usage", "batch")
) -> AsyncIterator[dict[str, Runtime]]:
    """The real services on the real runtime, each in its own thread (running_service)."""
    async with contextlib.AsyncExitStack() as stack:
        runtimes = {}
        for name in names:
            settings = load_settings(_settings_class(name), env)
            build = importlib.import_module(f"services.{name}.service").build
            runtimes[name] = await stack.enter_async_context(
                running_service(build(settings), settings)
            )
        yield runtimes


def _settings_class(name: str) -> type[CommonSettings]:
    cls: type[CommonSettings] = importlib.import_module(f"services.{name}.settings").Settings
    return cls
