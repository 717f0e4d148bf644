"""Test time: instants computed from the real clock, never a literal date that becomes the past.

Every instant here lies at or before the real "now", because events are stored with the
stream's own (real) timestamp and one dated after it is refused as coming from the future.
Tests hand the instant to a `ManualClock`, give that clock to the services and the gateway, and
date their events from it, so "today" is the clock's day whatever the calendar says.

`AWKWARD` names the instants that break date code: the last second of a month, 29 February,
both daylight-saving changes of a zone that has them, and the last second of a year. The
date-sensitive tests run at each of them (and at an ordinary `recent_noon`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

import pytest

from shared.clock import SystemClock

REAL = SystemClock()

SEOUL = "Asia/Seoul"
NEW_YORK = "America/New_York"


@dataclass(frozen=True)
class Moment:
    """An instant to set the clock to, and the zone (`STOCKPILOT_TZ`) that makes it awkward."""

    name: str
    zone: str
    at: datetime

    @property
    def local(self) -> datetime:
        """The instant on the zone's wall clock."""
        return self.at.astimezone(ZoneInfo(self.zone))

    @property
    def day_start(self) -> datetime:
        """Midnight (local) of the instant's day, in UTC."""
        local = self.local
        midnight = datetime.combine(local.date(), time(0), tzinfo=ZoneInfo(self.zone))
        return midnight.astimezone(UTC)

    def earlier_today(self, fraction: float) -> datetime:
        """An instant between the day's start (0.0) and the moment itself (1.0), in UTC."""
        return self.day_start + (self.at - self.day_start) * fraction


def _local(zone: str, when: datetime) -> datetime:
    """A naive wall-clock time in `zone` as an aware UTC instant (folds ambiguous to first)."""
    return when.replace(tzinfo=ZoneInfo(zone)).astimezone(UTC)


def recent_noon(zone: str = "UTC", now: datetime | None = None) -> datetime:
    """The latest local noon in `zone` at or before now: half a day of room before it."""
    local = (now or REAL.now()).astimezone(ZoneInfo(zone))
    day = local.date() if local.hour >= 12 else local.date() - timedelta(days=1)
    return _local(zone, datetime.combine(day, time(12)))


def utc_day_start(now: datetime | None = None) -> datetime:
    """Midnight UTC of the real clock's day: where a test of processes on the real clock (in
    UTC) dates its events, then asking for that day by name, not "today", which may turn."""
    return (now or REAL.now()).astimezone(UTC).replace(hour=0, minute=0, second=0, microsecond=0)


def zone_far_from_midnight(now: datetime | None = None) -> str:
    """A fixed-offset zone where `now` is between 06:00 and 18:00: a test whose processes
    count "today" on the real clock (a whole `stockpilot up`) then never sees the day turn."""
    hour = (now or REAL.now()).astimezone(UTC).hour
    offset = 12 - hour  # -11 … +12 hours east of UTC; local noon ± 1 h
    # The Etc/GMT zones' signs are POSIX's: Etc/GMT-5 is five hours east of UTC.
    return "Etc/UTC" if offset == 0 else f"Etc/GMT{-offset:+d}"


def last_second_of_last_month(zone: str, now: datetime | None = None) -> datetime:
    """23:59:59 local on the last day of the month before this one."""
    local = (now or REAL.now()).astimezone(ZoneInfo(zone))
    first = local.date().replace(day=1)
    return _local(zone, datetime.combine(first - timedelta(days=1), time(23, 59, 59)))


def latest_leap_day(zone: str, now: datetime | None = None) -> datetime:
    """Noon local on the latest 29 February that has passed."""
    real = now or REAL.now()
    year = real.astimezone(ZoneInfo(zone)).year
    while True:
        if year % 4 == 0 and (year % 100 != 0 or year % 400 == 0):
            candidate = _local(zone, datetime(year, 2, 29, 12))
            if candidate <= real:
                return candidate
        year -= 1


def last_second_of_last_year(zone: str, now: datetime | None = None) -> datetime:
    """23:59:59 local on 31 December of last year."""
    year = (now or REAL.now()).astimezone(ZoneInfo(zone)).year - 1
    return _local(zone, datetime(year, 12, 31, 23, 59, 59))


def dst_changes(zone: str, now: datetime | None = None) -> tuple[datetime, datetime]:
    """The latest instants (UTC) at which `zone` sprang forward and fell back, both passed."""
    tz = ZoneInfo(zone)
    real = (now or REAL.now()).replace(minute=0, second=0, microsecond=0)
    spring: datetime | None = None
    fall: datetime | None = None
    at = real
    # Walk back an hour at a time (two years at most) until both changes were seen.
    for _ in range(2 * 366 * 24):
        before = at - timedelta(hours=1)
        offset_then, offset_now = before.astimezone(tz).utcoffset(), at.astimezone(tz).utcoffset()
        if offset_then is not None and offset_now is not None and offset_then != offset_now:
            if offset_now > offset_then and spring is None:
                spring = at
            elif offset_now < offset_then and fall is None:
                fall = at
        if spring is not None and fall is not None:
            return spring, fall
        at = before
    raise ValueError(f"{zone} has no daylight-saving changes")


def awkward_moments(now: datetime | None = None) -> list[Moment]:
    """The instants that break date code, computed from `now` (default: the real clock)."""
    # Changes at least an hour old: the moments below lie an hour after them, never ahead of now.
    spring, fall = dst_changes(NEW_YORK, (now or REAL.now()) - timedelta(hours=1))
    return [
        Moment("month-end", SEOUL, last_second_of_last_month(SEOUL, now)),
        Moment("leap-day", "UTC", latest_leap_day("UTC", now)),
        # An hour after each change: "today" then holds the missing or the repeated hour.
        Moment("dst-spring", NEW_YORK, spring + timedelta(hours=1)),
        Moment("dst-fall", NEW_YORK, fall + timedelta(hours=1)),
        Moment("year-end", SEOUL, last_second_of_last_year(SEOUL, now)),
    ]


def moments(now: datetime | None = None) -> list[Moment]:
    """An ordinary moment (a recent noon in Seoul) and every awkward one."""
    return [Moment("noon", SEOUL, recent_noon(SEOUL, now)), *awkward_moments(now)]


# One ordinary instant per test run (computed once, so fixtures and module constants agree):
# the latest noon UTC that has passed. Integration tests set their clock to it.
NOON = recent_noon("UTC")

# Parametrize a test over these: `@pytest.mark.parametrize("moment", MOMENTS)`.
MOMENTS = [pytest.param(m, id=m.name) for m in moments()]
