"""The alert outbox alone: settle accounting without a broker, publishing against a real
nats-server (each alert stored once, the ledger's gate held)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from nats import connect
from nats.aio.client import Client as NATS

from shared.alert_outbox import AlertOutbox
from shared.alerts import alert_ledger
from shared.events import Alert, alert_id
from shared.streams import STREAMS, provision
from tests.clocks import NOON
from tests.harness import NatsServer


def toy_alert(scope: str) -> Alert:
    return Alert(
        id=alert_id("usage.toy_three", scope, "ever"),
        occurred_at=NOON,
        source="usage",
        kind="usage.toy_three",
        severity="info",
        title="three",
        message="three events",
        metric="count",
        value=3,
        threshold=3,
    )


async def test_queued_alerts_keep_the_outbox_unsettled() -> None:
    outbox = AlertOutbox("usage", alert_ledger("usage"))
    outbox.queue(toy_alert("a"))
    outbox.queue(toy_alert("b"))
    assert outbox.unpublished == 2
    assert not outbox.idle.is_set()
    assert outbox.published == 0


async def test_an_alert_the_ledger_holds_is_not_queued() -> None:
    ledger = alert_ledger("usage")
    alert = toy_alert("a")
    ledger.view.ids[alert.id] = 1
    outbox = AlertOutbox("usage", ledger)
    outbox.queue(alert)
    assert outbox.unpublished == 0
    assert outbox.idle.is_set()


async def test_a_full_outbox_drops_the_new_alert_without_counting_it() -> None:
    outbox = AlertOutbox("usage", None, maxsize=1)
    outbox.queue(toy_alert("a"))
    outbox.queue(toy_alert("b"))
    assert outbox.unpublished == 1


@pytest.fixture
async def nc(nats: NatsServer) -> AsyncIterator[NATS]:
    client = await connect(nats.url)
    await provision(client.jetstream())
    yield client
    await client.close()


async def test_published_alerts_settle_the_outbox_and_are_stored_once(nc: NATS) -> None:
    js = nc.jetstream()
    outbox = AlertOutbox("usage", alert_ledger("usage"))
    first, second = toy_alert("a"), toy_alert("b")
    # The same alert twice (the ledger has not folded it yet): JetStream stores it once.
    for alert in (first, second, first):
        outbox.queue(alert)
    publishing = asyncio.create_task(outbox.publish_forever(js))
    try:
        assert await outbox.settle(timeout=10)
    finally:
        publishing.cancel()
    assert outbox.unpublished == 0
    assert outbox.published == 2
    info = await js.stream_info(STREAMS["alerts"].name)
    assert info.state.messages == 2


async def test_nothing_is_published_before_the_ledger_has_caught_up(nc: NATS) -> None:
    js = nc.jetstream()
    outbox = AlertOutbox("usage", alert_ledger("usage"))
    ledger_caught_up = asyncio.Event()
    outbox.queue(toy_alert("a"))
    publishing = asyncio.create_task(outbox.publish_forever(js, after=ledger_caught_up))
    try:
        assert not await outbox.settle(timeout=0.3)
        assert (await js.stream_info(STREAMS["alerts"].name)).state.messages == 0
        ledger_caught_up.set()
        assert await outbox.settle(timeout=10)
    finally:
        publishing.cancel()
    assert (await js.stream_info(STREAMS["alerts"].name)).state.messages == 1


async def test_an_alert_the_ledger_folded_meanwhile_settles_without_a_publish(nc: NATS) -> None:
    """Queued before the ledger caught up, found in it afterwards: not published again."""
    js = nc.jetstream()
    ledger = alert_ledger("usage")
    outbox = AlertOutbox("usage", ledger)
    alert = toy_alert("a")
    outbox.queue(alert)
    ledger.view.ids[alert.id] = 1  # the ledger's fold saw it (another replica raised it)
    publishing = asyncio.create_task(outbox.publish_forever(js))
    try:
        assert await outbox.settle(timeout=10)
    finally:
        publishing.cancel()
    assert outbox.published == 0
    assert (await js.stream_info(STREAMS["alerts"].name)).state.messages == 0
