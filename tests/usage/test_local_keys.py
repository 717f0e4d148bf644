"""The fold's memo of local day/hour by 15-minute slot gives what astimezone gives."""

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from hypothesis import given, settings
from hypothesis import strategies as st

from services.usage.projection import make_local_keys
from services.usage.view import hour_key
from tests.clocks import NOON, dst_changes

ZONES = (
    "UTC",
    "Asia/Seoul",
    "Europe/Berlin",
    "America/New_York",
    "America/St_Johns",  # -3:30, historical 00:01 transitions
    "Asia/Kathmandu",  # +5:45
    "Australia/Lord_Howe",  # 30-minute DST shift
    "Pacific/Chatham",  # +12:45 / +13:45
    "Asia/Kolkata",  # old LMT offsets with seconds
)


def reference(instant: datetime, zone: ZoneInfo) -> tuple[str, int, int, int]:
    local = instant.astimezone(zone)
    return local.date().isoformat(), hour_key(local), local.year, local.month


@settings(max_examples=300, deadline=None)
@given(
    zone=st.sampled_from(ZONES),
    # Bounds of a generated range (old LMT offsets to far-future rules), not dates of "now".
    instant=st.datetimes(
        min_value=datetime(1850, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    ),
    offsets=st.lists(st.integers(min_value=-1800, max_value=1800), min_size=1, max_size=20),
)
def test_local_keys_equal_astimezone(zone: str, instant: datetime, offsets: list[int]) -> None:
    tz = ZoneInfo(zone)
    keys = make_local_keys(tz)
    for seconds in [0, *offsets, 0]:
        at = instant + timedelta(seconds=seconds, microseconds=seconds * 7 % 1_000_000)
        assert keys(at, at.timestamp()) == reference(at, tz)


def transition_windows() -> list[datetime]:
    """The UTC midnights two days before each zone's latest two daylight-saving changes."""
    starts = set()
    for zone in ZONES:
        try:
            changes = dst_changes(zone, NOON)
        except ValueError:  # a zone without daylight saving time
            continue
        for change in changes:
            starts.add((change - timedelta(days=2)).replace(hour=0, minute=0, second=0))
    return sorted(starts)


def test_local_keys_across_dst_transitions_minute_by_minute() -> None:
    windows = transition_windows()
    # New York, Berlin, St John's, Lord Howe and Chatham: each change, some shared.
    assert len(windows) >= 6
    for zone in ZONES:
        tz = ZoneInfo(zone)
        keys = make_local_keys(tz)
        for start in windows:
            for minute in range(0, 4 * 24 * 60, 7):
                at = start + timedelta(minutes=minute, seconds=minute % 60)
                assert keys(at, at.timestamp()) == reference(at, tz), (zone, at)
