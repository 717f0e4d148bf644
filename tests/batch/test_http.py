"""Runs and locks over HTTP for jobs in any language (contract §5; issue #18)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
from litestar.testing import AsyncTestClient
from nats.aio.client import Client as NATS

from services.batch.client import read_lock
from services.batch.contract import LockReleased
from services.batch.service import build
from services.batch.settings import BatchSettings
from shared.clock import ManualClock
from shared.runtime import Runtime
from shared.settings import load_settings
from tests.batch.conftest import ADMIN
from tests.faults.stack import gateway_process, service_env
from tests.harness import NatsServer, running_service

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "docs" / "examples" / "cron-job.sh"
INGEST = "ingest-for-cron"
API = "/api/v1/batch/jobs"


async def test_lock_acquire_renew_release_mine_over_http(
    api: AsyncTestClient[Any], service: Runtime, clock: ManualClock, nc: NATS
) -> None:
    taken = await api.post(f"{API}/report/lock/acquire", json={"owner": "cron@a", "ttl_s": 60})
    assert taken.status_code == 401  # no token
    taken = await api.post(
        f"{API}/report/lock/acquire", json={"owner": "cron@a", "ttl_s": 60}, headers=ADMIN
    )
    assert taken.status_code == 200, taken.text
    token = taken.json()["fencing_token"]
    assert datetime.fromisoformat(taken.json()["expires_at"]) == clock.now() + timedelta(seconds=60)

    other = await api.post(f"{API}/report/lock/acquire", json={"owner": "cron@b"}, headers=ADMIN)
    assert other.status_code == 409
    assert other.json()["holder"]["owner"] == "cron@a"
    assert other.json()["holder"]["fencing_token"] == token
    assert "cron@a" in other.json()["detail"]
    assert other.json()["status_code"] == 409  # like every error body (contract §5)

    clock.advance(timedelta(seconds=30))
    wrong = await api.post(
        f"{API}/report/lock/renew",
        json={"owner": "cron@b", "fencing_token": token, "ttl_s": 60},
        headers=ADMIN,
    )
    assert wrong.status_code == 409
    renewed = await api.post(
        f"{API}/report/lock/renew",
        json={"owner": "cron@a", "fencing_token": token, "ttl_s": 60},
        headers=ADMIN,
    )
    assert renewed.status_code == 200, renewed.text
    expires = datetime.fromisoformat(renewed.json()["expires_at"])
    assert expires == clock.now() + timedelta(seconds=60)
    status = (await api.get(f"{API}/report/lock/status")).json()
    assert (status["owner"], status["fencing_token"]) == ("cron@a", token)
    assert datetime.fromisoformat(status["expires_at"]) == expires

    not_mine = await api.post(
        f"{API}/report/lock/release-mine",
        json={"owner": "cron@b", "fencing_token": token},
        headers=ADMIN,
    )
    assert not_mine.status_code == 409
    assert not_mine.json()["holder"]["owner"] == "cron@a"
    mine = await api.post(
        f"{API}/report/lock/release-mine",
        json={"owner": "cron@a", "fencing_token": token},
        headers=ADMIN,
    )
    assert mine.status_code == 200 and mine.json()["released"] is True
    status = (await api.get(f"{API}/report/lock/status")).json()
    assert status["locked"] is False
    last, _ = await read_lock(nc.jetstream(), "report")
    assert isinstance(last, LockReleased) and (last.by, last.reason) == ("cron@a", "released")
    again = await api.post(
        f"{API}/report/lock/release-mine",
        json={"owner": "cron@a", "fencing_token": token},
        headers=ADMIN,
    )
    # A retried release (its answer lost on the way) is answered as done, not refused.
    assert again.status_code == 200 and again.json()["released"] is True
    assert (await api.get(f"{API}/report/lock/status")).json()["locked"] is False


async def test_runs_reported_over_http_land_in_the_history_and_stats(
    api: AsyncTestClient[Any], service: Runtime, clock: ManualClock
) -> None:
    started = await api.post(
        f"{API}/etl/runs", json={"status": "started", "items_total": 10}, headers=ADMIN
    )
    assert started.status_code == 202, started.text
    execution_id = started.json()["execution_id"]
    clock.advance(timedelta(seconds=42))
    done = await api.post(
        f"{API}/etl/runs",
        json={"execution_id": execution_id, "status": "failed", "error": "disk full on /var/x1"},
        headers=ADMIN,
    )
    assert done.status_code == 202, done.text
    # An end never reported started, and a skipped run.
    ok = await api.post(f"{API}/etl/runs", json={"status": "succeeded"}, headers=ADMIN)
    skipped = await api.post(f"{API}/etl/runs", json={"status": "skipped"}, headers=ADMIN)
    assert (ok.status_code, skipped.status_code) == (202, 202)
    recent = (await api.get("/api/v1/batch/executions/recent", params={"job_id": "etl"})).json()
    by_id = {e["execution_id"]: e for e in recent["executions"]}
    failed = by_id[execution_id]
    assert (failed["status"], failed["duration_s"], failed["error"]) == (
        "failed",
        42.0,
        "disk full on /var/x1",
    )
    assert by_id[ok.json()["execution_id"]]["status"] == "succeeded"
    assert by_id[skipped.json()["execution_id"]]["status"] == "skipped"
    stats = (await api.get("/api/v1/batch/executions/stats")).json()
    assert (stats["failed"], stats["succeeded"], stats["skipped"]) == (1, 1, 1)

    again = await api.post(
        f"{API}/etl/runs", json={"execution_id": execution_id, "status": "succeeded"}, headers=ADMIN
    )
    # It failed: a success reported for it now contradicts the stored run (409)...
    assert again.status_code == 409 and "already ended" in again.json()["detail"]
    # ...and the same failure reported again (a retried curl) is taken, storing nothing new.
    retried = await api.post(
        f"{API}/etl/runs",
        json={"execution_id": execution_id, "status": "failed", "error": "disk full on /var/x1"},
        headers=ADMIN,
    )
    assert retried.status_code == 202, retried.text
    stats = (await api.get("/api/v1/batch/executions/stats")).json()
    assert (stats["failed"], stats["succeeded"], stats["skipped"]) == (1, 1, 1)
    for bad in ({"status": "exploded"}, {"status": "started", "extra": 1}, {}):
        answer = await api.post(f"{API}/etl/runs", json=bad, headers=ADMIN)
        assert 400 <= answer.status_code < 500, (bad, answer.status_code)
    answer = await api.post(f"{API}/bad.job/runs", json={"status": "started"}, headers=ADMIN)
    assert answer.status_code in (400, 422) and "job_id" in answer.json()["detail"]


async def test_the_readme_cron_example_runs_with_curl_against_a_real_gateway(
    nats: NatsServer, tmp_path: Path
) -> None:
    """The five README lines, run as cron would run them: a run that succeeds, one that fails,
    and one skipped because another holder has the lock."""
    curl = shutil.which("curl")
    assert curl is not None, "curl is needed (apt-get install curl)"
    readme = (ROOT / "README.md").read_text()
    five = SCRIPT.read_text().split("# --- the five lines shown in the README ---\n")[1]
    assert len(five.strip().splitlines()) == 5
    assert f"```sh\n{five}```" in readme
    env = service_env(nats.url, tmp_path / "data", STOCKPILOT_INGEST_TOKEN=INGEST)
    settings = load_settings(BatchSettings, env)
    async with running_service(build(settings), settings):
        with gateway_process(env, tmp_path) as base:

            def cron(job: str, *command: str) -> subprocess.CompletedProcess[str]:
                return subprocess.run(
                    [str(SCRIPT), *command],
                    env=os.environ
                    | {"STOCKPILOT_URL": base, "STOCKPILOT_INGEST_TOKEN": INGEST, "JOB": job},
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )

            done = await asyncio.to_thread(cron, "nightly", "true")
            assert done.returncode == 0, done.stdout + done.stderr
            done = await asyncio.to_thread(cron, "nightly", "false")
            assert done.returncode == 0, done.stdout + done.stderr
            async with httpx.AsyncClient(base_url=base) as http:
                auth = {"Authorization": f"Bearer {INGEST}"}
                held = await http.post(
                    f"{API}/nightly/lock/acquire", json={"owner": "python"}, headers=auth
                )
                assert held.status_code == 200
                done = await asyncio.to_thread(cron, "nightly", "true")
                assert done.returncode == 0, done.stdout + done.stderr
                runs = (
                    await http.get("/api/v1/batch/executions/recent", params={"job_id": "nightly"})
                ).json()["executions"]
                lock = (await http.get(f"{API}/nightly/lock/status")).json()
    assert [r["status"] for r in runs] == ["skipped", "failed", "succeeded"]
    assert "python" in runs[0]["error"]  # the skipped run names who held the lock
    assert all(r["host"] in ("", "http") for r in runs)
    assert lock["owner"] == "python"  # the cron runs gave back only their own locks
