"""Alert delivery under hostile alerts and hostile receivers (issue #22).

A real nats-server, the real hook process (`run_hooks`) and a real HTTP receiver on loopback.
Alert fields are whatever a producer put in a model name: control characters, non-ASCII and
Slack control sequences must neither break delivery nor reach a header or a channel live.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import timedelta
from urllib.parse import unquote

import msgspec
import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from ops.hook_delivery import IDEMPOTENCY_KEY_HEADER
from ops.hook_runner import PARKED_SUBJECT, DeliveryMark, delivery_key
from ops.hooks import HookSettings, run_hooks
from shared.dead_letters import DeadLetter
from shared.events import Alert, utc_now
from shared.hook_status import read_hooks_status
from shared.publish import publish_event
from shared.settings import load_settings
from shared.streams import HOOK_MARKS_BUCKET, provision
from tests.ops.receiver import Receiver, receiving

HOSTILE_MODEL = "gpt\r\nX-Injected: 1 模型-é\x1b[31m"


def make_alert(
    n: int, model: str = "gpt-4o-mini", title: str = "budget", message: str = ""
) -> Alert:
    day = (utc_now() - timedelta(days=n)).date().isoformat()
    return Alert(
        id=f"usage.budget_exceeded:model:{model}:daily:{day}",
        occurred_at=utc_now(),
        source="usage",
        kind="usage.budget_exceeded",
        severity="critical",
        title=f"{title} {n}",
        message=message or f"the daily budget of {model} is spent",
        metric="cost_usd",
        value=10.0 + n,
        threshold=10.0,
    )


async def publish(js: JetStreamContext, alert: Alert) -> None:
    # As the services publish it (nats-py folds CR/LF in the Nats-Msg-Id header value).
    await publish_event(js, alert.subject, alert)


def settings(env: dict[str, str], **extra: str) -> HookSettings:
    return load_settings(
        HookSettings,
        {
            **env,
            "STOCKPILOT_HOOK_RETRY_INITIAL_S": "0.05",
            "STOCKPILOT_HOOK_RETRY_MAX_S": "0.1",
            "STOCKPILOT_ALERT_LOG": "false",
        }
        | extra,
    )


@contextlib.asynccontextmanager
async def connected(env: dict[str, str]) -> AsyncIterator[NATS]:
    nc = await nats.connect(env["STOCKPILOT_NATS_URL"])
    await provision(nc.jetstream())
    try:
        yield nc
    finally:
        await nc.close()


@contextlib.asynccontextmanager
async def hook_process(hook_settings: HookSettings) -> AsyncIterator[asyncio.Task[int]]:
    """`stockpilot hooks` in this event loop, stopped (as by SIGTERM) at the end of the block."""
    stop = asyncio.Event()
    task = asyncio.create_task(run_hooks(hook_settings, stop))
    try:
        yield task
    finally:
        stop.set()
        assert await asyncio.wait_for(task, timeout=10) == 0


def ids(receiver: Receiver) -> list[str]:
    return [msgspec.json.decode(r.body, type=Alert).id for r in receiver.accepted]


async def test_header_hostile_alert_is_delivered_and_the_next_one_still_arrives(
    env: dict[str, str],
) -> None:
    hostile, plain = make_alert(1, model=HOSTILE_MODEL), make_alert(2)
    async with receiving() as receiver, connected(env) as nc:
        hooks = settings(env, STOCKPILOT_ALERT_WEBHOOK_URL=receiver.url)
        async with hook_process(hooks):
            await publish(nc.jetstream(), hostile)
            await publish(nc.jetstream(), plain)
            await receiver.wait_accepted(2)
    assert ids(receiver) == [hostile.id, plain.id]
    first = receiver.accepted[0]
    for name, value in first.headers.items():
        assert value.isascii() and value.isprintable(), (name, value)
        assert "x-injected" not in name
    key = first.headers[IDEMPOTENCY_KEY_HEADER.lower()]
    assert unquote(key) == hostile.id  # the receiver can dedupe on the exact id
    assert receiver.accepted[1].headers[IDEMPOTENCY_KEY_HEADER.lower()] == plain.id
    # Delivered the first time: no retry of the hostile one held up the next.
    assert len(receiver.requests) == 2


async def test_an_alert_a_receiver_keeps_refusing_is_parked_with_the_reason(
    env: dict[str, str],
) -> None:
    """Always 500: each alert is tried MAX_ATTEMPTS times, parked, and the next one is tried."""
    first, second = make_alert(1), make_alert(2)
    async with receiving(lambda attempt: 500) as receiver, connected(env) as nc:
        parked: list[Msg] = []
        got_both = asyncio.Event()

        async def on_parked(msg: Msg) -> None:
            parked.append(msg)
            if len(parked) == 2:
                got_both.set()

        await nc.subscribe(PARKED_SUBJECT, cb=on_parked)
        hooks = settings(
            env, STOCKPILOT_ALERT_WEBHOOK_URL=receiver.url, STOCKPILOT_HOOK_MAX_ATTEMPTS="3"
        )
        async with hook_process(hooks):
            await publish(nc.jetstream(), first)
            await publish(nc.jetstream(), second)
            await asyncio.wait_for(got_both.wait(), timeout=20)
        status = await read_hooks_status(nc.jetstream())
        marks = await nc.jetstream().key_value(HOOK_MARKS_BUCKET)
        mark = msgspec.json.decode(
            (await marks.get(delivery_key("webhook", first.id))).value or b"", type=DeliveryMark
        )
    bodies = [msgspec.json.decode(r.body, type=Alert).id for r in receiver.requests]
    assert bodies == [first.id] * 3 + [second.id] * 3
    letters = [msgspec.json.decode(m.data, type=DeadLetter) for m in parked]
    assert [msgspec.json.decode(letter.payload, type=Alert).id for letter in letters] == [
        first.id,
        second.id,
    ]
    for letter in letters:
        assert letter.service == "hooks"
        assert letter.subject == first.subject
        assert "hook webhook gave up after 3 attempt(s)" in letter.reason
        assert "HTTP 500" in letter.reason
    assert (mark.outcome, mark.attempts) == ("parked", 3)
    assert status is not None
    webhook = status.hooks[0]
    assert (webhook.parked, webhook.delivered, webhook.last_parked_alert_id) == (2, 0, second.id)


async def test_a_parked_alert_is_not_retried_after_a_restart(env: dict[str, str]) -> None:
    healthy = False
    async with (
        receiving(lambda attempt: 200 if healthy else 503) as receiver,
        connected(env) as nc,
    ):
        hooks = settings(
            env, STOCKPILOT_ALERT_WEBHOOK_URL=receiver.url, STOCKPILOT_HOOK_MAX_ATTEMPTS="2"
        )
        async with hook_process(hooks):
            await publish(nc.jetstream(), make_alert(1))
            await receiver.wait_requests(2)
            await asyncio.sleep(0.3)
        healthy = True
        async with hook_process(hooks):
            await publish(nc.jetstream(), make_alert(2))
            await receiver.wait_accepted(1)
            await asyncio.sleep(0.3)
    assert ids(receiver) == [make_alert(2).id]
    assert len(receiver.requests) == 3


async def test_slack_text_has_no_live_mention_or_link(env: dict[str, str]) -> None:
    alert = make_alert(
        1,
        model="<!channel>",
        title="<!here> <@U024BE7LH>",
        message="spent & gone: <http://evil.example/login|open the budget> <!subteam^S1>",
    )
    async with receiving() as receiver, connected(env) as nc:
        async with hook_process(settings(env, STOCKPILOT_SLACK_WEBHOOK_URL=receiver.url)):
            await publish(nc.jetstream(), alert)
            await receiver.wait_accepted(1)
    text = msgspec.json.decode(receiver.accepted[0].body)["text"]
    assert "<" not in text and ">" not in text
    assert "&lt;!channel&gt;" in text and "&lt;!here&gt;" in text
    assert "&lt;@U024BE7LH&gt;" in text
    assert "&lt;http://evil.example/login|open the budget&gt;" in text
    assert "spent &amp; gone" in text


@contextlib.asynccontextmanager
async def slow_body_receiver() -> AsyncIterator[tuple[str, asyncio.Event, asyncio.Event]]:
    """Answers 200 at once, then holds the rest of its reply until `release` is set."""
    answered, release = asyncio.Event(), asyncio.Event()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            headers = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":", 1)[1])
                for line in headers.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
            await writer.drain()
            answered.set()
            await release.wait()
            writer.write(b"ok")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}/hook", answered, release
        release.set()
        server.close()


async def test_the_delivery_is_recorded_on_the_status_line_not_after_a_slow_body(
    env: dict[str, str],
) -> None:
    """The mark is written while the receiver still holds its body: a crash then repeats nothing."""
    alert = make_alert(1)
    async with slow_body_receiver() as (url, answered, release), connected(env) as nc:
        marks = await nc.jetstream().key_value(HOOK_MARKS_BUCKET)
        async with hook_process(settings(env, STOCKPILOT_ALERT_WEBHOOK_URL=url)):
            await publish(nc.jetstream(), alert)
            await asyncio.wait_for(answered.wait(), timeout=10)
            entry = None
            async with asyncio.timeout(10):
                while entry is None:
                    with contextlib.suppress(nats.js.errors.KeyNotFoundError):
                        entry = await marks.get(delivery_key("webhook", alert.id))
                    await asyncio.sleep(0.05)
            assert not release.is_set()
    mark = msgspec.json.decode(entry.value or b"", type=DeliveryMark)
    assert (mark.alert_id, mark.outcome, mark.attempts) == (alert.id, "delivered", 1)
