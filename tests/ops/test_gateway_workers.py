"""`stockpilot gateway` with STOCKPILOT_HTTP_WORKERS=2: two processes answer, SIGTERM stops both."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil

from tests.harness import free_port
from tests.ops.test_up import wait_for


def test_two_gateway_workers_answer_and_stop_together(env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "gateway.log"
    workers: list[psutil.Process] = []
    with open(log, "wb") as out:
        gateway = subprocess.Popen(
            [sys.executable, "-m", "ops", "gateway"],
            env=os.environ
            | env
            | {"STOCKPILOT_HTTP_PORT": str(port), "STOCKPILOT_HTTP_WORKERS": "2"},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        base = f"http://127.0.0.1:{port}"
        health = wait_for(f"{base}/api/v1/health", 30, lambda r: r.status_code == 200)
        assert health.json()["status"] == "healthy"
        # uvicorn's supervisor and its two workers (the spawn start method adds a tracker).
        workers = [
            p
            for p in psutil.Process(gateway.pid).children(recursive=True)
            if "multiprocessing.resource_tracker" not in " ".join(p.cmdline())
        ]
        assert len(workers) == 2, [p.cmdline() for p in workers]
        for _ in range(20):
            assert httpx.get(f"{base}/api/v1/status", timeout=5).status_code == 200
        assert "with 2 workers" in log.read_text()
    finally:
        gateway.send_signal(signal.SIGTERM)
        status = gateway.wait(timeout=20)
    assert status == 0, log.read_text()
    time.sleep(0.5)
    assert not [p for p in workers if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
