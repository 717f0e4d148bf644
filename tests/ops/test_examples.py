"""The examples in docs/examples run as written: a Node.js alert subscriber, a curl producer."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from services.usage.service import build
from services.usage.settings import UsageSettings
from shared.settings import load_settings
from tests.faults.stack import gateway_process, service_env
from tests.harness import NatsServer, running_service

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docs" / "examples"
NODE_MODULES = ROOT / "tests" / "node" / "node_modules"
INGEST = "ingest-example"


def _node() -> str:
    node = shutil.which("node")
    if node is None or not (NODE_MODULES / "nats").exists():
        pytest.fail("Node.js or tests/node/node_modules missing: run `make node`")
    return node


async def test_the_curl_producer_records_a_call_the_node_subscriber_hears_its_alert(
    nats: NatsServer, tmp_path: Path
) -> None:
    """curl posts a call that crosses the daily budget; the Node subscriber prints the alert."""
    curl = shutil.which("curl")
    assert curl is not None, "curl is needed (apt-get install curl)"
    env = service_env(
        nats.url,
        tmp_path / "data",
        STOCKPILOT_DAILY_BUDGET_USD="0.001",
        STOCKPILOT_INGEST_TOKEN=INGEST,
    )
    settings = load_settings(UsageSettings, env)
    # The example as a reader copies it: beside a node_modules holding the `nats` package.
    (tmp_path / "node_modules").symlink_to(NODE_MODULES)
    script = tmp_path / "alerts-subscriber.mjs"
    shutil.copy(EXAMPLES / "alerts-subscriber.mjs", script)
    subscriber = await asyncio.create_subprocess_exec(
        _node(),
        str(script),
        env=os.environ | {"NATS_URL": nats.url},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert subscriber.stdout is not None
    try:
        first = await asyncio.wait_for(subscriber.stdout.readline(), 30)
        assert first.strip() == b"listening", first
        async with running_service(build(settings), settings):
            with gateway_process(env, tmp_path) as base:
                done = await asyncio.to_thread(
                    subprocess.run,
                    [str(EXAMPLES / "record-usage.sh"), "req-example-1", "gpt-4o", "120000", "900"],
                    env=os.environ | {"STOCKPILOT_URL": base, "STOCKPILOT_INGEST_TOKEN": INGEST},
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
                assert done.returncode == 0, done.stdout + done.stderr
                assert json.loads(done.stdout)["accepted"] == 1
                line = await asyncio.wait_for(subscriber.stdout.readline(), 30)
                alert = json.loads(line)
                assert alert["subject"].startswith("stockpilot.alerts.usage.cost_")
                assert alert["kind"].startswith("usage.cost_")
                assert alert["value"] >= alert["threshold"] > 0
                # The call is in today's figures as the gateway answers them.
                async with httpx.AsyncClient(base_url=base, timeout=10) as http:
                    stats = (await http.get("/api/v1/usage/stats")).json()
                assert stats["total_requests"] == 1
                refused = await asyncio.to_thread(
                    subprocess.run,
                    [str(EXAMPLES / "record-usage.sh"), "req-example-2", "gpt-4o", "1", "1"],
                    env=os.environ | {"STOCKPILOT_URL": base, "STOCKPILOT_INGEST_TOKEN": "wrong"},
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=False,
                )
                assert refused.returncode != 0  # --fail-with-body: a 401 is a failure
                assert "detail" in refused.stdout
    finally:
        subscriber.kill()
        await subscriber.wait()
