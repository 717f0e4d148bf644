"""Real-process helpers for tests and benchmarks: a throwaway nats-server, in-process services.

Not test doubles: every helper here runs the real thing (the pinned nats-server binary, the
real service runtime) so tests and `bench/` exercise production code paths. The launcher and
port helpers live in shared.nats_server (production code uses them; it never imports this
module) and are re-exported here for the tests.

It lives under tests/, not shared/: the production packages (and the image built from them)
hold no test harness at all, and tests/test_import_rules.py checks that nothing in them
imports it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

from shared.clock import SYSTEM_CLOCK, Clock
from shared.nats_server import (
    NatsServer,
    free_port,
    nats_server_binary,
    stop_process,
    wait_for_port,
)
from shared.runtime import Runtime, ServiceDefinition
from shared.settings import CommonSettings

__all__ = [
    "NatsCluster",
    "NatsServer",
    "free_port",
    "nats_server",
    "nats_server_binary",
    "running_service",
    "stop_process",
    "tcp_pair",
    "wait_for_port",
]


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    """Two ends of a TCP connection on loopback, as to nats-server (the kernel lets
    megabytes wait in the socket); the first non-blocking, for an event loop's protocol,
    the other for the test to write and read the bytes a server would."""
    listener = socket.create_server(("127.0.0.1", 0))
    ours = socket.create_connection(listener.getsockname())
    theirs, _ = listener.accept()
    listener.close()
    ours.setblocking(False)
    return ours, theirs


@contextlib.contextmanager
def nats_server(store_dir: Path) -> Iterator[NatsServer]:
    """A running throwaway nats-server."""
    server = NatsServer(store_dir).start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def running_service(
    definition: ServiceDefinition,
    settings: CommonSettings,
    ready_timeout: float = 30.0,
    bare_reads: bool = True,
    loop_factory: Callable[[], asyncio.AbstractEventLoop] = asyncio.new_event_loop,
    clock: Clock = SYSTEM_CLOCK,
    freeze_gc: bool = False,
) -> AsyncIterator[Runtime]:
    """Run a service until the block ends; wait until it is caught up.

    The service gets its own thread and event loop, as it would have its own process: test
    clients that block the test's loop while a request is handled (Litestar's
    AsyncTestClient runs the app through a blocking portal) must not freeze the service.
    """
    runtime = Runtime(definition, settings, bare_reads, clock, freeze_gc)
    loop = loop_factory()
    failure: list[BaseException] = []

    def serve() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(runtime.run())
        except BaseException as exc:  # reported to the test below
            failure.append(exc)
        finally:
            loop.close()

    thread = threading.Thread(target=serve, name=f"service-{definition.name}", daemon=True)
    thread.start()
    deadline = time.monotonic() + ready_timeout
    while not (runtime.instance and runtime.status().ready):
        if not thread.is_alive():
            if failure:
                raise failure[0]
            raise RuntimeError(f"{definition.name} service stopped during start-up")
        if time.monotonic() > deadline:
            loop.call_soon_threadsafe(runtime.stop.set)
            raise TimeoutError(f"{definition.name} service not ready after {ready_timeout}s")
        await asyncio.sleep(0.02)
    try:
        yield runtime
    finally:
        if not loop.is_closed():
            loop.call_soon_threadsafe(runtime.stop.set)
        await asyncio.to_thread(thread.join, 15)
        if failure:
            raise failure[0]


class NatsCluster:
    """A JetStream cluster of `size` nats-server processes on loopback."""

    def __init__(self, store_dir: Path, size: int = 3) -> None:
        self.client_ports = [free_port() for _ in range(size)]
        self.cluster_ports = [free_port() for _ in range(size)]
        routes = ",".join(f"nats://127.0.0.1:{p}" for p in self.cluster_ports)
        self.nodes = [
            NatsServer(
                store_dir / f"n{i}",
                port=self.client_ports[i],
                extra_args=[
                    "--server_name", f"n{i}",
                    "--cluster_name", "stockpilot",
                    "--cluster", f"nats://127.0.0.1:{self.cluster_ports[i]}",
                    "--routes", routes,
                ],
            )
            for i in range(size)
        ]  # fmt: skip

    @property
    def url(self) -> str:
        """All client URLs, comma-separated (STOCKPILOT_NATS_URL for a cluster)."""
        return ",".join(node.url for node in self.nodes)

    def start(self) -> NatsCluster:
        """Start every node."""
        for node in self.nodes:
            node.start()
        return self

    def stop(self) -> None:
        """Stop every node."""
        for node in self.nodes:
            node.stop()
