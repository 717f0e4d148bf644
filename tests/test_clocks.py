"""The test clock's instants are what their names say, on any day the suite runs."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from tests.clocks import REAL, awkward_moments, recent_noon, zone_far_from_midnight

# "Now" on many days of the next eight years, computed from the real clock (every ~29 days,
# at a different time of day each), so the helpers are checked on the days the suite will
# really run, month ends, leap years and both DST changes included.
SOME_NOWS = [REAL.now() + timedelta(days=29 * k, hours=7 * k, minutes=13 * k) for k in range(100)]


@pytest.mark.parametrize("now", SOME_NOWS, ids=lambda n: n.strftime("%Y%m%dT%H%M"))
def test_every_moment_is_past_and_awkward(now: datetime) -> None:
    moments = {m.name: m for m in awkward_moments(now)}
    for moment in moments.values():
        assert moment.at <= now, moment
        assert moment.at.tzinfo is not None
    month_end = moments["month-end"].local
    assert (month_end + timedelta(seconds=1)).day == 1
    assert (month_end.hour, month_end.minute, month_end.second) == (23, 59, 59)
    leap = moments["leap-day"].local
    assert (leap.month, leap.day) == (2, 29)
    year_end = moments["year-end"].local
    assert (year_end.month, year_end.day, year_end.hour, year_end.second) == (12, 31, 23, 59)
    zone = ZoneInfo(moments["dst-spring"].zone)
    for name, day_hours in (("dst-spring", 23), ("dst-fall", 25)):
        local = moments[name].local
        start = datetime(local.year, local.month, local.day, tzinfo=zone).astimezone(UTC)
        nxt = (local.replace(tzinfo=None) + timedelta(days=1)).replace(hour=0, minute=0)
        end = nxt.replace(tzinfo=zone).astimezone(UTC)
        assert (end - start) == timedelta(hours=day_hours), name


@pytest.mark.parametrize("now", SOME_NOWS[:20], ids=lambda n: n.strftime("%Y%m%dT%H%M"))
def test_recent_noon_is_the_latest_passed_noon(now: datetime) -> None:
    for zone in ("UTC", "Asia/Seoul", "America/New_York"):
        noon = recent_noon(zone, now)
        assert noon <= now < noon + timedelta(days=1, hours=1)
        assert noon.astimezone(ZoneInfo(zone)).hour == 12


@pytest.mark.parametrize("now", SOME_NOWS, ids=lambda n: n.strftime("%Y%m%dT%H%M"))
def test_the_zone_far_from_midnight_is_there_between_six_and_six(now: datetime) -> None:
    local = now.astimezone(ZoneInfo(zone_far_from_midnight(now)))
    assert 6 <= local.hour < 18
    # An hour either way (a test's own length) stays on the same local day.
    assert (
        (local - timedelta(hours=1)).date() == local.date() == (local + timedelta(hours=1)).date()
    )
