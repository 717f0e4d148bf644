"""Change notices alone, against a real nats-server: a burst of changes is one notice, the
next waits out the interval, nothing is sent without a connection."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from nats import connect
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from shared.change_notices import ChangeNotifier, changed_subject
from tests.harness import NatsServer


@pytest.fixture
async def nc(nats: NatsServer) -> AsyncIterator[NATS]:
    client = await connect(nats.url)
    yield client
    await client.close()


async def notices(nc: NATS, service: str) -> list[Msg]:
    """A list that fills with the service's change notices as they arrive."""
    seen: list[Msg] = []

    async def on_notice(msg: Msg) -> None:
        seen.append(msg)

    await nc.subscribe(changed_subject(service), cb=on_notice)
    await nc.flush()
    return seen


async def wait_until(condition: object, attempts: int = 200) -> None:
    for _ in range(attempts):
        if callable(condition) and condition():
            return
        await asyncio.sleep(0.01)


async def test_a_burst_of_changes_is_announced_once(nc: NATS) -> None:
    seen = await notices(nc, "usage")
    notifier = ChangeNotifier("usage")
    notifier.attach(nc)
    for _ in range(1000):  # a catch-up folding a thousand events without yielding
        notifier.announce()
    await wait_until(lambda: seen)
    await nc.flush()
    assert len(seen) == 1
    assert notifier.sent == 1
    assert seen[0].subject == "stockpilot.changed.usage"
    assert seen[0].data == b""


async def test_the_next_notice_waits_out_the_interval(nc: NATS) -> None:
    notifier = ChangeNotifier("usage", interval_s=3600.0)
    notifier.attach(nc)
    notifier.announce()  # the first of a quiet service goes at once
    await wait_until(lambda: notifier.sent == 1)
    assert notifier.sent == 1
    notifier.announce()
    pending = notifier.pending
    assert pending is not None
    # Scheduled an interval after the first, not now.
    assert pending.when() - asyncio.get_running_loop().time() > 3000
    pending.cancel()


async def test_nothing_is_sent_without_a_connection() -> None:
    notifier = ChangeNotifier("usage")
    notifier.announce()
    await wait_until(lambda: notifier.pending is None)
    assert notifier.pending is None
    assert notifier.sent == 0
    await notifier.final()  # no connection: nothing to say, and no error


async def test_a_stopping_service_sends_a_last_notice(nc: NATS) -> None:
    seen = await notices(nc, "batch")
    notifier = ChangeNotifier("batch")
    notifier.attach(nc)
    await notifier.final()
    await wait_until(lambda: seen)
    assert [msg.subject for msg in seen] == ["stockpilot.changed.batch"]
