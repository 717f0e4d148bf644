"""The stack as `stockpilot up` runs it, for the benchmarks: each process its own OS process.

`Stack` spawns `python -m ops service NAME`, `ops gateway` and `ops hooks` with one settings
environment (plus what a benchmark adds), can stop or restart any of them, and reads their
resident memory; `usage_status`/`wait_folded` ask the live usage service how far it has folded.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import psutil
from nats.aio.client import Client as NATS

from bench.harness import ROOT
from shared.service_status import ServiceStatus
from tests.harness import free_port, stop_process, wait_for_port

_status = msgspec.json.Decoder(ServiceStatus).decode


class Stack:
    """health, usage, batch, the gateway and the hooks process as processes."""

    def __init__(self, nats_url: str, data_dir: Path, extra_env: dict[str, str] | None = None):
        self.port = free_port()
        self.env = {
            "STOCKPILOT_NATS_URL": nats_url,
            "STOCKPILOT_DATA_DIR": str(data_dir),
            "STOCKPILOT_HTTP_PORT": str(self.port),
            "STOCKPILOT_LOG_LEVEL": "WARNING",
            **(extra_env or {}),
        }
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self._logs = data_dir / "logs"
        self._logs.mkdir(parents=True, exist_ok=True)

    @property
    def base_url(self) -> str:
        """The gateway's URL."""
        return f"http://127.0.0.1:{self.port}"

    def spawn(self, name: str) -> subprocess.Popen[bytes]:
        """Start one process (`usage`, `health`, `batch`, `gateway` or `hooks`)."""
        args = [name] if name in ("gateway", "hooks") else ["service", name]
        with open(self._logs / f"{name}.log", "ab") as out:
            child = subprocess.Popen(
                [sys.executable, "-m", "ops", *args],
                env=os.environ | self.env,
                cwd=ROOT,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.children[name] = child
        return child

    def stop(self, name: str) -> None:
        """SIGTERM one process and wait for it (a service snapshots on the way out)."""
        stop_process(self.children.pop(name), timeout=30)

    def rss_mb(self) -> dict[str, float]:
        """Resident memory of every running process, MB."""
        return {
            name: psutil.Process(child.pid).memory_info().rss / 1024 / 1024
            for name, child in self.children.items()
        }


@contextlib.contextmanager
def running_stack(
    nats_url: str,
    data_dir: Path,
    names: tuple[str, ...] = ("health", "usage", "batch", "gateway"),
    extra_env: dict[str, str] | None = None,
) -> Iterator[Stack]:
    """The named processes (the gateway waited for on its port), stopped at the end."""
    stack = Stack(nats_url, data_dir, extra_env)
    try:
        for name in names:
            stack.spawn(name)
        if "gateway" in names:
            wait_for_port("127.0.0.1", stack.port, timeout=60)
        yield stack
    finally:
        for name in list(stack.children):
            stack.stop(name)


async def usage_status(nc: NATS, timeout: float = 2.0) -> ServiceStatus | None:
    """The usage service's status, or None while it does not answer."""
    try:
        msg = await nc.request("stockpilot.svc.usage.status", b"{}", timeout=timeout)
    except Exception:
        return None
    if msg.headers and msg.headers.get("Nats-Service-Error-Code"):
        return None
    return _status(msg.data)


def usage_seq(status: ServiceStatus) -> int:
    """How far the usage projection has folded."""
    return next(p.last_seq for p in status.projections if p.name == "usage")


async def wait_folded(nc: NATS, seq: int, timeout: float = 900, interval: float = 0.01) -> None:
    """Until the usage service is ready and its usage projection has folded `seq`."""
    deadline = time.monotonic() + timeout
    while True:
        status = await usage_status(nc, timeout=1.0)
        if status is not None and status.ready and usage_seq(status) >= seq:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"usage service did not fold seq {seq}")
        await asyncio.sleep(interval)
