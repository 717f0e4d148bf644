"""When each job is expected to start, and what state that puts it in (pure; contract §5).

A schedule (`STOCKPILOT_JOB_SCHEDULES`) is a cron expression in a time zone (croniter, which
handles DST) or a fixed interval, plus a grace period. The batch service stores it as a
`batch.job_scheduled` event when it differs from the last one stored, so the schedule in force
at any moment is in the stream and a replay judges the same. States, Healthchecks.io style:

- `new`: scheduled, never ran since it was scheduled, its first slot not yet overdue;
- `running`: its newest run is running;
- `late`: the expected start has passed, within the grace period;
- `missed`: the expected start + grace has passed without a run (`batch.job_missed` once per
  missed slot);
- `failing`: on time, but its newest finished run failed or was lost;
- `up`: on time and its newest finished run succeeded (or was cancelled or skipped).

A slot is met by any run that started after the previous one (a skipped run counts: the
scheduler did fire). Slots are counted from the later of the newest run's start and the
moment the schedule took effect. A cron run that starts a little *before* its slot (the
worker's clock a second behind ours) meets that slot: up to EARLY_S (at most the grace) early.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from croniter import croniter

from services.batch.contract import JobSchedule, JobState

# Alerts for missed slots raised in one look at most (after a long outage, the newest).
MAX_MISSED_ALERTS = 10
# How early a cron run may start and still meet its slot (clock skew between hosts).
EARLY_S = 60.0


def slots_after(schedule: JobSchedule, after: datetime) -> Iterator[datetime]:
    """The expected starts strictly after `after`, in order (UTC)."""
    if schedule.every_s is not None:
        step = timedelta(seconds=schedule.every_s)
        at = after + step
        while True:
            yield at
            at += step
    local = after.astimezone(ZoneInfo(schedule.tz))
    it = croniter(schedule.cron, local)
    while True:
        nxt: datetime = it.get_next(datetime)
        yield nxt.astimezone(after.tzinfo)


def judge(
    schedule: JobSchedule | None,
    since: datetime | None,
    last_started_at: datetime | None,
    last_status: str | None,
    last_finished_status: str | None,
    now: datetime,
) -> tuple[JobState, datetime | None, datetime | None, list[datetime]]:
    """(state, next expected start, next slot after now, missed slots newest last)."""
    if last_status == "running":
        state: JobState = "running"
    elif last_finished_status in ("failed", "lost"):
        state = "failing"
    else:
        state = "up" if last_started_at is not None else "new"
    if schedule is None:
        return state, None, None, []
    if (
        state == "up"
        and since is not None
        and last_started_at is not None
        and last_started_at < since
    ):
        state = "new"  # it has not run since this schedule took effect
    ran = last_started_at
    if ran is not None and schedule.cron is not None:
        ran += timedelta(seconds=min(EARLY_S, schedule.grace_s))
    anchors = [t for t in (since, ran) if t is not None]
    reference = max(anchors) if anchors else now
    missed: list[datetime] = []
    expected: datetime | None = None
    upcoming: datetime | None = None
    grace = timedelta(seconds=schedule.grace_s)
    for slot in slots_after(schedule, reference):
        if expected is None:
            expected = slot
        if slot > now:
            upcoming = slot
            break
        if slot + grace < now:
            missed.append(slot)
            if len(missed) > 10_000:  # a tiny interval after a long silence: enough counted
                break
    if state == "running":
        return state, expected, upcoming, []
    assert expected is not None
    if missed:
        return "missed", expected, upcoming, missed
    if now > expected:
        return "late", expected, upcoming, []
    return state, expected, upcoming, []
