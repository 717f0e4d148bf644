"""The status reporter alone (no broker): readiness, each projection's position, the digest."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import msgspec

from shared.alert_outbox import AlertOutbox
from shared.projection import view_digest
from shared.projection_runner import Tracked
from shared.service_status import VERSION, StatusReporter
from shared.supervise import Supervisor
from tests.clocks import NOON
from tests.shared.toy import Counted, build


class FoldSettings(msgspec.Struct, kw_only=True):
    tz: str = "UTC"
    budget_usd: float = 12.5
    nats_password: str = "not-a-fold-setting"


def reporter() -> tuple[StatusReporter, Tracked, Supervisor, AlertOutbox]:
    _, projection = build()
    tracked = Tracked(projection)
    supervisor = Supervisor("usage", asyncio.Event())
    outbox = AlertOutbox("usage", None)
    reporter = StatusReporter("usage", {"toy": tracked}, supervisor, outbox, NOON)
    return reporter, tracked, supervisor, outbox


def fold(tracked: Tracked, seq: int) -> None:
    event = Counted(id=f"e{seq}", occurred_at=NOON, model="m", status_code=200)
    tracked.projection.fold(seq, msgspec.json.encode(event))
    tracked.events_applied += 1


def test_not_ready_until_every_projection_has_caught_up() -> None:
    status_of, tracked, _, _ = reporter()
    assert status_of.status("i1").ready is False
    tracked.caught_up.set()
    status = status_of.status("i1")
    assert status.ready is True
    assert status.instance == "i1"
    assert status.version == VERSION
    assert status.started_at == NOON


def test_a_failed_loop_makes_the_service_not_ready() -> None:
    status_of, tracked, supervisor, _ = reporter()
    tracked.caught_up.set()
    supervisor.fail("snapshots", RuntimeError("bucket gone"))
    assert status_of.status("i1").ready is False


def test_each_projection_reports_where_it_stands() -> None:
    status_of, tracked, _, outbox = reporter()
    fold(tracked, 1)
    fold(tracked, 2)
    tracked.lag = 7
    tracked.dead_lettered = 1
    tracked.snapshot_seq = 1
    tracked.snapshot_at = NOON - timedelta(minutes=1)
    outbox.published = 3
    status = status_of.status("i1")
    [toy] = status.projections
    assert (toy.name, toy.stream, toy.last_seq, toy.lag) == ("toy", "STOCKPILOT_USAGE", 2, 7)
    assert (toy.events_applied, toy.dead_lettered) == (2, 1)
    assert (toy.snapshot_seq, toy.snapshot_at) == (1, NOON - timedelta(minutes=1))
    assert status.alerts_published == 3
    assert status.process.rss_mb > 0


def test_the_digest_follows_the_view_and_names_only_fold_settings() -> None:
    status_of, tracked, _, _ = reporter()
    empty = status_of.digest(FoldSettings(), ["tz", "budget_usd"])
    fold(tracked, 1)
    answer = status_of.digest(FoldSettings(), ["tz", "budget_usd"])
    [toy] = answer.projections
    assert toy.last_seq == 1
    assert toy.digest == view_digest(tracked.projection.view)
    assert toy.digest != empty.projections[0].digest
    assert toy.filter_subject == "stockpilot.usage.>"
    assert answer.settings == {"tz": "UTC", "budget_usd": 12.5}
