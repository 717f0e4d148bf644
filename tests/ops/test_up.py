"""`stockpilot up` end to end: everything starts, answers, and Ctrl-C leaves nothing behind."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from tests.harness import free_port

SECRETS = {
    "STOCKPILOT_ADMIN_TOKEN": "admin-secret-7c1f9e",
    "STOCKPILOT_INGEST_TOKEN": "ingest-secret-52ab0d",
    "OPENAI_API_KEY": "sk-test-secret-9d8e7f",
    "STOCKPILOT_DATABASE_URL": "postgresql://postgres:pg-secret-31c4@127.0.0.1:5432/postgres",
}


def wait_for(url: str, timeout: float, predicate: object = None) -> httpx.Response:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            response = httpx.get(url, timeout=2)
            if predicate is None or predicate(response):  # type: ignore[operator]
                return response
        except httpx.HTTPError as exc:
            last = exc
        time.sleep(0.2)
    raise AssertionError(f"{url} not as expected after {timeout}s ({last})")


def descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_up_serves_then_stops_cleanly_and_leaks_no_secret(tmp_path: Path) -> None:
    port = free_port()
    env = (
        os.environ
        | SECRETS
        | {
            "STOCKPILOT_DATA_DIR": str(tmp_path / "data"),
            "STOCKPILOT_HTTP_PORT": str(port),
            "STOCKPILOT_HEALTH_INTERVAL_S": "2",
            "STOCKPILOT_CONFIG": str(Path(__file__).parents[1] / "empty.toml"),
        }
    )
    env.pop("STOCKPILOT_NATS_URL", None)
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "ops", "up"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).parents[2],
        )
    base = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(f"{base}/api/v1/health", 60).status_code == 200
        status = wait_for(
            f"{base}/api/v1/status",
            60,
            lambda r: all(s["status"] == "up" for s in r.json()["services"].values()),
        ).json()
        assert set(status["services"]) == {"health", "usage", "batch"}
        ready = wait_for(f"{base}/api/v1/health/ready", 30, lambda r: r.status_code == 200)
        assert ready.json()["ready"] is True
        # Wrong tokens and a wrong password in a probed URL are logged about, never echoed.
        httpx.post(f"{base}/api/v1/usage/reset", headers={"Authorization": "Bearer nope"})
        httpx.get(f"{base}/api/v1/health/database")
        children = descendants(up.pid)
        assert len(children) >= 6  # nats, three services, hooks, gateway
        up.send_signal(signal.SIGINT)
        up.wait(timeout=10)
        assert up.returncode == 0
        time.sleep(0.2)
        assert [c for c in children if c.is_running() and c.status() != "zombie"] == []
    finally:
        if up.poll() is None:
            up.kill()
            for child in descendants(up.pid):
                child.kill()
    output = log.read_text(errors="replace")
    for name, secret in SECRETS.items():
        needle = secret.split(":")[2].split("@")[0] if name.endswith("DATABASE_URL") else secret
        assert needle not in output, f"{name} leaked into the logs"
    assert (tmp_path / "data" / "nats").is_dir()


def up_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = os.environ | {
        "STOCKPILOT_DATA_DIR": str(tmp_path / "data"),
        "STOCKPILOT_HTTP_PORT": str(free_port()),
        "STOCKPILOT_CONFIG": str(Path(__file__).parents[1] / "empty.toml"),
        **extra,
    }
    env.pop("STOCKPILOT_NATS_URL", None)
    return env


def test_taken_ports_are_refused_with_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for variable in ("STOCKPILOT_NATS_PORT", "STOCKPILOT_HTTP_PORT"):
            result = subprocess.run(
                [sys.executable, "-m", "ops", "up"],
                env=up_env(tmp_path, **{variable: port}),
                capture_output=True,
                text=True,
                timeout=30,
                cwd=Path(__file__).parents[2],
            )
            assert result.returncode != 0
            assert f"{port} is taken" in result.stdout
            assert variable in result.stdout


def test_a_crashed_child_stops_the_whole_stack(tmp_path: Path) -> None:
    env = up_env(tmp_path)
    base = f"http://127.0.0.1:{env['STOCKPILOT_HTTP_PORT']}"
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "ops", "up"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).parents[2],
        )
    try:
        wait_for(f"{base}/api/v1/health", 60, lambda r: r.status_code == 200)
        children = descendants(up.pid)
        batch = next(c for c in children if c.cmdline()[-2:] == ["service", "batch"])
        batch.kill()
        up.wait(timeout=15)
        assert up.returncode == 1
        time.sleep(0.2)
        assert [c for c in children if c.is_running() and c.status() != "zombie"] == []
    finally:
        if up.poll() is None:
            up.kill()
    assert "batch exited with status -9; stopping everything" in log.read_text()
