"""The projection runner alone: folding and skipping, dead letters (to a real nats-server),
alerts handed to the outbox, change notices, read-your-writes waiters."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import msgspec
import pytest
from nats import connect
from nats.aio.client import Client as NATS

from shared.alert_outbox import AlertOutbox
from shared.alerts import alert_ledger
from shared.change_notices import ChangeNotifier
from shared.clock import ManualClock
from shared.projection import Projection
from shared.projection_runner import ProjectionRunner
from tests.clocks import NOON
from tests.harness import NatsServer
from tests.shared.toy import Counted, ToyView, build, dead_letters

SUBJECT = "stockpilot.usage.recorded"


def counted(i: int, status_code: int = 200) -> bytes:
    event = Counted(id=f"e{i}", occurred_at=NOON, model="m", status_code=status_code)
    return msgspec.json.encode(event)


def runner(*, with_ledger: bool = True) -> tuple[ProjectionRunner, Projection[ToyView, Counted]]:
    _, projection = build()
    ledger = alert_ledger("usage") if with_ledger else None
    outbox = AlertOutbox("usage", ledger)
    projections = [*([ledger] if ledger is not None else []), projection]
    notifier = ChangeNotifier("usage")
    return ProjectionRunner("usage", projections, ManualClock(NOON), outbox, notifier), projection


def stored_ns() -> int:
    return round(NOON.timestamp() * 1e9)


async def test_apply_folds_in_order_and_skips_what_the_view_holds() -> None:
    run, projection = runner()
    tracked = run.tracked["toy"]
    for seq in (1, 2, 2, 1, 3):
        run.apply(tracked, seq, SUBJECT, counted(seq), stored_ns())
    assert projection.view.count == 3
    assert projection.view.last_seq == 3
    assert (tracked.events_applied, tracked.since_snapshot, tracked.dead_lettered) == (3, 3, 0)
    assert run.notifier.pending is not None  # the fold announced a change


async def test_derived_alerts_go_to_the_outbox_when_the_service_has_a_ledger() -> None:
    for with_ledger, expected in ((True, 1), (False, 0)):
        run, _ = runner(with_ledger=with_ledger)
        tracked = run.tracked["toy"]
        for seq in (1, 2, 3):  # the toy derives an alert at its third event
            run.apply(tracked, seq, SUBJECT, counted(seq), stored_ns())
        assert run.outbox.unpublished == expected, with_ledger


async def test_a_waiter_wakes_once_its_sequence_is_folded() -> None:
    run, projection = runner()
    tracked = run.tracked["toy"]
    waiting = asyncio.create_task(run.wait_applied(projection, 2, timeout=10))
    await asyncio.sleep(0)
    run.apply(tracked, 1, SUBJECT, counted(1), stored_ns())
    assert not waiting.done()
    run.apply(tracked, 2, SUBJECT, counted(2), stored_ns())
    assert await waiting is True
    assert await run.wait_applied(projection, 1, timeout=0) is True  # already folded
    assert await run.wait_applied(projection, 9, timeout=0.05) is False


async def test_waiters_wake_in_sequence_order_whenever_they_were_added() -> None:
    # The fold only looks at waiters when an event reaches the lowest sequence waited for:
    # a waiter added later for an earlier sequence must lower that mark.
    run, projection = runner()
    tracked = run.tracked["toy"]
    late = asyncio.create_task(run.wait_applied(projection, 5, timeout=10))
    await asyncio.sleep(0)
    early = asyncio.create_task(run.wait_applied(projection, 3, timeout=10))
    await asyncio.sleep(0)
    woken = []
    for seq in range(1, 6):
        run.apply(tracked, seq, SUBJECT, counted(seq), stored_ns())
        for _ in range(5):  # wait_for's task wakes a few turns after its future is set
            await asyncio.sleep(0)
        woken.append((early.done(), late.done()))
    assert woken == [(False, False), (False, False), (True, False), (True, False), (True, True)]
    assert tracked.waiters.next_seq == float("inf")


async def test_caught_up_is_marked_once() -> None:
    run, _ = runner()
    tracked = run.tracked["toy"]
    assert not tracked.caught_up.is_set()
    run.mark_caught_up(tracked)
    run.mark_caught_up(tracked)
    assert tracked.caught_up.is_set()


@pytest.fixture
async def nc(nats: NatsServer) -> AsyncIterator[NATS]:
    client = await connect(nats.url)
    yield client
    await client.close()


async def test_refused_events_are_dead_lettered_with_their_reason_and_passed(nc: NATS) -> None:
    letters = await dead_letters(nc)
    await nc.flush()
    run, projection = runner()
    run.attach(nc)
    tracked = run.tracked["toy"]
    run.apply(tracked, 1, SUBJECT.encode(), b"{not json", stored_ns())
    run.apply(tracked, 2, SUBJECT, counted(2, status_code=-1), stored_ns())
    run.apply(tracked, 3, SUBJECT, counted(3), stored_ns())
    for _ in range(200):
        if len(letters) == 2:
            break
        await asyncio.sleep(0.01)
    assert [letter.stream_seq for letter in letters] == [1, 2]
    assert [letter.subject for letter in letters] == [SUBJECT, SUBJECT]
    assert "json" in letters[0].reason.lower()
    assert letters[1].reason == "negative status code"
    assert letters[1].occurred_at == NOON  # dated by the runtime's clock
    assert (tracked.dead_lettered, tracked.events_applied) == (2, 1)
    assert projection.view.last_seq == 3
    assert projection.view.count == 1
