"""Input validation (issue #22): nothing a producer publishes or a client sends is folded where
it does not belong, counted when dated in the future, or able to make a route answer 500.

Everything runs for real: a throwaway nats-server, the real services on the real runtime,
the real gateway app. Hostile events are published straight to the real streams, as a
producer with the `producer` role (or anyone who got past it) could.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from ops.replay import replay_definition
from services.batch.contract import BatchStarted, LockAcquired, lock_subject, run_subject
from services.health.contract import CHECKED_SUBJECT_PREFIX, HOST_SUBJECT, HealthChecked
from services.usage.contract import (
    SUBJECT_RECORDED,
    SUBJECT_RESET,
    StatsParams,
    UsageReset,
    UsageStats,
)
from services.usage.service import build as build_usage
from shared.dead_letters import DeadLetter
from shared.endpoints import endpoint_subject
from shared.events import Alert, admission_problem, rfc3339, utc_now
from shared.publish import publish_event
from shared.runtime import Runtime, ack_metadata
from shared.streams import provision
from tests.faults.stack import in_process_services, service_env
from tests.harness import running_service
from tests.usage.helpers import (
    ADMIN,
    INGEST,
    auth,
    gateway,
    gateway_settings,
    recorded,
    usage_settings,
)

# ----------------------------------------------------------------------------- helpers


class Letters:
    """Dead letters of every service, as they arrive on `stockpilot.deadletter.>`."""

    def __init__(self) -> None:
        self.items: list[DeadLetter] = []

    async def on_letter(self, msg: Any) -> None:
        self.items.append(msgspec.json.decode(msg.data, type=DeadLetter))

    def of(self, service: str) -> list[DeadLetter]:
        return [letter for letter in self.items if letter.service == service]


@contextlib.asynccontextmanager
async def connected(url: str) -> AsyncIterator[tuple[NATS, Any, Letters]]:
    nc = await nats.connect(url)
    js = nc.jetstream()
    await provision(js)
    letters = Letters()
    await nc.subscribe("stockpilot.deadletter.>", cb=letters.on_letter)
    try:
        yield nc, js, letters
    finally:
        await nc.close()


async def wait_for(check: Any, timeout: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def projection_status(runtime: Runtime, name: str) -> Any:
    return next(p for p in runtime.status().projections if p.name == name)


def folded(runtime: Runtime, name: str, seq: int) -> bool:
    return bool(projection_status(runtime, name).last_seq >= seq)


async def publish_raw(js: Any, subject: str, payload: bytes | dict[str, Any]) -> int:
    data = payload if isinstance(payload, bytes) else msgspec.json.encode(payload)
    ack = await js.publish(subject, data)
    return int(ack.seq)


async def stored_alerts(js: Any) -> list[Alert]:
    info = await js.stream_info("STOCKPILOT_ALERTS")
    alerts = []
    for seq in range(info.state.first_seq, info.state.last_seq + 1):
        if info.state.messages == 0:
            break
        msg = await js.get_msg("STOCKPILOT_ALERTS", seq)
        alerts.append(msgspec.json.decode(msg.data, type=Alert))
    return alerts


def usage_record(event_id: str, at: datetime, **fields: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "type": "usage.recorded",
        "id": event_id,
        "occurred_at": rfc3339(at),
        "model": "gpt-4o-mini",
        "status_code": 200,
    }
    values.update(fields)
    return values


# ------------------------------------------------------------------- events vs subjects


async def test_usage_events_off_their_subject_or_from_the_future_are_dead_letters(
    env: dict[str, str],
) -> None:
    """A reset on the recorded subject, a record dated 64 years, a day and 30 minutes ahead:
    all dead letters; the real calls after them are counted, the error-rate alert fires,
    nothing is alerted for tomorrow, and a replay refuses exactly the same events."""
    settings = usage_settings(
        env, daily_budget_usd="1.0", error_rate_alert_pct="20", error_rate_min_calls="5"
    )
    now = utc_now()
    tomorrow = now + timedelta(days=1)
    async with (
        connected(env["STOCKPILOT_NATS_URL"]) as (nc, js, letters),
        running_service(build_usage(settings), settings) as runtime,
    ):
        reset = UsageReset(id="evil-reset", occurred_at=now, actor="attacker")
        await publish_event(js, SUBJECT_RECORDED, reset)
        hostile = [
            recorded(900, now + timedelta(days=64 * 365), status_code=500),
            recorded(901, tomorrow, cost_usd=0.95),
            recorded(902, now + timedelta(minutes=30), status_code=500),
        ]
        for event in hostile:
            await publish_event(js, SUBJECT_RECORDED, event)
        # Real calls after them: 5 of 10 fail within the last minute, $1.00 spent.
        real = [
            recorded(i, now - timedelta(seconds=50 - i), status_code=500 if i < 5 else 200)
            for i in range(10)
        ]
        real = [msgspec.structs.replace(e, cost_usd=0.1) for e in real]
        for event in real:
            await publish_event(js, SUBJECT_RECORDED, event)
        # A reset where resets belong still works (and is folded, not dead-lettered).
        # Seq 1 is the price table the usage service published at start.
        await wait_for(lambda: folded(runtime, "usage", 15) and len(letters.of("usage")) >= 4)

        usage = letters.of("usage")
        assert len(usage) == 4, [letter.reason for letter in usage]
        assert "belongs on stockpilot.usage.reset" in usage[0].reason
        for letter in usage[1:]:
            assert "after the event was stored" in letter.reason, letter.reason
        assert projection_status(runtime, "usage").dead_lettered == 4

        answer = await nc.request(
            endpoint_subject("usage", "stats"),
            msgspec.json.encode(
                StatsParams(
                    start=(now - timedelta(days=1)).date().isoformat(),
                    end=now.date().isoformat(),
                )
            ),
            timeout=5,
        )
        stats = msgspec.json.decode(answer.data, type=UsageStats)
        assert stats.total_requests == 10  # not reset, nothing from the future
        assert stats.failed_requests == 5
        ahead = await nc.request(
            endpoint_subject("usage", "stats"),
            msgspec.json.encode(StatsParams(date=tomorrow.date().isoformat())),
            timeout=5,
        )
        assert msgspec.json.decode(ahead.data, type=UsageStats).total_requests == 0

        await wait_for(lambda: runtime.alerts_published >= 1)
        await asyncio.sleep(0.3)
        alerts = await stored_alerts(js)
        assert any(a.kind == "usage.error_rate" for a in alerts), [a.id for a in alerts]
        tomorrow_key = tomorrow.date().isoformat()
        assert not [a.id for a in alerts if tomorrow_key in a.id]

        # Decided from the stored timestamp: a replay refuses the same four events.
        results = await replay_definition(nc, build_usage(settings), "STOCKPILOT_USAGE")
        [result] = [r for r in results if r.projection == "usage"]
        assert result.equal and result.refused == 4 and result.events == 11  # + the prices

        # A reset on its own subject still resets.
        await publish_event(
            js, SUBJECT_RESET, UsageReset(id="real-reset", occurred_at=utc_now(), actor="ops")
        )
        await wait_for(lambda: folded(runtime, "usage", 16))
        assert len(letters.of("usage")) == 4


async def test_health_and_batch_events_off_their_subject_are_dead_letters(
    env: dict[str, str], tmp_path: Path
) -> None:
    """A result of `redis` on the database subject, a host sample on a component subject,
    a lock event of job `victim` on job `attacker`'s lock subject, a run of `victim` on
    `attacker`'s run subject: all dead letters; the victim's lock stays free."""
    now = utc_now()
    full_env = service_env(env["STOCKPILOT_NATS_URL"], tmp_path / "svc")
    async with (
        connected(env["STOCKPILOT_NATS_URL"]) as (nc, js, letters),
        in_process_services(full_env, ("health", "batch")) as runtimes,
    ):
        redis = HealthChecked(
            id="evil-hc", occurred_at=now, component="redis", kind="redis", status="unhealthy"
        )
        await publish_event(js, CHECKED_SUBJECT_PREFIX + "database", redis)
        await publish_event(js, HOST_SUBJECT, msgspec.structs.replace(redis, id="evil-hc2"))
        acquired = LockAcquired(
            id="evil-lock",
            occurred_at=now,
            job_id="victim",
            owner="attacker",
            expires_at=now + timedelta(hours=1),
        )
        lock_seq = (await publish_event(js, lock_subject("attacker"), acquired)).seq
        started = BatchStarted(
            id="evil-run",
            occurred_at=now,
            execution_id="evil-1",
            job_id="victim",
            host="h",
            pid=1,
        )
        await publish_event(js, run_subject("attacker"), started)
        await wait_for(lambda: len(letters.of("health")) >= 2 and len(letters.of("batch")) >= 2)
        health = letters.of("health")
        assert {letter.subject for letter in health} == {
            CHECKED_SUBJECT_PREFIX + "database",
            HOST_SUBJECT,
        }
        assert all("redis" in letter.reason for letter in health)
        batch = letters.of("batch")
        assert {letter.subject for letter in batch} == {
            lock_subject("attacker"),
            run_subject("attacker"),
        }
        assert any(letter.stream_seq == lock_seq for letter in batch)
        assert all("victim" in letter.reason for letter in batch)
        status = await nc.request(
            endpoint_subject("batch", "lock_status"), b'{"job_id":"victim"}', timeout=5
        )
        assert msgspec.json.decode(status.data)["locked"] is False
        recent = await nc.request(endpoint_subject("batch", "recent"), b"{}", timeout=5)
        assert msgspec.json.decode(recent.data)["executions"] == []
        assert projection_status(runtimes["batch"], "batch").dead_lettered == 2


# --------------------------------------------------------------- bounds on the streams

DEEP = b"[" * 10_000 + b"]" * 10_000
HUGE = "x" * 600_000


def hostile_events(now: datetime) -> list[tuple[str, bytes | dict[str, Any]]]:
    """What the attacker published: every value outside the contract's bounds."""
    at = rfc3339(now)
    usage = SUBJECT_RECORDED
    run = run_subject("nightly")
    started = {
        "type": "batch.started",
        "occurred_at": at,
        "execution_id": "x1",
        "job_id": "nightly",
        "host": "h",
        "pid": 1,
    }
    progress = {
        "type": "batch.progress",
        "occurred_at": at,
        "execution_id": "x1",
        "job_id": "nightly",
        "items_processed": 1,
        "memory_mb": 1.0,
        "cpu_percent": 1.0,
    }
    checked = {
        "type": "health.checked",
        "occurred_at": at,
        "component": "database",
        "kind": "database",
        "status": "healthy",
    }
    database = CHECKED_SUBJECT_PREFIX + "database"
    return [
        (usage, usage_record("h-cost", now, cost_usd=1.7e308)),
        (usage, usage_record("h-tokens", now, prompt_tokens=2**64 - 1)),
        (usage, usage_record("h-tokens-2", now, completion_tokens=10**9)),
        (usage, usage_record("h-latency", now, response_time_ms=1e8)),
        (usage, usage_record("h-negative", now, response_time_ms=-1.0)),
        (usage, usage_record("h-model", now, model=HUGE)),
        (usage, usage_record("h-user", now, user_id="u" * 10_000)),
        (usage, usage_record("h-ctrl", now, model="evil\r\nNats-Expected-Stream: NOPE")),
        (usage, usage_record("h-far", datetime(9999, 12, 31, 23, 59, tzinfo=UTC))),
        (
            usage,
            msgspec.json.encode(usage_record("h-old", now)).replace(
                at.encode(), b"0001-01-01T00:00:00+09:00"
            ),
        ),
        (
            usage,
            msgspec.json.encode(usage_record("h-utf8", now, user_id="@")).replace(
                b'"@"', b'"\xff\xfe"'
            ),
        ),
        (usage, msgspec.json.encode(usage_record("h-deep", now, model="@")).replace(b'"@"', DEEP)),
        (run, {**started, "id": "h-host", "host": HUGE}),
        (run, {**started, "id": "h-pid", "pid": 2**64 - 1}),
        (run, {**progress, "id": "h-memory", "memory_mb": 1.7e308}),
        (run, {**progress, "id": "h-items", "items_processed": 2**64 - 1}),
        (
            run,
            {
                **progress,
                "id": "h-warnings",
                "type": "batch.finished",
                "status": "failed",
                "duration_s": 1.0,
                "throughput_per_s": 1.0,
                "peak_memory_mb": 1.0,
                "avg_cpu_percent": 1.0,
                "warnings": ["w" * 100] * 10_000,
            },
        ),
        (database, {**checked, "id": "h-details", "details": {"target": HUGE}}),
        (database, {**checked, "id": "h-nested", "details": {"a": {"b": {"c": [1]}}}}),
        (database, {**checked, "id": "h-bigint", "details": {"n": 2**70}}),
        (database, {**checked, "id": "h-latency", "latency_ms": -5.0}),
        (database, {**checked, "id": "h-error", "error": HUGE}),
    ]


def good_events(now: datetime) -> list[tuple[str, dict[str, Any]]]:
    """Real traffic after the attack (and one extreme but valid lock)."""
    at = rfc3339(now)
    return [
        (SUBJECT_RECORDED, usage_record("g-1", now, cost_usd=0.5, prompt_tokens=999_999_999)),
        (
            run_subject("nightly"),
            {
                "type": "batch.started",
                "id": "g-run",
                "occurred_at": at,
                "execution_id": "g-1",
                "job_id": "nightly",
                "host": "worker-1",
                "pid": 42,
            },
        ),
        (
            lock_subject("nightly"),
            {
                "type": "lock.acquired",
                "id": "g-lock",
                "occurred_at": at,
                "job_id": "nightly",
                "owner": "worker-1",
                "expires_at": "9999-12-31T23:59:59Z",
            },
        ),
        (
            CHECKED_SUBJECT_PREFIX + "database",
            {
                "type": "health.checked",
                "id": "g-hc",
                "occurred_at": at,
                "component": "database",
                "kind": "database",
                "status": "healthy",
                "latency_ms": 1.5,
                "details": {"version": "16", "connections_pct": 3.5, "ok": True},
            },
        ),
    ]


async def test_out_of_range_events_are_dead_letters_and_no_get_route_answers_5xx(
    env: dict[str, str], tmp_path: Path
) -> None:
    """The issue's hostile values, straight to the real streams: each is a dead letter with a
    reason; real events after them are folded, snapshots go on being taken, and every GET
    route of the real gateway answers below 500."""
    url = env["STOCKPILOT_NATS_URL"]
    full_env = service_env(url, tmp_path / "svc", STOCKPILOT_SNAPSHOT_EVERY_S="0.2")
    now = utc_now()
    async with (
        connected(url) as (nc, js, letters),
        in_process_services(full_env) as runtimes,
    ):
        refused: dict[str, set[int]] = {"usage": set(), "batch": set(), "health": set()}
        for subject, payload in hostile_events(now):
            seq = await publish_raw(js, subject, payload)
            refused[subject.split(".")[1]].add(seq)
        last: dict[str, int] = {}
        for subject, payload in good_events(now):
            last[subject.split(".")[1]] = await publish_raw(js, subject, payload)

        def all_lettered() -> bool:
            return all(
                seqs <= {letter.stream_seq for letter in letters.of(service)}
                for service, seqs in refused.items()
            )

        await wait_for(all_lettered)
        # A refused event near the server's limit is copied in part (the letter must fit).
        assert any(x.payload_truncated and x.payload_bytes for x in letters.of("batch"))
        assert all(letter.reason.strip() for letter in letters.items)
        assert not any("could not be applied" in letter.reason for letter in letters.items)
        for service, seq in last.items():
            await wait_for(lambda s=service, q=seq: folded(runtimes[s], s, q))  # type: ignore[misc]
            status = projection_status(runtimes[service], service)
            assert status.dead_lettered >= len(refused[service])
            # The snapshot loop lives on and catches up with what was folded.
            await wait_for(
                lambda s=service, q=seq: projection_status(runtimes[s], s).snapshot_seq >= q  # type: ignore[misc]
            )

        async with gateway(gateway_settings(full_env)) as client:
            stats = (await client.get("/api/v1/usage/stats")).json()
            assert stats["total_requests"] >= 1 and stats["total_cost_usd"] >= 0.5
            paths = get_routes(client)
            assert len(paths) >= 15
            day = now.date()
            paths += [
                "/api/v1/batch/executions/recent?limit=1000",
                "/api/v1/batch/executions/recent?job_id=nightly",
                "/api/v1/batch/executions/stats?hours=9600",
                "/api/v1/usage/alerts?limit=1000",
                f"/api/v1/usage/stats?start={day - timedelta(days=89)}&end={day}",
                f"/api/v1/usage/timeseries?bucket=day&start={day - timedelta(days=89)}&end={day}",
                "/api/v1/health/history?hours=2160",
                "/api/v1/health/history?component=database",
            ]
            for path in paths:
                response = await client.get(path)
                assert response.status_code < 500, (path, response.status_code, response.text)
            recent = (await client.get("/api/v1/batch/executions/recent")).json()
            assert [e["host"] for e in recent["executions"]] == ["worker-1"]


def get_routes(client: Any) -> list[str]:
    """Every GET path of the app (path parameters filled in), the never-ending SSE left out."""
    paths = []
    for route in client.app.routes:
        if "GET" not in getattr(route, "methods", ()):
            continue
        path = route.path.replace("{job_id:str}", "nightly")
        if path.endswith("/alerts/stream") or "{" in path:
            continue
        paths.append(path)
    return sorted(set(paths))


# ------------------------------------------------------------------------------ over HTTP


async def test_out_of_range_input_over_http_is_422_with_a_detail_never_500(
    env: dict[str, str], tmp_path: Path
) -> None:
    """The same bounds over HTTP: a refused single record is a 422 naming the field, a list
    names each refused record; deep JSON, invalid UTF-8, dates out of range and 600 KB
    strings are 422 (too large a body 413), every time with a `detail`."""
    url = env["STOCKPILOT_NATS_URL"]
    full_env = service_env(url, tmp_path / "svc")
    now = utc_now()
    records = "/api/v1/usage/records"
    ingest = auth(INGEST)
    admin = auth(ADMIN)
    single_cases = [
        ({"cost_usd": 1.7e308}, "cost_usd"),
        ({"prompt_tokens": 2**64 - 1}, "prompt_tokens"),
        ({"cached_tokens": 10**9}, "cached_tokens"),
        ({"response_time_ms": 1e8}, "response_time_ms"),
        ({"model": HUGE}, "model"),
        ({"endpoint": "/" * 600}, "endpoint"),
        ({"user_id": "u" * 300}, "user_id"),
        ({"model": "gpt\r\nX-Injected: 1"}, "control characters"),
        ({"request_id": "r\x1b[31m"}, "control characters"),
        ({"occurred_at": rfc3339(now + timedelta(days=1))}, "in the future"),
        ({"occurred_at": "9999-12-31T23:59:59Z"}, "in the future"),
        ({"occurred_at": "0001-01-01T00:00:00+09:00"}, "before 2000"),
    ]
    async with (
        in_process_services(full_env, ("usage", "batch")),
        gateway(gateway_settings(full_env)) as client,
    ):

        async def refused(response: Any, status: int = 422) -> str:
            assert response.status_code == status, (response.status_code, response.text)
            detail = response.json()["detail"]
            assert isinstance(detail, str) and detail.strip()
            return detail

        for fields, named in single_cases:
            body = {"model": "gpt-4o-mini", "status_code": 200, "request_id": "r", **fields}
            detail = await refused(await client.post(records, json=body, headers=ingest))
            assert named in detail, (fields.keys(), detail)
        listed = [
            {"model": "gpt-4o-mini", "status_code": 200, "request_id": f"r{i}", **fields}
            for i, (fields, _) in enumerate(single_cases)
        ]
        listed.append({"model": "gpt-4o-mini", "status_code": 200, "request_id": "fine"})
        answer = await client.post(records, json=listed, headers=ingest)
        assert answer.status_code == 202
        assert answer.json()["accepted"] == 1
        reasons = {r["index"]: r["reason"] for r in answer.json()["rejected"]}
        assert sorted(reasons) == list(range(len(single_cases)))
        for index, (_, named) in enumerate(single_cases):
            assert named in reasons[index], reasons[index]

        deep = b"[" * 10_000 + b"]" * 10_000
        deep_object = b'{"model":' + deep + b',"status_code":200}'
        bodies = [
            ("/api/v1/usage/records", ingest),
            ("/api/v1/usage/reset", admin),
            ("/api/v1/batch/jobs/nightly/lock/release", admin),
        ]
        for path, headers in bodies:
            # A typed body refuses a wrong shape before reading deeper: any detail will do.
            deep_named = "deep" if path == records else ""
            field = b"model" if path == records else b"reason"
            not_utf8 = b'{"' + field + b'":"gpt-\xff\xfe","status_code":200}'
            for content, named in [(deep, deep_named), (deep_object, ""), (not_utf8, "UTF-8")]:
                headers = {**headers, "Content-Type": "application/json"}
                response = await client.post(path, content=content, headers=headers)
                detail = await refused(response)
                assert named in detail, (path, detail)
            if path == records:
                # In a list, a record of invalid UTF-8 is refused on its own (the gateway
                # passes records on as posted bytes; the service reads their strings).
                fine = b'{"model":"gpt-4o-mini","status_code":200,"request_id":"utf8-fine"}'
                listed_bytes = b"[" + fine + b"," + not_utf8 + b"]"
                response = await client.post(path, content=listed_bytes, headers=headers)
                assert response.status_code == 202, response.text
                assert response.json()["accepted"] == 1
                [refusal] = response.json()["rejected"]
                assert refusal["index"] == 1 and "UTF-8" in refusal["reason"], refusal
            long_reason = msgspec.json.encode({"reason": HUGE})
            response = await client.post(path, content=long_reason, headers=headers)
            assert response.status_code == 422, (path, response.text)
            too_big = await client.post(path, content=b" " * (2 * 1024 * 1024), headers=headers)
            await refused(too_big, 413)

        for path, named in [
            ("/api/v1/usage/stats?date=9999-12-31", "'date'"),
            ("/api/v1/usage/stats?start=0001-01-01&end=0001-01-02", "'start'"),
            # fixed history: a start long past, so only the end (beyond any year) is refused
            ("/api/v1/usage/stats?start=2020-01-01&end=9999-12-31", "'end'"),
            ("/api/v1/usage/timeseries?start=9999-12-31", "'start'"),
            ("/api/v1/usage/timeseries?start=0001-01-01T00:00:00Z", "'start'"),
            ("/api/v1/usage/timeseries?bucket=day&end=9999-12-31T23:59:59-09:00", "'end'"),
            (f"/api/v1/usage/stats?date={'9' * 10_000}", "'date'"),
            ("/api/v1/usage/stats?date=%FF%FE", "'date'"),
            (f"/api/v1/batch/executions/recent?job_id={'j' * 10_000}", "'job_id'"),
            ("/api/v1/batch/executions/recent?job_id=%FF", "'job_id'"),
            (f"/api/v1/batch/jobs/{'j' * 10_000}/lock/status", "'job_id'"),
            ("/api/v1/batch/executions/stats?hours=1e308", "hours"),
            ("/api/v1/usage/alerts?limit=18446744073709551615", "limit"),
        ]:
            detail = await refused(await client.get(path))
            assert named in detail, (path, detail)


async def test_a_full_history_of_the_largest_valid_executions_is_still_answered(
    env: dict[str, str], tmp_path: Path
) -> None:
    """A thousand failed runs, each with the longest host, error, warnings and traceback the
    events allow: /recent?limit=1000 fits in one answer (older texts shortened) instead of a
    500, and the stats' failure patterns are computed in time (no quadratic regex)."""
    url = env["STOCKPILOT_NATS_URL"]
    full_env = service_env(url, tmp_path / "svc")
    at = rfc3339(utc_now())
    async with (
        connected(url) as (nc, js, letters),
        in_process_services(full_env, ("batch",)) as runtimes,
    ):
        acks = []
        for i in range(1000):
            base = {"occurred_at": at, "execution_id": f"x{i}", "job_id": "nightly"}
            started = {**base, "type": "batch.started", "id": f"s{i}", "host": "h" * 255, "pid": 1}
            finished = {
                **base,
                "type": "batch.finished",
                "id": f"f{i}",
                "status": "failed",
                "items_processed": 1,
                "duration_s": 1.0,
                "throughput_per_s": 1.0,
                "peak_memory_mb": 1.0,
                "avg_cpu_percent": 1.0,
                "warnings": ["w" * 1000] * 100,
                "error": "e" * 10_000,
                "traceback": "t" * 100_000,
            }
            for event in (started, finished):
                acks.append(
                    await js.publish_async(run_subject("nightly"), msgspec.json.encode(event))
                )
        last = (await asyncio.gather(*acks))[-1].seq
        await wait_for(lambda: folded(runtimes["batch"], "batch", last), 60)
        assert letters.of("batch") == []
        async with gateway(gateway_settings(full_env)) as client:
            recent = await client.get("/api/v1/batch/executions/recent?limit=1000")
            assert recent.status_code == 200, recent.text[:300]
            body = recent.json()
            assert body["total"] == 1000 and len(body["executions"]) >= 50
            newest = body["executions"][0]
            assert newest["execution_id"] == "x999" and newest["traceback"]
            stats = await client.get("/api/v1/batch/executions/stats")
            assert stats.status_code == 200, stats.text[:300]
            assert stats.json()["failed"] == 1000


async def test_the_nats_py_path_decides_from_the_stored_timestamp_too(
    env: dict[str, str],
) -> None:
    """With the bare reader off (nats-py's ordered consumer), the same record is refused: the
    time comes from the message's JetStream metadata either way."""
    settings = usage_settings(env)
    now = utc_now()
    async with (
        connected(env["STOCKPILOT_NATS_URL"]) as (nc, js, letters),
        running_service(build_usage(settings), settings, bare_reads=False) as runtime,
    ):
        await publish_event(js, SUBJECT_RECORDED, recorded(1, now + timedelta(minutes=10)))
        await publish_event(js, SUBJECT_RECORDED, recorded(2, now + timedelta(minutes=4)))
        await publish_event(js, SUBJECT_RECORDED, recorded(3, now))
        # Seq 1 is the price table the usage service published at start.
        await wait_for(lambda: folded(runtime, "usage", 4) and len(letters.of("usage")) == 1)
        [letter] = letters.of("usage")
        assert letter.stream_seq == 2 and "after the event was stored" in letter.reason
        # Within the allowance (a producer's clock a little ahead) a record counts.
        assert projection_status(runtime, "usage").events_applied == 3


def test_ack_metadata_reads_the_stored_time_like_nats_py() -> None:
    for reply in (
        "$JS.ACK.STOCKPILOT_USAGE.c1.1.42.7.1700000000123456789.99",
        "$JS.ACK._.HASH.STOCKPILOT_USAGE.c1.1.42.7.1700000000123456789.99.rnd",
    ):
        msg = Msg(None, subject="stockpilot.usage.recorded", reply=reply)  # type: ignore[arg-type]
        seq, pending, stored_ns = ack_metadata(msg)
        assert (seq, pending) == (msg.metadata.sequence.stream, msg.metadata.num_pending)
        assert stored_ns == 1700000000123456789
        assert abs(stored_ns / 1e9 - msg.metadata.timestamp.timestamp()) < 1e-3


def test_the_five_minute_allowance_is_exact_whatever_the_offset_or_order() -> None:
    """The fast comparison per stored second never changes the exact decision."""
    event = recorded(1)
    stored_ns = int(utc_now().timestamp()) * 10**9 + 700_000_000
    other_ns = stored_ns - 86_400 * 10**9
    stored = datetime.fromtimestamp(stored_ns / 1e9, UTC)
    seoul = timezone(timedelta(hours=9))
    cases = [(299.9, True), (300.0, True), (300.2, False), (301.0, False), (-86_400.0, True)]
    for ahead, allowed in cases:
        for zone in (UTC, seoul):
            at = (stored + timedelta(seconds=ahead)).astimezone(zone)
            dated = msgspec.structs.replace(event, occurred_at=at)
            # Alternate with another stored second, so the per-second bound is recomputed.
            assert admission_problem(dated, None, other_ns) is not None or ahead < -86_000
            assert (admission_problem(dated, None, stored_ns) is None) == allowed, (ahead, zone)
    old = msgspec.structs.replace(event, occurred_at=datetime(1999, 12, 31, 23, 59, tzinfo=UTC))
    assert "before 2000" in (admission_problem(old, None, stored_ns) or "")
