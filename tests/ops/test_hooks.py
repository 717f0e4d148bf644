"""The hook process against a real nats-server and a real HTTP receiver on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from urllib.parse import unquote

import httpx
import msgspec
import nats
import pytest
from nats.js import JetStreamContext

from ops.hook_delivery import (
    SIGNATURE_HEADER,
    LogHook,
    WebhookHook,
    header_value,
    slack_escape,
    verify_signature,
)
from ops.hook_runner import (
    STOP_TIMEOUT_S,
    HookRunner,
    RetryPolicy,
    consumer_name,
    delivery_key,
    sanitise_key_token,
)
from ops.hooks import HookSettings, run_hooks
from shared.connection import CLOSE_TIMEOUT_S, DRAIN_TIMEOUT_S
from shared.events import Alert
from shared.hook_status import read_hooks_status
from shared.publish import publish_event
from shared.settings import SettingsError, load_settings
from shared.streams import HOOK_MARK_TTL_S, HOOK_MARKS_BUCKET, STREAMS, provision
from tests.clocks import NOON
from tests.ops.receiver import receiving

# Any past instant does, nothing here depends on the day: three hours before the run's noon
# (tests.clocks.NOON), never a literal date.
T0 = NOON - timedelta(hours=3)
SECRET = "s3cret-for-tests"


def make_alert(n: int) -> Alert:
    return Alert(
        id=f"usage.cost_warning:daily:{T0.date() - timedelta(days=n)}",
        occurred_at=T0,
        source="usage",
        kind="usage.cost_warning",
        severity="warning",
        title=f"budget {n}",
        message="80% of the daily budget used",
        metric="cost_usd",
        value=8.0 + n,
        threshold=8.0,
    )


async def publish(js: JetStreamContext, alert: Alert) -> None:
    await publish_event(js, alert.subject, alert)


@contextlib.asynccontextmanager
async def connected(env: dict[str, str]) -> AsyncIterator[JetStreamContext]:
    nc = await nats.connect(env["STOCKPILOT_NATS_URL"])
    js = nc.jetstream()
    await provision(js)
    try:
        yield js
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def hook_process(settings: HookSettings) -> AsyncIterator[asyncio.Task[int]]:
    """`stockpilot hooks` in this event loop, stopped (as by SIGTERM) at the end of the block."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_hooks(settings, stop))
    try:
        yield task
    finally:
        stop.set()
        assert await asyncio.wait_for(task, timeout=10) == 0


def hook_settings(env: dict[str, str], **extra: str) -> HookSettings:
    return load_settings(
        HookSettings,
        {**env, "STOCKPILOT_HOOK_RETRY_INITIAL_S": "0.05", "STOCKPILOT_HOOK_RETRY_MAX_S": "0.2"}
        | extra,
    )


def alert_ids(bodies: list[bytes]) -> list[str]:
    return [msgspec.json.decode(body, type=Alert).id for body in bodies]


@contextlib.asynccontextmanager
async def never_answering() -> AsyncIterator[tuple[str, asyncio.Event]]:
    """A loopback URL that takes requests and never answers; the event: one arrived."""
    arrived = asyncio.Event()

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readline()
            arrived.set()
            await reader.read()  # until the client gives up and closes
        except ConnectionError:
            return
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}/hook", arrived
        server.close()


async def test_alert_reaches_the_webhook_once_with_a_verifiable_signature(
    env: dict[str, str],
) -> None:
    async with receiving() as receiver, connected(env) as js:
        settings = hook_settings(
            env,
            STOCKPILOT_ALERT_WEBHOOK_URL=receiver.url,
            STOCKPILOT_ALERT_WEBHOOK_SECRET=SECRET,
        )
        async with hook_process(settings):
            alert = make_alert(1)
            await publish(js, alert)
            await publish(js, alert)  # a retried publish: stored once, delivered once
            await receiver.wait_accepted(1)
            await asyncio.sleep(0.5)
        assert len(receiver.requests) == 1
        request = receiver.requests[0]
        assert msgspec.json.decode(request.body, type=Alert) == alert
        assert request.headers["content-type"] == "application/json"
        signature = request.headers[SIGNATURE_HEADER.lower()]
        assert signature.startswith("sha256=")
        assert verify_signature(SECRET, request.body, signature)
        assert not verify_signature("another secret", request.body, signature)
        status = await read_hooks_status(js)
        assert status is not None
        by_name = {h.name: h for h in status.hooks}
        assert set(by_name) == {"webhook", "log"}
        assert by_name["webhook"].delivered == 1
        assert by_name["log"].delivered == 1
        assert by_name["webhook"].state == "stopped"


async def test_receiver_failing_three_times_still_gets_the_alert_exactly_once(
    env: dict[str, str],
) -> None:
    async with (
        receiving(lambda attempt: 500 if attempt <= 3 else 200) as receiver,
        connected(env) as js,
    ):
        settings = hook_settings(env, STOCKPILOT_ALERT_WEBHOOK_URL=receiver.url)
        async with hook_process(settings):
            await publish(js, make_alert(1))
            await receiver.wait_accepted(1)
            await asyncio.sleep(0.5)
        assert len(receiver.requests) == 4
        assert alert_ids([r.body for r in receiver.accepted]) == [make_alert(1).id]
        status = await read_hooks_status(js)
        assert status is not None
        webhook = next(h for h in status.hooks if h.name == "webhook")
        assert (webhook.delivered, webhook.failures, webhook.consecutive_failures) == (1, 3, 0)
        assert webhook.last_error == "webhook: the receiver answered HTTP 500"


async def test_restarts_never_repeat_an_alert_a_hook_already_took(env: dict[str, str]) -> None:
    """Even with its consumer gone (position lost), the delivery marks stop repeats."""
    async with receiving() as receiver, connected(env) as js:
        settings = hook_settings(
            env, STOCKPILOT_ALERT_WEBHOOK_URL=receiver.url, STOCKPILOT_ALERT_LOG="false"
        )
        for round_, n in enumerate((1, 2, 3), start=1):
            async with hook_process(settings):
                await publish(js, make_alert(n))
                await receiver.wait_accepted(round_)
                await asyncio.sleep(0.3)
            if n == 2:
                await js.delete_consumer(STREAMS["alerts"].name, consumer_name("webhook"))
        assert alert_ids([r.body for r in receiver.requests]) == [
            make_alert(n).id for n in (1, 2, 3)
        ]
        status = await read_hooks_status(js)
        assert status is not None
        assert [(h.name, h.skipped_duplicates) for h in status.hooks] == [("webhook", 2)]
        kv = await js.key_value(HOOK_MARKS_BUCKET)
        assert (await kv.status()).ttl == HOOK_MARK_TTL_S  # marks expire
        entry = await kv.get(delivery_key("webhook", make_alert(1).id))
        assert b'"attempts":1' in (entry.value or b"")


async def test_stopped_mid_retry_the_alert_is_delivered_once_after_restart(
    env: dict[str, str],
) -> None:
    healthy = False
    async with (
        receiving(lambda attempt: 200 if healthy else 503) as receiver,
        connected(env) as js,
    ):
        settings = hook_settings(
            env, STOCKPILOT_ALERT_WEBHOOK_URL=receiver.url, STOCKPILOT_ALERT_LOG="false"
        )
        async with hook_process(settings):
            await publish(js, make_alert(1))
            await receiver.wait_requests(2)
        healthy = True
        async with hook_process(settings):
            await receiver.wait_accepted(1, timeout=5)
            await asyncio.sleep(0.3)
        assert alert_ids([r.body for r in receiver.accepted]) == [make_alert(1).id]


async def test_a_permanently_failing_hook_does_not_delay_a_healthy_one(
    env: dict[str, str],
) -> None:
    async with (
        receiving(lambda attempt: 500) as broken,
        receiving() as healthy,
        connected(env) as js,
        httpx.AsyncClient(timeout=2) as client,
    ):
        runner = HookRunner(
            js,
            [
                WebhookHook(broken.url, client=client, name="broken"),
                WebhookHook(healthy.url, client=client, name="healthy"),
            ],
            retry=RetryPolicy(initial_s=0.05, max_s=0.2),
            status_every_s=0.1,
        )
        task = asyncio.create_task(runner.run())
        try:
            started = asyncio.get_running_loop().time()
            for n in range(1, 6):
                await publish(js, make_alert(n))
            await healthy.wait_accepted(5, timeout=3)
            assert asyncio.get_running_loop().time() - started < 3
            await broken.wait_requests(4)
            await asyncio.sleep(0.3)
            status = await read_hooks_status(js)
        finally:
            runner.stop.set()
            await asyncio.wait_for(task, timeout=10)
        assert alert_ids([r.body for r in healthy.accepted]) == [
            make_alert(n).id for n in range(1, 6)
        ]
        assert not broken.accepted
        assert status is not None
        by_name = {h.name: h for h in status.hooks}
        assert by_name["healthy"].state == "ok"
        assert by_name["healthy"].delivered == 5
        assert by_name["broken"].state == "failing"
        assert by_name["broken"].consecutive_failures >= 3
        assert by_name["broken"].delivered == 0
        assert by_name["broken"].last_error == "broken: the receiver answered HTTP 500"


def test_sanitised_alert_ids_are_valid_distinct_key_tokens() -> None:
    ids = [f"usage.cost_warning:daily:{T0.date()}", "a b", "a_b", "a=20b", "é/ü", "x.y", "x:y"]
    tokens = [sanitise_key_token(i) for i in ids]
    assert len(set(tokens)) == len(tokens)
    for token in tokens:
        assert all(c.isascii() and (c.isalnum() or c in "_-=") for c in token)


def test_a_secret_without_a_url_is_refused_without_showing_it(env: dict[str, str]) -> None:
    with pytest.raises(SettingsError) as raised:
        load_settings(HookSettings, {**env, "STOCKPILOT_ALERT_WEBHOOK_SECRET": SECRET})
    assert SECRET not in str(raised.value)
    with pytest.raises(SettingsError) as raised:
        load_settings(HookSettings, {**env, "STOCKPILOT_SLACK_WEBHOOK_URL": "hooks.slack/T0K3N"})
    assert "T0K3N" not in str(raised.value)


async def test_slack_hook_posts_a_text_message(env: dict[str, str]) -> None:
    async with receiving() as receiver, connected(env) as js:
        settings = hook_settings(
            env, STOCKPILOT_SLACK_WEBHOOK_URL=receiver.url, STOCKPILOT_ALERT_LOG="false"
        )
        async with hook_process(settings):
            await publish(js, make_alert(7))
            await receiver.wait_accepted(1)
        message = msgspec.json.decode(receiver.accepted[0].body)
        assert list(message) == ["text"]
        assert "budget 7" in message["text"]
        assert make_alert(7).id in message["text"]


async def test_stops_on_request_while_nats_is_still_unreachable(tmp_path: object) -> None:
    from tests.harness import free_port

    settings = load_settings(
        HookSettings,
        {
            "STOCKPILOT_NATS_URL": f"nats://127.0.0.1:{free_port()}",
            "STOCKPILOT_CONFIG": str(Path(__file__).parents[1] / "empty.toml"),
        },
    )
    stop = asyncio.Event()
    task = asyncio.create_task(run_hooks(settings, stop))
    await asyncio.sleep(0.5)
    assert not task.done()
    stop.set()
    # Not wait_for: the cancellation it sends at its timeout would end a task that missed `stop`.
    done, _ = await asyncio.wait({task}, timeout=3)
    assert done, "still connecting 3 s after stop"
    assert task.result() == 0


async def test_the_hooks_command_delivers_and_stops_cleanly_on_sigterm(env: dict[str, str]) -> None:
    async with receiving() as receiver, connected(env) as js:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "ops",
            "hooks",
            env={
                **os.environ,
                **env,
                "STOCKPILOT_ALERT_WEBHOOK_URL": receiver.url,
                "STOCKPILOT_ALERT_WEBHOOK_SECRET": SECRET,
            },
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            await publish(js, make_alert(1))
            await receiver.wait_accepted(1, timeout=20)
        finally:
            process.send_signal(signal.SIGTERM)
            _, err = await asyncio.wait_for(process.communicate(), timeout=15)
    assert process.returncode == 0, err.decode()
    log = err.decode()
    assert "delivering alerts to webhook, log" in log
    assert make_alert(1).id in log  # the log hook
    assert SECRET not in log and receiver.url not in log


async def test_a_receiver_that_never_answers_does_not_hold_up_stopping(
    env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    """A delivery stuck in flight is cut short within the stop deadline, its alert handed back."""
    async with never_answering() as (url, arrived), receiving() as receiver, connected(env) as js:
        stuck = hook_settings(
            env,
            STOCKPILOT_ALERT_WEBHOOK_URL=url,
            STOCKPILOT_ALERT_LOG="false",
            STOCKPILOT_HOOK_TIMEOUT_S="60",
        )
        stop = asyncio.Event()
        task = asyncio.create_task(run_hooks(stuck, stop))
        await publish(js, make_alert(1))
        await asyncio.wait_for(arrived.wait(), timeout=10)
        loop = asyncio.get_running_loop()
        stopped_at = loop.time()
        stop.set()
        assert await asyncio.wait_for(task, timeout=15) == 0
        assert loop.time() - stopped_at < STOP_TIMEOUT_S + DRAIN_TIMEOUT_S + 2 * CLOSE_TIMEOUT_S
        assert "hook webhook: delivery of seq 1 cut short by stopping" in caplog.text
        # Handed back at once: the next run has it without waiting out the ack wait (30 s).
        healthy = hook_settings(
            env, STOCKPILOT_ALERT_WEBHOOK_URL=receiver.url, STOCKPILOT_ALERT_LOG="false"
        )
        async with hook_process(healthy):
            await receiver.wait_accepted(1, timeout=5)
        assert alert_ids([r.body for r in receiver.accepted]) == [make_alert(1).id]


async def test_an_idle_hook_process_keeps_its_status_fresh(env: dict[str, str]) -> None:
    async with connected(env) as js:
        runner = HookRunner(js, [LogHook()], status_every_s=0.05)
        task = asyncio.create_task(runner.run())
        try:
            await asyncio.sleep(0.2)
            first = await read_hooks_status(js)
            await asyncio.sleep(0.4)
            later = await read_hooks_status(js)
        finally:
            runner.stop.set()
            await asyncio.wait_for(task, timeout=10)
    assert first is not None and later is not None
    assert later.updated_at > first.updated_at
    assert [(h.name, h.state, h.pending) for h in later.hooks] == [("log", "ok", 0)]


@pytest.mark.parametrize(
    "alert_id",
    [
        "usage.cost_warning:all:daily:2026-11-26",  # fixed history: an id's text
        "usage.budget_exceeded:model:gpt\r\nX-Injected: 1:daily",
        "model:模型-é\x1b[31m\x00",
        " leading and trailing ",
        "50%:already%20encoded",
    ],
)
def test_header_values_are_visible_ascii_and_give_back_the_id(alert_id: str) -> None:
    value = header_value(alert_id)
    assert all(0x21 <= ord(char) <= 0x7E for char in value)
    assert unquote(value) == alert_id


def test_slack_escape_leaves_no_control_sequence() -> None:
    text = slack_escape("<!channel> <@U1> <http://x.example|y> a&b")
    assert text == "&lt;!channel&gt; &lt;@U1&gt; &lt;http://x.example|y&gt; a&amp;b"
