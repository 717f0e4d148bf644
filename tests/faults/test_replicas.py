"""Two replicas of each service: either one answers with the same figures, alerts are stored
once, a job lock still has exactly one holder, a forced release happens once.

The replicas are real runtimes (each its own thread and event loop, its own NATS connection)
sharing one queue group, as two processes would. Which instance answered is read from the
nats.micro statistics each instance keeps (`$SRV.STATS.stockpilot-<svc>`, every instance
replies), so the tests prove that both served requests, not just one of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import nats as nats_py
from nats.aio.client import Client as NATS

from services.batch.errors import LockHeldError
from services.batch.locks import acquire_lock
from shared.endpoints import endpoint_subject, micro_name
from shared.projection import view_digest
from shared.runtime import Runtime
from shared.settings import load_settings
from shared.streams import provision
from tests.clocks import NOON
from tests.faults.stack import _settings_class, service_env, wait_caught_up
from tests.harness import NatsServer, running_service

# 09:00 UTC six days before the run's noon: a past day the replicas are asked about.
DAY = NOON - timedelta(days=6, hours=3)
DAY_PARAMS = msgspec.json.encode({"date": DAY.date().isoformat()})


@contextlib.asynccontextmanager
async def replicas(
    service: str, env: dict[str, str], count: int = 2
) -> AsyncIterator[list[Runtime]]:
    """`count` instances of a real service, each with its own definition (its own view)."""
    settings = load_settings(_settings_class(service), env)
    build = importlib.import_module(f"services.{service}.service").build
    async with contextlib.AsyncExitStack() as stack:
        yield [
            await stack.enter_async_context(running_service(build(settings), settings))
            for _ in range(count)
        ]


async def instance_stats(nc: NATS, service: str, wait: float = 0.5) -> dict[str, dict[str, int]]:
    """Every instance's requests per endpoint ({instance id: {endpoint: n}})."""
    inbox = nc.new_inbox()
    answers: list[dict[str, Any]] = []

    async def collect(msg: Any) -> None:
        answers.append(msgspec.json.decode(msg.data))

    sub = await nc.subscribe(inbox, cb=collect)
    await nc.publish(f"$SRV.STATS.{micro_name(service)}", b"", reply=inbox)
    await asyncio.sleep(wait)
    await sub.unsubscribe()
    return {a["id"]: {e["name"]: e["num_requests"] for e in a["endpoints"]} for a in answers}


async def ask_many(nc: NATS, service: str, endpoint: str, params: bytes, n: int) -> list[bytes]:
    """`n` answers of one endpoint, asked concurrently (the queue group spreads them)."""
    subject = endpoint_subject(service, endpoint)
    replies = await asyncio.gather(*(nc.request(subject, params, timeout=5) for _ in range(n)))
    return [r.data for r in replies]


def usage_event(i: int, cost: float | None = None, at: datetime = DAY) -> bytes:
    return msgspec.json.encode(
        {
            "type": "usage.recorded",
            "id": f"rep-{i}",
            "occurred_at": (at + timedelta(seconds=i)).isoformat(),
            "model": "gpt-4o-mini",
            "status_code": 500 if i % 9 == 0 else 200,
            "prompt_tokens": 100,
            "completion_tokens": 10,
            "cost_usd": cost,
            "endpoint": f"/e{i % 3}",
        }
    )


def batch_events(i: int) -> list[tuple[str, bytes]]:
    at = (DAY + timedelta(minutes=i)).isoformat()
    common = {"execution_id": f"e{i}", "job_id": f"job-{i % 4}", "occurred_at": at}
    started = common | {"type": "batch.started", "id": f"e{i}.s", "host": "h", "pid": 1}
    finished = common | {
        "type": "batch.finished",
        "id": f"e{i}.f",
        "status": "failed" if i % 5 == 0 else "succeeded",
        "items_processed": i,
        "duration_s": 2.0,
        "throughput_per_s": i / 2,
        "peak_memory_mb": 20.0,
        "avg_cpu_percent": 3.0,
        "error": "boom" if i % 5 == 0 else None,
    }
    subject = f"stockpilot.batch.run.job-{i % 4}"
    return [(subject, msgspec.json.encode(started)), (subject, msgspec.json.encode(finished))]


async def publish(nc: NATS, messages: list[tuple[str, bytes]]) -> None:
    js = nc.jetstream()
    futures = [await js.publish_async(subject, data) for subject, data in messages]
    await asyncio.gather(*futures)


async def test_either_replica_answers_with_the_same_figures(
    nats: NatsServer, tmp_path: Path
) -> None:
    # One scheduled probe round per hour: the health views stay still while compared.
    env = service_env(nats.url, tmp_path / "data", STOCKPILOT_HEALTH_INTERVAL_S="3600")
    nc = await nats_py.connect(nats.url)
    try:
        await provision(nc.jetstream())
        slot_before = int(datetime.now(UTC).timestamp() // 3600)
        async with (
            replicas("usage", env) as usage,
            replicas("batch", env) as batch,
            replicas("health", env) as health,
        ):
            slot_after = int(datetime.now(UTC).timestamp() // 3600)
            await publish(nc, [("stockpilot.usage.recorded", usage_event(i)) for i in range(1500)])
            await publish(nc, [m for i in range(200) for m in batch_events(i)])
            queries = {
                "usage": ("stats", DAY_PARAMS, usage),
                "batch": ("recent", b'{"limit":1000}', batch),
                "health": ("digest", b"{}", health),
            }
            for service, (endpoint, params, instances) in queries.items():
                stream = f"STOCKPILOT_{service.upper()}"
                for _ in range(100):  # both replicas caught up with the stream
                    await wait_caught_up(nc, service, stream)
                    digests = {view_digest(r.tracked[service].projection.view) for r in instances}
                    if len(digests) == 1:
                        break
                    await asyncio.sleep(0.05)
                assert len(digests) == 1, f"{service} replicas folded different views"
                answers = await ask_many(nc, service, endpoint, params, 40)
                assert len(set(answers)) == 1, f"{service} replicas answered differently"
                served = await instance_stats(nc, service)
                assert set(served) == {r.instance for r in instances}
                assert all(counts[endpoint] > 0 for counts in served.values()), served
            stats = msgspec.json.decode((await ask_many(nc, "usage", "stats", DAY_PARAMS, 1))[0])
            assert stats["total_requests"] == 1500
            if slot_before == slot_after:
                # The replicas share the probe schedule: one round in this slot, not two.
                info = await nc.jetstream().stream_info(
                    "STOCKPILOT_HEALTH", subjects_filter="stockpilot.health.>"
                )
                sampled = (info.state.subjects or {}).get("stockpilot.health.host", 0)
                assert sampled == 1, info.state.subjects
    finally:
        await nc.close()


async def test_two_usage_replicas_store_a_budget_alert_once(
    nats: NatsServer, tmp_path: Path
) -> None:
    env = service_env(nats.url, tmp_path / "data", STOCKPILOT_DAILY_BUDGET_USD="1.0")
    nc = await nats_py.connect(nats.url)
    try:
        await provision(nc.jetstream())
        async with replicas("usage", env) as usage:
            now = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
            # 0.3 USD each: 80 % of the daily budget crossed at the 3rd, 100 % at the 4th.
            await publish(
                nc,
                [("stockpilot.usage.recorded", usage_event(i, 0.3, now)) for i in range(1, 7)],
            )
            js = nc.jetstream()
            kinds: dict[str, int] = {}
            ids: list[str] = []
            for _ in range(100):
                info = await js.stream_info("STOCKPILOT_ALERTS")
                ids, kinds = [], {}
                for seq in range(info.state.first_seq, info.state.last_seq + 1):
                    if info.state.messages == 0:
                        break
                    stored = await js.get_msg("STOCKPILOT_ALERTS", seq)
                    alert = msgspec.json.decode(stored.data or b"{}")
                    ids.append(alert["id"])
                    kinds[alert["kind"]] = kinds.get(alert["kind"], 0) + 1
                if {"usage.cost_warning", "usage.cost_exceeded"} <= set(kinds):
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)  # the slower replica's copies would land by now
            info = await js.stream_info("STOCKPILOT_ALERTS")
            assert info.state.messages == len(ids), "an alert was stored twice"
            assert kinds.get("usage.cost_warning") == 1, kinds
            assert kinds.get("usage.cost_exceeded") == 1, kinds
            assert len(set(ids)) == len(ids)
            # Both replicas derived the alerts; between them each was published once.
            assert sum(r.alerts_published for r in usage) == len(ids)
    finally:
        await nc.close()


async def test_job_lock_has_one_holder_and_one_forced_release_with_two_batch_replicas(
    nats: NatsServer, tmp_path: Path
) -> None:
    env = service_env(nats.url, tmp_path / "data")
    connections = [await nats_py.connect(nats.url) for _ in range(4)]
    nc = connections[0]
    try:
        await provision(nc.jetstream())
        async with replicas("batch", env):

            async def acquire(i: int) -> str | None:
                js = connections[i % len(connections)].jetstream()
                try:
                    lock = await acquire_lock(
                        js, "nightly-sync", owner=f"worker-{i}", execution_id=f"x{i}", ttl_s=60
                    )
                except LockHeldError:
                    return None
                return lock.owner

            owners = await asyncio.gather(*(acquire(i) for i in range(24)))
            winners = [o for o in owners if o is not None]
            assert len(winners) == 1, owners
            await wait_caught_up(nc, "batch", "STOCKPILOT_BATCH")
            statuses = {
                (s["owner"], s["fencing_token"], s["locked"])
                for s in map(
                    msgspec.json.decode,
                    await ask_many(nc, "batch", "lock_status", b'{"job_id":"nightly-sync"}', 20),
                )
            }
            assert len(statuses) == 1, statuses
            owner, fencing_token, locked = statuses.pop()
            assert (owner, locked) == (winners[0], True) and fencing_token > 0
            served = await instance_stats(nc, "batch")
            assert len(served) == 2 and all(c["lock_status"] > 0 for c in served.values())
            # Forced releases racing through both replicas: exactly one releases it.
            params = b'{"job_id":"nightly-sync","actor":"admin:test"}'
            releases = [
                msgspec.json.decode(a) for a in await ask_many(nc, "batch", "release", params, 20)
            ]
            assert sum(r["released"] for r in releases) == 1, releases
            served = await instance_stats(nc, "batch")
            assert all(c["release"] > 0 for c in served.values()), served
    finally:
        for connection in connections:
            await connection.close()
