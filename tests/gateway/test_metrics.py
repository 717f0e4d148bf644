"""`/metrics` parses with prometheus-client's own parser and agrees with the REST answers."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import datetime
from typing import Any

import msgspec
import nats
import pytest
from litestar import Litestar
from litestar.testing import AsyncTestClient
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import create_app
from gateway.routes.metrics import SCRAPE_TIMEOUT_S
from gateway.settings import GatewaySettings
from services.batch import service as batch
from services.batch.client import acquire_lock, batch_job
from services.batch.settings import BatchSettings
from services.health import service as health
from services.health.settings import HealthSettings
from services.usage import service as usage
from services.usage.settings import UsageSettings
from shared.clock import ManualClock
from shared.events import rfc3339
from shared.hook_status import STATUS_KEY, HooksStatus, HookStatus
from shared.settings import CommonSettings, load_settings
from shared.streams import STATE_BUCKET
from tests.gateway.test_system_routes import wait_connected
from tests.harness import free_port, running_service
from tests.shared.toy import build

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(text: str) -> Samples:
    found: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


async def test_metrics_parse_and_match_status(env: dict[str, str]) -> None:
    definition, _ = build()  # the runtime's toy service, registered as "usage"
    async with AsyncTestClient(create_app(load_settings(GatewaySettings, env))) as client:
        await wait_connected(client)
        async with running_service(definition, load_settings(CommonSettings, env)):
            await client.get("/api/v1/status")
            response = await client.get("/metrics")
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/plain")
            found = samples(response.text)
            assert found[("stockpilot_service_up", (("service", "usage"),))] == 1.0
            assert found[("stockpilot_service_up", (("service", "batch"),))] == 0.0
            lag_key = (
                "stockpilot_projection_lag_events",
                (("projection", "toy"), ("service", "usage")),
            )
            assert found[lag_key] == 0.0
            requests = [
                value
                for (name, labels), value in found.items()
                if name == "stockpilot_gateway_requests_total"
                and ("path", "/api/v1/status") in labels
            ]
            assert requests and sum(requests) >= 1
            # The silent batch service only drops its own families.
            assert not [name for name, _ in found if name.startswith("stockpilot_batch_")]
            source = ("stockpilot_metrics_source_up", (("answer", "stats"), ("service", "batch")))
            assert found[source] == 0.0
            hooks = ("stockpilot_alert_hooks_process", (("state", "not_configured"),))
            assert found[hooks] == 1.0


async def test_a_hung_service_costs_the_scrape_its_timeout_not_a_5xx(env: dict[str, str]) -> None:
    nc = await nats.connect(env["STOCKPILOT_NATS_URL"])

    async def never_answer(msg: object) -> None:
        await asyncio.sleep(30)

    # Something that takes every batch request and never replies: a wedged service.
    await nc.subscribe("stockpilot.svc.batch.>", cb=never_answer)
    async with AsyncTestClient(create_app(load_settings(GatewaySettings, env))) as client:
        await wait_connected(client)
        started = time.monotonic()
        response = await client.get("/metrics")
        assert time.monotonic() - started < SCRAPE_TIMEOUT_S + 1.0
        assert response.status_code == 200
        found = samples(response.text)
        assert found[("stockpilot_service_up", (("service", "batch"),))] == 0.0
        source = ("stockpilot_metrics_source_up", (("answer", "locks"), ("service", "batch")))
        assert found[source] == 0.0
        assert ("stockpilot_service_up", (("service", "usage"),)) in found
    await nc.close()


# ----- the whole system: /metrics agrees with the REST answers -------------------------------

USAGE_EVENTS: list[dict[str, Any]] = [
    {
        "id": "m1",
        "model": "gpt-4o-mini",
        "status_code": 200,
        "prompt_tokens": 100,
        "completion_tokens": 20,
    },
    {"id": "m2", "model": "gpt-4o-mini", "status_code": 429, "error_code": "rate_limit"},
    {
        "id": "m3",
        "model": "gpt-4o",
        "status_code": 200,
        "prompt_tokens": 1000,
        "completion_tokens": 200,
        "cost_usd": 0.5,
    },
    {"id": "m4", "model": "gpt-4o", "status_code": 500, "prompt_tokens": 10},
    {"id": "m1", "model": "gpt-4o-mini", "status_code": 200},  # a retried publish: stored once
]


async def publish_usage(js: JetStreamContext, at: datetime) -> None:
    for fields in USAGE_EVENTS:
        event = {
            "type": "usage.recorded",
            "occurred_at": rfc3339(at),
            "request_id": fields["id"],
            "endpoint": "/api/v1/analysis",
            "response_time_ms": 120.0,
            **fields,
        }
        await js.publish(
            "stockpilot.usage.recorded",
            msgspec.json.encode(event),
            headers={"Nats-Msg-Id": fields["id"]},
        )


async def run_jobs(nc: NATS) -> None:
    async with batch_job(nc, "sync", items_total=2, heartbeat_interval_s=0.05) as run:
        run.advance(2)
    with pytest.raises(RuntimeError):
        async with batch_job(nc, "report", heartbeat_interval_s=0.05):
            raise RuntimeError("report broke at item 7")
    js = nc.jetstream()
    await acquire_lock(js, "held", owner="w1", execution_id="h1", ttl_s=600)
    await acquire_lock(js, "stale", owner="w2", execution_id="s1", ttl_s=0.2)


async def publish_hooks_status(js: JetStreamContext, at: datetime) -> None:
    """What `stockpilot hooks` publishes in the state bucket (the process itself is not run)."""
    status = HooksStatus(
        updated_at=at,
        pid=4242,
        hooks=[
            HookStatus(name="slack", state="ok", delivered=3, skipped_duplicates=1),
            HookStatus(name="pager", state="retrying", failures=2, consecutive_failures=2),
        ],
    )
    kv = await js.key_value(STATE_BUCKET)
    await kv.put(STATUS_KEY, msgspec.json.encode(status))


async def rest_and_metrics(client: AsyncTestClient[Litestar]) -> tuple[dict[str, Any], Samples]:
    rest = {}
    for name, path in (
        ("stats", "/api/v1/usage/stats"),
        ("costs", "/api/v1/usage/costs"),
        ("health", "/api/v1/health/comprehensive"),
        ("batch", "/api/v1/batch/executions/stats"),
        ("locks", "/api/v1/batch/locks"),
        ("expired", "/api/v1/batch/locks/expired"),
        ("status", "/api/v1/status"),
    ):
        response = await client.get(path)
        assert response.status_code == 200, (path, response.text)
        rest[name] = response.json()
    response = await client.get("/metrics")
    assert response.status_code == 200
    return rest, samples(response.text)


def expected_from_rest(rest: dict[str, Any]) -> Samples:
    """The series /metrics must carry, with the values the REST answers give."""
    want: Samples = {}

    def put(name: str, value: float, **labels: str) -> None:
        want[(name, tuple(sorted(labels.items())))] = value

    # Every call of this test is today's and nothing was reset: the lifetime counters equal
    # today's statistics.
    for model, row in rest["stats"]["by_model"].items():
        put("stockpilot_llm_requests_total", row["requests"], model=model)
        put("stockpilot_llm_failed_requests_total", row["failed_requests"], model=model)
        put("stockpilot_llm_cost_usd_total", row["cost_usd"], model=model)
        for kind in ("prompt", "completion", "cached"):
            put("stockpilot_llm_tokens_total", row[f"{kind}_tokens"], model=model, type=kind)
    for code, count in rest["stats"]["by_error_code"].items():
        put("stockpilot_llm_errors_total", count, error_code=code)
    for code, count in rest["stats"]["by_status_code"].items():
        put("stockpilot_llm_responses_total", count, status_code=code)
    put("stockpilot_llm_response_time_seconds_count", rest["stats"]["total_requests"])
    put("stockpilot_llm_today_error_ratio", rest["stats"]["error_rate"] / 100.0)
    put("stockpilot_llm_period_spend_usd", rest["costs"]["month"]["cost_usd"], period="month")
    put(
        "stockpilot_llm_budget_used_ratio",
        rest["costs"]["today"]["used_pct"] / 100.0,
        period="today",
    )
    for component in rest["health"]["components"]:
        labels = {"component": component["name"], "kind": component["kind"]}
        for status in ("healthy", "degraded", "unhealthy", "unknown"):
            value = 1.0 if component["status"] == status else 0.0
            put("stockpilot_component_status", value, status=status, **labels)
        up = 1.0 if component["status"] in ("healthy", "degraded") else 0.0
        put("stockpilot_component_up", up, **labels)
        if component["latency_ms"] is not None:
            seconds = component["latency_ms"] / 1000.0
            put("stockpilot_component_latency_seconds", seconds, **labels)
    put("stockpilot_health_status", 1.0, status=rest["health"]["status"])
    for job, row in rest["batch"]["by_job"].items():
        for status in ("succeeded", "failed", "cancelled", "lost", "running"):
            put("stockpilot_batch_executions", row[status], job=job, status=status, window="24h")
    put("stockpilot_batch_locks_open", rest["locks"]["total"])
    put("stockpilot_batch_locks_expired", rest["expired"]["total"])
    status = rest["status"]
    for service, state in status["services"].items():
        put("stockpilot_service_state", 1.0, service=service, state=state["status"])
        put(
            "stockpilot_service_up",
            1.0 if state["status"] != "unavailable" else 0.0,
            service=service,
        )
    put("stockpilot_alerts", status["alerts_24h"], window="24h")
    put("stockpilot_alert_hooks_process", 1.0, state=status["hooks_process"])
    for hook in status["hooks"]:
        put(
            "stockpilot_alert_hook_deliveries_total",
            hook["delivered"],
            hook=hook["name"],
            outcome="delivered",
        )
        put(
            "stockpilot_alert_hook_deliveries_total",
            hook["failures"],
            hook=hook["name"],
            outcome="failed",
        )
        put("stockpilot_alert_hook_state", 1.0, hook=hook["name"], state=hook["state"])
    return want


async def test_metrics_agree_with_the_rest_answers(
    env: dict[str, str], postgres_url: str, redis_url: str, clock: ManualClock
) -> None:
    system = env | {
        "STOCKPILOT_DATABASE_URL": postgres_url,
        "STOCKPILOT_REDIS_URL": redis_url,
        # Nothing listens there: an unhealthy component (OpenAI stays unknown: no key).
        "STOCKPILOT_EXTERNAL_APIS": json.dumps(
            [{"name": "quotes", "url": f"http://127.0.0.1:{free_port()}/q", "timeout_s": 0.5}]
        ),
        # The first round runs at start-up; no other one changes the figures meanwhile.
        "STOCKPILOT_HEALTH_INTERVAL_S": "3600",
        "STOCKPILOT_PROBE_TIMEOUT_S": "1",
        # A busy test machine must not make them degraded.
        "STOCKPILOT_DATABASE_SLOW_MS": "900",
        "STOCKPILOT_REDIS_SLOW_MS": "900",
        "STOCKPILOT_DAILY_BUDGET_USD": "10",
    }
    nc = await nats.connect(env["STOCKPILOT_NATS_URL"])
    async with (
        running_service(
            health.build(load_settings(HealthSettings, system)),
            load_settings(HealthSettings, system),
        ),
        # Usage and the gateway on the test clock ("today", the hooks status' age); health
        # and batch keep the machine's: the batch client stamps its runs and locks with it.
        running_service(
            usage.build(load_settings(UsageSettings, system)),
            load_settings(UsageSettings, system),
            clock=clock,
        ),
        running_service(
            batch.build(load_settings(BatchSettings, system)), load_settings(BatchSettings, system)
        ),
        AsyncTestClient(create_app(load_settings(GatewaySettings, env), clock)) as client,
    ):
        await wait_connected(client)
        js = nc.jetstream()
        await publish_usage(js, clock.now())
        await run_jobs(nc)
        await publish_hooks_status(js, clock.now())

        deadline = time.monotonic() + 15
        while True:
            rest, found = await rest_and_metrics(client)
            want = expected_from_rest(rest)
            got = {k: found.get(k) for k in want}
            settled = (
                got == want
                and rest["stats"]["total_requests"] == 4
                and rest["expired"]["total"] == 1
                and len(rest["batch"]["by_job"]) == 2
                and rest["health"]["checked_at"] is not None
            )
            if settled or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        assert got == want, {k: (got[k], v) for k, v in want.items() if got[k] != v}
    await nc.close()

    # What the events above must have produced, so the comparison is not of empty answers.
    model = (("model", "gpt-4o"),)
    assert found[("stockpilot_llm_requests_total", model)] == 2
    assert found[("stockpilot_llm_failed_requests_total", model)] == 1
    assert found[("stockpilot_llm_cost_usd_total", model)] >= 0.5
    assert found[("stockpilot_llm_errors_total", (("error_code", "rate_limit"),))] == 1
    # Four calls of 120 ms: all in the histogram's 0.25 s bucket, the retried one not counted.
    bucket = ("stockpilot_llm_response_time_seconds_bucket", (("le", "0.25"),))
    assert found[bucket] == 4
    assert found[("stockpilot_llm_duplicate_records_total", ())] == 0
    for component, status in (
        ("database", "healthy"),
        ("redis", "healthy"),
        ("openai", "unknown"),
        ("external.quotes", "unhealthy"),
    ):
        kind = {"external.quotes": "external_api"}.get(component, component)
        labels = (("component", component), ("kind", kind), ("status", status))
        assert found[("stockpilot_component_status", labels)] == 1.0, component
    failed = (("job", "report"), ("status", "failed"), ("window", "24h"))
    assert found[("stockpilot_batch_executions", failed)] == 1
    succeeded = (("job", "sync"), ("status", "succeeded"), ("window", "24h"))
    assert found[("stockpilot_batch_executions", succeeded)] == 1
    assert found[("stockpilot_batch_locks_open", ())] == 2
    assert found[("stockpilot_batch_locks_expired", ())] == 1
    for service in ("health", "usage", "batch"):
        assert found[("stockpilot_service_up", (("service", service),))] == 1.0
    assert found[("stockpilot_alerts", (("window", "24h"),))] >= 1  # the job failure at least
    skipped = (("hook", "slack"), ("outcome", "skipped_duplicate"))
    assert found[("stockpilot_alert_hook_deliveries_total", skipped)] == 1
    # The middleware's per-route figures are there too, labelled by route template.
    buckets = [
        labels
        for (name, labels) in found
        if name == "stockpilot_gateway_request_duration_seconds_bucket"
        and ("path", "/api/v1/usage/stats") in labels
    ]
    assert buckets


async def test_metrics_need_the_read_token_when_one_is_set(env: dict[str, str]) -> None:
    settings = load_settings(GatewaySettings, env | {"STOCKPILOT_READ_TOKEN": "r-secret"})
    async with AsyncTestClient(create_app(settings)) as client:
        assert (await client.get("/metrics")).status_code == 401
        wrong = await client.get("/metrics", headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 403
        right = await client.get("/metrics", headers={"Authorization": "Bearer r-secret"})
        assert right.status_code == 200
        assert "stockpilot_service_up" in right.text
