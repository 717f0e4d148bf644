"""Each NATS role, on a real nats-server configured by ops.nats_auth (what `stockpilot up`
runs), tries what issue #22's attacker did and is refused; what each role is for works."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import nats
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import api as js_api

from ops import nats_auth
from ops.hook_runner import consumer_name
from services.batch.client import batch_job
from shared.connection import inbox_prefix
from shared.events import utc_now
from shared.hook_status import STATUS_KEY
from shared.publish import publish_event
from shared.streams import (
    HOOK_MARKS_BUCKET,
    SERVICES,
    STATE_BUCKET,
    STREAMS,
    provision,
    snapshot_bucket,
    snapshot_store,
)
from tests.harness import free_port, nats_server_binary, stop_process, wait_for_port
from tests.ops.receiver import receiving
from tests.usage.helpers import recorded

ROLES = nats_auth.ROLES
NOT_OPS = tuple(role for role in ROLES if role != "ops")
HOOK_CONSUMER = consumer_name("webhook")
ALERTS = STREAMS["alerts"].name
USAGE = STREAMS["usage"].name
USAGE_SNAPSHOTS = snapshot_bucket("usage")
ROUND_KEY = "health.round"


@dataclass
class Conn:
    """One user's connection and the permission violations the server reported to it."""

    nc: NATS
    errors: list[str] = field(default_factory=list)

    async def violation(self, subject: str) -> str:
        """Wait for the server's permissions violation naming `subject`."""
        for _ in range(100):
            for error in self.errors:
                if (
                    "permissions violation" in error.lower()
                    and f'"{subject.lower()}"' in error.lower()
                ):
                    return error
            await asyncio.sleep(0.02)
        raise AssertionError(f"no permissions violation for {subject}; got {self.errors}")

    async def refused_request(self, subject: str, body: object = None) -> None:
        """An API request nobody may answer for this user: no answer, a violation."""
        data = b"" if body is None else json.dumps(body).encode()
        asking = asyncio.create_task(self.nc.request(subject, data, timeout=10))
        try:
            # The server drops a publish it refuses, so once it says so no answer can come.
            await self.violation(subject)
            assert not asking.done() or asking.exception() is not None, asking.result()
        finally:
            asking.cancel()
            await asyncio.gather(asking, return_exceptions=True)

    async def refused_publish(self, subject: str, data: bytes = b"{}") -> None:
        await self.nc.publish(subject, data)
        await self.nc.flush()
        await self.violation(subject)

    async def refused_subscribe(self, subject: str) -> None:
        await self.nc.subscribe(subject)
        await self.nc.flush()
        await self.violation(subject)


@dataclass
class Secured:
    port: int
    passwords: dict[str, str]
    opened: list[NATS] = field(default_factory=list)

    async def connect(self, user: str) -> Conn:
        conn = Conn(nc=None)  # type: ignore[arg-type]

        async def on_error(exc: Exception) -> None:
            conn.errors.append(str(exc))

        conn.nc = await nats.connect(
            f"nats://127.0.0.1:{self.port}",
            user=user,
            password=self.passwords[user],
            inbox_prefix=inbox_prefix(user),
            error_cb=on_error,
            allow_reconnect=False,
        )
        self.opened.append(conn.nc)
        return conn


def start_server(directory: Path) -> tuple[subprocess.Popen[bytes], int, dict[str, str]]:
    """A nats-server with the config `stockpilot up` writes (ops.nats_auth.generate)."""
    port = free_port()
    config, passwords = nats_auth.generate(directory, port)
    process = subprocess.Popen(
        [nats_server_binary(), "--config", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for_port("127.0.0.1", port)
    return process, port, passwords


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[int, dict[str, str]]]:
    """A fresh server, nothing provisioned."""
    process, port, passwords = start_server(tmp_path)
    yield port, passwords
    stop_process(process)


async def seed(stack: Secured) -> None:
    """Provision as ops, then each owner writes its own state (each an allowed operation)."""
    try:
        ops = (await stack.connect("ops")).nc.jetstream()
        await provision(ops)
        usage = (await stack.connect("usage")).nc.jetstream()
        snapshots = await snapshot_store(usage, "usage", create=False)
        await snapshots.put("usage.stats", b"the real snapshot")
        health = (await stack.connect("health")).nc.jetstream()
        await (await health.key_value(STATE_BUCKET)).put(ROUND_KEY, b"42")
        hooks = (await stack.connect("hooks")).nc.jetstream()
        await (await hooks.key_value(STATE_BUCKET)).put(STATUS_KEY, b"{}")
        await (await hooks.key_value(HOOK_MARKS_BUCKET)).put("hooks.webhook.a1", b"1")
        await hooks.pull_subscribe(
            "stockpilot.alerts.>",
            durable=HOOK_CONSUMER,
            stream=ALERTS,
            config=js_api.ConsumerConfig(ack_wait=30.0, max_ack_pending=1),
        )
        producer = (await stack.connect("producer")).nc.jetstream()
        for i in range(3):
            event = recorded(i, utc_now())
            await publish_event(producer, "stockpilot.usage.recorded", event)
    finally:
        for nc in stack.opened:
            await nc.close()


@pytest.fixture(scope="module")
def seeded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, dict[str, str]]]:
    """One server for the whole matrix (each test leaves the state as it found it, or only
    adds to it), provisioned and seeded once."""
    process, port, passwords = start_server(tmp_path_factory.mktemp("nats"))
    try:
        asyncio.run(seed(Secured(port, passwords)))
        yield port, passwords
    finally:
        stop_process(process)


@pytest.fixture
async def secured(seeded: tuple[int, dict[str, str]]) -> AsyncIterator[Secured]:
    """Connections to the seeded server, closed after the test."""
    stack = Secured(*seeded)
    try:
        yield stack
    finally:
        for nc in stack.opened:
            await nc.close()


async def usage_count(stack: Secured) -> int:
    """How many events STOCKPILOT_USAGE holds (asked as ops)."""
    return (await (await ops_js(stack)).stream_info(USAGE)).state.messages


async def ops_js(stack: Secured) -> nats.js.JetStreamContext:
    return (await stack.connect("ops")).nc.jetstream()


# ----- what nobody but ops may do to a stream ---------------------------------------------


def _usage_config(**changes: object) -> dict[str, object]:
    return {
        "name": USAGE,
        "subjects": ["stockpilot.usage.>"],
        "storage": "file",
        **changes,
    }


@pytest.mark.parametrize("role", NOT_OPS)
async def test_only_ops_may_change_a_stream(secured: Secured, role: str) -> None:
    """max_msgs=1 on the usage stream, sealing the alerts, a subject transform, a new stream
    forging alerts from the usage stream, deleting or purging one: all refused."""
    before = await usage_count(secured)
    assert before >= 3
    conn = await secured.connect(role)
    await conn.refused_request(
        f"$JS.API.STREAM.UPDATE.{USAGE}", _usage_config(max_msgs=1, discard="old")
    )
    await conn.refused_request(
        f"$JS.API.STREAM.UPDATE.{ALERTS}",
        {"name": ALERTS, "subjects": ["stockpilot.alerts.>"], "sealed": True},
    )
    await conn.refused_request(
        f"$JS.API.STREAM.UPDATE.{ALERTS}",
        {
            "name": ALERTS,
            "subjects": ["stockpilot.alerts.>"],
            "subject_transform": {"src": ">", "dest": "stockpilot.alerts.usage.cost_exceeded"},
        },
    )
    await conn.refused_request(
        "$JS.API.STREAM.CREATE.FORGED",
        {
            "name": "FORGED",
            "subjects": ["forged.>"],
            "sources": [
                {
                    "name": USAGE,
                    "subject_transforms": [
                        {"src": ">", "dest": "stockpilot.alerts.usage.cost_exceeded"}
                    ],
                }
            ],
        },
    )
    await conn.refused_request(f"$JS.API.STREAM.PURGE.{USAGE}")
    await conn.refused_request(f"$JS.API.STREAM.DELETE.{USAGE}")
    js = await ops_js(secured)
    usage = await js.stream_info(USAGE)
    assert usage.config.max_msgs in (None, -1)
    assert usage.state.messages == before
    alerts = await js.stream_info(ALERTS)
    assert not alerts.config.sealed
    assert alerts.config.subject_transform is None
    with pytest.raises(nats.js.errors.NotFoundError):
        await js.stream_info("FORGED")


async def test_ops_may_administer_streams(secured: Secured) -> None:
    js = await ops_js(secured)
    config = (await js.stream_info(USAGE)).config
    config.description = "changed by the operator"
    updated = await js.update_stream(config)
    assert updated.config.description == "changed by the operator"


# ----- state that belongs to one owner ------------------------------------------------------


@pytest.mark.parametrize("role", [r for r in NOT_OPS if r != "usage"])
async def test_only_usage_may_write_its_snapshots(secured: Secured, role: str) -> None:
    conn = await secured.connect(role)
    name = base64.urlsafe_b64encode(b"usage.stats").decode()
    await conn.refused_publish(f"$O.{USAGE_SNAPSHOTS}.M.{name}", b'{"name":"usage.stats"}')
    await conn.refused_publish(f"$O.{USAGE_SNAPSHOTS}.C.forged", b"987654.32")
    await conn.refused_request(f"$JS.API.STREAM.PURGE.OBJ_{USAGE_SNAPSHOTS}")
    snapshots = await (await ops_js(secured)).object_store(USAGE_SNAPSHOTS)
    assert (await snapshots.get("usage.stats")).data == b"the real snapshot"


@pytest.mark.parametrize("role", [r for r in NOT_OPS if r != "health"])
async def test_only_health_may_schedule_health_rounds(secured: Secured, role: str) -> None:
    conn = await secured.connect(role)
    await conn.refused_publish(f"$KV.{STATE_BUCKET}.{ROUND_KEY}", b"99999999999")
    kv = await (await ops_js(secured)).key_value(STATE_BUCKET)
    assert (await kv.get(ROUND_KEY)).value == b"42"


@pytest.mark.parametrize("role", [r for r in NOT_OPS if r != "hooks"])
async def test_only_hooks_may_write_the_hook_status_and_marks(secured: Secured, role: str) -> None:
    conn = await secured.connect(role)
    await conn.refused_publish(f"$KV.{STATE_BUCKET}.{STATUS_KEY}", b'{"forged":1}')
    await conn.refused_publish(f"$KV.{HOOK_MARKS_BUCKET}.hooks.webhook.a1", b"")
    kv = await (await ops_js(secured)).key_value(STATE_BUCKET)
    assert (await kv.get(STATUS_KEY)).value == b"{}"


@pytest.mark.parametrize("role", NOT_OPS)
async def test_nobody_but_ops_may_purge_the_delivery_marks(secured: Secured, role: str) -> None:
    conn = await secured.connect(role)
    await conn.refused_request(f"$JS.API.STREAM.PURGE.KV_{HOOK_MARKS_BUCKET}")
    await conn.refused_request(f"$JS.API.STREAM.DELETE.KV_{HOOK_MARKS_BUCKET}")
    marks = await (await ops_js(secured)).key_value(HOOK_MARKS_BUCKET)
    assert (await marks.get("hooks.webhook.a1")).value == b"1"


@pytest.mark.parametrize("role", [r for r in NOT_OPS if r != "hooks"])
async def test_the_hooks_durable_consumer_is_theirs(secured: Secured, role: str) -> None:
    """Deleting it, changing it, fetching or acking its messages: refused to all others."""
    conn = await secured.connect(role)
    await conn.refused_request(f"$JS.API.CONSUMER.DELETE.{ALERTS}.{HOOK_CONSUMER}")
    config = {"durable_name": HOOK_CONSUMER, "ack_policy": "none", "deliver_policy": "new"}
    await conn.refused_request(
        f"$JS.API.CONSUMER.DURABLE.CREATE.{ALERTS}.{HOOK_CONSUMER}",
        {"stream_name": ALERTS, "config": config},
    )
    await conn.refused_request(
        f"$JS.API.CONSUMER.CREATE.{ALERTS}.{HOOK_CONSUMER}",
        {"stream_name": ALERTS, "config": config | {"name": HOOK_CONSUMER}},
    )
    await conn.refused_request(f"$JS.API.CONSUMER.MSG.NEXT.{ALERTS}.{HOOK_CONSUMER}", 1)
    await conn.refused_publish(f"$JS.ACK.{ALERTS}.{HOOK_CONSUMER}.1.1.1.1.0", b"+ACK")
    info = await (await ops_js(secured)).consumer_info(ALERTS, HOOK_CONSUMER)
    assert info.config.ack_policy == js_api.AckPolicy.EXPLICIT
    assert info.config.ack_wait == 30.0


@pytest.mark.parametrize("role", ["observer", "gateway", "health", "usage", "batch"])
async def test_an_ephemeral_create_cannot_take_over_the_hooks_consumer(
    secured: Secured, role: str
) -> None:
    """The roles that may create ephemeral consumers on the alerts stream cannot smuggle
    the hooks' durable name into one (the server refuses a name on that subject)."""
    conn = await secured.connect(role)
    for config in (
        {"durable_name": HOOK_CONSUMER, "ack_policy": "none"},
        {"name": HOOK_CONSUMER, "ack_policy": "none"},
    ):
        answer = await conn.nc.request(
            f"$JS.API.CONSUMER.CREATE.{ALERTS}",
            json.dumps({"stream_name": ALERTS, "config": config}).encode(),
            timeout=2,
        )
        assert "error" in json.loads(answer.data)
    info = await (await ops_js(secured)).consumer_info(ALERTS, HOOK_CONSUMER)
    assert info.config.ack_policy == js_api.AckPolicy.EXPLICIT


# ----- service requests ---------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
async def test_only_a_service_takes_its_own_requests(secured: Secured, role: str) -> None:
    """stockpilot.svc.<service>.* and the service's $SRV discovery subjects: refused to
    every other user (a forged answer needs the request first)."""
    conn = await secured.connect(role)
    for service in SERVICES:
        if service == role:
            continue
        await conn.refused_subscribe(f"stockpilot.svc.{service}.stats")
        await conn.refused_subscribe(f"$SRV.INFO.stockpilot-{service}")
        if role != "ops":  # ops's stockpilot.> is allowed, with the svc subjects filtered out
            await conn.refused_subscribe(f"stockpilot.svc.{service}.*")


async def test_ops_wildcard_subscription_never_sees_service_requests(secured: Secured) -> None:
    ops = await secured.connect("ops")
    seen: list[str] = []

    async def on_message(msg: Msg) -> None:
        seen.append(msg.subject)

    await ops.nc.subscribe("stockpilot.>", cb=on_message)
    await ops.nc.flush()
    gateway = await secured.connect("gateway")
    await gateway.nc.publish("stockpilot.svc.usage.stats", b"{}")
    await ops.nc.publish("stockpilot.deadletter.usage", b"{}")
    await gateway.nc.flush()
    await ops.nc.flush()
    for _ in range(50):
        if seen:
            break
        await asyncio.sleep(0.02)
    await asyncio.sleep(0.1)
    assert seen == ["stockpilot.deadletter.usage"]


@pytest.mark.parametrize("role", ROLES)
async def test_nobody_answers_into_another_users_inbox(secured: Secured, role: str) -> None:
    """Forged answers to the gateway: a reply is only allowed to a request one received."""
    conn = await secured.connect(role)
    await conn.refused_publish("_INBOX.gateway.forged.1", b'{"total_requests": 987654}')


@pytest.mark.parametrize("role", ROLES)
async def test_nobody_subscribes_to_everything(secured: Secured, role: str) -> None:
    conn = await secured.connect(role)
    await conn.refused_subscribe(">")
    await conn.refused_subscribe("_INBOX.>")


# ----- producer -----------------------------------------------------------------------------


async def test_producer_publishes_usage_and_gets_its_acks(secured: Secured) -> None:
    producer = await secured.connect("producer")
    ack = await publish_event(
        producer.nc.jetstream(), "stockpilot.usage.recorded", recorded(99, utc_now())
    )
    assert ack.stream == USAGE
    assert ack.seq >= 4  # after the three seeded events
    assert producer.errors == []


async def test_producer_runs_a_batch_job_under_its_lock(secured: Secured) -> None:
    """Lock acquire (reads the lock subject's last event), run events, release."""
    producer = await secured.connect("producer")
    async with batch_job(producer.nc, "nightly", items_total=2) as run:
        run.advance(2)
    assert producer.errors == []
    js = await ops_js(secured)
    batch = STREAMS["batch"].name
    finished = await js.get_last_msg(batch, "stockpilot.batch.run.nightly")
    assert json.loads(finished.data or b"")["type"] == "batch.finished"
    released = await js.get_last_msg(batch, "stockpilot.batch.lock.nightly")
    assert json.loads(released.data or b"")["type"] == "lock.released"


async def test_producer_may_do_nothing_else(secured: Secured) -> None:
    before = await usage_count(secured)
    producer = await secured.connect("producer")
    await producer.refused_request("$JS.API.STREAM.PURGE.STOCKPILOT_USAGE")
    await producer.refused_request(f"$JS.API.STREAM.INFO.{USAGE}")
    await producer.refused_request(f"$JS.API.CONSUMER.CREATE.{USAGE}")
    await producer.refused_request(f"$JS.API.STREAM.MSG.GET.{STREAMS['batch'].name}")
    await producer.refused_request("stockpilot.svc.usage.stats")
    await producer.refused_publish("stockpilot.usage.reset")
    await producer.refused_publish("stockpilot.usage.prices_changed")
    await producer.refused_publish("stockpilot.alerts.usage.cost_exceeded")
    await producer.refused_publish("stockpilot.health.checked.database")
    await producer.refused_subscribe("stockpilot.alerts.>")
    await producer.refused_subscribe("stockpilot.usage.recorded")
    assert await usage_count(secured) == before


@pytest.mark.parametrize("role", [r for r in NOT_OPS if r != "usage"])
async def test_only_usage_may_reset_the_statistics(secured: Secured, role: str) -> None:
    before = await usage_count(secured)
    conn = await secured.connect(role)
    await conn.refused_publish("stockpilot.usage.reset")
    assert await usage_count(secured) == before


# ----- observer -----------------------------------------------------------------------------


async def test_observer_reads_the_streams_from_the_start_and_follows_alerts(
    secured: Secured,
) -> None:
    observer = await secured.connect("observer")
    js = observer.nc.jetstream()
    for spec in STREAMS.values():
        assert (await js.stream_info(spec.name)).config.name == spec.name
    read: list[int] = []
    done = asyncio.Event()

    async def on_event(msg: Msg) -> None:
        read.append(msg.metadata.sequence.stream)
        if len(read) >= 3:
            done.set()

    await js.subscribe(
        "stockpilot.usage.>",
        stream=USAGE,
        cb=on_event,
        ordered_consumer=True,
        deliver_policy=js_api.DeliverPolicy.ALL,
    )
    await asyncio.wait_for(done.wait(), 5)
    assert read[:3] == [1, 2, 3]
    alerts: list[str] = []
    arrived = asyncio.Event()

    async def on_alert(msg: Msg) -> None:
        alerts.append(msg.subject)
        arrived.set()

    await observer.nc.subscribe("stockpilot.alerts.>", cb=on_alert)
    await observer.nc.flush()
    usage = await secured.connect("usage")
    await usage.nc.jetstream().publish("stockpilot.alerts.usage.cost_warning", b"{}")
    await asyncio.wait_for(arrived.wait(), 5)
    assert alerts == ["stockpilot.alerts.usage.cost_warning"]
    assert observer.errors == []


async def test_observer_may_not_publish_or_manage(secured: Secured) -> None:
    observer = await secured.connect("observer")
    await observer.refused_publish("stockpilot.usage.recorded")
    await observer.refused_publish("stockpilot.alerts.usage.cost_exceeded")
    await observer.refused_request(f"$JS.API.CONSUMER.DELETE.{USAGE}.anything")
    await observer.refused_request(f"$KV.{STATE_BUCKET}.{ROUND_KEY}")


# ----- every process for real, each under its own role ---------------------------------------


async def test_the_whole_stack_runs_under_its_roles(tmp_path: Path) -> None:
    """`stockpilot up`: ingest through the gateway (usage), an alert raised (usage) and
    delivered (hooks), seen by an observer and on the SSE route (gateway), a batch job run
    as producer, health rounds (health's KV key): all work, and nats-server reports no
    permission violation from any of them."""
    http_port = free_port()
    data = tmp_path / "data"
    env = up_environment(
        data,
        http_port,
        STOCKPILOT_INGEST_TOKEN="ingest-token-1",
        STOCKPILOT_DAILY_BUDGET_USD="1",
        STOCKPILOT_HEALTH_INTERVAL_S="1",
    )
    base = f"http://127.0.0.1:{http_port}/api/v1"
    log = tmp_path / "up.log"
    stack = Secured(0, {})
    async with receiving() as receiver:
        env["STOCKPILOT_ALERT_WEBHOOK_URL"] = receiver.url
        up = start_up(env, log)
        try:
            async with httpx.AsyncClient(timeout=5) as http:
                await until(http, f"{base}/status", services_up, 60)
                passwords = json.loads((data / "credentials.json").read_text())
                port = int((data / "nats.url").read_text().strip().rsplit(":", 1)[1])
                stack.port, stack.passwords = port, passwords
                observer = await stack.connect("observer")
                seen: list[str] = []

                async def on_alert(msg: Msg) -> None:
                    seen.append(msg.subject)

                await observer.nc.subscribe("stockpilot.alerts.>", cb=on_alert)
                await observer.nc.flush()
                record = {"id": "r-1", "model": "gpt-4o", "status_code": 200, "cost_usd": 5.0}
                answer = await http.post(
                    f"{base}/usage/records",
                    json=record,
                    headers={"Authorization": "Bearer ingest-token-1"},
                )
                assert answer.status_code == 202, answer.text
                assert answer.json()["accepted"] == 1
                stats = await until(
                    http, f"{base}/usage/stats", lambda r: r.json()["total_requests"] == 1, 30
                )
                assert stats.json()["total_cost_usd"] == 5.0
                # The warning (over 80 %) and the breach, in order.
                await receiver.wait_accepted(2, timeout=30)
                assert b"usage.cost_exceeded" in b"".join(r.body for r in receiver.accepted)
                for _ in range(100):
                    if seen:
                        break
                    await asyncio.sleep(0.1)
                assert "stockpilot.alerts.usage.cost_exceeded" in seen
                sse = await first_sse_event(http, f"{base}/alerts/stream?since=0")
                assert "usage.cost_" in sse
                producer = await stack.connect("producer")
                async with batch_job(producer.nc, "nightly") as run:
                    run.advance(1)
                await until(
                    http,
                    f"{base}/batch/executions/recent",
                    lambda r: [e["status"] for e in r.json()["executions"]] == ["succeeded"],
                    30,
                )
                comprehensive = await until(
                    http,
                    f"{base}/health/comprehensive",
                    lambda r: r.status_code == 200 and len(r.json()["components"]) >= 3,
                    30,
                )
                assert comprehensive.json()["status"]
            up.send_signal(signal.SIGINT)
            assert up.wait(timeout=15) == 0
        finally:
            for nc in stack.opened:
                await nc.close()
            if up.poll() is None:
                up.kill()
                up.wait()
    output = log.read_text(errors="replace")
    assert "Violation" not in output, [line for line in output.splitlines() if "Violation" in line]
    assert "permissions violation" not in output.lower()


def start_up(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """`stockpilot up` as a real process, its output in `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "ops", "up"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=Path(__file__).parents[2],
        )


def up_environment(data: Path, http_port: int, **extra: str) -> dict[str, str]:
    env = os.environ | {
        "STOCKPILOT_DATA_DIR": str(data),
        "STOCKPILOT_HTTP_PORT": str(http_port),
        "STOCKPILOT_CONFIG": str(Path(__file__).parents[1] / "empty.toml"),
        **extra,
    }
    env.pop("STOCKPILOT_NATS_URL", None)
    return env


async def until(
    http: httpx.AsyncClient,
    url: str,
    predicate: Callable[[httpx.Response], bool],
    timeout: float,
) -> httpx.Response:
    """GET `url` until `predicate` holds (or fail after `timeout` seconds, with the last
    answer)."""
    last: object = None
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        try:
            response = await http.get(url)
            last = response.text[:300]
            if response.status_code < 500 and predicate(response):
                return response
        except (httpx.HTTPError, KeyError, ValueError) as exc:
            last = exc
        await asyncio.sleep(0.2)
    raise AssertionError(f"{url}: not as expected after {timeout}s (last: {last})")


def services_up(response: httpx.Response) -> bool:
    services = response.json()["services"]
    return all(s["status"] == "up" for s in services.values())


async def first_sse_event(http: httpx.AsyncClient, url: str) -> str:
    async with asyncio.timeout(15), http.stream("GET", url) as response:
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                return line
    raise AssertionError("the SSE stream ended without an event")


@pytest.mark.parametrize(
    ("role", "command"), [("batch", ["service", "batch"]), ("hooks", ["hooks"])]
)
def test_a_process_whose_streams_are_missing_stops_saying_who_creates_them(
    server: tuple[int, dict[str, str]], tmp_path: Path, role: str, command: list[str]
) -> None:
    """Its user may not create streams: one line naming what to run, exit 1, no violation
    (it only looked)."""
    port, passwords = server
    env = up_environment(tmp_path / "data", free_port()) | {
        "STOCKPILOT_NATS_URL": f"nats://127.0.0.1:{port}",
        "STOCKPILOT_NATS_USER": role,
        "STOCKPILOT_NATS_PASSWORD": passwords[role],
    }
    result = subprocess.run(
        [sys.executable, "-m", "ops", *command],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parents[2],
    )
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "does not exist and this process's NATS user may not create it" in output
    assert "stockpilot up" in output
    assert "violation" not in output.lower()


@pytest.mark.parametrize(("role", "status"), [("ops", 0), ("usage", 1)])
def test_provision_creates_the_streams_as_ops_only(
    server: tuple[int, dict[str, str]], tmp_path: Path, role: str, status: int
) -> None:
    """`stockpilot up --provision-only` (compose's one-shot step): ops creates everything; any other
    user is refused and says the user must be ops."""
    port, passwords = server
    env = up_environment(tmp_path / "data", free_port()) | {
        "STOCKPILOT_NATS_URL": f"nats://127.0.0.1:{port}",
        "STOCKPILOT_NATS_USER": role,
        "STOCKPILOT_NATS_PASSWORD": passwords[role],
    }
    result = subprocess.run(
        [sys.executable, "-m", "ops", "up", "--provision-only"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).parents[2],
    )
    assert result.returncode == status, result.stderr
    names = asyncio.run(stream_names(port, passwords["ops"]))
    if status == 0:
        assert set(names) >= {
            *(spec.name for spec in STREAMS.values()),
            *(f"OBJ_{snapshot_bucket(s)}" for s in SERVICES),
            f"KV_{STATE_BUCKET}",
            f"KV_{HOOK_MARKS_BUCKET}",
        }
    else:
        assert names == []
        assert "the NATS user must be 'ops'" in result.stderr


async def stream_names(port: int, ops_password: str) -> list[str]:
    nc = await nats.connect(
        f"nats://127.0.0.1:{port}",
        user="ops",
        password=ops_password,
        inbox_prefix=inbox_prefix("ops"),
    )
    try:
        return [info.config.name or "" for info in await nc.jetstream().streams_info()]
    finally:
        await nc.close()
