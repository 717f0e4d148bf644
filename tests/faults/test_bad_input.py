"""Bad input never crashes anything: a schema-driven sweep of the gateway, garbage on every subject.

- schemathesis, driven by the gateway's own OpenAPI schema, against the real gateway process
  (uvicorn, `stockpilot gateway`) in front of the three real services: no 5xx, every status
  and body as documented.
- hypothesis-generated garbage published to JetStream on every subject the services fold
  (malformed, of the wrong type, out of the contract's ranges, on another type's subject,
  dated in the future): each message is dead-lettered, with a reason, by every service that
  folds it, and each service keeps folding good events and answering.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from nats import connect as nats_connect

from services.usage.contract import UsageCounters
from shared.dead_letters import DeadLetter
from shared.endpoints import endpoint_subject
from shared.events import rfc3339
from shared.service_status import ServiceStatus
from tests.clocks import NOON
from tests.faults.stack import ROOT, gateway_process, in_process_services, service_env
from tests.harness import NatsServer

ADMIN = "admin-token-for-the-sweep"
# Per operation; each example is one request. STOCKPILOT_SCHEMATHESIS_EXAMPLES raises it.
MAX_EXAMPLES = os.environ.get("STOCKPILOT_SCHEMATHESIS_EXAMPLES", "25")


@pytest.mark.parametrize("token", [True, False], ids=["admin-token", "no-token"])
async def test_schemathesis_sweep_finds_no_server_error_and_no_schema_violation(
    nats: NatsServer, tmp_path: Path, token: bool
) -> None:
    """Every documented operation, fuzzed from the schema, with every check schemathesis has.

    The schema states what the gateway accepts (request bodies, job-id patterns, date
    formats, printable names, `additionalProperties: false`), so schema-valid requests must
    be accepted (positive_data_acceptance) and schema-violating ones refused
    (negative_data_rejection); tests/faults/schemathesis_hooks.py keeps the positive cases
    inside the two rules a schema cannot state (not dated after now; usage ranges).
    Excluded: /api/v1/alerts/stream (Server-Sent Events never end, so a request never
    completes). The stateful phase is left out: no route creates a resource that another
    one reads by id (a lock is keyed by the job id the client chose).

    Run with the admin token and without any: the schema's security requirements (from the
    guards) must hold too (`ignored_auth`: a route that needs a token refuses a request
    without one).
    """
    env = service_env(
        nats.url,
        tmp_path / "data",
        STOCKPILOT_ADMIN_TOKEN=ADMIN,
        STOCKPILOT_INGEST_TOKEN="ingest-token-for-the-sweep",
    )
    async with in_process_services(env):
        with gateway_process(env, tmp_path) as base:
            command = [
                str(Path(sys.executable).parent / "schemathesis"),
                "run",
                f"{base}/schema/openapi.json",
                *(["--header", f"Authorization: Bearer {ADMIN}"] if token else []),
                "--max-examples",
                MAX_EXAMPLES,
                "--exclude-path",
                "/api/v1/alerts/stream",
                "--checks",
                "all",
                "--phases",
                "examples,coverage,fuzzing",
                "--request-timeout",
                "20",
                # One worker: with two, hypothesis's lambda-source lookup races inside the
                # coverage phase (a schemathesis runtime error, not a finding).
                "--workers",
                "1",
                "--no-shrink",
                "--max-failures",
                "20",
            ]
            result = await asyncio.to_thread(
                subprocess.run,
                command,
                capture_output=True,
                text=True,
                cwd=tmp_path,
                env=os.environ
                | {
                    "SCHEMATHESIS_HOOKS": "tests.faults.schemathesis_hooks",
                    "PYTHONPATH": str(ROOT),
                },
                timeout=150,
                check=False,
            )
        nc = await nats_connect(nats.url)
        try:
            msg = await nc.request(endpoint_subject("usage", "counters"), b"{}", timeout=5)
            counters = msgspec.json.decode(msg.data, type=UsageCounters)
            stored = sum(model.requests for model in counters.by_model.values())
        finally:
            await nc.close()
    output = result.stdout + result.stderr
    print(output[-3000:])
    assert result.returncode == 0, output[-6000:]
    tested = re.search(r"Tested:\s+(\d+)", output)
    assert tested is not None and int(tested.group(1)) >= 20, "the sweep covered too little"
    # The ingest route was fuzzed with records it had to accept, not only with refusals.
    if token:
        assert stored >= 10, f"only {stored} fuzzed usage records were stored"
    else:
        assert stored == 0, "records were stored without a token"


# ------------------------------------------------------------------------------ garbage

# 09:00 UTC on the run's noon day: at or before now, never a literal date.
T = rfc3339(NOON - timedelta(hours=3))
TEMPLATES: dict[str, dict[str, Any]] = {
    "stockpilot.usage.recorded": {
        "type": "usage.recorded",
        "id": "g",
        "occurred_at": T,
        "model": "gpt-4o-mini",
        "status_code": 200,
    },
    "stockpilot.usage.reset": {"type": "usage.reset", "id": "g", "occurred_at": T, "actor": "a"},
    "stockpilot.health.checked.database": {
        "type": "health.checked",
        "id": "g",
        "occurred_at": T,
        "component": "database",
        "kind": "database",
        "status": "healthy",
    },
    "stockpilot.batch.run.nightly": {
        "type": "batch.progress",
        "id": "g",
        "occurred_at": T,
        "execution_id": "x1",
        "job_id": "nightly",
        "items_processed": 1,
        "memory_mb": 1.0,
        "cpu_percent": 1.0,
    },
    "stockpilot.batch.lock.nightly": {
        "type": "lock.released",
        "id": "g",
        "occurred_at": T,
        "job_id": "nightly",
        "owner": "w",
        "reason": "released",
        "by": "w",
    },
}
for _source in ("usage", "health", "batch"):
    TEMPLATES[f"stockpilot.alerts.{_source}.garbage"] = {
        "type": "alert",
        "id": "g",
        "occurred_at": T,
        "source": _source,
        "kind": f"{_source}.garbage",
        "severity": "warning",
        "title": "t",
        "message": "m",
        "metric": "m",
        "value": 1.0,
        "threshold": 2.0,
    }
# Required fields all: None, a list, an object or a boolean is wrong for every one of them.
WRONG_FOR_ANY: st.SearchStrategy[object] = st.sampled_from([None, [], {}, True])


@st.composite
def near_valid(draw: st.DrawFn, subject: str) -> bytes:
    """A contract event of the subject with one required field of the wrong type."""
    event = dict(TEMPLATES[subject])
    field = draw(st.sampled_from(sorted(set(event) - {"id"})))
    original = event[field]
    if field == "type":
        wrong: object = draw(st.sampled_from(["usage.exploded", "alert2", 7, None]))
    elif isinstance(original, str):
        wrong = draw(WRONG_FOR_ANY | st.just(12345))
    else:
        wrong = draw(WRONG_FOR_ANY | st.just("seven"))
    event[field] = wrong
    event["id"] = f"garbage-{draw(st.uuids())}"
    return msgspec.json.encode(event)


# Values outside the contract's bounds (§4), one field at a time: each makes its template a
# dead letter. Alerts are checked too (each service folds them), though only services write
# them.
OUT_OF_RANGE: dict[str, list[tuple[str, object]]] = {
    "stockpilot.usage.recorded": [
        ("cost_usd", 1.7e308),
        ("cost_usd", 1e6),
        ("prompt_tokens", 2**64 - 1),
        ("completion_tokens", 10**9),
        ("cached_tokens", -1),
        ("response_time_ms", 1e8),
        ("status_code", 1000),
        ("model", "m" * 129),
        ("model", ""),
        ("model", "gpt\r\nX-Injected: 1"),
        ("user_id", "u" * 257),
        ("endpoint", "/" * 513),
    ],
    "stockpilot.usage.reset": [("actor", "a" * 201), ("reason", "r" * 501)],
    "stockpilot.health.checked.database": [
        ("component", "redis"),
        ("latency_ms", -1.0),
        ("details", {"n": 2**70}),
        ("details", {"nested": {"a": 1}}),
        ("details", {"target": "t" * 1001}),
        ("error", "e" * 4001),
    ],
    "stockpilot.batch.run.nightly": [
        ("job_id", "another-job"),
        ("memory_mb", 1e9),
        ("items_processed", 10**15),
        ("cpu_percent", -1.0),
        ("execution_id", "x" * 129),
    ],
    "stockpilot.batch.lock.nightly": [
        ("job_id", "another-job"),
        ("owner", "o" * 257),
        ("by", ""),
        ("note", "n" * 1001),
    ],
}
for _source in ("usage", "health", "batch"):
    OUT_OF_RANGE[f"stockpilot.alerts.{_source}.garbage"] = [
        ("kind", f"{_source}.another_kind"),
        ("value", 1e301),
        ("message", "m" * 10_001),
    ]


@st.composite
def out_of_range(draw: st.DrawFn, subject: str) -> bytes:
    """A contract event of the subject that breaks a bound, is dated in the future (by more
    than 5 minutes, as the stream stores it now) or belongs to another subject."""
    kind = draw(st.sampled_from(["bound", "future", "elsewhere"]))
    if kind == "elsewhere":
        other = draw(st.sampled_from(sorted(set(TEMPLATES) - {subject})))
        event = dict(TEMPLATES[other])
    else:
        event = dict(TEMPLATES[subject])
    if kind == "bound":
        field, value = draw(st.sampled_from(OUT_OF_RANGE[subject]))
        event[field] = value
    elif kind == "future":
        ahead = draw(st.integers(min_value=6 * 60, max_value=100 * 365 * 86_400))
        event["occurred_at"] = (datetime.now(UTC) + timedelta(seconds=ahead)).isoformat()
    event["id"] = f"garbage-{draw(st.uuids())}"
    return msgspec.json.encode(event)


json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)


def _arrays(children: st.SearchStrategy[object]) -> st.SearchStrategy[list[object]]:
    # min_size=1: hypothesis checks that the extension really recurses into `children`.
    return st.lists(children, min_size=1, max_size=4)


def _not_the_tag(key: str) -> bool:
    return key != "type"


def _not_json(data: bytes) -> bool:
    return not _is_json(data)


not_an_object = st.recursive(json_scalars, _arrays, max_leaves=8).map(msgspec.json.encode)
untagged_object = st.dictionaries(
    st.text(max_size=10).filter(_not_the_tag), json_scalars, max_size=6
).map(msgspec.json.encode)
not_json = st.binary(max_size=200).filter(_not_json)


def _is_json(data: bytes) -> bool:
    try:
        msgspec.json.decode(data)
    except msgspec.DecodeError:
        return False
    return True


@st.composite
def garbage(draw: st.DrawFn) -> tuple[str, bytes]:
    """A subject a service folds and a payload no service may accept there."""
    subject = draw(st.sampled_from(sorted(TEMPLATES)))
    payload = draw(
        st.one_of(
            not_json, not_an_object, untagged_object, near_valid(subject), out_of_range(subject)
        )
    )
    return subject, payload


def folders(subject: str) -> set[str]:
    """The services that fold `subject` (and so must dead-letter garbage there).

    Each service folds its own stream; on the alerts stream each one's ledger folds its own
    source's alerts, and the usage service's alert history folds them all.
    """
    area = subject.split(".")[1]
    if area == "alerts":
        return {"usage", subject.split(".")[2]}
    return {area}


async def _publish_and_collect(url: str, batch: list[tuple[str, bytes]]) -> None:
    """Publish the garbage; wait until every folding service dead-lettered every message."""
    nc = await nats.connect(url)
    try:
        letters: dict[str, set[tuple[str, int]]] = {s: set() for s in ("usage", "health", "batch")}
        reasons: list[str] = []

        async def on_letter(msg: Any) -> None:
            letter = msgspec.json.decode(msg.data, type=DeadLetter)
            letters[letter.service].add((letter.subject, letter.stream_seq or 0))
            reasons.append(letter.reason)

        await nc.subscribe("stockpilot.deadletter.>", cb=on_letter)
        js = nc.jetstream()
        expected: dict[str, set[tuple[str, int]]] = {s: set() for s in letters}
        for subject, payload in batch:
            ack = await js.publish(subject, payload)
            for service in folders(subject):
                expected[service].add((subject, ack.seq))
        for _ in range(200):
            if all(expected[s] <= letters[s] for s in letters):
                break
            await asyncio.sleep(0.05)
        for service in letters:
            missing = expected[service] - letters[service]
            assert not missing, f"{service} did not dead-letter {sorted(missing)[:5]}"
        assert all(reason.strip() for reason in reasons)
        # Every service still answers.
        for service in letters:
            msg = await nc.request(endpoint_subject(service, "status"), b"{}", timeout=5)
            status = msgspec.json.decode(msg.data, type=ServiceStatus)
            assert status.ready
    finally:
        await nc.close()


async def test_garbage_on_every_subject_is_dead_lettered_and_services_keep_folding(
    nats: NatsServer, tmp_path: Path
) -> None:
    env = service_env(nats.url, tmp_path / "data")
    async with in_process_services(env) as runtimes:

        @settings(
            max_examples=15,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )
        @given(st.lists(garbage(), min_size=1, max_size=25))
        def sweep(batch: list[tuple[str, bytes]]) -> None:
            asyncio.run(_publish_and_collect(nats.url, batch))

        await asyncio.to_thread(sweep)
        # Good events after all that garbage are folded as usual.
        nc = await nats_connect(nats.url)
        try:
            js = nc.jetstream()
            good = dict(TEMPLATES["stockpilot.usage.recorded"], id="good-1")
            good["occurred_at"] = rfc3339(NOON)
            ack = await js.publish(
                "stockpilot.usage.recorded",
                msgspec.json.encode(good),
                headers={"Nats-Msg-Id": "good-1"},
            )
            usage = runtimes["usage"]
            for _ in range(100):
                if usage.tracked["usage"].projection.view.last_seq >= ack.seq:
                    break
                await asyncio.sleep(0.05)
            tracked = usage.tracked["usage"]
            assert tracked.projection.view.last_seq == ack.seq
            assert tracked.dead_lettered > 0
            # Its own day (the services count days in UTC here), not the calendar's "today".
            day = msgspec.json.encode({"date": NOON.date().isoformat()})
            stats = await nc.request(endpoint_subject("usage", "stats"), day, timeout=5)
            assert msgspec.json.decode(stats.data)["total_requests"] >= 1
        finally:
            await nc.close()
