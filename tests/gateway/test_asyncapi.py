"""The AsyncAPI document: valid by the AsyncAPI parser, current, served, covering the contract."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from litestar.testing import TestClient

from gateway.app import create_app
from gateway.asyncapi import build_document, render
from gateway.settings import GatewaySettings

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "asyncapi.json"
NODE_DIR = ROOT / "tests" / "node"


def test_the_document_passes_the_asyncapi_parser() -> None:
    """The AsyncAPI initiative's own parser (Node) finds no error in docs/asyncapi.json."""
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "@asyncapi" / "parser").exists():
        pytest.fail("Node.js or tests/node/node_modules missing: run `make node`")
    done = subprocess.run(
        [node, str(NODE_DIR / "validate-asyncapi.mjs"), str(DOC)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "valid AsyncAPI 3." in done.stdout


def test_the_copy_in_docs_is_current() -> None:
    assert DOC.read_bytes() == render(), "run `python -m gateway.asyncapi docs/asyncapi.json`"


def test_every_stream_subject_and_event_type_is_described() -> None:
    document = build_document()
    addresses = {c["address"] for c in document["channels"].values()}
    for prefix in ("stockpilot.usage.", "stockpilot.health.", "stockpilot.batch.", "stockpilot."):
        assert any(a.startswith(prefix) for a in addresses)
    assert {
        "stockpilot.usage.recorded",
        "stockpilot.usage.reset",
        "stockpilot.health.checked.{component}",
        "stockpilot.batch.run.{job_id}",
        "stockpilot.batch.lock.{job_id}",
        "stockpilot.alerts.{source}.{name}",
        "stockpilot.deadletter.{service}",
    } <= addresses
    names = {m["name"] for m in document["components"]["messages"].values()}
    assert {
        "usage.recorded",
        "usage.reset",
        "health.checked",
        "batch.started",
        "batch.progress",
        "batch.finished",
        "lock.acquired",
        "lock.released",
        "alert",
    } <= names
    # Each schema says its `type` tag, and the usage record's required fields are the contract's.
    recorded = document["components"]["schemas"]["UsageRecorded"]
    assert recorded["properties"]["type"]["enum"] == ["usage.recorded"]
    assert {"id", "occurred_at", "model", "status_code"} <= set(recorded["required"])
    lock = document["components"]["messages"]["LockAcquired"]["headers"]["properties"]
    assert "Nats-Expected-Last-Subject-Sequence" in lock


def test_the_gateway_serves_the_document_without_a_token() -> None:
    settings = GatewaySettings(nats_url="nats://127.0.0.1:1", read_token="r-secret")
    with TestClient(create_app(settings)) as client:
        answer = client.get("/asyncapi.json")
    assert answer.status_code == 200
    assert json.loads(answer.content) == json.loads(render())
