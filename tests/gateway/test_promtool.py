"""`/metrics` of a live stack by Prometheus' own rules, and the Grafana dashboard built on it.

The whole stack runs (the three services, the gateway and `stockpilot hooks` as OS
processes, real PostgreSQL and Redis probed) and gets traffic over HTTP and NATS: usage records
(some failed), a succeeded and a failed batch run, a lock, an alert the hook delivers. Then:

- `promtool check metrics` (Debian's prometheus package, installed by
  scripts/install-promtool.sh) finds nothing in the scrape: base units, `_total` counters,
  no reserved suffix or label on the wrong type;
- every metric name in every PromQL expression of docs/grafana-dashboard.json is exported.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.batch.client import acquire_lock, batch_job
from tests.clocks import NOON
from tests.faults.stack import ROOT, gateway_process, service_env, service_process, spawn
from tests.harness import NatsServer, stop_process

PROMTOOL_LOCAL = ROOT / ".tools" / "bin" / "promtool"
DASHBOARD = ROOT / "docs" / "grafana-dashboard.json"
INGEST = "ingest-token-for-promtool"


def promtool() -> str:
    """The promtool binary; skipped locally without it, a failure in CI (which installs it)."""
    found = str(PROMTOOL_LOCAL) if PROMTOOL_LOCAL.exists() else shutil.which("promtool")
    if found is None:
        message = "promtool not installed: run scripts/install-promtool.sh (make test does)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return found


# ----- PromQL: the metric names an expression selects -----------------------------------------

_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_LABEL_LISTS = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_NAMES = re.compile(r"(?<![\w$.])([A-Za-z_:][\w:]*)\b(?!\s*\()")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "bool", "offset", "inf", "nan", "group_left", "group_right"}
)


def metric_names(expr: str) -> set[str]:
    """Metric names selected by a PromQL expression (functions, labels, keywords left out)."""
    bare = _STRINGS.sub('""', expr)
    bare = _MATCHERS.sub(" ", bare)
    bare = _RANGES.sub(" ", bare)
    bare = _LABEL_LISTS.sub(" ", bare)
    return {name for name in _NAMES.findall(bare) if name.lower() not in _KEYWORDS}


def test_metric_names_are_found_in_promql() -> None:
    """The extractor the dashboard test relies on (so an empty set cannot pass it silently)."""
    expr = (
        'histogram_quantile(0.95, sum by (le) (rate(a_bucket{job="x"}[$__rate_interval])))'
        " / on (model) group_left sum without (type) (b_total) and c > bool 1"
    )
    assert metric_names(expr) == {"a_bucket", "b_total", "c"}
    assert metric_names('sum(rate(stockpilot_x_total{model=~"$model"}[5m]))') == {
        "stockpilot_x_total"
    }


def dashboard_exprs() -> list[str]:
    """Every PromQL expression of the dashboard's panels and template variables."""
    board = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in board["panels"] for target in panel.get("targets", [])]
    for variable in board.get("templating", {}).get("list", []):
        query = variable.get("query")
        if variable.get("type") == "query" and isinstance(query, dict):
            query = query.get("query")
        if isinstance(query, str) and variable.get("type") == "query":
            # label_values(metric, label)
            exprs.append(re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", query))
    return exprs


def test_the_dashboard_is_importable_grafana_json() -> None:
    board = json.loads(DASHBOARD.read_text())
    assert board["title"] and board["uid"]
    assert board["__inputs"][0]["pluginId"] == "prometheus"
    panels = board["panels"]
    assert len(panels) >= 10
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}", panel["title"]
    assert all(expr.strip() for expr in dashboard_exprs())


# ----- the live stack ----------------------------------------------------------------------


@pytest.fixture
def hooks_env(
    nats: NatsServer, tmp_path: Path, postgres_url: str, redis_url: str
) -> dict[str, str]:
    return service_env(
        nats.url,
        tmp_path / "data",
        STOCKPILOT_INGEST_TOKEN=INGEST,
        STOCKPILOT_DATABASE_URL=postgres_url,
        STOCKPILOT_REDIS_URL=redis_url,
        STOCKPILOT_DAILY_BUDGET_USD="5",
        STOCKPILOT_MONTHLY_BUDGET_USD="100",
        STOCKPILOT_HEALTH_INTERVAL_S="5",
    )


@pytest.fixture
def stack(hooks_env: dict[str, str], tmp_path: Path) -> Iterator[str]:
    """The services, `stockpilot hooks` and the gateway as processes; the gateway's URL."""
    hooks = spawn(["hooks"], hooks_env, tmp_path / "hooks.log")
    try:
        with (
            service_process("health", hooks_env, tmp_path),
            service_process("usage", hooks_env, tmp_path),
            service_process("batch", hooks_env, tmp_path),
            gateway_process(hooks_env, tmp_path) as base,
        ):
            yield base
    finally:
        stop_process(hooks)


def records() -> list[dict[str, object]]:
    at = NOON.isoformat()
    return [
        {"request_id": "p1", "model": "gpt-4o-mini", "status_code": 200, "occurred_at": at,
         "prompt_tokens": 800, "completion_tokens": 120, "response_time_ms": 850.0},
        {"request_id": "p2", "model": "gpt-4o", "status_code": 200, "occurred_at": at,
         "prompt_tokens": 1500, "completion_tokens": 300, "response_time_ms": 4200.0},
        {"request_id": "p3", "model": "gpt-4o", "status_code": 429, "occurred_at": at,
         "error_code": "rate_limit_exceeded", "response_time_ms": 90.0},
    ]  # fmt: skip


async def traffic(base: str, nats_url: str) -> None:
    """Usage over HTTP, batch runs and a lock over NATS, reads of every dashboard area."""
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        headers = {"Authorization": f"Bearer {INGEST}"}
        ingest = await http.post("/api/v1/usage/records", json=records(), headers=headers)
        assert ingest.status_code == 202, ingest.text
        assert ingest.json()["accepted"] == 3
        nc = await nats.connect(nats_url)
        try:
            async with batch_job(nc, "price-sync", items_total=3, heartbeat_interval_s=0.1) as run:
                run.advance(3)
            with pytest.raises(RuntimeError):
                async with batch_job(nc, "report", heartbeat_interval_s=0.1):
                    raise RuntimeError("report broke")
            await acquire_lock(nc.jetstream(), "nightly", owner="w1", execution_id="n1", ttl_s=600)
        finally:
            await nc.close()
        for path in ("/api/v1/status", "/api/v1/usage/stats", "/api/v1/batch/locks/expired"):
            assert (await http.get(path)).status_code == 200


def sample_names(text: str) -> set[str]:
    return {
        sample.name for family in text_string_to_metric_families(text) for sample in family.samples
    }


def values(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


# Series that must reach at least these values once the traffic has been folded and the hook
# has delivered the job-failure alert.
SETTLED = {
    ("stockpilot_alert_hooks_process", (("state", "up"),)): 1.0,
    ("stockpilot_alert_hook_deliveries_total", (("hook", "log"), ("outcome", "delivered"))): 1.0,
    (
        "stockpilot_batch_executions",
        (("job", "report"), ("status", "failed"), ("window", "24h")),
    ): 1.0,
    ("stockpilot_component_up", (("component", "database"), ("kind", "database"))): 1.0,
    ("stockpilot_llm_requests_total", (("model", "gpt-4o"),)): 2.0,
    ("stockpilot_metrics_source_up", (("answer", "counters"), ("service", "usage"))): 1.0,
}


async def settled_scrape(base: str) -> str:
    """/metrics once every series of SETTLED has reached its value (60 s at most)."""
    deadline = time.monotonic() + 60
    async with httpx.AsyncClient(base_url=base, timeout=30) as http:
        while True:
            text = (await http.get("/metrics")).text
            found = values(text)
            short = {k: found.get(k) for k, v in SETTLED.items() if found.get(k, -1.0) < v}
            if not short or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.5)
    assert not short, (short, text[-4000:])
    return text


async def test_a_live_scrape_passes_promtool_and_feeds_every_dashboard_query(
    stack: str, hooks_env: dict[str, str], tmp_path: Path
) -> None:
    binary = promtool()
    await traffic(stack, hooks_env["STOCKPILOT_NATS_URL"])
    text = await settled_scrape(stack)
    (tmp_path / "metrics.prom").write_text(text)

    lint = subprocess.run(
        [binary, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert not lint.stdout.strip() and not lint.stderr.strip()

    exported = sample_names(text)
    # What the issue asks of the families, beyond promtool's rules.
    for name in (
        "stockpilot_llm_requests_total",
        "stockpilot_llm_failed_requests_total",
        "stockpilot_llm_tokens_total",
        "stockpilot_llm_cost_usd_total",
        "stockpilot_projection_dead_letters_total",
        "stockpilot_llm_response_time_seconds_bucket",
        "stockpilot_component_latency_seconds",
        "stockpilot_llm_budget_used_ratio",
    ):
        assert name in exported, name
    assert not [n for n in exported if n.endswith(("_ms", "_percent"))]
    assert 'stockpilot_llm_response_time_seconds_bucket{le="1.0"} 2.0' in text
    assert "stockpilot_llm_response_time_seconds_count 3.0" in text

    used = {name for expr in dashboard_exprs() for name in metric_names(expr)}
    assert used and all(name.startswith("stockpilot_") for name in used), used
    assert used <= exported, sorted(used - exported)
