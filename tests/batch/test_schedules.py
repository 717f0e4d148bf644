"""Schedules over two simulated days on the injectable clock (issue #18): states, next
expected starts, one `batch.job_missed` per missed slot, and replay giving the same states."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime, timedelta
from typing import Any

import pytest
from litestar.testing import AsyncTestClient
from nats.aio.client import Client as NATS

from gateway.app import create_app
from gateway.settings import GatewaySettings
from ops.replay import fold_to
from services.batch import queries
from services.batch.contract import JobSchedule
from services.batch.projection import batch_projection
from services.batch.schedule import judge
from services.batch.service import build
from services.batch.settings import BatchSettings
from shared.clock import ManualClock
from shared.projection import view_digest
from shared.runtime import Runtime
from shared.settings import SettingsError, load_settings
from tests.batch.conftest import ADMIN, ADMIN_TOKEN, alerts_of
from tests.clocks import MOMENTS, NOON, Moment
from tests.harness import running_service

SCHEDULES = {
    # 02:00 in Seoul is 17:00 UTC the day before: the slots fall on a UTC day boundary's eve.
    "nightly": {"cron": "0 2 * * *", "grace_s": 1800, "tz": "Asia/Seoul"},
    "sync": {"every_s": 3600, "grace_s": 3600},
}


@asynccontextmanager
async def stack(
    batch_env: dict[str, str], clock: ManualClock, schedules: dict[str, Any]
) -> AsyncIterator[tuple[Runtime, AsyncTestClient[Any]]]:
    env = {**batch_env, "STOCKPILOT_JOB_SCHEDULES": json.dumps(schedules)}
    settings = load_settings(BatchSettings, env)
    gateway_settings = load_settings(
        GatewaySettings,
        {**env, "STOCKPILOT_ADMIN_TOKEN": ADMIN_TOKEN, "STOCKPILOT_CACHE_TTL_S": "0"},
    )
    async with running_service(build(settings), settings, clock=clock) as runtime:
        async with AsyncTestClient(app=create_app(gateway_settings, clock)) as client:
            for _ in range(200):
                if (await client.get("/api/v1/health")).status_code == 200:
                    break
                await asyncio.sleep(0.02)
            yield runtime, client


async def jobs(api: AsyncTestClient[Any]) -> dict[str, dict[str, Any]]:
    answer = await api.get("/api/v1/batch/jobs")
    assert answer.status_code == 200, answer.text
    return {job["job_id"]: job for job in answer.json()["jobs"]}


async def run(api: AsyncTestClient[Any], job_id: str, status: str = "succeeded") -> str:
    started = await api.post(
        f"/api/v1/batch/jobs/{job_id}/runs", json={"status": "started"}, headers=ADMIN
    )
    assert started.status_code == 202, started.text
    execution_id: str = started.json()["execution_id"]
    if status != "running":
        done = await api.post(
            f"/api/v1/batch/jobs/{job_id}/runs",
            json={
                "execution_id": execution_id,
                "status": status,
                "error": "boom" if status == "failed" else None,
            },
            headers=ADMIN,
        )
        assert done.status_code == 202, done.text
    return execution_id


def iso(t: datetime) -> str:
    return t.isoformat().replace("+00:00", "Z")


async def test_two_days_of_schedules_on_the_manual_clock(
    batch_env: dict[str, str], nc: NATS
) -> None:
    js = nc.jetstream()
    # Two days and a bit before the run's noon: every event stays in the real clock's past.
    start = NOON - timedelta(days=3)  # 12:00 UTC = 21:00 in Seoul
    clock = ManualClock(start)
    h = timedelta(hours=1)
    seen: dict[str, list[tuple[float, str]]] = {"nightly": [], "sync": []}
    async with stack(batch_env, clock, SCHEDULES) as (runtime, api):
        first = await jobs(api)
        assert (first["nightly"]["state"], first["sync"]["state"]) == ("new", "new")
        assert first["nightly"]["next_expected_at"] == iso(start + 5 * h)  # 02:00 Seoul
        assert first["sync"]["next_expected_at"] == iso(start + h)
        assert first["sync"]["schedule"]["every_s"] == 3600
        # 48 h in half-hour steps: sync runs on the hour for a day and then stops; nightly
        # runs (and fails) on its first night and never comes back.
        for step in range(1, 97):
            clock.set(start + step * h / 2)
            hours = step / 2
            if hours.is_integer() and 1 <= hours <= 24:
                await run(api, "sync")
            if hours == 5:
                nightly_run = await run(api, "nightly", "running")
            if hours == 5.5:
                done = await api.post(
                    "/api/v1/batch/jobs/nightly/runs",
                    json={"execution_id": nightly_run, "status": "failed", "error": "disk full"},
                    headers=ADMIN,
                )
                assert done.status_code == 202
            now = await jobs(api)
            for job_id in seen:
                seen[job_id].append((hours, now[job_id]["state"]))
            await asyncio.sleep(0.12)  # the service's watch looks every 0.1 s
        final = await jobs(api)
        # /status: a missed schedule makes the batch area degraded, with a reason per job.
        overall = (await api.get("/api/v1/status")).json()
        assert overall["areas"]["batch"]["status"] == "degraded"
        missed_reasons = [r for r in overall["reasons"] if r["code"] == "batch.job_missed"]
        assert [r["params"]["job_id"] for r in missed_reasons] == ["nightly", "sync"]
        assert [j["missed_slots"] for j in overall["batch"]["missed_jobs"]] == [1, 22]
        alerts = await alerts_of(js, "batch.job_missed")
        live_view = runtime.definition.projections[0].view
        live_answer = queries.jobs(live_view, clock.now(), 10.0)

    def state_at(job_id: str, hours: float) -> str:
        return dict(seen[job_id])[hours]

    # sync: up while it runs hourly, late within the hour of grace, then missed.
    assert {state_at("sync", x) for x in (1, 12.5, 24, 25)} == {"up"}
    assert state_at("sync", 25.5) == "late"
    assert state_at("sync", 26.5) == "missed"
    # nightly: new until its first slot, running, failing for a day, late, missed.
    assert state_at("nightly", 4.5) == "new"
    assert state_at("nightly", 5) == "running"
    assert state_at("nightly", 5.5) == state_at("nightly", 28.5) == "failing"
    assert state_at("nightly", 29.5) == "late"  # 02:00 + 30 min: the grace ends now
    assert state_at("nightly", 30) == "missed"
    assert state_at("nightly", 29) == "failing"  # the slot itself: not overdue yet
    assert final["sync"]["state"] == "missed"
    assert final["sync"]["next_expected_at"] == iso(start + 25 * h)
    assert final["sync"]["missed_slots"] == 22  # 25 h … 46 h (47 h is within its grace)
    assert final["nightly"]["next_expected_at"] == iso(start + 29 * h)
    assert final["nightly"]["next_slot_at"] == iso(start + 53 * h)
    assert final["nightly"]["last_execution"]["status"] == "failed"
    assert final["nightly"]["last_execution"]["error"] == "disk full"
    assert final["sync"]["last_execution"]["started_at"] == iso(start + 24 * h)
    # One alert per missed slot: nightly's second night, and each of sync's 22 hours.
    expected_ids = {f"batch.job_missed:nightly:{(start + 29 * h).isoformat()}"} | {
        f"batch.job_missed:sync:{(start + k * h).isoformat()}" for k in range(25, 47)
    }
    assert sorted(a.id for a in alerts) == sorted(expected_ids)

    async def schedule_events() -> dict[str, int]:
        info = await js.stream_info(
            "STOCKPILOT_BATCH", subjects_filter="stockpilot.batch.schedule.>"
        )
        return dict(info.state.subjects or {})

    once = {"stockpilot.batch.schedule.nightly": 1, "stockpilot.batch.schedule.sync": 1}
    assert await schedule_events() == once

    # Replay: folding the stream from its first event judges every job the same...
    fresh = batch_projection()
    await fold_to(js, fresh, live_view.last_seq)
    assert view_digest(fresh.view) == view_digest(live_view)
    assert queries.jobs(fresh.view, clock.now(), 10.0) == live_answer
    # ...and so does a restarted service (its snapshot and the events after it).
    env = {**batch_env, "STOCKPILOT_JOB_SCHEDULES": json.dumps(SCHEDULES)}
    settings = load_settings(BatchSettings, {**env, "STOCKPILOT_SNAPSHOT_EVERY_EVENTS": "1000000"})
    definition = build(settings)
    async with running_service(definition, settings, clock=clock):
        replayed = definition.projections[0].view
        assert view_digest(replayed) == view_digest(live_view)
        assert queries.jobs(replayed, clock.now(), 10.0) == live_answer
        await asyncio.sleep(0.3)  # its watch looks every 0.1 s: a repeated alert would show
    assert len(await alerts_of(js, "batch.job_missed")) == len(expected_ids)
    assert await schedule_events() == once  # the same settings store nothing new

    # A schedule change is an event: sync every 2 h from now on, nightly no longer scheduled.
    changed = {"sync": {"every_s": 7200, "grace_s": 600}}
    async with stack(batch_env, clock, changed) as (runtime, api):
        now = await jobs(api)
        assert now["sync"]["schedule"]["every_s"] == 7200
        assert now["sync"]["state"] == "new"  # counted from the change, no run since
        assert now["sync"]["next_expected_at"] == iso(clock.now() + 2 * h)
        assert now["nightly"]["schedule"] is None
        assert now["nightly"]["state"] == "failing"  # its history stays
        view = runtime.definition.projections[0].view
        assert list(view.schedules) == ["sync"]
    assert await schedule_events() == {subject: 2 for subject in once}


@pytest.mark.parametrize("moment", MOMENTS)
def test_a_daily_cron_slot_is_judged_in_its_zone_at_awkward_moments(moment: Moment) -> None:
    """02:00 local every day in the moment's zone: the slot after the moment is the next
    02:00 local (23 or 25 hours away across a DST change), late within grace, then missed."""
    schedule = JobSchedule(cron="0 2 * * *", grace_s=600, tz=moment.zone)
    since = moment.at
    state, expected, _, missed = judge(schedule, since, None, None, None, moment.at)
    assert (state, missed) == ("new", [])
    assert expected is not None
    local = expected.astimezone(moment.local.tzinfo)
    assert (local.hour, local.minute) in ((2, 0), (3, 0))  # 02:00, or 03:00 when 02:00 is skipped
    assert timedelta(0) < expected - since <= timedelta(hours=25)
    late = judge(schedule, since, None, None, None, expected + timedelta(seconds=1))
    assert late[0] == "late"
    gone = judge(schedule, since, None, None, None, expected + timedelta(seconds=601))
    assert (gone[0], gone[3]) == ("missed", [expected])


@pytest.mark.parametrize(
    "value, words",
    [
        ('{"a":{"cron":"every day"}}', "5-field cron"),
        ('{"a":{}}', "exactly one"),
        ('{"a":{"every_s":60,"tz":"Mars/Base"}}', "IANA time zone"),
        ('{"a b":{"every_s":60}}', "key"),
        ('{"a":{"every_s":60,"grace":5}}', "unknown field"),
    ],
)
def test_a_bad_schedule_stops_the_service_with_one_clear_line(value: str, words: str) -> None:
    with pytest.raises(SettingsError) as caught:
        load_settings(BatchSettings, {"STOCKPILOT_JOB_SCHEDULES": value})
    assert "STOCKPILOT_JOB_SCHEDULES" in str(caught.value)
    assert words in str(caught.value)


def test_a_cron_run_a_few_seconds_early_meets_its_slot() -> None:
    """A worker whose clock is behind ours starts the 02:00 run at 01:59:58 by our clock: the
    slot is met (not missed at 02:10), and the next one expected is tomorrow's."""
    day = NOON.replace(hour=0, minute=0, second=0, microsecond=0)
    slot = day + timedelta(hours=2)
    schedule = JobSchedule(cron="0 2 * * *", grace_s=600, tz="UTC")
    since = day - timedelta(days=1)
    early = slot - timedelta(seconds=2)
    state, expected, _, missed = judge(
        schedule, since, early, "succeeded", "succeeded", slot + timedelta(minutes=11)
    )
    assert (state, missed) == ("up", [])
    assert expected == slot + timedelta(days=1)
    # Ten minutes early is another run: the 02:00 slot is still expected, and missed.
    too_early = slot - timedelta(minutes=10)
    state, expected, _, missed = judge(
        schedule, since, too_early, "succeeded", "succeeded", slot + timedelta(minutes=11)
    )
    assert (state, expected, missed) == ("missed", slot, [slot])
